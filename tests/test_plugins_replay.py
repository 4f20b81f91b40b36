"""The replayer sees exactly what the engine's driver sees, step for step, on real data."""

from __future__ import annotations

import numpy as np
import pytest
from hftbacktest import BacktestAsset, HashMapMarketDepthBacktest
from numba import njit
from reference_impls import asset

from quotelab import layout as L
from quotelab.driver import _fill_view
from quotelab.plugins.mid import mid_nb
from quotelab.replay import ReplayAsset, aggregate_trades, prepare, replay

N_LEVELS = 5
MAX_SCAN = 2000
CAPACITY = 10000


@njit
def _hbt_views(hbt, view, trades, first_elapse, step, origin, n_levels, max_scan, rec_ts, rec_view, rec_trades):
    n_assets = view.shape[0]
    last_time = np.nan
    n = 0
    first = True
    while n < rec_ts.shape[0]:
        if hbt.elapse(first_elapse if first else step) != 0:
            break
        first = False
        for a in range(n_assets):
            _fill_view(hbt, a, view, trades, n_levels, max_scan, origin, last_time, False, True)
        last_time = view[0, L.TIME]
        rec_ts[n] = hbt.current_timestamp
        rec_view[n] = view
        for a in range(n_assets):
            for k in range(int(view[a, L.N_TRADES])):
                rec_trades[n, a] += trades[a, k, L.TR_QTY] * trades[a, k, L.TR_SIDE]
        n += 1
    return n


@njit(inline="always")
def _signed_trade_qty_nb(view, trades, state, params, out):
    total = 0.0
    for a in range(view.shape[0]):
        for k in range(int(view[a, L.N_TRADES])):
            total += trades[a, k, L.TR_QTY] * trades[a, k, L.TR_SIDE]
    return total


def _hbt_reference(assets: list[ReplayAsset], step_ns: int):
    built = [
        BacktestAsset().data(list(a.events)).linear_asset(1.0).constant_order_latency(10_000_000, 10_000_000)
        .risk_adverse_queue_model().no_partial_fill_exchange().trading_value_fee_model(0.0, 0.0)
        .tick_size(a.tick_size).lot_size(a.lot_size).last_trades_capacity(CAPACITY)
        for a in assets
    ]
    hbt = HashMapMarketDepthBacktest(built)
    origin = assets[0].first_ts()
    global_first = min(a.first_ts() for a in assets)
    view = np.full((len(assets), L.VIEW_WIDTH), np.nan)
    for i, a in enumerate(assets):
        view[i, L.TICK] = a.tick_size
        view[i, L.LOT] = a.lot_size
    trades = np.zeros((len(assets), CAPACITY, L.TR_WIDTH))
    cap = 20_000
    rec_ts = np.zeros(cap, dtype=np.int64)
    rec_view = np.zeros((cap, len(assets), L.VIEW_WIDTH))
    rec_trades = np.zeros((cap, len(assets)))
    try:
        n = _hbt_views(hbt, view, trades, origin - global_first + step_ns, step_ns, origin, N_LEVELS, MAX_SCAN,
                       rec_ts, rec_view, rec_trades)
    finally:
        hbt.close()
    return rec_ts[:n], rec_view[:n], rec_trades[:n]


