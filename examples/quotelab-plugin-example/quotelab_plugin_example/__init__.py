"""Example third-party plugin: ``trade_sign_ewma``, an EWMA of market trade signs."""

from __future__ import annotations

import numpy as np
from numba import njit
from pydantic import Field

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, Reads, param_offsets
from quotelab.kernels.ewma import ewma_nb
from quotelab.layout import N_TRADES, TR_SIDE


class TradeSignEwmaParams(Params):
    asset: Asset = "quoted"
    alpha: float = Field(0.1, gt=0, le=1, description="Weight of each new trade's sign.")


P = param_offsets(TradeSignEwmaParams)


@njit(inline="always")
def trade_sign_ewma_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    alpha = params[P.alpha]
    value = state[0]
    for k in range(int(view[a, N_TRADES])):
        value = ewma_nb(value, trades[a, k, TR_SIDE], alpha)
    state[0] = value
    return value


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="trade_sign_ewma", params=TradeSignEwmaParams, kernel=trade_sign_ewma_nb,
        state=lambda p: np.zeros(1), reads=lambda p: Reads(assets=(p.asset,), trades=True),
        doc="EWMA of market trade signs, trade by trade (+1 buy-initiated, -1 sell-initiated).",
        formula="s <- alpha * side + (1 - alpha) * s, for each trade",
    ))
