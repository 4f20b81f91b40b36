"""quotelab: market-making pricing research on a plugin-based, event-driven backtester.

The public surface for plugin authors is ``hookimpl`` (mark hook implementations) and the
component types in :mod:`quotelab.component`.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "quotelab"

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

__all__ = ["__version__", "hookimpl", "hookspec", "PROJECT_NAME"]
