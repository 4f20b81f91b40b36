"""``inventory_skew``: shift the reservation price against the position.

The volatility is a constant (in ticks), or, with ``volatility_half_life`` > 0, an online EWMA
estimate of the mid's volatility over ``volatility_horizon`` seconds that starts from the constant.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab import hookimpl
from quotelab.component import Asset, Component, PackContext, Params
from quotelab.layout import POSITION, TICK
from quotelab.plugins._kernels import VOL_STATE, sigma_ticks_nb
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


def _pack(p: InventorySkewParams, ctx: PackContext) -> list[float]:
    return [float(ctx.asset_index[p.asset]), p.risk_aversion, p.position_unit, p.volatility,
            p.volatility_half_life, p.volatility_horizon]


@njit(inline="always")
def inventory_skew_nb(view, trades, state, params, out):
    a = int(params[0])
    if params[4] <= 0.0:
        # Left to right, as in risk_aversion * (position / unit) * volatility * tick.
        return params[1] * (view[a, POSITION] / params[2]) * params[3] * view[a, TICK]
    sqrt_h = np.sqrt(params[5])
    vol_ticks = sigma_ticks_nb(view, a, state, params[3] / sqrt_h, params[4]) * sqrt_h
    return params[1] * (view[a, POSITION] / params[2]) * vol_ticks * view[a, TICK]


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="risk", name="inventory_skew", params=InventorySkewParams, kernel=inventory_skew_nb, pack=_pack,
        state=lambda p: np.array(VOL_STATE),
        doc="Reservation shift against inventory (subtracted from the reservation price).",
        formula="risk_aversion * (position / position_unit) * volatility_ticks * tick; volatility_ticks constant "
                "or sqrt(horizon) * sqrt(EWMA_half_life((dmid)^2/dt)) / tick",
    ))
