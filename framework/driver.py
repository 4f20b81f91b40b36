"""The one loop that touches the hftbacktest object.

It cannot be disk-cached (the backtest object holds ctypes pointers), so it is compiled once per
process and reused by every strategy and parameter set: the strategy kernel arrives as a
first-class function in a typed list (one call per step, so the indirection costs nothing
measurable) and every parameter is a runtime array.
"""

from __future__ import annotations

import numpy as np
from hftbacktest import LIMIT
from hftbacktest.order import BUY
from hftbacktest.types import BUY_EVENT
from numba import njit

from quotelab import layout as L

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
C_NEED_TRADES = 10  # 0: no component reads trades, so the engine leaves hftbacktest's buffer alone
C_WIDTH = 11

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
R_WIDTH = 13

# counters returned
K_STEPS = 0
K_QUOTING_STEPS = 1
K_NOT_READY = 2
K_NONFINITE = 3
K_STATUS = 4  # 0 ok, k > 0: stopped on component k-1 producing a non-finite value
K_STATUS_TS = 5
K_RECORDS = 6
K_TRADES_DROPPED = 7
K_WIDTH = 8


@njit
def _fill_view(hbt, a, view, trades, n_levels, max_scan, origin, last_time, account, need_trades):
    depth = hbt.depth(a)
    tick = view[a, L.TICK]
    view[a, L.BEST_BID] = depth.best_bid
    view[a, L.BEST_ASK] = depth.best_ask
    view[a, L.BID_QTY] = depth.best_bid_qty
    view[a, L.ASK_QTY] = depth.best_ask_qty
    view[a, L.BEST_BID_TICK] = depth.best_bid_tick
    view[a, L.BEST_ASK_TICK] = depth.best_ask_tick
    if account:
        sv = hbt.state_values(a)
        view[a, L.POSITION] = sv.position
        view[a, L.BALANCE] = sv.balance
        view[a, L.FEE] = sv.fee
        view[a, L.NUM_FILLS] = sv.num_trades
    now = (hbt.current_timestamp - origin) * 1e-9
    view[a, L.STEP_SECONDS] = now - last_time if last_time == last_time else 0.0
    view[a, L.TIME] = now
    view[a, L.BID_PX] = depth.best_bid
    view[a, L.BID_SZ] = depth.best_bid_qty
    view[a, L.ASK_PX] = depth.best_ask
    view[a, L.ASK_SZ] = depth.best_ask_qty
    if n_levels > 1:
        k = 1
        t = depth.best_bid_tick - 1
        stop = t - max_scan
        while k < n_levels and t > stop:
            q = depth.bid_qty_at_tick(t)
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
        t = depth.best_ask_tick + 1
        stop = t + max_scan
        while k < n_levels and t < stop:
            q = depth.ask_qty_at_tick(t)
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
        return 0
    lt = hbt.last_trades(a)
    n = min(len(lt), trades.shape[1])
    for i in range(n):
        trades[a, i, L.TR_PX] = lt[i].px
        trades[a, i, L.TR_QTY] = lt[i].qty
        trades[a, i, L.TR_SIDE] = 1.0 if (lt[i].ev & BUY_EVENT) == BUY_EVENT else -1.0
        trades[a, i, L.TR_TIME] = (lt[i].exch_ts - origin) * 1e-9
    view[a, L.N_TRADES] = n
    dropped = len(lt) - n
    hbt.clear_last_trades(a)
    return dropped


@njit
def _manage_orders(hbt, a, view, out, tif):
    lot = view[a, L.LOT]
    tick = view[a, L.TICK]
    # Whole lots: ten fills of 0.01 sum to -0.09999999999999999, which a float compare lets through.
    pos_lots = np.round(view[a, L.POSITION] / lot)
    lim_lots = np.round(out[L.MAX_POSITION] / lot)
    nb = int(out[L.N_BID]) if pos_lots < lim_lots else 0
    na = int(out[L.N_ASK]) if pos_lots > -lim_lots else 0
    orders = hbt.orders(a)
    values = orders.values()
    while values.has_next():
        order = values.get()
        if order.cancellable:
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
                hbt.cancel(a, order.order_id, False)
    for k in range(nb):
        t = np.int64(out[L.Q_BID_TICK + k])
        qty = out[L.Q_BID_QTY + k]
        if qty > 0.0 and t > 0 and np.uint64(t) not in orders:
            hbt.submit_buy_order(a, np.uint64(t), t * tick, qty, tif, LIMIT, False)
    for k in range(na):
        t = np.int64(out[L.Q_ASK_TICK + k])
        qty = out[L.Q_ASK_QTY + k]
        if qty > 0.0 and t > 0 and np.uint64(t) not in orders:
            hbt.submit_sell_order(a, np.uint64(t), t * tick, qty, tif, LIMIT, False)


@njit
def run_driver(hbt, fns, view, trades, state, params, out, cfg, ready_mask, rec_ts, rec, counters):
    """Replay to the end of data, calling ``fns[0]`` (the fused strategy) at each step.

    ``ready_mask[a]`` marks the assets the strategy reads: until each has a two-sided book, a
    step neither quotes nor records (warm-up). Returns nothing; results land in ``rec_ts``,
    ``rec`` and ``counters``.
    """
    strategy = fns[0]
    n_assets = view.shape[0]
    mode = cfg[C_MODE]
    q = cfg[C_QUOTED]
    origin = cfg[C_ORIGIN_NS]
    last_time = np.nan
    last_record = -(1 << 62)
    first = True
    while True:
        if mode == 0:
            r = hbt.elapse(cfg[C_FIRST_ELAPSE_NS] if first else cfg[C_STEP_NS])
            if r != 0:
                break
        else:
            if first and cfg[C_FIRST_ELAPSE_NS] > 0 and hbt.elapse(cfg[C_FIRST_ELAPSE_NS]) != 0:
                break
            r = hbt.wait_next_feed(False, 60_000_000_000)
            if r == 1:
                break
            if r != 0 and r != 2:
                break
        first = False
        counters[K_STEPS] += 1
        for a in range(n_assets):
            hbt.clear_inactive_orders(a)
        for a in range(n_assets):
            counters[K_TRADES_DROPPED] += _fill_view(
                hbt, a, view, trades, cfg[C_LEVELS], cfg[C_MAX_SCAN_TICKS], origin, last_time, a == q,
                cfg[C_NEED_TRADES] != 0,
            )
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
                counters[K_STATUS_TS] = hbt.current_timestamp
                break
            continue
        _manage_orders(hbt, q, view, out, cfg[C_TIF])
        counters[K_QUOTING_STEPS] += 1
        now = hbt.current_timestamp
        i = counters[K_RECORDS]
        if now - last_record >= cfg[C_RECORD_EVERY_NS] and i < rec.shape[0]:
            last_record = now
            sv = hbt.state_values(q)
            rec_ts[i] = now
            rec[i, R_MID] = (view[q, L.BEST_BID] + view[q, L.BEST_ASK]) / 2.0
            rec[i, R_POSITION] = sv.position
            rec[i, R_BALANCE] = sv.balance
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
            counters[K_RECORDS] = i + 1
