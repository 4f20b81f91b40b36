"""Tardis.dev CSV datasets → the event catalog.

Reads ``incremental_book_L2`` (``exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,
amount``) and ``trades`` (``exchange,symbol,timestamp,local_timestamp,id,side,price,amount``), plain
or gzipped, for one symbol; the kind of each file is told by its header. Timestamps are µs since
the epoch (``timestamp`` is the exchange's, ``local_timestamp`` Tardis's receive time). A run of
rows with ``is_snapshot=true`` is a full book that replaces the current one; other rows set a
level's absolute amount, 0 removing it, and rows with the same timestamps form one message. Files
are merged by local time, each keeping its own order, so a book file and a trades file of the same
day can be passed together.

Each file is read a chunk of whole lines at a time (``CHUNK_BYTES``) and the files' messages are merged
as the chunks come, so memory holds the days being built, not the input. A file whose turn in the merge has
not come (a later day's) holds only its first messages: it is closed until the merge asks for more, then
reopened where it was. A chunk whose every line is of the symbol and of the usual form (plain decimal
numbers, ``true``/``false``, ``bid``/``ask``, ``buy``/``sell``: a Tardis export of one symbol) is parsed
by one numba pass, on a reading thread that reads, inflates and parses the next chunk while this one
converts; any other chunk is parsed by polars, whose checks name what is wrong. Both give the same
doubles: a decimal is parsed by the fast path only when one correctly rounded division or multiplication
gives it (Clinger), else the chunk is polars'.
A day's messages are converted in blocks (a snapshot on its own) by ``MessageFeed.block``. When polars
refuses a chunk, the chunk is read again line by line with Python's csv module to find the line and
say what is wrong with it; that slow read only ever runs to produce the error.
"""

from __future__ import annotations

import csv
import io
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import polars as pl
from numba import njit

from quotelab.data.events import LOCAL_BACK, ConvertJob, Findings, clamp_local
from quotelab.data.messages import MessageFeed, finish_summary, open_binary
from quotelab.errors import DataError
from quotelab.timeunits import DAY_NS

BOOK_COLUMNS = ["exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side", "price", "amount"]
TRADE_COLUMNS = ["exchange", "symbol", "timestamp", "local_timestamp", "id", "side", "price", "amount"]
_TYPES = {"exchange": pl.Categorical, "symbol": pl.Categorical, "timestamp": pl.Int64,
          "local_timestamp": pl.Int64, "is_snapshot": pl.Categorical, "id": pl.String, "side": pl.Categorical,
          "price": pl.Float64, "amount": pl.Float64}
_REQUIRED = ["timestamp", "local_timestamp", "price", "amount"]  # a null here is a line the slow read names

# Tardis exchange ids → quotelab venues, where the markets are the same; others get `tardis-<id>`.
EXCHANGE_VENUES: dict[str, str] = {
    "binance": "binance-spot",
    "binance-futures": "binance-usdm",
    "binance-delivery": "binance-cm",
    "bybit": "bybit",
    "okex": "okx",
    "okex-swap": "okx",
    "okex-futures": "okx",
    "okex-options": "okx",
    "okx": "okx",
    "okx-swap": "okx",
    "okx-futures": "okx",
    "okx-options": "okx",
}

DEPTH, SNAPSHOT, TRADE = 0, 1, 2


def venue_for(exchange: str) -> str:
    return EXCHANGE_VENUES.get(exchange, f"tardis-{exchange}")


def _flag(value: str) -> bool | None:
    return {"true": True, "false": False}.get(value.strip().lower())


def _line_text(block: bytes, line: int) -> str:
    """Line ``line`` (1-based) of ``block``, for an error message."""
    start = 0
    for _ in range(line - 1):
        start = block.index(b"\n", start) + 1
    end = block.find(b"\n", start)
    return block[start:end if end >= 0 else len(block)].decode("utf-8", errors="replace").rstrip("\r")


CHUNK_BYTES = 8 << 20  # of CSV text parsed at once: bounds the memory a file takes however long it is. The
# sparser file's chunk waits whole while the merge drains the denser one's, and each file has one more read
# ahead, so this is paid ~4x plus the parsed columns: 64 MB held ~500-600 MB; 8 MB measured as fast
FIRST_CHUNK_BYTES = 1 << 16  # a file's first chunks start small and double: of many files given at once (a
# book and a trades file a day), each waiting for its turn in the merge holds its first messages, parsed (and,
# before it was closed while waiting, its gzip reader and a read-ahead): ~6 MB a file at 1 MiB (8 busy hours in
# 16 files peaked at 357 MB), ~1.5 MB at 64 KiB (307-311 MB), ~0.2 MB closed (see ``_chunks``)


@dataclass
class _Chunk:
    """Rows of the symbol from one file, in file order, and the messages they form as row ranges."""

    line: np.ndarray  # int64, 1-based line of each row
    exch: np.ndarray  # ns
    local: np.ndarray  # ns
    side: np.ndarray  # int8: +1 bid / taker bought, -1 ask / taker sold
    px: np.ndarray
    qty: np.ndarray
    ival: np.ndarray
    snap: np.ndarray  # bool
    back: np.ndarray  # ns by which a row's local time is below an earlier row's of the file, else 0
    m_start: np.ndarray
    m_kind: np.ndarray  # int8: DEPTH, SNAPSHOT or TRADE
    m_local: np.ndarray  # a message's local time, its rows' latest: the merge's key

    ROWS = ("line", "exch", "local", "side", "px", "qty", "ival", "snap", "back")

    @property
    def m_end(self) -> np.ndarray:
        return np.append(self.m_start[1:], self.line.shape[0]).astype(np.int64)

    def rows(self, a: int, z: int) -> dict[str, np.ndarray]:
        return {k: getattr(self, k)[a:z] for k in self.ROWS}


