"""GLFT's online A and k fit from trade arrivals, against a numpy re-fit at every step of real data."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit
from reference_impls import arrival_fit, asset, events, local_trades, mids

from quotelab import layout as L
from quotelab.plugins._kernels import arrival_fit_nb, fit_state
from quotelab.replay import replay

WINDOW = 300
N_TICKS = 15


@njit(inline="always")
def _fitted_a_nb(view, trades, state, params, out):
    fa, fk = arrival_fit_nb(view, trades, 0, state, params[0], params[1])
    out[L.COMPONENTS] = fk
    return fa


@pytest.mark.parametrize("key", ["usdm_btc", "usdm_eth"])
def test_arrival_fit_equals_reference(shared_data, key):
    a = asset(shared_data, key)
    res = replay([a], _fitted_a_nb, np.array([WINDOW, N_TICKS], dtype=float), fit_state(), keep_view=True,
                 keep_out=True, out_columns=[L.COMPONENTS])
    assert len(res.values) > 3000
    want_a, want_k = arrival_fit(local_trades(events(shared_data, key)), res.timestamps, mids(res.views, 0),
                                 res.views[:, 0, L.STEP_SECONDS], a.tick_size, WINDOW, N_TICKS,
                                 res.timestamps[0] - 100_000_000)
    np.testing.assert_allclose(res.values, want_a, rtol=1e-8)
    np.testing.assert_allclose(res.outs[:, 0], want_k, rtol=1e-8, atol=1e-12)
    assert np.isfinite(want_k).mean() > 0.5 and np.nanstd(want_k) > 0
