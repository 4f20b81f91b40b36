"""Quotes written into ``out`` from model prices, and what the model quoters (avellaneda_stoikov, glft) share."""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab.component import Asset, Params, Reads
from quotelab.kernels.arrival_fit import FIT_MAX_TICKS, FIT_MAX_WINDOW, fit_state
from quotelab.kernels.ewma import VOL_STATE
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
    Q_ASK_QTY,
    Q_ASK_TICK,
    Q_BID_QTY,
    Q_BID_TICK,
    TICK,
)
from quotelab.units import Qty, Seconds, quantity


@njit(inline="always")
def place_levels_nb(view, a, out, bid, ask, qty, n, spacing, max_position):
    """``n`` levels a side from the tick prices ``bid``/``ask``, each ``spacing`` ticks further out.

    The first level never goes through the touch (a post-only quote there would be rejected or take);
    risk adjusters' widening and enabling flags in ``out`` apply.
    """
    bid = min(bid, view[a, BEST_BID_TICK]) - out[BID_WIDEN_TICKS]
    ask = max(ask, view[a, BEST_ASK_TICK]) + out[ASK_WIDEN_TICKS]
    for k in range(n):
        out[Q_BID_TICK + k] = bid - k * spacing
        out[Q_BID_QTY + k] = qty
        out[Q_ASK_TICK + k] = ask + k * spacing
        out[Q_ASK_QTY + k] = qty
    out[N_BID] = n if out[BID_ENABLED] != 0.0 else 0
    out[N_ASK] = n if out[ASK_ENABLED] != 0.0 else 0
    out[MAX_POSITION] = max_position


@njit(inline="always")
def write_quotes_nb(view, a, out, bid_px, ask_px, size, levels, spacing, max_position):
    """Quotes at or behind the model prices: bid rounded down, ask up, never through the touch.

    Sizes are whole lots (a size under one lot quotes nothing).
    """
    tick = view[a, TICK]
    lot = view[a, LOT]
    qty = np.floor(size / lot + 1e-9) * lot
    n = int(levels) if qty > 0.0 else 0
    place_levels_nb(view, a, out, np.floor(bid_px / tick + 1e-9), np.ceil(ask_px / tick - 1e-9), qty, n, spacing,
                    max_position)


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
    """σ's EWMA state (state[:3]), then the arrival fit's (state[3:])."""
    return np.concatenate([np.array(VOL_STATE), fit_state()])


def model_quoter_reads(p: ModelQuoterParams) -> Reads:
    return Reads(assets=(p.asset,), trades=p.fit_window > 0)
