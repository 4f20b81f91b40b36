"""quotelab: market-making pricing research on a plugin-based, event-driven backtester.

The plugin-author API is re-exported here (``from quotelab import Component, Params, param_offsets``);
each name lives in one of the modules a plugin author touches:

* :mod:`quotelab.component`: ``Component``, ``Params``, ``Reads``, ``PackContext``, ``Asset``, and params
  by name (``param_offsets``, ``param_choices``, ``pack_fields``, ``Width``, ``Encode``, ``PartRef``);
* :mod:`quotelab.layout`: the columns of ``view``, ``trades`` and ``out`` a kernel reads and writes;
* :mod:`quotelab.units`: ``quantity`` and the unit types of params fields;
* :mod:`quotelab.hookspecs`: the hooks, implemented with ``hookimpl``;
* :mod:`quotelab.pysignal`: ``PythonSignal``, a signal written as a plain Python function;
* :mod:`quotelab.errors`: the errors a plugin raises or a user sees.

Everything else (driver, composer, engine, ...) is internal.
"""

from __future__ import annotations

import importlib
from typing import Any

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "quotelab"

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

# Resolved on first use (PEP 562), so ``import quotelab`` stays light and the plugin modules that import
# ``hookimpl`` from here never meet a half-initialised package.
_API: dict[str, str] = {
    **dict.fromkeys(("Asset", "AssetName", "Component", "Encode", "PackContext", "Params", "PartRef", "Reads",
                     "Width", "pack_fields", "param_choices", "param_offsets"), "quotelab.component"),
    **dict.fromkeys(("Bps", "Price", "Qty", "Seconds", "Ticks", "quantity"), "quotelab.units"),
    **dict.fromkeys(("ConfigError", "DataError", "PluginError", "QuotelabError", "RunError"), "quotelab.errors"),
    "PythonSignal": "quotelab.pysignal",
}
_MODULES = ("layout",)

__all__ = ["PROJECT_NAME", "__version__", "hookimpl", "hookspec", *_MODULES, *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"quotelab.{name}")
    else:
        raise AttributeError(f"module 'quotelab' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
