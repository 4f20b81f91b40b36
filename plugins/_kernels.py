"""Numba pieces shared by several built-in parts (not a plugin: it registers nothing).

Every function is ``inline="always"`` so the fused strategy kernel stays one flat function. The
composer's cache key follows a kernel module's imports, so an edit here recompiles its users.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab.component import Asset, Params, Reads
from quotelab.layout import (
    ASK_ENABLED,
    ASK_WIDEN_TICKS,
    BEST_ASK_TICK,
    BEST_BID_TICK,
    BID_ENABLED,
    BID_WIDEN_TICKS,
    LOT,
    MAX_POSITION,
    N_ASK,
    N_BID,
    N_TRADES,
    Q_ASK_QTY,
    Q_ASK_TICK,
    Q_BID_QTY,
    Q_BID_TICK,
    STEP_SECONDS,
    TICK,
    TR_PX,
    TR_QTY,
    TR_SIDE,
    TR_TIME,
)
from quotelab.layout import (
    BEST_ASK as BEST_ASK_PRICE,
)
from quotelab.layout import (
    BEST_BID as BEST_BID_PRICE,
)
from quotelab.units import Qty, Seconds, quantity

# Imbalance shapes f(I) of the imbalance-adjusted mid, mid + spread * f(I).
SHAPES: dict[str, int] = {"linear": 0, "cubic": 1, "nonic": 2, "cubic_linear": 3, "shifted": 4, "polynomial": 5}
SHAPE_FORMULAS: dict[str, str] = {
    "linear": "I/2 (the weighted mid)",
    "cubic": "I^3/2",
    "nonic": "I(I^8+1)/4",
    "cubic_linear": "I(I^2+1)/4",
    "shifted": "(I+0.3)(I^4+0.7)/3.8",
    "polynomial": "sum_j c_j I^j",
}
MAX_COEFFICIENTS = 10


@njit(inline="always")
def imbalance_shape_nb(shape, imb, coefs, inner):
    """f(I); ``inner`` is the imbalance in the second factor of nonic, cubic_linear and shifted (I itself,
    except where a part weights it differently, as the seed's adjust_mid_price_8 did)."""
    if shape == 0:
        return imb / 2.0
    if shape == 1:
        return imb ** 3 / 2.0
    if shape == 2:
        return imb * (inner ** 8 + 1.0) / 4.0
    if shape == 3:
        return imb * (inner ** 2 + 1.0) / 4.0
    if shape == 4:
        return (imb + 0.3) * (inner ** 4 + 0.7) / 3.8
    total = 0.0
    power = 1.0
    for j in range(len(coefs)):
        total += coefs[j] * power
        power *= imb
    return total


@njit(inline="always")
def level_imbalance_nb(qb, qa, empty):
    """(Qb − Qa)/(Qb + Qa); ``empty`` (0, or NaN for undefined as pandas' 0/0) on an empty level."""
    s = qb + qa
    return (qb - qa) / s if s > 0.0 else empty


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


@njit(inline="always")
def write_quotes_nb(view, a, out, bid_px, ask_px, size, levels, spacing, max_position):
    """Quotes at or behind the model prices: bid rounded down, ask up, never through the touch.

    Sizes are whole lots (a size under one lot quotes nothing); risk adjusters' widening and
    enabling flags in ``out`` apply.
    """
    tick = view[a, TICK]
    lot = view[a, LOT]
    qty = np.floor(size / lot + 1e-9) * lot
    bid = min(np.floor(bid_px / tick + 1e-9), view[a, BEST_BID_TICK]) - out[BID_WIDEN_TICKS]
    ask = max(np.ceil(ask_px / tick - 1e-9), view[a, BEST_ASK_TICK]) + out[ASK_WIDEN_TICKS]
    n = int(levels) if qty > 0.0 else 0
    for k in range(n):
        out[Q_BID_TICK + k] = bid - k * spacing
        out[Q_BID_QTY + k] = qty
        out[Q_ASK_TICK + k] = ask + k * spacing
        out[Q_ASK_QTY + k] = qty
    out[N_BID] = n if out[BID_ENABLED] != 0.0 else 0
    out[N_ASK] = n if out[ASK_ENABLED] != 0.0 else 0
    out[MAX_POSITION] = max_position


TRADE_FLOW_WEIGHTS = 8  # first of the four weight-sum slots of the trade-flow state
TRADE_FLOW_STATE_SIZE = 12


@njit(inline="always")
def _ewma_step_nb(state, i, w, x, alpha, adjust):
    # adjust: pandas' default ewm(adjust=True), the weighted mean of all observations with weights
    # (1-alpha)^age, which is the recursive form with gain 1/w, w = 1 + (1-alpha)·w_prev.
    if state[i] == state[i]:
        w1 = 1.0 + (1.0 - alpha) * state[w]
        g = 1.0 / w1 if adjust else alpha
        state[i] += g * (x - state[i])
        state[w] = w1
    else:
        state[i] = x
        state[w] = 1.0


@njit(inline="always")
def trade_flow_update_nb(view, trades, a, state, alpha, side_sign, adjust):
    """Fold this step's trades into per-side EWMAs.

    ``state`` = [last time buy, last time sell, interval EWMA buy, interval EWMA sell,
    qty EWMA buy, qty EWMA sell, (2 volume-rate slots), and the four EWMAs' weight sums]; NaN until
    observed. A trade is a buy when ``TR_SIDE * side_sign > 0`` (side_sign -1 takes the
    seller-initiated trades as buys). ``adjust`` selects pandas' adjusted EWMA over the recursive one.
    """
    for k in range(int(view[a, N_TRADES])):
        t = trades[a, k, TR_TIME]
        q = trades[a, k, TR_QTY]
        s = 0 if trades[a, k, TR_SIDE] * side_sign > 0.0 else 1
        last = state[s]
        if last == last:
            _ewma_step_nb(state, 2 + s, TRADE_FLOW_WEIGHTS + s, t - last, alpha, adjust)
        state[s] = t
        _ewma_step_nb(state, 4 + s, TRADE_FLOW_WEIGHTS + 2 + s, q, alpha, adjust)


# What trade_flow_value_nb returns: rate imbalance, size imbalance, volume imbalance, total arrival rate.
TF_OI = 0
TF_QI = 1
TF_VI = 2
TF_ARRIVAL_RATE = 3


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


VOL_STATE = (np.nan, 0.0, 0.0)  # previous mid, variance rate (price²/s), initialised flag


@njit(inline="always")
def sigma_ticks_nb(view, a, state, prior, half_life):
    """σ of asset ``a``'s mid in ticks per √second: ``prior`` if ``half_life`` is 0, else its EWMA from ``prior``."""
    if half_life <= 0.0:
        return prior
    tick = view[a, TICK]
    if state[2] == 0.0:
        state[1] = (prior * tick) ** 2
        state[2] = 1.0
    mid = (view[a, BEST_BID_PRICE] + view[a, BEST_ASK_PRICE]) / 2.0
    return ewma_variance_nb(state, mid, view[a, STEP_SECONDS], half_life) / tick


# Online fit of the fill intensity λ(δ) = A·exp(−k·δ) (δ in ticks from the mid) from trade arrivals, measured
# as hftbacktest's GLFT example does: a step's arrival depth is how far its deepest trade went past the
# previous step's mid, rounded to half ticks; a quote δ = j/2 ticks from the mid counts as reached when the
# depth is strictly beyond it (a quote at the trade's own price waits in the queue).
FIT_MAX_WINDOW = 36_000  # steps: an hour at 100 ms
FIT_MAX_TICKS = 50
# state: [previous mid (ticks), pushes, ring of per-step arrival depths (half ticks) ..., counts per δ = j/2]
FIT_RING = 2
FIT_COUNTS = FIT_RING + FIT_MAX_WINDOW
FIT_STATE_SIZE = FIT_COUNTS + 2 * FIT_MAX_TICKS


def fit_state() -> np.ndarray:
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


class ModelQuoterParams(Params):
    """What the model quoters (``avellaneda_stoikov``, ``glft``) share: γ, k, σ (constant or EWMA),
    sizing and limits, and the optional online fit from trade arrivals."""

    asset: Asset = "quoted"
    gamma: float = quantity("1/ticks", 0.1, "Risk aversion γ.", gt=0)
    k: float = quantity("1/ticks", 0.5, "Order-arrival decay k with distance from the mid.", gt=0)
    volatility: float = quantity("ticks/sqrt(s)", 1.0, "σ (or its prior), ticks per √second.", ge=0)
    volatility_half_life: Seconds = quantity("seconds", 0.0, "0: σ constant; > 0: EWMA half-life.", ge=0)
    position_unit: Qty = quantity("qty", 1.0, "q is the position in these units.", gt=0)
    size: Qty = quantity("qty", 1.0, "Order quantity (whole lots).", gt=0)
    max_position: Qty = quantity("qty", 1.0, "No new orders on a side once |position| reaches this.", ge=0)
    fit_window: int = quantity("steps", 0, "0: k constant; > 0: fitted from trades over this many steps.",
                               ge=0, le=FIT_MAX_WINDOW)
    fit_max_ticks: int = quantity("ticks", 20, "Fit λ(δ) at δ = 0.5, 1, ..., this many ticks from the mid.",
                                  ge=1, le=FIT_MAX_TICKS)


def model_quoter_state(p: ModelQuoterParams) -> np.ndarray:
    """σ's EWMA state, then the arrival fit's."""
    return np.concatenate([np.array(VOL_STATE), fit_state()])


def model_quoter_reads(p: ModelQuoterParams) -> Reads:
    return Reads(assets=(p.asset,), trades=p.fit_window > 0)


@njit(inline="always")
def arrival_fit_nb(view, trades, a, state, window, n_ticks):
    """Update the window with this step's arrival depth and return (A, k); (NaN, NaN) until 2 depths fit.

    The step's depth is the deeper of its buy and sell depths (:func:`arrival_depths_nb`);
    λ(δ) = (steps in the window whose depth is beyond δ) / (window steps · step seconds) at
    δ = 0.5, 1, ..., n_ticks; ln λ = ln A − k·δ is fitted by least squares (:func:`log_linear_fit_nb`),
    as ``quotelab calibrate`` does offline.
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
