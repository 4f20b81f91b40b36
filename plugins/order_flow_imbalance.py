"""``order_flow_imbalance``: Cont–Kukanov–Stoikov OFI summed over a window of steps.

Per level i, between consecutive steps: e = 1{Pb ≥ Pb'}Qb − 1{Pb ≤ Pb'}Qb' − 1{Pa ≤ Pa'}Qa + 1{Pa ≥ Pa'}Qa'
(primes: the previous step). The step's e is Σ wᵢ eᵢ over the levels; the output sums it over the
last ``window`` steps and, with ``depth_scaled``, divides by the mean over the same steps of the
depth D = mean over the levels of (Qb + Qa)/2. 0 on the first step.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from numba import njit
from pydantic import Field, field_validator

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, Reads, Width, param_offsets
from quotelab.layout import ASK_PX, ASK_SZ, BID_PX, BID_SZ
from quotelab.units import quantity

MAX_OFI_LEVELS = 10
RING = 128
# state: [started, count, prev Pb, Qb, Pa, Qa per level..., e ring, depth ring]
_PREV = 2
_E = _PREV + 4 * MAX_OFI_LEVELS
_D = _E + RING
STATE_SIZE = _D + RING


class OrderFlowImbalanceParams(Params):
    asset: Asset = "quoted"
    weights: Annotated[tuple[float, ...], Width(MAX_OFI_LEVELS)] = Field(
        (1.0,), description="Weight of each level's OFI, best level first.")
    window: int = quantity("steps", 10, "Sum over this many steps.", ge=1, le=RING)
    depth_scaled: bool = Field(False, description="Divide by the window's mean depth.")

    @field_validator("weights")
    @classmethod
    def _depth(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not 1 <= len(v) <= MAX_OFI_LEVELS:
            raise ValueError(f"between 1 and {MAX_OFI_LEVELS} levels expected, got {len(v)}")
        return v


P = param_offsets(OrderFlowImbalanceParams)


@njit(inline="always")
def order_flow_imbalance_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    n = int(params[P.n_weights])
    e = 0.0
    depth = 0.0
    for i in range(n):
        pb = view[a, BID_PX + i]
        qb = view[a, BID_SZ + i]
        pa = view[a, ASK_PX + i]
        qa = view[a, ASK_SZ + i]
        j = _PREV + 4 * i
        if state[0] != 0.0:
            ei = 0.0
            if pb >= state[j]:
                ei += qb
            if pb <= state[j]:
                ei -= state[j + 1]
            if pa <= state[j + 2]:
                ei -= qa
            if pa >= state[j + 2]:
                ei += state[j + 3]
            e += params[P.weights + i] * ei
        depth += (qb + qa) / 2.0
        state[j] = pb
        state[j + 1] = qb
        state[j + 2] = pa
        state[j + 3] = qa
    if state[0] == 0.0:
        state[0] = 1.0
        return 0.0
    c = int(state[1])
    state[_E + c % RING] = e
    state[_D + c % RING] = depth / n
    c += 1
    state[1] = c
    m = min(c, int(params[P.window]))
    total = 0.0
    dsum = 0.0
    for k in range(m):
        total += state[_E + (c - 1 - k) % RING]
        dsum += state[_D + (c - 1 - k) % RING]
    if params[P.depth_scaled] != 0.0:
        return total / (dsum / m) if dsum > 0.0 else 0.0
    return total


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="order_flow_imbalance", params=OrderFlowImbalanceParams,
        kernel=order_flow_imbalance_nb, state=lambda p: np.zeros(STATE_SIZE),
        reads=lambda p: Reads(assets=(p.asset,), depth_levels=len(p.weights)),
        doc="Cont-Kukanov-Stoikov order-flow imbalance over a window of steps, optionally multi-level and "
            "scaled by depth.",
        formula="sum over window of sum_i w_i e_i; e = 1{Pb>=Pb'}Qb - 1{Pb<=Pb'}Qb' - 1{Pa<=Pa'}Qa + 1{Pa>=Pa'}Qa'",
    ))
