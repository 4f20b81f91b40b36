"""The one loop that drives the hftbacktest backtest.

It calls hftbacktest's C functions by symbol name (:mod:`quotelab.backtest.backtest_c`) on the backtest's
pointer, rather than through the backtest object, whose ctypes pointers kept it out of numba's disk
cache. So it is compiled once, cached, and reused by every strategy and parameter set: the
strategy kernel arrives as a first-class function in a typed list (one call per step, so the
indirection costs nothing measurable) and every parameter is a runtime array.
"""

from __future__ import annotations

import numpy as np
from hftbacktest import LIMIT
from hftbacktest.intrinsic import address_as_void_pointer
from hftbacktest.order import BUY
from hftbacktest.types import BUY_EVENT
from numba import njit

from quotelab import layout as L
from quotelab.backtest import backtest_c as C
from quotelab.backtest.jitcache import KEY, STALE
from quotelab.data.funding import payment_nb

# cfg (int64) slots
C_MODE = 0  # 0 fixed step, 1 per event
C_STEP_NS = 1
C_FIRST_ELAPSE_NS = 2
C_QUOTED = 3
C_LEVELS = 4
C_TIF = 5
C_ON_NONFINITE = 6  # 0 stop, 1 skip the quote and count it
C_RECORD_EVERY_NS = 7
C_ORIGIN_NS = 8
C_MAX_SCAN_TICKS = 9
C_NEED_TRADES = 10  # 0: no component reads trades, so the driver only clears hftbacktest's buffer
C_PAUSE_STEPS = 11  # return PAUSED after this many steps (0: never), for progress; call again to go on
C_WIDTH = 12

# record columns
R_MID = 0
R_POSITION = 1
R_BALANCE = 2
R_FEE = 3
R_NUM_TRADES = 4
R_VOLUME = 5
R_VALUE = 6
R_FAIR_VALUE = 7
R_RESERVATION = 8
R_BID = 9
R_ASK = 10
R_FORECAST = 11
R_RISK = 12
R_FUNDING = 13  # funding received so far (quote currency, coin if inverse); already in R_BALANCE
R_WIDTH = 14

# settlement columns (quotelab.data.funding.schedule, then what the driver found at the time)
S_RATE = 0
S_MARK = 1
S_POSITION = 2
S_AMOUNT = 3
S_WIDTH = 4

# counters returned
K_STEPS = 0
K_QUOTING_STEPS = 1
K_NOT_READY = 2
K_NONFINITE = 3
K_STATUS = 4  # 0 ok, k > 0: stopped on component k-1 producing a non-finite value
K_STATUS_TS = 5
K_RECORDS = 6
K_TRADES_DROPPED = 7
K_STARTED = 8  # the first elapse is done (the loop's state between calls, with K_LAST_RECORD_TS)
K_LAST_RECORD_TS = 9
K_NOW_TS = 10  # the backtest's time when the driver returned
K_SETTLED = 11  # funding settlements done
K_WIDTH = 12

PAUSED = 1  # run_driver's return when it stopped early: the record buffer is full, or C_PAUSE_STEPS


@njit
def _fill_view(bt, a, view, trades, n_levels, max_scan, origin, last_time, account, need_trades):
    # bt: the backtest's pointer (a voidptr)
    depth = C.depth(bt, a)
    tick = view[a, L.TICK]
    view[a, L.BEST_BID] = C.best_bid(depth)
    view[a, L.BEST_ASK] = C.best_ask(depth)
    view[a, L.BID_QTY] = C.best_bid_qty(depth)
    view[a, L.ASK_QTY] = C.best_ask_qty(depth)
    view[a, L.BEST_BID_TICK] = C.best_bid_tick(depth)
    view[a, L.BEST_ASK_TICK] = C.best_ask_tick(depth)
    if account:
        sv = C.state_values(bt, a)[0]
        view[a, L.POSITION] = sv.position
        view[a, L.BALANCE] = sv.balance
        view[a, L.FEE] = sv.fee
        view[a, L.NUM_FILLS] = sv.num_trades
    now = (C.current_timestamp(bt) - origin) * 1e-9
    view[a, L.STEP_SECONDS] = now - last_time if last_time == last_time else 0.0
    view[a, L.TIME] = now
    view[a, L.BID_PX] = view[a, L.BEST_BID]
    view[a, L.BID_SZ] = view[a, L.BID_QTY]
    view[a, L.ASK_PX] = view[a, L.BEST_ASK]
    view[a, L.ASK_SZ] = view[a, L.ASK_QTY]
    if n_levels > 1:
        k = 1
        t = C.best_bid_tick(depth) - 1
        stop = t - max_scan
        while k < n_levels and t > stop:
            q = C.bid_qty_at_tick(depth, t)
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
        t = C.best_ask_tick(depth) + 1
        stop = t + max_scan
        while k < n_levels and t < stop:
            q = C.ask_qty_at_tick(depth, t)
            if q > 0.0:
                view[a, L.ASK_PX + k] = t * tick
                view[a, L.ASK_SZ + k] = q
                k += 1
            t += 1
        while k < n_levels:
            view[a, L.ASK_PX + k] = np.nan
            view[a, L.ASK_SZ + k] = 0.0
            k += 1
    if not need_trades:
        # hftbacktest appends every trade to this buffer until it is cleared, whether read or not: left
        # alone it grew 64 B a trade (a busy day: ~5 M trades, ~350 MB of private memory).
        C.clear_last_trades(bt, a)
        return 0
    lt = C.last_trades(bt, a)
    n = min(len(lt), trades.shape[1])
    for i in range(n):
        trades[a, i, L.TR_PX] = lt[i].px
        trades[a, i, L.TR_QTY] = lt[i].qty
        trades[a, i, L.TR_SIDE] = 1.0 if (lt[i].ev & BUY_EVENT) == BUY_EVENT else -1.0
        trades[a, i, L.TR_TIME] = (lt[i].exch_ts - origin) * 1e-9
    view[a, L.N_TRADES] = n
    dropped = len(lt) - n
    C.clear_last_trades(bt, a)
    return dropped


