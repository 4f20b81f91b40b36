"""``glft``: Guéant–Lehalle–Fernandez-Tapia quotes (no horizon) around the composed reservation s.

In ticks: c1 = (1/γ)·ln(1 + γ/k), ω = √(σ²γ/(2kA) · (1 + γ/k)^(1 + k/γ)); half spread c1 + ω/2 and
skew ω per unit of inventory: bid = s − (c1 + ω/2) − ω·q, ask = s + (c1 + ω/2) − ω·q.

With ``fit_window`` > 0, A and k are fitted online from trade arrivals at each distance from the
mid (see ``_kernels.arrival_fit_nb``) over that many steps; the constants stand in until a fit
exists (and whenever the fitted k is not positive).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab import hookimpl
from quotelab.component import Asset, Component, PackContext, Params, Reads
from quotelab.layout import POSITION, RESERVATION, TICK
from quotelab.plugins._kernels import (
    FIT_MAX_TICKS,
    FIT_MAX_WINDOW,
    VOL_STATE,
    arrival_fit_nb,
    fit_state,
    sigma_ticks_nb,
    write_quotes_nb,
)
from quotelab.units import Qty, Seconds, quantity


class GlftParams(Params):
    asset: Asset = "quoted"
    gamma: float = quantity("1/ticks", 0.05, "Risk aversion γ.", gt=0)
    k: float = quantity("1/ticks", 0.5, "Order-arrival decay k with distance from the mid.", gt=0)
    arrival_rate: float = quantity("1/s", 1.0, "A: order-arrival intensity at the mid.", gt=0)
    volatility: float = quantity("ticks/sqrt(s)", 1.0, "σ (or its prior), ticks per √second.", ge=0)
    volatility_half_life: Seconds = quantity("seconds", 0.0, "0: σ constant; > 0: EWMA half-life.", ge=0)
    position_unit: Qty = quantity("qty", 1.0, "q is the position in these units.", gt=0)
    size: Qty = quantity("qty", 1.0, "Order quantity (whole lots).", gt=0)
    max_position: Qty = quantity("qty", 1.0, "No new orders on a side once |position| reaches this.", ge=0)
    fit_window: int = quantity("steps", 0, "0: A and k constant; > 0: fitted from trades over this many steps.",
                               ge=0, le=FIT_MAX_WINDOW)
    fit_max_ticks: int = quantity("ticks", 20, "Fit λ(d) at d = 1..this many ticks from the mid.", ge=2,
                                  le=FIT_MAX_TICKS)


def _pack(p: GlftParams, ctx: PackContext) -> list[float]:
    return [float(ctx.asset_index[p.asset]), p.gamma, p.k, p.arrival_rate, p.volatility, p.volatility_half_life,
            p.position_unit, p.size, p.max_position, float(p.fit_window), float(p.fit_max_ticks)]


def _state(p: GlftParams) -> np.ndarray:
    return np.concatenate([np.array(VOL_STATE), fit_state()])


@njit(inline="always")
def glft_nb(view, trades, state, params, out):
    a = int(params[0])
    tick = view[a, TICK]
    gamma = params[1]
    k = params[2]
    big_a = params[3]
    if params[9] > 0.0:
        fa, fk = arrival_fit_nb(view, trades, a, state[3:], params[9], params[10])
        if fa == fa and fk > 0.0:
            big_a = fa
            k = fk
    sigma = sigma_ticks_nb(view, a, state[:3], params[4], params[5])
    c1 = np.log(1.0 + gamma / k) / gamma
    omega = np.sqrt(sigma * sigma * gamma / (2.0 * k * big_a) * (1.0 + gamma / k) ** (1.0 + k / gamma))
    q = view[a, POSITION] / params[6]
    s = out[RESERVATION]
    half = c1 + omega / 2.0
    write_quotes_nb(view, a, out, s - (half + omega * q) * tick, s + (half - omega * q) * tick, params[7], 1.0,
                    1.0, params[8])
    return s - omega * q * tick


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="quoter", name="glft", params=GlftParams, kernel=glft_nb, pack=_pack, state=_state,
        reads=lambda p: Reads(assets=(p.asset,), trades=p.fit_window > 0),
        doc="GLFT closed-form quotes: half spread c1 + omega/2 and inventory skew omega (ticks); returns the "
            "skewed centre.",
        formula="c1 = ln(1 + g/k)/g; omega = sqrt(s^2 g/(2kA) (1 + g/k)^(1 + k/g)); bid/ask = s -/+ (c1 + omega/2) "
                "- omega*q",
    ))
