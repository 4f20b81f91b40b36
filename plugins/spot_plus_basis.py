"""``spot_plus_basis``: the spot mid plus an EWMA (over time) of the perp − spot basis.

The EWMA weighs each step by its duration (view STEP_SECONDS), w = 1 − 2^(−Δt/half_life), so the
half-life is in seconds whatever the step; the first observation initialises it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, param_offsets
from quotelab.layout import BEST_ASK, BEST_BID, STEP_SECONDS
from quotelab.units import Seconds, quantity


class SpotPlusBasisParams(Params):
    spot: Asset
    perp: Asset = "quoted"
    half_life: Seconds = quantity("seconds", 60.0, "Half-life of the basis EWMA.", gt=0)


P = param_offsets(SpotPlusBasisParams)


@njit(inline="always")
def spot_plus_basis_nb(view, trades, state, params, out):
    s = int(params[P.spot])
    p = int(params[P.perp])
    spot = (view[s, BEST_BID] + view[s, BEST_ASK]) / 2.0
    basis = (view[p, BEST_BID] + view[p, BEST_ASK]) / 2.0 - spot
    if state[0] == 0.0:
        state[1] = basis
        state[0] = 1.0
    else:
        w = 1.0 - 0.5 ** (view[p, STEP_SECONDS] / params[P.half_life])
        state[1] += w * (basis - state[1])
    return spot + state[1]


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="fair_value", name="spot_plus_basis", params=SpotPlusBasisParams, kernel=spot_plus_basis_nb,
        state=lambda p: np.zeros(2),
        doc="Spot mid plus the smoothed perp-spot basis: a perp fair value led by the spot book.",
        formula="mid_spot + B_t, B_t = B_{t-1} + (1 - 2^(-dt/half_life)) (mid_perp - mid_spot - B_{t-1})",
    ))
