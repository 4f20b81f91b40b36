"""``quotelab optimize OPT.yaml``: Optuna search over strategy parameters, walk-forward, on the batch machinery.

An optimisation file names a base strategy, a search space over any strategy path, an objective
computed from run summaries, and the days: ``walk_forward: {days, train, test}`` makes folds whose
parameters are chosen on ``train`` days and scored on the ``test`` days after them.

Every (parameters, day) pair is one run of :func:`quotelab.batch.executors.execute_run`, stored under
``runs/<run_id>/record.json`` as a batch stores its runs, and executed by a local process pool or
Ray actors that each compile the driver once. A trial runs its training days in order; after each
day its objective so far is reported to Optuna, so the pruner can stop a poor trial early.

Reproducibility. Trials go out in rounds of ``workers`` trials that advance one day at a time in
lockstep, and each round's sampler is seeded from (seed, fold, trials finished): what the sampler
and pruner see does not depend on which worker finishes first, so the same seed gives the same
trials, with one worker or several. ``parallel_trials`` (default 2) is the round's size, a property
of the search, not of the machine; ``--workers`` only sets how many runs execute at once. An
interrupted study resumes from its SQLite storage: trials left running are marked failed and not
counted, finished ones are kept, and runs already recorded under ``runs/`` are not run again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BeforeValidator, Field, field_validator, model_validator

from quotelab.batch.executors import LocalPool, RayPool, make_task
from quotelab.batch.spec import Number, check_overrides, made_by, read_spec, shaped
from quotelab.batch.store import Store, record_path, write_results
from quotelab.data import catalog as cat
from quotelab.errors import ConfigError, QuotelabError, RunError, Stopped
from quotelab.outputs import json_finite
from quotelab.strategy.config import StrictModel, apply_override, expand_dates, load_strategy, load_yaml

OPT_FILE = "optimize.json"
RESUME = "run the same command again: it resumes the study and reuses the finished runs"


class OptimizeError(ConfigError):
    """An optimisation file is invalid."""


@dataclass
class Param:
    path: str
    kind: str  # int, float, categorical
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Any] = field(default_factory=list)

    def distribution(self) -> Any:
        import optuna.distributions as D

        if self.kind == "categorical":
            return D.CategoricalDistribution(self.choices)
        if self.kind == "int":
            return D.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return D.FloatDistribution(self.low, self.high, log=self.log, step=self.step)


class Objective(StrictModel):
    """What a trial maximises, from its day records."""

    metric: Literal["pnl_usd", "pnl_per_notional", "sharpe_daily"] = "pnl_usd"
    inventory_penalty: float = Field(0.0, description="Subtracted per unit of mean |position| (the run's "
                                                      "inventory_mean_abs).")

    def value(self, recs: list[dict[str, Any]]) -> float:
        """The objective over these day records (higher is better); NaN when it is not defined yet."""
        pnl = np.array([float(r["summary"].get("pnl_usd") or 0.0) for r in recs])
        if self.metric == "pnl_usd":
            v = float(pnl.sum())
        elif self.metric == "pnl_per_notional":
            notional = sum(float(r["summary"].get("traded_notional_usd") or 0.0) for r in recs)
            v = float(pnl.sum() / notional * 1e4) if notional > 0 else 0.0
        else:
            sd = float(np.std(pnl, ddof=1)) if len(pnl) > 1 else math.nan
            v = float(pnl.mean() / sd) if sd > 0 else math.nan
        if self.inventory_penalty:
            inv = np.mean([float(r["diagnostics"].get("inventory_mean_abs") or 0.0) for r in recs])
            v -= self.inventory_penalty * float(inv)
        return v


class SpaceEntry(StrictModel):
    """One ``space`` entry: a range ``{low, high[, step][, log]}`` or ``{choices: [...]}`` (or the bare list)."""

    low: Number | None = None
    high: Number | None = None
    step: Number | None = None
    log: bool = False
    choices: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, v: Any) -> Any:
        if isinstance(v, list):
            return {"choices": v}
        if not isinstance(v, dict):
            raise ValueError("expected {low, high[, step][, log]} or {choices: [...]}")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> SpaceEntry:
        if self.choices is not None:
            if self.model_fields_set != {"choices"}:
                raise ValueError("a categorical is {choices: [a, b, ...]} alone")
        elif self.low is None or self.high is None:
            raise ValueError("expected {low, high[, step][, log]} or {choices: [...]}")
        elif not self.high > self.low or (self.step is not None and self.step <= 0) or (
                self.log and (self.low <= 0 or self.step is not None)):
            raise ValueError("need high > low, step > 0, and log only with low > 0 and no step")
        return self

    def param(self, path: str) -> Param:
        if self.choices is not None:
            return Param(path, "categorical", choices=list(self.choices))
        ints = all(isinstance(x, int) for x in (self.low, self.high, *([self.step] if self.step else [])))
        return Param(path, "int" if ints else "float", float(self.low), float(self.high), self.step, self.log)


def _days(v: Any) -> Any:
    try:
        return expand_dates(v)
    except ValueError as exc:
        raise ValueError(f"{exc}; days are a list of YYYYMMDD or a range '20240801..20240807'") from None


Days = Annotated[list[str], BeforeValidator(_days)]


class WalkForward(StrictModel):
    days: Days
    train: int = Field(ge=1, description="Days the parameters are chosen on, per fold.")
    test: int = Field(ge=1, description="Days after them the chosen parameters are scored on, per fold.")

    @model_validator(mode="after")
    def _fits(self) -> WalkForward:
        if self.train + self.test > len(self.days):
            raise ValueError(f"need train + test <= the {len(self.days)} days")
        return self

    def folds(self) -> list[tuple[list[str], list[str]]]:
        n_train, n_test, days = self.train, self.test, self.days
        return [(days[s:s + n_train], days[s + n_train:s + n_train + n_test])
                for s in range(0, len(days) - n_train - n_test + 1, n_test)]


class OptSpec(StrictModel):
    """An optimisation YAML: base strategy, search space, objective and days."""

    name: str | None = Field(None, description="The study's name (default: the file's stem).")
    description: str = ""
    strategy: str = Field(description="The base strategy: a path to its YAML, relative to this file.")
    catalog: str | None = Field(None, description="Event catalog folder (relative to this file); --catalog wins.")
    asset: str | None = Field(None, description="The data.assets entry whose days the runs set (default: "
                                                "data.quote).")
    space: Annotated[dict[str, SpaceEntry], shaped(dict, "a mapping PATH: {low, high[, step][, log]} or "
                                                         "{choices: [...]}")] = Field(
        description="What to search: PATH: {low, high[, step][, log]} or {choices: [...]}.")
    objective: Objective = Objective()
    days: Days | None = Field(None, description="Days to choose the parameters on, all in-sample.")
    walk_forward: WalkForward | None = None
    trials: int = Field(20, ge=1, description="Trials per fold.")
    seed: int = 0
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    parallel_trials: int = Field(2, ge=1, description="Trials per round, advancing one day at a time together.")

    @field_validator("objective", mode="before")
    @classmethod
    def _metric_alone(cls, v: Any) -> Any:
        return {"metric": v} if isinstance(v, str) else ({} if v is None else v)

    @model_validator(mode="after")
    def _days_or_walk_forward(self) -> OptSpec:
        if (self.days is None) == (self.walk_forward is None):
            raise ValueError("give days (all in-sample) or walk_forward: {days, train, test}, one of them")
        return self

    def folds(self) -> list[tuple[list[str], list[str]]]:
        return [(list(self.days), [])] if self.days is not None else self.walk_forward.folds()


@dataclass
class OptConfig:
    file: Path
    name: str
    strategy_path: Path
    strategy_text: str
    catalog: Path | None
    asset: str
    space: list[Param]
    objective: Objective
    folds: list[tuple[list[str], list[str]]]  # (train days, test days)
    trials: int
    seed: int
    sampler: str
    pruner: str
    parallel_trials: int = 2
    dated_assets: list[str] = field(default_factory=list)
    base_overrides: list[str] = field(default_factory=list)  # --set, applied to the base strategy first


def load_opt(path: str | Path, catalog: str | Path | None = None, overrides: Sequence[str] = ()) -> OptConfig:
    """Parse and validate an optimisation file; errors name file:line and the key.

    ``overrides`` (``--set PATH=VALUE``) change the base strategy of every run, before the searched params."""
    path = Path(path).resolve()
    spec, where = read_spec(path, OptSpec, "an optimisation file is a mapping with strategy, space, objective, days",
                            OptimizeError)
    strategy_path = (path.parent / spec.strategy).resolve()
    if not strategy_path.is_file():
        raise OptimizeError(f"{where(('strategy',))}: base strategy {strategy_path} not found")
    strategy_text = strategy_path.read_text()
    base, _ = load_yaml(strategy_path, strategy_text)
    if not isinstance(base, dict):
        base = {}
    for o in overrides:
        apply_override(base, o)
    data = base.get("data") if isinstance(base.get("data"), dict) else {}
    assets = data.get("assets") if isinstance(data.get("assets"), dict) else {}
    asset = spec.asset or data.get("quote")
    if asset not in assets:
        raise OptimizeError(f"{where(('asset',))}: asset {asset!r} is not in the base strategy's data.assets"
                            + (f" (have: {', '.join(assets)})" if assets else ""))
    folds = spec.folds()
    if spec.objective.metric == "sharpe_daily" and min(len(tr) for tr, _ in folds) < 2:
        raise OptimizeError(f"{where(('objective',))}: sharpe_daily needs at least 2 training days per fold")
    cat_path = Path(catalog).resolve() if catalog is not None else (
        (path.parent / spec.catalog).resolve() if spec.catalog else None)
    if cat_path is None and data.get("catalog"):
        cat_path = (strategy_path.parent / data["catalog"]).resolve()
    space = [entry.param(k) for k, entry in spec.space.items()]
    cfg = OptConfig(path, spec.name or path.stem, strategy_path, strategy_text, cat_path, asset, space,
                    spec.objective, folds, spec.trials, spec.seed, spec.sampler, spec.pruner, spec.parallel_trials,
                    [a for a, s in assets.items() if isinstance(s, dict) and "dates" in s], list(overrides))
    # A --set the search or the days would overwrite in every run is a mistake, not a setting.
    searched = [(p.path, ("space", p.path)) for p in space]
    searched += [(f"data.assets.{a}.dates", ("days",) if spec.days is not None else ("walk_forward",))
                 for a in cfg.dated_assets or [asset]]
    check_overrides(overrides, searched, where, OptimizeError, "change it in the optimisation file instead")
    if overrides:  # a bad --set is named as such, not as the first space value tried with it
        try:
            load_strategy(strategy_path, run_overrides(cfg, {}, folds[0][0][0]), text=strategy_text)
        except QuotelabError as exc:
            raise OptimizeError(f"{path}: the base strategy with --set {' '.join(overrides)} is invalid:\n  "
                                f"{exc}") from exc
    # Every path must be settable to every end of its range: checked now, before anything runs.
    for p in space:
        for v in (p.choices if p.kind == "categorical" else [_cast(p, p.low), _cast(p, p.high)]):
            ovr = run_overrides(cfg, {p.path: v}, folds[0][0][0])
            try:
                load_strategy(strategy_path, ovr, text=strategy_text)
            except QuotelabError as exc:
                why = made_by(str(exc), ovr[len(cfg.base_overrides):], "the trial's")
                raise OptimizeError(f"{where(('space', p.path))}: value {v!r} makes the strategy invalid:\n  "
                                    f"{why}") from exc
    return cfg


def _cast(p: Param, v: Any) -> Any:
    return int(v) if p.kind == "int" else v


def run_overrides(cfg: OptConfig, params: dict[str, Any], day: str) -> list[str]:
    """A run of ``params`` on ``day``: every asset of the strategy that reads catalog days reads that day."""
    days = [f"data.assets.{a}.dates={json.dumps([day])}" for a in cfg.dated_assets or [cfg.asset]]
    return cfg.base_overrides + days + [f"{k}={json.dumps(v)}" for k, v in params.items()]


def run_id(cfg: OptConfig, ovr: list[str]) -> str:
    text = json.dumps({"strategy": cfg.strategy_text, "overrides": ovr}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# The search
# ------------------------------------------------------------------------------------------------


@dataclass
class Optimizer:
    cfg: OptConfig
    out: Path
    pool: Any
    workers: int
    progress: Callable[[str], None] = print
    failures: Callable[[str], None] | None = None  # a line per failed run; None: to progress
    runs_done: int = 0
    runs_reused: int = 0
    store: Store = field(init=False)

    def __post_init__(self) -> None:
        self.store = Store(self.out)
        if self.failures is None:
            self.failures = self.progress

    def records(self, params_list: list[dict[str, Any]], day: str) -> list[dict[str, Any]]:
        """Run (or reuse the stored, finished run of) each parameter set on ``day``."""
        tasks, recs = [], {}
        for i, params in enumerate(params_list):
            ovr = run_overrides(self.cfg, params, day)
            rid = run_id(self.cfg, ovr)
            stored = [p for p in (record_path(self.out, rid), self.store.rescue and record_path(self.store.rescue, rid))
                      if p and p.exists()]
            if stored:
                rec = json.loads(stored[-1].read_text())
                if rec.get("status") == "done":
                    recs[i] = rec
                    self.runs_reused += 1
                    continue
            tasks.append((i, make_task(rid, f"{day} {params}", params, ovr, [day], self.cfg.strategy_path,
                                       self.cfg.strategy_text, self.cfg.catalog, self.out)))
        for k, rec in self.pool.stream([t for _, t in tasks]):  # stored as each finishes: a stop keeps them
            rec["executor"] = "optimize"
            self.store.record(rec)
            if rec.get("status") != "done" and self.failures is not None:
                self.failures(f"failed {rec['run_id']} {rec['label']}: {str(rec.get('error')).splitlines()[0]}")
            recs[tasks[k][0]] = rec
            self.runs_done += 1
        return [recs[i] for i in range(len(params_list))]

    def study(self, fold: int) -> Any:
        import optuna

        pruner = optuna.pruners.MedianPruner(n_startup_trials=max(2, self.cfg.parallel_trials), n_warmup_steps=0) \
            if self.cfg.pruner == "median" else optuna.pruners.NopPruner()
        study = optuna.create_study(study_name=f"{self.cfg.name}-fold{fold}", storage=storage_url(self.out),
                                    direction="maximize", load_if_exists=True, pruner=pruner)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # left running by an interrupted process
        return study

    def sampler(self, fold: int, finished: int) -> Any:
        import optuna

        seed = (self.cfg.seed * 1_000_003 + fold * 10_007 + finished) % (2 ** 32)
        if self.cfg.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(4, 2 * self.cfg.parallel_trials))

    def search(self, fold: int, days: list[str]) -> Any:
        import optuna

        TS = optuna.trial.TrialState
        study = self.study(fold)
        dists = {p.path: p.distribution() for p in self.cfg.space}
        errors: list[str] = []  # of this process's failed trials (a failed trial does not count toward trials)
        while True:
            finished = len(study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED)))
            if finished >= self.cfg.trials:
                return study
            study.sampler = self.sampler(fold, finished)
            trials = [study.ask(dists) for _ in range(min(self.cfg.parallel_trials, self.cfg.trials - finished))]
            # Outcomes are told together once the round ends: a round cut short leaves all its trials
            # running, so a resume asks the same round again with the same sampler seed.
            outcome: dict[int, Any] = {}
            active = list(range(len(trials)))
            per_day: dict[int, list[dict[str, Any]]] = {i: [] for i in active}
            for d, day in enumerate(days):
                recs = self.records([trials[i].params for i in active], day)
                still = []
                for i, rec in zip(active, recs, strict=True):
                    t = trials[i]
                    if rec.get("status") != "done":
                        t.set_user_attr("error", str(rec.get("error")))
                        errors.append(f"trial {t.number} on {day}: {rec.get('error')}")
                        outcome[i] = TS.FAIL
                        continue
                    per_day[i].append(rec)
                    t.set_user_attr(f"day_{day}", _day_summary(rec))
                    v = self.cfg.objective.value(per_day[i])
                    if math.isfinite(v):
                        t.report(v, d)
                        if d < len(days) - 1 and t.should_prune():
                            outcome[i] = TS.PRUNED
                            continue
                    still.append(i)
                active = still
            for i in active:
                v = self.cfg.objective.value(per_day[i])
                outcome[i] = v if math.isfinite(v) else TS.FAIL
            for i, t in enumerate(trials):
                o = outcome[i]
                if isinstance(o, TS):
                    study.tell(t, state=o)
                else:
                    study.tell(t, o)
            if len(errors) >= self.cfg.trials:  # else runs that always fail would be asked for forever
                raise OptimizeError(f"{self.cfg.file}: fold {fold}: {len(errors)} trials failed (trials: "
                                    f"{self.cfg.trials}), the first: {errors[0]}; fix that (each run's record is in "
                                    f"{self.out}/runs), then run the same command again")
            self.progress(f"fold {fold}: {len(study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED)))}"
                          f"/{self.cfg.trials} trials, best {study.best_value if _has_best(study) else 'none'}")


def _has_best(study: Any) -> bool:
    import optuna

    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def _day_summary(rec: dict[str, Any]) -> dict[str, Any]:
    s, d = rec.get("summary") or {}, rec.get("diagnostics") or {}
    return {"pnl_usd": s.get("pnl_usd"), "traded_notional_usd": s.get("traded_notional_usd"),
            "inventory_mean_abs": d.get("inventory_mean_abs"), "run_id": rec.get("run_id")}


def storage_url(out: Path) -> str:
    return f"sqlite:///{(out / 'optuna.db').resolve()}"


@dataclass
class OptResult:
    out: Path
    folds: list[dict[str, Any]]
    best_yaml: Path
    runs_done: int
    runs_reused: int
    seconds: float


def optimize(opt_file: str | Path, out: str | Path, catalog: str | Path | None = None, workers: int = 1,
             executor: str = "local", address: str | None = None, trials: int | None = None,
             progress: Callable[[str], None] = print, overrides: Sequence[str] = (),
             failures: Callable[[str], None] | None = None) -> OptResult:
    """Run (or resume) the optimisation; write trials.parquet, folds.json, best.yaml and optimize.json.
    ``failures`` gets a line per failed run (default: ``progress``)."""
    try:
        import optuna
    except ImportError:
        raise QuotelabError("quotelab optimize needs optuna, a dependency of quotelab: reinstall quotelab "
                             "(pip install -c constraints.txt -e .)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_opt(opt_file, catalog, overrides)
    if trials is not None:
        cfg.trials = trials
    if executor not in ("local", "ray") or workers < 1:
        raise OptimizeError(f"--executor must be local or ray and --workers >= 1, got {executor}, {workers}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool = RayPool(workers, address) if executor == "ray" else LocalPool(workers)
    opt = Optimizer(cfg, out, pool, workers, progress, failures)
    folds = []
    try:
        for f, (train, test) in enumerate(cfg.folds):
            study = opt.search(f, train)
            if not _has_best(study):
                raise OptimizeError(f"{cfg.file}: fold {f}: no trial completed; see the run records in {out}/runs")
            best = study.best_trial
            row: dict[str, Any] = {"fold": f, "train": train, "test": test, "best_trial": best.number,
                                   "params": best.params, "is_value": best.value,
                                   "is_per_day": [best.user_attrs.get(f"day_{d}") for d in train]}
            if test:
                recs = [opt.records([best.params], d)[0] for d in test]
                ok = all(r.get("status") == "done" for r in recs)
                row["oos_value"] = cfg.objective.value(recs) if ok else None
                row["oos_per_day"] = [_day_summary(r) for r in recs]
            folds.append(row)
    except Stopped as exc:
        note = f"; and {opt.store.note(RESUME)}" if opt.store.rescue else ""
        raise Stopped(f"optimize {exc}: {opt.runs_done} runs finished and recorded in {out}, {exc.cancelled} "
                      f"cancelled; {RESUME}{note}", exc.signum, exc.cancelled) from None
    except QuotelabError as exc:
        if opt.store.rescue is None:
            raise
        raise RunError(f"{exc}; and {opt.store.note(RESUME)}") from exc
    finally:
        pool.close()
    seconds = time.perf_counter() - t0
    store = opt.store

    def outputs(d: Path) -> Path:
        write_results(out, to=d, also=store.rescue)
        trials_table(cfg, out, to=d)
        best_yaml = write_best(cfg, folds[-1]["params"], d)
        cat.atomic_write_json(d / OPT_FILE, json_finite({
            "name": cfg.name, "file": str(cfg.file), "strategy": str(cfg.strategy_path), "storage": storage_url(out),
            "objective": {"metric": cfg.objective.metric, "inventory_penalty": cfg.objective.inventory_penalty},
            "space": [p.__dict__ for p in cfg.space], "trials": cfg.trials, "seed": cfg.seed, "folds": folds,
            "best_yaml": str(best_yaml), "runs_done": opt.runs_done, "runs_reused": opt.runs_reused,
            "seconds": round(seconds, 3)}))
        return best_yaml

    best_yaml = store.write("the results (results.parquet, trials.parquet, best.yaml, optimize.json)", outputs)
    store.close(RESUME)
    return OptResult(out, folds, best_yaml, opt.runs_done, opt.runs_reused, seconds)


def trials_table(cfg: OptConfig, out: Path, to: Path | None = None) -> Path:
    """trials.parquet (in ``to``, default ``out``): one row per trial of every fold of the study in ``out``,
    params as p.<path>, value, state, per-day values."""
    import optuna
    import polars as pl

    rows = []
    for f in range(len(cfg.folds)):
        try:
            study = optuna.load_study(study_name=f"{cfg.name}-fold{f}", storage=storage_url(out))
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False):
            row: dict[str, Any] = {"fold": f, "number": t.number, "state": t.state.name, "value": t.value,
                                   "intermediate": json.dumps(t.intermediate_values),
                                   "seconds": t.duration.total_seconds() if t.duration else None}
            row |= {f"p.{k}": (json.dumps(v) if isinstance(v, str | list) else float(v)) for k, v in t.params.items()}
            rows.append(row)
    path = (to or out) / "trials.parquet"
    df = pl.DataFrame(rows, strict=False) if rows else pl.DataFrame({"fold": pl.Series([], dtype=pl.Int64)})
    cat.atomic_write_bytes(path, lambda fh: df.write_parquet(fh))
    return path


def write_best(cfg: OptConfig, params: dict[str, Any], out: Path) -> Path:
    """The base strategy with the best parameters of the last fold applied: a strategy YAML ready to run."""
    raw, _ = load_yaml(cfg.strategy_path, cfg.strategy_text)
    for o in [*cfg.base_overrides, *(f"{k}={json.dumps(v)}" for k, v in params.items())]:
        apply_override(raw, o)
    if (raw.get("data") or {}).get("catalog") and not Path(raw["data"]["catalog"]).is_absolute():
        raw["data"]["catalog"] = str((cfg.strategy_path.parent / raw["data"]["catalog"]).resolve())
    if cfg.catalog is not None:
        raw["data"]["catalog"] = str(cfg.catalog)
    path = out / "best.yaml"
    head = (f"# quotelab optimize {cfg.file.name}: best of the last fold's trials, chosen on "
            f"{', '.join(cfg.folds[-1][0])}\n# " + ", ".join(f"{k} = {v}" for k, v in params.items()) + "\n")
    text = head + yaml.safe_dump(raw, sort_keys=False)
    cat.atomic_write_bytes(path, lambda fh: fh.write(text.encode()))
    return path


def report_section(results_dir: Path, out: Path, save: Callable[[Any, str], str]) -> str | None:
    """HTML for `quotelab report`: optimisation history, parameter importance and in- vs out-of-sample."""
    path = results_dir / OPT_FILE
    if not path.exists():
        return None
    import html

    import matplotlib.pyplot as plt
    import optuna

    info = json.loads(path.read_text())
    parts = ["<h2>Optimisation</h2>",
             f"<p>{html.escape(info['name'])}: objective {html.escape(info['objective']['metric'])}"
             f"{_penalty_text(info['objective']['inventory_penalty'])}"
             f", {info['trials']} trials per fold, seed {info['seed']}</p>"]
    rows = "".join(
        f"<tr><td>{f['fold']}</td><td>{', '.join(f['train'])}</td><td>{', '.join(f['test']) or '–'}</td>"
        f"<td>{html.escape(json.dumps(f['params']))}</td><td>{f['is_value']:.6g}</td>"
        f"<td>{'' if f.get('oos_value') is None else format(f['oos_value'], '.6g')}</td></tr>"
        for f in info["folds"])
    parts.append("<table><tr><th>fold</th><th>train days</th><th>test days</th><th>best params</th>"
                 f"<th>in-sample</th><th>out-of-sample</th></tr>{rows}</table>")
    for f in info["folds"]:
        study = optuna.load_study(study_name=f"{info['name']}-fold{f['fold']}", storage=info["storage"])
        done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        nums, vals = [t.number for t in done], [t.value for t in done]
        ax.plot(nums, vals, "o", ms=4, label="trial")
        ax.plot(nums, np.maximum.accumulate(vals), "-", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(info["objective"]["metric"])
        ax.set_title(f"fold {f['fold']}: history")
        ax.legend()
        parts.append(save(fig, f"opt_history_fold{f['fold']}.png"))
        if len(done) >= 3 and len(info["space"]) > 1:
            try:
                imp = optuna.importance.get_param_importances(study)
            except (RuntimeError, ValueError):
                imp = {}
            if imp:
                fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(imp)))
                ax.barh(list(imp)[::-1], list(imp.values())[::-1])
                ax.set_xlabel("importance (fANOVA)")
                ax.set_title(f"fold {f['fold']}: parameter importance")
                parts.append(save(fig, f"opt_importance_fold{f['fold']}.png"))
    return "\n".join(parts)


def _penalty_text(penalty: float) -> str:
    return f" − {penalty}·mean|inventory|" if penalty else ""


def summary_of(out: Path) -> dict[str, Any]:
    return json.loads((Path(out) / OPT_FILE).read_text())