def _message_starts(rows: dict[str, np.ndarray], trades: bool) -> np.ndarray:
    """A trade row is a message; a run of snapshot rows is one whatever its timestamps; delta rows
    group per (timestamp, local_timestamp)."""
    n = rows["line"].shape[0]
    if trades:
        return np.arange(n, dtype=np.int64)
    snap, exch, local = rows["snap"], rows["exch"], rows["local"]
    new = np.ones(n, bool)
    new[1:] = (snap[1:] != snap[:-1]) | (~snap[1:] & ((exch[1:] != exch[:-1]) | (local[1:] != local[:-1])))
    return np.flatnonzero(new)


def _continues(before: dict[str, np.ndarray], rows: dict[str, np.ndarray], book: bool) -> bool:
    """Whether the first of ``rows`` is in the same message as the last of ``before`` (``_message_starts``'s rule)."""
    if not book:
        return False
    snap = bool(before["snap"][-1])
    return snap == bool(rows["snap"][0]) and (snap or (int(before["exch"][-1]) == int(rows["exch"][0])
                                                       and int(before["local"][-1]) == int(rows["local"][0])))


def _chunk(rows: dict[str, np.ndarray], m_start: np.ndarray, trades: bool) -> _Chunk:
    kind = np.full(m_start.shape[0], TRADE, np.int8) if trades else rows["snap"][m_start].astype(np.int8)
    return _Chunk(**rows, m_start=m_start, m_kind=kind, m_local=np.maximum.reduceat(rows["local"], m_start))


@njit(cache=True)
def _merge_nb(local: np.ndarray, file_end: np.ndarray, more: np.ndarray) -> np.ndarray:
    """Message order across files: repeatedly the head with the smallest local time, ties to the
    earlier file. This is heapq.merge's rule, so a file whose local time steps back keeps its order.
    Stops when a file with ``more`` to read has no message left here: its next one might come first."""
    k = file_end.shape[0]
    pos = np.empty(k, np.int64)
    pos[0] = 0
    pos[1:] = file_end[:-1]
    out = np.empty(file_end[-1], np.int64)
    for o in range(out.shape[0]):
        best = -1
        for f in range(k):
            if pos[f] < file_end[f]:
                if best < 0 or local[pos[f]] < local[pos[best]]:
                    best = f
            elif more[f]:
                return out[:o]
        out[o] = pos[best]
        pos[best] += 1
    return out


# -- the clean-block fast path --------------------------------------------------------------------
# Almost every block of a real export is one exchange's one symbol, numbers in plain decimal notation and
# the usual words. Such a block is parsed in one numba pass (polars' CSV reader and the per-column checks
# cost ~3x more); any line that is not like that sends the whole block to polars, whose checks name it.

_POW10 = np.array([float(10**k) for k in range(23)])  # exact doubles
_DIGITS = 48  # b"0"
_COMMA, _NL, _DOT = 44, 10, 46


@njit(cache=True, nogil=True, inline="always")
def _d_nb(buf, i):
    """The digit at ``buf[i]``, or a value above 9."""
    return np.uint64(buf[i]) - np.uint64(_DIGITS)


@njit(cache=True, nogil=True, inline="always")
def _uint_nb(buf, i, max_digits):
    """A field of 1..``max_digits`` digits ending with a comma: (value, index after the comma), (-1, -1) if not."""
    n = buf.shape[0]
    if max_digits == 16 and i + 16 < n and buf[i + 16] == _COMMA:
        # µs timestamps are 16 digits: pairs, then pairs of pairs, so the multiplies do not wait on each other
        a0, a1, a2, a3 = _d_nb(buf, i), _d_nb(buf, i + 1), _d_nb(buf, i + 2), _d_nb(buf, i + 3)
        a4, a5, a6, a7 = _d_nb(buf, i + 4), _d_nb(buf, i + 5), _d_nb(buf, i + 6), _d_nb(buf, i + 7)
        b0, b1, b2, b3 = _d_nb(buf, i + 8), _d_nb(buf, i + 9), _d_nb(buf, i + 10), _d_nb(buf, i + 11)
        b4, b5, b6, b7 = _d_nb(buf, i + 12), _d_nb(buf, i + 13), _d_nb(buf, i + 14), _d_nb(buf, i + 15)
        if max(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7) <= 9:
            hi = ((a0 * 10 + a1) * 100 + (a2 * 10 + a3)) * 10000 + ((a4 * 10 + a5) * 100 + (a6 * 10 + a7))
            lo = ((b0 * 10 + b1) * 100 + (b2 * 10 + b3)) * 10000 + ((b4 * 10 + b5) * 100 + (b6 * 10 + b7))
            return np.int64(hi * 100000000 + lo), i + 17
    v = np.int64(0)
    k = 0
    while i < n and buf[i] != _COMMA:
        d = np.int64(buf[i]) - _DIGITS
        if d < 0 or d > 9 or k == max_digits:
            return -1, -1
        v = v * 10 + d
        k += 1
        i += 1
    if k == 0 or i >= n:
        return -1, -1
    return v, i + 1


