"""``weighted_mid``: the imbalance-adjusted mid, mid + spread · f(I), I the top-of-book imbalance.

f is a parameter: ``linear`` (I/2, the classic weighted mid), the seed study's ``cubic`` (I³/2),
``nonic`` (I(I⁸+1)/4), ``cubic_linear`` (I(I²+1)/4), ``shifted`` ((I+0.3)(I⁴+0.7)/3.8), or a
``polynomial`` with coefficients c0, c1, ... of I⁰, I¹, ...
"""

from __future__ import annotations

from numba import njit
from pydantic import Field, model_validator

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, param_offsets
from quotelab.kernels.imbalance import (
    EMPTY_LEVEL_DOC,
    MAX_COEFFICIENTS,
    SHAPE_FORMULAS,
    Coefficients,
    EmptyLevel,
    Shape,
    imbalance_shape_nb,
    level_imbalance_nb,
)
from quotelab.layout import ASK_QTY, BEST_ASK, BEST_BID, BID_QTY


class WeightedMidParams(Params):
    asset: Asset = "quoted"
    shape: Shape = Field("linear", description="f(I): " + "; ".join(f"{k}: {v}" for k, v in SHAPE_FORMULAS.items()))
    coefficients: Coefficients = Field(
        (), description=f"polynomial only: c0, c1, ... (at most {MAX_COEFFICIENTS}) of f(I) = sum c_j I^j"
    )
    empty_level: EmptyLevel = Field("zero", description=EMPTY_LEVEL_DOC)

    @model_validator(mode="after")
    def _coefficients(self) -> WeightedMidParams:
        if self.shape == "polynomial" and not 1 <= len(self.coefficients) <= MAX_COEFFICIENTS:
            raise ValueError(f"shape polynomial needs 1..{MAX_COEFFICIENTS} coefficients")
        if self.shape != "polynomial" and self.coefficients:
            raise ValueError("coefficients apply to shape: polynomial only")
        return self


P = param_offsets(WeightedMidParams)


@njit(inline="always")
def weighted_mid_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    bid = view[a, BEST_BID]
    ask = view[a, BEST_ASK]
    qb = view[a, BID_QTY]
    qa = view[a, ASK_QTY]
    imb = level_imbalance_nb(qb, qa, params[P.empty_level])
    f = imbalance_shape_nb(int(params[P.shape]), imb, params[P.coefficients:P.coefficients + MAX_COEFFICIENTS], imb)
    return (bid + ask) / 2.0 + (ask - bid) * f


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="fair_value", name="weighted_mid", params=WeightedMidParams, kernel=weighted_mid_nb,
        doc="Imbalance-adjusted mid: mid plus the spread times a shape of the top-of-book imbalance.",
        formula="(bid + ask)/2 + (ask - bid) * f(I), I = (Qb - Qa)/(Qb + Qa) (empty top: empty_level)",
    ))
