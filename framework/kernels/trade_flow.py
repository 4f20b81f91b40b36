"""Per-side trade flow: EWMAs of trade intervals and sizes, and the imbalances and rate read from them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from numba import njit

from quotelab.component import Encode
from quotelab.kernels.ewma import ewma_slot_nb
from quotelab.layout import N_TRADES, TR_QTY, TR_SIDE, TR_TIME

# state: [last time buy, last time sell, interval EWMA buy, interval EWMA sell, qty EWMA buy, qty EWMA sell,
# 2 slots a part may use (trade_flow_imbalance's volume rates), the four EWMAs' weight sums]
TRADE_FLOW_WEIGHTS = 8
TRADE_FLOW_STATE_SIZE = 12

# What trade_flow_value_nb returns: rate imbalance, size imbalance, volume imbalance, total arrival rate.
TF_OI = 0
TF_QI = 1
TF_VI = 2
TF_ARRIVAL_RATE = 3

# Params field types of the parts that use these kernels. A trade is a buy when its TR_SIDE times the
# packed side is positive.
Side = Annotated[Literal["aggressor", "buyer_is_maker"], Encode(aggressor=1.0, buyer_is_maker=-1.0)]
Warmup = Annotated[Literal["zero", "undefined"], Encode(zero=0.0, undefined=float("nan"))]
ADJUST_DOC = ("false: recursive EWMA from the first observation (pandas adjust=False); true: pandas' default "
              "adjusted EWMA, weights (1-alpha)^age normalised (the seed study's).")
WARMUP_DOC = ("Value before both sides have a trade interval: 0, or undefined (NaN: a strategy stops or skips, "
              "evaluate leaves the row out and counts it).")


def trade_flow_state(p: Any) -> np.ndarray:
    """A part's initial state (``p``, its params, is unused): every EWMA and time not yet observed."""
    return np.full(TRADE_FLOW_STATE_SIZE, np.nan)


@njit(inline="always")
def trade_flow_update_nb(view, trades, a, state, alpha, side_sign, adjust):
    """Fold this step's trades into per-side EWMAs.

    ``state`` (:func:`trade_flow_state`) = [last time buy, last time sell, interval EWMA buy, interval EWMA
    sell, qty EWMA buy, qty EWMA sell, (2 slots for the part), and the four EWMAs' weight sums]; NaN until
    observed. A trade is a buy when ``TR_SIDE * side_sign > 0`` (side_sign -1 takes the
    seller-initiated trades as buys). ``adjust`` selects pandas' adjusted EWMA over the recursive one.
    """
    for k in range(int(view[a, N_TRADES])):
        t = trades[a, k, TR_TIME]
        q = trades[a, k, TR_QTY]
        s = 0 if trades[a, k, TR_SIDE] * side_sign > 0.0 else 1
        last = state[s]
        if last == last:
            ewma_slot_nb(state, 2 + s, TRADE_FLOW_WEIGHTS + s, t - last, alpha, adjust)
        state[s] = t
        ewma_slot_nb(state, 4 + s, TRADE_FLOW_WEIGHTS + 2 + s, q, alpha, adjust)


@njit(inline="always")
def trade_flow_value_nb(state, output, warmup):
    """``output``: TF_OI rate imbalance, TF_QI size imbalance, TF_VI volume imbalance, TF_ARRIVAL_RATE total rate.

    ``warmup`` (0, or NaN for "undefined") until both sides have an interval EWMA above zero.
    """
    ib = state[2]
    isell = state[3]
    if not (ib > 0.0 and isell > 0.0):
        return warmup
    lb = 1.0 / ib
    ls = 1.0 / isell
    if output == TF_OI:
        return (lb - ls) / (lb + ls)
    if output == TF_QI:
        return (state[4] - state[5]) / (state[4] + state[5])
    if output == TF_VI:
        vb = lb * state[4]
        vs = ls * state[5]
        return (vb - vs) / (vb + vs)
    return lb + ls
