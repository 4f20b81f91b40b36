"""Where runs execute: one run in a worker process (:func:`execute_run`), on a local process pool or Ray actors.

The streaming executors (:func:`local_executor`, :func:`ray_executor`) yield records as runs finish, for a
batch; the pools (:class:`LocalPool`, :class:`RayPool`) map rounds of runs to their records in order and keep
their workers between rounds, for an optimisation. Every worker compiles the driver once.

Ray on several machines: start the cluster (``ray start --head`` on one, ``ray start --address HEAD:6379`` on
the others, each with quotelab installed in the same Python), make the catalog readable at the same path on
every node, and pass ``--executor ray --address HEAD:6379`` (or ``auto`` on a cluster node). Artifacts come
back to the batch process as bytes, so ``--out`` need only exist where the batch runs.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quotelab.batch.diagnostics import diagnostics
from quotelab.data import catalog as cat
from quotelab.errors import QuotelabError
from quotelab.outputs import save_or_rescue
from quotelab.strategy.config import load_strategy

_REGISTRIES: dict[tuple[str, str], Any] = {}
_WORKER_RUNS = 0


def _instrument(loaded: Any, catalog: Path | None) -> dict[str, Any]:
    a = loaded.config.data.assets[loaded.config.data.quote]
    meta: dict[str, Any] = {}
    if a.venue is not None and catalog is not None:
        try:
            meta = cat.read_meta(catalog, a.venue, a.symbol)
        except QuotelabError:
            meta = {}
    contract = meta.get("contract", {})
    return {"tick_size": float(a.tick_size or meta.get("tick_size") or float("nan")),
            "contract": a.contract or contract.get("kind", "linear"),
            "contract_size": float(a.contract_size or contract.get("size", 1.0))}


def execute_run(task: dict[str, Any]) -> dict[str, Any]:
    """Run one expanded strategy and return its record; never raises for the run's own failures."""
    global _WORKER_RUNS
    from quotelab.backtest import engine

    t0 = time.perf_counter()
    compiled_before = engine.driver_compiled()
    _WORKER_RUNS += 1
    record: dict[str, Any] = {
        "run_id": task["run_id"], "index": task["index"], "label": task["label"], "venue": task["venue"],
        "symbol": task["symbol"], "dates": task["dates"], "params": task["params"], "overrides": task["overrides"],
        "worker": f"{os.uname().nodename}:{os.getpid()}", "worker_run": _WORKER_RUNS,
        "status": "failed", "error": None, "summary": {}, "stats": {}, "diagnostics": {},
    }
    out_dir = Path(task["artifacts"])
    try:
        key = (task["strategy_path"], task["strategy_text"])
        loaded, registry, parts = load_strategy(task["strategy_path"], task["overrides"],
                                                registry=_REGISTRIES.get(key), text=task["strategy_text"])
        _REGISTRIES[key] = registry
        catalog = Path(task["catalog"]) if task["catalog"] else None
        try:
            result = engine.run_loaded(loaded, registry, parts, catalog=catalog, out_dir=out_dir)
            record["status"] = "done"
        except QuotelabError as exc:
            result = getattr(exc, "result", None)
            record["error"] = f"{type(exc).__name__}: {exc}"
            if result is None:
                raise
        record["summary"] = {k: v for k, v in result.summary.items() if k not in ("stats", "assets")}
        record["stats"] = result.summary.get("stats", {})
        if catalog is None:
            catalog = engine.resolve_catalog(loaded.file.parent, loaded.config.data.catalog, None)
        inst = _instrument(loaded, catalog)
        record["instrument"] = inst
        record["diagnostics"] = diagnostics(result.record_ts, _frame(result), record["summary"], inst)
    except Exception as exc:  # a plugin may raise anything; the batch records it and goes on
        if record["error"] is None:
            record["error"] = f"{type(exc).__name__}: {exc}"
        record["status"] = "failed"
    record["wall_seconds"] = round(time.perf_counter() - t0, 4)
    record["compile_seconds"] = record["summary"].get("compile_seconds")
    record["driver_compiled"] = bool(engine.driver_compiled() and not compiled_before)
    return json.loads(json.dumps(record, default=_json_default))


