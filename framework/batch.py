"""Batch backtests: a matrix of runs, executed on a local process pool or Ray, into a resumable store.

A batch YAML::

    strategy: seed.yaml            # base strategy: a path (relative to this file) or an inline mapping
    catalog: ../catalog            # optional; --catalog wins
    asset: perp                    # which data.assets entry the matrix assets replace (default: data.quote)
    matrix:
      assets:                      # each entry replaces data.assets.<asset> entirely
        - {venue: binance-usdm, symbol: BTCUSDT, tick_size: 0.1, lot_size: 0.001}
        - {venue: binance-cm, symbol: BTCUSD_PERP, contract: inverse, contract_size: 100,
           set: {quoter.params.size: 1}}     # overrides that only this asset needs (lot sizes differ)
      dates: [20240808]            # crossed with assets that give no dates of their own
      params:
        quoter.params.half_spread: [1, 2, 4]
        risk[0].params.risk_aversion: {start: 0.1, stop: 0.5, step: 0.2}   # stop is inclusive

Every expanded run is validated (both phases of config.load_strategy) before the first starts. A run's
id is the hash of its validated config as canonical JSON, so the same run gets the same id in every
batch, and ``--resume`` skips ids already recorded as done.

Store layout under ``--out``::

    runs/<run_id>/record.json      the run's row (written last, atomically: its presence means finished)
    runs/<run_id>/series.parquet   equity/position/quote series (engine.save_result)
    runs/<run_id>/summary.json     the engine's summary with stats
    results.parquet                one row per recorded run, rebuilt from the records
    batch.json                     the expanded runs of the last invocation

Ray on several machines: start the cluster (``ray start --head`` on one, ``ray start --address HEAD:6379`` on
the others, each with quotelab installed in the same Python), make the catalog readable at the same path on
every node, and pass ``--executor ray --address HEAD:6379`` (or ``auto`` on a cluster node). Artifacts come
back to the batch process as bytes, so ``--out`` need only exist where the batch runs.
"""

from __future__ import annotations

import builtins
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator

from quotelab.data import catalog as cat
from quotelab.errors import ConfigError, QuotelabError
from quotelab.outputs import json_finite
from quotelab.strategy.config import (
    AssetData,
    StrictModel,
    apply_override,
    expand_dates,
    load_document,
    load_strategy,
    load_yaml,
    where_in,
)

RECORD = "record.json"
# Columns that differ between identical runs (timing, placement), left out of determinism comparisons.
VOLATILE = ("wall_seconds", "compile_seconds", "run_seconds", "driver_compiled", "worker", "events_per_second")


class BatchError(ConfigError):
    """A batch YAML is invalid, or one of its expanded runs is."""


# ------------------------------------------------------------------------------------------------
# Expansion
# ------------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One expanded run: the overrides that turn the base strategy into it, and its identity."""

    index: int
    overrides: list[str]
    venue: str
    symbol: str
    dates: list[str]
    params: dict[str, Any]
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        p = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.params.items())
        return f"#{self.index} {self.venue}/{self.symbol} {','.join(self.dates)} {p}".strip()


@dataclass
class Batch:
    file: Path
    strategy_path: Path
    strategy_text: str
    catalog: Path | None
    runs: list[RunSpec]


def _value_literal(v: Any) -> str:
    # JSON is a subset of YAML flow syntax, so apply_override's YAML loader gives back the same type.
    return json.dumps(v)


# ------------------------------------------------------------------------------------------------
# The batch YAML
# ------------------------------------------------------------------------------------------------


class Range(StrictModel):
    """``{start, stop, step}``: start, start + step, ... up to and including stop."""

    start: int | float
    stop: int | float
    step: int | float


