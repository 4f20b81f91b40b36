"""``fixed_spread``: quotes at reservation ± a fixed half spread, on one or more levels per side."""

from __future__ import annotations

import numpy as np
from numba import njit
from pydantic import model_validator

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, param_offsets
from quotelab.kernels.quotes import place_levels_nb
from quotelab.layout import (
    MAX_QUOTES,
    RESERVATION,
    TICK,
)
from quotelab.units import Qty, Ticks, quantity


class FixedSpreadParams(Params):
    asset: Asset = "quoted"
    half_spread: Ticks = quantity("ticks", 2.0, "Distance of the first level from the reservation price.", ge=0)
    size: Qty = quantity("qty", 1.0, "Order quantity per level.", gt=0)
    max_position: Qty = quantity("qty", 1.0, "No new orders on a side once |position| reaches this.", ge=0)
    levels: int = quantity("levels", 1, "Orders per side.", ge=1, le=MAX_QUOTES)
    level_spacing: Ticks = quantity("ticks", 1.0, "Distance between consecutive levels.", ge=1)

    @model_validator(mode="after")
    def _whole_ticks(self) -> FixedSpreadParams:
        if self.level_spacing != int(self.level_spacing):
            raise ValueError("level_spacing must be a whole number of ticks")
        return self


P = param_offsets(FixedSpreadParams)


@njit(inline="always")
def fixed_spread_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    tick = view[a, TICK]
    r = out[RESERVATION]
    half = params[P.half_spread] * tick
    place_levels_nb(view, a, out, np.round((r - half) / tick), np.round((r + half) / tick), params[P.size],
                    int(params[P.levels]), params[P.level_spacing], params[P.max_position])
    return r


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="quoter", name="fixed_spread", params=FixedSpreadParams, kernel=fixed_spread_nb,
        doc="Fixed half spread around the reservation price; never inside the touch.",
        formula="bid = min(round((r - h*tick)/tick), best_bid_tick) - k*spacing; ask symmetric",
    ))
