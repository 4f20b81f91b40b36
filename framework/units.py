"""Units for parameters: a bare number is in the field's declared unit; a string names its unit.

``half_spread: 2`` on a ``ticks`` field is 2 ticks; ``step: 100ms`` on a ``seconds`` field is 0.1;
``half_spread: 5bps`` on a ``ticks`` field is a unit mismatch and is rejected with what was expected.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([a-zA-Zµ%]*)\s*$")

# Each field unit with the spellings accepted for it and their factor into that unit.
_ALIASES: dict[str, dict[str, float]] = {
    "seconds": TIME_UNITS,
    "ticks": {"tick": 1.0, "ticks": 1.0},
    "bps": {"bp": 1.0, "bps": 1.0, "%": 100.0},
    "price": {"": 1.0},
    "qty": {"": 1.0},
    "lots": {"lot": 1.0, "lots": 1.0},
    "steps": {"step": 1.0, "steps": 1.0},
    "levels": {"level": 1.0, "levels": 1.0},
}


def parse_quantity(value: Any, unit: str) -> Any:
    """Turn ``value`` into a float in ``unit``; numbers pass through, strings must carry a compatible unit."""
    if isinstance(value, bool) or not isinstance(value, str):
        return value
    m = _QUANTITY.match(value)
    if not m:
        raise ValueError(f"expected a number in {unit} (e.g. {_example(unit)}), got {value!r}")
    number, suffix = float(m.group(1)), m.group(2)
    aliases = _ALIASES.get(unit, {})
    if suffix == "" or suffix == unit:
        return number
    if suffix in aliases:
        return number * aliases[suffix]
    raise ValueError(f"unit mismatch: expected {unit} (e.g. {_example(unit)}), got {value!r}")


def _example(unit: str) -> str:
    return {"seconds": "0.1, 100ms or 1s", "ticks": "2 or 2ticks", "bps": "5 or 5bps"}.get(unit, "1.0")


def quantity(unit: str, default: Any = ..., description: str = "", **kw: Any) -> Any:
    """A pydantic field in ``unit`` that also accepts strings such as ``100ms`` or ``2ticks``."""
    return Field(default, description=description, json_schema_extra={"unit": unit}, **kw)


def _unit_type(unit: str) -> Any:
    return Annotated[float, BeforeValidator(lambda v: parse_quantity(v, unit))]


# A float of any config or params model must be finite and at most this large: no price, size, time or
# coefficient is near it, while a typo (1e308, a unit's exponent) would overflow what is derived from it.
MAX_MAGNITUDE = 1e15
MICROSECOND = 1e-6
DAY = 86400.0


class DomainModel(BaseModel):
    """Base of every config and params model: frozen, unknown keys rejected, numbers finite and bounded.

    Checked on the model, so every field of every plugin's params has the domain without declaring it;
    signs and tighter bounds are declared per field (``ge``, ``gt``, ``le``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded(cls, v: Any) -> Any:
        for x in v if isinstance(v, tuple | list) else (v,):
            if isinstance(x, float) and abs(x) > MAX_MAGNITUDE:
                raise ValueError(f"{x:g} is out of range (at most {MAX_MAGNITUDE:g} in magnitude); check the value "
                                 "and its unit")
        return v


def _fmt_seconds(s: float) -> str:
    for unit, f in ((" days", DAY), (" h", 3600.0), (" s", 1.0), (" ms", 1e-3), (" µs", 1e-6)):
        if abs(s) >= f:
            return f"{s / f:g}{unit}".replace("1 days", "1 day")
    return f"{s:g} s"


def seconds_between(lo: float, hi: float, *, zero: bool = False) -> Any:
    """A ``seconds`` field in [lo, hi] (``zero``: 0 too, meaning off), with the bounds in the error message.

    ``lo`` keeps allocations sane: a grid step of 1 ns over a day is 8.6e13 records."""

    def check(v: float) -> float:
        if zero and v == 0:
            return v
        if not lo <= v <= hi:
            off = " (or 0 for off)" if zero else ""
            raise ValueError(f"expected between {_fmt_seconds(lo)} and {_fmt_seconds(hi)}{off}, got {v:g} s")
        return v

    return Annotated[float, BeforeValidator(lambda v: parse_quantity(v, "seconds")), AfterValidator(check),
                     Field(json_schema_extra={"unit": "seconds"})]


Seconds = _unit_type("seconds")
Step = seconds_between(MICROSECOND, DAY)  # a grid step
Horizon = seconds_between(MICROSECOND, 30 * DAY)  # how far ahead a score or a target looks
Delay = seconds_between(0.0, 3600.0)  # a latency
Offset = seconds_between(-3600.0, 3600.0)  # a shift of times, either way
Ticks = _unit_type("ticks")
Bps = _unit_type("bps")
Price = _unit_type("price")
Qty = _unit_type("qty")


def step_option(text: str, option: str = "--step") -> float:
    """A command-line grid step in seconds, in the same domain as ``engine.step``."""
    from pydantic import TypeAdapter, ValidationError

    from quotelab.errors import ConfigError

    try:
        return float(TypeAdapter(Step).validate_python(text))
    except ValidationError as exc:
        raise ConfigError(f"{option} {text!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