def axis_values(spec: Any) -> list[Any]:
    """The values of one matrix axis: a list as given, a range expanded, a single value as a list of one."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError("an empty list of values gives no runs")
        return spec
    if not isinstance(spec, dict):
        return [spec]
    if set(spec) != {"start", "stop", "step"}:
        raise ValueError(f"a range is {{start, stop, step}} (stop inclusive), got keys {sorted(spec)}")
    try:
        r = Range.model_validate(spec)
    except ValidationError:
        raise ValueError(f"range start, stop and step must be finite numbers, got {spec}") from None
    if r.step <= 0 or r.stop < r.start:
        raise ValueError(f"a range needs step > 0 and stop >= start, got {spec}")
    n = int(math.floor((r.stop - r.start) / r.step + 1e-9)) + 1
    if n > 10_000:
        raise ValueError(f"the range gives {n} values; at most 10000")
    ints = all(isinstance(v, int) for v in (r.start, r.stop, r.step))
    # start + i*step, rounded, so 0.1 + 2*0.1 is 0.3 and its run id does not depend on float noise.
    return [int(r.start + i * r.step) if ints else round(r.start + i * r.step, 12) for i in range(n)]


Axis = Annotated[list[Any], BeforeValidator(axis_values)]


def shaped(kind: type, expected: str, empty: Any = None) -> BeforeValidator:
    """A section that must be a ``kind`` (a mapping or a list), saying what goes in it when it is not; an
    empty YAML value (``key:`` alone) is ``empty``."""

    def check(v: Any) -> Any:
        if v is None and empty is not None:
            return empty
        if not isinstance(v, kind) or (empty is None and not v):
            raise ValueError(f"expected {expected}")
        return v

    return BeforeValidator(check)


class MatrixAsset(AssetData):
    """One ``matrix.assets`` entry: it replaces the strategy's ``data.assets.<asset>`` entirely."""

    set: Annotated[dict[str, Any], shaped(dict, "a mapping PATH: VALUE", {})] = Field(
        {}, description="Overrides only this asset needs, PATH: VALUE (e.g. quoter.params.size: 1).")


class Matrix(StrictModel):
    assets: Annotated[list[MatrixAsset], shaped(list, "a non-empty list of {venue, symbol, dates, ...}")] | None = (
        Field(None, description="Each entry replaces the strategy's data.assets.<asset>: one run per entry."))
    dates: Axis | None = Field(None, description="Crossed with the assets that give no dates of their own.")
    params: Annotated[dict[str, Axis], shaped(dict, "a mapping PATH: [values] or {start, stop, step}", {})] = Field(
        {}, description="PATH: [values] or {start, stop, step} (stop inclusive); every combination is a run.")


class BatchSpec(StrictModel):
    """A batch YAML: a base strategy and the matrix of runs made from it."""

    name: str | None = None
    description: str = ""
    strategy: str | dict[str, Any] = Field(
        description="The base strategy: a path to its YAML (relative to this file) or an inline mapping.")
    catalog: str | None = Field(None, description="Event catalog folder (relative to this file); --catalog wins.")
    asset: str | None = Field(None, description="The data.assets entry the matrix's assets replace (default: "
                                                "data.quote).")
    matrix: Annotated[Matrix, shaped(dict, "a mapping with assets, dates and params", {})] = Matrix()

    @field_validator("strategy", mode="before")
    @classmethod
    def _path_or_mapping(cls, v: Any) -> Any:
        if not isinstance(v, str | dict):
            raise ValueError("expected a path to the base strategy YAML or an inline strategy mapping")
        return v


def overlap(a: str, b: str) -> bool:
    """Whether two override paths touch the same value: equal, or one inside the other."""
    return a == b or b.startswith((a + ".", a + "[")) or a.startswith((b + ".", b + "["))


