"""Batch backtests: a matrix of runs, executed on a local process pool or Ray, into a resumable store; the
Optuna search on the same machinery; and the HTML report of either.

The modules, in the order data flows through them:

- :mod:`~quotelab.batch.spec`: the batch YAML (a pydantic model) and its expansion into validated runs;
- :mod:`~quotelab.batch.executors`: one run in a worker (``execute_run``), on a process pool or Ray actors;
- :mod:`~quotelab.batch.diagnostics`: the market-making diagnostics each run's record carries;
- :mod:`~quotelab.batch.store`: the record store under ``--out`` (one JSON record per run, results.parquet);
- :mod:`~quotelab.batch.runner`: ``run_batch``, which ties them together, and its progress display;
- :mod:`~quotelab.batch.optimize`: ``quotelab optimize``, walk-forward Optuna search over the same runs;
- :mod:`~quotelab.batch.report`: ``quotelab report``, of a batch, an optimisation or one run.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names resolved on first use, so `quotelab report` (which reads the store) does not load the executors and
# the strategy validator, nor numba and hftbacktest with them.
_NAMES = {
    "quotelab.batch.runner": ("BatchSummary", "default_progress", "failures_progress", "plain_progress",
                              "run_batch"),
    "quotelab.batch.spec": ("Batch", "BatchError", "BatchSpec", "RunSpec", "load_batch"),
    "quotelab.batch.store": ("RECORD", "VOLATILE", "flat_row", "read_records", "write_results"),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'quotelab.batch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
