"""The seed market maker written by hand in one @njit loop, straight from the issue's text.

It shares no code with quotelab's engine, composer or plugins: it is the reference the composed
YAML strategy must reproduce fill for fill, and the anchor of bench/compose.py.
"""

from __future__ import annotations

import numpy as np
from hftbacktest import GTX, LIMIT, BacktestAsset, HashMapMarketDepthBacktest
from hftbacktest.order import BUY, SELL
from numba import njit


def seed_asset(data: list[np.ndarray]) -> BacktestAsset:
    return (
        BacktestAsset()
        .data(data)
        .linear_asset(1.0)
        .constant_order_latency(10_000_000, 10_000_000)
        .risk_adverse_queue_model()
        .no_partial_fill_exchange()
        .trading_value_fee_model(-0.00005, 0.0007)
        .tick_size(0.1)
        .lot_size(0.001)
        .last_trades_capacity(10000)
    )


@njit
def seed_market_maker(hbt, rec_pos):
    tick = 0.1
    lot = 0.001
    qty = 0.01
    max_position = 0.1
    n = 0
    while hbt.elapse(100_000_000) == 0:
        hbt.clear_inactive_orders(0)
        depth = hbt.depth(0)
        best_bid = depth.best_bid
        best_ask = depth.best_ask
        if not (np.isfinite(best_bid) and np.isfinite(best_ask)):
            continue
        position = hbt.position(0)
        mid = (best_bid + best_ask) / 2.0
        bq = depth.best_bid_qty
        aq = depth.best_ask_qty
        imbalance = (bq - aq) / (bq + aq) if bq + aq > 0 else 0.0
        forecast = 2.0 * tick * imbalance
        risk = 0.5 * (position / 0.01) * 10 * tick
        reservation = mid + forecast - risk
        half = 2.0 * tick
        bid_tick = np.round((reservation - half) / tick)
        ask_tick = np.round((reservation + half) / tick)
        bid_tick = min(bid_tick, depth.best_bid_tick)
        ask_tick = max(ask_tick, depth.best_ask_tick)
        pos_lots = np.round(position / lot)
        lim_lots = np.round(max_position / lot)
        orders = hbt.orders(0)
        values = orders.values()
        while values.has_next():
            order = values.get()
            if order.cancellable:
                buy_stale = order.side == BUY and (order.price_tick != bid_tick or pos_lots >= lim_lots)
                sell_stale = order.side == SELL and (order.price_tick != ask_tick or pos_lots <= -lim_lots)
                if buy_stale or sell_stale:
                    hbt.cancel(0, order.order_id, False)
        if pos_lots < lim_lots and np.uint64(bid_tick) not in orders:
            hbt.submit_buy_order(0, np.uint64(bid_tick), bid_tick * tick, qty, GTX, LIMIT, False)
        if pos_lots > -lim_lots and np.uint64(ask_tick) not in orders:
            hbt.submit_sell_order(0, np.uint64(ask_tick), ask_tick * tick, qty, GTX, LIMIT, False)
        if n < len(rec_pos):
            rec_pos[n] = position
        n += 1
    return n


def run_seed_by_hand(data: list[np.ndarray]) -> dict:
    hbt = HashMapMarketDepthBacktest([seed_asset(data)])
    rec_pos = np.zeros(1_000_000)
    n = seed_market_maker(hbt, rec_pos)
    sv = hbt.state_values(0)
    out = {"num_trades": int(sv.num_trades), "position": float(sv.position), "balance": float(sv.balance),
           "fee": float(sv.fee), "quoting_steps": n}
    hbt.close()
    return out