@njit
def _manage_orders(bt, a, view, out, tif):
    lot = view[a, L.LOT]
    tick = view[a, L.TICK]
    # Whole lots: ten fills of 0.01 sum to -0.09999999999999999, which a float compare lets through.
    pos_lots = np.round(view[a, L.POSITION] / lot)
    lim_lots = np.round(out[L.MAX_POSITION] / lot)
    nb = int(out[L.N_BID]) if pos_lots < lim_lots else 0
    na = int(out[L.N_ASK]) if pos_lots > -lim_lots else 0
    orders = C.orders(bt, a)
    values = C.orders_values(orders)
    while True:
        found = C.next_order(values)
        if len(found) == 0:
            break
        order = found[0]
        if C.cancellable(order):
            keep = False
            if order.side == BUY:
                for k in range(nb):
                    if order.price_tick == np.int64(out[L.Q_BID_TICK + k]):
                        keep = True
            else:
                for k in range(na):
                    if order.price_tick == np.int64(out[L.Q_ASK_TICK + k]):
                        keep = True
            if not keep:
                C.cancel(bt, a, order.order_id, np.uint8(0))
    for k in range(nb):
        t = np.int64(out[L.Q_BID_TICK + k])
        qty = out[L.Q_BID_QTY + k]
        if qty > 0.0 and t > 0 and C.orders_contains(orders, np.uint64(t)) == 0:
            C.submit_buy_order(bt, a, np.uint64(t), t * tick, qty, np.uint8(tif), np.uint8(LIMIT), np.uint8(0))
    for k in range(na):
        t = np.int64(out[L.Q_ASK_TICK + k])
        qty = out[L.Q_ASK_QTY + k]
        if qty > 0.0 and t > 0 and C.orders_contains(orders, np.uint64(t)) == 0:
            C.submit_sell_order(bt, a, np.uint64(t), t * tick, qty, np.uint8(tif), np.uint8(LIMIT), np.uint8(0))


@njit
def _settle(bt, q, view, settle, k, fund):
    position = C.state_values(bt, q)[0].position
    amount = payment_nb(position, view[q, L.CONTRACT_SIZE], settle[k, S_MARK], settle[k, S_RATE],
                        view[q, L.INVERSE] != 0.0)
    settle[k, S_POSITION] = position
    settle[k, S_AMOUNT] = amount
    fund[0] += amount


@njit(inline="always")
def _cash(balance, funding, inverse):
    # hftbacktest's inverse balance counts cash with the opposite sign (equity = -balance - ...)
    return balance - funding if inverse != 0.0 else balance + funding


