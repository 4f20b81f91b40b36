"""Fit of the fill intensity λ(δ) = A·exp(−k·δ) (δ in ticks from the mid) from trade arrivals.

Measured as hftbacktest's GLFT example does: a step's arrival depth is how far its deepest trade went past
the previous step's mid, rounded to half ticks; a quote δ = j/2 ticks from the mid counts as reached when
the depth is strictly beyond it (a quote at the trade's own price waits in the queue). ``quotelab
calibrate`` fits a whole day offline; :func:`arrival_fit_nb` fits a window of steps online.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab.layout import BEST_ASK_TICK, BEST_BID_TICK, N_TRADES, STEP_SECONDS, TICK, TR_PX, TR_SIDE

FIT_MAX_WINDOW = 36_000  # steps: an hour at 100 ms
FIT_MAX_TICKS = 50
# state: [previous mid (ticks), pushes, ring of per-step arrival depths (half ticks) ..., counts per δ = j/2]
FIT_RING = 2
FIT_COUNTS = FIT_RING + FIT_MAX_WINDOW
FIT_STATE_SIZE = FIT_COUNTS + 2 * FIT_MAX_TICKS


def fit_state() -> np.ndarray:
    """The initial state of :func:`arrival_fit_nb`."""
    s = np.zeros(FIT_STATE_SIZE)
    s[0] = np.nan
    return s


@njit(inline="always")
def arrival_depths_nb(view, trades, a, prev_mid_ticks):
    """This step's deepest buy and sell trade beyond ``prev_mid_ticks``, in half ticks (−1: none).

    A buyer-initiated trade's depth is price/tick − mid; a seller-initiated one's mid − price/tick.
    """
    tick = view[a, TICK]
    buy = -np.inf
    sell = -np.inf
    if prev_mid_ticks == prev_mid_ticks:
        for j in range(int(view[a, N_TRADES])):
            d = trades[a, j, TR_PX] / tick - prev_mid_ticks
            if trades[a, j, TR_SIDE] > 0.0:
                buy = max(buy, d)
            else:
                sell = max(sell, -d)
    hb = float(np.round(2.0 * buy)) if buy > -np.inf else -1.0
    hs = float(np.round(2.0 * sell)) if sell > -np.inf else -1.0
    return hb, hs


@njit(inline="always")
def log_linear_fit_nb(counts, n_points, seconds):
    """Least squares of ln(counts[j−1]/seconds) on δ = j/2, j = 1..n_points, over the j with a count.

    Returns (A, k, R², points used); (NaN, NaN, NaN, points) with fewer than 2 points, k = 0 when every
    count is equal.
    """
    sx = 0.0
    sy = 0.0
    sxx = 0.0
    sxy = 0.0
    syy = 0.0
    m = 0
    c_lo = np.inf
    c_hi = 0.0
    for j in range(1, int(n_points) + 1):
        c = counts[j - 1]
        if c > 0.0:
            c_lo = min(c_lo, c)
            c_hi = max(c_hi, c)
            x = 0.5 * j
            y = np.log(c / seconds)
            sx += x
            sy += y
            sxx += x * x
            sxy += x * y
            syy += y * y
            m += 1
    if m < 2:
        return np.nan, np.nan, np.nan, m
    if c_lo == c_hi:  # a flat curve: k is 0, not a rounding residue whose sign would pick the spread
        return c_lo / seconds, 0.0, np.nan, m
    vx = m * sxx - sx * sx
    vy = m * syy - sy * sy
    cxy = m * sxy - sx * sy
    slope = cxy / vx
    intercept = (sy - slope * sx) / m
    r2 = cxy * cxy / (vx * vy)
    return np.exp(intercept), -slope, r2, m


@njit(inline="always")
def arrival_fit_nb(view, trades, a, state, window, n_ticks):
    """Update the window with this step's arrival depth and return (A, k); (NaN, NaN) until 2 depths fit.

    The step's depth is the deeper of its buy and sell depths (:func:`arrival_depths_nb`);
    λ(δ) = (steps in the window whose depth is beyond δ) / (window steps · step seconds) at
    δ = 0.5, 1, ..., n_ticks; ln λ = ln A − k·δ is fitted by least squares (:func:`log_linear_fit_nb`),
    as ``quotelab calibrate`` does offline. ``state`` starts as :func:`fit_state`.
    """
    hb, hs = arrival_depths_nb(view, trades, a, state[0])
    depth = max(hb, hs)
    state[0] = (view[a, BEST_BID_TICK] + view[a, BEST_ASK_TICK]) / 2.0
    w = int(window)
    n = int(state[1])
    n_half = 2 * int(n_ticks)
    slot = FIT_RING + n % w
    if n >= w:
        old = state[slot]
        for j in range(1, n_half + 1):
            if old > j:
                state[FIT_COUNTS + j - 1] -= 1.0
    state[slot] = depth
    for j in range(1, n_half + 1):
        if depth > j:
            state[FIT_COUNTS + j - 1] += 1.0
    state[1] = n + 1
    steps = min(n + 1, w)
    dt = view[a, STEP_SECONDS]
    if not dt > 0.0:
        return np.nan, np.nan
    fa, fk, _, _ = log_linear_fit_nb(state[FIT_COUNTS:FIT_COUNTS + n_half], n_half, steps * dt)
    return fa, fk