def load_batch(path: str | Path, catalog: str | Path | None = None, overrides: Sequence[str] = ()) -> Batch:
    """Parse a batch YAML, expand its matrix and validate every run; raise BatchError naming file, line and run.

    ``overrides`` (``--set PATH=VALUE``) change the base strategy of every run, before the matrix."""
    path = Path(path).resolve()
    try:
        spec, raw, lines = load_document(path, BatchSpec, "a batch is a mapping with keys strategy and matrix")
    except BatchError:
        raise
    except ConfigError as exc:
        raise BatchError(str(exc)) from None
    where = where_in(path, lines)
    base_overrides = list(overrides)

    if isinstance(spec.strategy, str):
        strategy_path = (path.parent / spec.strategy).resolve()
        if not strategy_path.is_file():
            raise BatchError(f"{where(('strategy',))}: base strategy {strategy_path} not found")
        strategy_text = strategy_path.read_text()
    else:
        # Inline base: validation errors then point into the batch file itself, at the right lines.
        strategy_path = path
        strategy_text = _inline_text(path)

    base_raw, _ = load_yaml(strategy_path, strategy_text)
    if isinstance(base_raw, dict):
        for o in base_overrides:
            apply_override(base_raw, o)
    try:
        quote = base_raw["data"]["quote"]
        base_assets = base_raw["data"]["assets"]
    except (KeyError, TypeError):
        quote, base_assets = None, {}
    if not isinstance(base_assets, dict):
        base_assets = {}
    matrix = spec.matrix
    asset = spec.asset if spec.asset is not None else quote
    if matrix.assets is not None and asset not in base_assets:
        raise BatchError(f"{where(('asset',))}: asset {asset!r} is not in the base strategy's data.assets "
                         f"(have: {', '.join(base_assets)})")

    # Paths the matrix sets in some run; a --set on one of them would be overwritten there.
    matrix_paths = [(p, ("matrix", "params", p)) for p in matrix.params]
    if matrix.assets is not None:
        matrix_paths.append((f"data.assets.{asset}", ("matrix", "assets")))
        matrix_paths += [(k, ("matrix", "assets", i, "set", k)) for i, a in enumerate(matrix.assets) for k in a.set]
    elif matrix.dates is not None:
        matrix_paths.append((f"data.assets.{asset}.dates", ("matrix", "dates")))
    for o in base_overrides:
        target = o.split("=", 1)[0].strip()
        for p, at in matrix_paths:
            if overlap(target, p):
                raise BatchError(f"--set {o}: {where(at)} sets {p} in the batch's runs, so --set would be "
                                 f"overwritten there; change it in the batch file instead")

    # (overrides, venue, symbol, dates, line-path) per asset choice
    asset_choices: list[tuple[list[str], str, str, list[str], tuple]] = []
    date_values: list[Any] = [None] if matrix.dates is None else matrix.dates
    if matrix.assets is None:
        a = base_assets.get(asset, {})
        a = a if isinstance(a, dict) else {}
        for d in date_values:
            ovr = [] if d is None else [f"data.assets.{asset}.dates={_value_literal(d)}"]
            asset_choices.append((ovr, str(a.get("venue", "files")), str(a.get("symbol", asset)),
                                  _dates_of(d if d is not None else a.get("dates")),
                                  ("strategy",) if d is None else ("matrix", "dates")))
    else:
        for i, entry in enumerate(matrix.assets):
            at = ("matrix", "assets", i)
            fields = entry.model_dump(mode="json", exclude_unset=True, exclude={"set"})
            per_dates = [fields["dates"]] if "dates" in fields else date_values
            for d in per_dates:
                if d is None and "files" not in fields:
                    raise BatchError(f"{where(at)}: no dates: give dates here or under matrix.dates")
                f = fields | ({} if d is None else {"dates": d})
                ovr = [f"data.assets.{asset}={_value_literal(f)}"]
                ovr += [f"{k}={_value_literal(v)}" for k, v in entry.set.items()]
                asset_choices.append((ovr, str(f.get("venue", "files")), str(f.get("symbol", asset)),
                                      _dates_of(f.get("dates")), at))

    axes = list(matrix.params.items())
    runs: list[RunSpec] = []
    for choice in asset_choices:
        for combo in itertools.product(*[vals for _, vals in axes]):
            p = {k: v for (k, _), v in zip(axes, combo, strict=True)}
            ovr = base_overrides + list(choice[0]) + [f"{k}={_value_literal(v)}" for k, v in p.items()]
            runs.append(RunSpec(len(runs), ovr, choice[1], choice[2], choice[3], p, config={"_at": choice[4]}))

    cat_path = Path(catalog) if catalog is not None else (
        (path.parent / spec.catalog).resolve() if spec.catalog else None)
    registry = None
    seen: dict[str, RunSpec] = {}
    for run in runs:
        at = run.config.pop("_at")
        try:
            loaded, registry, parts = load_strategy(strategy_path, run.overrides, registry=registry,
                                                     text=strategy_text)
        except QuotelabError as exc:
            raise BatchError(_blame(exc, run, at, base_overrides, axes, where, strategy_path, strategy_text,
                                    registry)) from exc
        cfg = loaded.config.model_dump(mode="json")
        for part in parts:
            node: Any = cfg
            for k in part.at:
                node = node[k]
            # Each plugin's validated params (units parsed, defaults filled): 2 and 2.0 are the same run.
            node["params"] = part.params.model_dump(mode="json")
        if cat_path is None and loaded.config.data.catalog is not None:
            cat_path = (strategy_path.parent / loaded.config.data.catalog).resolve()
        cfg["data"]["catalog"] = None  # where the data lives is not what the run is
        run.config = cfg
        run.run_id = run_hash(cfg)
        if run.run_id in seen:
            raise BatchError(f"{where(at)}: run {run.label} is the same run as {seen[run.run_id].label} "
                             f"(identical expanded config); remove the duplicate")
        seen[run.run_id] = run
    # Runs over the same data go out together so each worker's page cache and loaded plugins stay warm.
    runs.sort(key=lambda r: (r.venue, r.symbol, r.dates, r.index))
    return Batch(path, strategy_path, strategy_text, cat_path, runs)


