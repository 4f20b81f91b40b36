"""``inventory_skew``: shift the reservation price against the position.

The volatility is a constant (in ticks), or, with ``volatility_half_life`` > 0, an online EWMA
estimate of the mid's volatility over ``volatility_horizon`` seconds that starts from the constant.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, param_offsets
from quotelab.kernels.ewma import VOL_STATE, sigma_ticks_nb
from quotelab.layout import POSITION, TICK
from quotelab.units import Qty, Seconds, Ticks, quantity


class InventorySkewParams(Params):
    asset: Asset = "quoted"
    risk_aversion: float = quantity("dimensionless", 0.5, "Multiplier of the skew.")
    position_unit: Qty = quantity("qty", 1.0, "Position is measured in multiples of this quantity.", gt=0)
    volatility: Ticks = quantity("ticks", 10.0, "Price volatility per position unit, in ticks.", ge=0)
    volatility_half_life: Seconds = quantity(
        "seconds", 0.0, "0: volatility is constant; > 0: EWMA estimate of the mid's volatility with this half-life.",
        ge=0,
    )
    volatility_horizon: Seconds = quantity(
        "seconds", 1.0, "The estimated volatility is the mid's over this horizon (σ·√horizon).", gt=0
    )


P = param_offsets(InventorySkewParams)


@njit(inline="always")
def inventory_skew_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    if params[P.volatility_half_life] <= 0.0:
        # Left to right, as in risk_aversion * (position / unit) * volatility * tick.
        return (params[P.risk_aversion] * (view[a, POSITION] / params[P.position_unit]) * params[P.volatility]
                * view[a, TICK])
    sqrt_h = np.sqrt(params[P.volatility_horizon])
    vol_ticks = sigma_ticks_nb(view, a, state, params[P.volatility] / sqrt_h, params[P.volatility_half_life]) * sqrt_h
    return params[P.risk_aversion] * (view[a, POSITION] / params[P.position_unit]) * vol_ticks * view[a, TICK]


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="risk", name="inventory_skew", params=InventorySkewParams, kernel=inventory_skew_nb,
        state=lambda p: np.array(VOL_STATE),
        doc="Reservation shift against inventory (subtracted from the reservation price).",
        formula="risk_aversion * (position / position_unit) * volatility_ticks * tick; volatility_ticks constant "
                "or sqrt(horizon) * sqrt(EWMA_half_life((dmid)^2/dt)) / tick",
    ))
