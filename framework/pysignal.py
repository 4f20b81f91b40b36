"""Signals written as plain Python functions: try an idea before its numba kernel exists.

A plugin registers ``f(view, trades, state, params) -> float`` through the
``quotelab_register_python_signals`` hook; it becomes the signal kind ``py:<name>``. The composer calls
it from inside the fused strategy kernel through ``numba.objmode``, so the engine keeps its one driver
loop and the function sees exactly the arrays a kernel sees: ``state`` and ``params`` are its own
slices, views of the run's arrays, so what it writes into ``state`` persists to the next step. Each
step pays a round trip out of compiled code (microseconds), which is why this is for trying ideas.

:func:`check_signal` (in :mod:`quotelab.research.signal_check`, importable from here) replays real data
through the Python function and the kernel registered under the same name and finds the first step where
they disagree.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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

    Called by :func:`quotelab.strategy.registry.load_registry` after the kernel components, one plugin at a
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


def __getattr__(name: str) -> Any:
    # check_signal and its helpers replay catalog data, so they live with the research code; a plugin's own
    # tests keep importing them from here, resolved on first use so this module stays below the replay.
    if name in _CHECK:
        return getattr(importlib.import_module("quotelab.research.signal_check"), name)
    raise AttributeError(f"module 'quotelab.pysignal' has no attribute {name!r}")


_CHECK = ("CheckResult", "Difference", "catalog_asset", "check_signal", "compare")
