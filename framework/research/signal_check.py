"""Check a Python signal against the kernel registered under the same name, on replayed catalog data.

Both run side by side in one generated kernel, so both see the same step; :func:`check_signal` finds the first
step where they disagree. ``quotelab check-plugin`` and the tests ``quotelab new-plugin`` writes call it (through
:mod:`quotelab.pysignal`, where plugin authors import it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from quotelab import layout as L
from quotelab import spool
from quotelab.component import Component, Params, asset_fields
from quotelab.errors import ConfigError, PluginError
from quotelab.pysignal import PREFIX


@dataclass
class Difference:
    step: int  # index among the steps where both ran
    timestamp_ns: int
    kernel: float
    python: float

    @property
    def time_utc(self) -> str:
        return datetime.fromtimestamp(self.timestamp_ns / 1e9, UTC).isoformat(timespec="microseconds")


@dataclass
class CheckResult:
    name: str
    steps: int
    kernel: np.ndarray
    python: np.ndarray
    timestamps: np.ndarray
    first_difference: Difference | None
    n_different: int
    max_abs_diff: float


def check_signal(
    registry: Any, name: str, assets: Sequence[Any], params: dict[str, Any] | None = None, *, quoted: int = 0,
    step: float = 0.1, rtol: float = 1e-9, atol: float = 1e-12,
) -> CheckResult:
    """Replay ``assets`` once, calling the kernel signal ``name`` and the Python signal ``py:name`` at every
    step with identical inputs; compare their values."""
    from quotelab.research.replay import context, replay
    from quotelab.strategy.codegen import Part, load_module, pack, twin_source

    kernel = _twin(registry, "signal", name, f"no kernel signal {name!r} is registered")
    python = _twin(registry, "signal", PREFIX + name,
                   f"no python signal {name!r} is registered: register one through the "
                   "quotelab_register_python_signals hook (see docs/writing-plugins.md)")
    raw = params or {}
    p_kernel, p_python = _params(kernel, raw, "kernel"), _params(python, raw, "python")
    ctx = context(assets, quoted)
    for asset in (*asset_fields(p_kernel), *asset_fields(p_python)):
        if asset not in ctx.asset_index:
            raise ConfigError(
                f"check-plugin {name}: its params read asset {asset!r}, which is not given (assets: "
                f"{', '.join(ctx.asset_index)}); add it with --with {asset}=VENUE:SYMBOL"
            )
    twins = [Part(kernel, p_kernel, "check-plugin"), Part(python, p_python, "check-plugin")]
    (pk, pp), (sk, sp) = pack(twins, ctx)
    module = load_module(twin_source(*twins, [len(pk), len(pp)], [len(sk), len(sp)]), twins)
    rk, rp = kernel.reads(p_kernel), python.reads(p_python)
    ready = sorted({ctx.asset_index[a] for a in (*rk.assets, *rp.assets)} | {quoted})
    try:
        res = replay(assets, module.strategy, np.concatenate([pk, pp]), np.concatenate([sk, sp]), quoted=quoted,
                     step=step, n_levels=max(rk.depth_levels, rp.depth_levels), ready=ready, keep_out=True,
                     out_columns=[L.COMPONENTS, L.COMPONENTS + 1])
    except IndexError as exc:
        py = kernel.kernel.py_func
        raise PluginError(f'Error in plugin "{kernel.source}": kernel {py.__name__} of signal '
                          f"{name!r} indexed outside its arrays ({exc}; found by bounds checking)") from exc
    assert res.outs is not None
    return compare(name, res.timestamps, res.outs[:, 0], res.outs[:, 1], rtol=rtol, atol=atol)


def compare(name: str, timestamps: np.ndarray, kernel: np.ndarray, python: np.ndarray, *, rtol: float,
            atol: float) -> CheckResult:
    """Where ``kernel`` and ``python`` differ beyond ``atol + rtol·|python|`` (a NaN matches only a NaN),
    a chunk of steps at a time (the series may be a month's, memory-mapped)."""
    first, n_different, top = None, 0, math.nan
    for lo, hi in spool.chunks(len(timestamps)):
        k, p = np.asarray(kernel[lo:hi]), np.asarray(python[lo:hi])
        both_nan = np.isnan(k) & np.isnan(p)
        with np.errstate(invalid="ignore"):
            diff = np.abs(k - p)
            bad = ~both_nan & ~(diff <= atol + rtol * np.abs(p))
        idx = np.flatnonzero(bad)
        if len(idx) and first is None:
            i = int(idx[0])
            first = Difference(lo + i, int(timestamps[lo + i]), float(k[i]), float(p[i]))
        n_different += len(idx)
        finite = diff[~both_nan]
        finite = finite[~np.isnan(finite)]
        if len(finite):
            top = max(float(finite.max()), top) if top == top else float(finite.max())
    return CheckResult(
        name=name, steps=len(timestamps), kernel=kernel, python=python, timestamps=timestamps,
        first_difference=first, n_different=n_different, max_abs_diff=top,
    )


def catalog_asset(catalog: str | Path, venue: str, symbol: str, dates: Sequence[str] | None = None,
                  name: str = "quoted") -> Any:
    """An :class:`~quotelab.data.assets.Asset` of catalog days (default: every day the catalog has), with their
    funding rows, as a run loads it."""
    from quotelab.data import catalog as cat
    from quotelab.data.assets import Asset
    from quotelab.errors import DataError

    days = list(dates) if dates else cat.list_days(catalog, venue, symbol)
    if not days:
        raise DataError(
            f"{cat.symbol_dir(catalog, venue, symbol)}: no days in the catalog; convert some with "
            f"quotelab convert --format {venue} --symbol {symbol} --catalog {catalog} FILE"
        )
    meta = cat.read_meta(catalog, venue, symbol)
    contract = meta.get("contract", {})
    return Asset(
        name=name, events=cat.stream_days(catalog, venue, symbol, days)[1],
        tick_size=float(meta["tick_size"]),
        lot_size=float(meta["lot_size"]), contract_size=float(contract.get("size", 1.0)),
        inverse=contract.get("kind") == "inverse", funding=cat.load_funding(catalog, venue, symbol, days),
        venue=venue, symbol=symbol,
    )


def _twin(registry: Any, role: str, name: str, missing: str) -> Component:
    try:
        return registry.get(role, name)
    except ConfigError:
        near = sorted(n.removeprefix(PREFIX) for n in registry.components.get("signal", {}) if n.startswith(PREFIX))
        raise ConfigError(
            f"check-plugin {name.removeprefix(PREFIX)}: {missing}; python signals registered: "
            f"{', '.join(near) or 'none'}"
        ) from None


def _params(component: Component, raw: dict[str, Any], which: str) -> Params:
    from pydantic import ValidationError

    try:
        return component.params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            f"check-plugin {component.name}: --params do not fit the {which} signal's "
            f"{component.params.__name__}: {exc}"
        ) from None
