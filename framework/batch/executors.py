"""Where runs execute: one run in a worker process (:func:`execute_run`), on a local process pool or Ray actors.

The streaming executors (:func:`local_executor`, :func:`ray_executor`) yield records as runs finish, for a
batch; the pools (:class:`LocalPool`, :class:`RayPool`) stream rounds of runs the same way and keep their
workers between rounds, for an optimisation. Every worker compiles the driver once.

Ray on several machines: start the cluster (``ray start --head`` on one, ``ray start --address HEAD:6379`` on
the others, each with quotelab installed in the same Python), make the catalog readable at the same path on
every node, and pass ``--executor ray --address HEAD:6379`` (or ``auto`` on a cluster node). Artifacts come
back to the batch process as bytes, so ``--out`` need only exist where the batch runs.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
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
from quotelab.errors import QuotelabError, Stopped
from quotelab.outputs import save_or_rescue
from quotelab.stopping import signame as _signame
from quotelab.stopping import stop_signals
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


def _serve(conn: Any) -> None:
    """A local worker process: run each task the batch process sends and send back its record, until the pipe
    closes."""
    watch_parent()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        conn.send(execute_run(task))


def _stopped(signum: int, cancelled: int) -> Stopped:
    return Stopped(f"stopped by {_signame(signum)}", signum, cancelled)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """A process started inside inherits SIGINT ignored: Ctrl-C reaches the whole process group, and it is
    the batch process that decides what stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


def _how_ended(code: int | None) -> str:
    """How a worker process that ended with ``code`` (negative: the signal) ended, and what to do."""
    crash = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT)
    if code is not None and code < 0 and -code in crash:
        return (f"crashed ({_signame(-code)}): native code failed, e.g. a plugin kernel indexing outside "
                f"its arrays; rerun this run with `quotelab run --check` (its --set values are the record's "
                f"overrides), which names such a kernel")
    if code == -signal.SIGKILL:
        return ("was killed (SIGKILL), e.g. by the out-of-memory killer (see `dmesg`): give it more memory or "
                "fewer --workers")
    if code is not None and code < 0:
        return f"was killed by {_signame(-code)}"
    return f"exited with code {code} before sending the run's record (a plugin calling exit or os._exit?)"


def worker_died(task: dict[str, Any], worker: str, how: str) -> str:
    """The error of a run whose worker process died, the same for every executor: which worker, how it
    ended (from :func:`_how_ended` where the exit status is known), and what became of the other runs."""
    return (f"WorkerDied: the worker process {worker} running this run {how}; only this run "
            f"({task['run_id']}, {task['label']}) failed: the other runs go on in a new worker, and every "
            f"finished run's record is kept in {Path(task['artifacts']).parent}")


class LocalPool:
    """Local worker processes kept between calls of :meth:`stream`; each runs one task at a time.

    Unlike concurrent.futures' pool, it knows which run each process holds: a process that dies (a crash in a
    plugin, the OOM killer) fails that run alone, saying how it died, and the next run gets a new process;
    asked to stop (Ctrl-C, SIGTERM), it ends its processes at once instead of finishing every queued run.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.idle: list[tuple[Any, Any]] = []  # (process, connection)
        self.busy: dict[Any, tuple[Any, int, dict[str, Any]]] = {}  # connection -> (process, position, task)

    def _start(self) -> tuple[Any, Any]:
        import multiprocessing as mp

        # 'spawn': a forked child would inherit numba/LLVM state mid-use; each worker compiles the driver once.
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        # daemon: ended with the batch process even if it never reaches close()
        proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="quotelab-worker")
        with _sigint_ignored():
            proc.start()
        child.close()  # so that the process's death reads as EOF here
        return proc, conn

    def _take(self) -> tuple[Any, Any]:
        while self.idle:
            proc, conn = self.idle.pop()
            if proc.is_alive():
                return proc, conn
            conn.close()
        return self._start()

    def stream(self, tasks: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position in ``tasks``, record) as runs finish; raises :class:`~quotelab.errors.Stopped` after a
        SIGINT or SIGTERM, once the records already received have been yielded."""
        from multiprocessing.connection import wait

        queue = list(enumerate(tasks))[::-1]
        sent = 0
        with stop_signals() as stop:
            while (queue or self.busy) and not stop:
                while queue and len(self.busy) < self.workers:
                    proc, conn = self._take()
                    i, task = queue.pop()
                    with contextlib.suppress(OSError):  # it died meanwhile: its pipe reads EOF below
                        conn.send(task)
                    self.busy[conn] = (proc, i, task)
                for conn in wait(list(self.busy), timeout=0.2):  # the timeout lets a stop signal be seen
                    proc, i, task = self.busy.pop(conn)
                    try:
                        rec = conn.recv()
                    except (EOFError, OSError):
                        conn.close()
                        proc.join()
                        if not stop:  # else it was stopped with us (a signal to the process group): cancelled
                            sent += 1
                            yield i, _failed(task, worker_died(task, str(proc.pid), _how_ended(proc.exitcode)))
                        continue
                    self.idle.append((proc, conn))
                    sent += 1
                    yield i, rec
            if stop:
                self.close()
                raise _stopped(stop[0], len(tasks) - sent)

    def close(self) -> None:
        procs = [p for p, _ in self.idle] + [p for p, _, _ in self.busy.values()]
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in [c for _, c in self.idle] + list(self.busy):
            conn.close()
        self.idle, self.busy = [], {}


