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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, model_validator

from quotelab import layout as L
from quotelab.component import PackContext
from quotelab.data.assets import Asset, load_assets, resolve_catalog
from quotelab.errors import ConfigError, DataError
from quotelab.outputs import check_record_budget, json_finite, write_or_rescue
from quotelab.research.evaluate import information_coefficient
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
        cols = [res.outs[:, 1 + i] for i in range(n_k)]
        for spec, (ts, v) in zip(self.setup.config.external, self.external, strict=True):
            if end_ns is not None:
                keep = ts <= end_ns
                ts, v = ts[keep], v[keep]
            r = resample_external(ts, v, res.timestamps, self.origin_ns, step_ns)
            cols.append(_transform(spec, r, res.timestamps, step_ns))
        X = np.column_stack(cols) if cols else np.zeros((len(res.timestamps), 0))
        return FeatureFrame(res.timestamps, res.outs[:, 0].copy(), X, list(self.setup.names),
                            self.origin_ns, self.data_end_ns)


def future_return(frame: FeatureFrame, horizon_steps: int, step_ns: int) -> np.ndarray:
    """1e4·ln(mid(t + h)/mid(t)) by grid time (NaN where t + h is not a recorded step)."""
    ts = frame.timestamps
    want = ts + horizon_steps * step_ns
    j = np.searchsorted(ts, want)
    ok = (j < len(ts)) & (ts[np.minimum(j, len(ts) - 1)] == want)
    y = np.full(len(ts), np.nan)
    y[ok] = 1e4 * np.log(frame.mid[j[ok]] / frame.mid[ok])
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
    for cut in cuts:
        part = build(int(cut))
        keep = part.timestamps <= cut
        ts = part.timestamps[keep]
        idx = np.searchsorted(full.timestamps, ts)
        if len(ts) and (idx.max() >= len(full.timestamps) or not np.array_equal(full.timestamps[idx], ts)):
            raise LookAheadError(f"causality guard: truncating at {cut} changed which steps are ready")
        a, b = part.X[keep], full.X[idx]
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        if not same.all():
            row, col = np.argwhere(~same)[0]
            raise LookAheadError(
                f"{where(int(col))}: look-ahead: its value at {int(ts[row])} ns is {b[row, col]!r} with the full "
                f"data but {a[row, col]!r} when data after {int(cut)} ns is removed, so it reads data from after "
                f"its own step; fix: compute it only from data with local_ts <= the step (shift it back, "
                f"right-label resampled series)"
            )
        checked += int(keep.sum())
    return CausalityReport([int(c) for c in cuts], checked)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def _estimator(kind: str, spec: ModelSpec) -> Any:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import LinearRegression, Ridge

    if kind in ("linear", "rolling_linear"):
        return LinearRegression()
    if kind == "ridge":
        return Ridge(alpha=spec.alpha)
    if kind == "gradient_boosting":
        # sklearn's own early stopping validates on a random split (on by default past 10,000 samples):
        # with overlapping targets that leaks the future into the choice; train.py splits by time instead.
        return HistGradientBoostingRegressor(max_iter=spec.max_iter, max_depth=spec.max_depth,
                                             learning_rate=spec.learning_rate, random_state=spec.seed,
                                             early_stopping=False)
    raise ConfigError(f"unknown model kind {kind!r}")


class StaticModel:
    """A model fitted once on a training set: linear, ridge, gradient boosting, or their average."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        kinds = spec.members if spec.kind == "ensemble" else [spec.kind]
        self.members = [_estimator(k, spec) for k in kinds]

    def fit(self, X: np.ndarray, y: np.ndarray, t: np.ndarray | None = None, purge_ns: int = 0) -> StaticModel:
        """Fit on samples in time order (``t``, ns: needed for gradient boosting's early stopping)."""
        for i, m in enumerate(self.members):
            if type(m).__name__ == "HistGradientBoostingRegressor" and self.spec.early_stopping and t is not None:
                self.members[i] = m = _boosting_iterations(m, X, y, t, purge_ns, self.spec.validation_fraction)
            m.fit(X, y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.mean([m.predict(X) for m in self.members], axis=0)

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


def _r2(y: np.ndarray, p: np.ndarray) -> float:
    if len(y) < 2:
        return float("nan")
    sst = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - p) ** 2)) / sst if sst > 0 else float("nan")


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """R² against the block's own mean (sklearn's definition) and the Spearman IC."""
    return {"r2": _r2(y, p), "ic": information_coefficient(y, p), "n": int(len(y))}


