"""``avellaneda_stoikov``: Avellaneda–Stoikov quotes around the composed reservation price s.

In ticks: r = s − q·γ·σ²·τ, total spread γσ²τ + (2/γ)·ln(1 + γ/k), with q = position/position_unit,
σ in ticks per √second (constant or online EWMA) and τ = T − t a constant horizon in seconds
(a backtest has no terminal time, so the usual rolling-horizon reading). With ``fit_window`` > 0,
k is fitted online from trade arrivals at each distance from the mid (as in ``glft``); the constant
stands in until a fit with a positive k exists.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quotelab import hookimpl
from quotelab.component import Component, param_offsets
from quotelab.kernels.arrival_fit import arrival_fit_nb
from quotelab.kernels.ewma import sigma_ticks_nb
from quotelab.kernels.quotes import ModelQuoterParams, model_quoter_reads, model_quoter_state, write_quotes_nb
from quotelab.layout import POSITION, RESERVATION, TICK
from quotelab.units import Seconds, quantity


class AvellanedaStoikovParams(ModelQuoterParams):
    horizon: Seconds = quantity("seconds", 10.0, "T − t.", gt=0)


P = param_offsets(AvellanedaStoikovParams)


@njit(inline="always")
def avellaneda_stoikov_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    tick = view[a, TICK]
    gamma = params[P.gamma]
    k = params[P.k]
    if params[P.fit_window] > 0.0:
        fa, fk = arrival_fit_nb(view, trades, a, state[3:], params[P.fit_window], params[P.fit_max_ticks])
        if fa == fa and fk > 0.0:
            k = fk
    sigma = sigma_ticks_nb(view, a, state[:3], params[P.volatility], params[P.volatility_half_life])
    q = view[a, POSITION] / params[P.position_unit]
    risk = gamma * sigma * sigma * params[P.horizon]
    r = out[RESERVATION] - q * risk * tick
    half = (risk + 2.0 / gamma * np.log(1.0 + gamma / k)) / 2.0 * tick
    write_quotes_nb(view, a, out, r - half, r + half, params[P.size], 1.0, 1.0, params[P.max_position])
    return r


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="quoter", name="avellaneda_stoikov", params=AvellanedaStoikovParams, kernel=avellaneda_stoikov_nb,
        state=model_quoter_state, reads=model_quoter_reads,
        doc="Avellaneda-Stoikov: inventory-shifted reservation and optimal spread; returns the AS reservation.",
        formula="r = s - q*gamma*sigma^2*tau; spread = gamma*sigma^2*tau + (2/gamma) ln(1 + gamma/k) (ticks)",
    ))