@pytest.mark.parametrize(
    "keys", [("usdm_btc",), ("usdm_eth",), ("usdm_btc", "cm_btc"), ("usdm_eth", "spot_eth", "cm_eth")]
)
def test_replay_book_equals_hftbacktest_depth_at_every_step(shared_data, keys):
    assets = [asset(shared_data, k) for k in keys]
    ts, hviews, htrades = _hbt_reference(assets, 100_000_000)
    res = replay(assets, mid_nb, np.array([0.0]), n_levels=N_LEVELS, max_scan_ticks=MAX_SCAN, keep_view=True,
                 ready=[], trades_capacity=CAPACITY)
    # Every grid time hftbacktest visited, the replayer visited too (it may go one step past the end).
    assert res.grid_steps >= len(ts) > 3000
    assert np.array_equal(res.timestamps[: len(ts)], ts)
    cols = [L.TIME, L.STEP_SECONDS, L.BEST_BID, L.BEST_ASK, L.BID_QTY, L.ASK_QTY, L.BEST_BID_TICK,
            L.BEST_ASK_TICK, L.N_TRADES]
    cols += [L.BID_PX + k for k in range(N_LEVELS)] + [L.BID_SZ + k for k in range(N_LEVELS)]
    cols += [L.ASK_PX + k for k in range(N_LEVELS)] + [L.ASK_SZ + k for k in range(N_LEVELS)]
    got = res.views[: len(ts)][:, :, cols]
    want = hviews[:, :, cols]
    diff = ~((got == want) | (np.isnan(got) & np.isnan(want)))
    if diff.any():
        step, a, c = np.argwhere(diff)[0]
        pytest.fail(f"step {step} asset {a} column {cols[c]}: replay {got[step, a, c]} != hftbacktest "
                    f"{want[step, a, c]}")
    # The mid the kernel returned is the mid of the book it was given.
    finite = np.isfinite(res.views[:, 0, L.BEST_BID]) & np.isfinite(res.views[:, 0, L.BEST_ASK])
    assert np.array_equal(res.values[finite], (res.views[finite, 0, L.BEST_BID] + res.views[finite, 0, L.BEST_ASK]) / 2)


def test_replay_trades_equal_hftbacktest_last_trades(shared_data):
    assets = [asset(shared_data, "usdm_btc"), asset(shared_data, "usdm_eth")]
    ts, _, htrades = _hbt_reference(assets, 100_000_000)
    res = replay(assets, _signed_trade_qty_nb, np.zeros(0), ready=[], trades_capacity=CAPACITY)
    n = len(ts)
    assert np.abs(htrades).sum() > 0
    np.testing.assert_allclose(res.values[:n], htrades.sum(axis=1), rtol=0, atol=1e-9)


def test_replay_waits_for_a_two_sided_book_of_ready_assets(shared_data):
    a = asset(shared_data, "usdm_btc")
    res = replay([a], mid_nb, np.array([0.0]), keep_view=True)
    assert np.isfinite(res.values).all()
    assert len(res.values) <= res.grid_steps
    with pytest.raises(ValueError, match="n_levels"):
        replay([a], mid_nb, np.array([0.0]), n_levels=L.MAX_LEVELS + 1)


def test_prepared_data_replays_identically_twice(shared_data):
    data = prepare([asset(shared_data, "usdm_eth")])
    first = replay(data, mid_nb, np.array([0.0]), n_levels=3, keep_view=True)
    second = replay(data, mid_nb, np.array([0.0]), n_levels=3, keep_view=True)
    assert len(first.values) > 3000
    np.testing.assert_array_equal(first.values, second.values)
    np.testing.assert_array_equal(first.views, second.views)


@pytest.mark.parametrize("clock", ["local", "exchange"])
def test_prepare_sorts_rows_only_when_given_out_of_order(shared_data, clock):
    from hftbacktest.types import EXCH_EVENT, LOCAL_EVENT

    a = asset(shared_data, "usdm_btc")
    day = a.events[0]
    flag, col = (LOCAL_EVENT, "local_ts") if clock == "local" else (EXCH_EVENT, "exch_ts")
    half = len(day) // 2
    for parts in ([day[:half], day[half:]], [day[half:], day[:half]]):  # in order, then the halves swapped
        data = prepare([ReplayAsset("x", parts, a.tick_size, a.lot_size)], clock=clock)
        rows = np.concatenate(parts)
        rows = rows[(rows["ev"] & flag) == flag]
        want = rows[np.argsort(rows[col], kind="stable")]  # stable: equal times keep file order
        for got, field in ((data.ev, "ev"), (data.exch_ts, "exch_ts"), (data.local_ts, "local_ts"),
                           (data.px, "px"), (data.qty, "qty")):
            np.testing.assert_array_equal(got, want[field])


def test_aggregate_trades_of_the_second_asset_equals_it_alone(shared_data):
    btc, eth = asset(shared_data, "usdm_btc"), asset(shared_data, "usdm_eth")
    both = aggregate_trades(prepare([btc, eth], clock="exchange"), asset=1)
    alone = aggregate_trades(prepare([eth], clock="exchange"))
    assert both.raw_trades == alone.raw_trades > 1000
    for field in ("ts", "px", "qty", "side"):
        np.testing.assert_array_equal(getattr(both, field), getattr(alone, field))
