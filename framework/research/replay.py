"""Replay catalog events into the kernels' ``view``/``trades`` layout without hftbacktest.

Fair-value evaluation, feature recording and kernel tests must see exactly what a strategy sees in
a backtest, so this module rebuilds each asset's L2 book the way hftbacktest's local side does
(``HashMapMarketDepth``: rows flagged LOCAL_EVENT, applied in local time, the same best-tick search
and the same stale entries when a side crosses the other) and fills ``view`` and ``trades`` on the
engine's grid exactly like :func:`quotelab.backtest.driver._fill_view`. Position, balance, fees and fills are
0: nothing trades here.

:func:`replay_trades` is the other clock: the EXCH_EVENT rows in exchange time, one kernel call per
(aggregated) trade on the book as of its exchange timestamp, for studies that match trades to the
book the way the seed study's ``merge_asof`` did.

Both clocks read catalog days in place (:func:`prepare`, :func:`prepare_exchange`): one read-only
pass checks the clock's order and sizes the book, and the replay skips the other clock's rows as it
goes. Copying the rows out cost more than replaying them (1.5 GB of fresh pages for a 38 M-row day).

The book of each asset is a dense array over the tick range of its depth rows, so a lookup is an
index, and a scan costs what hftbacktest's hash-map scan costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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
)
from numba import njit

from quotelab import layout as L
from quotelab import progress, spool
from quotelab.backtest.jitcache import KEY, STALE, run_cached
from quotelab.component import Component, PackContext, Params
from quotelab.data.assets import Asset, initial_view
from quotelab.errors import DataError
from quotelab.strategy.codegen import kernel_list

INVALID_MIN = np.iinfo(np.int64).min
INVALID_MAX = np.iinfo(np.int64).max
# A dense book over more ticks than this is almost surely a bad tick size or a stray price.
MAX_BOOK_TICKS = 200_000_000

# book tick slots per asset
B_BEST_BID = 0
B_BEST_ASK = 1
B_LOW_BID = 2
B_HIGH_ASK = 3

RECORDS_FULL = -3  # _replay_nb: the step records are full (jitcache.STALE is -2)


@dataclass
class ReplayResult:
    """Per step (a grid time at which every ready asset had a two-sided book and the kernel ran)."""

    timestamps: np.ndarray  # int64 ns, grid times of the steps where the kernel ran
    values: np.ndarray  # the kernel's return value
    outs: np.ndarray | None  # (steps, len(out_columns)) copy of ``out`` (those slots) after the kernel
    views: np.ndarray | None  # (steps, n_assets, VIEW_WIDTH) copy of ``view`` given to the kernel
    n_trades: np.ndarray  # (steps, n_assets) trades given to the kernel
    grid_steps: int  # grid times visited, including warm-up
    trades_dropped: int
    origin_ns: int


@njit
def _depth_below(qty, base, start, end):
    # hftbacktest's depth_below: the highest tick in [end, start) holding a positive quantity.
    hi = min(start, base + len(qty))
    lo = max(end, base)
    t = hi - 1
    while t >= lo:
        if qty[t - base] > 0.0:
            return t
        t -= 1
    return INVALID_MIN


@njit
def _depth_above(qty, base, start, end):
    # hftbacktest's depth_above: the lowest tick in (start, end] holding a positive quantity.
    lo = max(start + 1, base)
    hi = min(end, base + len(qty) - 1)
    t = lo
    while t <= hi:
        if qty[t - base] > 0.0:
            return t
        t += 1
    return INVALID_MAX


@njit(inline="always")
def _qty_at(qty, base, t):
    i = t - base
    if i < 0 or i >= len(qty):
        return 0.0
    return qty[i]


@njit
def _clear(bid, ask, base, bb, ba, lo, hi, side, px, tick):
    n = len(bid)
    if side == 1:
        upto = np.int64(np.round(px / tick))
        if bb != INVALID_MIN:
            for t in range(max(upto, base), min(bb + 1, base + n)):
                bid[t - base] = 0.0
        bb = _depth_below(bid, base, upto - 1, lo)
        if bb == INVALID_MIN:
            lo = INVALID_MAX
    elif side == -1:
        upto = np.int64(np.round(px / tick))
        if ba != INVALID_MAX:
            for t in range(max(ba, base), min(upto + 1, base + n)):
                ask[t - base] = 0.0
        ba = _depth_above(ask, base, upto + 1, hi)
        if ba == INVALID_MAX:
            hi = INVALID_MIN
    else:
        bid[:] = 0.0
        ask[:] = 0.0
        bb, ba, lo, hi = INVALID_MIN, INVALID_MAX, INVALID_MAX, INVALID_MIN
    return bb, ba, lo, hi


@njit
def _advance(ev, clock_ts, exch_ts, px, qty, i, end, until, flag, bid, ask, base, bb, ba, lo, hi, tick, lot, trades,
             a, n_tr, origin):
    """Apply rows ``i..`` flagged ``flag`` (the clock's side) up to clock time ``until`` (inclusive)
    to one asset's book, whose best bid, best ask, lowest bid and highest ask ticks are ``bb, ba,
    lo, hi``; record its trades in ``trades[a]`` after the ``n_tr`` already there (up to its
    capacity). Rows without ``flag`` are skipped, so a catalog day replays in place. Returns the
    next row, the trade count and the four ticks.

    The per-row update is written out here, not called: numba increfs and decrefs every array a
    called (even inlined) function takes, atomically, and that cost ~24 ns a row, twice the update
    itself (exchange-clock replay of the BTC window: 36 -> 12 ns a row).
    """
    cap = trades.shape[1]
    while i < end:
        e = ev[i]
        if (e & flag) != flag:
            i += 1
            continue
        if clock_ts[i] > until:
            break
        kind = e & 0xFF
        if kind == DEPTH_EVENT or kind == DEPTH_SNAPSHOT_EVENT:
            t = np.int64(np.round(px[i] / tick))
            gone = np.int64(np.round(qty[i] / lot)) == 0
            if (e & BUY_EVENT) == BUY_EVENT:
                bid[t - base] = 0.0 if gone else qty[i]
                if gone:
                    if t == bb:
                        bb = _depth_below(bid, base, bb, lo)
                        if bb == INVALID_MIN:
                            lo = INVALID_MAX
                else:
                    if t > bb:
                        bb = t
                        if bb >= ba:
                            ba = _depth_above(ask, base, bb, hi)
                    lo = min(lo, t)
            elif (e & SELL_EVENT) == SELL_EVENT:
                ask[t - base] = 0.0 if gone else qty[i]
                if gone:
                    if t == ba:
                        ba = _depth_above(ask, base, ba, hi)
                        if ba == INVALID_MAX:
                            hi = INVALID_MIN
                else:
                    if t < ba:
                        ba = t
                        if bb >= ba:
                            bb = _depth_below(bid, base, ba, lo)
                    hi = max(hi, t)
        elif kind == DEPTH_CLEAR_EVENT:
            side = 1 if (e & BUY_EVENT) == BUY_EVENT else (-1 if (e & SELL_EVENT) == SELL_EVENT else 0)
            bb, ba, lo, hi = _clear(bid, ask, base, bb, ba, lo, hi, side, px[i], tick)
        elif kind == TRADE_EVENT:
            if n_tr < cap:
                trades[a, n_tr, L.TR_PX] = px[i]
                trades[a, n_tr, L.TR_QTY] = qty[i]
                trades[a, n_tr, L.TR_SIDE] = 1.0 if (e & BUY_EVENT) == BUY_EVENT else -1.0
                trades[a, n_tr, L.TR_TIME] = (exch_ts[i] - origin) * 1e-9
            n_tr += 1
        i += 1
    return i, n_tr, bb, ba, lo, hi


@njit
def _fill_levels(view, a, bid, ask, base, bb, ba, tick, n_levels, max_scan):
    # Written like driver._fill_view (same int64 arithmetic, same scan bounds), so the levels match.
    view[a, L.BEST_BID] = np.nan if bb == INVALID_MIN else bb * tick
    view[a, L.BEST_ASK] = np.nan if ba == INVALID_MAX else ba * tick
    view[a, L.BID_QTY] = _qty_at(bid, base, bb)
    view[a, L.ASK_QTY] = _qty_at(ask, base, ba)
    view[a, L.BEST_BID_TICK] = bb
    view[a, L.BEST_ASK_TICK] = ba
    view[a, L.BID_PX] = view[a, L.BEST_BID]
    view[a, L.BID_SZ] = view[a, L.BID_QTY]
    view[a, L.ASK_PX] = view[a, L.BEST_ASK]
    view[a, L.ASK_SZ] = view[a, L.ASK_QTY]
    if n_levels > 1:
        k = 1
        t = bb - 1
        stop = t - max_scan
        while k < n_levels and t > stop:
            q = _qty_at(bid, base, t)
            if q > 0.0:
                view[a, L.BID_PX + k] = t * tick
                view[a, L.BID_SZ + k] = q
                k += 1
            t -= 1
        while k < n_levels:
            view[a, L.BID_PX + k] = np.nan
            view[a, L.BID_SZ + k] = 0.0
            k += 1
        k = 1
        t = ba + 1
        stop = t + max_scan
        while k < n_levels and t < stop:
            q = _qty_at(ask, base, t)
            if q > 0.0:
                view[a, L.ASK_PX + k] = t * tick
                view[a, L.ASK_SZ + k] = q
                k += 1
            t += 1
        while k < n_levels:
            view[a, L.ASK_PX + k] = np.nan
            view[a, L.ASK_SZ + k] = 0.0
            k += 1


# A day's rows as words: event_dtype is eight 8-byte fields, so a day is an (n, 8) int64 array
# and, over the same memory, an (n, 8) float64 one. Viewed so, every day has one numba type.
W_EV, W_EXCH_TS, W_LOCAL_TS, W_PX, W_QTY = 0, 1, 2, 3, 4


def _words(day: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    day = np.ascontiguousarray(day)  # a no-op for catalog days
    return day.view(np.int64).reshape(-1, 8), day.view(np.float64).reshape(-1, 8)


@njit(cache=True)
def _replay_nb(key, fns, ints, floats, more, ptr, resume, book_base, book_start, bid_all, ask_all, books,
               origin, step_ns, n_grid, view, trades, state, params, out, n_levels, max_scan, quoted, ready_mask,
               rec_ts, rec_values, rec_out, rec_view, rec_ntr, keep_out, keep_view, counters, out_cols, n_tr, clock):
    # ints[a], floats[a]: asset a's current day (_words); ptr[a] its next row; more[a]: a later day
    # follows. When a day runs out and another follows, this returns a (the step and asset to
    # resume at in ``resume``, its state in the arrays) so the caller can swap the next day in:
    # one compiled loop for any number of days, where typed lists of days cost ~2.6 s of compile.
    # When the rec_* arrays are full it returns RECORDS_FULL, resumable the same way, so they can
    # be a fixed chunk whatever the days. Returns -1 at the end of the grid.
    if key != KEY:  # cached against other constants (jitcache)
        return STALE
    kernel = fns[0]
    n_assets = view.shape[0]
    cap = trades.shape[1]
    rec_cap = len(rec_ts)
    k0, a0 = resume[0], resume[1]
    last_time = clock[0]
    n_rec = counters[2]
    for k in range(k0, n_grid):
        now_ns = origin + (k + 1) * step_ns
        for a in range(a0 if k == k0 else 0, n_assets):
            bid = bid_all[book_start[a]:book_start[a + 1]]
            ask = ask_all[book_start[a]:book_start[a + 1]]
            bk = books[a]
            day_i, day_f = ints[a], floats[a]
            ptr[a], n_tr[a], bk[B_BEST_BID], bk[B_BEST_ASK], bk[B_LOW_BID], bk[B_HIGH_ASK] = _advance(
                day_i[:, W_EV], day_i[:, W_LOCAL_TS], day_i[:, W_EXCH_TS], day_f[:, W_PX], day_f[:, W_QTY], ptr[a],
                len(day_i), now_ns, LOCAL_EVENT, bid, ask, book_base[a], bk[B_BEST_BID], bk[B_BEST_ASK],
                bk[B_LOW_BID], bk[B_HIGH_ASK], view[a, L.TICK], view[a, L.LOT], trades, a,
                n_tr[a] if (k == k0 and a == a0) else 0, origin)
            if ptr[a] == len(day_i) and more[a]:
                resume[0], resume[1] = k, a
                clock[0] = last_time
                counters[2] = n_rec
                return a
        for a in range(n_assets):
            bk = books[a]
            _fill_levels(view, a, bid_all[book_start[a]:book_start[a + 1]], ask_all[book_start[a]:book_start[a + 1]],
                         book_base[a], bk[B_BEST_BID], bk[B_BEST_ASK], view[a, L.TICK], n_levels, max_scan)
            now = (now_ns - origin) * 1e-9
            view[a, L.STEP_SECONDS] = now - last_time if last_time == last_time else 0.0
            view[a, L.TIME] = now
            n = min(n_tr[a], cap)
            view[a, L.N_TRADES] = n
            counters[1] += n_tr[a] - n
        last_time = view[quoted, L.TIME]
        counters[0] += 1
        ready = True
        for a in range(n_assets):
            if ready_mask[a] and not (np.isfinite(view[a, L.BEST_BID]) and np.isfinite(view[a, L.BEST_ASK])):
                ready = False
        if not ready:
            continue
        if keep_view:
            rec_view[n_rec] = view
        v = kernel(view, trades, state, params, out)
        rec_ts[n_rec] = now_ns
        rec_values[n_rec] = v
        for a in range(n_assets):
            rec_ntr[n_rec, a] = view[a, L.N_TRADES]
        if keep_out:
            for c in range(len(out_cols)):
                rec_out[n_rec, c] = out[out_cols[c]]
        n_rec += 1
        if n_rec == rec_cap and k + 1 < n_grid:  # the records are full: the caller spools them
            resume[0], resume[1] = k + 1, 0
            n_tr[0] = 0  # the next step starts afresh (a resume carries only a day swap's count)
            clock[0] = last_time
            counters[2] = n_rec
            return RECORDS_FULL
    counters[2] = n_rec
    return -1


@njit(cache=True)
def _scan_nb(ev, clock_ts, px, qty, tick, info, flag, collect, t_ts, t_px, t_qty, t_sell, n_tr):
    # One read-only pass over a day's rows flagged ``flag`` (the clock's side): the depth tick
    # range (info[0], info[1]), whether the clock went back (info[2]; info[3] its last value,
    # carried across days), the row count (info[4]) and, with ``collect``, the trades, appended to
    # buffers that double when full. Returns the buffers, the trade count and the day's first
    # clock time (INVALID_MAX if it has no such row).
    lo, hi, back, prev, rows = info[0], info[1], info[2], info[3], info[4]
    first = INVALID_MAX
    for i in range(len(ev)):
        e = ev[i]
        if (e & flag) != flag:
            continue
        k = clock_ts[i]
        if first == INVALID_MAX:
            first = k
        back |= k < prev
        prev = k
        rows += 1
        kind = e & 0xFF
        if kind == DEPTH_EVENT or kind == DEPTH_SNAPSHOT_EVENT:
            t = np.int64(np.round(px[i] / tick))
            lo = min(lo, t)
            hi = max(hi, t)
        elif kind == TRADE_EVENT and collect:
            if n_tr == len(t_ts):
                t_ts = np.concatenate((t_ts, np.empty_like(t_ts)))
                t_px = np.concatenate((t_px, np.empty_like(t_px)))
                t_qty = np.concatenate((t_qty, np.empty_like(t_qty)))
                t_sell = np.concatenate((t_sell, np.empty_like(t_sell)))
            t_ts[n_tr] = k
            t_px[n_tr] = px[i]
            t_qty[n_tr] = qty[i]
            t_sell[n_tr] = (e & BUY_EVENT) != BUY_EVENT
            n_tr += 1
    info[0], info[1], info[2], info[3], info[4] = lo, hi, back, prev, rows
    return t_ts, t_px, t_qty, t_sell, n_tr, first


def _tick_range(asset: Asset, info: np.ndarray) -> tuple[int, int]:
    """The dense book's (first tick, size) from a pass's depth tick range ``info[0], info[1]``."""
    if info[0] > info[1]:
        return 0, 1
    lo, hi = int(info[0]), int(info[1])
    if hi - lo + 1 > MAX_BOOK_TICKS:
        raise DataError(
            f"replay: {asset.name}'s depth prices span {hi - lo + 1} ticks of {asset.tick_size}; check its tick size"
        )
    return lo, hi - lo + 1


@dataclass(frozen=True)
class ClockRows:
    """An asset's days as read on one clock (rows flagged for the other clock are skipped as the
    replay goes), with what the pass over them found."""

    days: Sequence[np.ndarray]  # catalog.EventFiles read a file at a time, or arrays
    book_base: int
    book_size: int
    day_start: np.ndarray  # per day: the clock's first time (INVALID_MAX for a day without such rows)
    trades: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # time, price, quantity, seller; if collected
    n_rows: int


_CLOCK = {LOCAL_EVENT: "local_ts", EXCH_EVENT: "exch_ts"}  # a side's flag -> its clock's column


def _scan(asset: Asset, days: Sequence[np.ndarray], flag: int, collect: bool) -> ClockRows | None:
    col = _CLOCK[flag]
    info = np.array([INVALID_MAX, INVALID_MIN, 0, INVALID_MIN, 0], dtype=np.int64)
    cap = 1024 if collect else 0
    t_ts, t_px, t_qty, t_sell = np.empty(cap, np.int64), np.empty(cap), np.empty(cap), np.empty(cap, np.bool_)
    kept = [spool.Spool(a.dtype) for a in (t_ts, t_px, t_qty, t_sell)]  # a month's trades stay off memory
    day_start = np.full(len(days), INVALID_MAX, dtype=np.int64)
    for d in range(len(days)):  # by index: enumerate's reused tuple would hold a file while the next loads
        day = days[d]
        t_ts, t_px, t_qty, t_sell, n_tr, day_start[d] = _scan_nb(
            day["ev"], day[col], day["px"], day["qty"], asset.tick_size, info, flag, collect, t_ts, t_px, t_qty,
            t_sell, 0)
        for sp, got in zip(kept, (t_ts, t_px, t_qty, t_sell), strict=True):
            sp.add(got[:n_tr])
        del day  # one file in memory: let it go before the next one loads
        spool.release_freed()
    if info[2]:
        return None
    base, size = _tick_range(asset, info)
    trades = tuple(sp.array() for sp in kept)
    return ClockRows(days, base, size, day_start, trades, int(info[4]))  # type: ignore[arg-type]


def _on_clock(asset: Asset, flag: int, collect: bool = False) -> ClockRows:
    """The asset's rows flagged ``flag`` in that clock's order: its days in place when they are
    (every catalog day is, on both clocks), else one stably sorted copy of those rows (equal times
    keep file order, as hftbacktest's reader does)."""
    # a sequence (catalog files, the causality guard's cut parts) is read an item at a time, as it goes
    days = asset.events if isinstance(asset.events, Sequence) else tuple(asset.events)
    found = _scan(asset, days, flag, collect)
    if found is None:
        rows = np.concatenate([d[(d["ev"] & flag) == flag] for d in days])
        rows = rows[np.argsort(rows[_CLOCK[flag]], kind="stable")]
        found = _scan(asset, (rows,), flag, collect)
        assert found is not None
    return found


def _empty_books(n: int) -> np.ndarray:
    books = np.empty((n, 4), dtype=np.int64)
    books[:, B_BEST_BID] = INVALID_MIN
    books[:, B_BEST_ASK] = INVALID_MAX
    books[:, B_LOW_BID] = INVALID_MAX
    books[:, B_HIGH_ASK] = INVALID_MIN
    return books


@dataclass(frozen=True)
class ReplayData:
    """Assets' LOCAL_EVENT rows in local time, checked and sized once, to replay many kernels over
    the same data. Catalog days are read in place (rows without LOCAL_EVENT are skipped as the
    replay goes); only rows out of local-time order are copied, sorted."""

    assets: tuple[Asset, ...]
    rows: tuple[ClockRows, ...]
    first_ts: tuple[int, ...]
    last_ts: int


def prepare(assets: Sequence[Asset]) -> ReplayData:
    """Check the assets' LOCAL_EVENT rows (the book a strategy sees) are in local-time order, or
    sort a copy, and size each asset's dense book."""
    return ReplayData(assets=tuple(assets), rows=tuple(_on_clock(a, LOCAL_EVENT) for a in assets),
                      first_ts=tuple(a.first_ts() for a in assets), last_ts=max(a.last_ts() for a in assets))


def replay(
    assets: Sequence[Asset] | ReplayData,
    kernel: Any,
    params: np.ndarray,
    state: np.ndarray | None = None,
    *,
    quoted: int = 0,
    step: float = 0.1,
    origin_ns: int | None = None,
    n_levels: int = 1,
    max_scan_ticks: int = 2000,
    trades_capacity: int = 10000,
    ready: Sequence[int] | None = None,
    keep_out: bool = False,
    keep_view: bool = False,
    out_columns: Sequence[int] | None = None,
) -> ReplayResult:
    """Replay ``assets`` on a grid of ``step`` seconds and call ``kernel`` at every ready step.

    ``kernel`` has the layout signature (a component's ``@njit`` kernel or a composed strategy).
    The grid is ``origin + k·step``, k ≥ 1, as the engine's: ``origin_ns`` defaults to the quoted
    asset's first event (engine.origin: quoted). A step is ready when every asset in ``ready``
    (default: all) has a two-sided book; before that the kernel is not called (warm-up).
    ``state`` is updated in place. With ``keep_out``, ``out_columns`` (default: all) picks the slots
    of ``out`` that are kept per step, so a long replay keeps only what it needs. Pass
    :func:`prepare`'s result to replay the same data again without re-sorting it.
    """
    if not 1 <= n_levels <= L.MAX_LEVELS:
        raise ValueError(f"n_levels must be in 1..{L.MAX_LEVELS}, got {n_levels}")
    step_ns = int(round(step * 1e9))
    if step_ns <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    data = assets if isinstance(assets, ReplayData) else prepare(assets)
    n = len(data.assets)
    origin = data.first_ts[quoted] if origin_ns is None else int(origin_ns)
    n_grid = max(0, (data.last_ts - origin) // step_ns)
    book_start = np.r_[0, np.cumsum([r.book_size for r in data.rows])].astype(np.int64)
    books = _empty_books(n)
    view = initial_view(data.assets)
    trades = np.zeros((n, trades_capacity, L.TR_WIDTH))
    ready_mask = np.zeros(n, dtype=np.bool_)
    ready_mask[list(range(n)) if ready is None else list(ready)] = True
    state = np.zeros(0) if state is None else state
    out = np.zeros(L.OUT_WIDTH)
    # The records are a fixed chunk, spooled whenever it fills (spool: off private memory past one chunk).
    cap = max(1, min(n_grid, spool.CHUNK))
    rec_ts = np.zeros(cap, dtype=np.int64)
    rec_values = np.full(cap, np.nan)
    out_cols = np.arange(L.OUT_WIDTH) if out_columns is None else np.asarray(out_columns, dtype=np.int64)
    rec_out = np.zeros((cap if keep_out else 1, len(out_cols)))
    rec_view = np.zeros((cap if keep_view else 1, n, L.VIEW_WIDTH))
    rec_ntr = np.zeros((cap, n), dtype=np.int64)
    kept = [(rec_ts, spool.Spool(np.int64)), (rec_values, spool.Spool(np.float64)),
            (rec_ntr, spool.Spool(np.int64, (n,)))]
    if keep_out:
        kept.append((rec_out, spool.Spool(np.float64, (len(out_cols),))))
    if keep_view:
        kept.append((rec_view, spool.Spool(np.float64, (n, L.VIEW_WIDTH))))
    counters = np.zeros(3, dtype=np.int64)  # grid steps, trades dropped, steps recorded
    # One file per asset at a time: EventFiles load it here and drop it when the next one comes.
    words = [_words(r.days[0]) for r in data.rows]  # prepare needs a day per asset (first_ts)
    current = [0] * n
    ptr, resume, n_tr, clock = np.zeros(n, np.int64), np.zeros(2, np.int64), np.zeros(n, np.int64), np.array([np.nan])
    base, params = np.array([r.book_base for r in data.rows]), np.ascontiguousarray(params, dtype=np.float64)
    bid_all, ask_all = np.zeros(book_start[-1]), np.zeros(book_start[-1])
    fns = kernel_list(kernel)
    with progress.Replay("replay", origin, origin + n_grid * step_ns, sum(r.n_rows for r in data.rows),
                         progress.enabled()) as bar:
        while True:
            ints = tuple(w[0] for w in words)
            floats = tuple(w[1] for w in words)
            more = np.array([current[a] + 1 < len(data.rows[a].days) for a in range(n)])
            a = run_cached(_replay_nb, fns, ints, floats, more, ptr, resume, base, book_start, bid_all, ask_all,
                           books, origin, step_ns, n_grid, view, trades, state, params, out, n_levels, max_scan_ticks,
                           quoted, ready_mask, rec_ts, rec_values, rec_out, rec_view, rec_ntr, keep_out, keep_view,
                           counters, out_cols, n_tr, clock)
            bar.at(origin + (int(resume[0]) if a != -1 else n_grid) * step_ns)
            if a < 0:
                m = int(counters[2])
                for rec, sp in kept:
                    sp.add(rec[:m])
                counters[2] = 0
                if a == RECORDS_FULL:
                    continue
                break
            current[a] += 1
            ptr[a] = 0
            del ints, floats
            words[a] = None  # type: ignore[call-overload]  # let the file go before the next one loads
            spool.release_freed()
            words[a] = _words(data.rows[a].days[current[a]])
    got = [sp.array() for _, sp in kept]
    return ReplayResult(
        timestamps=got[0], values=got[1], outs=got[3] if keep_out else None,
        views=got[-1] if keep_view else None, n_trades=got[2], grid_steps=int(counters[0]),
        trades_dropped=int(counters[1]), origin_ns=origin,
    )


@dataclass(frozen=True)
class ExchangeData:
    """Assets' EXCH_EVENT rows for :func:`replay_trades`, per asset: its days in place, or one
    stably sorted copy if their exchange times ever go back, with each asset's trades (exchange
    time, price, quantity, seller-initiated) in row order."""

    assets: tuple[Asset, ...]
    rows: tuple[ClockRows, ...]
    first_ts: tuple[int, ...]
    flag: int = EXCH_EVENT  # the clock: EXCH_EVENT rows by exchange time, or LOCAL_EVENT rows by local time


def prepare_exchange(assets: Sequence[Asset], flag: int = EXCH_EVENT) -> ExchangeData:
    """The assets' EXCH_EVENT rows in exchange time, the book as of each exchange timestamp
    (:func:`aggregate_trades`, :func:`replay_trades`); catalog days (in order) are not copied.
    ``flag=LOCAL_EVENT``: the LOCAL_EVENT rows in local (receive) time instead, what a trader saw."""
    return ExchangeData(assets=tuple(assets), rows=tuple(_on_clock(a, flag, collect=True) for a in assets),
                        first_ts=tuple(a.first_ts() for a in assets), flag=flag)


@dataclass(frozen=True)
class TradeTape:
    """An asset's trades on the exchange clock, aggregated: trades with the same exchange time and
    side are one (first price, summed quantity), ordered by time, then buyer-initiated before
    seller-initiated (pandas' ``groupby(['transact_time', 'is_buyer_maker'])`` order)."""

    ts: np.ndarray  # int64 ns, exchange time
    px: np.ndarray
    qty: np.ndarray
    side: np.ndarray  # +1 buyer-initiated (Binance m false), -1 seller-initiated
    raw_trades: int  # before aggregation


def aggregate_trades(data: ExchangeData, asset: int = 0, aggregate: bool = True) -> TradeTape:
    """The asset's :class:`TradeTape` (:func:`prepare_exchange`); ``aggregate=False`` keeps every
    trade, in the same order. Built a chunk of trades at a time into spool files: the trades come in
    clock order, so a chunk cut after a whole group of equal times sorts and aggregates as the whole
    tape would."""
    ts, px, qty, seller = data.rows[asset].trades
    n = len(ts)
    kept = [spool.Spool(np.int64), spool.Spool(np.float64), spool.Spool(np.float64), spool.Spool(np.float64)]
    lo = 0
    while lo < n:
        hi = min(lo + spool.CHUNK, n)
        if hi < n:  # never cut a group of equal times (the clock never goes back: _on_clock)
            hi = int(np.searchsorted(ts, ts[hi - 1], side="right"))
        t, p, q, sell = (np.asarray(x[lo:hi]) for x in (ts, px, qty, seller))
        order = np.lexsort((sell, t))  # stable: the first trade of a group keeps its price
        t, p, q, sell = t[order], p[order], q[order], sell[order]
        if aggregate:
            start = np.flatnonzero(np.r_[True, (np.diff(t) != 0) | (np.diff(sell) != 0)])
        else:
            start = np.arange(len(t))
        for sp, got in zip(kept, (t[start], p[start], np.add.reduceat(q, start), np.where(sell[start], -1.0, 1.0)),
                           strict=True):
            sp.add(got)
        lo = hi
    ts_, px_, qty_, side_ = (sp.array() for sp in kept)
    return TradeTape(ts=ts_, px=px_, qty=qty_, side=side_, raw_trades=n)


@njit(cache=True)
def _replay_trades_nb(key, fns, ev, clock_ts, exch_ts, flag, strict, px, qty, base, bid, ask, books, clock, ptr,
                      finish, t_ts, t_px, t_qty, t_side, origin, view, trades, state, params, out, n_levels, max_scan,
                      rec_out, out_cols):
    # A chunk of the tape's trades, all before the next day's first row, on one day's rows from row
    # ptr[0]; then, with ``finish``, the day's remaining rows, which move the book the next day's
    # first trades see. ptr[0], books[0] (best bid, best ask, low bid, high ask ticks) and clock[0]
    # (the last call's time) carry across calls; rec_out[g] is trade g of the chunk.
    if key != KEY:  # cached against other constants (jitcache)
        return STALE
    kernel = fns[0]
    n = len(ev)
    tick = view[0, L.TICK]
    lot = view[0, L.LOT]
    i = ptr[0]
    last = clock[0]
    bb, ba, lo, hi = books[0, B_BEST_BID], books[0, B_BEST_ASK], books[0, B_LOW_BID], books[0, B_HIGH_ASK]
    no_trades = np.zeros((1, 0, L.TR_WIDTH))  # the tape gives the trades; rows only move the book
    for g in range(len(t_ts)):
        # the book as of the trade's time on the clock, equal times included (merge_asof backward), or
        # strictly before it (strict: rows at the trade's own time are not yet seen)
        i, _n, bb, ba, lo, hi = _advance(ev, clock_ts, exch_ts, px, qty, i, n, t_ts[g] - strict, flag, bid, ask,
                                         base, bb, ba, lo, hi, tick, lot, no_trades, 0, 0, origin)
        _fill_levels(view, 0, bid, ask, base, bb, ba, tick, n_levels, max_scan)
        now = (t_ts[g] - origin) * 1e-9
        view[0, L.STEP_SECONDS] = now - last if last == last else 0.0
        view[0, L.TIME] = now
        last = now
        trades[0, 0, L.TR_PX] = t_px[g]
        trades[0, 0, L.TR_QTY] = t_qty[g]
        trades[0, 0, L.TR_SIDE] = t_side[g]
        trades[0, 0, L.TR_TIME] = now
        view[0, L.N_TRADES] = 1.0
        kernel(view, trades, state, params, out)
        for c in range(len(out_cols)):
            rec_out[g, c] = out[out_cols[c]]
    if finish:
        i, _n, bb, ba, lo, hi = _advance(ev, clock_ts, exch_ts, px, qty, i, n, INVALID_MAX, flag, bid, ask, base,
                                         bb, ba, lo, hi, tick, lot, no_trades, 0, 0, origin)
    books[0, B_BEST_BID], books[0, B_BEST_ASK], books[0, B_LOW_BID], books[0, B_HIGH_ASK] = bb, ba, lo, hi
    clock[0] = last
    ptr[0] = i
    return 0


def replay_trades(data: ExchangeData, tape: TradeTape, kernel: Any, params: np.ndarray, state: np.ndarray, *,
                  n_levels: int = 1, max_scan_ticks: int = 2000, out_columns: Sequence[int] | None = None,
                  strict: bool = False) -> np.ndarray:
    """Call ``kernel`` once per trade of ``tape``, on the book as of the trade's time on ``data``'s clock
    (equal times included; ``strict``: only rows strictly before it).

    ``data`` holds one asset (:func:`prepare_exchange`). Each call sees that one trade in ``trades``
    (so trade-flow parts update per trade, as the seed study's EWMAs did) and ``TIME`` = its
    exchange time. The kernel runs for every trade, also while a side of the book is empty (its
    estimates are then NaN): flow state must see every trade. Returns the ``out`` slots
    ``out_columns``, one row per trade (past :data:`quotelab.spool.CHUNK` trades, memory-mapped from a
    spool file: private memory holds a chunk of the tape whatever its length).
    """
    if len(data.assets) != 1:
        raise ValueError("replay_trades needs one asset: prepare_exchange([asset])")
    if not 1 <= n_levels <= L.MAX_LEVELS:
        raise ValueError(f"n_levels must be in 1..{L.MAX_LEVELS}, got {n_levels}")
    out_cols = np.arange(L.OUT_WIDTH) if out_columns is None else np.asarray(out_columns, dtype=np.int64)
    n_tape = len(tape.ts)
    # The tape goes through a chunk at a time: copied into fixed buffers (the kernel sees the same
    # array types whether the tape is in memory or spooled), and the rows recorded go to a spool.
    cap = max(1, min(n_tape, spool.CHUNK))
    rec_out = np.zeros((cap, len(out_cols)))
    bufs = (np.zeros(cap, np.int64), np.zeros(cap), np.zeros(cap), np.zeros(cap))
    kept = spool.Spool(np.float64, (len(out_cols),))
    rows = data.rows[0]
    bid, ask = np.zeros(rows.book_size), np.zeros(rows.book_size)
    books, clock, ptr = _empty_books(1), np.array([np.nan]), np.zeros(1, np.int64)
    view, trades, out = initial_view(data.assets), np.zeros((1, 1, L.TR_WIDTH)), np.zeros(L.OUT_WIDTH)
    params = np.ascontiguousarray(params, dtype=np.float64)
    # A day replays the trades before the next day's first row (of the next day that has rows):
    # later ones need that day's rows.
    nxt = np.minimum.accumulate(rows.day_start[::-1])[::-1]
    ends = np.searchsorted(tape.ts, np.r_[nxt[1:], INVALID_MAX])
    g0, fns = 0, kernel_list(kernel)
    clock_col = W_LOCAL_TS if data.flag == LOCAL_EVENT else W_EXCH_TS
    for d, g1 in enumerate(ends.tolist()):
        if g0 == n_tape:
            break
        ints, floats = _words(rows.days[d])
        ptr[0] = 0
        for a in range(g0, max(g0, g1 - 1) + 1, cap):
            b = min(a + cap, g1)
            for buf, src in zip(bufs, (tape.ts, tape.px, tape.qty, tape.side), strict=True):
                buf[:b - a] = src[a:b]
            run_cached(_replay_trades_nb, fns, ints[:, W_EV], ints[:, clock_col], ints[:, W_EXCH_TS], data.flag,
                       int(strict), floats[:, W_PX], floats[:, W_QTY], rows.book_base, bid, ask, books, clock, ptr,
                       b == g1 and g1 < n_tape, *(buf[:b - a] for buf in bufs), data.first_ts[0], view, trades,
                       state, params, out, n_levels, max_scan_ticks, rec_out, out_cols)
            kept.add(rec_out[:b - a])
        g0 = g1
        del ints, floats  # one file in memory: let it go before the next one loads
        spool.release_freed()
    return kept.array()


def context(assets: Sequence[Asset] | ReplayData, quoted: int = 0, origin_ns: int | None = None,
            base_dir: str = ".") -> PackContext:
    """The PackContext the engine would build for these assets (origin: the quoted asset's first event)."""
    assets = assets.assets if isinstance(assets, ReplayData) else assets
    origin = assets[quoted].first_ts() if origin_ns is None else origin_ns
    return PackContext.of(assets, quoted, origin, base_dir)


def replay_component(
    component: Component, params: Params | dict[str, Any], assets: Sequence[Asset] | ReplayData,
    quoted: int = 0,
    **kw: Any,
) -> ReplayResult:
    """Replay one component's kernel alone, with its packed params and initial state.

    ``out`` is not reset between steps and no other component writes it, so this suits parts that
    read only ``view``/``trades``; use :func:`replay_composition` for parts that read ``out``.
    """
    p = params if isinstance(params, Params) else component.make_params(params)
    ctx = context(assets, quoted, kw.get("origin_ns"))
    packed = np.asarray(component.pack(p, ctx), dtype=np.float64)
    state = np.asarray(component.state(p), dtype=np.float64).copy()
    reads = component.reads(p)
    kw.setdefault("n_levels", reads.depth_levels)
    kw.setdefault("ready", sorted({ctx.asset_index[x] for x in reads.assets} | {quoted}))
    return replay(assets, component.kernel, packed, state, quoted=quoted, **kw)


def replay_composition(
    composition: Any, assets: Sequence[Asset] | ReplayData, quoted: int = 0, **kw: Any
) -> ReplayResult:
    """Replay a composed strategy (a :class:`quotelab.strategy.composer.Composition`); ``out`` rows kept."""
    kw.setdefault("keep_out", True)
    return replay(assets, composition.kernel, composition.params, composition.state.copy(), quoted=quoted, **kw)


def load_npz_asset(path: str | Path, name: str, tick_size: float, lot_size: float, **kw: Any) -> Asset:
    """An Asset from an hftbacktest npz file (its ``data`` array)."""
    with np.load(path) as z:
        return Asset(name=name, events=[z["data"]], tick_size=tick_size, lot_size=lot_size, **kw)
