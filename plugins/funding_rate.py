"""``funding_rate``: a perpetual's funding rate from the catalog or a file, read point-in-time,
optionally scaled by where the step is in the funding interval.

Without ``file``, the rows come from the catalog's funding side table of ``asset`` (the quoted asset
by default; see :mod:`quotelab.data.funding`): ``ts`` is the row's exchange time, ``rate`` a fraction and
``next_funding_ts`` the settlement it announces. A catalog without funding rows is an error.

File format (parquet, CSV or npz), one row per update, any order:

* ``ts``: when the row became known, ns since the epoch (e.g. Binance markPrice's event time ``E``
  in ms × 10⁶). A row is used from ``ts + latency`` on, never before: no look-ahead.
* ``rate``: the funding rate per interval as a fraction (Binance's ``r``: 0.0001 = 0.01 % = 1 bp),
  or in bps with ``rate_unit: bps``.
* ``next_funding_ts`` (optional): the next settlement time, ns since the epoch (Binance's ``T``).
  Without it, settlements are every ``interval`` from the epoch (00:00, 08:00, 16:00 UTC for 8 h).
  A settlement time already past rolls forward by whole intervals.

The output is in bps of the rate, so ``alpha: -1bps`` turns it into −rate · fair value: what a long
position pays at the settlement. ``mode`` picks how time enters, with τ the time left to the next
settlement: ``rate``; ``rate_x_time_to_funding`` = rate · τ / interval (fades to 0 at the settlement);
``rate_x_time_since_funding`` = rate · (1 − τ / interval) (grows to the full rate at the settlement).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from numba import njit
from pydantic import Field

from quotelab import hookimpl
from quotelab.component import Asset, Component, PackContext, Params, pack_fields, param_choices, param_offsets
from quotelab.errors import ConfigError
from quotelab.layout import TIME
from quotelab.units import Seconds, quantity

Mode = Literal["rate", "rate_x_time_to_funding", "rate_x_time_since_funding"]


class FundingRateParams(Params):
    file: str | None = Field(None, description="Parquet, CSV or npz with ts (ns), rate and optionally "
                                               "next_funding_ts (ns); a relative path starts from the strategy "
                                               "file's folder. Unset: the catalog's funding rows of `asset`.")
    asset: Asset = Field("quoted", description="Whose catalog funding rows to read when no file is given.")
    mode: Mode = Field("rate", description="rate; rate_x_time_to_funding: rate * tau/interval; "
                                           "rate_x_time_since_funding: rate * (1 - tau/interval); tau = time left "
                                           "to the next settlement.")
    interval: Seconds = quantity("seconds", 8 * 3600.0, "Time between settlements (Binance: 8h for most perps).",
                                 gt=0)
    latency: Seconds = quantity("seconds", 0.0, "Added to each ts: the delay before a row reaches the strategy.",
                                ge=0)
    rate_unit: Literal["fraction", "bps"] = Field("fraction", description="Unit of the rate column.")
    time_column: str = "ts"
    rate_column: str = "rate"
    next_funding_column: str = Field(
        "next_funding_ts", description="Next settlement time (ns); if the file has no such column (and this is "
                                       "left at its default), settlements follow the interval from the epoch.")


# Derived at packing: phase (s since the last scheduled settlement at the grid origin), has_next (next
# settlement times are known), n rows, then the schedule: usable time[n], rate in bps[n] and, with
# has_next, next settlement[n], all in seconds from the grid origin.
P = param_offsets(FundingRateParams, phase=1, has_next=1, n=1, schedule=None)
MODE = param_choices(FundingRateParams, "mode")


def _from_catalog(p: FundingRateParams, ctx: PackContext) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    name = ctx.quoted if p.asset == "quoted" else p.asset
    if name not in ctx.asset_index:
        raise ConfigError(f"funding_rate: asset {p.asset!r} is not in data.assets ({', '.join(ctx.tick_size)})")
    table = ctx.funding.get(name)
    if table is None or not len(table):
        raise ConfigError(f"funding_rate: asset {name!r} has no funding rows in the catalog (its converter found no "
                          f"mark-price/funding messages); give a file: or convert a capture that has them")
    keep = np.isfinite(table["rate"])
    t = table["exch_ts"][keep] + int(round(p.latency * 1e9))
    nxt = table["next_ts"][keep]
    return t, table["rate"][keep] * 1e4, (nxt if (nxt > 0).all() else None)


def load_funding(p: FundingRateParams, base_dir: str = ".") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(usable time ns, rate in bps, next settlement ns or None), ordered by time; errors name the file and fix."""
    assert p.file is not None
    path = Path(p.file) if Path(p.file).is_absolute() else Path(base_dir) / p.file
    if not path.exists():
        raise ConfigError(f"funding_rate: {path}: file not found; write a parquet/CSV with columns "
                          f"{p.time_column} (ns) and {p.rate_column} (and optionally {p.next_funding_column})")
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                cols = {k: z[k] for k in z.files}
        else:
            import polars as pl

            df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
            cols = {c: df[c].to_numpy() for c in df.columns}
    except Exception as exc:
        raise ConfigError(f"funding_rate: {path}: unreadable ({type(exc).__name__}: {exc}); "
                          "use parquet, CSV or npz") from exc
    for c in (p.time_column, p.rate_column):
        if c not in cols:
            raise ConfigError(f"funding_rate: {path} has no column {c!r}; it has: {', '.join(cols)}; "
                              f"rename it or set {'time_column' if c == p.time_column else 'rate_column'}")
    nxt = None
    if p.next_funding_column in cols:
        nxt = np.asarray(cols[p.next_funding_column], dtype=np.int64)
    elif "next_funding_column" in p.model_fields_set:
        raise ConfigError(f"funding_rate: {path} has no column {p.next_funding_column!r}; it has: {', '.join(cols)}")
    t = np.asarray(cols[p.time_column], dtype=np.int64) + int(round(p.latency * 1e9))
    rate = np.asarray(cols[p.rate_column], dtype=np.float64) * (1e4 if p.rate_unit == "fraction" else 1.0)
    if not np.isfinite(rate).all():
        bad = int(np.flatnonzero(~np.isfinite(rate))[0])
        raise ConfigError(f"funding_rate: {path}: row {bad} has a non-finite {p.rate_column}; fix or drop it")
    order = np.argsort(t, kind="stable")
    return t[order], rate[order], None if nxt is None else nxt[order]


