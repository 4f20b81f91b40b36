"""Helpers every raw-capture converter shares: a dense L2 book, day accumulation with a snapshot at
each day start, hftbacktest's EXCH/LOCAL ordering, clock-offset and latency estimation, the
bookTicker-style witness and the quality report.

A converter feeds rows (already in hftbacktest's ``event_dtype``, ``local_ts`` still raw) into a
:class:`DaySplitter`; the splitter closes a UTC day once the stream is safely past it, estimates the
clock offset, stamps the day-start snapshot, orders and flags the rows and streams them to the job's
sink (the catalog's :class:`~quotelab.data.catalog.DayWriter`), then hands the day's summary
(:class:`DayResult`) to a callback. Everything here is venue-agnostic.

Memory does not grow with a day's length. An open day's rows, its per-message latencies and, with a
witness, the book's best levels after each depth message are kept in memory up to a million records
each, the rest appended to unlinked files (:class:`Spill`, in the catalog's staging folder) as they
come; what else stays in memory is running figures: row and latency minima and maxima, and per block of
:data:`BLOCK_ROWS` rows the smallest exch_ts and local_ts. Closing a day is a second pass over the
spill, a block at a time: the clock offset (from the latency minimum) is applied, the snapshot stamped,
the rows ordered within a window (:class:`FlagOrder`: the suffix minima tell which pending rows can no
longer be overtaken) and written a part at a time. The latency percentiles are exact order statistics
found by histogram passes over the latency spill, the same figures ``np.percentile`` gives; the witness
comparison is a merge of the day's book spill with the BBO spill, both in update-id order. The result is
byte for byte the whole-day conversion (tests/convert_reference.py, tests/test_convert_stream.py).
"""

from __future__ import annotations

import bisect
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from hftbacktest.types import (
    BUY_EVENT,
    DEPTH_CLEAR_EVENT,
    DEPTH_EVENT,
    DEPTH_SNAPSHOT_EVENT,
    EXCH_EVENT,
    LOCAL_EVENT,
    SELL_EVENT,
    TRADE_EVENT,
    event_dtype,
)
from numba import njit

from quotelab.errors import DataError
from quotelab.timeunits import DAY_NS

# A day is closed once events this far past its end have been seen: trades and depth travel on
# different streams, so the last trades of a day can arrive after the first depth of the next.
DAY_GRACE_NS = 60 * 1_000_000_000
# A book's price range in ticks beyond which the tick size must be wrong.
MAX_BOOK_TICKS = 1 << 36
EV_TYPE_MASK = 0xFF
BLK_SHIFT = 12
BLK = 1 << BLK_SHIFT
BLK_MASK = BLK - 1


def decimal_tick(tick_size: float) -> tuple[float, float]:
    """``(m, s)``, whole ``m`` and ``s = 10**d`` for the fewest decimals ``d`` with ``m / s == tick_size``
    (0.1 -> (1, 10), 0.25 -> (25, 100)); ``(tick_size, 1)`` for a tick no decimal writes.

    A price ``k`` ticks up is then ``(k*m)/s`` (:func:`tick_prices`): ``k*m`` is exact below 2**53 and
    one correctly rounded division gives the double nearest the decimal price, the double ``float()``
    gives the exchange's text. ``k*tick`` can land an ulp away (61800.200000000004 for 61800.2), and a
    reader keying levels by price then sees two levels where there is one.
    """
    for d in range(16):
        s = 10.0 ** d
        m = round(tick_size * s)
        if m > 0 and m / s == tick_size:
            return float(m), s
    return float(tick_size), 1.0


def tick_prices(ticks: np.ndarray | int, tick_size: float) -> np.ndarray:
    """The prices of ``ticks`` as the exchange writes them (see :func:`decimal_tick`)."""
    m, s = decimal_tick(tick_size)
    return (np.asarray(ticks, dtype=np.float64) * m) / s


