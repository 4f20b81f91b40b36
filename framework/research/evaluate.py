"""Score fair values and fair value + forecast combinations, built from the strategies' own kernels.

``quotelab evaluate EVAL.yaml`` replays catalog days once per target asset (no hftbacktest: the
book is rebuilt by :mod:`quotelab.research.replay`, exactly as a strategy sees it) and, on the engine's
grid, runs every estimator in one fused kernel, the *bank*. What is evaluated is therefore what a
strategy would trade. Each estimator is scored against

* the future mid of the target at each horizon (error, bias, IC of its deviation from the mid),
* the next trades: each trade is matched with the latest estimate at or before its exchange time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from quotelab import spool
from quotelab.component import PackContext
from quotelab.data import catalog as cat
from quotelab.data.assets import Asset, load_assets, resolve_catalog
from quotelab.errors import ConfigError, DataError
from quotelab.outputs import check_record_budget, write_or_rescue
from quotelab.strategy.codegen import EST_BASE, MAX_ESTIMATORS, PROBE_MID, Blend, bank_source, load_module, pack
from quotelab.strategy.composer import part_of
from quotelab.strategy.config import (
    DataSection,
    PartSpec,
    StrictModel,
    ValidatedPart,
    check_component_inputs,
    check_data_section,
    load_document,
    validate_part,
    where_in,
)
from quotelab.units import Horizon, Step

GRID_ONLY = frozenset({"step", "horizons", "imbalance_buckets", "spread_buckets", "plots"})
TRADES_ONLY = frozenset({"aggregate_trades", "match"})


class EstimatorSpec(StrictModel):
    name: str
    fair_value: list[PartSpec]
    forecast: list[PartSpec] = []
    note: str = Field("", description="Carried into the output rows, e.g. a convention of the estimator's source.")


class EvalConfig(StrictModel):
    name: str = "evaluation"
    description: str = ""
    plugins: list[str] = []
    data: DataSection
    targets: list[str] | None = Field(None, description="Assets to score on (default: data.quote).")
    score: Literal["grid", "trades"] = Field(
        "grid",
        description="grid: replay on the step grid, score against future mids and the next trades. trades: the "
        "seed study's procedure, one kernel call per trade on the book as of its exchange time.",
    )
    aggregate_trades: bool = Field(
        True, description="score: trades only: one trade per time and side (first price, summed quantity)."
    )
    match: Literal["before_local", "exchange_inclusive"] = Field(
        "before_local", description="score: trades only: the book a trade meets. before_local: what a trader could "
        "have seen, the rows received strictly before the trade was (local time); exchange_inclusive: the seed "
        "study's, the book as of the trade's exchange time, equal times included.")
    notes: list[str] = Field([], description="Conventions of the study, echoed into the summary.")
    step: Step = 0.1
    horizons: list[Horizon] = Field([0.1, 1.0, 10.0, 60.0], min_length=1)
    estimators: list[EstimatorSpec]
    imbalance_buckets: int = Field(10, ge=2, le=100)
    spread_buckets: int = Field(4, ge=1, le=50)
    plots: bool = True

    @field_validator("estimators")
    @classmethod
    def _names(cls, v: list[EstimatorSpec]) -> list[EstimatorSpec]:
        names = [e.name for e in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"estimator names must be unique; repeated: {', '.join(sorted(dup))}")
        if not 1 <= len(v) <= MAX_ESTIMATORS:
            raise ValueError(f"between 1 and {MAX_ESTIMATORS} estimators expected, got {len(v)}")
        return v


# --------------------------------------------------------------------------------------------------
# The bank: every estimator in one kernel
# --------------------------------------------------------------------------------------------------


def build_bank(blends: list[Blend], ctx: PackContext, quoted: int) -> tuple[Any, np.ndarray, np.ndarray]:
    """Compile (or reuse from the disk cache) the bank kernel; return it with its params and state."""
    params: list[float] = [float(quoted)]
    packed: list[np.ndarray] = []
    states: list[np.ndarray] = []
    for j, blend in enumerate(blends):
        params += blend.header(quoted, f"estimators[{j}].fair_value")
        est_packed, est_states = pack(blend.parts, ctx)
        for x in est_packed:
            params += x.tolist()
        packed += est_packed
        states += est_states
    source = bank_source(blends, [len(x) for x in packed], [len(s) for s in states])
    module = load_module(source, [p for b in blends for p in b.parts])
    return module.strategy, np.asarray(params, dtype=np.float64), np.concatenate([np.zeros(0), *states])


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def horizon_label(seconds: float) -> str:
    if seconds < 1 and abs(seconds * 1000 - round(seconds * 1000)) < 1e-9:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their average (Spearman's convention, pandas' ``rank()`` - 1): mid
    changes are mostly ties at 0, and ranking those by position added noise to the IC."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends - 1) / 2)[np.cumsum(first) - 1]
    return ranks


def information_coefficient(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (NaN for fewer than 3 points or a constant
    side); scipy's ``spearmanr`` gives the same value in ~1.8x the time."""
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """:func:`information_coefficient` of finite ``x`` and ``y`` in bounded private memory, for
    series as long as the data (either may be memory-mapped): each side is sorted in a scratch
    file, a value's rank (ties sharing their average) is where it falls in its sorted side, and
    the Pearson sums of the ranks are added a chunk at a time."""
    n = len(x)
    if n < 3:
        return float("nan")
    sides = []
    for v in (x, y):
        s = spool.scratch(n)
        for lo, hi in spool.chunks(n):
            s[lo:hi] = v[lo:hi]
        s.sort()
        if s[0] == s[-1]:
            return float("nan")
        sides.append(s)
    mean = (n - 1) / 2.0  # of ranks 0..n-1, ties averaged
    sxy = sxx = syy = 0.0
    for lo, hi in spool.chunks(n):
        dx, dy = (((np.searchsorted(s, v[lo:hi], "left") + np.searchsorted(s, v[lo:hi], "right") - 1) / 2.0 - mean)
                  for s, v in zip(sides, (x, y), strict=True))
        sxy += float(dx @ dy)
        sxx += float(dx @ dx)
        syy += float(dy @ dy)
    return float(np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0))


