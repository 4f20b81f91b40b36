"""``composite_imbalance``: the seed's CI = −1.5·VI(previous step) + 0.7·(0.7·I₁ + 0.2·I₂ + 0.1·I₃)³.

Generalised: ``vi_weight``·VI(previous) + ``book_weight``·B^``exponent`` with B = Σ wᵢ Iᵢ over depth
levels (an integer exponent is a plain power; any other keeps B's sign: sign(B)|B|^p). VI is the
``trade_flow_imbalance`` VI with the same alpha and side convention, taken before this step's trades.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from numba import njit
from pydantic import Field, field_validator

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, Reads, Width, param_offsets
from quotelab.kernels.imbalance import EMPTY_LEVEL_DOC, EmptyLevel, level_imbalance_nb
from quotelab.kernels.trade_flow import (
    ADJUST_DOC,
    TF_VI,
    WARMUP_DOC,
    Side,
    Warmup,
    trade_flow_state,
    trade_flow_update_nb,
    trade_flow_value_nb,
)
from quotelab.layout import ASK_SZ, BID_SZ, MAX_LEVELS


class CompositeImbalanceParams(Params):
    asset: Asset = "quoted"
    vi_weight: float = Field(-1.5, description="Weight of the previous step's VI.")
    book_weight: float = Field(0.7, description="Weight of the powered book imbalance.")
    weights: Annotated[tuple[float, ...], Width(MAX_LEVELS)] = Field(
        (0.7, 0.2, 0.1), description="Depth-level weights of the book imbalance.")
    exponent: float = Field(3.0, gt=0, description="Power applied to the weighted book imbalance.")
    alpha: float = Field(0.1, gt=0, le=1, description="EWMA weight of each new trade (VI).")
    side: Side = Field("aggressor", description="Which trades count as buys.")
    warmup: Warmup = Field("zero", description=WARMUP_DOC)
    adjust: bool = Field(False, description=ADJUST_DOC)
    empty_level: EmptyLevel = Field("zero", description=EMPTY_LEVEL_DOC)

    @field_validator("weights")
    @classmethod
    def _depth(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not 1 <= len(v) <= MAX_LEVELS:
            raise ValueError(f"between 1 and {MAX_LEVELS} levels expected, got {len(v)}")
        return v


P = param_offsets(CompositeImbalanceParams)


@njit(inline="always")
def composite_imbalance_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    vi = trade_flow_value_nb(state, TF_VI, params[P.warmup])
    trade_flow_update_nb(view, trades, a, state, params[P.alpha], params[P.side], params[P.adjust] != 0.0)
    book = 0.0
    for i in range(int(params[P.n_weights])):
        qb = view[a, BID_SZ + i]
        qa = view[a, ASK_SZ + i]
        book += params[P.weights + i] * level_imbalance_nb(qb, qa, params[P.empty_level])
    p = params[P.exponent]
    powered = book ** p if p == np.floor(p) else np.sign(book) * np.abs(book) ** p
    return params[P.vi_weight] * vi + params[P.book_weight] * powered


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="composite_imbalance", params=CompositeImbalanceParams, kernel=composite_imbalance_nb,
        state=trade_flow_state,
        reads=lambda p: Reads(assets=(p.asset,), depth_levels=len(p.weights), trades=True),
        doc="The seed study's composite imbalance: shifted trade-flow VI plus a powered multi-level book imbalance.",
        formula="vi_weight * VI_{t-1} + book_weight * (sum_i w_i I_i)^exponent",
    ))
