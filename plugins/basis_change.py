"""``basis_change``: the change of the perp − spot basis (in bps of the spot mid) over a horizon of steps."""

from __future__ import annotations

from numba import njit

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, param_offsets
from quotelab.kernels.ring import RING, ring_ago_nb, ring_push_nb, ring_state
from quotelab.layout import BEST_ASK, BEST_BID
from quotelab.units import quantity


class BasisChangeParams(Params):
    spot: Asset
    perp: Asset = "quoted"
    horizon: int = quantity("steps", 10, "Change over this many steps.", ge=1, le=RING - 1)


P = param_offsets(BasisChangeParams)


@njit(inline="always")
def basis_change_nb(view, trades, state, params, out):
    s = int(params[P.spot])
    p = int(params[P.perp])
    spot = (view[s, BEST_BID] + view[s, BEST_ASK]) / 2.0
    basis = 1e4 * ((view[p, BEST_BID] + view[p, BEST_ASK]) / 2.0 - spot) / spot
    ring_push_nb(state, basis)
    past = ring_ago_nb(state, int(params[P.horizon]))
    if past != past:
        return 0.0
    return basis - past


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="basis_change", params=BasisChangeParams, kernel=basis_change_nb,
        state=ring_state,
        doc="Change of the perp-spot basis over a horizon, in bps of the spot mid.",
        formula="b_t - b_{t-h}, b = 1e4 * (mid_perp - mid_spot) / mid_spot",
    ))
