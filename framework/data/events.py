"""Helpers every raw-capture converter shares: a dense L2 book, day accumulation with a snapshot at
each day start, hftbacktest's EXCH/LOCAL ordering, clock-offset and latency estimation, the
bookTicker-style witness and the quality report.

A converter feeds rows (already in hftbacktest's ``event_dtype``, ``local_ts`` still raw) into a
:class:`DaySplitter`; the splitter closes a UTC day once the stream is safely past it, estimates the
clock offset, stamps the day-start snapshot, orders and flags the rows and hands the finished
:class:`DayResult` to a callback (which writes it). Everything here is venue-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
        self.ensure(int(tick.min()), int(tick.max()), where)
        pages = (tick - self.base) >> BLK_SHIFT
        buy = side > 0
        for book_side, used in ((self.bid, pages[buy]), (self.ask, pages[~buy])):
            if used.shape[0]:  # the distinct pages, without np.unique's sort of every level
                book_side.alloc(np.flatnonzero(np.bincount(used)))

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
# hftbacktest ordering: rows flagged EXCH_EVENT must be sorted by exch_ts, rows flagged LOCAL_EVENT
# by local_ts. Where the two orders disagree a row is written twice, once per flag.


@njit(cache=True)
def _flag_count_nb(exch_idx, local_idx):
    n = exch_idx.shape[0]
    done_e = np.zeros(n, np.bool_)
    done_l = np.zeros(n, np.bool_)
    i = 0
    j = 0
    out = 0
    while i < n or j < n:
        while i < n and done_e[exch_idx[i]]:
            i += 1
        while j < n and done_l[local_idx[j]]:
            j += 1
        if i >= n and j >= n:
            break
        if i < n and j < n and exch_idx[i] == local_idx[j]:
            done_e[exch_idx[i]] = True
            done_l[local_idx[j]] = True
        elif j >= n or (i < n and exch_idx[i] < local_idx[j]):
            done_e[exch_idx[i]] = True
        else:
            done_l[local_idx[j]] = True
        out += 1
    return out


@njit(cache=True)
def _flag_fill_nb(rows, exch_idx, local_idx, out, exch_flag, local_flag):
    n = exch_idx.shape[0]
    done_e = np.zeros(n, np.bool_)
    done_l = np.zeros(n, np.bool_)
    i = 0
    j = 0
    k = 0
    while i < n or j < n:
        while i < n and done_e[exch_idx[i]]:
            i += 1
        while j < n and done_l[local_idx[j]]:
            j += 1
        if i >= n and j >= n:
            break
        if i < n and j < n and exch_idx[i] == local_idx[j]:
            r = exch_idx[i]
            out[k] = rows[r]
            out[k].ev = rows[r].ev | exch_flag | local_flag
            done_e[r] = True
            done_l[r] = True
        elif j >= n or (i < n and exch_idx[i] < local_idx[j]):
            # Rows are in arrival order, so the smaller index is the one that happened first.
            r = exch_idx[i]
            out[k] = rows[r]
            out[k].ev = rows[r].ev | exch_flag
            done_e[r] = True
        else:
            r = local_idx[j]
            out[k] = rows[r]
            out[k].ev = rows[r].ev | local_flag
            done_l[r] = True
        k += 1


def order_and_flag(rows: np.ndarray) -> np.ndarray:
    """Rows in arrival order → hftbacktest order with EXCH/LOCAL flags (stable on ties)."""
    exch_idx = np.argsort(rows["exch_ts"], kind="stable")
    local_idx = np.argsort(rows["local_ts"], kind="stable")
    n_out = _flag_count_nb(exch_idx, local_idx)
    out = np.empty(n_out, event_dtype)
    _flag_fill_nb(rows, exch_idx, local_idx, out, np.uint64(EXCH_EVENT), np.uint64(LOCAL_EVENT))
    return out


# ---------------------------------------------------------------------------------------------
# Witness: the venue's own best bid/offer stream, keyed by the book's update id.


class Witness:
    """Compares the rebuilt book after each depth message with the venue's BBO feed, by update id.

    For a depth message with final id ``u`` the witness is the last BBO message whose id is ``<= u``
    (ids, not times: a depth message bundles many updates).
    """

    def __init__(self) -> None:
        self._ids: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []

    def add_bbo(self, ids: np.ndarray, bid_px: np.ndarray, ask_px: np.ndarray,
                bid_qty: np.ndarray, ask_qty: np.ndarray) -> None:
        if ids.shape[0]:
            self._ids.append(ids.astype(np.int64))
            self._vals.append(np.stack([bid_px, ask_px, bid_qty, ask_qty], axis=1))

    def _merged(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._ids:
            return np.zeros(0, np.int64), np.zeros((0, 4))
        if len(self._ids) > 1:
            self._ids = [np.concatenate(self._ids)]
            self._vals = [np.concatenate(self._vals)]
        ids, vals = self._ids[0], self._vals[0]
        if ids.shape[0] > 1 and np.any(ids[1:] < ids[:-1]):
            o = np.argsort(ids, kind="stable")
            ids, vals = ids[o], vals[o]
            self._ids, self._vals = [ids], [vals]
        return ids, vals

    def max_id(self) -> int:
        return max((int(a.max()) for a in self._ids), default=-1)

    def agreement(self, book_ids: np.ndarray, book_bbo: np.ndarray, tick: float) -> dict[str, Any]:
        """``book_bbo`` rows: bid tick, ask tick, bid qty, ask qty after each message ``book_ids``."""
        ids, vals = self._merged()
        res: dict[str, Any] = {"messages": int(book_ids.shape[0]), "compared": 0, "agreed": 0,
                               "agreed_with_qty": 0, "rate": None, "rate_with_qty": None,
                               "first_disagreement_id": None}
        if not ids.shape[0] or not book_ids.shape[0]:
            return res
        k = np.searchsorted(ids, book_ids, side="right") - 1
        has = k >= 0
        w = vals[k[has]]
        b = book_bbo[has]
        w_bid_t = np.rint(w[:, 0] / tick)
        w_ask_t = np.rint(w[:, 1] / tick)
        px_ok = (w_bid_t == b[:, 0]) & (w_ask_t == b[:, 1])
        qty_ok = px_ok & np.isclose(w[:, 2], b[:, 2], rtol=1e-9, atol=0) & np.isclose(
            w[:, 3], b[:, 3], rtol=1e-9, atol=0)
        n = int(has.sum())
        res.update(compared=n, agreed=int(px_ok.sum()), agreed_with_qty=int(qty_ok.sum()))
        if n:
            res["rate"] = res["agreed"] / n
            res["rate_with_qty"] = res["agreed_with_qty"] / n
        bad = np.flatnonzero(~px_ok)
        if bad.shape[0]:
            res["first_disagreement_id"] = int(book_ids[has][bad[0]])
        return res

    def prune_below(self, book_id: int) -> None:
        """Forget BBO messages no later day can need (keep the last one at or below ``book_id``)."""
        ids, vals = self._merged()
        k = int(np.searchsorted(ids, book_id, side="right")) - 1
        if k > 0:
            self._ids, self._vals = [ids[k:]], [vals[k:]]


# ---------------------------------------------------------------------------------------------
# Days


@dataclass
class DayResult:
    day: str
    events: np.ndarray
    info: dict[str, Any]


class _Chunks:
    """A growing list of arrays: appends are cheap and nothing is preallocated."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.n = 0

    def add(self, a: np.ndarray) -> None:
        if a.shape[0]:
            self.parts.append(a)
            self.n += a.shape[0]

    def take(self, dtype: Any) -> np.ndarray:
        out = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype)
        self.parts = []
        return out


