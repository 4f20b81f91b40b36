"""Signal kernels against references written from their formulas, at every step of real data."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PERP_SPOT, SYMBOLS
from reference_impls import (
    asset,
    events,
    local_trades,
    mids,
    multi_level_imbalance,
    ofi,
    trade_flow,
    volume_rate_imbalance,
)

from quotelab import layout as L
from quotelab.component import PackContext
from quotelab.research.replay import context, replay_component, replay_composition
from quotelab.strategy.composer import Part, compose
from quotelab.strategy.config import Alpha


def _run(registry, name, params, assets, **kw):
    res = replay_component(registry.get("signal", name), params, assets, keep_view=True, **kw)
    assert len(res.values) > 3000 and res.trades_dropped == 0
    return res


@pytest.mark.parametrize("key", SYMBOLS)
@pytest.mark.parametrize("output", ["OI", "QI", "VI", "arrival_rate"])
@pytest.mark.parametrize("side", ["aggressor", "buyer_is_maker"])
def test_trade_flow_imbalance_equals_reference(markets, registry, key, output, side):
    res = _run(registry, "trade_flow_imbalance", {"output": output, "side": side}, [asset(markets, key)])
    ref = trade_flow(local_trades(events(markets, key)), res.timestamps, 0.1, 1.0 if side == "aggressor" else -1.0)
    want = ref[output].to_numpy()
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-12)
    assert np.std(want) > 0


@pytest.mark.parametrize("key", SYMBOLS)
@pytest.mark.parametrize("output", ["OI", "VI"])
def test_trade_flow_adjusted_ewma_equals_pandas_default(markets, registry, key, output):
    res = _run(registry, "trade_flow_imbalance", {"output": output, "adjust": True}, [asset(markets, key)])
    trades = local_trades(events(markets, key))
    want = trade_flow(trades, res.timestamps, 0.1, 1.0, adjust=True)[output].to_numpy()
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-12)
    recursive = trade_flow(trades, res.timestamps, 0.1, 1.0)[output].to_numpy()
    assert np.max(np.abs(want - recursive)) > 1e-3  # the two forms differ where it is checked


@pytest.mark.parametrize("key", SYMBOLS)
def test_trade_flow_side_convention_flips_the_sign(markets, registry, key):
    a = [asset(markets, key)]
    aggressor = _run(registry, "trade_flow_imbalance", {"output": "VI"}, a).values
    maker = _run(registry, "trade_flow_imbalance", {"output": "VI", "side": "buyer_is_maker"}, a).values
    np.testing.assert_allclose(maker, -aggressor, atol=1e-12)


@pytest.mark.parametrize("key", SYMBOLS)
def test_trade_flow_lag_is_the_previous_steps_value(markets, registry, key):
    a = [asset(markets, key)]
    now = _run(registry, "trade_flow_imbalance", {"output": "VI"}, a).values
    lagged = _run(registry, "trade_flow_imbalance", {"output": "VI", "lag": 1}, a).values
    assert lagged[0] == 0.0
    np.testing.assert_array_equal(lagged[1:], now[:-1])


@pytest.mark.parametrize("key", SYMBOLS)
@pytest.mark.parametrize("weights", [(1.0,), (0.6, 0.3, 0.1)])
def test_book_imbalance_equals_reference(markets, registry, key, weights):
    res = _run(registry, "book_imbalance", {"weights": weights}, [asset(markets, key)])
    want = multi_level_imbalance(res.views, 0, weights)
    np.testing.assert_allclose(res.values, want, rtol=1e-13, atol=1e-15)
    assert np.std(want) > 0


@pytest.mark.parametrize("key", SYMBOLS)
def test_composite_imbalance_is_the_seed_formula(markets, registry, key):
    res = _run(registry, "composite_imbalance", {}, [asset(markets, key)])
    vi = trade_flow(local_trades(events(markets, key)), res.timestamps, 0.1, 1.0)["VI"].to_numpy()
    vi_prev = np.concatenate([[0.0], vi[:-1]])
    book = multi_level_imbalance(res.views, 0, (0.7, 0.2, 0.1))
    np.testing.assert_allclose(res.values, -1.5 * vi_prev + 0.7 * book ** 3, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("key", SYMBOLS)
def test_composite_imbalance_generalised_exponent_keeps_sign(markets, registry, key):
    params = {"vi_weight": 0.0, "book_weight": 1.0, "weights": [1.0, 0.5], "exponent": 0.5}
    res = _run(registry, "composite_imbalance", params, [asset(markets, key)])
    book = multi_level_imbalance(res.views, 0, (1.0, 0.5))
    np.testing.assert_allclose(res.values, np.sign(book) * np.abs(book) ** 0.5, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("key", SYMBOLS)
@pytest.mark.parametrize(("weights", "window", "scaled"), [((1.0,), 1, False), ((1.0,), 10, True),
                                                           ((1.0, 0.5, 0.25), 20, False)])
def test_order_flow_imbalance_equals_reference(markets, registry, key, weights, window, scaled):
    res = _run(registry, "order_flow_imbalance", {"weights": weights, "window": window, "depth_scaled": scaled},
               [asset(markets, key)])
    want = ofi(res.views, 0, weights, window, scaled)
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-9)
    assert np.std(want) > 0


@pytest.mark.parametrize("key", SYMBOLS)
@pytest.mark.parametrize("horizon", [1, 5, 10])
def test_returns_equal_reference(markets, registry, key, horizon):
    res = _run(registry, "returns", {"horizon": horizon}, [asset(markets, key)])
    m = mids(res.views, 0)
    want = np.zeros(len(m))
    want[horizon:] = 1e4 * np.log(m[horizon:] / m[:-horizon])
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("quoted", "leader"), [("usdm_btc", "cm_btc"), ("synth_spot", "synth_perp")])
def test_returns_of_a_leader_asset(markets, registry, quoted, leader):
    assets = [asset(markets, quoted, "quoted"), asset(markets, leader, "leader")]
    res = _run(registry, "returns", {"asset": "leader", "horizon": 5}, assets)
    m = mids(res.views, 1)
    np.testing.assert_allclose(res.values[5:], 1e4 * np.log(m[5:] / m[:-5]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("perp", "spot"), PERP_SPOT)
def test_basis_change_equals_reference(markets, registry, perp, spot):
    assets = [asset(markets, perp, "perp"), asset(markets, spot, "spot")]
    res = _run(registry, "basis_change", {"spot": "spot", "horizon": 10}, assets)
    spot = mids(res.views, 1)
    basis = 1e4 * (mids(res.views, 0) - spot) / spot
    want = np.zeros(len(basis))
    want[10:] = basis[10:] - basis[:-10]
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-9)
    assert np.std(want) > 0


@pytest.mark.parametrize("key", SYMBOLS)
def test_linear_forecast_combines_earlier_outputs(markets, registry, key):
    assets = [asset(markets, key)]
    ctx: PackContext = context(assets)
    mk = lambda role, name, raw: registry.get(role, name).make_params(raw)  # noqa: E731
    fv = Part(registry.get("fair_value", "mid"), mk("fair_value", "mid", {}), "fair_value[0]")
    sig = [
        Part(registry.get("signal", "book_imbalance"), mk("signal", "book_imbalance", {}), "forecast[0]"),
        Part(registry.get("signal", "returns"), mk("signal", "returns", {"horizon": 5}), "forecast[1]"),
        Part(registry.get("signal", "linear_forecast"),
             mk("signal", "linear_forecast", {"inputs": [1, 2], "coefficients": [0.5, -2.0], "intercept": 0.25}),
             "forecast[2]", alpha=Alpha(price=1.0)),
    ]
    quoter = Part(registry.get("quoter", "fixed_spread"), mk("quoter", "fixed_spread", {}), "quoter")
    comp = compose([fv], sig, [], quoter, ctx)
    res = replay_composition(comp, assets, keep_view=True)
    imb = res.outs[:, L.COMPONENTS + 1]
    ret = res.outs[:, L.COMPONENTS + 2]
    np.testing.assert_allclose(res.outs[:, L.COMPONENTS + 3], 0.25 + 0.5 * imb - 2.0 * ret, rtol=1e-12)
    # Only the linear forecast carries an alpha, so it alone is the forecast.
    np.testing.assert_allclose(res.outs[:, L.FORECAST], res.outs[:, L.COMPONENTS + 3], rtol=1e-12)
    assert np.std(ret) > 0


@pytest.mark.parametrize("key", SYMBOLS)
@pytest.mark.parametrize("side", ["aggressor", "buyer_is_maker"])
def test_trade_flow_volume_rate_variant_equals_reference(markets, registry, key, side):
    res = _run(registry, "trade_flow_imbalance", {"output": "volume_rate", "side": side, "alpha": 0.2},
               [asset(markets, key)])
    dt = res.views[:, 0, L.STEP_SECONDS]
    want = volume_rate_imbalance(local_trades(events(markets, key)), res.timestamps, dt, 0.2,
                                 1.0 if side == "aggressor" else -1.0, res.timestamps[0] - 100_000_000)
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-12)
    assert np.std(want) > 0


@pytest.mark.parametrize("key", SYMBOLS)
def test_alpha_units_price_bps_and_spreads_scale_the_forecast(markets, registry, key):
    assets = [asset(markets, key)]
    mk = lambda role, name, raw: registry.get(role, name).make_params(raw)  # noqa: E731
    fv = Part(registry.get("fair_value", "mid"), mk("fair_value", "mid", {}), "fair_value[0]")
    sig = [Part(registry.get("signal", "book_imbalance"), mk("signal", "book_imbalance", {}), f"forecast[{i}]",
                alpha=a) for i, a in enumerate([Alpha(price=0.3), Alpha(bps=2.0), Alpha(spreads=-1.5)])]
    quoter = Part(registry.get("quoter", "fixed_spread"), mk("quoter", "fixed_spread", {}), "quoter")
    res = replay_composition(compose([fv], sig, [], quoter, context(assets)), assets, keep_view=True)
    imb = res.outs[:, L.COMPONENTS + 1]
    mid = mids(res.views, 0)
    spread = res.views[:, 0, L.BEST_ASK] - res.views[:, 0, L.BEST_BID]
    np.testing.assert_allclose(res.outs[:, L.FORECAST], imb * (0.3 + 2e-4 * mid - 1.5 * spread), rtol=1e-12)
    assert np.std(spread) > 0


@pytest.mark.parametrize("key", SYMBOLS)
@pytest.mark.parametrize("kind", ["trade_flow_imbalance", "composite_imbalance"])
def test_warmup_undefined_is_nan_until_both_sides_have_an_interval(markets, registry, key, kind):
    a = [asset(markets, key)]
    zero = _run(registry, kind, {}, a)
    undefined = _run(registry, kind, {"warmup": "undefined"}, a).values
    ref = trade_flow(local_trades(events(markets, key)), zero.timestamps, 0.1, 1.0)
    ready = ((ref["i_b"] > 0) & (ref["i_s"] > 0)).to_numpy()
    if kind == "composite_imbalance":  # it reads the VI of the step before
        ready = np.concatenate([[False], ready[:-1]])
    assert 0 < (~ready).sum() < len(ready)
    np.testing.assert_array_equal(np.isnan(undefined), ~ready)
    np.testing.assert_array_equal(undefined[ready], zero.values[ready])
