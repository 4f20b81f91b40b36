"""The replayer sees exactly what the engine's driver sees, step for step, on real data."""

from __future__ import annotations

import numpy as np
import pytest
from hftbacktest import BacktestAsset, HashMapMarketDepthBacktest
from numba import njit
from reference_impls import asset

from quotelab import layout as L
from quotelab.backtest.driver import _fill_view
from quotelab.data.assets import Asset
from quotelab.plugins.mid import mid_nb
from quotelab.research.replay import aggregate_trades, prepare, prepare_exchange, replay

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
            _fill_view(hbt.ptr, a, view, trades, n_levels, max_scan, origin, last_time, False, True)
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


def _hbt_reference(assets: list[Asset], step_ns: int):
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
    "keys", [("usdm_btc",), ("usdm_eth",), ("usdm_btc", "cm_btc"), ("usdm_eth", "spot_eth", "cm_eth"),
             ("synth_perp", "synth_spot")]
)
def test_replay_book_equals_hftbacktest_depth_at_every_step(markets, keys):
    assets = [asset(markets, k) for k in keys]
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


@pytest.mark.parametrize("keys", [("usdm_btc", "usdm_eth"), ("synth_perp", "synth_spot")])
def test_replay_trades_equal_hftbacktest_last_trades(markets, keys):
    assets = [asset(markets, k) for k in keys]
    ts, _, htrades = _hbt_reference(assets, 100_000_000)
    res = replay(assets, _signed_trade_qty_nb, np.zeros(0), ready=[], trades_capacity=CAPACITY)
    n = len(ts)
    assert np.abs(htrades).sum() > 0
    np.testing.assert_allclose(res.values[:n], htrades.sum(axis=1), rtol=0, atol=1e-9)


def test_replay_waits_for_a_two_sided_book_of_ready_assets(markets):
    a = asset(markets, "usdm_btc")
    res = replay([a], mid_nb, np.array([0.0]), keep_view=True)
    assert np.isfinite(res.values).all()
    assert len(res.values) <= res.grid_steps
    with pytest.raises(ValueError, match="n_levels"):
        replay([a], mid_nb, np.array([0.0]), n_levels=L.MAX_LEVELS + 1)


def test_prepared_data_replays_identically_twice(markets):
    data = prepare([asset(markets, "usdm_eth")])
    first = replay(data, mid_nb, np.array([0.0]), n_levels=3, keep_view=True)
    second = replay(data, mid_nb, np.array([0.0]), n_levels=3, keep_view=True)
    assert len(first.values) > 3000
    np.testing.assert_array_equal(first.values, second.values)
    np.testing.assert_array_equal(first.views, second.views)


def test_prepare_reads_days_in_place_and_sorts_only_rows_out_of_order(markets):
    from hftbacktest.types import EXCH_EVENT, LOCAL_EVENT

    a = asset(markets, "usdm_btc")
    day = a.events[0]
    half = len(day) // 2
    for parts, in_order in (([day[:half], day[half:]], True), ([day[half:], day[:half]], False)):
        two = Asset("x", parts, a.tick_size, a.lot_size)
        rows = np.concatenate(parts)
        for data, flag, col in ((prepare([two]), LOCAL_EVENT, "local_ts"), (prepare_exchange([two]), EXCH_EVENT,
                                                                            "exch_ts")):
            days = data.rows[0].days
            seen = [d[(d["ev"] & flag) == flag] for d in days]
            want = rows[(rows["ev"] & flag) == flag]
            want = want[np.argsort(want[col], kind="stable")]  # stable: equal times keep file order
            np.testing.assert_array_equal(np.concatenate(seen), want)
            # days in order are read in place; otherwise the clock's rows are one sorted copy
            assert len(days) == (2 if in_order else 1)
            assert np.shares_memory(days[0], parts[0]) == in_order


def test_grid_replay_over_split_days_equals_one_day(markets):
    """Days cut anywhere (with an empty day and one of exchange-only rows between) replay to the same
    views and the same trades per step, for two assets cut at different places."""
    from hftbacktest.types import LOCAL_EVENT

    def split(a: Asset, n: int) -> Asset:
        day = a.events[0]
        cuts = np.linspace(1, len(day) - 1, n, dtype=int).tolist()
        parts = [day[lo:hi] for lo, hi in zip([0, *cuts], [*cuts, len(day)], strict=True)]
        parts[1:1] = [day[:0], day[(day["ev"] & LOCAL_EVENT) != LOCAL_EVENT][:50]]
        return Asset(a.name, parts, a.tick_size, a.lot_size)

    btc, eth = asset(markets, "usdm_btc"), asset(markets, "usdm_eth")
    kw = dict(n_levels=3, keep_view=True, trades_capacity=CAPACITY)
    whole = replay([btc, eth], _signed_trade_qty_nb, np.zeros(0), **kw)
    cut = replay([split(btc, 40), split(eth, 23)], _signed_trade_qty_nb, np.zeros(0), **kw)
    assert len(whole.values) > 3000 and np.abs(whole.values).sum() > 0
    np.testing.assert_array_equal(cut.timestamps, whole.timestamps)
    np.testing.assert_array_equal(cut.values, whole.values)
    np.testing.assert_array_equal(cut.n_trades, whole.n_trades)
    np.testing.assert_array_equal(cut.views, whole.views)