def _pack(p: FundingRateParams, ctx: PackContext) -> list[float]:
    t, rate, nxt = load_funding(p, ctx.base_dir) if p.file is not None else _from_catalog(p, ctx)
    interval_ns = int(round(p.interval * 1e9))
    # Integer ns until the last moment, so times far from the epoch keep their precision.
    phase = (ctx.origin_ns % interval_ns) * 1e-9
    schedule = [*((t - ctx.origin_ns) * 1e-9).tolist(), *rate.tolist()]
    if nxt is not None:
        schedule += ((nxt - ctx.origin_ns) * 1e-9).tolist()
    return pack_fields(p, ctx, phase=phase, has_next=0.0 if nxt is None else 1.0, n=len(t), schedule=schedule)


@njit(inline="always")
def funding_rate_nb(view, trades, state, params, out):
    mode = int(params[P.mode])
    interval = params[P.interval]
    n = int(params[P.n])
    now = view[0, TIME]
    i = int(state[0])
    while i < n and params[P.schedule + i] <= now:
        i += 1
    state[0] = i
    if i == 0:
        return 0.0
    rate = params[P.schedule + n + i - 1]
    if mode == MODE.rate:
        return rate
    if params[P.has_next] > 0.0:
        tau = params[P.schedule + 2 * n + i - 1] - now
        if tau <= 0.0:
            tau += (np.floor(-tau / interval) + 1.0) * interval
    else:
        since = (now + params[P.phase]) % interval
        tau = interval - since
    frac = min(tau / interval, 1.0)
    if mode == MODE.rate_x_time_to_funding:
        return rate * frac
    return rate * (1.0 - frac)


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="signal", name="funding_rate", params=FundingRateParams, kernel=funding_rate_nb, pack=_pack,
        state=lambda p: np.zeros(1),
        doc="A perpetual's funding rate (in bps) from a file of timestamps and rates, read point-in-time, "
            "optionally scaled by the time left to (or since) the funding settlement.",
        formula="r = rate[i] in bps, i the last row with ts[i] + latency <= now (0 before); rate: r; "
                "rate_x_time_to_funding: r * tau/interval; rate_x_time_since_funding: r * (1 - tau/interval); "
                "tau = next settlement - now",
    ))