class _Errors:
    """Sums of errors, added a chunk at a time, for the score columns n ... bias."""

    def __init__(self) -> None:
        self.m, self.undefined, self.sse, self.sae, self.se = 0, 0, 0.0, 0.0, 0.0

    def add(self, err: np.ndarray, undefined: int) -> None:
        self.m += len(err)
        self.undefined += undefined
        self.sse += float(np.sum(err * err))
        self.sae += float(np.sum(np.abs(err)))
        self.se += float(np.sum(err))

    def row(self, sign: float = 1.0) -> dict[str, float]:
        """The columns; ``sign``: the bias of ``sign`` × error."""
        m, nan = self.m, float("nan")
        return {"n": m, "n_undefined": self.undefined, "sse": self.sse,
                "mse": self.sse / m if m else nan, "rmse": float(np.sqrt(self.sse / m)) if m else nan,
                "mae": self.sae / m if m else nan, "bias": sign * self.se / m if m else nan}


def score_against_future_mid(est: np.ndarray, mid: np.ndarray, k: int) -> dict[str, float]:
    """Error of ``est[t]`` against ``mid[t + k]`` over the steps where both are defined, a chunk of
    steps at a time (the IC's two series go to spool files)."""
    n = len(mid)
    if k >= n:
        return {"n": 0, "n_undefined": int(np.isfinite(est).sum()), "sse": float("nan"), "mse": float("nan"),
                "rmse": float("nan"), "mae": float("nan"), "bias": float("nan"), "ic": float("nan")}
    sums, dev, move = _Errors(), spool.Spool(np.float64), spool.Spool(np.float64)
    for lo, hi in spool.chunks(n - k):
        e, now, fut = np.asarray(est[lo:hi]), np.asarray(mid[lo:hi]), np.asarray(mid[lo + k:hi + k])
        ok = np.isfinite(e) & np.isfinite(fut) & np.isfinite(now)
        sums.add(e[ok] - fut[ok], int((~np.isfinite(e)).sum()))
        dev.add(e[ok] - now[ok])
        move.add(fut[ok] - now[ok])
    return {**sums.row(), "ic": rank_correlation(dev.array(), move.array())}