def _inline_text(path: Path) -> str:
    """The inline ``strategy:`` block as a document of its own, on the same lines as in the batch file.

    Blank lines stand in for everything else and the block is dedented, so the strategy validator's
    ``file:line`` messages point into the batch file exactly.
    """
    text = path.read_text()
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    for k, v in root.value:
        if k.value == "strategy":
            if v.flow_style:  # `strategy: {...}` on one line: no block to cut out, lines are approximate
                return "\n" * v.start_mark.line + yaml.safe_dump(load_yaml(path)[0]["strategy"])
            start, end = v.start_mark.line, v.end_mark.line + (1 if v.end_mark.column else 0)
            break
    lines = text.splitlines()
    block = lines[start:end]
    indent = min((len(x) - len(x.lstrip()) for x in block if x.strip() and not x.lstrip().startswith("#")),
                 default=0)
    body = [x[indent:] if x[:indent].strip() == "" else x for x in block]
    return "\n" * start + "\n".join(body) + "\n"


def _dates_of(spec: Any) -> list[str]:
    if spec is None:
        return []
    try:
        return expand_dates(spec)
    except ValueError:
        return [str(spec)]


def _blame(exc: Exception, run: RunSpec, at: tuple, base: list[str], axes: list, where: Callable[[tuple], str],
           strategy_path: Path, strategy_text: str, registry: Any) -> str:
    """Find what makes a run invalid: the base, then --set, then its asset, then each matrix param in turn."""
    n_asset = len(run.overrides) - len(axes)
    steps = [(0, where(("strategy",)))]
    steps += [(i + 1, f"--set {o}") for i, o in enumerate(base)]
    steps += [(n_asset, where(at))]
    steps += [(n_asset + j + 1, where(("matrix", "params", k))) for j, (k, _) in enumerate(axes)]
    culprit = steps[0][1]
    for upto, blame in steps:
        try:
            load_strategy(strategy_path, run.overrides[:upto], registry=registry, text=strategy_text)
        except QuotelabError:
            culprit = blame
            break
    return f"{culprit}: run {run.label} is invalid:\n  {str(exc).replace(chr(10), chr(10) + '  ')}"


