"""``book_imbalance``: weighted order-book imbalance over depth levels 0..n-1."""

from __future__ import annotations

from typing import Annotated

from numba import njit
from pydantic import Field, field_validator

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, Reads, Width, param_offsets
from quotelab.kernels.imbalance import level_imbalance_nb
from quotelab.layout import ASK_SZ, BID_SZ, MAX_LEVELS


class BookImbalanceParams(Params):
    asset: Asset = "quoted"
    # Padded to MAX_LEVELS: the params size stays fixed, so sweeping the depth never recompiles.
    weights: Annotated[tuple[float, ...], Width(MAX_LEVELS)] = Field(
        (1.0,), description="Weight of each depth level's imbalance, best level first; its length is the depth."
    )

    @field_validator("weights")
    @classmethod
    def _depth(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not 1 <= len(v) <= MAX_LEVELS:
            raise ValueError(f"between 1 and {MAX_LEVELS} levels expected, got {len(v)}")
        return v


P = param_offsets(BookImbalanceParams)


@njit(inline="always")
def book_imbalance_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    n = int(params[P.n_weights])
    total = 0.0
    for i in range(n):
        imb = level_imbalance_nb(view[a, BID_SZ + i], view[a, ASK_SZ + i], 0.0)
        total += params[P.weights + i] * imb
    return total


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="book_imbalance", params=BookImbalanceParams, kernel=book_imbalance_nb,
        reads=lambda p: Reads(assets=(p.asset,), depth_levels=len(p.weights)),
        doc="Order-book imbalance, weighted over depth levels (0 where a level is empty on both sides).",
        formula="sum_i w_i * (Qb_i - Qa_i) / (Qb_i + Qa_i)",
    ))