def local_executor(tasks: list[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
    pool = LocalPool(workers)
    try:
        for _, rec in pool.stream(tasks):
            yield rec
    finally:
        pool.close()


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
    pool = RayPool(min(workers, len(tasks)) or 1, address)
    try:
        for _, rec in pool.stream(tasks):
            yield rec
    finally:
        pool.close()


def _ray_up(workers: int, address: str | None) -> tuple[Any, bool, tuple[Path, str] | None]:
    """The ray module, connected to ``address`` or to a local cluster of ``workers`` CPUs; whether this
    call started it (then it is this process's to shut down); and this node's Ray logs folder and IP
    address, where the logs of the workers on this node are, if Ray said."""
    try:
        import ray
    except ImportError:
        raise QuotelabError("the ray executor needs ray: pip install 'quotelab[ray]'") from None
    started = not ray.is_initialized()
    node = None
    if started:
        kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
        # log_to_driver=False does not cover Ray's notes of dead workers: those a thread of the driver prints
        # to sys.stdout whatever it is told (ray/_private/worker.py, listen_error_messages), so `--json`
        # commands keep their stdout apart themselves (quotelab.cli._json_stdout).
        ctx = ray.init(**kwargs, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        info = getattr(ctx, "address_info", None) or {}  # a ray:// client's context has none
        if info.get("session_dir") and info.get("node_ip_address"):
            node = (Path(info["session_dir"]) / "logs", str(info["node_ip_address"]))
    return ray, started, node


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


# Ray keeps the cause of an actor's death as text only (ActorDiedError keeps no structured context): these
# read the worker's pid and node, and Ray's exit type and the first sentence of its detail.
_RAY_FIELD = re.compile(r"^\s*(pid|ip): (\S+)$", re.M)
_RAY_EXIT = re.compile(r"Worker exit type: (\w+)(?: Worker exit detail: (.+?\.)(?: |$))?", re.S)
# What a worker's log (worker-<id>-<job>-<pid>.err) says as a signal kills it: Ray's failure handler first,
# then Python's faulthandler, which Ray enables in its workers.
_LOGGED_SIGNAL = re.compile(r"\*\*\* (SIG[A-Z]+) received|Fatal Python error: (Segmentation fault|Bus error|"
                            r"Illegal instruction|Floating-point exception|Aborted)")
_FAULTHANDLER = {"Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS", "Illegal instruction": "SIGILL",
                 "Floating-point exception": "SIGFPE", "Aborted": "SIGABRT"}


def _logged_signal(logs: Path, pid: str) -> tuple[int | None, Path | None]:
    """The signal that killed Ray worker ``pid`` as its log in ``logs`` tells it, and that log."""
    try:
        found = sorted(logs.glob(f"worker-*-{pid}.err"), key=lambda p: p.stat().st_mtime)
        if not found:
            return None, None
        with found[-1].open("rb") as fh:
            fh.seek(max(0, found[-1].stat().st_size - 65536))  # the end: where a dying worker writes
            tail = fh.read().decode(errors="replace")
    except OSError:
        return None, None
    marks = list(_LOGGED_SIGNAL.finditer(tail))
    if not marks:
        return None, found[-1]
    name = marks[-1].group(1) or _FAULTHANDLER[marks[-1].group(2)]
    return getattr(signal, name, None), found[-1]


def _ray_death(ray: Any, exc: Exception, task: dict[str, Any], node: tuple[Path, str] | None) -> str:
    """The error of a run whose Ray actor died: :func:`worker_died`'s, with the signal when the worker's log
    is on this node, else what Ray tells (it reports no exit status: the raylet only sees the worker's
    connection close)."""
    if not isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.WorkerCrashedError
                      | ray.exceptions.NodeDiedError):
        return f"ray: {type(exc).__name__}: {exc}"
    text = str(exc)
    fields = dict(_RAY_FIELD.findall(text))
    pid, ip = fields.get("pid"), fields.get("ip")
    m = _RAY_EXIT.search(text)
    told = (f"Ray: exit type {m.group(1)}" + (f", {m.group(2)}" if m.group(2) else "") if m
            else f"Ray: {type(exc).__name__}")
    signum, log = None, None
    if node is not None and pid is not None and ip in (None, node[1]):
        signum, log = _logged_signal(node[0], pid)
    if signum is not None:
        how = f"{_how_ended(-signum)} (its log: {log})"
    elif "memory monitor" in text or "low on memory" in text or "OUT_OF_MEMORY" in text:
        how = f"was killed by Ray, its node short of memory: give it more memory or fewer --workers ({told})"
    elif isinstance(exc, ray.exceptions.NodeDiedError) or "NODE_DIED" in text or "node has died" in text.lower():
        how = f"was lost with its node ({told}): see `ray status` and that node's logs"
    else:
        where = log or f"worker-*-{pid or '<pid>'}.err in the Ray session's logs folder on {ip or 'its node'}"
        how = (f"ended before sending the run's record, and Ray tells neither the signal nor the exit code "
               f"({told}): a plugin calling exit or os._exit, or a kill, e.g. SIGKILL by the out-of-memory killer "
               f"(see `dmesg` on {ip or 'its node'}); its log: {where}")
    return worker_died(task, f"{pid or '?'} (a Ray actor on {ip or 'an unknown node'})", how)


class RayPool:
    """Ray actors kept between calls of :meth:`stream`; each runs one task at a time, as :class:`LocalPool`'s
    processes do. An actor that dies fails its run alone and is replaced."""

    def __init__(self, workers: int, address: str | None) -> None:
        self._kept = interpreter_kept()
        self._kept.__enter__()
        try:
            self.ray, self.started, self.node = _ray_up(workers, address)
        except BaseException:
            self._kept.__exit__(None, None, None)
            raise
        self.actor_cls = self.ray.remote(num_cpus=1)(RayWorker)
        self.actors = [self.actor_cls.remote() for _ in range(workers)]

    def stream(self, tasks: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position in ``tasks``, record) as runs finish; raises :class:`~quotelab.errors.Stopped` after a
        SIGINT or SIGTERM, once the records already received have been yielded."""
        queue = list(enumerate(tasks))[::-1]
        inflight: dict[Any, tuple[Any, int]] = {}  # ref -> (actor, position)

        def submit(actor: Any) -> None:
            if queue:
                i, task = queue.pop()
                inflight[actor.run.remote(task)] = (actor, i)

        for actor in self.actors:
            submit(actor)
        sent = 0
        # after ray.init, whose SIGTERM handler exits at once (close() puts back the handlers from before)
        with stop_signals() as stop:
            while inflight and not stop:
                for ref in self.ray.wait(list(inflight), num_returns=1, timeout=0.2)[0]:
                    actor, i = inflight.pop(ref)
                    try:
                        record, files = self.ray.get(ref)
                    except Exception as exc:  # the actor died; replace it so the other runs go on
                        if stop:  # killed with us (a signal to the process group): cancelled, not failed
                            continue
                        record = _failed(tasks[i], _ray_death(self.ray, exc, tasks[i], self.node))
                        self.actors.remove(actor)
                        actor = self.actor_cls.remote()
                        self.actors.append(actor)
                    else:
                        _write_artifacts(tasks[i], files, record)
                    submit(actor)
                    sent += 1
                    yield i, record
            if stop:
                raise _stopped(stop[0], len(tasks) - sent)

    def close(self) -> None:
        for actor in self.actors:  # at once, not after their runs (a cluster that stays up)
            self.ray.kill(actor)
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
