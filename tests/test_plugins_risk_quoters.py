"""Risk and quoter kernels against references from their formulas, at every step of real data.

The replayer trades nothing, so each recorded step's view gets a position from a fixed random walk
in whole lots and each kernel runs step by step over those views, in order (EWMA state carries).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SYMBOLS
from reference_impls import asset, ewma_sigma_ticks, level_imbalance, mids

from quotelab import layout as L
from quotelab.research.replay import context, replay_component


@pytest.fixture(scope="module", params=SYMBOLS)
def market(request, markets, registry):
    """Recorded views of one symbol with positions set, plus a reservation price per step."""
    a = asset(markets, request.param)
    res = replay_component(registry.get("fair_value", "mid"), {}, [a], keep_view=True)
    views = res.views.copy()
    rng = np.random.default_rng(5)
    lots = np.clip(np.cumsum(rng.integers(-1, 2, len(views))), -40, 40)
    views[:, 0, L.POSITION] = lots * 5 * a.lot_size
    spread = views[:, 0, L.BEST_ASK] - views[:, 0, L.BEST_BID]
    reservation = mids(views, 0) + spread * level_imbalance(views, 0, 0)
    return a, views, reservation


def _steps(registry, role, name, raw, a, views, reservation):
    """Run one kernel over the views in order; return its values and the out rows."""
    comp = registry.get(role, name)
    p = comp.make_params(raw)
    params = np.asarray(comp.pack(p, context([a])), dtype=np.float64)
    state = np.asarray(comp.state(p), dtype=np.float64).copy()
    trades = np.zeros((1, 1, L.TR_WIDTH))
    values = np.empty(len(views))
    outs = np.zeros((len(views), L.OUT_WIDTH))
    for i in range(len(views)):
        out = np.zeros(L.OUT_WIDTH)
        out[L.BID_ENABLED] = out[L.ASK_ENABLED] = 1.0
        out[L.RESERVATION] = reservation[i]
        values[i] = comp.kernel(np.ascontiguousarray(views[i]), trades, state, params, out)
        outs[i] = out
    return values, outs


def test_inventory_skew_constant_volatility(registry, market):
    a, views, r = market
    raw = {"risk_aversion": 0.5, "position_unit": 0.01, "volatility": 10}
    values, _ = _steps(registry, "risk", "inventory_skew", raw, a, views, r)
    np.testing.assert_array_equal(values, 0.5 * (views[:, 0, L.POSITION] / 0.01) * 10 * a.tick_size)


def test_inventory_skew_ewma_volatility(registry, market):
    a, views, r = market
    raw = {"risk_aversion": 0.5, "position_unit": 0.01, "volatility": 10, "volatility_half_life": 30,
           "volatility_horizon": 4}
    values, _ = _steps(registry, "risk", "inventory_skew", raw, a, views, r)
    sigma = ewma_sigma_ticks(mids(views, 0), views[:, 0, L.STEP_SECONDS], a.tick_size, 10 / 2, 30)
    want = 0.5 * (views[:, 0, L.POSITION] / 0.01) * sigma * 2 * a.tick_size
    np.testing.assert_allclose(values, want, rtol=1e-9, atol=1e-12)
    assert np.std(sigma) > 0


def test_position_limits(registry, market):
    a, views, r = market
    raw = {"max_position": 150 * a.lot_size, "soft_position": 50 * a.lot_size, "max_widen_ticks": 4}
    values, outs = _steps(registry, "risk", "position_limits", raw, a, views, r)
    lots = np.round(views[:, 0, L.POSITION] / a.lot_size)
    assert (values == 0).all()
    np.testing.assert_array_equal(outs[:, L.BID_ENABLED], np.where(lots >= 150, 0.0, 1.0))
    np.testing.assert_array_equal(outs[:, L.ASK_ENABLED], np.where(lots <= -150, 0.0, 1.0))
    widen = lambda x: np.where(x > 50, np.ceil(4 * np.minimum(1, (x - 50) / 100)), 0.0)  # noqa: E731
    np.testing.assert_array_equal(outs[:, L.BID_WIDEN_TICKS], widen(lots))
    np.testing.assert_array_equal(outs[:, L.ASK_WIDEN_TICKS], widen(-lots))
    assert outs[:, L.BID_WIDEN_TICKS].max() > 0 and outs[:, L.BID_ENABLED].min() == 0


def test_fixed_spread(registry, market):
    a, views, r = market
    raw = {"half_spread": 2.0, "size": 3 * a.lot_size, "max_position": 1.0, "levels": 2, "level_spacing": 3.0}
    values, outs = _steps(registry, "quoter", "fixed_spread", raw, a, views, r)
    tick = a.tick_size
    bid = np.minimum(np.round((r - 2.0 * tick) / tick), views[:, 0, L.BEST_BID_TICK])
    ask = np.maximum(np.round((r + 2.0 * tick) / tick), views[:, 0, L.BEST_ASK_TICK])
    np.testing.assert_array_equal(values, r)
    for k in range(2):
        np.testing.assert_array_equal(outs[:, L.Q_BID_TICK + k], bid - 3 * k)
        np.testing.assert_array_equal(outs[:, L.Q_ASK_TICK + k], ask + 3 * k)
        np.testing.assert_array_equal(outs[:, L.Q_BID_QTY + k], 3 * a.lot_size)
    assert (outs[:, L.N_BID] == 2).all() and (outs[:, L.N_ASK] == 2).all() and (outs[:, L.MAX_POSITION] == 1.0).all()
    # Both cases occur: quotes behind the touch, and quotes held back at it.
    assert (bid < views[:, 0, L.BEST_BID_TICK]).any() and (bid == views[:, 0, L.BEST_BID_TICK]).any()


def _check_quotes(outs, views, a, bid_px, ask_px, size):
    """Bid at or below the model price, ask at or above, never through the touch, whole lots."""
    tick = a.tick_size
    bb, ba = views[:, 0, L.BEST_BID_TICK], views[:, 0, L.BEST_ASK_TICK]
    want_bid = np.minimum(np.floor(np.round(bid_px / tick, 6)), bb)
    want_ask = np.maximum(np.ceil(np.round(ask_px / tick, 6)), ba)
    np.testing.assert_array_equal(outs[:, L.Q_BID_TICK], want_bid)
    np.testing.assert_array_equal(outs[:, L.Q_ASK_TICK], want_ask)
    assert (outs[:, L.Q_BID_TICK] < ba).all() and (outs[:, L.Q_ASK_TICK] > bb).all()
    lots = outs[:, L.Q_BID_QTY] / a.lot_size
    np.testing.assert_allclose(lots, np.floor(size / a.lot_size + 1e-9))
    assert (outs[:, L.N_BID] == 1).all() and (outs[:, L.N_ASK] == 1).all()


def test_volatility_spread(registry, market):
    a, views, r = market
    raw = {"min_half_spread": 1, "multiplier": 2.0, "volatility": 3.0, "volatility_half_life": 10, "horizon": 1,
           "size": 7.5 * a.lot_size, "max_position": 1.0}
    values, outs = _steps(registry, "quoter", "volatility_spread", raw, a, views, r)
    sigma = ewma_sigma_ticks(mids(views, 0), views[:, 0, L.STEP_SECONDS], a.tick_size, 3.0, 10)
    half = np.maximum(1, 2.0 * sigma) * a.tick_size
    np.testing.assert_allclose(values, half, rtol=1e-9)
    _check_quotes(outs, views, a, r - half, r + half, 7.5 * a.lot_size)
    assert (half > a.tick_size).any()


def test_avellaneda_stoikov(registry, market):
    a, views, r = market
    g, k, s, tau, unit = 0.1, 0.3, 2.0, 5.0, 10 * a.lot_size
    raw = {"gamma": g, "k": k, "volatility": s, "horizon": tau, "position_unit": unit, "size": unit,
           "max_position": 1.0}
    values, outs = _steps(registry, "quoter", "avellaneda_stoikov", raw, a, views, r)
    q = views[:, 0, L.POSITION] / unit
    res = r - q * g * s ** 2 * tau * a.tick_size
    spread = (g * s ** 2 * tau + 2 / g * np.log(1 + g / k)) * a.tick_size
    np.testing.assert_allclose(values, res, rtol=1e-12)
    _check_quotes(outs, views, a, res - spread / 2, res + spread / 2, unit)


def test_glft(registry, market):
    a, views, r = market
    g, k, big_a, s, unit = 0.05, 0.4, 2.0, 3.0, 10 * a.lot_size
    raw = {"gamma": g, "k": k, "arrival_rate": big_a, "volatility": s, "position_unit": unit, "size": unit,
           "max_position": 1.0}
    values, outs = _steps(registry, "quoter", "glft", raw, a, views, r)
    c1 = 1 / g * np.log(1 + g / k)
    omega = np.sqrt(s ** 2 * g / (2 * k * big_a) * (1 + g / k) ** (1 + k / g))
    q = views[:, 0, L.POSITION] / unit
    bid = r - (c1 + omega / 2 + omega * q) * a.tick_size
    ask = r + (c1 + omega / 2 - omega * q) * a.tick_size
    np.testing.assert_allclose(values, r - omega * q * a.tick_size, rtol=1e-12)
    _check_quotes(outs, views, a, bid, ask, unit)


def test_quoters_respect_risk_flags(registry, market):
    a, views, r = market
    comp = registry.get("quoter", "glft")
    p = comp.make_params({"size": a.lot_size})
    params = np.asarray(comp.pack(p, context([a])), dtype=np.float64)
    out = np.zeros(L.OUT_WIDTH)
    out[L.RESERVATION] = r[0]
    out[L.BID_ENABLED], out[L.ASK_ENABLED], out[L.ASK_WIDEN_TICKS] = 0.0, 1.0, 3.0
    comp.kernel(np.ascontiguousarray(views[0]), np.zeros((1, 1, L.TR_WIDTH)), comp.state(p), params, out)
    assert out[L.N_BID] == 0 and out[L.N_ASK] == 1
    assert out[L.Q_ASK_TICK] >= views[0, 0, L.BEST_ASK_TICK] + 3
