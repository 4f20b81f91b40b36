"""Signals written as plain Python functions: try an idea before its numba kernel exists.

A plugin registers ``f(view, trades, state, params) -> float`` through the
``quotelab_register_python_signals`` hook; it becomes the signal kind ``py:<name>``. The composer calls
it from inside the fused strategy kernel through ``numba.objmode``, so the engine keeps its one driver
loop and the function sees exactly the arrays a kernel sees: ``state`` and ``params`` are its own
slices, views of the run's arrays, so what it writes into ``state`` persists to the next step. Each
step pays a round trip out of compiled code (microseconds), which is why this is for trying ideas.

:func:`check_signal` replays real data through the Python function and the kernel registered under
the same name, side by side in one kernel so both see the same step, and finds the first step where
they disagree.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from quotelab import __version__
from quotelab import layout as L
from quotelab.component import Component, PackContext, Params, Reads, asset_fields, default_pack
from quotelab.errors import ConfigError, PluginError

PREFIX = "py:"  # a Python signal ``x`` is the strategy kind ``py:x``, so it never hides a kernel named ``x``

PyFunc = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class PythonSignal:
    """What a plugin registers through ``quotelab_register_python_signals``.

    ``func(view, trades, state, params) -> float`` gets the arrays a kernel gets (see
    :mod:`quotelab.layout`), minus ``out``. It must be defined at module level in an importable
    module: the generated strategy module imports it by name. ``params``, ``pack``, ``state`` and
    ``reads`` mean what they mean for a :class:`~quotelab.component.Component`; to test a kernel
    against its Python twin, share them (:meth:`twin_of`).
    """

    name: str
    func: PyFunc
    params: type[Params]
    pack: Callable[[Params, PackContext], Sequence[float]] = default_pack
    state: Callable[[Params], np.ndarray] = field(default=lambda p: np.zeros(0))
    reads: Callable[[Params], Reads] = field(default=lambda p: Reads(assets=asset_fields(p)))
    doc: str = ""
    formula: str = ""

    @classmethod
    def twin_of(cls, component: Component, func: PyFunc, doc: str = "") -> PythonSignal:
        """The Python version of a kernel component: same name, params, packing, state and reads."""
        return cls(name=component.name, func=func, params=component.params, pack=component.pack,
                   state=component.state, reads=component.reads, doc=doc or component.doc,
                   formula=component.formula)

    def component(self) -> PythonSignalComponent:
        return PythonSignalComponent(
            role="signal", name=PREFIX + self.name, params=self.params, kernel=None, doc=self.doc, pack=self.pack,
            state=self.state, reads=self.reads, formula=self.formula, func=self.func,
        )


@dataclass(frozen=True)
class PythonSignalComponent(Component):
    """A registered Python signal, in the registry beside the kernel components (role ``signal``)."""

    func: Any = None

    def __post_init__(self) -> None:
        name = self.name.removeprefix(PREFIX)
        if not (isinstance(self.params, type) and issubclass(self.params, Params)):
            raise PluginError(f"python signal {name!r}: params must be a subclass of quotelab.component.Params")
        if not self.params.model_config.get("frozen"):
            raise PluginError(f"python signal {name!r}: params model must be frozen")
        func = self.func
        if not callable(func) or not hasattr(func, "__qualname__"):
            raise PluginError(f"python signal {name!r}: func must be a function, got {func!r}")
        importable = getattr(sys.modules.get(func.__module__), func.__name__, None) is func
        if "<locals>" in func.__qualname__ or not importable:
            raise PluginError(
                f"python signal {name!r}: {func.__module__}.{func.__qualname__} must be defined at module level "
                "(the generated strategy module imports it by name); move it out of the function or class"
            )
        try:
            inspect.signature(func).bind(None, None, None, None)
        except (TypeError, ValueError) as exc:
            raise PluginError(
                f"python signal {name!r}: {func.__module__}.{func.__qualname__} must take "
                f"(view, trades, state, params); {exc}"
            ) from None

    @property
    def kernel_ref(self) -> tuple[str, str]:
        return self.func.__module__, self.func.__name__


def register_python_signals(pm: Any, registry: Any, sources: dict[str, str]) -> None:
    """Call every ``quotelab_register_python_signals`` implementation and add what it registers.

    Called by :func:`quotelab.registry.load_registry` after the kernel components, one plugin at a
    time so an error names the plugin."""
    for impl in pm.hook.quotelab_register_python_signals.get_hookimpls():
        plugin_name = impl.plugin_name
        source = sources.get(plugin_name) or (
            f"quotelab {__version__}" if plugin_name.startswith("quotelab.plugins.") else plugin_name
        )

        def register(signal: PythonSignal, _source: str = source, _plugin: str = plugin_name) -> None:
            if not isinstance(signal, PythonSignal):
                raise PluginError(
                    f'Error in plugin "{_plugin}": the python-signal register() takes a '
                    f"quotelab.pysignal.PythonSignal, got {signal!r}"
                )
            registry.add(signal.component(), _source)

        try:
            impl.function(register=register)
        except (PluginError, ConfigError):
            raise
        except Exception as exc:
            raise PluginError(f'Error in plugin "{plugin_name}": {type(exc).__name__}: {exc}') from exc


def call(func: PyFunc, where: str, view: np.ndarray, trades: np.ndarray, state: np.ndarray,
         params: np.ndarray) -> float:
    """One step of a Python signal, from a generated kernel's objmode block."""
    try:
        value = func(view, trades, state, params)
    except Exception as exc:
        raise PluginError(
            f"{where}: python signal {func.__module__}.{func.__qualname__} raised {type(exc).__name__}: {exc} "
            f"(at view time {view[0, L.TIME]:.3f} s from the grid origin)"
        ) from exc
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PluginError(
            f"{where}: python signal {func.__module__}.{func.__qualname__} must return a float, got {value!r}"
        ) from None


