"""GLFT's online A and k fit from trade arrivals, against a numpy re-fit at every step of real data."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SYMBOLS
from numba import njit
from reference_impls import arrival_fit, asset, events, local_trades, mids

from quotelab import layout as L
from quotelab.kernels.arrival_fit import arrival_fit_nb, fit_state
from quotelab.research.replay import replay

WINDOW = 300
N_TICKS = 15


@njit(inline="always")
def _fitted_a_nb(view, trades, state, params, out):
    fa, fk = arrival_fit_nb(view, trades, 0, state, params[0], params[1])
    out[L.COMPONENTS] = fk
    return fa


@pytest.mark.parametrize("key", SYMBOLS)
def test_arrival_fit_equals_reference(markets, key):
    a = asset(markets, key)
    res = replay([a], _fitted_a_nb, np.array([WINDOW, N_TICKS], dtype=float), fit_state(), keep_view=True,
                 keep_out=True, out_columns=[L.COMPONENTS])
    assert len(res.values) > 3000
    want_a, want_k = arrival_fit(local_trades(events(markets, key)), res.timestamps, mids(res.views, 0),
                                 res.views[:, 0, L.STEP_SECONDS], a.tick_size, WINDOW, N_TICKS,
                                 res.timestamps[0] - 100_000_000)
    np.testing.assert_allclose(res.values, want_a, rtol=1e-8)
    np.testing.assert_allclose(res.outs[:, 0], want_k, rtol=1e-8, atol=1e-12)
    assert np.isfinite(want_k).mean() > 0.5 and np.nanstd(want_k) > 0


@pytest.mark.parametrize("key", ["usdm_btc", "synth_perp"])
@pytest.mark.parametrize("quoter", ["avellaneda_stoikov", "glft"])
def test_quoters_use_the_fitted_arrival_parameters(markets, registry, quoter, key):
    from quotelab.research.replay import context, replay_composition
    from quotelab.strategy.composer import Part, compose

    a = asset(markets, key)
    g, k0, a0, s = 0.001, 0.3, 1.0, 80.0
    raw = {"gamma": g, "k": k0, "volatility": s, "position_unit": 0.01, "size": 0.01, "max_position": 0.1,
           "fit_window": WINDOW, "fit_max_ticks": N_TICKS}
    raw |= {"horizon": 1.0} if quoter == "avellaneda_stoikov" else {"arrival_rate": a0}
    mid = registry.get("fair_value", "mid")
    comp = registry.get("quoter", quoter)
    composition = compose([Part(mid, mid.make_params({}), "fair_value[0]")], [], [],
                          Part(comp, comp.make_params(raw), "quoter"), context([a]))
    res = replay_composition(composition, [a], keep_view=True)
    m = mids(res.views, 0)
    fit_a, fit_k = arrival_fit(local_trades(events(markets, key)), res.timestamps, m,
                               res.views[:, 0, L.STEP_SECONDS], a.tick_size, WINDOW, N_TICKS,
                               res.timestamps[0] - 100_000_000)
    use = np.isfinite(fit_a) & (fit_k > 0)
    k = np.where(use, fit_k, k0)
    if quoter == "avellaneda_stoikov":
        half = (g * s ** 2 * 1.0 + 2 / g * np.log(1 + g / k)) / 2
    else:
        big_a = np.where(use, fit_a, a0)
        omega = np.sqrt(s ** 2 * g / (2 * k * big_a) * (1 + g / k) ** (1 + k / g))
        half = np.log(1 + g / k) / g + omega / 2
    bid = np.minimum(np.floor(np.round((m - half * a.tick_size) / a.tick_size, 6)), res.views[:, 0, L.BEST_BID_TICK])
    ask = np.maximum(np.ceil(np.round((m + half * a.tick_size) / a.tick_size, 6)), res.views[:, 0, L.BEST_ASK_TICK])
    np.testing.assert_array_equal(res.outs[:, L.Q_BID_TICK], bid)
    np.testing.assert_array_equal(res.outs[:, L.Q_ASK_TICK], ask)
    assert use.mean() > 0.5
    # The fitted parameters move the spread over time; the constants alone would hold it still.
    assert np.std(half[use]) > 0
