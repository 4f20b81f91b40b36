"""``linear_forecast``: intercept + Σ cᵢ · (output of component ``inputs[i]``) — a trained linear model.

``inputs`` name the parts combined (their ``name:``), or give their index in the order the composer
runs them: fair values first, then forecast signals, then risks (0-based). They must run before this
one.
``features``, which ``quotelab train`` writes, names the kind each input must be, so a block pasted
after a different list of parts is an error rather than a model of the wrong inputs.
"""

from __future__ import annotations

from typing import Annotated, Any

from numba import njit
from pydantic import Field, model_validator

from quotelab import hookimpl
from quotelab.component import Component, Params, PartRef, Reads, Width, param_offsets
from quotelab.layout import COMPONENTS, MAX_COMPONENTS

MAX_INPUTS = 16


class LinearForecastParams(Params):
    inputs: Annotated[tuple[int | str, ...], PartRef, Width(MAX_INPUTS)] = Field(
        description="The parts whose outputs are combined: their names (`name:`), or their indices in the composed "
                    "order (fair values, then forecasts, then risks, from 0).")
    coefficients: Annotated[tuple[float, ...], Width(MAX_INPUTS)] = Field(description="One coefficient per input.")
    intercept: float = 0.0
    features: tuple[str, ...] | None = Field(
        default=None, description="The kind of the component each input must be (written by quotelab train)."
    )
    provenance: dict[str, Any] | None = Field(
        default=None, description="Written by quotelab train: assets and days, grid step, horizon and data hash "
        "of the fit. run refuses another step and labels results on those days in-sample (--strict: refuses)."
    )

    @model_validator(mode="after")
    def _check(self) -> LinearForecastParams:
        if not 1 <= len(self.inputs) <= MAX_INPUTS or len(self.coefficients) != len(self.inputs):
            raise ValueError(f"give 1..{MAX_INPUTS} inputs and one coefficient per input")
        if self.features is not None and len(self.features) != len(self.inputs):
            raise ValueError("give one feature kind per input, or leave features out")
        if any(not 0 <= i < MAX_COMPONENTS for i in self.inputs if not isinstance(i, str)):
            raise ValueError(f"inputs are component indices in 0..{MAX_COMPONENTS - 1}")
        return self


P = param_offsets(LinearForecastParams)


@njit(inline="always")
def linear_forecast_nb(view, trades, state, params, out):
    total = params[P.intercept]
    for i in range(int(params[P.n_inputs])):
        total += params[P.coefficients + i] * out[COMPONENTS + int(params[P.inputs + i])]
    return total


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="linear_forecast", params=LinearForecastParams, kernel=linear_forecast_nb,
        reads=lambda p: Reads(components=p.inputs, component_kinds=p.features or ()),
        doc="Linear combination of earlier components' outputs (how a trained linear model ships).",
        formula="intercept + sum_i c_i * out[COMPONENTS + inputs_i]",
    ))