def run_hash(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# One run, in a worker process
# ------------------------------------------------------------------------------------------------

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
    from quotelab.report import diagnostics

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


def _local_executor(tasks: list[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
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


def _ray_executor(tasks: list[dict[str, Any]], workers: int, address: str | None) -> Iterator[dict[str, Any]]:
    with interpreter_kept():
        yield from _ray_tasks(tasks, workers, address)


def _ray_tasks(tasks: list[dict[str, Any]], workers: int, address: str | None) -> Iterator[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise QuotelabError("the ray executor needs ray: pip install 'quotelab[ray]'") from None
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
        ray.init(**kwargs, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
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
            out = Path(task["artifacts"])
            for name, data in files.items():
                cat.atomic_write_bytes(out / name, lambda fh, d=data: fh.write(d))
            submit(actor)
            yield record
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------


def read_records(out: str | Path, unreadable: list[str] | None = None) -> list[dict[str, Any]]:
    """The run records in ``out``; each one that cannot be read is left out and, with ``unreadable``,
    named there with why (records are written atomically, so this is a damaged or hand-edited file)."""
    recs = []
    for p in sorted(Path(out).glob(f"runs/*/{RECORD}")):
        try:
            rec = json.loads(p.read_text())
            if not isinstance(rec, dict) or "run_id" not in rec:
                raise ValueError("not a run record (no run_id)")
            recs.append(rec)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            if unreadable is not None:
                unreadable.append(f"{p}: {exc}")
    return sorted(recs, key=lambda r: r.get("index", 0))


def _scalar(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int | float):
        return float(v)
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def flat_row(rec: dict[str, Any]) -> dict[str, Any]:
    """One results-table row: identity, params as p.<path>, final state, stats.*, diag.*, timing, error."""
    row: dict[str, Any] = {
        "run_id": rec["run_id"], "index": rec.get("index"), "label": rec.get("label"), "status": rec.get("status"),
        "venue": rec.get("venue"), "symbol": rec.get("symbol"), "dates": ",".join(rec.get("dates") or []),
        "params": json.dumps(rec.get("params", {}), sort_keys=True),
    }
    for k, v in (rec.get("params") or {}).items():
        row[f"p.{k}"] = _scalar(v)
    for k in ("equity", "pnl_unit", "pnl_usd", "pnl_bps_of_notional", "funding", "traded_notional_usd", "position",
              "balance", "fee", "num_trades", "trading_volume", "trading_value", "last_mid", "steps",
              "quoting_steps", "events", "run_seconds"):
        row[k] = _scalar((rec.get("summary") or {}).get(k))
    for k, v in (rec.get("stats") or {}).items():
        row[f"stats.{k}"] = _scalar(v)
    for k, v in (rec.get("diagnostics") or {}).items():
        if not isinstance(v, dict | list):
            row[f"diag.{k}"] = _scalar(v)
    for k in ("wall_seconds", "compile_seconds", "driver_compiled", "worker", "error"):
        row[k] = _scalar(rec.get(k))
    return row


def write_results(out: str | Path) -> Path:
    """Rebuild results.parquet from the run records, atomically."""
    import polars as pl

    out = Path(out)
    rows = [flat_row(r) for r in read_records(out)]
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    data = {c: [r.get(c) for r in rows] for c in cols}
    df = pl.DataFrame({c: pl.Series(c, v, strict=False) for c, v in data.items()}) if rows else pl.DataFrame(
        {"run_id": pl.Series([], dtype=pl.String)})
    path = out / "results.parquet"
    cat.atomic_write_bytes(path, lambda fh: df.write_parquet(fh))
    return path


# ------------------------------------------------------------------------------------------------
# Driving a batch
# ------------------------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    out: Path
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    wall_seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "total": self.total, "done": self.done, "failed": self.failed,
                "skipped": self.skipped, "wall_seconds": round(self.wall_seconds, 3)}


def run_batch(
    batch_file: str | Path,
    out: str | Path,
    catalog: str | Path | None = None,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    resume: bool = False,
    progress: Callable[[str, dict[str, Any] | None, BatchSummary], None] | None = None,
    overrides: Sequence[str] = (),
) -> BatchSummary:
    """Validate and run a batch; records persist as each run finishes. ``overrides`` (``--set``): see load_batch."""
    if executor not in ("local", "ray"):
        raise BatchError(f"--executor must be local or ray, got {executor!r}")
    if workers < 1:
        raise BatchError(f"--workers must be >= 1, got {workers}")
    batch = load_batch(batch_file, catalog, overrides)
    out = Path(out).resolve()
    done_ids = {r["run_id"] for r in read_records(out) if r.get("status") == "done"}
    any_ids = {p.parent.name for p in out.glob(f"runs/*/{RECORD}")}
    ours = {r.run_id for r in batch.runs}
    if not resume and any_ids & ours:
        raise BatchError(f"{batch.file}: {out} already holds {len(any_ids & ours)} of this batch's runs; "
                         f"pass --resume to skip finished runs, or choose another --out")
    summary = BatchSummary(out, len(batch.runs))
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cat.atomic_write_json(out / "batch.json", {
        "batch": str(batch.file), "strategy": str(batch.strategy_path),
        "catalog": str(batch.catalog) if batch.catalog else None,
        "runs": [{"run_id": r.run_id, "label": r.label, "overrides": r.overrides} for r in batch.runs]})
    tasks = []
    for r in batch.runs:
        if r.run_id in done_ids:
            summary.skipped += 1
            if progress:
                progress("skipped", {"run_id": r.run_id, "label": r.label}, summary)
            continue
        tasks.append({
            "run_id": r.run_id, "index": r.index, "label": r.label, "venue": r.venue, "symbol": r.symbol,
            "dates": r.dates, "params": r.params, "overrides": r.overrides,
            "strategy_path": str(batch.strategy_path), "strategy_text": batch.strategy_text,
            "catalog": str(batch.catalog) if batch.catalog else None,
            "artifacts": str(out / "runs" / r.run_id),
        })
    if progress:
        progress("start", None, summary)
    stream = _ray_executor(tasks, workers, address) if executor == "ray" else _local_executor(tasks, workers)
    last_table = 0.0
    for rec in stream:
        rec["executor"] = executor
        cat.atomic_write_json(out / "runs" / rec["run_id"] / RECORD, json_finite(rec))
        summary.records.append(rec)
        if rec["status"] == "done":
            summary.done += 1
        else:
            summary.failed += 1
        # The JSON records are what persists; the table is a view of them, so rebuilding it at most
        # every few seconds keeps a large batch from spending its time rewriting parquet.
        if time.perf_counter() - last_table > 5.0:
            write_results(out)
            last_table = time.perf_counter()
        if progress:
            progress("run", rec, summary)
    write_results(out)
    summary.wall_seconds = time.perf_counter() - t0
    if progress:
        progress("end", None, summary)
    return summary


def plain_progress(event: str, rec: dict[str, Any] | None, s: BatchSummary) -> None:
    """Progress as plain lines, for logs and pipes."""
    if event == "start":
        print(f"batch: {s.total} runs, {s.skipped} already done, {s.total - s.skipped} to run -> {s.out}",
              flush=True)
    elif event == "run" and rec is not None:
        n = s.done + s.failed + s.skipped
        if rec["status"] == "done":
            eq = (rec.get("summary") or {}).get("equity")
            what = f"equity={eq:.6g}" if isinstance(eq, int | float) else ""
        else:
            what = f"FAILED: {str(rec.get('error')).splitlines()[0]}"
        print(f"[{n}/{s.total}] {rec['status']} {rec['run_id']} {rec['label']} {what} "
              f"({rec.get('wall_seconds') or 0:.2f}s)", flush=True)
    elif event == "end":
        print(f"batch finished: done {s.done}, failed {s.failed}, skipped {s.skipped} "
              f"in {s.wall_seconds:.1f}s -> {s.out / 'results.parquet'}", flush=True)


class RichProgress:
    """A progress bar with done/failed counts and ETA, for a terminal."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from quotelab.progress import console

        self.bar = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("done {task.fields[done]} failed {task.fields[failed]} "
                                       "skipped {task.fields[skipped]} left {task.fields[left]}"),
                            TimeRemainingColumn(), console=console())
        self.task: Any = None

    def __call__(self, event: str, rec: dict[str, Any] | None, s: BatchSummary) -> None:
        if event == "start":
            self.bar.start()
            self.task = self.bar.add_task("batch", total=s.total, completed=s.skipped, done=0, failed=0,
                                          skipped=s.skipped, left=s.total - s.skipped)
        elif event == "run" and rec is not None:
            self.bar.update(self.task, advance=1, done=s.done, failed=s.failed,
                            left=s.total - s.skipped - s.done - s.failed)
            if rec["status"] != "done":
                self.bar.console.print(f"[red]failed[/red] {rec['label']}: {str(rec.get('error')).splitlines()[0]}")
        elif event == "end":
            self.bar.stop()
            print(f"batch finished: done {s.done}, failed {s.failed}, skipped {s.skipped} "
                  f"in {s.wall_seconds:.1f}s -> {s.out / 'results.parquet'}", flush=True)


def default_progress() -> Callable[[str, dict[str, Any] | None, BatchSummary], None]:
    from quotelab.progress import wanted

    return RichProgress() if wanted() else plain_progress
