"""``linear_forecast``: intercept + Σ cᵢ · (output of component ``inputs[i]``) — a trained linear model.

``inputs`` index the strategy's components in the order the composer runs them: fair values first,
then forecast signals, then risks (0-based). Only components that run before this one hold this
step's value; a later one still holds the previous step's.
"""

from __future__ import annotations

from numba import njit
from pydantic import Field, model_validator

from quotelab import hookimpl
from quotelab.component import Component, PackContext, Params, Reads
from quotelab.layout import COMPONENTS, MAX_COMPONENTS

MAX_INPUTS = 16


class LinearForecastParams(Params):
    inputs: tuple[int, ...] = Field(description="Indices of the components whose outputs are combined.")
    coefficients: tuple[float, ...] = Field(description="One coefficient per input.")
    intercept: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> LinearForecastParams:
        if not 1 <= len(self.inputs) <= MAX_INPUTS or len(self.coefficients) != len(self.inputs):
            raise ValueError(f"give 1..{MAX_INPUTS} inputs and one coefficient per input")
        if any(not 0 <= i < MAX_COMPONENTS for i in self.inputs):
            raise ValueError(f"inputs are component indices in 0..{MAX_COMPONENTS - 1}")
        return self


def _pack(p: LinearForecastParams, ctx: PackContext) -> list[float]:
    pad = [0.0] * (MAX_INPUTS - len(p.inputs))
    return [float(len(p.inputs)), p.intercept, *map(float, p.inputs), *pad, *p.coefficients, *pad]


@njit(inline="always")
def linear_forecast_nb(view, trades, state, params, out):
    total = params[1]
    for i in range(int(params[0])):
        total += params[2 + MAX_INPUTS + i] * out[COMPONENTS + int(params[2 + i])]
    return total


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="linear_forecast", params=LinearForecastParams, kernel=linear_forecast_nb,
        pack=_pack, reads=lambda p: Reads(),
        doc="Linear combination of earlier components' outputs (how a trained linear model ships).",
        formula="intercept + sum_i c_i * out[COMPONENTS + inputs_i]",
    ))
