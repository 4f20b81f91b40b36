"""``quotelab train``: record features from the signal kernels, fit forecast models, validate, export.

Features are the outputs of registered signal kernels, replayed over catalog days on the engine's
grid (:mod:`quotelab.research.replay`), so a trained model sees exactly what a strategy computes online. The
target is the quote asset's future mid return in bps, ``1e4·ln(mid(t+h)/mid(t))``, with the mid taken
from the ``mid`` kernel in the same replay.

Leakage is guarded twice:

* **Walk-forward with a purge.** Fold k tests on a contiguous block and trains only on samples whose
  target window ends before the block starts (``t < test_start − purge``, ``purge ≥ horizon``).
* **Causality guard.** Walk-forward assumes that a feature at step t is a function of data known by
  t. The guard checks that assumption rather than trusting it: at each fold boundary T it rebuilds
  every feature from the data truncated to ``local_ts ≤ T`` and requires the values at steps ≤ T to
  be bitwise equal to the full-data ones. A feature that peeks at the future (a shift, a
  left-labelled resample) changes when the future is removed and is named in the error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, model_validator

from quotelab import layout as L
from quotelab import spool
from quotelab.component import PackContext
from quotelab.data.assets import Asset, load_assets, resolve_catalog
from quotelab.errors import ConfigError, DataError
from quotelab.outputs import check_record_budget, json_finite, write_or_rescue
from quotelab.research.evaluate import information_coefficient, rank_correlation
from quotelab.research.replay import context as replay_context
from quotelab.research.replay import prepare, replay
from quotelab.strategy import provenance
from quotelab.strategy.codegen import Part
from quotelab.strategy.composer import Composition, compose
from quotelab.strategy.config import (
    PART_NAME_RE,
    AssetData,
    DataSection,
    PartSpec,
    Path_,
    StrictModel,
    check_data_section,
    fmt_path,
    load_document,
    validate_part,
    where_in,
)
from quotelab.strategy.registry import Registry
from quotelab.units import Delay, Horizon, Step

MODEL_KINDS = ("linear", "ridge", "rolling_linear", "ensemble", "gradient_boosting")
LINEAR_KINDS = ("linear", "ridge")
MODEL_FILE_VERSION = 1


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


class FeatureSpec(StrictModel):
    """A strategy's ``forecast`` item without ``alpha``: any registered signal kernel."""

    kind: str
    params: dict[str, Any] = {}
    name: str | None = None


class ExternalSpec(StrictModel):
    """A series from a file (e.g. another venue's mid), resampled onto the grid."""

    name: str
    file: str
    time: str = Field("timestamp", description="Column of local receive times in ns (when the value is known).")
    value: str = "value"
    transform: Literal["value", "log_return"] = "value"
    horizon: int = Field(1, ge=1, description="Steps of the log return (bps) when transform is log_return.")


class GridSpec(StrictModel):
    step: Step = 0.1


class TargetSpec(StrictModel):
    horizon: Horizon = 1.0


