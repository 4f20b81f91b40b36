"""``inventory_skew``: shift the reservation price against the position."""

from __future__ import annotations

from numba import njit

from quotelab import hookimpl
from quotelab.component import Asset, Component, PackContext, Params
from quotelab.layout import POSITION, TICK
from quotelab.units import Qty, Ticks, quantity


class InventorySkewParams(Params):
    asset: Asset = "quoted"
    risk_aversion: float = quantity("dimensionless", 0.5, "Multiplier of the skew.")
    position_unit: Qty = quantity("qty", 1.0, "Position is measured in multiples of this quantity.", gt=0)
    volatility: Ticks = quantity("ticks", 10.0, "Price volatility per position unit, in ticks.", ge=0)


def _pack(p: InventorySkewParams, ctx: PackContext) -> list[float]:
    return [float(ctx.asset_index[p.asset]), p.risk_aversion, p.position_unit, p.volatility]


@njit(inline="always")
def inventory_skew_nb(view, trades, state, params, out):
    a = int(params[0])
    # Left to right, as in risk_aversion * (position / unit) * volatility * tick.
    return params[1] * (view[a, POSITION] / params[2]) * params[3] * view[a, TICK]


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="risk", name="inventory_skew", params=InventorySkewParams, kernel=inventory_skew_nb, pack=_pack,
        doc="Reservation shift against inventory (subtracted from the reservation price).",
        formula="risk_aversion * (position / position_unit) * volatility_ticks * tick",
    ))
