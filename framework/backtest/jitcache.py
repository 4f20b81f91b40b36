"""Guarding numba's disk cache of loops that bake in other modules' constants.

numba checks a cached function only against its own source file, while the replay loops and the
driver bake in constants of :mod:`quotelab.layout`, hftbacktest's event flags and the C signatures
of :mod:`quotelab.backtest.backtest_c`. Each such loop takes ``KEY`` as its first argument, compares it with
the ``KEY`` it was compiled with, and returns ``STALE`` if they differ; :func:`run_cached` then
recompiles it before it runs.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import hftbacktest.types as hbt_types

from quotelab import layout as L
from quotelab.backtest import backtest_c
from quotelab.data import funding


def _constants(module: Any) -> list[tuple[str, int]]:
    return sorted((k, v) for k, v in vars(module).items() if k.isupper() and isinstance(v, int))


KEY = int.from_bytes(hashlib.sha256(repr((
    _constants(L), _constants(hbt_types), backtest_c.SIGNATURES,
    # the driver inlines the funding payment from another file, which numba's own check does not see
    inspect.getsource(funding.payment_nb),
)).encode()).digest()[:8], "little", signed=True)  # not hash(): str hashes differ between processes
STALE = -2  # what a loop compiled against other constants returns


def run_cached(loop: Any, *args: Any) -> int:
    """``loop(KEY, *args)``, recompiled first if its cached code predates the constants."""
    got = loop(KEY, *args)
    if got == STALE:
        loop.recompile()
        got = loop(KEY, *args)
        if got == STALE:  # pragma: no cover - a compile that ignores the module's constants
            raise RuntimeError(f"{loop.__name__} still compiled against other constants after recompiling")
    return got