def block_scores(y: np.ndarray, p: np.ndarray, blocks: list[np.ndarray]) -> dict[str, Any]:
    """IC per test block, their mean and spread, and the pooled IC of within-block demeaned values.

    Each block's model has its own intercept: ranking the raw concatenation scores those level shifts
    (a pure-noise feature got |IC| > 0.05 that way); demeaning each block first removes them.
    """
    ics, yd, pd_ = [], [], []
    for b in blocks:
        b = b[np.isfinite(p[b])]
        if len(b) < 3:
            continue
        ics.append(information_coefficient(y[b], p[b]))
        yd.append(y[b] - y[b].mean())
        pd_.append(p[b] - p[b].mean())
    pooled = information_coefficient(np.concatenate(yd), np.concatenate(pd_)) if yd else float("nan")
    finite = [v for v in ics if math.isfinite(v)]
    return {"ic": pooled, "ic_fold_mean": float(np.mean(finite)) if finite else float("nan"),
            "ic_fold_std": float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan"), "ic_folds": ics}


def causal_transfer_predict(spec: ModelSpec, X_src: np.ndarray, y_src: np.ndarray, t_src: np.ndarray,
                            X_dst: np.ndarray, t_dst: np.ndarray, blocks: list[np.ndarray], purge_ns: int
                            ) -> np.ndarray:
    """Predictions on each target test block from a source model fitted only on source samples whose
    targets end before the block starts (t < start − purge), as the walk-forward does natively."""
    pred = np.full(len(t_dst), np.nan)
    for b in blocks:
        train = t_src < t_dst[b[0]] - purge_ns
        if train.sum() > X_src.shape[1] + 1:
            pred[b] = StaticModel(spec).fit(X_src[train], y_src[train], t_src[train], purge_ns).predict(X_dst[b])
    return pred


@dataclass
class Fold:
    index: int
    train: np.ndarray  # sample indices
    test: np.ndarray


def walk_forward(t: np.ndarray, folds: int, purge_ns: int) -> list[Fold]:
    """K+1 equal blocks in time; fold k tests on block k and trains on everything before it minus the purge.

    The purge drops training samples whose target window (t, t + horizon] could reach into the test
    block: a training sample at t is kept only if t < test_start − purge.
    """
    n = len(t)
    edges = np.linspace(0, n, folds + 2).astype(np.int64)
    out = []
    for k in range(1, folds + 1):
        test = np.arange(edges[k], edges[k + 1])
        start = t[edges[k]]
        train = np.flatnonzero(t < start - purge_ns)
        out.append(Fold(k, train, test))
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


def _rolling_predict(spec: ModelSpec, X: np.ndarray, y: np.ndarray, t: np.ndarray, test: np.ndarray,
                     purge_ns: int) -> tuple[np.ndarray, list[np.ndarray], float, float]:
    """Refit every ``refit`` on the trailing ``window`` of samples whose targets are known (t' < r − purge)."""
    window_ns, refit_ns = int(spec.window * 1e9), int(spec.refit * 1e9)
    pred = np.full(len(test), np.nan)
    coefs = []
    is_y, is_p = [], []
    tt = t[test]
    r = tt[0]
    while r <= tt[-1]:
        block = (tt >= r) & (tt < r + refit_ns)
        fit_mask = (t < r - purge_ns) & (t >= r - purge_ns - window_ns)
        if block.any() and fit_mask.sum() > X.shape[1] + 1:
            m = _estimator("linear", spec).fit(X[fit_mask], y[fit_mask])
            pred[block] = m.predict(X[test[block]])
            coefs.append(np.r_[m.intercept_, m.coef_])
            is_y.append(y[fit_mask])
            is_p.append(m.predict(X[fit_mask]))
        r += refit_ns
    iy, ip = (np.concatenate(is_y), np.concatenate(is_p)) if is_y else (np.zeros(0), np.zeros(0))
    return pred, coefs, _r2(iy, ip), information_coefficient(iy, ip)


def fit_walk_forward(spec: ModelSpec, X: np.ndarray, y: np.ndarray, t: np.ndarray, names: list[str],
                     folds: int, purge_ns: int) -> FitResult:
    """Walk-forward scores per fold and overall (out-of-sample = every test block together)."""
    oos = np.full(len(y), np.nan)
    rows = []
    for f in walk_forward(t, folds, purge_ns):
        row: dict[str, Any] = {"fold": f.index, "n_train": int(len(f.train)), "n_test": int(len(f.test)),
                               "test_start_ns": int(t[f.test[0]]), "test_end_ns": int(t[f.test[-1]])}
        if spec.kind == "rolling_linear":
            p, coefs, is_r2, is_ic = _rolling_predict(spec, X, y, t, f.test, purge_ns)
            ok = np.isfinite(p)
            row |= {"is_r2": is_r2, "is_ic": is_ic, "refits": len(coefs),
                    "coef": ({"intercept": float(np.mean([c[0] for c in coefs])),
                              **{n: float(np.mean([c[1 + i] for c in coefs])) for i, n in enumerate(names)}}
                             if coefs else None)}
            oos[f.test[ok]] = p[ok]
            s = scores(y[f.test[ok]], p[ok])
        else:
            if len(f.train) <= X.shape[1] + 1:
                raise DataError(f"fold {f.index}: {len(f.train)} training samples after the purge; use fewer "
                                f"folds, a shorter purge or more data")
            m = StaticModel(spec).fit(X[f.train], y[f.train], t[f.train], purge_ns)
            s_in = scores(y[f.train], m.predict(X[f.train]))
            p = m.predict(X[f.test])
            oos[f.test] = p
            s = scores(y[f.test], p)
            row |= {"is_r2": s_in["r2"], "is_ic": s_in["ic"], "coef": _coef_dict(names, m)}
        row |= {"oos_r2": s["r2"], "oos_ic": s["ic"], "n_scored": s["n"]}
        rows.append(row)
    ok = np.isfinite(oos)
    s_oos = scores(y[ok], oos[ok])
    bs = block_scores(y, oos, [f.test for f in walk_forward(t, folds, purge_ns)])
    final = None if spec.kind == "rolling_linear" else StaticModel(spec).fit(X, y, t, purge_ns)
    overall: dict[str, Any] = {"oos_r2": s_oos["r2"], "oos_ic": bs["ic"], "oos_ic_fold_mean": bs["ic_fold_mean"],
                               "oos_ic_fold_std": bs["ic_fold_std"], "n_oos": s_oos["n"], "n": int(len(y))}
    if final is not None:
        s_in = scores(y, final.predict(X))
        overall |= {"is_r2": s_in["r2"], "is_ic": s_in["ic"], "coef": _coef_dict(names, final)}
        if spec.kind == "gradient_boosting":
            overall["importance"] = _importance(final, X, y, names, spec.seed)
    return FitResult(rows, oos, final, overall)


def _importance(model: StaticModel, X: np.ndarray, y: np.ndarray, names: list[str], seed: int) -> dict[str, float]:
    from sklearn.inspection import permutation_importance

    r = permutation_importance(model.members[0], X, y, n_repeats=3, random_state=seed)
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
    from sklearn.linear_model import LinearRegression

    m = StaticModel(spec)
    est = LinearRegression()
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


@dataclass
class Samples:
    frame: FeatureFrame
    y: np.ndarray
    keep: np.ndarray  # rows of frame with finite features and target
    pred: np.ndarray | None = None  # causal out-of-sample predictions (transfer), NaN outside test blocks

    @property
    def X(self) -> np.ndarray:
        return self.frame.X[self.keep]

    @property
    def t(self) -> np.ndarray:
        return self.frame.timestamps[self.keep]

    @property
    def target(self) -> np.ndarray:
        return self.y[self.keep]


def samples(setup: TrainSetup, frame: FeatureFrame, label: str) -> Samples:
    c = setup.config
    if not len(frame.timestamps):
        raise DataError(f"{setup.where(('data',))}: {label}: empty window: no grid step has a two-sided book on "
                        f"every asset the features read; fix: check the dates and that the data has depth")
    live = frame.timestamps <= frame.data_end_ns
    span = (frame.timestamps[live][-1] - frame.timestamps[0]) * 1e-9 if live.any() else 0.0
    if setup.horizon_steps >= live.sum():
        raise ConfigError(f"{setup.where(('target', 'horizon'))}: horizon {c.target.horizon:g}s is longer than "
                          f"the data of {label} ({span:.1f}s of ready steps); fix: shorten it or add dates")
    y = future_return(frame, setup.horizon_steps, setup.step_ns)
    keep = np.isfinite(y) & np.isfinite(frame.X).all(axis=1)
    keep &= frame.timestamps + setup.horizon_steps * setup.step_ns <= frame.data_end_ns
    if keep.sum() < 2 * (c.validation.folds + 1) * (frame.X.shape[1] + 2):
        raise DataError(f"{setup.where(('validation', 'folds'))}: {label}: {int(keep.sum())} usable samples are "
                        f"too few for {c.validation.folds} folds of {frame.X.shape[1]} features; fix: fewer folds "
                        f"or more data")
    return Samples(frame, y, keep)


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
        "model": c.model.kind, "steps": int(len(frame.timestamps)), "samples": int(smp.keep.sum()),
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
        ok = np.isfinite(fit.oos_pred)
        s = scores(smp.target[ok], fit.oos_pred[ok])
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
            blocks = [f.test for f in walk_forward(ts.t, c.validation.folds, purge_ns)]
            pred = causal_transfer_predict(c.model, smp.X, smp.target, smp.t, ts.X, ts.t, blocks, purge_ns)
            pred[~np.isfinite(nf.oos_pred)] = np.nan
            ts.pred = pred
            ok = np.isfinite(pred)
            st = scores(ts.target[ok], pred[ok])
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
        full = np.full(len(smp.frame.timestamps), np.nan)
        full[smp.keep] = pred
        pl.DataFrame({"timestamp": smp.frame.timestamps, "usable_ts": smp.frame.timestamps + latency_ns,
                      "value": full}).write_parquet(out / f"predictions_{name}.parquet")
        files[f"predictions_{name}"] = f"predictions_{name}.parquet"
    rep["outputs"] = files
    atomic_write_json(out / "report.json", rep)
    return out
