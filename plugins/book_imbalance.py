"""``book_imbalance``: weighted order-book imbalance over depth levels 0..n-1."""

from __future__ import annotations

from numba import njit
from pydantic import Field, field_validator

from quotelab import hookimpl
from quotelab.component import Asset, Component, PackContext, Params, Reads
from quotelab.layout import ASK_SZ, BID_SZ, MAX_LEVELS


class BookImbalanceParams(Params):
    asset: Asset = "quoted"
    weights: tuple[float, ...] = Field(
        (1.0,), description="Weight of each depth level's imbalance, best level first; its length is the depth."
    )

    @field_validator("weights")
    @classmethod
    def _depth(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not 1 <= len(v) <= MAX_LEVELS:
            raise ValueError(f"between 1 and {MAX_LEVELS} levels expected, got {len(v)}")
        return v


def _pack(p: BookImbalanceParams, ctx: PackContext) -> list[float]:
    # Padding to MAX_LEVELS keeps the params size fixed, so sweeping the depth never recompiles.
    w = list(p.weights) + [0.0] * (MAX_LEVELS - len(p.weights))
    return [float(ctx.asset_index[p.asset]), float(len(p.weights)), *w]


@njit(inline="always")
def book_imbalance_nb(view, trades, state, params, out):
    a = int(params[0])
    n = int(params[1])
    total = 0.0
    for i in range(n):
        qb = view[a, BID_SZ + i]
        qa = view[a, ASK_SZ + i]
        s = qb + qa
        imb = (qb - qa) / s if s > 0.0 else 0.0
        total += params[2 + i] * imb
    return total


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="book_imbalance", params=BookImbalanceParams, kernel=book_imbalance_nb,
        pack=_pack, reads=lambda p: Reads(assets=(p.asset,), depth_levels=len(p.weights)),
        doc="Order-book imbalance, weighted over depth levels (0 where a level is empty on both sides).",
        formula="sum_i w_i * (Qb_i - Qa_i) / (Qb_i + Qa_i)",
    ))
