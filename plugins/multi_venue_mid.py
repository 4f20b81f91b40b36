"""``multi_venue_mid``: a weighted combination of several assets' (imbalance-adjusted) mids.

Binance COIN-M (inverse) contracts are quoted in USD per coin like the linear ones, so their mids
combine directly; what differs for an inverse contract is its PnL, which the engine handles.
An asset whose book is one-sided this step is left out and the weights of the others renormalised.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from pydantic import Field, model_validator

from quotelab import hookimpl
from quotelab.component import Component, PackContext, Params, Reads
from quotelab.layout import ASK_QTY, BEST_ASK, BEST_BID, BID_QTY
from quotelab.plugins._kernels import MAX_COEFFICIENTS, SHAPE_FORMULAS, imbalance_shape_nb
from quotelab.plugins.weighted_mid import Shape, pack_shape

MAX_VENUES = 8


class MultiVenueMidParams(Params):
    assets: tuple[str, ...] = Field(description="Assets of data.assets whose mids are combined.")
    weights: tuple[float, ...] = Field(description="One weight per asset (normalised over available assets).")
    shape: Shape = Field("linear", description="Each asset's mid is mid + spread·f(I)·imbalance_weight; f: "
                         + "; ".join(f"{k}: {v}" for k, v in SHAPE_FORMULAS.items()))
    imbalance_weight: float = Field(0.0, description="0 combines plain mids; 1 combines the shape-adjusted mids.")
    coefficients: tuple[float, ...] = Field((), description="polynomial only: c0, c1, ... of f")

    @model_validator(mode="after")
    def _check(self) -> MultiVenueMidParams:
        if not 1 <= len(self.assets) <= MAX_VENUES or len(self.weights) != len(self.assets):
            raise ValueError(f"give 1..{MAX_VENUES} assets and one weight per asset")
        if any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        if (self.shape == "polynomial") != bool(self.coefficients):
            raise ValueError("coefficients go with shape: polynomial, and only with it")
        return self


def _pack(p: MultiVenueMidParams, ctx: PackContext) -> list[float]:
    idx = [float(ctx.asset_index[a]) for a in p.assets] + [0.0] * (MAX_VENUES - len(p.assets))
    w = list(p.weights) + [0.0] * (MAX_VENUES - len(p.weights))
    return [float(len(p.assets)), *idx, *w, p.imbalance_weight, *pack_shape(p.shape, p.coefficients)]


@njit(inline="always")
def multi_venue_mid_nb(view, trades, state, params, out):
    n = int(params[0])
    j = 1 + 2 * MAX_VENUES
    adj = params[j]
    shape = int(params[j + 1])
    total = 0.0
    wsum = 0.0
    for i in range(n):
        a = int(params[1 + i])
        w = params[1 + MAX_VENUES + i]
        bid = view[a, BEST_BID]
        ask = view[a, BEST_ASK]
        if not (bid == bid and ask == ask) or w == 0.0:
            continue
        qb = view[a, BID_QTY]
        qa = view[a, ASK_QTY]
        s = qb + qa
        imb = (qb - qa) / s if s > 0.0 else 0.0
        fv = (bid + ask) / 2.0
        if adj != 0.0:
            fv += adj * (ask - bid) * imbalance_shape_nb(shape, imb, params[j + 2:j + 2 + MAX_COEFFICIENTS], imb)
        total += w * fv
        wsum += w
    return total / wsum if wsum > 0.0 else np.nan


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="fair_value", name="multi_venue_mid", params=MultiVenueMidParams, kernel=multi_venue_mid_nb,
        pack=_pack, reads=lambda p: Reads(assets=tuple(p.assets)),
        doc="Weighted mids of several venues/contracts (e.g. USD-M, spot, COIN-M) for one instrument.",
        formula="sum_v w_v m_v / sum_v w_v over venues with a two-sided book; "
                "m_v = mid_v + imbalance_weight * spread_v * f(I_v)",
    ))
