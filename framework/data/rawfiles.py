"""A catalog symbol written back out as raw venue files: input for the converters and their benchmarks.

Two formats, each a file (or two) per catalog day:

* ``binance-usdm``: the hftbacktest collector's lines (``<local ns> <combined-stream JSON>``, what
  :mod:`quotelab.data.binance` reads): a ``depthUpdate`` per depth message, a ``trade`` per trade and,
  in the first file only, the REST snapshot of the first day's opening book, written as
  ``{"lastUpdateId": L, "E", "T", "bids", "asks"}`` with L = the first message's id so that message
  covers it. Later days' opening snapshots are not written: a collector's stream runs on, and the
  converter opens each day with the book as it stands. Binance stamps ``E``/``T`` in ms, so the
  exchange times are floored to ms (the busy synthetic profile's already are).
* ``tardis``: ``incremental_book_L2`` (each day's opening book as ``is_snapshot=true`` rows, then every
  depth row) and ``trades``, timestamps in µs (floored), exchange ``binance-futures``, what
  :mod:`quotelab.data.tardis` reads.

Depth rows sharing exchange time and id are one message; in a Binance message bids come before asks,
in the order the catalog holds each side. Prices and quantities are written with the decimals of the
tick and lot size, from the integer tick and lot counts, so they parse back to the same doubles.

The rows are formatted by numba kernels into a byte buffer a block at a time, then written through
ISA-L's gzip (level 1) or plain: memory holds one catalog part (1 M rows) and one block's text,
whatever the day's length; 100 M rows take minutes, mostly compression.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from hftbacktest.types import (
    BUY_EVENT,
    DEPTH_CLEAR_EVENT,
    DEPTH_EVENT,
    DEPTH_SNAPSHOT_EVENT,
    EXCH_EVENT,
    TRADE_EVENT,
    event_dtype,
)
from numba import njit

from quotelab.data import catalog
from quotelab.data.tardis import BOOK_COLUMNS, TRADE_COLUMNS
from quotelab.errors import QuotelabError

FORMATS = ("binance-usdm", "tardis")
BLOCK_ROWS = 1 << 17  # rows formatted per kernel call: ~30 MB of text at most
ROW_BYTES = 256  # upper bound of the text of one row (a trade line is the longest, ~190 bytes)

_KIND = np.uint64(0xFF)
_BUY = np.uint64(BUY_EVENT)
_EXCH = np.uint64(EXCH_EVENT)
_K_DEPTH, _K_TRADE, _K_SNAP, _K_CLEAR = (np.uint64(k) for k in (DEPTH_EVENT, TRADE_EVENT, DEPTH_SNAPSHOT_EVENT,
                                                                  DEPTH_CLEAR_EVENT))


def decimals(step: float) -> int:
    """Decimal places of a tick or lot size (0.1 → 1, 0.00001 → 5, 5 → 0)."""
    for d in range(13):
        if abs(round(step * 10**d) - step * 10**d) < 1e-9 * max(1.0, step * 10**d):
            return d
    raise QuotelabError(f"step {step} has more than 12 decimals; cannot write it as a venue would")


def _b(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8)


# ---------------------------------------------------------------------------------------------------
# Kernels


@njit(cache=True)
def _put(buf, pos, s) -> int:
    for i in range(s.shape[0]):
        buf[pos + i] = s[i]
    return pos + s.shape[0]


@njit(cache=True)
def _int(buf, pos, v) -> int:
    if v < 0:
        buf[pos] = 45  # '-'
        pos += 1
        v = -v
    tmp = np.empty(20, np.uint8)
    k = 0
    while True:
        tmp[k] = 48 + v % 10
        v //= 10
        k += 1
        if v == 0:
            break
    for i in range(k):
        buf[pos + i] = tmp[k - 1 - i]
    return pos + k


@njit(cache=True)
def _dec(buf, pos, x, d, scale) -> int:
    """``x`` (a double nearest a decimal with ``d`` places; scale = 10**d) with exactly ``d`` places."""
    v = np.int64(round(x * scale))
    whole = v // np.int64(scale) if d else v
    pos = _int(buf, pos, whole)
    if d:
        buf[pos] = 46  # '.'
        frac = v - whole * np.int64(scale)
        for i in range(d - 1, -1, -1):
            buf[pos + 1 + i] = 48 + frac % 10
            frac //= 10
        pos += d + 1
    return pos


@njit(cache=True)
def _levels(buf, pos, rows, a, z, want_buy, pd, ps, qd, qs) -> int:
    """``["px","qty"],...`` for the rows a..z of one side."""
    first = True
    for i in range(a, z):
        if ((rows[i].ev & _BUY) != 0) != want_buy or (rows[i].ev & _KIND) == _K_CLEAR:
            continue
        if not first:
            buf[pos] = 44  # ','
            pos += 1
        first = False
        buf[pos] = 91  # '['
        buf[pos + 1] = 34  # '"'
        pos = _dec(buf, pos + 2, rows[i].px, pd, ps)
        buf[pos] = 34
        buf[pos + 1] = 44
        buf[pos + 2] = 34
        pos = _dec(buf, pos + 3, rows[i].qty, qd, qs)
        buf[pos] = 34
        buf[pos + 1] = 93  # ']'
        pos += 2
    return pos


@njit(cache=True)
def binance_lines_nb(rows: np.ndarray, buf: np.ndarray, state: np.ndarray, depth_head: np.ndarray,
                     trade_head: np.ndarray, sym: np.ndarray, pd: int, ps: float, qd: int, qs: float) -> int:
    """Collector lines for ``rows`` (whole messages) into ``buf``; return the bytes written.

    ``state`` = [previous message's id (-1: none yet), snapshot id (-1: write no snapshot), whether a
    snapshot is still to be written]. Opening-book rows are written as the REST snapshot if one is
    due, else skipped; clear rows are skipped."""
    n = rows.shape[0]
    pos = 0
    i = 0
    while i < n:
        r = rows[i]
        kind = r.ev & _KIND
        ms = r.exch_ts // 1_000_000
        if kind == _K_TRADE:
            pos = _int(buf, pos, r.local_ts)
            pos = _put(buf, pos, trade_head)
            pos = _int(buf, pos, ms)
            pos = _put(buf, pos, _T_KEY)
            pos = _int(buf, pos, ms)
            pos = _put(buf, pos, _S_KEY)
            pos = _put(buf, pos, sym)
            pos = _put(buf, pos, _TID_KEY)
            pos = _int(buf, pos, r.ival)
            pos = _put(buf, pos, _P_KEY)
            pos = _dec(buf, pos, r.px, pd, ps)
            pos = _put(buf, pos, _Q_KEY)
            pos = _dec(buf, pos, r.qty, qd, qs)
            pos = _put(buf, pos, _M_TRUE if (r.ev & _BUY) == 0 else _M_FALSE)
            i += 1
        elif kind == _K_DEPTH:
            j = i + 1
            while j < n and (rows[j].ev & _KIND) == _K_DEPTH and rows[j].exch_ts == r.exch_ts \
                    and rows[j].ival == r.ival:
                j += 1
            pos = _int(buf, pos, r.local_ts)
            pos = _put(buf, pos, depth_head)
            pos = _int(buf, pos, ms)
            pos = _put(buf, pos, _T_KEY)
            pos = _int(buf, pos, ms)
            pos = _put(buf, pos, _S_KEY)
            pos = _put(buf, pos, sym)
            pos = _put(buf, pos, _UU_KEY)
            pos = _int(buf, pos, r.ival)
            pos = _put(buf, pos, _U_KEY)
            pos = _int(buf, pos, r.ival)
            pos = _put(buf, pos, _PU_KEY)
            pos = _int(buf, pos, state[0] if state[0] >= 0 else r.ival - 1)
            pos = _put(buf, pos, _B_KEY)
            pos = _levels(buf, pos, rows, i, j, True, pd, ps, qd, qs)
            pos = _put(buf, pos, _A_KEY)
            pos = _levels(buf, pos, rows, i, j, False, pd, ps, qd, qs)
            pos = _put(buf, pos, _END)
            state[0] = r.ival
            i = j
        elif kind == _K_SNAP or kind == _K_CLEAR:
            j = i + 1
            while j < n and ((rows[j].ev & _KIND) == _K_SNAP or (rows[j].ev & _KIND) == _K_CLEAR) \
                    and rows[j].exch_ts == r.exch_ts:
                j += 1
            if state[2]:
                pos = _int(buf, pos, r.local_ts)
                pos = _put(buf, pos, _SNAP_HEAD)
                pos = _int(buf, pos, state[1])
                pos = _put(buf, pos, _E_KEY)
                pos = _int(buf, pos, ms)
                pos = _put(buf, pos, _T_KEY)
                pos = _int(buf, pos, ms)
                pos = _put(buf, pos, _BIDS_KEY)
                pos = _levels(buf, pos, rows, i, j, True, pd, ps, qd, qs)
                pos = _put(buf, pos, _ASKS_KEY)
                pos = _levels(buf, pos, rows, i, j, False, pd, ps, qd, qs)
                pos = _put(buf, pos, _SNAP_END)
                state[2] = 0
            i = j
        else:
            i += 1
    return pos


_T_KEY = _b(',"T":')
_E_KEY = _b(',"E":')
_S_KEY = _b(',"s":"')
_TID_KEY = _b('","t":')
_P_KEY = _b(',"p":"')
_Q_KEY = _b('","q":"')
_M_TRUE = _b('","X":"MARKET","m":true}}\n')
_M_FALSE = _b('","X":"MARKET","m":false}}\n')
_UU_KEY = _b('","U":')
_U_KEY = _b(',"u":')
_PU_KEY = _b(',"pu":')
_B_KEY = _b(',"b":[')
_A_KEY = _b('],"a":[')
_END = _b("]}}\n")
_SNAP_HEAD = _b(' {"lastUpdateId":')
_BIDS_KEY = _b(',"bids":[')
_ASKS_KEY = _b('],"asks":[')
_SNAP_END = _b("]}\n")


@njit(cache=True)
def tardis_lines_nb(rows: np.ndarray, book: np.ndarray, trades: np.ndarray, head: np.ndarray, pd: int, ps: float,
                    qd: int, qs: float, lens: np.ndarray) -> None:
    """Tardis CSV lines of ``rows``: book rows into ``book``, trades into ``trades``; byte counts into
    ``lens``. Snapshot rows get ``is_snapshot=true``; clear rows are implied by them and skipped."""
    pb = 0
    pt = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        kind = r.ev & _KIND
        buy = (r.ev & _BUY) != 0
        if kind == _K_TRADE:
            pt = _put(trades, pt, head)
            pt = _int(trades, pt, r.exch_ts // 1000)
            trades[pt] = 44
            pt = _int(trades, pt + 1, r.local_ts // 1000)
            trades[pt] = 44
            pt = _int(trades, pt + 1, r.ival)
            pt = _put(trades, pt, _BUY_COL if buy else _SELL_COL)
            pt = _dec(trades, pt, r.px, pd, ps)
            trades[pt] = 44
            pt = _dec(trades, pt + 1, r.qty, qd, qs)
            trades[pt] = 10
            pt += 1
        elif kind == _K_DEPTH or kind == _K_SNAP:
            pb = _put(book, pb, head)
            pb = _int(book, pb, r.exch_ts // 1000)
            book[pb] = 44
            pb = _int(book, pb + 1, r.local_ts // 1000)
            if kind == _K_SNAP:
                pb = _put(book, pb, _SNAP_BID if buy else _SNAP_ASK)
            else:
                pb = _put(book, pb, _DIFF_BID if buy else _DIFF_ASK)
            pb = _dec(book, pb, r.px, pd, ps)
            book[pb] = 44
            pb = _dec(book, pb + 1, r.qty, qd, qs)
            book[pb] = 10
            pb += 1
    lens[0] = pb
    lens[1] = pt


_BUY_COL = _b(",buy,")
_SELL_COL = _b(",sell,")
_SNAP_BID = _b(",true,bid,")
_SNAP_ASK = _b(",true,ask,")
_DIFF_BID = _b(",false,bid,")
_DIFF_ASK = _b(",false,ask,")


# ---------------------------------------------------------------------------------------------------
# Python side


def _open(path: Path, gz: bool) -> IO[bytes]:
    if gz:
        from isal import igzip

        return igzip.open(path, "wb", compresslevel=1)  # type: ignore[return-value]
    return open(path, "wb")


def _blocks(paths: list[Path]) -> Any:
    """The day's EXCH rows in blocks of about BLOCK_ROWS, each ending at a message boundary, read a
    part at a time (a message cut by a part boundary is carried to the next block)."""
    carry = np.zeros(0, event_dtype)
    for path in paths:
        part = catalog.load_events(path)
        part = part[(part["ev"] & _EXCH) != 0]
        rows = np.concatenate([carry, part]) if carry.shape[0] else part
        del part
        starts = np.flatnonzero(_starts(rows))
        start = 0
        while True:
            # The last message start at or before start + BLOCK_ROWS; the message holding the
            # part's last row waits for the next part, which may continue it.
            k = np.searchsorted(starts, start + BLOCK_ROWS, side="right") - 1
            cut = int(starts[k]) if k >= 0 else 0
            if cut <= start:
                nxt = np.searchsorted(starts, start, side="right")
                cut = int(starts[nxt]) if nxt < starts.shape[0] else rows.shape[0]
            if cut == rows.shape[0] or starts[-1] <= start:
                break
            yield rows[start:cut]
            start = cut
        last = int(starts[-1]) if starts.shape[0] else 0
        if last > start:
            yield rows[start:last]
            start = last
        carry = rows[start:].copy()
        del rows
    if carry.shape[0]:
        yield carry


def _starts(rows: np.ndarray) -> np.ndarray:
    """Whether each row starts a message: depth rows with one exchange time and id, the snapshot and
    clear rows of one instant, each trade on its own."""
    kind = rows["ev"] & _KIND
    group = np.where(kind == _K_DEPTH, 1, np.where((kind == _K_SNAP) | (kind == _K_CLEAR), 2, 3))
    cont = np.zeros(rows.shape[0], bool)
    cont[1:] = ((group[1:] == group[:-1]) & (group[1:] != 3) & (rows["exch_ts"][1:] == rows["exch_ts"][:-1])
                & ((group[1:] != 1) | (rows["ival"][1:] == rows["ival"][:-1])))
    return ~cont


def _first_depth_id(paths: list[Path]) -> int:
    for path in paths:
        ev = catalog.load_events(path)
        d = np.flatnonzero((ev["ev"] & _KIND) == _K_DEPTH)
        if d.shape[0]:
            return int(ev["ival"][d[0]])
    return 1


def write(catalog_root: Path | str, venue: str, symbol: str, fmt: str, out: Path | str, gz: bool = True,
          days: list[str] | None = None, name: str | None = None,
          progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``venue/symbol``'s ``days`` (default: all) of ``catalog_root`` as ``fmt`` files in ``out``.

    ``name``: the symbol written into the files (default ``symbol``). Returns the files and row counts.
    """
    if fmt not in FORMATS:
        raise QuotelabError(f"raw format {fmt!r} is not one of {', '.join(FORMATS)}")
    meta, files = catalog.stream_days(catalog_root, venue, symbol, days or catalog.list_days(catalog_root, venue,
                                                                                             symbol))
    pd, qd = decimals(meta["tick_size"]), decimals(meta["lot_size"])
    ps, qs = float(10**pd), float(10**qd)
    name = name or symbol
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_day: dict[str, list[Path]] = {}
    for p in files.paths:
        by_day.setdefault(p.name.split(".")[0], []).append(p)
    ext = ".gz" if gz else ""
    written: list[str] = []
    rows_out = 0
    buf = np.empty(BLOCK_ROWS * ROW_BYTES + (1 << 20), np.uint8)
    if fmt == "binance-usdm":
        stream = name.lower()
        depth_head = _b(f' {{"stream":"{stream}@depth@0ms","data":{{"e":"depthUpdate","E":')
        trade_head = _b(f' {{"stream":"{stream}@trade","data":{{"e":"trade","E":')
        first = sorted(by_day)[0] if by_day else None
        state = np.array([-1, _first_depth_id(by_day[first]) if first else 1, 1], np.int64)
        for day in sorted(by_day):
            path = out / f"{name.lower()}_{day}{ext}"
            with _open(path, gz) as fh:
                for block in _blocks(by_day[day]):
                    _check_block(block, buf)
                    nb = binance_lines_nb(block, buf, state, depth_head, trade_head, _b(name), pd, ps, qd, qs)
                    fh.write(memoryview(buf[:nb]))
                    rows_out += block.shape[0]
                    if progress:
                        progress(block.shape[0])
            written.append(str(path))
    else:
        head = _b(f"binance-futures,{name},")
        tbuf = np.empty(BLOCK_ROWS * ROW_BYTES, np.uint8)
        lens = np.zeros(2, np.int64)
        for day in sorted(by_day):
            bpath = out / f"binance-futures_incremental_book_L2_{day}_{name}.csv{ext}"
            tpath = out / f"binance-futures_trades_{day}_{name}.csv{ext}"
            with _open(bpath, gz) as fb, _open(tpath, gz) as ft:
                fb.write(",".join(BOOK_COLUMNS).encode() + b"\n")
                ft.write(",".join(TRADE_COLUMNS).encode() + b"\n")
                for block in _blocks(by_day[day]):
                    _check_block(block, buf)
                    tardis_lines_nb(block, buf, tbuf, head, pd, ps, qd, qs, lens)
                    fb.write(memoryview(buf[:lens[0]]))
                    ft.write(memoryview(tbuf[:lens[1]]))
                    rows_out += block.shape[0]
                    if progress:
                        progress(block.shape[0])
            written += [str(bpath), str(tpath)]
    return {"format": fmt, "symbol": name, "files": written, "rows": rows_out,
            "tick_size": meta["tick_size"], "lot_size": meta["lot_size"]}


def _check_block(block: np.ndarray, buf: np.ndarray) -> None:
    # A snapshot block can exceed BLOCK_ROWS (it is never cut); the buffer must still hold it.
    if block.shape[0] * ROW_BYTES > buf.shape[0]:
        raise QuotelabError(f"a message of {block.shape[0]:,} rows is larger than the writer's buffer")
    if not math.isfinite(float(block["px"].max(initial=0.0))):
        raise QuotelabError("non-finite price in the catalog rows; cannot write them as venue text")