@njit(cache=True, nogil=True, inline="always")
def _decimal_nb(buf, i, last, pow10):
    """A field like ``123.45`` or ``1.5e-05`` ending with a comma (a newline or the end if ``last``): (the
    double nearest to it, index after its end), or (nan, -1) if it is not of that form or its digits are too
    many for one correctly rounded operation (Clinger's exact case: a whole mantissa below 2**53, a power of
    ten up to 1e22), which is then the value ``float()`` and polars give."""
    n = buf.shape[0]
    m = np.int64(0)
    j = i
    while i < n and buf[i] == _DIGITS:  # leading zeros are not significant
        i += 1
    lead = i
    while i < n and buf[i] >= _DIGITS and buf[i] <= _DIGITS + 9:
        m = m * 10 + (buf[i] - _DIGITS)
        i += 1
    whole = i - j
    sig = i - lead
    frac = 0
    if i < n and buf[i] == _DOT:
        i += 1
        k = lead = i
        if m == 0:
            while i < n and buf[i] == _DIGITS:
                i += 1
            lead = i
        while i < n and buf[i] >= _DIGITS and buf[i] <= _DIGITS + 9:
            m = m * 10 + (buf[i] - _DIGITS)
            i += 1
        frac = i - k
        if frac == 0:
            return np.nan, -1
        sig += i - lead
    if whole == 0 or sig > 15:
        return np.nan, -1
    e = 0
    if i < n and (buf[i] == 101 or buf[i] == 69):  # e / E
        i += 1
        neg = i < n and buf[i] == 45
        if i < n and (buf[i] == 45 or buf[i] == 43):
            i += 1
        k = 0
        while i < n and buf[i] >= _DIGITS and buf[i] <= _DIGITS + 9 and k < 3:
            e = e * 10 + (buf[i] - _DIGITS)
            k += 1
            i += 1
        if k == 0:
            return np.nan, -1
        if neg:
            e = -e
    e -= frac
    if i < n:
        c = buf[i]
        if not ((c == _NL) if last else (c == _COMMA)):
            return np.nan, -1
    elif not last:
        return np.nan, -1
    if e < 0:
        if e < -22:
            return np.nan, -1
        return np.float64(m) / pow10[-e], i + 1
    if e > 22:
        return np.nan, -1
    return np.float64(m) * pow10[e], i + 1


@njit(cache=True, nogil=True)
def _parse_clean_nb(buf, prefix, book, exch, local, snap, side, px, qty, ival, pow10):
    """Rows of a block whose every line is ``<prefix><timestamp>,<local_timestamp>,`` then ``true|false,
    bid|ask,`` (``book``) or ``<id>,buy|sell,`` then ``<price>,<amount>``; timestamps µs → ns, an id of digits
    or 0. The number of rows, or -1 at the first line of another form (the block is then polars')."""
    n = buf.shape[0]
    p = prefix.shape[0]
    i = 0
    r = 0
    while i < n:
        if i + p > n or r >= exch.shape[0]:
            return -1
        diff = 0
        for k in range(p):  # no early exit: the loop vectorizes
            diff |= buf[i + k] ^ prefix[k]
        if diff:
            return -1
        i += p
        v, i = _uint_nb(buf, i, 16)
        if i < 0:
            return -1
        exch[r] = v * 1000
        v, i = _uint_nb(buf, i, 16)
        if i < 0:
            return -1
        local[r] = v * 1000
        if book:
            if i + 5 <= n and buf[i] == 116 and buf[i + 1] == 114 and buf[i + 2] == 117 and buf[i + 3] == 101 \
                    and buf[i + 4] == _COMMA:  # true,
                snap[r] = True
                i += 5
            elif i + 6 <= n and buf[i] == 102 and buf[i + 1] == 97 and buf[i + 2] == 108 and buf[i + 3] == 115 \
                    and buf[i + 4] == 101 and buf[i + 5] == _COMMA:  # false,
                snap[r] = False
                i += 6
            else:
                return -1
            if i + 4 > n or buf[i + 3] != _COMMA:
                return -1
            if buf[i] == 98 and buf[i + 1] == 105 and buf[i + 2] == 100:  # bid
                side[r] = 1
            elif buf[i] == 97 and buf[i + 1] == 115 and buf[i + 2] == 107:  # ask
                side[r] = -1
            else:
                return -1
            i += 4
            ival[r] = 0
        else:
            # an id of digits is kept, any other (empty, "-7") is 0, as on polars' path
            v = np.int64(0)
            k = 0
            digits = True
            while i < n and buf[i] != _COMMA:
                c = buf[i]
                if c == 34 or c == _NL or c == 13:  # a quote or a line end: the line is polars'
                    return -1
                if c >= _DIGITS and c <= _DIGITS + 9:
                    v = v * 10 + (c - _DIGITS)
                    k += 1
                else:
                    digits = False
                i += 1
            if i >= n or (digits and k > 18):
                return -1
            ival[r] = v if digits and k > 0 else 0
            i += 1
            snap[r] = False
            if i + 4 <= n and buf[i] == 98 and buf[i + 1] == 117 and buf[i + 2] == 121 and buf[i + 3] == _COMMA:
                side[r] = 1  # buy,
                i += 4
            elif i + 5 <= n and buf[i] == 115 and buf[i + 1] == 101 and buf[i + 2] == 108 and buf[i + 3] == 108 \
                    and buf[i + 4] == _COMMA:
                side[r] = -1  # sell,
                i += 5
            else:
                return -1
        x, i = _decimal_nb(buf, i, False, pow10)
        if i < 0:
            return -1
        px[r] = x
        x, i = _decimal_nb(buf, i, True, pow10)
        if i < 0:
            return -1
        qty[r] = x
        r += 1
    return r


@njit(cache=True, nogil=True)
def _lines_nb(buf):
    """Newlines in ``buf`` (5x faster than ``bytes.count``)."""
    n = 0
    for c in buf:
        n += c == _NL
    return n


@dataclass
class _Clean:
    """A block's rows as ``_parse_clean_nb`` read them, and the exchange and symbol of all its lines.

    The reading thread also clamps the local times and finds the messages (``local``, ``back``,
    ``starts``), taking ``prev`` for the latest local time before the block; they are used if that is
    what the converter has (it is, unless a block before was not all of the symbol)."""

    exchange: str
    symbol: str
    rows: dict[str, np.ndarray]
    prev: int | None = None
    local: np.ndarray | None = None
    back: np.ndarray | None = None
    starts: np.ndarray | None = None