@dataclass
class ConvertJob:
    """What a converter needs from the caller: where days go and the instrument's spec."""

    venue: str
    symbol: str
    instrument: dict[str, Any]
    on_day: Callable[[DayResult], None]


@dataclass
class _Day:
    day_index: int
    snapshot: np.ndarray | None = None
    rows: _Chunks = field(default_factory=_Chunks)
    lat_exch: _Chunks = field(default_factory=_Chunks)
    lat_local: _Chunks = field(default_factory=_Chunks)
    bbo_ids: _Chunks = field(default_factory=_Chunks)
    bbo: _Chunks = field(default_factory=_Chunks)
    last_book_id: int = 0
    depth_msgs: int = 0
    trade_msgs: int = 0
    findings: Findings = field(default_factory=Findings)


def latency_stats(lat_ns: np.ndarray) -> dict[str, float | None]:
    if not lat_ns.shape[0]:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "min_ms": None, "max_ms": None}
    p = np.percentile(lat_ns, [50, 90, 99]) / 1e6
    return {"p50_ms": round(float(p[0]), 3), "p90_ms": round(float(p[1]), 3),
            "p99_ms": round(float(p[2]), 3), "min_ms": round(float(lat_ns.min()) / 1e6, 3),
            "max_ms": round(float(lat_ns.max()) / 1e6, 3)}