class ModelSpec(StrictModel):
    kind: Literal["linear", "ridge", "rolling_linear", "ensemble", "gradient_boosting"] = "linear"
    file: str | None = Field(None, description="Apply a model written by an earlier run instead of fitting.")
    alpha: float = Field(1.0, ge=0, description="Ridge penalty.")
    window: Horizon = Field(60.0, description="rolling_linear: trailing window of samples.")
    refit: Horizon = Field(10.0, description="rolling_linear: refit every this long.")
    members: list[Literal["linear", "ridge", "gradient_boosting"]] = ["linear", "ridge", "gradient_boosting"]
    max_iter: int = Field(100, ge=1, description="gradient_boosting: boosting iterations.")
    max_depth: int = Field(3, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    early_stopping: bool = Field(True, description="gradient_boosting: choose the iterations on the last "
                                 "validation_fraction of the training samples in time (purged), then refit on all.")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    seed: int = 0
    max_rows: int = Field(2_000_000, ge=1000, description="gradient_boosting (alone or in an ensemble): the most "
                          "training rows a fit reads whole; past it the fit takes this many, evenly spaced in time, "
                          "and the report says so (sampled_rows). Linear and ridge fits always use every row.")


class ValidationSpec(StrictModel):
    folds: int = Field(5, ge=1)
    purge: Horizon | None = Field(None, description="Gap between training targets and a test block; >= horizon.")
    causality_check: bool = True


class TransferSpec(StrictModel):
    name: str
    catalog: str | None = None
    quote: str | None = None
    assets: dict[str, AssetData]


class ExportSpec(StrictModel):
    latency: Delay = Field(0.0, description="A precomputed value is usable only after timestamp + latency.")


class TrainConfig(StrictModel):
    name: str = "train"
    description: str = ""
    plugins: list[str] = []
    data: DataSection
    grid: GridSpec = GridSpec()
    features: list[FeatureSpec]
    external: list[ExternalSpec] = []
    target: TargetSpec = TargetSpec()
    model: ModelSpec = ModelSpec()
    validation: ValidationSpec = ValidationSpec()
    transfer: list[TransferSpec] = []
    export: ExportSpec = ExportSpec()

    @model_validator(mode="after")
    def _some_features(self) -> TrainConfig:
        if not self.features and not self.external:
            raise ValueError("give at least one feature (features: or external:)")
        return self


class LookAheadError(ConfigError):
    """A feature at step t changed when the data after t was removed: it reads the future."""


@dataclass
class TrainSetup:
    """A validated TRAIN.yaml with its registry and the feature parts, ready to replay."""

    config: TrainConfig
    file: Path
    lines: dict[Path_, int]
    registry: Registry
    parts: list[tuple[Path_, FeatureSpec, Any, Any]]  # (where, spec, component, params)
    names: list[str]  # feature names, model column order: kernels first, then external series
    overrides: Sequence[str] = ()  # the command line's --set PATH=VALUE, applied before validation

    def where(self, at: Path_) -> str:
        return where_in(self.file, self.lines)(at)

    @property
    def step_ns(self) -> int:
        return int(round(self.config.grid.step * 1e9))

    @property
    def horizon_steps(self) -> int:
        return int(round(self.config.target.horizon / self.config.grid.step))


def command_line(setup: TrainSetup) -> str:
    """``quotelab train FILE --set ...``: how to train this model again."""
    return " ".join(["quotelab train", setup.file.name, *(f"--set {shlex.quote(o)}" for o in setup.overrides)])


def feature_name(spec: FeatureSpec, params: Any) -> str:
    """A canonical name: the kind and every param, defaults included, so a model file pins them."""
    if spec.name:
        return spec.name
    dumped = params.model_dump(mode="json")
    inner = ", ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in dumped.items())
    return f"{spec.kind}({inner})"


def load_train(path: str | Path, registry: Registry | None = None, overrides: Sequence[str] = ()) -> TrainSetup:
    """Validate a TRAIN.yaml fully (envelope, every feature's params, units, purge) before any replay;
    ``overrides`` are the command line's ``--set PATH=VALUE``."""
    from quotelab.strategy.registry import load_registry

    path = Path(path)
    config, _raw, lines = load_document(path, TrainConfig, "a training file is a mapping with sections data, "
                                        "features, target, model, ...", overrides=overrides)
    where = where_in(path, lines)

    if registry is None:
        registry = load_registry(local_files=[(path.parent / p).resolve() for p in config.plugins])
    check_data_section(config.data, where)
    names = set(config.data.assets) | {"quoted"}
    parts = []
    for i, spec in enumerate(config.features):
        at = ("features", i)
        # A feature is a signal used as an input only, which is what alpha 0 says.
        ps = PartSpec(kind=spec.kind, params=spec.params, alpha=0)
        _, _, _, component, params = validate_part(registry, "signal", at, ps, path, lines, names, config.data.assets)
        if component.name == "linear_forecast":
            raise ConfigError(f"{where((*at, 'kind'))}: linear_forecast reads other components' outputs; "
                              "it is what training produces, not a feature")
        parts.append((at, spec, component, params))
    step = config.grid.step
    if not step > 0:
        raise ConfigError(f"{where(('grid', 'step'))}: step must be > 0")
    h = config.target.horizon / step
    if not config.target.horizon > 0 or abs(h - round(h)) > 1e-9:
        raise ConfigError(
            f"{where(('target', 'horizon'))}: horizon {config.target.horizon:g}s must be a positive whole number "
            f"of grid steps ({step:g}s)"
        )
    purge = config.validation.purge
    if purge is not None and purge + 1e-12 < config.target.horizon:
        raise ConfigError(
            f"{where(('validation', 'purge'))}: purge {purge:g}s is shorter than target.horizon "
            f"{config.target.horizon:g}s, so training targets would overlap the test block; "
            f"fix: purge >= {config.target.horizon:g}s"
        )
    seen: dict[str, Path_] = {}
    fnames = [feature_name(spec, params) for _, spec, _, params in parts] + [e.name for e in config.external]
    ats = [at for at, *_ in parts] + [("external", i) for i in range(len(config.external))]
    for n, at in zip(fnames, ats, strict=True):
        if n in seen:
            raise ConfigError(f"{where(at)}: feature {n!r} is listed twice (first at {fmt_path(seen[n])})")
        seen[n] = at
    for i, t in enumerate(config.transfer):
        missing = sorted(set(config.data.assets) - set(t.assets))
        if missing:
            raise ConfigError(
                f"{where(('transfer', i, 'assets'))}: transfer {t.name!r} has no asset named "
                f"{', '.join(missing)}; the features read data.assets by name, so give each one"
            )
        if (t.quote or config.data.quote) not in t.assets:
            raise ConfigError(f"{where(('transfer', i, 'quote'))}: quote asset is not in its assets")
    return TrainSetup(config, path, lines, registry, parts, fnames, list(overrides))


# ------------------------------------------------------------------------------------------------
# Feature recording
# ------------------------------------------------------------------------------------------------


@dataclass
class FeatureFrame:
    """Per ready grid step: timestamp (ns), the quote asset's mid and the features (model column order)."""

    timestamps: np.ndarray
    mid: np.ndarray
    X: np.ndarray
    names: list[str]
    origin_ns: int
    # The earliest last event among the assets read: after it some book is frozen at its last state,
    # so features and targets there describe no market (the grid itself runs to the last event of all).
    data_end_ns: int = np.iinfo(np.int64).max


@dataclass
class Dataset:
    """One data section loaded for replay: assets in ``data.assets`` order and the quoted index."""

    name: str
    assets: list[Asset]
    quoted: int
    labels: dict[str, str]  # asset name → venue/symbol

    def describe(self) -> str:
        return self.labels[self.assets[self.quoted].name]


def load_dataset(
    name: str, data: DataSection, base_dir: Path, where: Callable[[Path_], str], catalog: Path | None
) -> Dataset:
    """Load a data section with the backtest's own loader (same instruments, same checks)."""
    assets = load_assets(data, base_dir, where, resolve_catalog(base_dir, data.catalog, catalog))
    return Dataset(name, assets, [a.name for a in assets].index(data.quote),
                   {a.name: f"{a.venue}/{a.symbol}" for a in assets})


def check_grid_budget(setup: TrainSetup, ds: Dataset) -> None:
    """Refuse, before replaying, a grid whose recorded steps would not fit in memory (a 1 µs grid)."""
    from quotelab.data import catalog as cat

    span = max(cat.last_ts(a.events[-1]) for a in ds.assets) - min(cat.first_ts(a.events[0]) for a in ds.assets)
    step = setup.config.grid.step
    check_record_budget(int(span / 1e9 / step), 8 * (3 + len(setup.parts) + len(ds.assets)),
                        setup.where(("grid", "step")), f"{span / 1e9:g} s of {ds.name} data on a {step:g} s grid",
                        "use a longer grid.step or fewer days")


def _context(ds: Dataset) -> PackContext:
    return replay_context(ds.assets, ds.quoted)


def feature_composition(setup: TrainSetup, ds: Dataset) -> tuple[Composition, list[int], int]:
    """mid of the quote asset (component 0), then each feature kernel, composed as a strategy would be.

    Returns the composition, the assets that must have a book before a step counts (as the engine's
    ready mask) and the depth levels to fill.
    """
    reg = setup.registry
    ctx = _context(ds)
    mid = reg.get("fair_value", "mid")
    fv = Part(mid, mid.make_params({}), "target mid")
    signals = [Part(c, p, fmt_path(at)) for at, _, c, p in setup.parts]
    ready = {ds.quoted}
    levels = 1
    for _, _, c, p in setup.parts:
        reads = c.reads(p)
        ready |= {ctx.asset_index[a] for a in reads.assets}
        levels = max(levels, reads.depth_levels)
    return compose([fv], signals, [], None, ctx), sorted(ready), levels


class _Truncated(Sequence[np.ndarray]):
    """An asset's parts cut at a time, each read and cut when the replay asks for it (a part at a
    time, as the parts themselves), then the no-op row at the cut."""

    def __init__(self, events: Sequence[np.ndarray], end_ns: int) -> None:
        from hftbacktest.types import LOCAL_EVENT

        self.events, self.end_ns = events, end_ns
        self.tick = np.zeros(1, dtype=events[0].dtype)
        self.tick["ev"] = LOCAL_EVENT
        self.tick["local_ts"] = end_ns
        self.tick["exch_ts"] = end_ns

    def __len__(self) -> int:
        return len(self.events) + 1

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i == len(self.events):
            return self.tick
        e = self.events[i]
        return e[e["local_ts"] <= self.end_ns]


def truncate(assets: Sequence[Asset], end_ns: int) -> list[Asset]:
    """Each asset's events known locally by ``end_ns`` (what a live process would have seen), read
    and cut a part at a time as the replay goes.

    A no-op row (local flag, no event kind) at ``end_ns`` keeps the grid running up to the cut: the
    replay's grid ends at the last event, and the step at the cut is the one a one-step look-ahead
    would change.
    """
    return [dataclasses.replace(a, events=_Truncated(a.events, end_ns)) for a in assets]


def resample_external(
    ts: np.ndarray, values: np.ndarray, grid_ns: np.ndarray, origin_ns: int, step_ns: int
) -> np.ndarray:
    """The last value with ``ts <= t`` at each grid time t, forward filled (NaN before the first).

    polars ``group_by_dynamic`` as in the seed study, but right-closed and right-labelled: the window
    (t − step, t] is labelled t, so the value at t was known at t. The default (left-closed, labelled
    at its start) would hand step t the last value of [t, t + step), a look-ahead of up to one step.
    """
    import polars as pl

    if not len(ts):
        return np.full(len(grid_ns), np.nan)
    df = pl.DataFrame({"t": np.asarray(ts, dtype=np.int64) - origin_ns, "v": np.asarray(values, dtype=np.float64)})
    df = df.sort("t", maintain_order=True)
    res = df.group_by_dynamic("t", every=f"{step_ns}i", closed="right", label="right").agg(pl.col("v").last())
    grid = pl.DataFrame({"t": np.asarray(grid_ns, dtype=np.int64) - origin_ns})
    # Observations older than the first grid step are still "known" at it: join_asof carries them in.
    joined = grid.sort("t").join_asof(res.sort("t"), on="t", strategy="backward")
    return joined["v"].fill_null(strategy="forward").to_numpy().astype(np.float64)


def _read_external(spec: ExternalSpec, base: Path, where: str) -> tuple[np.ndarray, np.ndarray]:
    import polars as pl

    path = (base / spec.file).resolve()
    if not path.exists():
        raise DataError(f"{where}: file {path} not found")
    try:
        df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    except Exception as exc:  # polars raises many types for unreadable files
        raise DataError(f"{where}: cannot read {path}: {exc}") from exc
    for col in (spec.time, spec.value):
        if col not in df.columns:
            raise DataError(f"{where}: {path} has no column {col!r} (columns: {', '.join(df.columns)})")
    return df[spec.time].cast(pl.Int64).to_numpy(), df[spec.value].cast(pl.Float64).to_numpy()


def _transform(spec: ExternalSpec, v: np.ndarray, grid_ns: np.ndarray, step_ns: int) -> np.ndarray:
    if spec.transform == "value":
        return v
    # the grid has no holes once ready, but look the lagged time up anyway so a hole never misaligns
    out = np.full(len(v), np.nan)
    lag = grid_ns - spec.horizon * step_ns
    j = np.searchsorted(grid_ns, lag)
    ok = (j < len(grid_ns)) & (grid_ns[np.minimum(j, len(grid_ns) - 1)] == lag)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[ok] = 1e4 * np.log(v[ok] / v[j[ok]])
    return out


class FeatureRecorder:
    """Builds a dataset's FeatureFrame, optionally from data truncated at a time (the causality guard)."""

    def __init__(self, setup: TrainSetup, ds: Dataset) -> None:
        self.setup = setup
        self.ds = ds
        self.comp, self.ready, self.levels = feature_composition(setup, ds)
        self.origin_ns = ds.assets[ds.quoted].first_ts()
        self.data = prepare(ds.assets)
        self.data_end_ns = min(ds.assets[i].last_ts() for i in self.ready)
        self.external = [
            _read_external(e, setup.file.parent, setup.where(("external", i, "file")))
            for i, e in enumerate(setup.config.external)
        ]

    def __call__(self, end_ns: int | None = None) -> FeatureFrame:
        data = self.data if end_ns is None else truncate(self.ds.assets, end_ns)
        step_ns = self.setup.step_ns
        n_k = len(self.setup.parts)
        # only the mid and the features: a day on a 100 ms grid would keep ~1 GB of full out rows
        res = replay(data, self.comp.kernel, self.comp.params, self.comp.state.copy(), quoted=self.ds.quoted,
                     step=self.setup.config.grid.step, origin_ns=self.origin_ns, n_levels=self.levels,
                     ready=self.ready, keep_out=True, out_columns=range(L.COMPONENTS, L.COMPONENTS + 1 + n_k))
        n = len(res.timestamps)
        # the features in a scratch file (file-backed pages), copied out of the spooled records a chunk at a time
        X = spool.scratch(n, np.float64, (n_k + len(self.external),))
        for lo, hi in spool.chunks(n):
            X[lo:hi, :n_k] = res.outs[lo:hi, 1:1 + n_k]
        for j, (spec, (ts, v)) in enumerate(zip(self.setup.config.external, self.external, strict=True)):
            if end_ns is not None:
                keep = ts <= end_ns
                ts, v = ts[keep], v[keep]
            r = resample_external(ts, v, res.timestamps, self.origin_ns, step_ns)  # whole: an external file's series
            X[:, n_k + j] = _transform(spec, r, res.timestamps, step_ns)
        return FeatureFrame(res.timestamps, res.outs[:, 0], X, list(self.setup.names), self.origin_ns,
                            self.data_end_ns)


def future_return(frame: FeatureFrame, horizon_steps: int, step_ns: int) -> np.ndarray:
    """1e4·ln(mid(t + h)/mid(t)) by grid time (NaN where t + h is not a recorded step), a chunk of
    steps at a time into a scratch file."""
    ts, mid = np.asarray(frame.timestamps), np.asarray(frame.mid)
    n = len(ts)
    y = spool.scratch(n)
    for lo, hi in spool.chunks(n):
        want = ts[lo:hi] + horizon_steps * step_ns
        j = np.searchsorted(ts, want)
        ok = (j < n) & (ts[np.minimum(j, n - 1)] == want)
        out = np.full(hi - lo, np.nan)
        out[ok] = 1e4 * np.log(mid[j[ok]] / mid[lo:hi][ok])
        y[lo:hi] = out
    return y


# ------------------------------------------------------------------------------------------------
# Causality guard
# ------------------------------------------------------------------------------------------------


@dataclass
class CausalityReport:
    cuts: list[int]
    checked_steps: int


def check_causality(
    build: Callable[[int | None], FeatureFrame], cuts: Sequence[int], full: FeatureFrame | None = None,
    where: Callable[[int], str] = lambda j: f"feature {j}",
) -> CausalityReport:
    """Raise LookAheadError unless every feature at every step ≤ each cut is unchanged by truncation.

    Bitwise, because features come from deterministic kernels: an honest feature recomputed from
    the same past gives the same float, and any difference means it read something after the cut.
    """
    full = build(None) if full is None else full
    checked = 0
    full_ts, full_X = np.asarray(full.timestamps), np.asarray(full.X)
    for cut in cuts:
        part = build(int(cut))
        m = int(np.searchsorted(part.timestamps, cut, side="right"))  # the steps <= cut (the grid is in order)
        for lo, hi in spool.chunks(m):  # a chunk of steps at a time: both frames are as long as the data
            ts = np.asarray(part.timestamps[lo:hi])
            idx = np.searchsorted(full_ts, ts)
            if idx.max() >= len(full_ts) or not np.array_equal(full_ts[idx], ts):
                raise LookAheadError(f"causality guard: truncating at {cut} changed which steps are ready")
            a, b = np.asarray(part.X[lo:hi]), full_X[idx]
            same = (a == b) | (np.isnan(a) & np.isnan(b))
            if not same.all():
                row, col = np.argwhere(~same)[0]
                raise LookAheadError(
                    f"{where(int(col))}: look-ahead: its value at {int(ts[row])} ns is {b[row, col]!r} with the full "
                    f"data but {a[row, col]!r} when data after {int(cut)} ns is removed, so it reads data from after "
                    f"its own step; fix: compute it only from data with local_ts <= the step (shift it back, "
                    f"right-label resampled series)"
                )
        checked += m
    return CausalityReport([int(c) for c in cuts], checked)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


class SufficientLinear:
    """Least squares with an intercept, and ridge (``alpha`` > 0: + alpha·|w|² on the coefficients,
    not the intercept), solved from sums over the rows taken a chunk at a time: the means, then the
    centred cross-products XcᵀXc and Xcᵀyc (p × p and p, whatever the number of rows). The centred
    normal equations are what sklearn's Ridge solves; LinearRegression solves the same least-squares
    problem from the rows (lstsq), so its coefficients agree to float rounding (a rank-deficient X
    gets the minimum-norm solution from both)."""

    def __init__(self, alpha: float = 0.0) -> None:
        self.alpha = alpha

    def fit(self, X: np.ndarray, y: np.ndarray) -> SufficientLinear:
        n, p = X.shape
        sx, sy = np.zeros(p), 0.0
        for lo, hi in spool.chunks(n):
            sx += np.asarray(X[lo:hi], dtype=np.float64).sum(axis=0)
            sy += float(np.sum(y[lo:hi]))
        mx, my = sx / n, sy / n
        gram, xty = np.zeros((p, p)), np.zeros(p)
        for lo, hi in spool.chunks(n):
            xc = np.asarray(X[lo:hi], dtype=np.float64) - mx
            gram += xc.T @ xc
            xty += xc.T @ (np.asarray(y[lo:hi], dtype=np.float64) - my)
        if self.alpha > 0:
            self.coef_ = np.linalg.solve(gram + self.alpha * np.eye(p), xty)
        else:
            self.coef_ = np.linalg.lstsq(gram, xty, rcond=None)[0]
        self.intercept_ = float(my - mx @ self.coef_)
        self.n_features_in_ = p
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.coef_ + self.intercept_


def _estimator(kind: str, spec: ModelSpec) -> Any:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import LinearRegression

    if kind == "linear":
        return SufficientLinear()
    if kind == "ridge":
        return SufficientLinear(spec.alpha)
    if kind == "rolling_linear":  # a trailing window's rows, bounded by its length: fitted from them
        return LinearRegression()
    if kind == "gradient_boosting":
        # sklearn's own early stopping validates on a random split (on by default past 10,000 samples):
        # with overlapping targets that leaks the future into the choice; train.py splits by time instead.
        return HistGradientBoostingRegressor(max_iter=spec.max_iter, max_depth=spec.max_depth,
                                             learning_rate=spec.learning_rate, random_state=spec.seed,
                                             early_stopping=False)
    raise ConfigError(f"unknown model kind {kind!r}")


def _spread_rows(n: int, most: int) -> np.ndarray | None:
    """``most`` row numbers evenly spaced over ``n`` rows (first and last included), or None if n <= most."""
    return None if n <= most else np.unique(np.linspace(0, n - 1, most).round().astype(np.int64))


class StaticModel:
    """A model fitted once on a training set: linear, ridge, gradient boosting, or their average.

    Linear and ridge read every row a chunk at a time (:class:`SufficientLinear`); gradient boosting
    needs its rows in memory, so past ``spec.max_rows`` it takes that many, evenly spaced in time
    (``sampled``: the rows there were and the rows it used)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        kinds = spec.members if spec.kind == "ensemble" else [spec.kind]
        self.members = [_estimator(k, spec) for k in kinds]
        self.sampled: tuple[int, int] | None = None

    def fit(self, X: np.ndarray, y: np.ndarray, t: np.ndarray | None = None, purge_ns: int = 0) -> StaticModel:
        """Fit on samples in time order (``t``, ns: needed for gradient boosting's early stopping)."""
        rows = None
        for i, m in enumerate(self.members):
            if isinstance(m, SufficientLinear):
                m.fit(X, y)
                continue
            if rows is None:
                rows = _spread_rows(len(y), self.spec.max_rows)
                if rows is not None:
                    self.sampled = (len(y), len(rows))
                    X, y, t = X[rows], y[rows], (None if t is None else t[rows])
                rows = slice(None)
            if type(m).__name__ == "HistGradientBoostingRegressor" and self.spec.early_stopping and t is not None:
                self.members[i] = m = _boosting_iterations(m, X, y, t, purge_ns, self.spec.validation_fraction)
            m.fit(np.asarray(X), np.asarray(y))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The members' mean prediction, a chunk of rows at a time (into a scratch file when long)."""
        out = spool.scratch(len(X))
        for lo, hi in spool.chunks(len(X)):
            x = np.asarray(X[lo:hi])
            out[lo:hi] = (self.members[0].predict(x) if len(self.members) == 1
                          else np.mean([m.predict(x) for m in self.members], axis=0))
        return out

    def linear(self) -> tuple[np.ndarray, float] | None:
        """(coefficients, intercept) when the model is one linear map."""
        if self.spec.kind in LINEAR_KINDS:
            m = self.members[0]
            return np.asarray(m.coef_, dtype=np.float64), float(m.intercept_)
        return None


def _boosting_iterations(est: Any, X: np.ndarray, y: np.ndarray, t: np.ndarray, purge_ns: int,
                         fraction: float) -> Any:
    """A copy of ``est`` whose max_iter is the best on a time-ordered validation split.

    Validation: the last ``fraction`` of the samples in time; training: the samples whose targets end
    before it (t < its start − purge). The iteration count with the lowest validation MSE is kept.
    """
    from sklearn.base import clone

    n_val = int(len(y) * fraction)
    if n_val < 20:
        return est
    start = t[len(y) - n_val]
    train = t < start - purge_ns
    if train.sum() < 20:
        return est
    probe = clone(est).fit(X[train], y[train])
    val = slice(len(y) - n_val, len(y))
    losses = [float(np.mean((y[val] - p) ** 2)) for p in probe.staged_predict(X[val])]
    return clone(est).set_params(max_iter=int(np.argmin(losses)) + 1)


def _finite_pairs(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``y`` and ``p`` where both are finite, gathered a chunk at a time (spooled past a chunk)."""
    ys, ps = spool.Spool(np.float64), spool.Spool(np.float64)
    for lo, hi in spool.chunks(len(y)):
        a, b = np.asarray(y[lo:hi]), np.asarray(p[lo:hi])
        ok = np.isfinite(a) & np.isfinite(b)
        ys.add(a[ok])
        ps.add(b[ok])
    return ys.array(), ps.array()


def _mean(y: np.ndarray) -> float:
    return sum(float(np.sum(y[lo:hi])) for lo, hi in spool.chunks(len(y))) / len(y)


def _r2(y: np.ndarray, p: np.ndarray) -> float:
    if len(y) < 2:
        return float("nan")
    mean, sst, sse = _mean(y), 0.0, 0.0
    for lo, hi in spool.chunks(len(y)):
        a = np.asarray(y[lo:hi])
        sst += float(np.sum((a - mean) ** 2))
        sse += float(np.sum((a - np.asarray(p[lo:hi])) ** 2))
    return 1.0 - sse / sst if sst > 0 else float("nan")


def _ic(y: np.ndarray, p: np.ndarray) -> float:
    """Spearman's IC of finite ``y`` and ``p`` in bounded memory (evaluate's rank_correlation: sorted
    scratch copies); with a non-finite value, the in-memory one, whose ranks put NaN last."""
    if all(np.isfinite(y[lo:hi]).all() and np.isfinite(p[lo:hi]).all() for lo, hi in spool.chunks(len(y))):
        return rank_correlation(y, p)
    return information_coefficient(np.asarray(y), np.asarray(p))


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """R² against the block's own mean (sklearn's definition) and the Spearman IC."""
    return {"r2": _r2(y, p), "ic": _ic(y, p), "n": int(len(y))}


def _as_slice(block: np.ndarray | slice) -> slice:
    """A test block (contiguous rows) as a slice: an index array gives its first to last row."""
    if isinstance(block, slice):
        return block
    return slice(int(block[0]), int(block[-1]) + 1) if len(block) else slice(0, 0)


def block_scores(y: np.ndarray, p: np.ndarray, blocks: Sequence[np.ndarray | slice]) -> dict[str, Any]:
    """IC per test block, their mean and spread, and the pooled IC of within-block demeaned values.

    Each block's model has its own intercept: ranking the raw concatenation scores those level shifts
    (a pure-noise feature got |IC| > 0.05 that way); demeaning each block first removes them.
    """
    ics = []
    yd, pd_ = spool.Spool(np.float64), spool.Spool(np.float64)
    for b in map(_as_slice, blocks):
        yb, pb = _finite_pairs(y[b], p[b])
        if len(yb) < 3:
            continue
        ics.append(_ic(yb, pb))
        my, mp = _mean(yb), _mean(pb)
        for lo, hi in spool.chunks(len(yb)):
            yd.add(np.asarray(yb[lo:hi]) - my)
            pd_.add(np.asarray(pb[lo:hi]) - mp)
    pooled = _ic(yd.array(), pd_.array()) if yd.rows else float("nan")
    finite = [v for v in ics if math.isfinite(v)]
    return {"ic": pooled, "ic_fold_mean": float(np.mean(finite)) if finite else float("nan"),
            "ic_fold_std": float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan"), "ic_folds": ics}


def _nan_rows(n: int) -> np.ndarray:
    out = spool.scratch(n)
    for lo, hi in spool.chunks(n):
        out[lo:hi] = np.nan
    return out


def causal_transfer_predict(spec: ModelSpec, X_src: np.ndarray, y_src: np.ndarray, t_src: np.ndarray,
                            X_dst: np.ndarray, t_dst: np.ndarray, blocks: Sequence[np.ndarray | slice],
                            purge_ns: int) -> np.ndarray:
    """Predictions on each target test block from a source model fitted only on source samples whose
    targets end before the block starts (t < start − purge: the samples are in time order, so the
    first ones), as the walk-forward does natively."""
    pred = _nan_rows(len(t_dst))
    for b in map(_as_slice, blocks):
        stop = int(np.searchsorted(t_src, t_dst[b.start] - purge_ns, side="left"))
        if stop > X_src.shape[1] + 1:
            pred[b] = StaticModel(spec).fit(X_src[:stop], y_src[:stop], t_src[:stop], purge_ns).predict(X_dst[b])
    return pred


@dataclass
class Fold:
    """Fold ``index``: train on samples ``[0, train_stop)``, test on ``[test_start, test_stop)``."""

    index: int
    train_stop: int
    test_start: int
    test_stop: int

    @property
    def train(self) -> np.ndarray:
        """The training samples' indices."""
        return np.arange(self.train_stop)

    @property
    def test(self) -> np.ndarray:
        """The test block's sample indices."""
        return np.arange(self.test_start, self.test_stop)

    @property
    def test_rows(self) -> slice:
        return slice(self.test_start, self.test_stop)


def walk_forward(t: np.ndarray, folds: int, purge_ns: int) -> list[Fold]:
    """K+1 equal blocks in time; fold k tests on block k and trains on everything before it minus the purge.

    The purge drops training samples whose target window (t, t + horizon] could reach into the test
    block: a training sample at t is kept only if t < test_start − purge (samples are in time order,
    so those are the first ones).
    """
    n = len(t)
    edges = np.linspace(0, n, folds + 2).astype(np.int64)
    out = []
    for k in range(1, folds + 1):
        start = t[edges[k]]
        out.append(Fold(k, int(np.searchsorted(t, start - purge_ns, side="left")), int(edges[k]),
                        int(edges[k + 1])))
    return out


@dataclass
class FitResult:
    folds: list[dict[str, Any]]
    oos_pred: np.ndarray  # NaN outside test blocks
    final: StaticModel | None  # fitted on every sample (what is exported)
    overall: dict[str, Any]


def _coef_dict(names: list[str], model: StaticModel) -> dict[str, Any] | None:
    lin = model.linear()
    if lin is None:
        return None
    return {"intercept": lin[1], **{n: float(c) for n, c in zip(names, lin[0], strict=True)}}


def _rolling_predict(spec: ModelSpec, X: np.ndarray, y: np.ndarray, t: np.ndarray, test: np.ndarray | slice,
                     purge_ns: int) -> tuple[np.ndarray, list[np.ndarray], float, float]:
    """Refit every ``refit`` on the trailing ``window`` of samples whose targets are known (t' < r − purge).
    Samples are in time order, so a window and a refit's block are runs of rows."""
    window_ns, refit_ns = int(spec.window * 1e9), int(spec.refit * 1e9)
    test = _as_slice(test)
    tt = np.asarray(t[test])
    pred = _nan_rows(len(tt))
    coefs = []
    is_y, is_p = spool.Spool(np.float64), spool.Spool(np.float64)
    r = tt[0]
    while r <= tt[-1]:
        b0, b1 = np.searchsorted(tt, [r, r + refit_ns], side="left")  # tt in [r, r + refit)
        f0, f1 = np.searchsorted(t, [r - purge_ns - window_ns, r - purge_ns], side="left")
        if b1 > b0 and f1 - f0 > X.shape[1] + 1:
            m = _estimator("rolling_linear", spec).fit(X[f0:f1], y[f0:f1])
            pred[b0:b1] = m.predict(X[test.start + b0:test.start + b1])
            coefs.append(np.r_[m.intercept_, m.coef_])
            is_y.add(y[f0:f1])
            is_p.add(m.predict(X[f0:f1]))
        r += refit_ns
    iy, ip = is_y.array(), is_p.array()
    return pred, coefs, _r2(iy, ip), _ic(iy, ip)


def fit_walk_forward(spec: ModelSpec, X: np.ndarray, y: np.ndarray, t: np.ndarray, names: list[str],
                     folds: int, purge_ns: int) -> FitResult:
    """Walk-forward scores per fold and overall (out-of-sample = every test block together)."""
    oos = _nan_rows(len(y))
    rows = []
    sampled: list[tuple[int, int]] = []
    for f in walk_forward(t, folds, purge_ns):
        te, tr = f.test_rows, slice(0, f.train_stop)
        row: dict[str, Any] = {"fold": f.index, "n_train": f.train_stop, "n_test": f.test_stop - f.test_start,
                               "test_start_ns": int(t[f.test_start]), "test_end_ns": int(t[f.test_stop - 1])}
        if spec.kind == "rolling_linear":
            p, coefs, is_r2, is_ic = _rolling_predict(spec, X, y, t, te, purge_ns)
            row |= {"is_r2": is_r2, "is_ic": is_ic, "refits": len(coefs),
                    "coef": ({"intercept": float(np.mean([c[0] for c in coefs])),
                              **{n: float(np.mean([c[1 + i] for c in coefs])) for i, n in enumerate(names)}}
                             if coefs else None)}
            oos[te] = p
            s = scores(*_finite_pairs(y[te], p))
        else:
            if f.train_stop <= X.shape[1] + 1:
                raise DataError(f"fold {f.index}: {f.train_stop} training samples after the purge; use fewer "
                                f"folds, a shorter purge or more data")
            m = StaticModel(spec).fit(X[tr], y[tr], t[tr], purge_ns)
            sampled += [m.sampled] if m.sampled else []
            s_in = scores(y[tr], m.predict(X[tr]))
            p = m.predict(X[te])
            oos[te] = p
            s = scores(y[te], p)
            row |= {"is_r2": s_in["r2"], "is_ic": s_in["ic"], "coef": _coef_dict(names, m)}
        row |= {"oos_r2": s["r2"], "oos_ic": s["ic"], "n_scored": s["n"]}
        rows.append(row)
    s_oos = scores(*_finite_pairs(y, oos))
    bs = block_scores(y, oos, [f.test_rows for f in walk_forward(t, folds, purge_ns)])
    final = None if spec.kind == "rolling_linear" else StaticModel(spec).fit(X, y, t, purge_ns)
    overall: dict[str, Any] = {"oos_r2": s_oos["r2"], "oos_ic": bs["ic"], "oos_ic_fold_mean": bs["ic_fold_mean"],
                               "oos_ic_fold_std": bs["ic_fold_std"], "n_oos": s_oos["n"], "n": int(len(y))}
    if final is not None:
        sampled += [final.sampled] if final.sampled else []
        s_in = scores(y, final.predict(X))
        overall |= {"is_r2": s_in["r2"], "is_ic": s_in["ic"], "coef": _coef_dict(names, final)}
        if spec.kind == "gradient_boosting":
            overall["importance"] = _importance(final, X, y, names, spec.seed, spec.max_rows)
    if sampled:
        most = max(sampled)
        overall["sampled_rows"] = {"rows": most[0], "used": most[1], "max_rows": spec.max_rows}
        warnings.warn(f"train: gradient boosting fitted on {most[1]:,} of {most[0]:,} training rows, evenly spaced "
                      f"in time (model.max_rows {spec.max_rows:,}); raise model.max_rows to use more", stacklevel=2)
    return FitResult(rows, oos, final, overall)


def _importance(model: StaticModel, X: np.ndarray, y: np.ndarray, names: list[str], seed: int,
                max_rows: int | None = None) -> dict[str, float]:
    from sklearn.inspection import permutation_importance

    rows = _spread_rows(len(y), max_rows) if max_rows else None
    if rows is not None:
        X, y = X[rows], y[rows]
    r = permutation_importance(model.members[0], np.asarray(X), np.asarray(y), n_repeats=3, random_state=seed)
    return {n: float(v) for n, v in zip(names, r.importances_mean, strict=True)}


# ------------------------------------------------------------------------------------------------
# Model files
# ------------------------------------------------------------------------------------------------


def model_document(setup: TrainSetup, model: StaticModel, provenance: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    c = setup.config
    doc: dict[str, Any] = {"provenance": provenance,
        "quotelab_model": MODEL_FILE_VERSION, "kind": c.model.kind, "features": list(setup.names),
        "feature_specs": [{"kind": s.kind, "params": s.params} for _, s, _, _ in setup.parts]
        + [e.model_dump() for e in c.external],
        "target": {"quote": c.data.quote, "horizon_s": c.target.horizon, "unit": "bps"},
        "step_s": c.grid.step, "trained_on": setup.file.name,
    }
    lin = model.linear()
    if lin is not None:
        doc["coefficients"] = [float(v) for v in lin[0]]
        doc["intercept"] = lin[1]
    return doc


def load_model_file(setup: TrainSetup) -> StaticModel:
    """A model written by an earlier run; its features must be this file's, in this order."""
    c = setup.config
    path = (setup.file.parent / c.model.file).resolve()
    at = ("model", "file")
    if not path.exists():
        raise ConfigError(f"{setup.where(at)}: model file {path} not found")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{setup.where(at)}: {path} is not JSON ({exc}); give a model.json written by "
                          "quotelab train --out") from exc
    if not isinstance(doc, dict) or doc.get("quotelab_model") != MODEL_FILE_VERSION:
        raise ConfigError(f"{setup.where(at)}: {path} is not a quotelab model file (version {MODEL_FILE_VERSION})")
    have = list(doc.get("features", []))
    if have != setup.names:
        if sorted(have) == sorted(setup.names):
            what = "the same features in a different order"
        else:
            extra = [n for n in setup.names if n not in have]
            lost = [n for n in have if n not in setup.names]
            what = "different features" + (f"; not in the model: {extra}" if extra else "") + (
                f"; missing here: {lost}" if lost else "")
        raise ConfigError(
            f"{setup.where(('features',))}: the model file {path} was trained on {what}.\n"
            f"  model file: {have}\n  this file:  {setup.names}\n"
            f"  fix: list the features exactly as the model file does (kinds, params, order), or retrain"
        )
    for key, want, got in (("step_s", c.grid.step, doc.get("step_s")),
                           ("horizon_s", c.target.horizon, doc.get("target", {}).get("horizon_s"))):
        if got is None or abs(float(got) - want) > 1e-12:
            place = ("grid", "step") if key == "step_s" else ("target", "horizon")
            raise ConfigError(f"{setup.where(place)}: the model file {path} was trained with {key} {got}, "
                              f"this file has {want:g}; fix: use the model's value or retrain")
    spec = ModelSpec(kind=doc["kind"]) if doc["kind"] in MODEL_KINDS else None
    if spec is None or doc["kind"] not in LINEAR_KINDS:
        raise ConfigError(f"{setup.where(at)}: only linear model files can be re-applied, got {doc['kind']!r}; "
                          "a non-linear model ships as its precomputed predictions")
    m = StaticModel(spec)
    est = SufficientLinear()
    est.coef_ = np.asarray(doc["coefficients"], dtype=np.float64)
    est.intercept_ = float(doc["intercept"])
    est.n_features_in_ = len(est.coef_)
    m.members = [est]
    return m


def forecast_block(setup: TrainSetup, model: StaticModel, provenance: dict[str, Any] | None = None) -> str:
    """A ``forecast:`` block that reproduces the linear model inside a strategy (paste it as is)."""
    lin = model.linear()
    if lin is None:
        raise ConfigError("only a linear model exports as a linear_forecast block")
    if setup.config.external:
        raise ConfigError(f"{setup.where(('external',))}: external series have no kernel in a strategy, so a "
                          "model that uses them cannot become a linear_forecast block; use its predictions file")
    c = setup.config
    # Each feature part is named, and linear_forecast reads them by name: the block can go anywhere in
    # a strategy's forecast list, after any fair values, as long as the names are not used there already.
    names = [s.name if s.name and PART_NAME_RE.fullmatch(s.name) else f"feature_{i}_{s.kind}"
             for i, (_, s, _, _) in enumerate(setup.parts)]
    items: list[dict[str, Any]] = [
        {"kind": s.kind, "name": n, "alpha": 0, "params": json.loads(json.dumps(s.params))}
        for n, (_, s, _, _) in zip(names, setup.parts, strict=True)
    ]
    items.append({"kind": "linear_forecast", "alpha": "1bps", "params": {
        "inputs": names, "coefficients": [float(v) for v in lin[0]], "intercept": float(lin[1]),
        "features": [s.kind for _, s, _, _ in setup.parts]} | ({"provenance": provenance} if provenance else {})})
    head = (
        f"# Trained by `{command_line(setup)}`: {c.model.kind} model of the {c.target.horizon:g}s future\n"
        f"# mid return of {c.data.quote!r}, in bps; `alpha: 1bps` turns it into a price offset of the fair value.\n"
        f"# The features feed linear_forecast only: `alpha: 0` makes a signal an input, not a forecast term.\n"
        f"# linear_forecast reads them by name: paste this into a strategy's forecast list (with the same asset\n"
        f"# names), keeping the features before linear_forecast.\n"
    )
    return head + yaml.safe_dump({"forecast": items}, sort_keys=False, default_flow_style=None, width=120)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def _kept(a: np.ndarray, keep: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` rows of ``a`` where ``keep``, gathered a chunk at a time into a scratch file."""
    out = spool.scratch(n, a.dtype, a.shape[1:])
    at = 0
    for lo, hi in spool.chunks(len(keep)):
        got = np.asarray(a[lo:hi])[np.asarray(keep[lo:hi])]
        out[at:at + len(got)] = got
        at += len(got)
    return out


@dataclass
class Samples:
    frame: FeatureFrame
    y: np.ndarray
    keep: np.ndarray  # rows of frame with finite features and target
    pred: np.ndarray | None = None  # causal out-of-sample predictions (transfer), NaN outside test blocks

    @cached_property
    def n(self) -> int:
        return int(sum(int(np.count_nonzero(self.keep[lo:hi])) for lo, hi in spool.chunks(len(self.keep))))

    # the kept rows, gathered once (scratch files past a chunk): each is as long as the data
    @cached_property
    def X(self) -> np.ndarray:
        return _kept(self.frame.X, self.keep, self.n)

    @cached_property
    def t(self) -> np.ndarray:
        return _kept(self.frame.timestamps, self.keep, self.n)

    @cached_property
    def target(self) -> np.ndarray:
        return _kept(self.y, self.keep, self.n)


def samples(setup: TrainSetup, frame: FeatureFrame, label: str) -> Samples:
    c = setup.config
    if not len(frame.timestamps):
        raise DataError(f"{setup.where(('data',))}: {label}: empty window: no grid step has a two-sided book on "
                        f"every asset the features read; fix: check the dates and that the data has depth")
    ts = frame.timestamps
    live = int(np.searchsorted(ts, frame.data_end_ns, side="right"))  # the grid is in order: the first steps
    span = (ts[live - 1] - ts[0]) * 1e-9 if live else 0.0
    if setup.horizon_steps >= live:
        raise ConfigError(f"{setup.where(('target', 'horizon'))}: horizon {c.target.horizon:g}s is longer than "
                          f"the data of {label} ({span:.1f}s of ready steps); fix: shorten it or add dates")
    y = future_return(frame, setup.horizon_steps, setup.step_ns)
    keep = spool.scratch(len(ts), np.bool_)
    for lo, hi in spool.chunks(len(ts)):
        keep[lo:hi] = (np.isfinite(y[lo:hi]) & np.isfinite(frame.X[lo:hi]).all(axis=1)
                       & (ts[lo:hi] + setup.horizon_steps * setup.step_ns <= frame.data_end_ns))
    smp = Samples(frame, y, keep)
    if smp.n < 2 * (c.validation.folds + 1) * (frame.X.shape[1] + 2):
        raise DataError(f"{setup.where(('validation', 'folds'))}: {label}: {smp.n} usable samples are "
                        f"too few for {c.validation.folds} folds of {frame.X.shape[1]} features; fix: fewer folds "
                        f"or more data")
    return smp


@dataclass
class TrainResult:
    report: dict[str, Any]
    fit: FitResult | None
    model: StaticModel | None
    samples: dict[str, Samples] = field(default_factory=dict)
    out_dir: Path | None = None


def run_train(path: str | Path, catalog: str | Path | None = None, out_dir: str | Path | None = None,
              registry: Registry | None = None, strict: bool = False, overrides: Sequence[str] = ()
              ) -> TrainResult:
    """Validate, record features, walk forward, transfer, export. Returns the report and fitted model."""
    setup = load_train(path, registry, overrides)
    c = setup.config
    base = setup.file.parent
    catalog = Path(catalog) if catalog is not None else None
    purge_s = c.validation.purge if c.validation.purge is not None else c.target.horizon
    purge_ns = int(round(purge_s * 1e9))
    ds = load_dataset("native", c.data, base, setup.where, catalog)
    check_grid_budget(setup, ds)
    recorder = FeatureRecorder(setup, ds)
    frame = recorder()
    smp = samples(setup, frame, ds.describe())
    all_samples = {"native": smp}
    report: dict[str, Any] = {
        "name": c.name, "file": str(setup.file), "overrides": list(setup.overrides), "quote": ds.describe(),
        "step_s": c.grid.step, "horizon_s": c.target.horizon, "purge_s": purge_s, "features": setup.names,
        "model": c.model.kind, "steps": int(len(frame.timestamps)), "samples": smp.n,
    }
    fit: FitResult | None = None
    if c.model.file is None:
        fit = fit_walk_forward(c.model, smp.X, smp.target, smp.t, setup.names, c.validation.folds, purge_ns)
        model = fit.final
        report["folds"] = fit.folds
        report["overall"] = fit.overall
        test_blocks = [f for f in walk_forward(smp.t, c.validation.folds, purge_ns)]
        report["provenance"] = provenance.training_provenance(c.data.assets, c.grid.step, c.target.horizon,
                                                              smp.X, smp.target)
    else:
        model = load_model_file(setup)
        prov = json.loads((setup.file.parent / c.model.file).resolve().read_text()).get("provenance")
        days = provenance.check(prov, c.grid.step, c.data.assets, setup.where(("model", "file")),
                                f"the model file {c.model.file}", strict)
        provenance.warn(days, f"the model file {c.model.file}")
        report["in_sample"] = days
        s = scores(smp.target, model.predict(smp.X))
        # scores on the model's own training days are in-sample, whatever the column is called
        kind = "is" if days else "oos"
        report["overall"] = {f"{kind}_r2": s["r2"], f"{kind}_ic": s["ic"], f"n_{kind}": s["n"],
                             "coef": _coef_dict(setup.names, model)}
        test_blocks = []
    if c.validation.causality_check:
        cuts = _cuts(smp.t, test_blocks, c.validation.folds)
        rep = check_causality(recorder, cuts, full=frame, where=lambda j: _feature_where(setup, j))
        report["causality"] = {"cuts": len(rep.cuts), "checked_steps": rep.checked_steps, "ok": True}
    report["transfer"] = _transfer(setup, c, base, catalog, ds, smp, fit, model, purge_ns, all_samples)
    result = TrainResult(json_finite(report), fit, model, all_samples)
    if out_dir is not None:
        result.out_dir = write_or_rescue(lambda d: write_outputs(setup, result, d), Path(out_dir), "training results")
    return result


def _cuts(t: np.ndarray, folds: list[Fold], n_folds: int) -> list[int]:
    if folds:
        starts = [int(t[f.test[0]]) for f in folds]
        mids = [int(t[f.test[len(f.test) // 2]]) for f in folds]
        return sorted(set(starts + mids))
    idx = np.linspace(0, len(t) - 1, n_folds + 2).astype(np.int64)[1:-1]
    return [int(t[i]) for i in idx]


def _feature_where(setup: TrainSetup, j: int) -> str:
    n_k = len(setup.parts)
    at = setup.parts[j][0] if j < n_k else ("external", j - n_k)
    return f"{setup.where(at)} ({setup.names[j]})"


def _transfer(setup: TrainSetup, c: TrainConfig, base: Path, catalog: Path | None, native: Dataset,
              smp: Samples, fit: FitResult | None, model: StaticModel | None, purge_ns: int,
              all_samples: dict[str, Samples]) -> list[dict[str, Any]]:
    rows = []
    if fit is not None:
        s = scores(*_finite_pairs(smp.target, fit.oos_pred))
        ic = fit.overall["oos_ic"]
        rows.append({"dataset": "native", "asset": native.describe(), "n": s["n"], "native_oos_r2": s["r2"],
                     "native_oos_ic": ic, "transfer_r2": s["r2"], "transfer_ic": ic})
    for i, t in enumerate(c.transfer):
        data = DataSection(catalog=t.catalog if t.catalog is not None else c.data.catalog,
                           quote=t.quote or c.data.quote, assets=t.assets)

        def where(at: Path_, i: int = i) -> str:
            if at and at[0] == "data":
                at = ("transfer", i, *at[1:])
            return setup.where(at)

        check_data_section(data, where)
        ds = load_dataset(t.name, data, base, where, catalog)
        check_grid_budget(setup, ds)
        rec = FeatureRecorder(setup, ds)
        ts = samples(setup, rec(), f"transfer {t.name!r} ({ds.describe()})")
        all_samples[t.name] = ts
        row: dict[str, Any] = {"dataset": t.name, "asset": ds.describe()}
        if c.model.kind == "rolling_linear" and c.model.file is None:
            nf = fit_walk_forward(c.model, ts.X, ts.target, ts.t, setup.names, c.validation.folds, purge_ns)
            row |= {"n": nf.overall["n_oos"], "native_oos_r2": nf.overall["oos_r2"],
                    "native_oos_ic": nf.overall["oos_ic"], "transfer_r2": None, "transfer_ic": None,
                    "note": "an adaptive model refits on the target's own data; no transfer"}
        elif fit is not None:
            # native: the same model spec walked forward on the target; transfer: on the same test blocks, a
            # source model fitted only on source samples from before each block (minus the purge), so both
            # are causal and scored on identical samples
            nf = fit_walk_forward(c.model, ts.X, ts.target, ts.t, setup.names, c.validation.folds, purge_ns)
            blocks = [f.test_rows for f in walk_forward(ts.t, c.validation.folds, purge_ns)]
            pred = causal_transfer_predict(c.model, smp.X, smp.target, smp.t, ts.X, ts.t, blocks, purge_ns)
            for lo, hi in spool.chunks(len(pred)):
                pred[lo:hi][~np.isfinite(nf.oos_pred[lo:hi])] = np.nan
            ts.pred = pred
            st = scores(*_finite_pairs(ts.target, pred))
            bs = block_scores(ts.target, pred, blocks)
            row |= {"n": st["n"], "native_oos_r2": nf.overall["oos_r2"], "native_oos_ic": nf.overall["oos_ic"],
                    "transfer_r2": st["r2"], "transfer_ic": bs["ic"], "transfer_ic_fold_mean": bs["ic_fold_mean"],
                    "transfer_ic_fold_std": bs["ic_fold_std"]}
        else:
            st = scores(ts.target, model.predict(ts.X))
            row |= {"n": st["n"], "native_oos_r2": None, "native_oos_ic": None, "transfer_r2": st["r2"],
                    "transfer_ic": st["ic"]}
        rows.append(row)
    return rows


def write_outputs(setup: TrainSetup, result: TrainResult, out: Path) -> Path:
    """report.json, folds.csv, transfer.csv, model.json, forecast.yaml (linear) and predictions per dataset."""
    import polars as pl

    from quotelab.data.catalog import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    rep = result.report
    files: dict[str, str] = {}
    if rep.get("folds"):
        folds = [{k: v for k, v in r.items() if k != "coef"}
                 | {f"coef:{k}": v for k, v in (r.get("coef") or {}).items()} for r in rep["folds"]]
        pl.DataFrame(folds).write_csv(out / "folds.csv")
        files["folds"] = "folds.csv"
    if rep.get("transfer"):
        pl.DataFrame(rep["transfer"], infer_schema_length=None).write_csv(out / "transfer.csv")
        files["transfer"] = "transfer.csv"
    model = result.model
    if model is not None and setup.config.model.file is None:
        prov = rep.get("provenance")
        atomic_write_json(out / "model.json", json_finite(model_document(setup, model, prov)))
        files["model"] = "model.json"
        if model.linear() is not None and not setup.config.external:
            (out / "forecast.yaml").write_text(forecast_block(setup, model, prov))
            files["forecast"] = "forecast.yaml"
    latency_ns = int(round(setup.config.export.latency * 1e9))
    for name, smp in result.samples.items():
        if name == "native" and result.fit is not None:
            pred = result.fit.oos_pred  # out-of-sample only: in-sample predictions would leak into a backtest
        elif smp.pred is not None:
            pred = smp.pred  # transfer: the causal source models' predictions, NaN outside test blocks
        elif model is not None:
            pred = model.predict(smp.X)
        else:
            continue
        _write_predictions(smp, pred, latency_ns, out / f"predictions_{name}.parquet")
        files[f"predictions_{name}"] = f"predictions_{name}.parquet"
    rep["outputs"] = files
    atomic_write_json(out / "report.json", rep)
    return out


def _write_predictions(smp: Samples, pred: np.ndarray, latency_ns: int, path: Path) -> None:
    """Every grid step's prediction (NaN where it has none), a parquet piece per chunk of steps joined
    by polars' streaming sink: a chunk in memory at a time, as run --out writes its series."""
    import polars as pl

    ts = smp.frame.timestamps
    with tempfile.TemporaryDirectory(prefix=".predictions-", dir=path.parent) as pieces:
        files, at = [], 0
        for lo, hi in spool.chunks(len(ts)):
            keep = np.asarray(smp.keep[lo:hi])
            value = np.full(hi - lo, np.nan)
            value[keep] = pred[at:at + int(keep.sum())]
            at += int(keep.sum())
            t = np.asarray(ts[lo:hi])
            files.append(Path(pieces) / f"{lo:012d}.parquet")
            pl.DataFrame({"timestamp": t, "usable_ts": t + latency_ns, "value": value}).write_parquet(files[-1])
        tmp = path.parent / f".{path.name}.tmp"
        try:
            if files:
                pl.scan_parquet(files).sink_parquet(tmp)
            else:
                pl.DataFrame({"timestamp": [], "usable_ts": [], "value": []}, schema={
                    "timestamp": pl.Int64, "usable_ts": pl.Int64, "value": pl.Float64}).write_parquet(tmp)
            tmp.replace(path)
        except BaseException:  # a full disk, or a Ctrl-C while writing: no half file left in --out
            tmp.unlink(missing_ok=True)
            raise
