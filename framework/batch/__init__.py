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

from quotelab.batch.runner import BatchSummary, default_progress, plain_progress, run_batch
from quotelab.batch.spec import Batch, BatchError, BatchSpec, RunSpec, load_batch
from quotelab.batch.store import RECORD, VOLATILE, flat_row, read_records, write_results

__all__ = ["RECORD", "VOLATILE", "Batch", "BatchError", "BatchSpec", "BatchSummary", "RunSpec", "default_progress",
           "flat_row", "load_batch", "plain_progress", "read_records", "run_batch", "write_results"]
