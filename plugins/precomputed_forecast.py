"""``precomputed_forecast``: a series of (timestamp, value) from a file, looked up point-in-time.

For models that can't run in numba: predict offline, write the predictions with the time each one
becomes usable, and the kernel returns, at each step, the latest value whose usable time has come.
``quotelab train`` writes such files for its non-linear models; its walk-forward files hold NaN where
no out-of-sample prediction exists (the first fold's training span comes first).

Before the first usable value, and while the value in force is NaN, ``missing`` decides:
``fallback`` (default) returns ``fallback`` (0: no forecast term, the strategy quotes around its fair
value); ``skip`` returns NaN, so with ``engine.on_nonfinite: skip`` those steps are not quoted (with
``stop`` the run stops there and names this part).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from numba import njit
from pydantic import Field

from quotelab import hookimpl
from quotelab.component import Component, PackContext, Params, pack_fields, param_offsets
from quotelab.errors import ConfigError
from quotelab.layout import TIME
from quotelab.units import Seconds, quantity


class PrecomputedForecastParams(Params):
    file: str = Field(description="Parquet, CSV or npz with a time column (ns since the epoch) and a value column; "
                                  "a relative path starts from the strategy file's folder.")
    time_column: str = Field("usable_ts", description="When each value may be used (ns since the epoch).")
    value_column: str = Field("value", description="The forecast values.")
    latency: Seconds = quantity("seconds", 0.0, "Added to each time: the delay before a value reaches the strategy.",
                                ge=0)
    missing: Literal["fallback", "skip"] = Field(
        "fallback", description="Before the first value and while the value in force is NaN: return fallback, "
                                "or NaN (skip: with engine.on_nonfinite: skip those steps are not quoted).")
    fallback: float = Field(0.0, description="The value used by missing: fallback.")


# Derived at packing: n values, the value returned when none is in force (fallback or NaN), then the
# series: usable time[n] (seconds from the grid origin), value[n].
P = param_offsets(PrecomputedForecastParams, n=1, missing_value=1, series=None)


def load_series(p: PrecomputedForecastParams, base_dir: str = ".") -> tuple[np.ndarray, np.ndarray]:
    """The file's (time ns, value) pairs, ordered by time; errors name the file and the fix."""
    path = Path(p.file) if Path(p.file).is_absolute() else Path(base_dir) / p.file
    if not path.exists():
        raise ConfigError(f"precomputed_forecast: {path}: file not found")
    if path.suffix == ".npz":
        with np.load(path) as z:
            cols = {k: z[k] for k in z.files}
    else:
        import polars as pl

        df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
        cols = {c: df[c].to_numpy() for c in df.columns}
    for c in (p.time_column, p.value_column):
        if c not in cols:
            raise ConfigError(f"precomputed_forecast: {path} has no column {c!r}; it has: {', '.join(cols)}")
    t = np.asarray(cols[p.time_column], dtype=np.int64) + int(round(p.latency * 1e9))
    v = np.asarray(cols[p.value_column], dtype=np.float64)
    order = np.argsort(t, kind="stable")
    return t[order], v[order]


def _pack(p: PrecomputedForecastParams, ctx: PackContext) -> list[float]:
    t, v = load_series(p, ctx.base_dir)
    # Seconds from the grid origin, computed from integer ns so that a value usable exactly at a
    # step's time compares equal to that step's view[TIME].
    secs = (t - ctx.origin_ns) * 1e-9
    missing = p.fallback if p.missing == "fallback" else float("nan")
    return pack_fields(p, ctx, n=len(t), missing_value=missing, series=[*secs.tolist(), *v.tolist()])


@njit(inline="always")
def precomputed_forecast_nb(view, trades, state, params, out):
    n = int(params[P.n])
    now = view[0, TIME]
    i = int(state[0])
    while i < n and params[P.series + i] <= now:
        i += 1
    state[0] = i
    v = params[P.series - 1 + n + i] if i > 0 else params[P.missing_value]
    return v if v == v else params[P.missing_value]


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="precomputed_forecast", params=PrecomputedForecastParams,
        kernel=precomputed_forecast_nb, pack=_pack, state=lambda p: np.zeros(1),
        doc="A forecast computed offline, read from a file point-in-time: a value is used only once its time "
            "(+ latency) has come; before the first and on NaN, a fallback (0) or NaN (missing: skip).",
        formula="value[i] for the last i with time[i] + latency <= now; missing value -> fallback or NaN",
    ))