def forecast_ic(fc: np.ndarray, mid: np.ndarray, k: int) -> float:
    """IC of the forecast term ``fc[t]`` with the mid's change ``mid[t + k] - mid[t]``, in chunks."""
    fcs, move = spool.Spool(np.float64), spool.Spool(np.float64)
    for lo, hi in spool.chunks(len(mid) - k):
        f, now, fut = np.asarray(fc[lo:hi]), np.asarray(mid[lo:hi]), np.asarray(mid[lo + k:hi + k])
        ok = np.isfinite(f) & np.isfinite(fut) & np.isfinite(now)
        fcs.add(f[ok])
        move.add(fut[ok] - now[ok])
    return rank_correlation(fcs.array(), move.array())


def score_against_trades(ts: np.ndarray, est: np.ndarray, trade_ts: np.ndarray, trade_px: np.ndarray
                         ) -> dict[str, float]:
    """Each trade against the latest estimate at or before its exchange time (merge_asof backward),
    a chunk of trades at a time."""
    sums = _Errors()
    for lo, hi in spool.chunks(len(trade_ts)):
        idx = np.searchsorted(ts, trade_ts[lo:hi], side="right") - 1
        e = np.where(idx >= 0, np.asarray(est)[np.clip(idx, 0, None)], np.nan)
        ok = np.isfinite(e)
        sums.add(np.asarray(trade_px[lo:hi])[ok] - e[ok], int((~ok).sum()))
    return {**sums.row(-1.0), "ic": float("nan")}


def trade_errors(e: np.ndarray, trade_px: np.ndarray) -> dict[str, float]:
    """Trade price against the estimate matched to each trade; trades without one are left out and counted."""
    sums = _Errors()
    for lo, hi in spool.chunks(len(e)):
        ok = np.isfinite(e[lo:hi])
        sums.add(np.asarray(trade_px[lo:hi])[ok] - np.asarray(e[lo:hi])[ok], int((~ok).sum()))
    return {**sums.row(-1.0), "ic": float("nan")}


def _bucket_bias(est: np.ndarray, mid: np.ndarray, k: int, imb: np.ndarray, spread: np.ndarray, tick: float,
                 n_imb: int, n_spread: int) -> list[dict[str, Any]]:
    """Bias and MSE of ``est[t] - mid[t + k]`` per bucket of imbalance and spread (in ticks) at t."""
    edges = np.linspace(-1.0, 1.0, n_imb + 1)
    count, s1, s2 = np.zeros(n_imb * n_spread), np.zeros(n_imb * n_spread), np.zeros(n_imb * n_spread)
    for lo, hi in spool.chunks(len(mid) - k):
        err = np.asarray(est[lo:hi]) - np.asarray(mid[lo + k:hi + k])
        im, sp = np.asarray(imb[lo:hi]), np.asarray(spread[lo:hi]) / tick
        ok = np.isfinite(err) & np.isfinite(im) & np.isfinite(sp)
        err, im, sp = err[ok], im[ok], sp[ok]
        ib = np.clip(np.searchsorted(edges, im, side="right") - 1, 0, n_imb - 1)
        sb = np.clip(np.round(sp).astype(np.int64), 1, n_spread)  # 1, 2, ..., n_spread+ ticks
        cell = ib * n_spread + sb - 1
        count += np.bincount(cell, minlength=len(count))
        s1 += np.bincount(cell, err, minlength=len(count))
        s2 += np.bincount(cell, err * err, minlength=len(count))
    rows = []
    for i in range(n_imb):
        for s in range(1, n_spread + 1):
            c = (i * n_spread + s - 1)
            if count[c]:
                rows.append({"imbalance_lo": float(edges[i]), "imbalance_hi": float(edges[i + 1]),
                             "spread_ticks": s if s < n_spread else f">={n_spread}", "n": int(count[c]),
                             "bias": float(s1[c] / count[c]), "mse": float(s2[c] / count[c])})
    return rows