class DaySplitter:
    """Collects rows per UTC day of exchange time and closes days as the stream moves past them.

    Rows arrive in arrival order with raw ``local_ts``. When a day closes, the clock offset is
    estimated as the smallest shift that makes every message's ``local − exch`` non-negative; the
    offset applied never decreases from one day to the next of a conversion, so local time never
    runs backwards across a day boundary. The shift is recorded in the day's ``quality``.
    """

    def __init__(self, book: DenseBook, witness: Witness | None, on_day: Callable[[DayResult], None]) -> None:
        self.book = book
        self.witness = witness
        self.on_day = on_day
        self.days: dict[int, _Day] = {}
        self.closed_below = -1  # day indexes <= this are written
        self.offset_ns = 0
        self.max_exch = -1

    def _open(self, d: int) -> _Day:
        day = self.days.get(d)
        if day is None:
            if d <= self.closed_below:
                raise DataError(f"an event of UTC day {day_of(d * DAY_NS)} arrived after that day was "
                                f"closed (more than {DAY_GRACE_NS // 10**9} s late in exchange time)")
            day = _Day(d)
            self.days[d] = day
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
        day.rows.add(rows)
        day.lat_exch.add(msg_exch)
        day.lat_local.add(msg_local)
        if msg_exch.shape[0]:
            self.max_exch = max(self.max_exch, int(msg_exch.max()))

    def add_bbo(self, d: int, ids: np.ndarray, bbo: np.ndarray) -> None:
        day = self._open(d)
        day.bbo_ids.add(ids)
        day.bbo.add(bbo)
        if ids.shape[0]:
            day.last_book_id = int(ids[-1])

    def close_ready(self, final: bool = False) -> None:
        for d in sorted(self.days):
            if final or (d + 1) * DAY_NS + DAY_GRACE_NS <= self.max_exch:
                self._close(d)

    def _close(self, d: int) -> None:
        day = self.days.pop(d)
        self.closed_below = max(self.closed_below, d)
        exch = day.lat_exch.take(np.int64)
        local = day.lat_local.take(np.int64)
        lat_raw = local - exch
        if lat_raw.shape[0]:
            need = int(-lat_raw.min())
            self.offset_ns = max(self.offset_ns, need, 0)
        info_q: dict[str, Any] = {
            "clock_offset_ns": self.offset_ns,
            "clock_offset_note": (
                "local_ts shifted by +clock_offset_ns so that every message's local − exch >= 0 "
                "(the capture clock ran behind the exchange)" if self.offset_ns else
                "no shift needed: local − exch >= 0 throughout"),
            "raw_latency": latency_stats(lat_raw),
            "latency": latency_stats(lat_raw + self.offset_ns),
        }
        if self.offset_ns > 0:
            day.findings.add("clock_behind",
                             f"capture clock behind exchange: min local − exch was "
                             f"{lat_raw.min() / 1e6:.3f} ms; local_ts shifted by +{self.offset_ns / 1e6:.3f} ms")
        snap = day.snapshot if day.snapshot is not None else self.book.snapshot_rows(0, 0)
        m = snap.shape[0]
        all_rows = np.concatenate([snap, *day.rows.parts]) if day.rows.parts else snap
        day.rows.parts = []
        body = all_rows[m:]
        body["local_ts"] += self.offset_ns
        if body.shape[0]:
            # The snapshot is the state before the day's first event, in both clocks.
            all_rows["exch_ts"][:m] = body["exch_ts"].min()
            all_rows["local_ts"][:m] = body["local_ts"].min()
        counts = count_kinds(all_rows)
        first_ts = int(all_rows["exch_ts"].min()) if all_rows.shape[0] else None
        last_ts = int(all_rows["exch_ts"].max()) if all_rows.shape[0] else None
        events = order_and_flag(all_rows)
        counts["local_only_duplicates"] = int(events.shape[0] - all_rows.shape[0])
        del all_rows, body
        bbo_ids = day.bbo_ids.take(np.int64)
        bbo = day.bbo.take(np.float64).reshape(-1, 4)
        if self.witness is not None:
            info_q["agreement"] = self.witness.agreement(bbo_ids, bbo, self.book.tick_size)
            if info_q["agreement"]["rate"] is None:
                day.findings.add("no_witness", "no BBO message to compare the rebuilt book with")
            if bbo_ids.shape[0]:
                self.witness.prune_below(int(bbo_ids[-1]))
        info_q["findings"] = day.findings.as_list()
        info = {"first_ts": first_ts, "last_ts": last_ts, "events": int(events.shape[0]), "counts": counts,
                "quality": info_q}
        self.on_day(DayResult(day_of(d * DAY_NS), events, info))


@njit(cache=True)
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


def count_kinds(rows: np.ndarray) -> dict[str, int]:
    """Rows by kind. Rows flagged only LOCAL (the duplicates of flagged events) are counted apart."""
    c, local_only = _count_nb(rows["ev"], np.uint64(EXCH_EVENT), np.uint64(LOCAL_EVENT), np.uint64(BUY_EVENT))
    return {
        "depth": int(c[DEPTH_EVENT].sum()),
        "depth_clear": int(c[DEPTH_CLEAR_EVENT].sum()),
        "depth_snapshot": int(c[DEPTH_SNAPSHOT_EVENT].sum()),
        "trade_buy": int(c[TRADE_EVENT, 1]),
        "trade_sell": int(c[TRADE_EVENT, 0]),
        "local_only_duplicates": int(local_only),
    }
