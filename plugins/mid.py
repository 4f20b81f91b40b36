"""``mid``: the mid price (best_bid + best_ask) / 2 of one asset."""

from __future__ import annotations

from numba import njit

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, param_offsets
from quotelab.layout import BEST_ASK, BEST_BID


class MidParams(Params):
    asset: Asset = "quoted"


P = param_offsets(MidParams)


@njit(inline="always")
def mid_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    return (view[a, BEST_BID] + view[a, BEST_ASK]) / 2.0


@hookimpl
def quotelab_register_components(register):
    register(Component(role="fair_value", name="mid", params=MidParams, kernel=mid_nb,
                       doc="Mid price of one asset.", formula="(best_bid + best_ask) / 2"))