def _conditional_mean(mid: np.ndarray, imb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per bucket of 20 in imbalance, the steps and their summed mid change over ``k`` steps."""
    edges = np.linspace(-1.0, 1.0, 21)
    count, total = np.zeros(20), np.zeros(20)
    for lo, hi in spool.chunks(len(mid) - k):
        dm = np.asarray(mid[lo + k:hi + k]) - np.asarray(mid[lo:hi])
        b = np.clip(np.searchsorted(edges, np.asarray(imb[lo:hi]), side="right") - 1, 0, 19)
        count += np.bincount(b, minlength=20)
        total += np.bincount(b, dm, minlength=20)
    return count, total


def _contiguous(ts: np.ndarray, step_ns: int) -> bool:
    return all(bool(np.all(np.diff(ts[lo:hi + 1]) == step_ns)) for lo, hi in spool.chunks(len(ts)))


# --------------------------------------------------------------------------------------------------
# Loading and running
# --------------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    rows: list[dict[str, Any]]
    bias: list[dict[str, Any]]
    conditional: list[dict[str, Any]]
    summary: dict[str, Any]


def load_eval(path: str | Path, overrides: Sequence[str] = ()) -> tuple[EvalConfig, Any, list[list[tuple]], dict]:
    from quotelab.strategy.registry import load_registry

    path = Path(path)
    cfg, _raw, lines = load_document(path, EvalConfig, "an evaluation is a mapping with sections data, estimators, ...",
                                     overrides=overrides)
    where = where_in(path, lines)

    check_data_section(cfg.data, where)
    misplaced = sorted((GRID_ONLY if cfg.score == "trades" else TRADES_ONLY) & cfg.model_fields_set)
    if misplaced:
        key, other = misplaced[0], "grid" if cfg.score == "trades" else "trades"
        raise ConfigError(f"{where((key,))}: {key} applies to score: {other} only, and this evaluation has "
                          f"score: {cfg.score}; remove it or change score")
    registry = load_registry(local_files=[(path.parent / p).resolve() for p in cfg.plugins])
    names = set(cfg.data.assets) | {"quoted"}
    for t in cfg.targets or []:
        if t not in cfg.data.assets:
            raise ConfigError(
                f"{where(('targets',))}: target {t!r} is not in data.assets ({', '.join(cfg.data.assets)})"
            )
    estimators = []
    for j, est in enumerate(cfg.estimators):
        parts = [validate_part(registry, "fair_value", ("estimators", j, "fair_value", i), spec, path, lines, names,
                               cfg.data.assets) for i, spec in enumerate(est.fair_value)]
        parts += [validate_part(registry, "signal", ("estimators", j, "forecast", i), spec, path, lines, names,
                                cfg.data.assets) for i, spec in enumerate(est.forecast)]
        if not est.fair_value:
            raise ConfigError(f"{where(('estimators', j, 'fair_value'))}: at least one fair-value source is required")
        estimators.append(check_component_inputs(parts, where, f"estimator {est.name!r}"))
    return cfg, registry, estimators, {"path": path, "lines": lines, "where": where}


def _bank_parts(estimators: list[list[ValidatedPart]], ctx: PackContext, tick: float
                ) -> tuple[list[Blend], int, set[int]]:
    """The estimators as blends for the bank, the depth levels they read and the assets they need ready."""
    blends, n_levels, ready = [], 1, {ctx.asset_index["quoted"]}
    for parts in estimators:
        for p in parts:
            reads = p.component.reads(p.params)
            n_levels = max(n_levels, reads.depth_levels)
            ready |= {ctx.asset_index[a] for a in reads.assets}
        blends.append(Blend(tuple(part_of(p, tick) for p in parts if p.role == "fair_value"),
                            tuple(part_of(p, tick) for p in parts if p.role == "signal")))
    return blends, n_levels, ready


def evaluate(path: str | Path, catalog: str | Path | None = None, out_dir: str | Path | None = None,
             strict: bool = False, overrides: Sequence[str] = ()) -> Evaluation:
    """Run the evaluation described by the YAML at ``path``, with the ``--set`` ``overrides`` applied.

    A trained model's part (``provenance`` param) must share the grid step (score: grid); the days it
    was trained on are listed in ``summary["in_sample"]`` (refused with ``strict``).
    """
    from quotelab.research.replay import prepare, prepare_exchange, replay
    from quotelab.strategy import provenance

    t_start = time.perf_counter()
    cfg, _registry, estimators, info = load_eval(path, overrides)
    in_sample: list[str] = []
    for parts in estimators:
        for p in parts:
            prov = getattr(p.params, "provenance", None)
            if prov:
                step = cfg.step if cfg.score == "grid" else float(prov.get("step_s") or 0.0)  # trades: no grid
                days = provenance.check(prov, step, cfg.data.assets, f"{info['where'](p.at)}.params.provenance",
                                        "the model", strict)
                in_sample += [d for d in days if d not in in_sample]
    provenance.warn(in_sample, "a model of this evaluation")
    path = info["path"]
    targets = cfg.targets or [cfg.data.quote]
    data_section = cfg.data
    if cfg.score == "trades":  # one asset at a time: check that, then load only the targets
        _check_single_asset(estimators, targets, info["where"])
        data_section = cfg.data.model_copy(update={"assets": {n: a for n, a in cfg.data.assets.items()
                                                              if n in targets}})
    feeds = load_assets(data_section, path.parent, info["where"],
                        resolve_catalog(path.parent, cfg.data.catalog, catalog))
    index = {f.name: i for i, f in enumerate(feeds)}
    if cfg.score == "trades":
        result = _evaluate_trades(cfg, estimators, feeds, targets, info, t_start)
        result.summary["in_sample"] = in_sample
        result.summary["overrides"] = list(overrides)
        if out_dir is not None:
            write_or_rescue(lambda d: write_outputs(result, d, plots=False), Path(out_dir), "evaluation tables")
        return result
    steps_per = [int(round(h / cfg.step)) for h in cfg.horizons]
    for h, k in zip(cfg.horizons, steps_per, strict=True):
        if k < 1 or abs(k * cfg.step - h) > 1e-9 * max(1.0, h):
            raise ConfigError(f"{info['where'](('horizons',))}: horizon {h:g}s is not a whole number of steps "
                              f"of {cfg.step:g}s")
    for t in targets:
        span = (feeds[index[t]].last_ts() - feeds[index[t]].first_ts()) / 1e9
        i = int(np.argmax(cfg.horizons))
        if cfg.horizons[i] >= span:
            raise ConfigError(f"{info['where'](('horizons', i))}: horizon {cfg.horizons[i]:g}s is not shorter than "
                              f"the data of target {t!r} ({span:g}s), so no step could be scored; use a shorter "
                              "horizon or more days")
        check_record_budget(int(span / cfg.step), 8 * (5 + 2 * len(estimators) + len(feeds)), info["where"](("step",)),
                            f"{span:g} s of target {t!r} on a {cfg.step:g} s grid", "use a longer step or fewer days")
    t0 = time.perf_counter()
    data = prepare(feeds)  # sorted and flattened once, replayed once per target
    replay_s, events = time.perf_counter() - t0, 0
    rows: list[dict[str, Any]] = []
    bias_rows: list[dict[str, Any]] = []
    cond_rows: list[dict[str, Any]] = []
    for target in targets:
        q = index[target]
        ctx = PackContext.of(feeds, q, data.first_ts[q], str(path.parent))
        bank_parts, n_levels, ready = _bank_parts(estimators, ctx, feeds[q].tick_size)
        kernel, params, state = build_bank(bank_parts, ctx, q)
        cols = list(range(PROBE_MID, EST_BASE + 2 * len(bank_parts)))
        t0 = time.perf_counter()
        res = replay(data, kernel, params, state, quoted=q, step=cfg.step, n_levels=n_levels,
                     ready=sorted(ready), keep_out=True, out_columns=cols)
        replay_s += time.perf_counter() - t0
        events += sum(f.n_events for f in feeds)
        if len(res.timestamps) == 0:
            raise DataError(f"{path}: target {target!r} never had a two-sided book on the grid: nothing to score")
        outs = res.outs
        mid, spread, imb = outs[:, 0], outs[:, 1], outs[:, 2]
        # the grid skips warm-up steps; horizons count grid steps, so check the kept steps are contiguous
        if not _contiguous(res.timestamps, int(round(cfg.step * 1e9))):
            raise DataError(f"{path}: target {target!r}: a ready asset lost its book mid-window; horizons would "
                            "span gaps. Evaluate over days where every asset read has a two-sided book.")
        trade_ts, trade_px, _, _ = prepare_exchange([feeds[q]]).rows[0].trades  # in exchange-time order
        feed = feeds[q]
        for j, spec in enumerate(cfg.estimators):
            est = outs[:, 3 + 2 * j]
            fc = outs[:, 4 + 2 * j]
            base = {"estimator": spec.name, "target": target, "venue": feed.venue, "symbol": feed.symbol,
                    "has_forecast": bool(spec.forecast), "note": spec.note}
            for h, k in zip(cfg.horizons, steps_per, strict=True):
                rows.append({**base, "horizon": horizon_label(h), "horizon_s": h,
                             **score_against_future_mid(est, mid, k)})
                if spec.forecast:
                    rows[-1]["forecast_ic"] = forecast_ic(fc, mid, k)
            rows.append({**base, "horizon": "trade", "horizon_s": float("nan"),
                         **score_against_trades(res.timestamps, est, trade_ts, trade_px)})
            k1 = steps_per[min(range(len(steps_per)), key=lambda i: abs(cfg.horizons[i] - 1.0))]
            if len(mid) - k1 > 0:
                for r in _bucket_bias(est, mid, k1, imb, spread, feed.tick_size, cfg.imbalance_buckets,
                                      cfg.spread_buckets):
                    bias_rows.append({**base, "horizon": horizon_label(cfg.horizons[steps_per.index(k1)]), **r})
        for h, k in zip(cfg.horizons, steps_per, strict=True):
            if len(mid) - k <= 0:
                continue
            edges = np.linspace(-1.0, 1.0, 21)
            count, total = _conditional_mean(mid, imb, k)
            for i in range(20):
                if count[i]:
                    cond_rows.append({
                        "target": target, "venue": feed.venue, "symbol": feed.symbol, "horizon": horizon_label(h),
                        "imbalance_mid": float((edges[i] + edges[i + 1]) / 2), "n": int(count[i]),
                        "mean_mid_change": float(total[i] / count[i]),
                    })
    summary = {"name": cfg.name, "targets": targets, "estimators": [e.name for e in cfg.estimators],
               "horizons": [horizon_label(h) for h in cfg.horizons], "events": events,
               "replay_seconds": round(replay_s, 4), "seconds": round(time.perf_counter() - t_start, 4),
               "events_per_second": round(events / replay_s) if replay_s > 0 else None, "in_sample": in_sample,
               "overrides": list(overrides)}
    result = Evaluation(rows, bias_rows, cond_rows, summary)
    if out_dir is not None:
        write_or_rescue(lambda d: write_outputs(result, d, plots=cfg.plots), Path(out_dir), "evaluation tables")
    return result


TRADE_CONVENTIONS = {
    True: "trades with the same exchange time and side are one trade: first price, summed quantity",
    False: "every trade is scored as it is (no aggregation)",
}
MATCH_CONVENTIONS = {
    "exchange_inclusive": "each trade is scored against the estimate on the book as of its exchange time, equal "
                          "times included (pandas merge_asof backward); flow signals update once per trade",
    "before_local": "each trade is scored against the estimate on the book a trader could have seen: the rows "
                    "received strictly before the trade was, by local time (merge_asof backward, exact matches "
                    "excluded); trades are aggregated and timed by local time; flow signals update once per trade",
}


def _check_single_asset(estimators: list[list[ValidatedPart]], targets: list[str], where: Any) -> None:
    """score: trades replays one asset at a time: no estimator may read another."""
    for target in targets:
        for parts in estimators:
            for p in parts:
                other = [a for a in p.component.reads(p.params).assets if a not in ("quoted", target)]
                if other:
                    raise ConfigError(
                        f"{where(p.at)}: {p.spec.kind!r} reads {other[0]!r}, but score: trades scores one asset at a "
                        f"time on its exchange clock (target {target!r}); use score: grid for cross-asset estimators"
                    )


def _evaluate_trades(cfg: EvalConfig, estimators: list[list[tuple]], feeds: list[Asset],
                     targets: list[str], info: dict, t_start: float) -> Evaluation:
    """score: trades: the seed study's procedure, one bank call per (aggregated) trade of each target."""
    from hftbacktest.types import EXCH_EVENT, LOCAL_EVENT

    from quotelab.research.replay import aggregate_trades, prepare_exchange, replay_trades

    path = info["path"]
    rows: list[dict[str, Any]] = []
    replay_s, events, raw, scored = 0.0, 0, 0, 0
    for target in targets:
        q = next(i for i, f in enumerate(feeds) if f.name == target)
        feed = feeds[q]
        t0 = time.perf_counter()
        local = cfg.match == "before_local"
        data = prepare_exchange([feeds[q]], LOCAL_EVENT if local else EXCH_EVENT)
        tape = aggregate_trades(data, aggregate=cfg.aggregate_trades)
        if len(tape.ts) == 0:
            raise DataError(f"{path}: target {target!r} ({feed.venue} {feed.symbol}) has no trades in the window: "
                            "nothing to score")
        ctx = PackContext.of([feed], 0, data.first_ts[0], str(path.parent))
        bank_parts, n_levels, _ready = _bank_parts(estimators, ctx, feed.tick_size)
        kernel, params, state = build_bank(bank_parts, ctx, 0)
        outs = replay_trades(data, tape, kernel, params, state, n_levels=n_levels,
                             out_columns=list(range(PROBE_MID, EST_BASE + 2 * len(bank_parts))), strict=local)
        replay_s += time.perf_counter() - t0
        events += data.rows[0].n_rows
        raw += tape.raw_trades
        scored += len(tape.ts)
        for j, spec in enumerate(cfg.estimators):
            rows.append({"estimator": spec.name, "target": target, "venue": feed.venue, "symbol": feed.symbol,
                         "has_forecast": bool(spec.forecast), "horizon": "trade", "horizon_s": float("nan"),
                         **trade_errors(outs[:, 3 + 2 * j], tape.px), "note": spec.note})
    summary = {"name": cfg.name, "score": "trades", "targets": targets, "estimators": [e.name for e in cfg.estimators],
               "horizons": ["trade"], "trades_raw": raw, "trades_scored": scored, "events": events,
               "conventions": [TRADE_CONVENTIONS[cfg.aggregate_trades].replace(
                   "exchange time", "local time" if cfg.match == "before_local" else "exchange time"),
                   MATCH_CONVENTIONS[cfg.match], *cfg.notes],
               "replay_seconds": round(replay_s, 4), "seconds": round(time.perf_counter() - t_start, 4),
               "events_per_second": round(events / replay_s) if replay_s > 0 else None}
    return Evaluation(rows, [], [], summary)


def write_outputs(result: Evaluation, out: Path, plots: bool = True) -> None:
    """Tidy table (parquet + CSV), bias and conditional-mean tables, per venue/symbol pivot, PNG plots."""
    import polars as pl

    out.mkdir(parents=True, exist_ok=True)

    def save(df: pl.DataFrame, stem: str) -> None:
        for ext, write in (("parquet", df.write_parquet), ("csv", df.write_csv)):
            tmp = out / f".{stem}.{ext}.tmp"
            try:
                write(tmp)
                tmp.replace(out / f"{stem}.{ext}")
            except BaseException:  # a full disk, or a Ctrl-C while writing: no half file left in --out
                tmp.unlink(missing_ok=True)
                raise

    table = pl.DataFrame(result.rows, infer_schema_length=None)
    save(table, "scores")
    if result.bias:
        save(pl.DataFrame(result.bias, infer_schema_length=None).with_columns(pl.col("spread_ticks").cast(pl.Utf8)),
             "bias_by_bucket")
    if result.conditional:
        save(pl.DataFrame(result.conditional), "conditional_mean")
    pivot = table.pivot(on="horizon", index=["venue", "symbol", "estimator"], values="mse", aggregate_function="first")
    save(pivot, "mse_by_venue_symbol")
    cat.atomic_write_json(out / "summary.json", json.loads(json.dumps(result.summary, default=str)))
    if plots and result.conditional:
        _plot_conditional(result.conditional, out)


def _plot_conditional(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for target in sorted({r["target"] for r in rows}):
        fig, ax = plt.subplots(figsize=(7, 4))
        for h in dict.fromkeys(r["horizon"] for r in rows if r["target"] == target):
            pts = [(r["imbalance_mid"], r["mean_mid_change"]) for r in rows
                   if r["target"] == target and r["horizon"] == h]
            ax.plot(*zip(*pts, strict=True), marker="o", label=h)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel("top-of-book imbalance (Qb - Qa)/(Qb + Qa)")
        ax.set_ylabel("mean mid change")
        ax.set_title(f"next mid change by imbalance: {target}")
        ax.legend(title="horizon")
        fig.tight_layout()
        fig.savefig(out / f"conditional_mean_{target}.png", dpi=100)
        plt.close(fig)
