"""``multi_level_imbalance_mid``: mid + spread · f(Σ wᵢ Iᵢ), the imbalances of depth levels 1..n combined.

``factor_weights`` weights the levels differently inside the second factor of the two-factor shapes
(nonic, cubic_linear, shifted): the seed study's adjust_mid_price_8 is the shifted shape with
0.7/0.2/0.1 in its first factor and 0.7/0.3/0.1 in its second.
"""

from __future__ import annotations

from typing import Annotated

from numba import njit
from pydantic import Field, field_validator, model_validator

from quotelab import hookimpl
from quotelab.component import Asset, Component, PackContext, Params, Reads, Width, pack_fields, param_offsets
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
from quotelab.layout import ASK_SZ, BEST_ASK, BEST_BID, BID_SZ, MAX_LEVELS


class MultiLevelImbalanceMidParams(Params):
    asset: Asset = "quoted"
    weights: Annotated[tuple[float, ...], Width(MAX_LEVELS)] = Field(
        (0.7, 0.2, 0.1), description="Weight of each level's imbalance, best first.")
    shape: Shape = Field("linear", description="f: " + "; ".join(f"{k}: {v}" for k, v in SHAPE_FORMULAS.items()))
    coefficients: Coefficients = Field((), description="polynomial only: c0, c1, ... of f")
    factor_weights: tuple[float, ...] | None = Field(
        None, description="Level weights inside the second factor of nonic, cubic_linear or shifted (default: weights)."
    )
    empty_level: EmptyLevel = Field("zero", description=EMPTY_LEVEL_DOC)

    @field_validator("weights")
    @classmethod
    def _depth(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not 1 <= len(v) <= MAX_LEVELS:
            raise ValueError(f"between 1 and {MAX_LEVELS} levels expected, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _coefficients(self) -> MultiLevelImbalanceMidParams:
        if (self.shape == "polynomial") != bool(self.coefficients) or len(self.coefficients) > MAX_COEFFICIENTS:
            raise ValueError(f"coefficients (1..{MAX_COEFFICIENTS}) go with shape: polynomial, and only with it")
        if self.factor_weights is not None:
            if self.shape not in ("nonic", "cubic_linear", "shifted"):
                raise ValueError("factor_weights apply to the two-factor shapes only: nonic, cubic_linear, shifted")
            if len(self.factor_weights) != len(self.weights):
                raise ValueError(f"factor_weights needs one weight per level ({len(self.weights)}), "
                                 f"got {len(self.factor_weights)}")
        return self


# inner: the level weights of the second factor (factor_weights, or weights when not given).
P = param_offsets(MultiLevelImbalanceMidParams, inner=MAX_LEVELS)


def _pack(p: MultiLevelImbalanceMidParams, ctx: PackContext) -> list[float]:
    return pack_fields(p, ctx, inner=p.weights if p.factor_weights is None else p.factor_weights)


@njit(inline="always")
def multi_level_imbalance_mid_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    n = int(params[P.n_weights])
    imb = 0.0
    inner = 0.0
    for i in range(n):
        qb = view[a, BID_SZ + i]
        qa = view[a, ASK_SZ + i]
        x = level_imbalance_nb(qb, qa, params[P.empty_level])
        imb += params[P.weights + i] * x
        inner += params[P.inner + i] * x
    bid = view[a, BEST_BID]
    ask = view[a, BEST_ASK]
    f = imbalance_shape_nb(int(params[P.shape]), imb, params[P.coefficients:P.coefficients + MAX_COEFFICIENTS],
                           inner)
    return (bid + ask) / 2.0 + (ask - bid) * f


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="fair_value", name="multi_level_imbalance_mid", params=MultiLevelImbalanceMidParams,
        kernel=multi_level_imbalance_mid_nb, pack=_pack,
        reads=lambda p: Reads(assets=(p.asset,), depth_levels=len(p.weights)),
        doc="Mid adjusted by the weighted imbalance of several depth levels (seed: 0.7/0.2/0.1), through f.",
        formula="(bid + ask)/2 + (ask - bid) * f(sum_i w_i (Qb_i - Qa_i)/(Qb_i + Qa_i)); two-factor shapes take "
                "their second factor's imbalance with factor_weights",
    ))
