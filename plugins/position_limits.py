"""``position_limits``: stop quoting a side at the limit; widen it in a soft zone before that.

Positions compare in whole lots, as the engine does. Beyond ``soft_position`` the side that adds to
the position is pushed back by ceil(max_widen_ticks · (|pos| − soft)/(limit − soft)) ticks; at
``max_position`` it is disabled. Adds nothing to the reservation price.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from pydantic import model_validator

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, param_offsets
from quotelab.layout import ASK_ENABLED, ASK_WIDEN_TICKS, BID_ENABLED, BID_WIDEN_TICKS, LOT, POSITION
from quotelab.units import Qty, Ticks, quantity


class PositionLimitsParams(Params):
    asset: Asset = "quoted"
    max_position: Qty = quantity("qty", 1.0, "No quotes on the side that would add beyond this |position|.", gt=0)
    soft_position: Qty = quantity("qty", 0.5, "Widening starts beyond this |position|.", ge=0)
    max_widen_ticks: Ticks = quantity("ticks", 5.0, "Widening reached at max_position.", ge=0)

    @model_validator(mode="after")
    def _order(self) -> PositionLimitsParams:
        if self.soft_position >= self.max_position:
            raise ValueError("soft_position must be below max_position")
        return self


P = param_offsets(PositionLimitsParams)


@njit(inline="always")
def position_limits_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    lot = view[a, LOT]
    pos = np.round(view[a, POSITION] / lot)
    limit = np.round(params[P.max_position] / lot)
    soft = np.round(params[P.soft_position] / lot)
    if pos >= limit:
        out[BID_ENABLED] = 0.0
    if pos <= -limit:
        out[ASK_ENABLED] = 0.0
    if pos > soft:
        out[BID_WIDEN_TICKS] += np.ceil(params[P.max_widen_ticks] * min(1.0, (pos - soft) / (limit - soft)))
    if pos < -soft:
        out[ASK_WIDEN_TICKS] += np.ceil(params[P.max_widen_ticks] * min(1.0, (-pos - soft) / (limit - soft)))
    return 0.0


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="risk", name="position_limits", params=PositionLimitsParams, kernel=position_limits_nb,
        doc="Hard position limit per side with a soft zone that widens the side adding to the position.",
        formula="side off at |pos| >= max; widen ceil(W * (|pos| - soft)/(max - soft)) ticks beyond soft",
    ))