@njit
def _book_and_trade_nb(view, trades, state, params, out):
    out[0], out[1] = view[0, L.BEST_BID], view[0, L.BEST_ASK]
    out[2], out[3] = view[0, L.BID_QTY], view[0, L.ASK_QTY]
    out[4], out[5] = view[0, L.BID_PX + 1], view[0, L.ASK_SZ + 2]
    out[6], out[7] = view[0, L.TIME], view[0, L.STEP_SECONDS]
    out[8], out[9] = trades[0, 0, L.TR_PX], trades[0, 0, L.TR_QTY] * trades[0, 0, L.TR_SIDE]
    return 0.0


def test_replay_trades_over_split_days_equals_one_day(markets):
    """Day boundaries anywhere (inside a group of equal exchange times, an empty day, a day of
    local-only rows) give the same calls, on the same books, as the whole day."""
    from hftbacktest.types import EXCH_EVENT, TRADE_EVENT

    from quotelab.research.replay import replay_trades

    a = asset(markets, "usdm_btc")
    day = a.events[0]
    ev, ts = day["ev"], day["exch_ts"]
    exch = (ev & EXCH_EVENT) == EXCH_EVENT
    # a trade followed by a depth row at its exchange time: split between them, so the trade's
    # book needs the next part's first row (equal times included)
    j = np.flatnonzero(exch[:-1] & exch[1:] & ((ev[:-1] & 0xFF) == TRADE_EVENT) & ((ev[1:] & 0xFF) != TRADE_EVENT)
                       & (ts[:-1] == ts[1:]))
    cuts = sorted(set((j[:: max(1, len(j) // 20)] + 1).tolist()) | set(np.linspace(1, len(day) - 1, 20, dtype=int)))
    parts = [day[lo:hi] for lo, hi in zip([0, *cuts], [*cuts, len(day)], strict=True)]
    k1 = int(j[0]) + 1
    parts[1:1] = [day[:0], day[~exch][:50]]  # an empty day and one of local-only rows

    def run(events):
        data = prepare_exchange([Asset("x", events, a.tick_size, a.lot_size)])
        tape = aggregate_trades(data)
        return tape, replay_trades(data, tape, _book_and_trade_nb, np.zeros(0), np.zeros(0), n_levels=3,
                                   out_columns=list(range(10)))

    whole_tape, whole = run([day])
    split_tape, split = run(parts)
    assert len(whole_tape.ts) > 1000
    for field in ("ts", "px", "qty", "side"):
        np.testing.assert_array_equal(getattr(split_tape, field), getattr(whole_tape, field))
    np.testing.assert_array_equal(split, whole)
    assert ts[k1] in whole_tape.ts  # a trade is scored at the first boundary's time


def test_aggregate_trades_of_the_second_asset_equals_it_alone(markets):
    btc, eth = asset(markets, "usdm_btc"), asset(markets, "usdm_eth")
    both = aggregate_trades(prepare_exchange([btc, eth]), asset=1)
    alone = aggregate_trades(prepare_exchange([eth]))
    assert both.raw_trades == alone.raw_trades > 1000
    for field in ("ts", "px", "qty", "side"):
        np.testing.assert_array_equal(getattr(both, field), getattr(alone, field))


_CACHED_REPLAY = '''
import numpy as np
from quotelab.research import replay as R
from quotelab.plugins.mid import mid_nb
asset = R.load_npz_asset({path!r}, "x", 0.1, 0.001)
if {layout_key!r} is not None:  # as if quotelab.layout changed since the cache was written
    import quotelab.backtest.jitcache as J
    J.KEY = R.KEY = {layout_key!r}
recompiled = []
for loop in (R._replay_nb, R._replay_trades_nb):
    loop.recompile = lambda loop=loop, orig=loop.recompile: (recompiled.append(loop.__name__), orig())[1]
data = R.prepare_exchange([asset])
got = R.replay_trades(data, R.aggregate_trades(data), mid_nb, np.zeros(0), np.zeros(0), out_columns=[0])
print(repr(float(np.nansum(got))), sorted(recompiled))
if {grid!r}:
    res = R.replay([asset], mid_nb, np.zeros(0))
    print(repr(float(res.values.sum())), len(res.values))
for loop in (R._replay_nb, R._replay_trades_nb):
    print(loop.__name__, sum(loop.stats.cache_hits.values()), sum(loop.stats.cache_misses.values()))
'''


@pytest.mark.slow
def test_replay_loops_are_disk_cached_and_recompiled_when_the_layout_changes(real_catalog, tmp_path):
    """Both loops take the kernel as a function pointer, so a new process loads them from numba's
    cache instead of compiling them per kernel (~5 s); a cache compiled against other layout
    constants is recompiled, never run."""
    import os
    import subprocess
    import sys

    path = real_catalog / "binance-usdm" / "BTCUSDT" / "20240808.npz"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}

    def run(layout_key: int | None, grid: bool) -> list[str]:
        script = _CACHED_REPLAY.format(path=str(path), layout_key=layout_key, grid=grid)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    first = run(None, True)
    assert first[2:] == ["_replay_nb 0 1", "_replay_trades_nb 0 1"]  # hits, misses: compiled and written
    assert first[0].endswith(" []") and int(first[1].split()[1]) > 1000
    again = run(None, True)
    assert again[:2] == first[:2]
    assert again[2:] == ["_replay_nb 1 0", "_replay_trades_nb 1 0"]  # loaded, not compiled
    # a cache written with other constants returns STALE and is recompiled, then rewritten
    changed = run(12345, False)
    assert changed[0] == first[0].replace("[]", "['_replay_trades_nb']")
    back = run(None, False)
    assert back[0] == first[0].replace("[]", "['_replay_trades_nb']")
    assert run(None, False)[0] == first[0]
