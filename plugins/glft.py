"""``glft``: Guéant–Lehalle–Fernandez-Tapia quotes (no horizon) around the composed reservation s.

In ticks: c1 = (1/γ)·ln(1 + γ/k), ω = √(σ²γ/(2kA) · (1 + γ/k)^(1 + k/γ)); half spread c1 + ω/2 and
skew ω per unit of inventory: bid = s − (c1 + ω/2) − ω·q, ask = s + (c1 + ω/2) − ω·q.

With ``fit_window`` > 0, A and k are fitted online from trade arrivals at each distance from the
mid (see ``quotelab.kernels.arrival_fit.arrival_fit_nb``) over that many steps; the constants stand in until a fit
exists (and whenever the fitted k is not positive).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab import hookimpl
from quotelab.component import Component, param_offsets
from quotelab.kernels.arrival_fit import FIT_MAX_WINDOW, arrival_fit_nb
from quotelab.kernels.ewma import sigma_ticks_nb
from quotelab.kernels.quotes import ModelQuoterParams, model_quoter_reads, model_quoter_state, write_quotes_nb
from quotelab.layout import POSITION, RESERVATION, TICK
from quotelab.units import quantity


class GlftParams(ModelQuoterParams):
    gamma: float = quantity("1/ticks", 0.05, "Risk aversion γ.", gt=0)
    arrival_rate: float = quantity("1/s", 1.0, "A: order-arrival intensity at the mid.", gt=0)
    fit_window: int = quantity("steps", 0, "0: A and k constant; > 0: fitted from trades over this many steps.",
                               ge=0, le=FIT_MAX_WINDOW)


P = param_offsets(GlftParams)


@njit(inline="always")
def glft_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    tick = view[a, TICK]
    gamma = params[P.gamma]
    k = params[P.k]
    big_a = params[P.arrival_rate]
    if params[P.fit_window] > 0.0:
        fa, fk = arrival_fit_nb(view, trades, a, state[3:], params[P.fit_window], params[P.fit_max_ticks])
        if fa == fa and fk > 0.0:
            big_a = fa
            k = fk
    sigma = sigma_ticks_nb(view, a, state[:3], params[P.volatility], params[P.volatility_half_life])
    c1 = np.log(1.0 + gamma / k) / gamma
    omega = np.sqrt(sigma * sigma * gamma / (2.0 * k * big_a) * (1.0 + gamma / k) ** (1.0 + k / gamma))
    q = view[a, POSITION] / params[P.position_unit]
    s = out[RESERVATION]
    half = c1 + omega / 2.0
    write_quotes_nb(view, a, out, s - (half + omega * q) * tick, s + (half - omega * q) * tick, params[P.size],
                    1.0, 1.0, params[P.max_position])
    return s - omega * q * tick


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="quoter", name="glft", params=GlftParams, kernel=glft_nb, state=model_quoter_state,
        reads=model_quoter_reads,
        doc="GLFT closed-form quotes: half spread c1 + omega/2 and inventory skew omega (ticks); returns the "
            "skewed centre.",
        formula="c1 = ln(1 + g/k)/g; omega = sqrt(s^2 g/(2kA) (1 + g/k)^(1 + k/g)); bid/ask = s -/+ (c1 + omega/2) "
                "- omega*q",
    ))
