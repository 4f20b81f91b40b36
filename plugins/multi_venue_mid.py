"""``multi_venue_mid``: a weighted combination of several assets' (imbalance-adjusted) mids.

Binance COIN-M (inverse) contracts are quoted in USD per coin like the linear ones, so their mids
combine directly; what differs for an inverse contract is its PnL, which the engine handles.
An asset whose book is one-sided this step is left out and the weights of the others renormalised.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from numba import njit
from pydantic import Field, model_validator

from quotelab import hookimpl
from quotelab.component import AssetName, Component, Params, Reads, Width, param_offsets
from quotelab.kernels.imbalance import (
    MAX_COEFFICIENTS,
    SHAPE_FORMULAS,
    Coefficients,
    Shape,
    imbalance_shape_nb,
    level_imbalance_nb,
)
from quotelab.layout import ASK_QTY, BEST_ASK, BEST_BID, BID_QTY

MAX_VENUES = 8


class MultiVenueMidParams(Params):
    assets: Annotated[tuple[str, ...], AssetName, Width(MAX_VENUES)] = Field(
        description="Assets of data.assets whose mids are combined.")
    weights: Annotated[tuple[float, ...], Width(MAX_VENUES)] = Field(
        description="One weight per asset (normalised over available assets).")
    shape: Shape = Field("linear", description="Each asset's mid is mid + spread·f(I)·imbalance_weight; f: "
                         + "; ".join(f"{k}: {v}" for k, v in SHAPE_FORMULAS.items()))
    imbalance_weight: float = Field(0.0, description="0 combines plain mids; 1 combines the shape-adjusted mids.")
    coefficients: Coefficients = Field((), description="polynomial only: c0, c1, ... of f")

    @model_validator(mode="after")
    def _check(self) -> MultiVenueMidParams:
        if not 1 <= len(self.assets) <= MAX_VENUES or len(self.weights) != len(self.assets):
            raise ValueError(f"give 1..{MAX_VENUES} assets and one weight per asset")
        if any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        if (self.shape == "polynomial") != bool(self.coefficients):
            raise ValueError("coefficients go with shape: polynomial, and only with it")
        return self


P = param_offsets(MultiVenueMidParams)


@njit(inline="always")
def multi_venue_mid_nb(view, trades, state, params, out):
    n = int(params[P.n_assets])
    adj = params[P.imbalance_weight]
    shape = int(params[P.shape])
    total = 0.0
    wsum = 0.0
    for i in range(n):
        a = int(params[P.assets + i])
        w = params[P.weights + i]
        bid = view[a, BEST_BID]
        ask = view[a, BEST_ASK]
        if not (bid == bid and ask == ask) or w == 0.0:
            continue
        imb = level_imbalance_nb(view[a, BID_QTY], view[a, ASK_QTY], 0.0)
        fv = (bid + ask) / 2.0
        if adj != 0.0:
            coefs = params[P.coefficients:P.coefficients + MAX_COEFFICIENTS]
            fv += adj * (ask - bid) * imbalance_shape_nb(shape, imb, coefs, imb)
        total += w * fv
        wsum += w
    return total / wsum if wsum > 0.0 else np.nan


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="fair_value", name="multi_venue_mid", params=MultiVenueMidParams, kernel=multi_venue_mid_nb,
        reads=lambda p: Reads(assets=tuple(p.assets)),
        doc="Weighted mids of several venues/contracts (e.g. USD-M, spot, COIN-M) for one instrument.",
        formula="sum_v w_v m_v / sum_v w_v over venues with a two-sided book; "
                "m_v = mid_v + imbalance_weight * spread_v * f(I_v)",
    ))
