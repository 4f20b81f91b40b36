"""``trade_flow_imbalance``: per-side EWMAs of trade intervals and sizes → OI, QI, VI or arrival rate.

For each side, every trade updates ``interval ← α·(t − t_prev same side) + (1−α)·interval`` and
``size ← α·qty + (1−α)·size`` (each starts at its first observation). ``adjust: true`` takes pandas'
default ``ewm(alpha).mean()`` instead (the seed study's): the mean of all the side's observations so
far weighted by (1−α)^age, which gives the first observations less pull than the recursive form. With λ = 1/interval:
OI = (λb − λs)/(λb + λs), QI = (Qb − Qs)/(Qb + Qs), VI = (λbQb − λsQs)/(λbQb + λsQs); 0 until both
sides have a positive interval (``warmup: undefined``: NaN instead, so that evaluate leaves those
rows out, as the seed study's NaNs did). ``lag: 1`` returns the value as of the previous step (the seed
study's one-step shift of VI).

``volume_rate`` is the variant on traded volume per unit of time: each step, per side,
``rate ← α·(volume in the step / step seconds) + (1−α)·rate`` (starting at the first step's rate),
and the output is (rate_b − rate_s)/(rate_b + rate_s) (0 while both are 0).

Side convention, explicit because the seed study's differs from the usual one: ``aggressor`` counts
buyer-initiated trades as buys (Binance ``m`` false); ``buyer_is_maker`` counts the trades whose
buyer is the maker (Binance ``m`` true, i.e. seller-initiated) as buys, as the seed did.
"""

from __future__ import annotations

from typing import Annotated, Literal

from numba import njit
from pydantic import Field

from quotelab import hookimpl
from quotelab.component import Asset, Component, Encode, Params, Reads, param_choices, param_offsets
from quotelab.kernels.trade_flow import (
    ADJUST_DOC,
    TF_ARRIVAL_RATE,
    TF_OI,
    TF_QI,
    TF_VI,
    WARMUP_DOC,
    Side,
    Warmup,
    trade_flow_state,
    trade_flow_update_nb,
    trade_flow_value_nb,
)
from quotelab.layout import N_TRADES, STEP_SECONDS, TR_QTY, TR_SIDE

Output = Annotated[Literal["OI", "QI", "VI", "arrival_rate", "volume_rate"],
                   Encode(OI=TF_OI, QI=TF_QI, VI=TF_VI, arrival_rate=TF_ARRIVAL_RATE, volume_rate=4)]


class TradeFlowImbalanceParams(Params):
    asset: Asset = "quoted"
    output: Output = Field(
        "VI", description="Which trade-flow quantity (volume_rate: the volume-per-second variant)."
    )
    alpha: float = Field(0.1, gt=0, le=1, description="EWMA weight of each new trade.")
    side: Side = Field(
        "aggressor", description="Which trades count as buys (see the module doc)."
    )
    lag: Literal[0, 1] = Field(0, description="1: the value as of the previous step (the seed's shifted VI).")
    warmup: Warmup = Field("zero", description=WARMUP_DOC)
    adjust: bool = Field(False, description=ADJUST_DOC)


P = param_offsets(TradeFlowImbalanceParams)
OUTPUT = param_choices(TradeFlowImbalanceParams, "output")


@njit(inline="always")
def volume_rate_nb(view, trades, a, state, alpha, side_sign):
    dt = view[a, STEP_SECONDS]
    if dt > 0.0:
        vb = 0.0
        vs = 0.0
        for k in range(int(view[a, N_TRADES])):
            if trades[a, k, TR_SIDE] * side_sign > 0.0:
                vb += trades[a, k, TR_QTY]
            else:
                vs += trades[a, k, TR_QTY]
        if state[6] == state[6]:
            state[6] = alpha * vb / dt + (1.0 - alpha) * state[6]
            state[7] = alpha * vs / dt + (1.0 - alpha) * state[7]
        else:
            state[6] = vb / dt
            state[7] = vs / dt
    s = state[6] + state[7]
    return (state[6] - state[7]) / s if s > 0.0 else 0.0


@njit(inline="always")
def trade_flow_imbalance_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    output = int(params[P.output])
    if output == OUTPUT.volume_rate:
        s = state[6] + state[7]
        before = (state[6] - state[7]) / s if s > 0.0 else 0.0
        now = volume_rate_nb(view, trades, a, state, params[P.alpha], params[P.side])
        return before if params[P.lag] != 0.0 else now
    before = trade_flow_value_nb(state, output, params[P.warmup])
    trade_flow_update_nb(view, trades, a, state, params[P.alpha], params[P.side], params[P.adjust] != 0.0)
    if params[P.lag] != 0.0:
        return before
    return trade_flow_value_nb(state, output, params[P.warmup])


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="trade_flow_imbalance", params=TradeFlowImbalanceParams,
        kernel=trade_flow_imbalance_nb, state=trade_flow_state,
        reads=lambda p: Reads(assets=(p.asset,), trades=True),
        doc="Trade-flow imbalance from per-side EWMAs of trade intervals and sizes (seed study, alpha 0.1).",
        formula="VI = (lb*Qb - ls*Qs)/(lb*Qb + ls*Qs), l = 1/EWMA(interval), Q = EWMA(qty); OI, QI alike; "
                "volume_rate = (Rb - Rs)/(Rb + Rs), R = per-step EWMA of volume/step_seconds",
    ))
