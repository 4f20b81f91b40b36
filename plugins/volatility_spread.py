"""``volatility_spread``: quotes at reservation ± max(min half spread, c·σ·√horizon).

σ is the mid's volatility in ticks per √second: a constant, or an online EWMA estimate with
``volatility_half_life`` > 0 (starting from the constant).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, param_offsets
from quotelab.kernels.ewma import VOL_STATE, sigma_ticks_nb
from quotelab.kernels.quotes import write_quotes_nb
from quotelab.layout import MAX_QUOTES, RESERVATION, TICK
from quotelab.units import Qty, Seconds, Ticks, quantity


class VolatilitySpreadParams(Params):
    asset: Asset = "quoted"
    min_half_spread: Ticks = quantity("ticks", 1.0, "Smallest half spread.", ge=0)
    multiplier: float = quantity("dimensionless", 1.0, "c in c·σ·√horizon.", ge=0)
    volatility: float = quantity("ticks/sqrt(s)", 1.0, "σ (or its prior), ticks per √second.", ge=0)
    volatility_half_life: Seconds = quantity("seconds", 0.0, "0: σ constant; > 0: EWMA half-life.", ge=0)
    horizon: Seconds = quantity("seconds", 1.0, "The half spread covers σ over this horizon.", gt=0)
    size: Qty = quantity("qty", 1.0, "Order quantity per level (whole lots).", gt=0)
    max_position: Qty = quantity("qty", 1.0, "No new orders on a side once |position| reaches this.", ge=0)
    levels: int = quantity("levels", 1, "Orders per side.", ge=1, le=MAX_QUOTES)
    level_spacing: int = quantity("ticks", 1, "Ticks between consecutive levels.", ge=1)


P = param_offsets(VolatilitySpreadParams)


@njit(inline="always")
def volatility_spread_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    tick = view[a, TICK]
    sigma = sigma_ticks_nb(view, a, state, params[P.volatility], params[P.volatility_half_life])
    half = max(params[P.min_half_spread], params[P.multiplier] * sigma * np.sqrt(params[P.horizon])) * tick
    r = out[RESERVATION]
    write_quotes_nb(view, a, out, r - half, r + half, params[P.size], params[P.levels], params[P.level_spacing],
                    params[P.max_position])
    return half


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="quoter", name="volatility_spread", params=VolatilitySpreadParams, kernel=volatility_spread_nb,
        state=lambda p: np.array(VOL_STATE),
        doc="Half spread proportional to the mid's volatility, floored; bids round down, asks up, never "
            "through the touch. Returns the half spread.",
        formula="half = max(min_ticks, c * sigma * sqrt(horizon)) * tick; bid = r - half, ask = r + half",
    ))