SPLIT_BYTES = 1 << 20  # a block at least this long is scanned as two halves at once (``helper``'s thread)


def _scan_clean(block: bytes, book: bool, n_lines: int, helper: ThreadPoolExecutor | None = None) -> _Clean | None:
    """The block by the fast path if every line is of the form it takes; else None. No state is read or
    changed: this runs on the reading thread, and with ``helper`` the block's second half is scanned on
    its thread meanwhile (the parser leaves the GIL; into the same arrays, past the first half's rows)."""
    head = block.split(b"\n", 1)[0].split(b",", 2)
    if len(head) < 3 or any(c in head[0] + head[1] for c in (b'"', b"\r")):
        return None
    try:
        exchange, symbol = head[0].decode(), head[1].decode()
    except UnicodeDecodeError:
        return None
    if not exchange.strip():
        return None
    n = n_lines
    exch, local, ival = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    px, qty, side, snap = np.empty(n), np.empty(n), np.empty(n, np.int8), np.empty(n, bool)
    prefix = np.frombuffer(head[0] + b"," + head[1] + b",", np.uint8)
    buf = np.frombuffer(block, np.uint8)
    cols = (exch, local, snap, side, px, qty, ival)
    mid = block.find(b"\n", len(block) // 2) + 1 if helper is not None and len(block) >= SPLIT_BYTES else 0
    if 0 < mid < len(block):
        k = _lines_nb(buf[:mid])
        second = helper.submit(_parse_clean_nb, buf[mid:], prefix, book, *(c[k:] for c in cols), _POW10)
        ok = _parse_clean_nb(buf[:mid], prefix, book, *(c[:k] for c in cols), _POW10) == k
        if second.result() != n - k or not ok:
            return None
    elif _parse_clean_nb(buf, prefix, book, *cols, _POW10) != n:
        return None
    return _Clean(exchange, symbol, {"exch": exch, "local": local, "side": side, "px": px, "qty": qty,
                                     "ival": ival, "snap": snap})


@njit(cache=True, nogil=True)
def _gather_nb(start, lens, line, exch, side, px, qty, ival, back):
    """The rows of messages ``start[k]:start[k] + lens[k]``, message after message (the merge's order)."""
    cols = (np.empty_like(line), np.empty_like(exch), np.empty_like(side), np.empty_like(px), np.empty_like(qty),
            np.empty_like(ival), np.empty_like(back))
    o_line, o_exch, o_side, o_px, o_qty, o_ival, o_back = cols
    j = 0
    for k in range(start.shape[0]):
        for r in range(start[k], start[k] + lens[k]):
            o_line[j] = line[r]
            o_exch[j] = exch[r]
            o_side[j] = side[r]
            o_px[j] = px[r]
            o_qty[j] = qty[r]
            o_ival[j] = ival[r]
            o_back[j] = back[r]
            j += 1
    return cols


class _Source:
    """One Tardis CSV, plain or gzipped, read a chunk of whole lines at a time."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        self.path = path
        self.fh: BinaryIO | None = open_binary(path)
        self.head = self._read_line()
        self.line = 2  # of the next chunk's first line
        self.done = False
        self.size = min(FIRST_CHUNK_BYTES, CHUNK_BYTES)
        self.at = 0  # where ``suspend`` left off, in the file's (inflated) bytes
        self.info: dict[str, Any] = {"file": self.name, "lines": 0, "kind": "?"}

    def suspend(self) -> None:
        """Close the file until the next block is asked for (``next_block`` reopens it where it was). A gzip
        reader holds ~0.6 MB (ISA-L's 512 KiB input buffer, the inflate state) that a file waiting for its
        turn in the merge does not need."""
        if self.fh is not None and not self.done:
            self.at = self.fh.tell()
            self.fh.close()
            self.fh = None

    def _read_line(self) -> bytes:
        try:
            return self.fh.readline()
        except (OSError, EOFError, zlib.error) as exc:
            raise self._damaged(exc) from None

    def _damaged(self, exc: Exception) -> DataError:
        return DataError(f"{self.name}: the gzip stream is damaged or cut short ({exc}). Fix: download the file "
                         f"again.")

    def next_block(self) -> tuple[bytes, int, int] | None:
        """Whole lines (ending at a newline, but at the end of the file), the line number of the first and
        how many there are."""
        if self.done:
            return None
        try:
            if self.fh is None:  # suspended: the bytes up to ``at`` were read before, so they inflate again
                self.fh = open_binary(self.path)
                self.fh.seek(self.at)
            block = self.fh.read(self.size)
            if block and not block.endswith(b"\n"):
                block += self.fh.readline()  # whole lines: one copy, where cutting at the last newline made two
        except (OSError, EOFError, zlib.error) as exc:
            raise self._damaged(exc) from None
        self.size = min(2 * self.size, CHUNK_BYTES)
        if not block:
            self.done = True
            self.fh.close()
            return None
        first = self.line
        n = _lines_nb(np.frombuffer(block, np.uint8)) + (0 if block.endswith(b"\n") else 1)
        self.line += n
        return block, first, n


class TardisConverter:
    def __init__(self, job: ConvertJob) -> None:
        self.job = job
        self.symbol = job.symbol.upper()
        self.findings = Findings()
        self.feed = MessageFeed(job, self.findings)
        self.stats: dict[str, int] = {"lines": 0, "book_rows": 0, "snapshots": 0, "depth_msgs": 0, "trades": 0,
                                      "other_symbol_rows": 0}
        self.other: dict[str, int] = {}
        self.files: list[dict[str, Any]] = []
        self.exchange: str | None = None
        self.helper: ThreadPoolExecutor | None = None  # scans half of each block while running
        # side-less trades whose local time steps back: count, first (ns, file, line), last (file, line), most ns
        self.dropped_back: list[Any] = [0, 0, "", 0, None, 0]

    # -- reading -------------------------------------------------------------------------------

    def _bad(self, file: str, line: int, why: str, row: list[str] | str) -> DataError:
        text = ",".join(row) if isinstance(row, list) else row
        return DataError(f"{file}:{line}: {why}: {text[:120]!r}. Fix: repair or delete that line and "
                         f"convert again.")

    def _diagnose(self, block: bytes, first: int, file: str, book: bool, why: str) -> DataError:
        """The error for the first line of ``block`` that polars refused, found with the csv module."""
        reader = csv.reader(io.StringIO(block.decode("utf-8", errors="replace"), newline=""))
        for row in reader:
            line = first + reader.line_num - 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 8:
                return self._bad(file, line, f"{len(row)} columns, expected 8", row)
            try:
                int(row[2]), int(row[3]), float(row[6]), float(row[7])
            except ValueError as exc:
                return self._bad(file, line, f"not a number ({exc})", row)
            if book and (_flag(row[4]) is None or row[5] not in ("bid", "ask")):
                return self._bad(file, line, "is_snapshot must be true/false and side bid/ask", row)
        return DataError(f"{file}:{first}: not readable as Tardis CSV ({why.splitlines()[0]}). Fix: check that the "
                         f"file is a whole Tardis CSV export.")

    def _codes(self, df: pl.DataFrame, column: str, mapping: dict[str, int]) -> np.ndarray:
        """A categorical column's values as small ints via ``mapping`` of its (few) distinct values; -99 if unmapped."""
        col = df[column]
        out = np.full(col.shape[0], -99, np.int8)
        for value in col.drop_nulls().unique().to_list():
            if value in mapping:  # one comparison per distinct value beats a per-row dictionary lookup
                out[(col == value).fill_null(False).to_numpy()] = mapping[value]
        return out

    def _open(self, path: Path) -> tuple[_Source, bool]:
        src = _Source(path)
        info = src.info
        self.files.append(info)
        head = src.head.decode("utf-8", errors="replace").rstrip("\r\n")
        if not head.strip() and src.next_block() is None:
            raise DataError(f"{src.name}: the file is empty")
        header = [h.strip() for h in head.split(",")]
        if header == BOOK_COLUMNS:
            info["kind"] = "incremental_book_L2"
        elif header == TRADE_COLUMNS:
            info["kind"] = "trades"
        else:
            raise DataError(f"{src.name}:1: header {head.strip()!r} is neither Tardis incremental_book_L2 "
                            f"({','.join(BOOK_COLUMNS)}), trades ({','.join(TRADE_COLUMNS)}) nor "
                            f"derivative_ticker. Fix: pass Tardis CSV files with their header line.")
        return src, info["kind"] == "incremental_book_L2"

    def _parse(self, src: _Source, book: bool, block: bytes, first: int, n_lines: int, max_local: int,
               clean: _Clean | None = None) -> dict[str, np.ndarray]:
        """One block's rows of the symbol (other symbols, blank lines and side-less trades left out)."""
        rows = self._parse_clean(src, clean, first, n_lines, max_local)
        if rows is not None:
            return rows
        file = src.name
        columns = BOOK_COLUMNS if book else TRADE_COLUMNS
        # polars keeps a blank line as a row of nulls, so rows map to lines, but it counts the columns on
        # the first line: a block that starts blank is read behind the header (a copy of the block).
        lead_blank = not block[:block.find(b"\n") + 1 or len(block)].strip()
        try:
            df = pl.read_csv((",".join(columns) + "\n").encode() + block if lead_blank else block,
                             schema={c: _TYPES[c] for c in columns}, has_header=lead_blank, encoding="utf8-lossy")
        except pl.exceptions.PolarsError as exc:
            raise self._diagnose(block, first, file, book, str(exc)) from None
        if df.height != n_lines:
            raise self._diagnose(block, first, file, book, f"{df.height} rows read from {n_lines} lines")
        src.info["lines"] += n_lines
        self.stats["lines"] += n_lines
        line = np.arange(first, first + df.height, dtype=np.int64)
        spaces = [v for v in df["exchange"].drop_nulls().unique().to_list() if not v.strip()]
        blank = df.select(pl.all_horizontal(pl.exclude("exchange").is_null()) & (
            pl.col("exchange").is_null() | pl.col("exchange").is_in(spaces))).to_series().to_numpy()
        if blank.any():
            self._check_blank(block, first, file, book, line[blank])
            self.findings.add("blank_lines", "blank lines skipped", file, int(line[blank][0]), int(blank.sum()))
        required = _REQUIRED + (["is_snapshot", "side"] if book else [])
        if df.select(pl.any_horizontal(pl.col(required).is_null())).to_series().to_numpy()[~blank].any():
            raise self._diagnose(block, first, file, book, "a field is missing")
        exch_values = [v for v in df["exchange"].drop_nulls().unique(maintain_order=True).to_list() if v.strip()]
        if self.exchange is None and exch_values:
            self.exchange = exch_values[0]
        wrong = np.flatnonzero(~blank & (self._codes(df, "exchange", {self.exchange: 1}) != 1))
        if wrong.shape[0]:
            k = int(wrong[0])
            raise DataError(f"{file}:{int(line[k])}: exchange {df['exchange'][k] or ''!r}, but the input so far is "
                            f"from {self.exchange!r}. Fix: convert one exchange's files at a time.")
        symbols = df["symbol"].drop_nulls().unique().to_list()
        ours = self._codes(df, "symbol", {s: 1 for s in symbols if s.upper() == self.symbol}) == 1
        theirs = ~blank & ~ours
        if theirs.any():
            self.stats["other_symbol_rows"] += int(theirs.sum())
            for sym, n in df.filter(pl.Series(theirs))["symbol"].fill_null("").value_counts().iter_rows():
                self.other[sym] = self.other.get(sym, 0) + n
        line = line[ours]
        df = df.filter(pl.Series(ours))  # no nulls left in the required columns, so to_numpy keeps int64
        exch = df["timestamp"].to_numpy() * 1_000
        local = df["local_timestamp"].to_numpy() * 1_000
        local, back = clamp_local(local, max_local)
        if book:
            snap_code = self._codes(df, "is_snapshot", {v: int(f) for v in df["is_snapshot"].drop_nulls().unique()
                                                        .to_list() if (f := _flag(v)) is not None})
            side = self._codes(df, "side", {"bid": 1, "ask": -1})
            bad = np.flatnonzero((snap_code < 0) | (side == -99))
            if bad.shape[0]:
                ln = int(line[bad[0]])
                raise self._bad(file, ln, "is_snapshot must be true/false and side bid/ask",
                                _line_text(block, ln - first + 1))
            snap = snap_code == 1
            ival = np.zeros(line.shape[0], np.int64)
        else:
            side = self._codes(df, "side", {"buy": 1, "sell": -1})
            snap = np.zeros(line.shape[0], bool)
            ids = df["id"].fill_null("")
            digits = ids.str.contains(r"^[0-9]+$").to_numpy()
            ival = np.where(digits, ids.str.to_integer(strict=False).fill_null(0).to_numpy(), 0).astype(np.int64)
            unknown = np.flatnonzero(side == -99)
            if unknown.shape[0]:
                self.findings.add("trade_side_unknown", f"trades with side {df['side'][int(unknown[0])]!r} "
                                  f"(no initiator) dropped", file, int(line[unknown[0]]), int(unknown.shape[0]))
        rows = {"line": line, "exch": exch, "local": local, "side": side.astype(np.int8), "px": df["price"].to_numpy(),
                "qty": df["amount"].to_numpy(), "ival": ival, "snap": snap, "back": back}
        if not book and unknown.shape[0]:
            known = side != -99
            stepped = np.flatnonzero(~known & (back > 0))
            if stepped.shape[0]:
                # Dropped before the merge (they must not move it), so counted here and placed only if no
                # merged row steps back.
                k = int(stepped[0])
                if not self.dropped_back[0]:
                    self.dropped_back[1:4] = [int(back[k]), file, int(line[k])]
                self.dropped_back[0] += int(stepped.shape[0])
                self.dropped_back[4] = (file, int(line[stepped[-1]]))
                self.dropped_back[5] = max(self.dropped_back[5], int(back[stepped].max()))
            rows = {k: v[known] for k, v in rows.items()}
        return rows

    def _parse_clean(self, src: _Source, clean: _Clean | None, first: int, n_lines: int,
                     max_local: int) -> dict[str, np.ndarray] | None:
        """``_parse``'s rows from the fast path's, if it read the block and the block is of the symbol and
        of the exchange read so far; else None."""
        if clean is None or clean.symbol.upper() != self.symbol or self.exchange not in (None, clean.exchange):
            return None
        self.exchange = clean.exchange
        src.info["lines"] += n_lines
        self.stats["lines"] += n_lines
        if clean.prev != max_local:
            clean.local, clean.back = clamp_local(clean.rows["local"], max_local)
            clean.starts = None
        return {"line": np.arange(first, first + n_lines, dtype=np.int64), **clean.rows, "local": clean.local,
                "back": clean.back}

    def _check_blank(self, block: bytes, first: int, file: str, book: bool, lines: np.ndarray) -> None:
        """polars reads a line of empty fields as it reads a blank line; only a blank one may be skipped."""
        starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + 1, [len(block)]])
        for ln in (lines - first).tolist():
            if block[starts[ln]:starts[ln + 1]].strip():
                raise self._diagnose(block, first, file, book, f"line {ln + first} has only empty fields")

    def _chunks(self, path: Path, pool: ThreadPoolExecutor) -> Iterator[_Chunk]:
        """One file's rows of the symbol, a block at a time, each ending with a whole message (the
        rows of a message cut by the block's end wait for the next block). The next block is read and
        scanned on ``pool``'s thread while this one is converted."""
        src, book = self._open(path)
        pending: dict[str, np.ndarray] | None = None  # the last message read, which may go on
        max_local = -(1 << 62)
        latest: list[int | None] = [max_local]  # the reading thread's, while every block was clean
        one = np.zeros(1, np.int64)

        def read() -> tuple[bytes, int, int, _Clean | None] | None:
            got = src.next_block()
            if got is None:
                return None
            clean = _scan_clean(got[0], book, got[2], self.helper)
            if clean is None or latest[0] is None:
                latest[0] = None
            elif got[2]:
                clean.prev = latest[0]
                clean.local, clean.back = clamp_local(clean.rows["local"], clean.prev)
                clean.starts = _message_starts({**clean.rows, "line": clean.local, "local": clean.local}, not book)
                latest[0] = int(clean.local[-1])  # clamped local times never go down
            return (*got, clean)

        # Until the merge first asks for more than the file's first messages, nothing is read ahead and the file
        # is closed at each yield: of the files given at once (a book and a trades file a day), all but the
        # first day's wait there, and each held ~1.5 MB (its read-ahead, text and parsed, and the gzip reader).
        ahead: Future[tuple[bytes, int, int, _Clean | None] | None] | None = None
        waited = False  # whether the merge has asked for more after a yield
        while (got := (ahead or pool.submit(read)).result()) is not None:  # read on the thread as always
            ahead = pool.submit(read) if waited else None
            block, first, n_lines, clean = got
            rows = self._parse(src, book, block, first, n_lines, max_local, clean)
            del got, block  # the text is not held across a yield
            n = rows["line"].shape[0]
            if not n:
                continue
            max_local = max(max_local, int(rows["local"].max()))
            fast = clean is not None and clean.starts is not None and rows["local"] is clean.local
            m_start = clean.starts if fast else _message_starts(rows, not book)
            clean = None
            if pending is not None:
                # Only the rows that continue the pending message join it (not the whole block).
                cut = 0 if not _continues(pending, rows, book) else int(m_start[1]) if m_start.shape[0] > 1 else n
                if cut:
                    pending = {k: np.concatenate([pending[k], rows[k][:cut]]) for k in rows}
                    if cut == n:
                        continue
                    rows, m_start, n = {k: v[cut:] for k, v in rows.items()}, m_start[1:] - cut, n - cut
                if not waited:
                    src.suspend()
                yield _chunk(pending, one, not book)
                waited = True
            # The last message may go on in the next block; the end of the file releases it below.
            keep = int(m_start[-1])
            pending = {k: v[keep:] for k, v in rows.items()}
            if keep:
                if not waited:
                    src.suspend()
                yield _chunk({k: v[:keep] for k, v in rows.items()}, m_start[:-1], not book)
                waited = True
        if pending is not None:
            yield _chunk(pending, _message_starts(pending, not book), not book)

    # -- converting ------------------------------------------------------------------------------

    def run(self, paths: Sequence[Path]) -> None:
        # One reading thread and a helper for the fast path's scan: reading, inflating and scanning leave the
        # GIL to the converting.
        with ThreadPoolExecutor(1, thread_name_prefix="tardis-read") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="tardis-scan") as self.helper:
            try:
                self._run(paths, pool)
            finally:
                self.helper = None

    def _run(self, paths: Sequence[Path], pool: ThreadPoolExecutor) -> None:
        streams = [self._chunks(Path(p), pool) for p in paths]
        names = [str(p) for p in paths]
        bufs: list[_Chunk | None] = [None] * len(paths)
        more = np.ones(len(paths), bool)
        while True:
            for f, stream in enumerate(streams):
                while more[f] and (bufs[f] is None or not bufs[f].m_start.shape[0]):
                    bufs[f] = next(stream, None)
                    more[f] = bufs[f] is not None
            live = [(f, b) for f, b in enumerate(bufs) if b is not None and b.m_start.shape[0]]
            if not live:
                return
            counts = np.array([b.m_start.shape[0] if b is not None else 0 for b in bufs], np.int64)
            file_end = np.cumsum(counts)
            order = _merge_nb(np.concatenate([b.m_local for _, b in live]), file_end, more)
            file_of = np.searchsorted(file_end, order, side="right")
            taken = np.bincount(file_of, minlength=len(bufs))
            self._emit(bufs, taken, order, file_of, counts, names)
            for f, b in enumerate(bufs):
                if b is not None and taken[f]:
                    r = int(b.m_end[taken[f] - 1])
                    bufs[f] = _Chunk(**b.rows(r, b.line.shape[0]), m_start=b.m_start[taken[f]:] - r,
                                     m_kind=b.m_kind[taken[f]:], m_local=b.m_local[taken[f]:])

    def _local_backwards(self, by_ns: int, file: str, line: int, count: int, last: tuple[str, int] | None,
                         max_ns: int) -> None:
        self.findings.add("local_ts_backwards", LOCAL_BACK.format(ms=by_ns / 1e6), file, line, count,
                          last=last, amount_ms=max(max_ns, by_ns) / 1e6)

    def _emit(self, bufs: list[_Chunk | None], taken: np.ndarray, order: np.ndarray, file_of: np.ndarray,
              counts: np.ndarray, names: list[str]) -> None:
        """Convert the messages the merge took, in its order."""
        used = [(f, b) for f, b in enumerate(bufs) if b is not None and taken[f]]
        n_rows = [int(b.m_end[taken[f] - 1]) for f, b in used]
        row0 = np.cumsum([0, *n_rows])
        m_start = np.concatenate([b.m_start[:taken[f]] + row0[i] for i, (f, b) in enumerate(used)])
        m_end = np.concatenate([b.m_end[:taken[f]] + row0[i] for i, (f, b) in enumerate(used)])
        m_kind = np.concatenate([b.m_kind[:taken[f]] for f, b in used])
        m_local = np.concatenate([b.m_local[:taken[f]] for f, b in used])
        m_file = np.repeat([f for f, _ in used], [int(taken[f]) for f, _ in used])
        # ``order`` indexes every buffered message; renumber it over the taken ones.
        first_msg = np.cumsum(counts) - counts
        taken_before = np.cumsum(taken) - taken
        order = order - first_msg[file_of] + taken_before[file_of]
        lens = (m_end - m_start)[order]
        new_start = np.cumsum(lens) - lens
        # ``snap`` and ``local`` served to form the messages; a row's local time is its message's.
        cols = [np.concatenate([getattr(b, k)[:n] for (_, b), n in zip(used, n_rows, strict=True)])
                for k in ("line", "exch", "side", "px", "qty", "ival", "back")]
        if len(used) > 1:
            cols = _gather_nb(m_start[order], lens, *cols)
        line, exch, side, px, qty, ival, back = cols
        m_kind, m_file, m_local = m_kind[order], m_file[order], m_local[order]
        m_start, m_end = new_start, new_start + lens
        # A depth message's exchange time is its rows' (one timestamp); a snapshot's the latest of its rows.
        m_exch = np.where(m_kind == SNAPSHOT, np.maximum.reduceat(exch, m_start), exch[m_start])
        stepped = np.flatnonzero(back)
        if stepped.shape[0]:
            k, z = int(stepped[0]), int(stepped[-1])
            file = names[int(m_file[np.searchsorted(m_end, k, side="right")])]
            last = names[int(m_file[np.searchsorted(m_end, z, side="right")])]
            self._local_backwards(int(back[k]), file, int(line[k]), int(stepped.shape[0]), (last, int(line[z])),
                                  int(back.max()))

        def where(msg: int, row: int) -> tuple[str, int]:
            return names[int(m_file[msg])], int(line[row] if row >= 0 else line[m_start[msg]])

        day = m_exch // DAY_NS
        snap = m_kind == SNAPSHOT
        cut = np.flatnonzero(snap[1:] | snap[:-1] | (day[1:] != day[:-1])) + 1
        bounds = np.concatenate([[0], cut, [m_kind.shape[0]]]).tolist()
        for a, z in zip(bounds[:-1], bounds[1:], strict=True):
            r0, r1 = int(m_start[a]), int(m_end[z - 1])
            if snap[a]:
                self.stats["snapshots"] += 1
                file, ln = where(a, -1)
                self.feed.snapshot(side[r0:r1], px[r0:r1], qty[r0:r1], int(m_exch[a]), int(m_local[a]), 0, file, ln)
            else:
                trade = m_kind[a:z] == TRADE
                n_depth_rows = int((m_end[a:z] - m_start[a:z])[~trade].sum())
                self.stats["depth_msgs"] += int((~trade).sum())
                self.stats["book_rows"] += n_depth_rows
                self.stats["trades"] += r1 - r0 - n_depth_rows
                self.feed.block(trade, m_exch[a:z], m_local[a:z], m_end[a:z] - r0, side[r0:r1], px[r0:r1],
                                qty[r0:r1], exch[r0:r1], ival[r0:r1],
                                lambda m, r, a=a, r0=r0: where(a + m, r0 + r if r >= 0 else -1))
            self.feed.split.close_ready()

    def finish(self) -> dict[str, Any]:
        count, by_ns, file, line, last, most = self.dropped_back
        if count:
            # The range is the merged rows' if any stepped back; these only add to the count and maximum.
            merged = "local_ts_backwards" in self.findings.items
            self._local_backwards(by_ns, file, line, count, None if merged else last, most)
        names = ", ".join(f["file"] for f in self.files)
        hint = (f"no incremental_book_L2 snapshot rows (is_snapshot=true) for {self.symbol} in {names}, so the book "
                f"cannot be built. Fix: pass the day's incremental_book_L2 file (Tardis starts each with a snapshot), "
                f"and check --symbol.")
        summary = finish_summary(self.feed, hint, self.stats, self.findings, self.other, "symbols")
        exchange = self.exchange or "?"
        return {"exchange": exchange, "venue": venue_for(exchange), "files": self.files, **summary}