def _frame(result: Any) -> dict[str, Any]:
    from quotelab.backtest import driver as D

    r = result.records
    return {"mid": r[:, D.R_MID], "position": r[:, D.R_POSITION], "balance": r[:, D.R_BALANCE],
            "fee": r[:, D.R_FEE], "bid": r[:, D.R_BID], "ask": r[:, D.R_ASK], "funding": r[:, D.R_FUNDING]}


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def watch_parent() -> None:
    """In a pool worker: exit when the batch process dies (SIGKILL leaves no chance to stop the pool)."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=loop, daemon=True, name="quotelab-parent-watch").start()


# ------------------------------------------------------------------------------------------------
# Executors: each yields records as runs finish
# ------------------------------------------------------------------------------------------------


def local_executor(tasks: list[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    pending = list(tasks)
    while pending:
        # 'spawn': a forked child would inherit numba/LLVM state mid-use; each worker compiles the driver once.
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=watch_parent) as pool:
            futures = {pool.submit(execute_run, t): t for t in pending}
            pending = []
            broken = False
            not_done = set(futures)
            while not_done:
                done, not_done = wait(not_done, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = futures[fut]
                    try:
                        yield fut.result()
                    except BrokenProcessPool:
                        broken = True
                        pending.append(task)
                    except Exception as exc:
                        yield _failed(task, f"{type(exc).__name__}: {exc}")
            if broken:
                # A worker died (segfault, OOM kill). Runs it might have held are retried once in a fresh
                # pool, alone, so the one that kills its worker is found and recorded as failed.
                yield from _isolate(pending)
                pending = []


def _isolate(tasks: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    for task in tasks:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                 initializer=watch_parent) as pool:
            try:
                yield pool.submit(execute_run, task).result()
            except BrokenProcessPool:
                yield _failed(task, "the worker process died during this run (crash or killed)")


def _failed(task: dict[str, Any], error: str) -> dict[str, Any]:
    return {k: task[k] for k in ("run_id", "index", "label", "venue", "symbol", "dates", "params", "overrides")} | {
        "status": "failed", "error": error, "summary": {}, "stats": {}, "diagnostics": {}, "wall_seconds": None,
        "compile_seconds": None, "driver_compiled": False, "worker": None}


class RayWorker:
    """A Ray actor: one long-lived process that compiles the driver once and runs many runs.

    Artifacts are returned as bytes, not written, so the batch's output folder need not be shared with
    the cluster's nodes (the catalog must be readable at the same path on every node).
    """

    def run(self, task: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
        with tempfile.TemporaryDirectory(prefix="quotelab-ray-") as tmp:
            record = execute_run(task | {"artifacts": tmp})
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
        return record, files


@contextmanager
def interpreter_kept() -> Iterator[None]:
    """Put back the process-wide hooks that ``ray.init``/``ray.shutdown`` replace.

    Ray 2.60 leaves ``sys.excepthook`` and the SIGINT/SIGTERM handlers replaced after shutdown, and,
    when it forwards worker logs, ``builtins.print`` too; numba then fails to compile any function
    that calls ``print`` (hftbacktest's converters) for the rest of the process.
    """
    saved_print, saved_hook = builtins.print, sys.excepthook
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        builtins.print, sys.excepthook = saved_print, saved_hook
        if threading.current_thread() is threading.main_thread():  # only there may handlers be set
            for s, handler in saved_signals.items():
                if handler is not None:  # None: set outside Python, cannot be put back from here
                    signal.signal(s, handler)


def ray_executor(tasks: list[dict[str, Any]], workers: int, address: str | None) -> Iterator[dict[str, Any]]:
    with interpreter_kept():
        yield from _ray_tasks(tasks, workers, address)


def _ray_up(workers: int, address: str | None) -> tuple[Any, bool]:
    """The ray module, connected to ``address`` or to a local cluster of ``workers`` CPUs, and whether this
    call started it (then it is this process's to shut down)."""
    try:
        import ray
    except ImportError:
        raise QuotelabError("the ray executor needs ray: pip install 'quotelab[ray]'") from None
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
        ray.init(**kwargs, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    return ray, started


def _write_artifacts(task: dict[str, Any], files: dict[str, bytes], record: dict[str, Any]) -> None:
    """A Ray actor's files of a run, into the run's folder; if that fails, into a rescue folder named in the
    record's error (the run then failed, as a local run does whose files could not be written)."""
    def write(out: Path) -> None:
        for name, data in files.items():
            cat.atomic_write_bytes(out / name, lambda fh, d=data: fh.write(d))

    _, lost = save_or_rescue(write, Path(task["artifacts"]), "results")
    if lost is not None:
        record["status"] = "failed"
        record["error"] = f"{record['error']}; {lost}" if record.get("error") else f"RunError: {lost}"


def _ray_tasks(tasks: list[dict[str, Any]], workers: int, address: str | None) -> Iterator[dict[str, Any]]:
    ray, started = _ray_up(workers, address)
    try:
        actor_cls = ray.remote(num_cpus=1)(RayWorker)
        actors = [actor_cls.remote() for _ in range(min(workers, len(tasks)) or 1)]
        queue = list(tasks)
        inflight: dict[Any, tuple[Any, dict[str, Any]]] = {}

        def submit(actor: Any) -> None:
            if queue:
                task = queue.pop(0)
                inflight[actor.run.remote(task)] = (actor, task)

        for actor in actors:
            submit(actor)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            actor, task = inflight.pop(ref)
            try:
                record, files = ray.get(ref)
            except Exception as exc:  # the actor died; replace it so the rest of the batch goes on
                yield _failed(task, f"ray: {type(exc).__name__}: {exc}")
                actors.remove(actor)
                actor = actor_cls.remote()
                actors.append(actor)
                submit(actor)
                continue
            _write_artifacts(task, files, record)
            submit(actor)
            yield record
    finally:
        if started:
            ray.shutdown()


class LocalPool:
    """Rounds of runs on a process pool kept between rounds: ``map`` returns the records in task order."""

    def __init__(self, workers: int) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                        initializer=watch_parent)

    def map(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self.pool.map(execute_run, tasks))

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class RayPool:
    """Rounds of runs on Ray actors kept between rounds: ``map`` returns the records in task order."""

    def __init__(self, workers: int, address: str | None) -> None:
        self._kept = interpreter_kept()
        self._kept.__enter__()
        try:
            self.ray, self.started = _ray_up(workers, address)
        except BaseException:
            self._kept.__exit__(None, None, None)
            raise
        self.actors = [self.ray.remote(num_cpus=1)(RayWorker).remote() for _ in range(workers)]

    def map(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        refs = [self.actors[i % len(self.actors)].run.remote(t) for i, t in enumerate(tasks)]
        out = []
        for task, (record, files) in zip(tasks, self.ray.get(refs), strict=True):
            _write_artifacts(task, files, record)
            out.append(record)
        return out

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
        self._kept.__exit__(None, None, None)


def make_task(run_id: str, label: str, params: dict[str, Any], overrides: list[str], dates: list[str],
              strategy_path: Path, strategy_text: str, catalog: Path | None, out: Path, index: int = 0,
              venue: str = "", symbol: str = "") -> dict[str, Any]:
    """What a worker needs to run one run (plain data: it is pickled to processes and Ray actors), its
    artifacts going to ``out/runs/<run_id>``."""
    return {"run_id": run_id, "index": index, "label": label, "venue": venue, "symbol": symbol, "dates": dates,
            "params": params, "overrides": overrides, "strategy_path": str(strategy_path),
            "strategy_text": strategy_text, "catalog": str(catalog) if catalog else None,
            "artifacts": str(out / "runs" / run_id)}