@njit(cache=True)
def run_driver(key, bt_addr, fns, view, trades, state, params, out, cfg, ready_mask, rec_ts, rec, counters,
               settle_ts, settle, fund):
    """Replay to the end of data, calling ``fns[0]`` (the fused strategy) at each step.

    ``key`` is :data:`quotelab.backtest.jitcache.KEY` (call through ``run_cached``), ``bt_addr`` the backtest
    object's ``ptr``. ``ready_mask[a]`` marks the assets the strategy reads: until each has a
    two-sided book, a step neither quotes nor records (warm-up). Results land in ``rec_ts``, ``rec``
    and ``counters``; returns 0 at the end of the data, PAUSED when ``rec`` is full or after
    ``cfg[C_PAUSE_STEPS]`` steps (empty ``rec``, reset ``counters[K_RECORDS]`` and call again to
    go on), or STALE if this code was cached against other constants.

    Funding: the quoted asset settles at each ``settle_ts[k]`` (rate and mark in ``settle[k]``), on
    the position held at that instant: a step that crosses a settlement is elapsed in two parts, and
    per-event mode waits no longer than the next settlement. The position and amount land in
    ``settle[k]``, the running total in ``fund[0]``, which the view's and the records' balance include.
    """
    if key != KEY:
        return STALE
    bt = address_as_void_pointer(bt_addr)
    strategy = fns[0]
    n_assets = view.shape[0]
    mode = cfg[C_MODE]
    q = cfg[C_QUOTED]
    origin = cfg[C_ORIGIN_NS]
    first = counters[K_STARTED] == 0
    last_time = np.nan if first else view[q, L.TIME]
    last_record = -(1 << 62) if first else counters[K_LAST_RECORD_TS]
    pause_at = counters[K_STEPS] + cfg[C_PAUSE_STEPS] if cfg[C_PAUSE_STEPS] > 0 else -1
    n_settle = len(settle_ts)
    k = counters[K_SETTLED]
    inverse = view[q, L.INVERSE]
    while True:
        if counters[K_STEPS] == pause_at:
            counters[K_NOW_TS] = C.current_timestamp(bt)
            counters[K_SETTLED] = k
            return PAUSED
        if mode == 0:
            dt = np.int64(cfg[C_FIRST_ELAPSE_NS] if first else cfg[C_STEP_NS])
            now = C.current_timestamp(bt)
            r = 0
            while k < n_settle and settle_ts[k] <= now + dt:
                if settle_ts[k] > now:
                    r = C.elapse(bt, np.uint64(settle_ts[k] - now))
                    if r != 0:
                        break
                    dt -= settle_ts[k] - now
                    now = settle_ts[k]
                _settle(bt, q, view, settle, k, fund)
                k += 1
            if r == 0 and dt > 0:
                r = C.elapse(bt, np.uint64(dt))
            if r != 0:
                break
        else:
            if first and cfg[C_FIRST_ELAPSE_NS] > 0 and C.elapse(bt, np.uint64(cfg[C_FIRST_ELAPSE_NS])) != 0:
                break
            timeout = np.int64(60_000_000_000)
            if k < n_settle:
                now = C.current_timestamp(bt)
                while k < n_settle and settle_ts[k] <= now:
                    _settle(bt, q, view, settle, k, fund)
                    k += 1
                if k < n_settle:
                    timeout = min(timeout, settle_ts[k] - now)
            r = C.wait_next_feed(bt, np.uint8(0), timeout)
            if r == 1:
                break
            if r != 0 and r != 2:
                break
            now = C.current_timestamp(bt)
            while k < n_settle and settle_ts[k] <= now:
                _settle(bt, q, view, settle, k, fund)
                k += 1
        first = False
        counters[K_STARTED] = 1
        counters[K_STEPS] += 1
        for a in range(n_assets):
            C.clear_inactive_orders(bt, a)
        for a in range(n_assets):
            counters[K_TRADES_DROPPED] += _fill_view(
                bt, a, view, trades, cfg[C_LEVELS], cfg[C_MAX_SCAN_TICKS], origin, last_time, a == q,
                cfg[C_NEED_TRADES] != 0,
            )
        view[q, L.BALANCE] = _cash(view[q, L.BALANCE], fund[0], inverse)
        last_time = view[q, L.TIME]
        ready = True
        for a in range(n_assets):
            if ready_mask[a] and not (np.isfinite(view[a, L.BEST_BID]) and np.isfinite(view[a, L.BEST_ASK])):
                ready = False
        if not ready:
            counters[K_NOT_READY] += 1
            continue
        strategy(view, trades, state, params, out)
        if out[L.STATUS] != 0.0:
            counters[K_NONFINITE] += 1
            if cfg[C_ON_NONFINITE] == 0:
                counters[K_STATUS] = np.int64(out[L.STATUS])
                counters[K_STATUS_TS] = C.current_timestamp(bt)
                break
            continue
        _manage_orders(bt, q, view, out, cfg[C_TIF])
        counters[K_QUOTING_STEPS] += 1
        now = C.current_timestamp(bt)
        i = counters[K_RECORDS]
        if now - last_record >= cfg[C_RECORD_EVERY_NS] and i < rec.shape[0]:
            last_record = now
            counters[K_LAST_RECORD_TS] = now
            sv = C.state_values(bt, q)[0]
            rec_ts[i] = now
            rec[i, R_MID] = (view[q, L.BEST_BID] + view[q, L.BEST_ASK]) / 2.0
            rec[i, R_POSITION] = sv.position
            rec[i, R_BALANCE] = _cash(sv.balance, fund[0], inverse)
            rec[i, R_FEE] = sv.fee
            rec[i, R_NUM_TRADES] = sv.num_trades
            rec[i, R_VOLUME] = sv.trading_volume
            rec[i, R_VALUE] = sv.trading_value
            rec[i, R_FAIR_VALUE] = out[L.FAIR_VALUE]
            rec[i, R_RESERVATION] = out[L.RESERVATION]
            rec[i, R_BID] = out[L.Q_BID_TICK] * view[q, L.TICK] if out[L.N_BID] > 0 else np.nan
            rec[i, R_ASK] = out[L.Q_ASK_TICK] * view[q, L.TICK] if out[L.N_ASK] > 0 else np.nan
            rec[i, R_FORECAST] = out[L.FORECAST]
            rec[i, R_RISK] = out[L.RISK]
            rec[i, R_FUNDING] = fund[0]
            counters[K_RECORDS] = i + 1
            if i + 1 == rec.shape[0]:
                counters[K_NOW_TS] = now
                counters[K_SETTLED] = k
                return PAUSED
    counters[K_NOW_TS] = C.current_timestamp(bt)
    return 0
