"""``returns``: the log return of an asset's mid over a horizon of steps, in bps.

Any asset, so a leader's return can forecast the quoted follower (lead–lag): with ``alpha: 0.5bps``
the forecast is half the leader's return, in bps of the fair value. 0 until the horizon has passed.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, param_offsets
from quotelab.kernels.ring import RING, ring_ago_nb, ring_push_nb, ring_state
from quotelab.layout import BEST_ASK, BEST_BID
from quotelab.units import quantity


class ReturnsParams(Params):
    asset: Asset = "quoted"
    horizon: int = quantity("steps", 1, "Return over this many steps.", ge=1, le=RING - 1)


P = param_offsets(ReturnsParams)


@njit(inline="always")
def returns_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    mid = (view[a, BEST_BID] + view[a, BEST_ASK]) / 2.0
    ring_push_nb(state, mid)
    past = ring_ago_nb(state, int(params[P.horizon]))
    if past != past:
        return 0.0
    return 1e4 * np.log(mid / past)


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="returns", params=ReturnsParams, kernel=returns_nb,
        state=ring_state,
        doc="Lagged log return of any asset's mid, in bps (lead-lag when the asset is not the quoted one).",
        formula="1e4 * ln(mid_t / mid_{t-h})",
    ))
