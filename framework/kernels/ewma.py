"""Exponentially weighted moving averages: one step, the slots of per-event flows, and σ of a mid over time."""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab.layout import BEST_ASK, BEST_BID, STEP_SECONDS, TICK


@njit(inline="always")
def ewma_nb(value, x, alpha):
    """One recursive EWMA step: ``alpha`` of the new observation ``x``, the rest of ``value``."""
    return alpha * x + (1.0 - alpha) * value


@njit(inline="always")
def ewma_slot_nb(state, i, w, x, alpha, adjust):
    """Fold ``x`` into the EWMA ``state[i]`` (NaN: not started; the first ``x`` starts it), weight sum in ``state[w]``.

    ``adjust``: pandas' default ewm(adjust=True), the weighted mean of all observations with weights
    (1-alpha)^age, which is the recursive form with gain 1/w, w = 1 + (1-alpha)·w_prev; else the recursive
    form with gain alpha (pandas adjust=False).
    """
    if state[i] == state[i]:
        w1 = 1.0 + (1.0 - alpha) * state[w]
        g = 1.0 / w1 if adjust else alpha
        state[i] += g * (x - state[i])
        state[w] = w1
    else:
        state[i] = x
        state[w] = 1.0


@njit(inline="always")
def ewma_variance_nb(state, mid, dt, half_life):
    """Update ``state = [previous mid, variance rate]`` with this step's mid; return σ.

    The variance rate is an EWMA, over time with ``half_life`` seconds, of (Δmid)²/Δt, so σ is in
    price per √second whatever the step. ``state[1]`` starts at the prior σ² given by the part.
    """
    prev = state[0]
    if dt > 0.0 and prev == prev and mid == mid:
        x = (mid - prev) ** 2 / dt
        w = 1.0 - 0.5 ** (dt / half_life)
        state[1] += w * (x - state[1])
    state[0] = mid
    return np.sqrt(state[1])


VOL_STATE = (np.nan, 0.0, 0.0)  # previous mid, variance rate (price²/s), initialised flag


@njit(inline="always")
def sigma_ticks_nb(view, a, state, prior, half_life):
    """σ of asset ``a``'s mid in ticks per √second: ``prior`` if ``half_life`` is 0, else its EWMA from ``prior``.

    ``state`` starts as :data:`VOL_STATE`.
    """
    if half_life <= 0.0:
        return prior
    tick = view[a, TICK]
    if state[2] == 0.0:
        state[1] = (prior * tick) ** 2
        state[2] = 1.0
    mid = (view[a, BEST_BID] + view[a, BEST_ASK]) / 2.0
    return ewma_variance_nb(state, mid, view[a, STEP_SECONDS], half_life) / tick