def venue_of(files: Sequence[Path]) -> str:
    """The catalog venue of the first data row's exchange, ``tardis`` if no file has a data row."""
    for path in files:
        src = _Source(Path(path))
        try:
            for raw in iter(src.fh.readline, b""):
                exchange = raw.split(b",", 1)[0].decode("utf-8", errors="replace").strip()
                if exchange:
                    return venue_for(exchange)
        except (OSError, EOFError, zlib.error) as exc:
            raise src._damaged(exc) from None
        finally:
            src.fh.close()
    return "tardis"


DERIVATIVE_COLUMNS = ["exchange", "symbol", "timestamp", "local_timestamp", "funding_timestamp", "funding_rate",
                      "predicted_funding_rate", "open_interest", "last_price", "index_price", "mark_price"]


def _header(path: Path) -> list[str]:
    src = _Source(Path(path))
    src.fh.close()
    return [h.strip() for h in src.head.decode("utf-8", errors="replace").rstrip("\r\n").split(",")]


def derivative_ticker(path: Path, symbol: str) -> np.ndarray:
    """A Tardis ``derivative_ticker`` CSV's rows of ``symbol`` as funding rows (:mod:`quotelab.data.funding`):
    mark, index, ``funding_rate`` and ``funding_timestamp`` (the settlement it is for; 0 if empty), µs → ns.
    Rows without a mark price (a venue sends some fields alone) keep the last mark seen."""
    from quotelab.data.funding import rows

    with open_binary(Path(path)) as fh:
        raw = fh.read()
    try:
        df = pl.read_csv(io.BytesIO(raw), schema_overrides={
            "symbol": pl.String, "timestamp": pl.Int64, "local_timestamp": pl.Int64, "funding_timestamp": pl.Int64,
            "funding_rate": pl.Float64, "index_price": pl.Float64, "mark_price": pl.Float64})
    except (pl.exceptions.PolarsError, ValueError) as exc:
        raise DataError(f"{path}: unreadable Tardis derivative_ticker CSV ({exc}). Fix: download the file again."
                        ) from None
    df = df.filter(pl.col("symbol") == symbol).with_columns(pl.col("mark_price").forward_fill())
    return rows(df["timestamp"].to_numpy() * 1000, df["local_timestamp"].to_numpy() * 1000,
                df["mark_price"].fill_null(np.nan).to_numpy(), df["index_price"].fill_null(np.nan).to_numpy(),
                df["funding_rate"].fill_null(np.nan).to_numpy(), df["funding_timestamp"].fill_null(0).to_numpy() * 1000)


def convert(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    """Book and trades files make the days; ``derivative_ticker`` files give their funding rows."""
    deriv = [f for f in files if _header(f) == DERIVATIVE_COLUMNS]
    # Read first (a day's are a few MB), so a stopped convert can keep the funding rows of the days it finished.
    tables = [derivative_ticker(f, job.symbol) for f in deriv]
    funding = np.concatenate(tables) if tables else None
    job.funding_so_far = lambda: funding
    conv = TardisConverter(job)
    conv.run([f for f in files if f not in deriv])
    out = conv.finish()
    if funding is not None:
        out["funding"] = funding
        out["files"] = [*out["files"], *({"file": str(f), "kind": "derivative_ticker", "lines": len(t)}
                                         for f, t in zip(deriv, tables, strict=True))]
    return out