# -------------------------------------------------------------------------------------------------
# check-plugin: the Python function and the kernel of one name, side by side
# -------------------------------------------------------------------------------------------------


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


def twin_source(kernel_ref: tuple[str, str], func_ref: tuple[str, str], n_state: int, n_state_py: int,
                n_pack: int, n_pack_py: int) -> str:
    """A kernel running the component's kernel and its Python twin on separate state, both values in ``out``."""
    from quotelab.composer import OBJMODE_IMPORTS, objmode_call

    k0, k1 = L.COMPONENTS, L.COMPONENTS + 1
    return "\n".join([
        '"""Generated by quotelab.pysignal for check-plugin. Do not edit."""',
        "import numpy as np",
        "from numba import njit",
        *OBJMODE_IMPORTS,
        "from quotelab.composer import STRATEGY_SIG",
        f"from {kernel_ref[0]} import {kernel_ref[1]} as k0",
        f"from {func_ref[0]} import {func_ref[1]} as p0",
        "",
        "",
        # bounds checked: a kernel indexing past its state or params raises here instead of reading the
        # twin's, which would look like a difference between the two
        "@njit(STRATEGY_SIG, cache=True, boundscheck=True)",
        "def strategy(view, trades, state, params, out):",
        f"    v = k0(view, trades, state[0:{n_state}], params[0:{n_pack}], out)",
        f"    out[{k0}] = v",
        *objmode_call("p0", "check-plugin", f"state[{n_state}:{n_state + n_state_py}]",
                      f"params[{n_pack}:{n_pack + n_pack_py}]"),
        f"    out[{k1}] = v",
        "    return v",
        "",
    ])


def check_signal(
    registry: Any, name: str, assets: Sequence[Any], params: dict[str, Any] | None = None, *, quoted: int = 0,
    step: float = 0.1, rtol: float = 1e-9, atol: float = 1e-12,
) -> CheckResult:
    """Replay ``assets`` once, calling the kernel signal ``name`` and the Python signal ``py:name`` at every
    step with identical inputs; compare their values."""
    from quotelab.composer import load_module
    from quotelab.replay import context, replay

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
    pk = np.asarray(kernel.pack(p_kernel, ctx), dtype=np.float64)
    pp = np.asarray(python.pack(p_python, ctx), dtype=np.float64)
    sk = np.asarray(kernel.state(p_kernel), dtype=np.float64)
    sp = np.asarray(python.state(p_python), dtype=np.float64)
    source = twin_source(kernel.kernel_ref, python.kernel_ref, len(sk), len(sp), len(pk), len(pp))
    module = load_module(source, sorted({kernel.kernel_ref[0], python.kernel_ref[0]}))
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
    """Where ``kernel`` and ``python`` differ beyond ``atol + rtol·|python|`` (a NaN matches only a NaN)."""
    both_nan = np.isnan(kernel) & np.isnan(python)
    with np.errstate(invalid="ignore"):
        diff = np.abs(kernel - python)
        bad = ~both_nan & ~(diff <= atol + rtol * np.abs(python))
    idx = np.flatnonzero(bad)
    first = None
    if len(idx):
        i = int(idx[0])
        first = Difference(i, int(timestamps[i]), float(kernel[i]), float(python[i]))
    finite = diff[~both_nan]
    return CheckResult(
        name=name, steps=len(timestamps), kernel=kernel, python=python, timestamps=timestamps,
        first_difference=first, n_different=len(idx),
        max_abs_diff=float(np.nanmax(finite)) if len(finite) and not np.isnan(finite).all() else math.nan,
    )


def catalog_asset(catalog: str | Path, venue: str, symbol: str, dates: Sequence[str] | None = None,
                  name: str = "quoted") -> Any:
    """A :class:`~quotelab.replay.ReplayAsset` of catalog days (default: every day the catalog has)."""
    from quotelab.data import catalog as cat
    from quotelab.errors import DataError
    from quotelab.replay import ReplayAsset

    days = list(dates) if dates else cat.list_days(catalog, venue, symbol)
    if not days:
        raise DataError(
            f"{cat.symbol_dir(catalog, venue, symbol)}: no days in the catalog; convert some with "
            f"quotelab convert --format {venue} --symbol {symbol} --catalog {catalog} FILE"
        )
    meta = cat.read_meta(catalog, venue, symbol)
    contract = meta.get("contract", {})
    return ReplayAsset(
        name=name, events=cat.stream_days(catalog, venue, symbol, days)[1],
        tick_size=float(meta["tick_size"]),
        lot_size=float(meta["lot_size"]), contract_size=float(contract.get("size", 1.0)),
        inverse=contract.get("kind") == "inverse",
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