def day_of(ts_ns: int) -> str:
    return np.datetime64(int(ts_ns) // DAY_NS * DAY_NS, "ns").astype("datetime64[D]").astype(str).replace("-", "")


# ---------------------------------------------------------------------------------------------
# Findings: every data problem the converter noticed, named, with a place.


@dataclass
class Finding:
    kind: str
    message: str
    file: str | None = None
    line: int | None = None
    count: int = 1
    last_file: str | None = None  # where the last occurrence is, for findings that give a range
    last_line: int | None = None
    max_ms: float | None = None  # the largest amount, for findings that measure one

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "message": self.message, "count": self.count}
        for key in ("file", "line", "last_file", "last_line", "max_ms"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class Findings:
    """Findings keyed by kind: the first occurrence keeps its place, later ones only count."""

    items: dict[str, Finding] = field(default_factory=dict)

    def add(self, kind: str, message: str, file: str | None = None, line: int | None = None,
            count: int = 1, last: tuple[str | None, int | None] | None = None, amount_ms: float | None = None
            ) -> None:
        """``last``: where this batch of occurrences ends, kept as the range's end; ``amount_ms``: kept as
        the maximum."""
        f = self.items.get(kind)
        if f is None:
            f = self.items[kind] = Finding(kind, message, file, line, 0)
        f.count += count
        if last is not None:
            f.last_file, f.last_line = last
        if amount_ms is not None:
            f.max_ms = amount_ms if f.max_ms is None else max(f.max_ms, amount_ms)

    def as_list(self) -> list[dict[str, Any]]:
        return [f.as_dict() for f in self.items.values()]


LOCAL_BACK = ("local time steps back on these lines (first by {ms:.3f} ms): each is set to the latest local time "
              "before it, since lines are written as they arrive; the rest of the day keeps its clock")


def clamp_local(local: np.ndarray, prev: int) -> tuple[np.ndarray, np.ndarray]:
    """Local receive times raised to the latest one before them (``prev`` before the first), and how far
    each stepped back (0 where it did not). A clock that steps back on a few lines must not pass its
    error on: it would be read as latency, and the clock offset of the whole day would follow it."""
    before = np.maximum.accumulate(np.concatenate([[prev], local]))[:-1]
    return np.maximum(local, before), np.maximum(before - local, 0)


# ---------------------------------------------------------------------------------------------
# Paged L2 book: quantity per tick per side, in pages of BLK ticks allocated where levels are.
# A lookup is two indexes, which is what makes the per-level kernel fast, and a far-away order (Binance
# futures accept bids at 1% of the price) costs one page, not the whole range in between.


@njit(cache=True, nogil=True)
def _apply_depth_nb(bmap, amap, bstore, astore, bcnt, acnt, base, best, lv_side, lv_tick, lv_qty, msg_end,
                    out_bbo):
    """Apply messages' levels to the book; after each message record the best bid/ask.

    ``best`` holds ``[best_bid, best_ask, n_bid_levels, n_ask_levels]`` as tick offsets from ``base``
    (-1 / span when a side is empty) and is updated in place. ``*map[page]`` is the row of a page in
    ``*store`` (the caller allocates pages before the call); ``*cnt[page]`` counts its levels, so
    scans for the next best level skip empty pages. ``msg_end[k]`` is the end (exclusive) of message
    k's levels; ``out_bbo[k]`` gets ``bid tick, ask tick, bid qty, ask qty`` (NaN for an empty side).
    """
    span = bmap.shape[0] << BLK_SHIFT
    bb = best[0]
    ba = best[1]
    nb = best[2]
    na = best[3]
    j = 0
    for k in range(msg_end.shape[0]):
        end = msg_end[k]
        while j < end:
            i = lv_tick[j] - base
            pg = i >> BLK_SHIFT
            off = i & BLK_MASK
            q = lv_qty[j]
            if lv_side[j] > 0:
                row = bmap[pg]
                old = bstore[row, off]
                bstore[row, off] = q
                if old == 0.0 and q != 0.0:
                    nb += 1
                    bcnt[pg] += 1
                    if i > bb:
                        bb = i
                elif old != 0.0 and q == 0.0:
                    nb -= 1
                    bcnt[pg] -= 1
                    if i == bb:
                        if nb == 0:
                            bb = -1
                        else:
                            t = i - 1
                            while True:
                                tp = t >> BLK_SHIFT
                                if bcnt[tp] == 0:
                                    t = (tp << BLK_SHIFT) - 1
                                elif bstore[bmap[tp], t & BLK_MASK] != 0.0:
                                    break
                                else:
                                    t -= 1
                            bb = t
            else:
                row = amap[pg]
                old = astore[row, off]
                astore[row, off] = q
                if old == 0.0 and q != 0.0:
                    na += 1
                    acnt[pg] += 1
                    if i < ba:
                        ba = i
                elif old != 0.0 and q == 0.0:
                    na -= 1
                    acnt[pg] -= 1
                    if i == ba:
                        if na == 0:
                            ba = span
                        else:
                            t = i + 1
                            while True:
                                tp = t >> BLK_SHIFT
                                if acnt[tp] == 0:
                                    t = (tp + 1) << BLK_SHIFT
                                elif astore[amap[tp], t & BLK_MASK] != 0.0:
                                    break
                                else:
                                    t += 1
                            ba = t
            j += 1
        if nb > 0:
            out_bbo[k, 0] = bb + base
            out_bbo[k, 2] = bstore[bmap[bb >> BLK_SHIFT], bb & BLK_MASK]
        else:
            out_bbo[k, 0] = np.nan
            out_bbo[k, 2] = np.nan
        if na > 0:
            out_bbo[k, 1] = ba + base
            out_bbo[k, 3] = astore[amap[ba >> BLK_SHIFT], ba & BLK_MASK]
        else:
            out_bbo[k, 1] = np.nan
            out_bbo[k, 3] = np.nan
    best[0] = bb
    best[1] = ba
    best[2] = nb
    best[3] = na


class _Side:
    """One side's pages: ``map[page]`` → row of ``store`` (-1: none yet), ``cnt[page]`` levels."""

    def __init__(self) -> None:
        self.map = np.zeros(0, np.int64)
        self.cnt = np.zeros(0, np.int64)
        self.store = np.zeros((0, BLK))
        self.used = 0

    def extend(self, before: int, after: int) -> None:
        self.map = np.concatenate([np.full(before, -1, np.int64), self.map, np.full(after, -1, np.int64)])
        self.cnt = np.concatenate([np.zeros(before, np.int64), self.cnt, np.zeros(after, np.int64)])

    def alloc(self, pages: np.ndarray) -> None:
        need = pages[self.map[pages] < 0]
        if not need.shape[0]:
            return
        if self.used + need.shape[0] > self.store.shape[0]:
            grow = max(self.used + need.shape[0], 2 * self.store.shape[0], 16)
            store = np.zeros((grow, BLK))
            store[:self.used] = self.store[:self.used]
            self.store = store
        self.map[need] = np.arange(self.used, self.used + need.shape[0])
        self.used += need.shape[0]

    def clear(self) -> None:
        self.store[:self.used] = 0.0
        self.cnt[:] = 0

    def levels(self) -> np.ndarray:
        """Tick offsets (from the book's base) of all levels, ascending."""
        pages = np.flatnonzero(self.cnt)
        rows = self.store[self.map[pages]]
        r, c = np.nonzero(rows)
        return (pages[r] << BLK_SHIFT) + c

    def qty(self, offs: np.ndarray) -> np.ndarray:
        return self.store[self.map[offs >> BLK_SHIFT], offs & BLK_MASK]


@njit(cache=True, nogil=True)
def _bounds_nb(exch, local, cuts, seg_e, seg_l):
    """The smallest exch and local time of each piece ``cuts[k]:cuts[k + 1]``; returns the largest exch time."""
    hi = exch[0]
    for k in range(cuts.shape[0] - 1):
        e = exch[cuts[k]]
        lo = local[cuts[k]]
        for j in range(cuts[k], cuts[k + 1]):
            e = min(e, exch[j])
            lo = min(lo, local[j])
            hi = max(hi, exch[j])
        seg_e[k] = e
        seg_l[k] = lo
    return int(hi)


@njit(cache=True, nogil=True)
def _tick_range_nb(tick):
    lo = hi = tick[0]
    for t in tick:
        lo = min(lo, t)
        hi = max(hi, t)
    return int(lo), int(hi)


@njit(cache=True, nogil=True)
def _pages_used_nb(side, tick, base, bid_used, ask_used):
    """Mark the pages the levels fall in, per side (a bid where ``side > 0``)."""
    for j in range(tick.shape[0]):
        pg = (tick[j] - base) >> BLK_SHIFT
        if side[j] > 0:
            bid_used[pg] = True
        else:
            ask_used[pg] = True


class DenseBook:
    """An L2 book indexed by tick (paged, see ``_apply_depth_nb``) over a tick range that grows on demand."""

    def __init__(self, tick_size: float) -> None:
        self.tick_size = tick_size
        self.base = 0
        self.pages = 0
        self.bid = _Side()
        self.ask = _Side()
        self.best = np.array([-1, 0, 0, 0], np.int64)
        self.last_id = 0

    def clear(self) -> None:
        self.bid.clear()
        self.ask.clear()
        self.best[:] = [-1, self.pages << BLK_SHIFT, 0, 0]

    def ensure(self, lo: int, hi: int, where: str) -> None:
        """Widen the tick range to hold ``lo..hi`` (``apply`` does this itself)."""
        if lo < 0 or hi - min(lo, self.base if self.pages else lo) > MAX_BOOK_TICKS:
            raise DataError(
                f"{where}: book prices span ticks {lo}..{hi} of {self.tick_size}; that is not a plausible "
                f"price range for this tick size. Check --tick-size."
            )
        if not self.pages:
            self.base = lo >> BLK_SHIFT << BLK_SHIFT
        top = self.base + (self.pages << BLK_SHIFT)
        if lo < self.base or hi >= top:
            new_base = min(lo, self.base) >> BLK_SHIFT << BLK_SHIFT
            before = (self.base - new_base) >> BLK_SHIFT
            after = max(0, ((hi - top) >> BLK_SHIFT) + 1)
            for s in (self.bid, self.ask):
                s.extend(before, after)
            shift = before << BLK_SHIFT
            bb, ba, nb, na = (int(x) for x in self.best)
            self.pages += before + after
            self.best[:] = [bb + shift if nb else -1, ba + shift if na else self.pages << BLK_SHIFT, nb, na]
            self.base = new_base

    def _make_room(self, side: np.ndarray, tick: np.ndarray, where: str) -> None:
        if not tick.shape[0]:
            return
        self.ensure(*_tick_range_nb(tick), where)
        bid_used, ask_used = np.zeros(self.pages, np.bool_), np.zeros(self.pages, np.bool_)
        _pages_used_nb(side, tick, self.base, bid_used, ask_used)
        self.bid.alloc(np.flatnonzero(bid_used))
        self.ask.alloc(np.flatnonzero(ask_used))

    def apply(self, side: np.ndarray, tick: np.ndarray, qty: np.ndarray, msg_end: np.ndarray,
              where: str = "") -> np.ndarray:
        self._make_room(side, tick, where)
        out = np.empty((msg_end.shape[0], 4))
        if msg_end.shape[0]:
            _apply_depth_nb(self.bid.map, self.ask.map, self.bid.store, self.ask.store, self.bid.cnt, self.ask.cnt,
                            self.base, self.best, side, tick, qty, msg_end, out)
        return out

    def load(self, side: np.ndarray, tick: np.ndarray, qty: np.ndarray, where: str) -> None:
        """Replace the book by a full snapshot."""
        self._make_room(side, tick, where)
        self.clear()
        self.apply(side, tick, qty, np.array([tick.shape[0]], np.int64), where)

    def levels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(bid ticks best first, bid qtys, ask ticks best first, ask qtys)."""
        bo = self.bid.levels()[::-1]
        ao = self.ask.levels()
        return bo + self.base, self.bid.qty(bo), ao + self.base, self.ask.qty(ao)

    def snapshot_rows(self, exch_ts: int, local_ts: int) -> np.ndarray:
        """The whole book as CLEAR (per side, up to the deepest level) + SNAPSHOT rows; ival = last id."""
        bt, bq, at, aq = self.levels()
        rows = np.zeros(bt.shape[0] + at.shape[0] + 2, event_dtype)
        tick = self.tick_size
        nb = bt.shape[0]
        rows["exch_ts"] = exch_ts
        rows["local_ts"] = local_ts
        rows["ival"] = self.last_id
        rows[0]["ev"] = DEPTH_CLEAR_EVENT | BUY_EVENT
        rows[0]["px"] = tick_prices(bt[-1], tick) if nb else 0.0
        rows["ev"][1:nb + 1] = DEPTH_SNAPSHOT_EVENT | BUY_EVENT
        rows["px"][1:nb + 1] = tick_prices(bt, tick)
        rows["qty"][1:nb + 1] = bq
        rows[nb + 1]["ev"] = DEPTH_CLEAR_EVENT | SELL_EVENT
        rows[nb + 1]["px"] = tick_prices(at[-1], tick) if at.shape[0] else 0.0
        rows["ev"][nb + 2:] = DEPTH_SNAPSHOT_EVENT | SELL_EVENT
        rows["px"][nb + 2:] = tick_prices(at, tick)
        rows["qty"][nb + 2:] = aq
        return rows


@njit(cache=True, nogil=True)
def _fill_depth_rows_nb(rows, side, px, qty, msg_end, m_exch, m_local, m_id, buy_ev, sell_ev):
    j = 0
    for k in range(msg_end.shape[0]):
        end = msg_end[k]
        while j < end:
            r = rows[j]
            r.ev = buy_ev if side[j] > 0 else sell_ev
            r.exch_ts = m_exch[k]
            r.local_ts = m_local[k]
            r.px = px[j]
            r.qty = qty[j]
            r.order_id = 0
            r.ival = m_id[k]
            r.fval = 0.0
            j += 1


def depth_rows(side: np.ndarray, px: np.ndarray, qty: np.ndarray, msg_end: np.ndarray, m_exch: np.ndarray,
               m_local: np.ndarray, m_id: np.ndarray) -> np.ndarray:
    """DEPTH_EVENT rows for messages whose levels end at ``msg_end`` (ival = the message's id)."""
    rows = np.empty(px.shape[0], event_dtype)  # the kernel sets every field
    _fill_depth_rows_nb(rows, side, px, qty, msg_end, m_exch, m_local, m_id,
                        np.uint64(DEPTH_EVENT | BUY_EVENT), np.uint64(DEPTH_EVENT | SELL_EVENT))
    return rows


# ---------------------------------------------------------------------------------------------
# Spills: what an open day accumulates goes to disk as it arrives and is read back in blocks at close,
# so memory holds running statistics, not the day.

BLOCK_ROWS = 1 << 16  # rows per block of a day's second pass (4 MiB of rows). A day closes while the next
# one is read, so what its blocks hold (the one ordered, the one read ahead, the ones queued for the writers)
# adds to the reader's: 16 MiB blocks made 4 busy days in one convert peak at 1.35x one day, 4 MiB ones
# 1.14x, at the same CPU (README, "4 busy days vs 1")
SPILL_BLOCKS = 16  # blocks of an open day's rows a Spill holds in memory before it writes to disk (1 M rows)


class Spill:
    """Records of one dtype appended and read back in order, a block at a time: the first ``memory_rows``
    records are held in memory, the rest go to an unlinked temporary file (``where``: its folder, by
    default the system's). A short day never touches the disk (writing and reading it back cost ~1.3x the
    CPU of converting it), and a long one does not write what it holds anyway: memory holds at most
    ``memory_rows`` records either way, and :meth:`release` lets a reader drop them once read. The file
    has no name, so it vanishes when closed or when the process dies. An array added whole is kept as it
    is (the caller hands it over and does not change it); a view is copied, so that it does not keep a
    larger array alive."""

    def __init__(self, dtype: Any, where: Path | str | None = None,
                 memory_rows: int = SPILL_BLOCKS * BLOCK_ROWS) -> None:
        self.dtype = np.dtype(dtype)
        self.where = where
        self.memory_rows = memory_rows
        self.held: list[np.ndarray | None] = []  # None: released
        self.held_end: list[int] = []  # records up to the end of each held array
        self.n_held = 0  # the records before the file's first
        self.released = 0  # held arrays dropped
        self.fh: Any = None
        self.n = 0

    def add(self, a: np.ndarray) -> None:
        if not a.shape[0]:
            return
        a = np.ascontiguousarray(a, self.dtype)
        if self.fh is None and self.n + a.shape[0] <= self.memory_rows:
            self.n += a.shape[0]
            self.held.append(a if a.flags.owndata else a.copy())
            self.held_end.append(self.n)
            self.n_held = self.n
            return
        if self.fh is None:
            self.fh = tempfile.TemporaryFile(dir=self.where)  # noqa: SIM115 - lives as long as the spill
        self.n += a.shape[0]
        self.fh.write(memoryview(a).cast("B"))

    def read(self, start: int, count: int) -> np.ndarray:
        """Records ``start .. start + count`` (a fresh, writable array)."""
        count = max(0, min(count, self.n - start))
        out = np.empty(count, self.dtype)
        at = 0
        if start < self.n_held:
            k = bisect.bisect_right(self.held_end, start)
            while at < count and k < len(self.held):
                a, end = self.held[k], self.held_end[k]
                if a is None:
                    raise ValueError(f"spill records before {end} were released")
                i = start + at - (end - a.shape[0])
                take = min(count - at, a.shape[0] - i)
                out[at:at + take] = a[i:i + take]
                at += take
                k += 1
        if at == count:
            return out
        self.fh.flush()
        size = self.dtype.itemsize
        view = memoryview(out).cast("B")[at * size:]
        done, pos = 0, (start + at - self.n_held) * size
        while done < len(view):
            got = os.preadv(self.fh.fileno(), [view[done:]], pos + done)
            if got <= 0:
                raise OSError(f"spill file cut short at record {start + at + done // size}")
            done += got
        return out

    def release(self, upto: int) -> None:
        """Drop the held arrays of records below ``upto`` (they will not be read again)."""
        while self.released < len(self.held) and self.held_end[self.released] <= upto:
            self.held[self.released] = None
            self.released += 1

    def blocks(self, rows: int, start: int = 0) -> Iterator[np.ndarray]:
        for at in range(start, self.n, rows):
            yield self.read(at, rows)

    def close(self) -> None:
        self.held, self.held_end = [], []
        if self.fh is not None:
            self.fh.close()


# ---------------------------------------------------------------------------------------------
# hftbacktest ordering: rows flagged EXCH_EVENT must be sorted by exch_ts, rows flagged LOCAL_EVENT
# by local_ts. Where the two orders disagree a row is written twice, once per flag.
#
# The order is a merge of two sequences, the rows by (exch_ts, arrival) and by (local_ts, arrival):
# each step looks at the first row of each not yet written with that flag; the same row is written
# once with both flags, else the one that arrived first with its own flag. Streamed, rows are read in
# arrival order a block at a time, and every row still unread has exch_ts >= the suffix minimum of
# exch_ts from the next block on (recorded per block as the rows were spilled), and arrives later.
# So the pending rows with exch_ts <= that minimum are exactly the first rows of the exch sequence
# still to write, in their final order; likewise for local_ts. Merging while both heads are among
# those known rows, and stopping as soon as either runs out, takes exactly the steps the whole-day
# merge takes. What stays pending between blocks is what the disorder leaves: rows whose exch_ts is
# above a later row's (trades timed before the depth received with them, latency jitter), seconds
# of data, not a day.


@njit(cache=True, nogil=True)
def _flag_round_nb(ce, cl, done_e, done_l, final, out_idx, out_flag):
    """Merge the known heads ``ce`` (pending rows in exch order) and ``cl`` (in local order); pending rows
    are in arrival order, so a smaller index arrived first. Without ``final`` stop when either runs out.
    ``out_flag``: 1 exch, 2 local, 3 both. Returns the number of rows written."""
    ne = ce.shape[0]
    nl = cl.shape[0]
    i = 0
    j = 0
    k = 0
    while True:
        while i < ne and done_e[ce[i]]:
            i += 1
        while j < nl and done_l[cl[j]]:
            j += 1
        if (i >= ne or j >= nl) and (not final or (i >= ne and j >= nl)):
            break
        if i < ne and j < nl and ce[i] == cl[j]:
            r = ce[i]
            out_flag[k] = 3
            done_e[r] = True
            done_l[r] = True
        elif j >= nl or (i < ne and ce[i] < cl[j]):
            r = ce[i]
            out_flag[k] = 1
            done_e[r] = True
        else:
            r = cl[j]
            out_flag[k] = 2
            done_l[r] = True
        out_idx[k] = r
        k += 1
    return k


_FLAGS = np.array([0, EXCH_EVENT, LOCAL_EVENT, EXCH_EVENT | LOCAL_EVENT], np.uint64)


@njit(cache=True, nogil=True)
def _take_nb(pend, new, idx, flags, out):
    """``out[j]`` = row ``idx[j]`` of the pending rows followed by the new ones, its first word or'ed with
    ``flags[j]`` (an empty ``flags``: none), without joining the two."""
    p = pend.shape[0]
    w = out.shape[1]
    for j in range(idx.shape[0]):
        r = idx[j]
        if r < p:
            for c in range(w):
                out[j, c] = pend[r, c]
        else:
            for c in range(w):
                out[j, c] = new[r - p, c]
        if flags.shape[0]:
            out[j, 0] |= flags[j]


class FlagOrder:
    """hftbacktest's order and EXCH/LOCAL flags for rows fed in arrival order, in blocks (see above).

    ``add(rows, lim_exch, lim_local, final)`` takes the next rows and the smallest exch_ts and local_ts
    of every row still to come (ignored with ``final``, the last call) and returns the rows now in place.
    Rows move as 8 words each (a structured array's fancy indexing copies field by field, ~3x slower),
    once: the pending rows and the new block are read where they are, and the two clocks are kept apart.
    """

    def __init__(self) -> None:
        self.raw = np.zeros((0, _WORDS), np.uint64)
        self.exch = np.zeros(0, np.int64)  # the pending rows' clocks
        self.local = np.zeros(0, np.int64)
        self.done_e = np.zeros(0, np.bool_)
        self.done_l = np.zeros(0, np.bool_)
        self.most = 0  # the most rows pending at once, for the tests and benches

    def add(self, rows: np.ndarray, lim_exch: int, lim_local: int, final: bool) -> np.ndarray:
        new = _words(rows)
        signed = new.view(np.int64)
        exch = np.concatenate([self.exch, signed[:, _EXCH]])
        local = np.concatenate([self.local, signed[:, _LOCAL]])
        fresh = np.zeros(new.shape[0], np.bool_)
        self.done_e = np.concatenate([self.done_e, fresh])
        self.done_l = np.concatenate([self.done_l, fresh])
        self.most = max(self.most, exch.shape[0])
        ce = self._heads(exch, self.done_e, lim_exch, final)
        cl = self._heads(local, self.done_l, lim_local, final)
        idx = np.empty(ce.shape[0] + cl.shape[0], np.int64)
        flag = np.empty(idx.shape[0], np.int64)
        k = _flag_round_nb(ce, cl, self.done_e, self.done_l, final, idx, flag)
        out = np.empty((k, _WORDS), np.uint64)
        _take_nb(self.raw, new, idx[:k], _FLAGS[flag[:k]], out)
        keep = np.flatnonzero(~(self.done_e & self.done_l))
        raw = np.empty((keep.shape[0], _WORDS), np.uint64)
        _take_nb(self.raw, new, keep, _FLAGS[:0], raw)
        self.raw, self.exch, self.local = raw, exch[keep], local[keep]
        self.done_e, self.done_l = self.done_e[keep], self.done_l[keep]
        return out.view(event_dtype).reshape(-1)

    @staticmethod
    def _heads(ts: np.ndarray, done: np.ndarray, lim: int, final: bool) -> np.ndarray:
        cand = np.flatnonzero(~done if final else ~done & (ts <= lim))
        return cand[np.argsort(ts[cand], kind="stable")]


_WORDS = event_dtype.itemsize // 8
_EXCH, _LOCAL = event_dtype.fields["exch_ts"][1] // 8, event_dtype.fields["local_ts"][1] // 8
assert event_dtype.fields["ev"][1] == 0 and event_dtype.itemsize % 8 == 0


def _words(rows: np.ndarray) -> np.ndarray:
    """Event rows as an (n, 8) array of 64-bit words (a view when they are contiguous)."""
    return np.ascontiguousarray(rows).view(np.uint64).reshape(-1, _WORDS)


# ---------------------------------------------------------------------------------------------
# Witness: the venue's own best bid/offer stream, keyed by the book's update id.

BBO_DTYPE = np.dtype([("id", "<i8"), ("v", "<f8", (4,))])  # an update id; bid px, ask px, bid qty, ask qty


class Witness:
    """Compares the rebuilt book after each depth message with the venue's BBO feed, by update id.

    For a depth message with final id ``u`` the witness is the last BBO message whose id is ``<= u``
    (ids, not times: a depth message bundles many updates). The BBO messages are spilled to disk
    (:class:`Spill`) and read back at each day's close; when both streams' ids ascend, as a venue's
    stream does, the comparison is a merge of the two, a block at a time.
    """

    def __init__(self, where: Path | str | None = None) -> None:
        self.where = where
        self._spill = Spill(BBO_DTYPE, where)
        self._start = 0  # records before it are forgotten (no later day can need them)
        self._last: int | None = None
        self._sorted = True

    def add_bbo(self, ids: np.ndarray, bid_px: np.ndarray, ask_px: np.ndarray,
                bid_qty: np.ndarray, ask_qty: np.ndarray) -> None:
        if not ids.shape[0]:
            return
        rec = np.empty(ids.shape[0], BBO_DTYPE)
        rec["id"] = ids
        rec["v"] = np.stack([bid_px, ask_px, bid_qty, ask_qty], axis=1)
        self._add(rec)

    def _add(self, rec: np.ndarray) -> None:
        ids = rec["id"]
        if self._sorted and ((self._last is not None and ids[0] < self._last) or np.any(ids[1:] < ids[:-1])):
            self._sorted = False
        self._last = int(ids[-1]) if self._last is None else max(self._last, int(ids.max()))
        self._spill.add(rec)

    def close_day(self, book: Spill, book_sorted: bool, tick: float, block_rows: int = BLOCK_ROWS
                  ) -> dict[str, Any]:
        """The agreement of a day's book (``book``: :data:`BBO_DTYPE` records, one per depth message, the
        book's best levels in ticks) with the BBO feed; then forget BBO messages no later day can need
        (keep the last one at or below the day's last id)."""
        tally = _Agreement(book.n, tick)
        if not book.n:
            return tally.result()
        if not (book_sorted and self._sorted):
            return self._close_day_whole(book, tally)
        wit = self._spill.blocks(block_rows, self._start)
        carry = np.zeros(0, BBO_DTYPE)
        more = True
        for blk in book.blocks(block_rows):
            hi = blk["id"][-1]
            while more and (not carry.shape[0] or carry["id"][-1] <= hi):
                nxt = next(wit, None)
                more = nxt is not None
                if more:
                    carry = np.concatenate([carry, nxt])
            tally.add(blk, carry)
            k = int(np.searchsorted(carry["id"], hi, side="right")) - 1
            if k > 0:
                carry = carry[k:]
                self._start += k
        return tally.result()

    def _close_day_whole(self, book: Spill, tally: _Agreement) -> dict[str, Any]:
        # Ids out of order (never seen in a venue's stream): compare the day whole, sorting the BBO
        # messages by id as they are kept.
        rec = self._spill.read(self._start, self._spill.n - self._start)
        if rec.shape[0] > 1 and np.any(rec["id"][1:] < rec["id"][:-1]):
            rec = rec[np.argsort(rec["id"], kind="stable")]
        day = book.read(0, book.n)
        tally.add(day, rec)
        k = max(int(np.searchsorted(rec["id"], day["id"][-1], side="right")) - 1, 0)
        self._spill.close()
        self._spill, self._start, self._last, self._sorted = Spill(BBO_DTYPE, self.where), 0, None, True
        if rec.shape[0]:
            self._add(rec[k:])
        return tally.result()


class _Agreement:
    """Counts of depth messages whose book's best prices (and sizes) equal the BBO witness's."""

    def __init__(self, messages: int, tick: float) -> None:
        self.tick = tick
        self.res: dict[str, Any] = {"messages": int(messages), "compared": 0, "agreed": 0, "agreed_with_qty": 0,
                                    "rate": None, "rate_with_qty": None, "first_disagreement_id": None}

    def add(self, book: np.ndarray, wit: np.ndarray) -> None:
        if not wit.shape[0]:
            return
        k = np.searchsorted(wit["id"], book["id"], side="right") - 1
        has = k >= 0
        w = wit["v"][k[has]]
        b = book["v"][has]
        px_ok = (np.rint(w[:, 0] / self.tick) == b[:, 0]) & (np.rint(w[:, 1] / self.tick) == b[:, 1])
        qty_ok = px_ok & np.isclose(w[:, 2], b[:, 2], rtol=1e-9, atol=0) & np.isclose(
            w[:, 3], b[:, 3], rtol=1e-9, atol=0)
        res = self.res
        res["compared"] += int(has.sum())
        res["agreed"] += int(px_ok.sum())
        res["agreed_with_qty"] += int(qty_ok.sum())
        bad = np.flatnonzero(~px_ok)
        if bad.shape[0] and res["first_disagreement_id"] is None:
            res["first_disagreement_id"] = int(book["id"][has][bad[0]])

    def result(self) -> dict[str, Any]:
        res = self.res
        if res["compared"]:
            res["rate"] = res["agreed"] / res["compared"]
            res["rate_with_qty"] = res["agreed_with_qty"] / res["compared"]
        return res


# ---------------------------------------------------------------------------------------------
# Latency percentiles, exact, from a spill: order statistics found by histogram passes over the file.

_PCTS = (50, 90, 99)
_BINS = 4096


def _order_stats(spill: Spill, ranks: list[int], lo: int, hi: int, block_rows: int) -> dict[int, int]:
    """The values of rank ``ranks`` (0 = smallest) among the int64 records of ``spill``, all within
    ``lo..hi``: each pass over the file narrows every rank's range ``_BINS``-fold with a histogram, so
    memory holds a block and a few histograms, and a range of 2**k ns takes k/12 passes."""
    state = {r: [lo, hi, 0] for r in set(ranks)}  # range of the value, and how many values lie below it
    while any(s[0] < s[1] for s in state.values()):
        todo = {r: s for r, s in state.items() if s[0] < s[1]}
        width = {r: (s[1] - s[0]) // _BINS + 1 for r, s in todo.items()}
        hist = {r: np.zeros(_BINS, np.int64) for r in todo}
        for blk in spill.blocks(block_rows):
            for r, (a, b, _) in todo.items():
                sel = blk[(blk >= a) & (blk <= b)]
                hist[r] += np.bincount((sel - a) // width[r], minlength=_BINS)
        for r, s in todo.items():
            cum = s[2] + np.cumsum(hist[r])
            k = int(np.searchsorted(cum, r, side="right"))
            below = s[2] if k == 0 else int(cum[k - 1])
            a = s[0] + k * width[r]
            state[r] = [a, min(s[1], a + width[r] - 1), below]
    return {r: s[0] for r, s in state.items()}


def _percentile_points(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's ``percentile(x, _PCTS)`` (method ``linear``) for ``n`` values: the ranks of the two
    neighbours of each and the interpolation weight, computed as numpy computes them."""
    virtual = (n - 1) * np.true_divide(np.asarray(_PCTS), 100)
    prev = np.floor(virtual)
    nxt = prev + 1
    top = virtual >= n - 1
    prev[top] = n - 1
    nxt[top] = n - 1
    return prev.astype(np.int64), nxt.astype(np.int64), virtual - np.floor(virtual)


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    # numpy's own interpolation (numpy.lib._function_base_impl._lerp), step by step, so the figures are
    # the ones np.percentile gives to the last bit
    diff = np.subtract(b, a)
    out = np.asanyarray(np.add(a, diff * t))
    np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5, casting="unsafe", dtype=out.dtype)
    return out


def _stats(p: np.ndarray | None, lo: int, hi: int) -> dict[str, float | None]:
    if p is None:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "min_ms": None, "max_ms": None}
    p = p / 1e6
    return {"p50_ms": round(float(p[0]), 3), "p90_ms": round(float(p[1]), 3), "p99_ms": round(float(p[2]), 3),
            "min_ms": round(float(lo) / 1e6, 3), "max_ms": round(float(hi) / 1e6, 3)}


def latency_stats_spilled(spill: Spill, lo: int, hi: int, shifts: Sequence[int], block_rows: int = BLOCK_ROWS
                          ) -> list[dict[str, float | None]]:
    """:func:`latency_stats` of the int64 records of ``spill`` (all within ``lo..hi``) plus each of
    ``shifts``, to the same figures, without loading them."""
    if not spill.n:
        return [_stats(None, 0, 0) for _ in shifts]
    prev, nxt, t = _percentile_points(spill.n)
    val = _order_stats(spill, [*prev.tolist(), *nxt.tolist()], lo, hi, block_rows)
    a = np.array([val[r] for r in prev.tolist()], np.int64)
    b = np.array([val[r] for r in nxt.tolist()], np.int64)
    return [_stats(_lerp(a + s, b + s, t), lo + s, hi + s) for s in shifts]


# ---------------------------------------------------------------------------------------------
# Days


@dataclass
class DayResult:
    day: str
    events: np.ndarray | None  # the day's rows, or None when they went to ``ConvertJob.open_day``
    info: dict[str, Any]


class DaySink(Protocol):
    """Where a closed day's rows go, in order, a block at a time (:class:`quotelab.data.catalog.DayWriter`)."""

    def expect(self, rows: int) -> None:
        """The day has at least ``rows`` rows (a writer can start parts it knows will be full)."""

    def append(self, rows: np.ndarray) -> None:
        """The next rows; the caller does not change them afterwards."""

    def commit(self) -> None: ...

    def discard(self) -> None: ...


class CollectDay:
    """A day sink that keeps the rows in memory as the parts they stream out in (``events()`` joins them), for
    callers that want a day as an array rather than files."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def expect(self, rows: int) -> None:
        pass

    def append(self, rows: np.ndarray) -> None:
        self.parts.append(rows)

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        self.parts = []

    def events(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, event_dtype)


@dataclass
class ConvertJob:
    """What a converter needs from the caller: where days go and the instrument's spec.

    ``open_day(day)`` gives the sink a closed day's rows are streamed to before ``on_day`` gets its
    summary; without it ``on_day`` gets the day as one array (tests, benches). ``spill_dir``: where
    open days spill (the system's temporary folder by default); ``block_rows``: the rows a day's
    second pass reads at a time.
    """

    venue: str
    symbol: str
    instrument: dict[str, Any]
    on_day: Callable[[DayResult], None]
    open_day: Callable[[str], DaySink] | None = None
    spill_dir: Path | str | None = None
    block_rows: int = BLOCK_ROWS
    # Days begun and not yet handed to ``on_day`` (the :class:`DaySplitter` keeps it): what a stop discards.
    open_days: set[str] = field(default_factory=set)
    # Set by a converter that reads funding rows: all it has read so far, as ``finish()`` would return them
    # (sorted by exchange time), so a stopped conversion can keep the rows of the days it finished.
    funding_so_far: Callable[[], np.ndarray | None] | None = None


_BIG = np.iinfo(np.int64).max


class _Day:
    """An open day: its rows, latencies and book tops spilled, and the running figures the close needs."""

    def __init__(self, day_index: int, where: Path | str | None, block_rows: int) -> None:
        self.day_index = day_index
        self.snapshot: np.ndarray | None = None
        self.rows = Spill(event_dtype, where, SPILL_BLOCKS * block_rows)
        # Per depth message, ~19 a second on a busy perp: a million of them (48 MB) take 14 h to come, so
        # holding as many as rows made a day's read phase grow with its length through its first 14 hours
        # (+13 MB from 80 to 320 busy minutes). A block of them is what a short capture has.
        self.lat = Spill(np.int64, where, block_rows)  # local − exch per message, raw
        self.bbo = Spill(BBO_DTYPE, where, block_rows)
        self.block_rows = block_rows
        self.fill = 0  # rows in the last block
        self.blk_exch: list[int] = []  # per block of rows: the smallest exch_ts and raw local_ts
        self.blk_local: list[int] = []
        self.exch_min = self.local_min = _BIG
        self.exch_max = -_BIG
        self.lat_min = _BIG
        self.lat_max = -_BIG
        self.bbo_sorted = True
        self.last_book_id: int | None = None
        self.findings = Findings()

    def add_rows(self, rows: np.ndarray) -> None:
        if not rows.shape[0]:
            return
        self.rows.add(rows)
        n, size = rows.shape[0], self.block_rows
        cuts, fill = [0], self.fill
        while cuts[-1] < n:  # the rows' pieces by block of the spill
            take = min(size - fill, n - cuts[-1])
            cuts.append(cuts[-1] + take)
            fill = (fill + take) % size
        seg_e, seg_l = np.empty(len(cuts) - 1, np.int64), np.empty(len(cuts) - 1, np.int64)
        hi = _bounds_nb(rows["exch_ts"], rows["local_ts"], np.array(cuts, np.int64), seg_e, seg_l)
        self.exch_min = min(self.exch_min, int(seg_e.min()))
        self.exch_max = max(self.exch_max, hi)
        self.local_min = min(self.local_min, int(seg_l.min()))
        for k, (e, lo) in enumerate(zip(seg_e.tolist(), seg_l.tolist(), strict=True)):
            if self.fill == 0:
                self.blk_exch.append(e)
                self.blk_local.append(lo)
            else:
                self.blk_exch[-1] = min(self.blk_exch[-1], e)
                self.blk_local[-1] = min(self.blk_local[-1], lo)
            self.fill = (self.fill + cuts[k + 1] - cuts[k]) % size

    def add_latency(self, lat: np.ndarray) -> None:
        if lat.shape[0]:
            self.lat.add(lat)
            self.lat_min = min(self.lat_min, int(lat.min()))
            self.lat_max = max(self.lat_max, int(lat.max()))

    def add_bbo(self, ids: np.ndarray, bbo: np.ndarray) -> None:
        if not ids.shape[0]:
            return
        rec = np.empty(ids.shape[0], BBO_DTYPE)
        rec["id"] = ids
        rec["v"] = bbo
        if self.bbo_sorted and ((self.last_book_id is not None and ids[0] < self.last_book_id)
                                or np.any(ids[1:] < ids[:-1])):
            self.bbo_sorted = False
        self.last_book_id = int(ids[-1])
        self.bbo.add(rec)

    def close(self) -> None:
        for s in (self.rows, self.lat, self.bbo):
            s.close()


class DaySplitter:
    """Collects rows per UTC day of exchange time and closes days as the stream moves past them.

    Rows arrive in arrival order with raw ``local_ts`` and are spilled to disk as they come (one
    unlinked file per open day, beside the latencies and, with a witness, the book's best levels);
    only running figures stay in memory. When a day closes, the clock offset is estimated as the
    smallest shift that makes every message's ``local − exch`` non-negative; the offset applied never
    decreases from one day to the next of a conversion, so local time never runs backwards across a
    day boundary. The shift is recorded in the day's ``quality``. A second pass then reads the spill a
    block at a time, shifts ``local_ts``, stamps the day-start snapshot, puts the rows in
    hftbacktest's order (:class:`FlagOrder`) and streams them to the job's sink; latency percentiles
    and the witness's agreement are computed from their spills the same way. Memory is a few blocks
    of :data:`BLOCK_ROWS` rows whatever the day's length.
    """

    def __init__(self, book: DenseBook, witness: Witness | None, job: ConvertJob) -> None:
        self.book = book
        self.witness = witness
        self.job = job
        self.on_day = job.on_day
        self.days: dict[int, _Day] = {}
        self.closed_below = -1  # day indexes <= this are written
        self.offset_ns = 0
        self.max_exch = -1
        self.most_pending = 0  # the most rows the ordering held at once, for the tests and benches

    def _open(self, d: int) -> _Day:
        day = self.days.get(d)
        if day is None:
            if d <= self.closed_below:
                raise DataError(f"an event of UTC day {day_of(d * DAY_NS)} arrived after that day was "
                                f"closed (more than {DAY_GRACE_NS // 10**9} s late in exchange time)")
            day = _Day(d, self.job.spill_dir, self.job.block_rows)
            self.days[d] = day
            self.job.open_days.add(day_of(d * DAY_NS))
        return day

    def depth_day(self, d: int) -> None:
        """Call before applying depth of day ``d``: days up to ``d`` that have no start snapshot yet
        take the book as it stands, which is the state after the last depth message before them."""
        self._open(d)
        for k, day in self.days.items():
            if k <= d and day.snapshot is None:
                day.snapshot = self.book.snapshot_rows(0, 0)

    def add_rows(self, d: int, rows: np.ndarray, msg_exch: np.ndarray, msg_local: np.ndarray) -> None:
        day = self._open(d)
        day.add_rows(rows)
        day.add_latency(np.asarray(msg_local, np.int64) - np.asarray(msg_exch, np.int64))
        if msg_exch.shape[0]:
            self.max_exch = max(self.max_exch, int(msg_exch.max()))

    def add_bbo(self, d: int, ids: np.ndarray, bbo: np.ndarray) -> None:
        self._open(d).add_bbo(ids, bbo)

    def close_ready(self, final: bool = False) -> None:
        for d in sorted(self.days):
            if final or (d + 1) * DAY_NS + DAY_GRACE_NS <= self.max_exch:
                self._close(d)

    def _close(self, d: int) -> None:
        day = self.days.pop(d)
        self.closed_below = max(self.closed_below, d)
        try:
            self._write(day)
        finally:
            day.close()
        self.job.open_days.discard(day_of(d * DAY_NS))  # only once on_day has it: a stop in between keeps it open

    def _write(self, day: _Day) -> None:
        has_lat = day.lat.n > 0
        if has_lat:
            self.offset_ns = max(self.offset_ns, -day.lat_min, 0)
        raw, shifted = latency_stats_spilled(day.lat, day.lat_min, day.lat_max, [0, self.offset_ns],
                                             self.job.block_rows)
        info_q: dict[str, Any] = {
            "clock_offset_ns": self.offset_ns,
            "clock_offset_note": (
                "local_ts shifted by +clock_offset_ns so that every message's local − exch >= 0 "
                "(the capture clock ran behind the exchange)" if self.offset_ns else
                "no shift needed: local − exch >= 0 throughout"),
            "raw_latency": raw,
            "latency": shifted,
        }
        if self.offset_ns > 0:
            day.findings.add("clock_behind",
                             f"capture clock behind exchange: min local − exch was "
                             f"{day.lat_min / 1e6:.3f} ms; local_ts shifted by +{self.offset_ns / 1e6:.3f} ms")
        snap = day.snapshot if day.snapshot is not None else self.book.snapshot_rows(0, 0)
        if day.rows.n:
            # The snapshot is the state before the day's first event, in both clocks.
            snap["exch_ts"] = day.exch_min
            snap["local_ts"] = day.local_min + self.offset_ns
        name = day_of(day.day_index * DAY_NS)
        sink: DaySink = self.job.open_day(name) if self.job.open_day is not None else CollectDay()
        try:
            n_in, n_out, kinds = self._stream(day, snap, sink)
            sink.commit()
        except BaseException:
            sink.discard()
            raise
        counts = _kind_counts(kinds, 0)
        counts["local_only_duplicates"] = n_out - n_in
        if self.witness is not None:
            info_q["agreement"] = self.witness.close_day(day.bbo, day.bbo_sorted, self.book.tick_size,
                                                         self.job.block_rows)
            if info_q["agreement"]["rate"] is None:
                day.findings.add("no_witness", "no BBO message to compare the rebuilt book with")
        info_q["findings"] = day.findings.as_list()
        snap_exch = snap["exch_ts"]
        info = {"first_ts": int(min(day.exch_min, snap_exch.min())), "last_ts": int(max(day.exch_max, snap_exch.max())),
                "events": n_out, "counts": counts, "quality": info_q}
        events = sink.events() if self.job.open_day is None else None  # a caller's sink holds its rows
        self.on_day(DayResult(name, events, info))

    def _stream(self, day: _Day, snap: np.ndarray, sink: DaySink) -> tuple[int, int, np.ndarray]:
        """The second pass: the snapshot, then the spilled rows a block at a time with the offset applied,
        ordered and flagged, into ``sink``; returns rows in, rows out and the counts by kind. The next
        block is read, shifted and counted on a thread (all of it leaves the GIL) while this one is ordered."""
        off = self.offset_ns
        # The smallest exch_ts and local_ts of every row from block b on (the last entry: none left).
        suf_e = np.minimum.accumulate(np.array([*day.blk_exch, _BIG], np.int64)[::-1])[::-1]
        suf_l = np.minimum.accumulate(np.array([*day.blk_local, _BIG - off], np.int64)[::-1])[::-1] + off
        order = FlagOrder()
        kinds = _count_nb(snap["ev"], np.uint64(EXCH_EVENT), np.uint64(LOCAL_EVENT), np.uint64(BUY_EVENT))[0]
        n_in, n_out = snap.shape[0], 0
        sink.expect(n_in + day.rows.n)
        size = self.job.block_rows

        def load(b: int) -> tuple[np.ndarray, np.ndarray]:
            blk = day.rows.read(b * size, size)
            day.rows.release((b + 1) * size)
            blk["local_ts"] += off
            return blk, _count_nb(blk["ev"], np.uint64(EXCH_EVENT), np.uint64(LOCAL_EVENT), np.uint64(BUY_EVENT))[0]

        rows = snap
        n_blocks = len(day.blk_exch)
        with ThreadPoolExecutor(1, thread_name_prefix="day-read") as pool:
            ahead = pool.submit(load, 0) if n_blocks else None
            for b in range(max(n_blocks, 1)):
                if ahead is not None:
                    blk, counted = ahead.result()
                    ahead = pool.submit(load, b + 1) if b + 1 < n_blocks else None
                    kinds += counted
                    n_in += blk.shape[0]
                    rows = blk if b else np.concatenate([snap, blk])
                final = b + 1 >= n_blocks
                out = order.add(rows, 0 if final else int(suf_e[b + 1]), 0 if final else int(suf_l[b + 1]), final)
                if out.shape[0]:
                    sink.append(out)
                    n_out += out.shape[0]
        self.most_pending = max(self.most_pending, order.most)
        return n_in, n_out, kinds


@njit(cache=True, nogil=True)
def _count_nb(ev, exch_flag, local_flag, buy_flag):
    """Counts by (kind, buy) of rows flagged EXCH or unflagged, and of rows flagged only LOCAL."""
    out = np.zeros((256, 2), np.int64)
    local_only = 0
    for k in range(ev.shape[0]):
        e = ev[k]
        if (e & exch_flag) == 0 and (e & local_flag) != 0:
            local_only += 1
            continue
        out[e & 0xFF, 1 if (e & buy_flag) != 0 else 0] += 1
    return out, local_only


def _kind_counts(c: np.ndarray, local_only: int) -> dict[str, int]:
    return {
        "depth": int(c[DEPTH_EVENT].sum()),
        "depth_clear": int(c[DEPTH_CLEAR_EVENT].sum()),
        "depth_snapshot": int(c[DEPTH_SNAPSHOT_EVENT].sum()),
        "trade_buy": int(c[TRADE_EVENT, 1]),
        "trade_sell": int(c[TRADE_EVENT, 0]),
        "local_only_duplicates": int(local_only),
    }

