"""Run a strategy: resolve its data, compose its kernels, drive hftbacktest, collect results."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
from hftbacktest import GTC, GTX, BacktestAsset
from hftbacktest.types import EXCH_EVENT, LOCAL_EVENT, record_dtype

from quotelab import layout as L
from quotelab import progress as P
from quotelab import spool
from quotelab.backtest import driver as D
from quotelab.backtest import pnl
from quotelab.backtest.backtest_c import Backtest
from quotelab.backtest.jitcache import KEY, run_cached
from quotelab.component import PackContext
from quotelab.data import catalog as cat
from quotelab.data.assets import Asset, initial_view, load_assets, resolve_catalog
from quotelab.data.funding import schedule
from quotelab.errors import ConfigError, PluginError, QuotelabError, RunError
from quotelab.outputs import check_record_budget, save_or_rescue
from quotelab.strategy.codegen import kernel_list
from quotelab.strategy.composer import Composition, compose, part_of
from quotelab.strategy.config import (
    AssetEngine,
    LoadedStrategy,
    StrategyConfig,
    ValidatedPart,
    load_strategy,
)
from quotelab.timeunits import DAY_NS


@dataclass
class RunResult:
    summary: dict[str, Any]
    record_ts: np.ndarray
    records: np.ndarray
    out_dir: Path | None = None
    composition: Composition | None = field(default=None, repr=False)


def load_feeds(loaded: LoadedStrategy, catalog: Path | None, preload: bool = False) -> list[Asset]:
    return load_assets(loaded.config.data, loaded.file.parent, loaded.where, catalog, preload)


def asset_engine(cfg: StrategyConfig, name: str) -> tuple[AssetEngine, tuple]:
    """The engine settings of asset ``name`` in strategy config ``cfg``, and where they are in the YAML."""
    if name in cfg.engine.assets:
        return cfg.engine.assets[name], ("engine", "assets", name)
    return cfg.engine.defaults, ("engine", "defaults")


ORDER_LATENCY_DTYPE = np.dtype([("req_ts", "i8"), ("exch_ts", "i8"), ("resp_ts", "i8"), ("_padding", "i8")],
                               align=True)  # hftbacktest 2.4's OrderLatencyRow


def _build_asset(feed: Asset, e: AssetEngine, order_latency: np.ndarray | None = None) -> BacktestAsset:
    # Paths: hftbacktest reads them a file at a time (and the next one ahead); arrays it holds whole.
    events = feed.events
    a = BacktestAsset().data([str(p) for p in events.paths] if isinstance(events, cat.EventFiles) else list(events))
    a = a.inverse_asset(feed.contract_size) if feed.contract == "inverse" else a.linear_asset(feed.contract_size)
    if order_latency is None:
        a = a.constant_order_latency(int(round(e.latency.entry * 1e9)), int(round(e.latency.response * 1e9)))
    else:
        a = a.intp_order_latency(order_latency, 0)
    if e.feed_latency_offset:
        a = a.latency_offset(int(round(e.feed_latency_offset * 1e9)))
    n = e.queue_power
    a = {
        "risk_adverse": lambda: a.risk_adverse_queue_model(),
        "log_prob": lambda: a.log_prob_queue_model(),
        "log_prob_model2": lambda: a.log_prob_queue_model2(),
        "power_prob": lambda: a.power_prob_queue_model(n),
        "power_prob_model2": lambda: a.power_prob_queue_model2(n),
        "power_prob_model3": lambda: a.power_prob_queue_model3(n),
        "power_prob2": lambda: a.power_prob_queue_model(2.0),
        "power_prob3": lambda: a.power_prob_queue_model(3.0),
    }[e.queue]()
    a = a.no_partial_fill_exchange()  # partial fills are refused in the config (AssetEngine)
    a = {"value": a.trading_value_fee_model, "quantity": a.trading_qty_fee_model,
         "flat": a.flat_per_trade_fee_model}[e.fees.model](e.fees.maker, e.fees.taker)
    return a.tick_size(feed.tick_size).lot_size(feed.lot_size).last_trades_capacity(e.last_trades_capacity)


def order_latency(feed: Asset, e: AssetEngine, where: Callable[[tuple], str], at: tuple, base_dir: Path
                  ) -> np.ndarray | None:
    """The rows of ``recorded`` or ``feed`` order latency of ``feed`` with engine settings ``e`` (at ``at``
    in the YAML) for hftbacktest's ``intp_order_latency`` (ns), None for ``constant``. A negative latency,
    or a feed latency made negative by ``feed_latency_offset``, is an error naming the asset and the fix."""
    lat = e.latency
    offset = int(round(e.feed_latency_offset * 1e9))
    if offset or lat.model == "feed":
        fl = _feed_latencies(feed)
        if len(fl) and fl.min() + offset < 0:
            raise ConfigError(
                f"{where((*at, 'feed_latency_offset'))}: {feed.name}'s feed latency (local - exchange time) reaches "
                f"{(fl.min() + offset) / 1e6:.3f} ms with feed_latency_offset {offset / 1e6:g} ms; a negative latency "
                f"is impossible: raise feed_latency_offset by at least {-(fl.min() + offset) / 1e6:.3f} ms")
    if lat.model == "constant":
        return None
    if lat.model == "recorded":
        if lat.file is None:
            raise ConfigError(f"{where((*at, 'latency', 'file'))}: latency model 'recorded' needs a file of "
                              f"req_ts, exch_ts, resp_ts (ns)")
        rows = _read_latency_file((base_dir / lat.file).resolve(), where((*at, "latency", "file")))
        shift = int(round(lat.offset * 1e9))
        rows["exch_ts"] += shift
        rows["resp_ts"] += 2 * shift  # the exchange time moved by shift, and the response latency too
    else:
        sample = int(round(lat.sample * 1e9))
        parts = []
        for ev in feed.events:
            both = ev[(ev["ev"] & (EXCH_EVENT | LOCAL_EVENT)) == (EXCH_EVENT | LOCAL_EVENT)]
            local = both["local_ts"] + offset
            keep = np.flatnonzero(np.diff(local // sample, prepend=np.iinfo(np.int64).min) != 0)
            parts.append((local[keep], local[keep] - both["exch_ts"][keep]))
        local = np.concatenate([p[0] for p in parts])
        fl = np.concatenate([p[1] for p in parts]).astype(np.float64)
        rows = np.zeros(len(local), ORDER_LATENCY_DTYPE)
        rows["req_ts"] = local
        rows["exch_ts"] = local + np.round(lat.entry_scale * fl + lat.entry * 1e9).astype(np.int64)
        rows["resp_ts"] = rows["exch_ts"] + np.round(lat.response_scale * fl + lat.response * 1e9).astype(np.int64)
    entry, resp = rows["exch_ts"] - rows["req_ts"], rows["resp_ts"] - rows["exch_ts"]
    if not len(rows):
        raise ConfigError(f"{where((*at, 'latency'))}: no order latency rows for {feed.name}")
    bad = np.flatnonzero((entry < 0) | (resp < 0))
    if len(bad):
        i = int(bad[0])
        raise ConfigError(
            f"{where((*at, 'latency'))}: {feed.name}'s order latency is negative at row {i} (entry "
            f"{entry[i] / 1e6:g} ms, response {resp[i] / 1e6:g} ms); raise latency.entry/response or latency.offset")
    if np.any(np.diff(rows["req_ts"]) < 0):
        raise ConfigError(f"{where((*at, 'latency', 'file'))}: req_ts must be non-decreasing; sort the rows")
    return rows


def _feed_latencies(feed: Asset) -> np.ndarray:
    both = EXCH_EVENT | LOCAL_EVENT
    return np.concatenate([ev["local_ts"][(ev["ev"] & both) == both] - ev["exch_ts"][(ev["ev"] & both) == both]
                           for ev in feed.events])


def _read_latency_file(path: Path, where: str) -> np.ndarray:
    if not path.exists():
        raise ConfigError(f"{where}: {path}: file not found; write npz/npy/parquet/CSV with req_ts, exch_ts, resp_ts "
                          f"(ns)")
    try:
        if path.suffix in (".npz", ".npy"):
            raw = np.load(path, allow_pickle=False)
            if path.suffix == ".npz":
                with raw:
                    raw = raw["data"] if "data" in raw.files else raw[raw.files[0]]
            cols = {k: raw[k] for k in raw.dtype.names or ()}
        else:
            import polars as pl

            df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
            cols = {c: df[c].to_numpy() for c in df.columns}
    except Exception as exc:
        raise ConfigError(f"{where}: {path}: unreadable ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in ("req_ts", "exch_ts", "resp_ts") if c not in cols]
    if missing:
        raise ConfigError(f"{where}: {path} has no column {', '.join(missing)}; it has: {', '.join(cols)}")
    rows = np.zeros(len(cols["req_ts"]), ORDER_LATENCY_DTYPE)
    for c in ("req_ts", "exch_ts", "resp_ts"):
        rows[c] = np.asarray(cols[c], dtype=np.int64)
    return rows


_DRIVER_COMPILED = False
# Records held in memory (2 MB); more go to a spool file, read back memory-mapped. Small, so that a
# run of a day holds what a run of a month does: at 1 << 16 (7 MB, 1.8 h of 100 ms steps) 4 busy
# 1-hour days held ~8 MB more than one.
REC_CHUNK = 1 << 14
PAUSE_STEPS = 1 << 16  # the driver returns this often (~6 s of market at 100 ms steps) for progress


class _RecordSpool:
    """The driver's records, chunk by chunk: the first chunk stays in memory; from the second on they
    are appended to an unlinked temporary file and read back memory-mapped (file-backed pages the
    OS can drop), so a month of records costs disk, not private memory."""

    def __init__(self) -> None:
        self.first: np.ndarray | None = None
        self.fh: Any = None
        self.rows = 0

    def add(self, ts: np.ndarray, rec: np.ndarray) -> None:
        if not len(ts):
            return
        block = np.empty((len(ts), 1 + D.R_WIDTH))
        block[:, 0] = ts.view(np.float64)  # the int64 bits, viewed back in arrays()
        block[:, 1:] = rec
        if self.first is None and self.fh is None:
            self.first = block
        else:
            if self.fh is None:
                import tempfile

                self.fh = tempfile.TemporaryFile(prefix="quotelab-records-")  # noqa: SIM115 - lives with the result
                self.fh.write(self.first)
                self.first = None
            self.fh.write(block)  # its buffer, not a bytes copy
        self.rows += len(ts)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self.fh is not None:
            self.fh.flush()
            block = np.memmap(self.fh, dtype=np.float64, mode="r", shape=(self.rows, 1 + D.R_WIDTH))
        elif self.first is not None:
            block = self.first
        else:
            block = np.empty((0, 1 + D.R_WIDTH))
        return block[:, 0].view(np.int64), block[:, 1:]


def _release_freed() -> None:
    """Hand freed memory back to the OS at most once a second: hftbacktest inflates each part into
    buffers it frees at the next switch, and what glibc kept of them grew a 4-day run's peak RssAnon
    9% over a 1-day run's (4 h synthetic days: 257-258 vs 237 MB; trimmed at the driver's pauses,
    243-247 vs 235 MB)."""
    spool.release_freed(every=1.0)


def driver_compiled() -> bool:
    return _DRIVER_COMPILED


def run_loaded(
    loaded: LoadedStrategy,
    registry: Any,
    parts: list,
    catalog: str | Path | None = None,
    out_dir: str | Path | None = None,
    check: bool = False,
    preload: bool = False,
    on_progress: Callable[[int], None] | None = None,
    progress: bool = False,
) -> RunResult:
    """Run an already validated strategy.

    ``check``: the fused kernel is compiled with bounds checking, so a plugin kernel that indexes past
    its arrays stops the run with an error naming it instead of reading other memory (slower).
    ``preload``: see :func:`~quotelab.data.assets.load_assets`. ``on_progress`` is called with the
    backtest's time (ns) every :data:`PAUSE_STEPS` steps and at the end; ``progress`` shows it on stderr
    (:mod:`quotelab.progress`)."""
    cfg = loaded.config
    assets = load_feeds(loaded, resolve_catalog(loaded.file.parent, cfg.data.catalog, catalog), preload)
    q = [a.name for a in assets].index(cfg.data.quote)
    grid = _grid(loaded, assets, q)
    t0 = time.perf_counter()
    strategy = _strategy(loaded, parts, assets, q, grid.origin, check)
    compose_s = time.perf_counter() - t0
    arrays = _DriverArrays.of(cfg, assets, q, grid, strategy)
    run_info = _run_info(cfg, assets, out_dir)
    _call_hooks(registry, "quotelab_run_start", abort=True, run=run_info)
    hbt, latencies = _backtest(loaded, assets)
    args = arrays.args(hbt.ptr, strategy)
    compile_s = compose_s + _compile_driver(args)
    t1 = time.perf_counter()
    try:
        rec_ts, rec = _drive(args, arrays, strategy.composition, P.Replay(
            f"run {cfg.name}", grid.origin, grid.origin + grid.span, sum(a.n_events for a in assets), progress),
            on_progress)
        run_s = time.perf_counter() - t1
        final = _final_state(hbt, q, assets[q], arrays.fund)
    finally:
        hbt.close()
        del latencies
    summary = _run_summary(cfg.name, assets, q, grid.origin, final, rec_ts, rec, arrays, compile_s, run_s)
    result = RunResult(summary, rec_ts, rec, composition=strategy.composition)
    if arrays.counters[D.K_STATUS] != 0:
        name = strategy.composition.names[int(arrays.counters[D.K_STATUS]) - 1]
        summary["error"] = (
            f"{name} produced a non-finite value at timestamp {int(arrays.counters[D.K_STATUS_TS])} "
            f"(engine.on_nonfinite: stop; set it to skip to skip such quotes and count them)"
        )
    if out_dir is not None:
        _save_or_rescue(result, Path(out_dir), assets[q])
    _call_hooks(registry, "quotelab_run_end", abort=False, run=run_info, result=summary)
    if "error" in summary:
        raise RunError(summary["error"], result)
    return result


@dataclass(frozen=True)
class _Grid:
    """The driver's clock (ns): its origin, step and first elapse, how often it records, how far the data
    goes past the origin, and how many records it holds before it pauses to hand them over."""

    origin: int
    step_ns: int
    first_elapse: int
    record_every: int
    span: int
    capacity: int


def _grid(loaded: LoadedStrategy, assets: list[Asset], q: int) -> _Grid:
    """The run's clock; a grid whose records would not fit in memory is refused here, before anything runs."""
    cfg = loaded.config
    step_ns = int(round(cfg.engine.step * 1e9))
    if step_ns <= 0:
        raise ConfigError(f"{loaded.where(('engine', 'step'))}: step must be > 0")
    global_first = min(a.first_ts() for a in assets)
    origin = _origin(loaded, assets, q, global_first)
    record_every = int(round(cfg.engine.record_every * 1e9))
    span = max(a.last_ts() for a in assets) - origin
    if cfg.engine.mode == "step":
        capacity = span // max(step_ns, record_every or 1) + 2
    else:
        capacity = (span // record_every + 2) if record_every > 0 else sum(a.n_events for a in assets) + 2
    every = max(step_ns, record_every) if cfg.engine.mode == "step" else record_every
    check_record_budget(capacity, 8 * (D.R_WIDTH + 1), loaded.where(("engine", "record_every")),
                        f"{span / 1e9:g} s of data recorded every " + (f"{every / 1e9:g} s" if every else "event"),
                        "set engine.record_every (e.g. 1s) or a longer engine.step")
    first_elapse = origin - global_first + (step_ns if cfg.engine.mode == "step" else 0)
    # a full buffer pauses the driver and goes to a spool file
    return _Grid(origin, step_ns, first_elapse, record_every, span, min(capacity, REC_CHUNK))


@dataclass(frozen=True)
class _Strategy:
    """The composed strategy and what the driver must fill for it."""

    composition: Composition
    fns: Any  # the kernel as a typed list of one function pointer (codegen.kernel_list)
    ready: np.ndarray  # per asset: must have a two-sided book before a step quotes
    n_levels: int  # depth levels to fill in the view
    need_trades: bool


def _strategy(loaded: LoadedStrategy, parts: list[ValidatedPart], assets: list[Asset], q: int, origin: int,
              check: bool) -> _Strategy:
    """Compose the validated parts into one kernel (bounds checked with ``check``), with what they read."""
    ctx = PackContext.of(assets, q, origin, str(loaded.file.parent))
    fvs, sigs, risks, quoter = [], [], [], None
    ready = np.zeros(len(assets), dtype=np.bool_)
    ready[q] = True
    n_levels = 1
    need_trades = False
    for vp in parts:
        part = part_of(vp, assets[q].tick_size)
        reads = vp.component.reads(vp.params)
        for asset in reads.assets:
            ready[ctx.asset_index[asset]] = True
        if reads.depth_levels > L.MAX_LEVELS:
            raise ConfigError(f"{loaded.where(vp.at)}: reads {reads.depth_levels} depth levels; at most {L.MAX_LEVELS}")
        n_levels = max(n_levels, reads.depth_levels)
        need_trades = need_trades or reads.trades
        {"fair_value": fvs, "signal": sigs, "risk": risks}.get(vp.role, []).append(part)
        if vp.role == "quoter":
            quoter = part
    _check_sizes(loaded, parts, assets[q])
    comp = compose(fvs, sigs, risks, quoter, ctx, boundscheck=check)
    return _Strategy(comp, kernel_list(comp.kernel), ready, n_levels, need_trades)


@dataclass(frozen=True)
class _DriverArrays:
    """What :func:`quotelab.backtest.driver.run_driver` reads and writes besides the backtest: the step's view of
    each asset, its trades and ``out``, its config, the records it fills (handed over when it pauses), its
    counters, the funding settlements it fills and the funding paid."""

    view: np.ndarray
    trades: np.ndarray
    state: np.ndarray
    out: np.ndarray
    config: np.ndarray
    rec_ts: np.ndarray
    rec: np.ndarray
    counters: np.ndarray
    settle_ts: np.ndarray
    settle: np.ndarray
    fund: np.ndarray

    @classmethod
    def of(cls, cfg: StrategyConfig, assets: list[Asset], q: int, grid: _Grid, strategy: _Strategy) -> _DriverArrays:
        capacity = max(asset_engine(cfg, a.name)[0].last_trades_capacity for a in assets)
        c = np.zeros(D.C_WIDTH, dtype=np.int64)
        c[D.C_MODE] = 0 if cfg.engine.mode == "step" else 1
        c[D.C_STEP_NS] = grid.step_ns
        c[D.C_FIRST_ELAPSE_NS] = grid.first_elapse
        c[D.C_QUOTED] = q
        c[D.C_LEVELS] = strategy.n_levels
        c[D.C_TIF] = GTX if cfg.engine.time_in_force == "gtx" else GTC
        c[D.C_ON_NONFINITE] = 0 if cfg.engine.on_nonfinite == "stop" else 1
        c[D.C_RECORD_EVERY_NS] = grid.record_every
        c[D.C_ORIGIN_NS] = grid.origin
        c[D.C_MAX_SCAN_TICKS] = cfg.engine.max_scan_ticks
        c[D.C_NEED_TRADES] = int(strategy.need_trades)
        c[D.C_PAUSE_STEPS] = PAUSE_STEPS
        settle_ts, settle = _settlements(cfg.engine.funding, assets[q], grid.origin)
        return cls(view=initial_view(assets), trades=np.zeros((len(assets), capacity, L.TR_WIDTH)),
                   state=strategy.composition.state.copy(), out=np.zeros(L.OUT_WIDTH), config=c,
                   rec_ts=np.zeros(grid.capacity, dtype=np.int64), rec=np.full((grid.capacity, D.R_WIDTH), np.nan),
                   counters=np.zeros(D.K_WIDTH, dtype=np.int64), settle_ts=settle_ts, settle=settle, fund=np.zeros(1))

    def args(self, hbt_ptr: int, strategy: _Strategy) -> tuple:
        """run_driver's arguments after the cache key, in its order."""
        return (hbt_ptr, strategy.fns, self.view, self.trades, self.state, strategy.composition.params, self.out,
                self.config, strategy.ready, self.rec_ts, self.rec, self.counters, self.settle_ts, self.settle,
                self.fund)


def _run_info(cfg: StrategyConfig, assets: list[Asset], out_dir: str | Path | None) -> dict[str, Any]:
    """What the lifecycle hooks are told about the run."""
    config_json = cfg.model_dump(mode="json")
    return {"name": cfg.name, "out_dir": str(out_dir) if out_dir is not None else None,
            "run_id": hashlib.sha256(json.dumps(config_json, sort_keys=True).encode()).hexdigest()[:16],
            "assets": {a.name: {"venue": a.venue, "symbol": a.symbol} for a in assets}, "config": config_json}


def _backtest(loaded: LoadedStrategy, assets: list[Asset]) -> tuple[Backtest, list[np.ndarray | None]]:
    """hftbacktest over the assets, each with its engine settings, and their order latency rows.

    hftbacktest reads the rows in place without holding them: the caller must keep them until the run
    ends (freed, they abort the run)."""
    built, latencies = [], []
    for a in assets:
        engine, at = asset_engine(loaded.config, a.name)
        latencies.append(order_latency(a, engine, loaded.where, at, loaded.file.parent))
        built.append(_build_asset(a, engine, latencies[-1]))
    return Backtest(built), latencies


def _compile_driver(args: tuple) -> float:
    """Compile the driver (or load it from the disk cache), once per process; the seconds it took."""
    global _DRIVER_COMPILED
    t = time.perf_counter()
    if not _DRIVER_COMPILED:
        D.run_driver.compile(tuple(numba.typeof(x) for x in (KEY, *args)))
        _DRIVER_COMPILED = True
    return time.perf_counter() - t


def _drive(args: tuple, arrays: _DriverArrays, comp: Composition, bar: P.Replay,
           on_progress: Callable[[int], None] | None) -> tuple[np.ndarray, np.ndarray]:
    """Run the driver to the end of the data, spooling its records each time it pauses; the records."""
    counters = arrays.counters
    kept = _RecordSpool()
    with bar:
        while True:
            try:
                r = run_cached(D.run_driver, *args)
            except QuotelabError:  # a Python signal's own error already names it
                raise
            except Exception as exc:
                err = _kernel_error(comp, exc, arrays.state)
                if err is exc:
                    raise
                raise err from exc
            kept.add(arrays.rec_ts[:counters[D.K_RECORDS]], arrays.rec[:counters[D.K_RECORDS]])
            counters[D.K_RECORDS] = 0
            _release_freed()
            bar.at(int(counters[D.K_NOW_TS]))
            if on_progress is not None:
                on_progress(int(counters[D.K_NOW_TS]))
            if r != D.PAUSED:
                break
    return kept.arrays()


def _final_state(hbt: Backtest, q: int, quoted: Asset, fund: np.ndarray) -> dict[str, Any]:
    """The quoted asset's account at the end, funding paid included in the balance."""
    sv = hbt.state_values(q)
    final = {"num_trades": int(sv["num_trades"]), **{k: float(sv[k]) for k in (
        "position", "balance", "fee", "trading_volume", "trading_value")}}
    final["funding"] = float(fund[0])
    final["balance"] += -final["funding"] if quoted.inverse else final["funding"]
    return final


def _run_summary(name: str, assets: list[Asset], q: int, origin: int, final: dict[str, Any], rec_ts: np.ndarray,
                 rec: np.ndarray, arrays: _DriverArrays, compile_s: float, run_s: float) -> dict[str, Any]:
    """summary.json: the final account, the counters, timings, settlements, assets and PnL figures."""
    fq = assets[q]
    summary = _summary(name, fq, final, rec, arrays.counters, compile_s, run_s, sum(a.n_events for a in assets))
    summary["origin_ns"] = origin
    settle_ts, settle = arrays.settle_ts, arrays.settle
    reached = np.isfinite(settle[:, D.S_POSITION])  # NaN: the data ended before the settlement
    summary["settlements"] = [
        {"ts": int(t), "rate": float(r[D.S_RATE]), "mark": float(r[D.S_MARK]), "position": float(r[D.S_POSITION]),
         "amount": float(r[D.S_AMOUNT])} for t, r in zip(settle_ts[reached], settle[reached], strict=True)]
    summary["assets"] = {a.name: {"venue": a.venue, "symbol": a.symbol, "events": a.n_events} for a in assets}
    summary.update(_figures(summary, fq, rec_ts, rec))
    summary["instrument"] = {"venue": fq.venue, "symbol": fq.symbol, "contract": fq.contract,
                             "contract_size": fq.contract_size, "tick_size": fq.tick_size, "lot_size": fq.lot_size}
    return summary


def _save_or_rescue(result: RunResult, out_dir: Path, quoted: Asset) -> None:
    """Save the result to ``out_dir``; if that fails, to a temporary folder, named in the summary's error."""
    result.out_dir, lost = save_or_rescue(lambda d: save_result(result, d, quoted), out_dir, "results")
    if lost is not None:
        s = result.summary
        s["error"] = f"{s['error']}; {lost}" if "error" in s else lost


def _settlements(mode: str, feed: Asset, origin: int) -> tuple[np.ndarray, np.ndarray]:
    """The quoted asset's funding settlements after ``origin`` (times, and rate/mark/position/amount rows
    for the driver to fill); none with ``engine.funding: off`` or without funding rows."""
    if mode == "off" or feed.funding is None:
        return np.zeros(0, np.int64), np.zeros((0, D.S_WIDTH))
    ts, rate, mark = schedule(feed.funding, origin, feed.last_ts())
    settle = np.full((len(ts), D.S_WIDTH), np.nan)
    settle[:, D.S_RATE] = rate
    settle[:, D.S_MARK] = mark
    return ts, settle


def _kernel_error(comp: Composition, exc: Exception, state: np.ndarray) -> Exception:
    """``exc`` raised while the fused kernel ran, as an error naming the plugin whose kernel raised it."""
    part = comp.failed_part(exc, state)
    py = getattr(getattr(part, "component", None) and part.component.kernel, "py_func", None)
    if py is None:
        return exc
    what = f"raised {type(exc).__name__}: {exc}"
    if comp.boundscheck and isinstance(exc, IndexError):
        what = f"indexed outside its arrays ({type(exc).__name__}: {exc}; found by bounds checking)"
    return PluginError(f'Error in plugin "{part.component.source}": kernel {py.__name__} of '
                       f"{part.where} ({part.component.role} {part.component.name!r}) {what}")


def _call_hooks(registry: Any, hook: str, abort: bool, **kwargs: Any) -> None:
    """Call each plugin's implementation of a lifecycle hook, naming the plugin when one raises.

    A failing ``run_start`` aborts the run (nothing has been computed yet); a failing ``run_end`` is
    recorded in the summary as ``hook_errors`` so the result already computed is kept.
    """
    if registry is None:
        return
    for impl in getattr(registry.pm.hook, hook).get_hookimpls():
        try:  # as pluggy does, an implementation takes the hook's parameters it names, not all of them
            impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception as exc:
            msg = f'Error in plugin "{impl.plugin_name}" ({hook}): {type(exc).__name__}: {exc}'
            if abort:
                raise PluginError(msg) from exc
            kwargs["result"].setdefault("hook_errors", []).append(msg)


def _origin(loaded: LoadedStrategy, feeds: list[Asset], q: int, global_first: int) -> int:
    spec = loaded.config.engine.origin
    if spec == "quoted":
        return feeds[q].first_ts()
    if spec == "first":
        return global_first
    try:
        origin = int(spec)
    except ValueError:
        raise ConfigError(
            f"{loaded.where(('engine', 'origin'))}: expected 'quoted', 'first' or a timestamp in ns, got {spec!r}"
        ) from None
    if origin < global_first:
        raise ConfigError(f"{loaded.where(('engine', 'origin'))}: origin {origin} is before the data ({global_first})")
    return origin


def _check_sizes(loaded: LoadedStrategy, parts: list[ValidatedPart], quoted: Asset) -> None:
    for at, params in ((p.at, p.params) for p in parts):
        for key in ("size", "max_position"):
            value = getattr(params, key, None)
            if value is None:
                continue
            lots = value / quoted.lot_size
            if abs(lots - round(lots)) > 1e-9 * max(1.0, abs(lots)):
                raise ConfigError(
                    f"{loaded.where((*at, 'params', key))}: {value} is not a whole number of lots "
                    f"(lot size {quoted.lot_size} for {quoted.venue}/{quoted.symbol})"
                )
        size = getattr(params, "size", None)
        if size is not None and size < quoted.lot_size:
            raise ConfigError(
                f"{loaded.where((*at, 'params', 'size'))}: {size} is below the lot size {quoted.lot_size}"
            )


def _equity(feed: Asset, final: dict[str, Any], mid: float) -> float:
    if feed.contract == "inverse":
        return float(-final["balance"] - final["position"] / mid * feed.contract_size - final["fee"])
    return float(final["balance"] + final["position"] * mid * feed.contract_size - final["fee"])


def _summary(name: str, feed: Asset, final: dict[str, Any], rec: np.ndarray, counters: np.ndarray,
             compile_s: float, run_s: float, events: int) -> dict[str, Any]:
    mid = float(rec[-1, D.R_MID]) if len(rec) else float("nan")
    return {
        "name": name,
        **final,
        "equity": _equity(feed, final, mid) if len(rec) else 0.0,
        "last_mid": mid,
        "steps": int(counters[D.K_STEPS]),
        "quoting_steps": int(counters[D.K_QUOTING_STEPS]),
        "warmup_steps": int(counters[D.K_NOT_READY]),
        "nonfinite_skipped": int(counters[D.K_NONFINITE]) if counters[D.K_STATUS] == 0 else 0,
        "trades_dropped": int(counters[D.K_TRADES_DROPPED]),
        "events": events,
        "compile_seconds": round(compile_s, 4),
        "run_seconds": round(run_s, 4),
        "events_per_second": round(events / run_s) if run_s > 0 else None,
    }


def _figures(summary: dict[str, Any], feed: Asset, rec_ts: np.ndarray, rec: np.ndarray) -> dict[str, Any]:
    """PnL in its currency and in USD, per traded notional, and the per-day table (:mod:`quotelab.backtest.pnl`)."""
    inverse = feed.contract == "inverse"
    unit = pnl.currency(feed.symbol, inverse)
    mark = summary["last_mid"]
    usd, how = pnl.in_usd(summary["equity"], unit, inverse, mark)
    # inverse volume counts contracts of contract_size USD; linear value is in the quote currency
    notional = summary["trading_volume"] * feed.contract_size if inverse else summary["trading_value"]
    return {
        "pnl": summary["equity"], "pnl_unit": unit, "pnl_usd": usd, "pnl_usd_method": how,
        "funding_unit": unit, "traded_notional_usd": notional,
        "pnl_bps_of_notional": usd / notional * 1e4 if notional > 0 else None,
        "days": _per_day(summary, feed, rec_ts, rec),
    }


FIGURE_CHUNK = 1 << 16  # records per chunk of the per-day table: its temporaries stay ~10 MB


def _per_day(summary: dict[str, Any], feed: Asset, rec_ts: np.ndarray, rec: np.ndarray) -> list[dict[str, Any]]:
    """:func:`pnl.per_day` of the run's records, a chunk at a time (a month of records is GBs of
    temporaries at once). Each chunk after the first starts one record early and drops that row's
    figures, so every step is differenced against the record before it, as in one pass."""
    days: dict[str, dict[str, Any]] = {}
    n = len(rec_ts)
    for start in range(0, n, FIGURE_CHUNK):
        lo, hi = max(start - 1, 0), min(start + FIGURE_CHUNK, n)
        r = rec[lo:hi]
        frame = {"mid": r[:, D.R_MID], "position": r[:, D.R_POSITION], "balance": r[:, D.R_BALANCE],
                 "fee": r[:, D.R_FEE], "funding": r[:, D.R_FUNDING], "trading_volume": r[:, D.R_VOLUME],
                 "num_trades": r[:, D.R_NUM_TRADES]}
        p = pnl.parts(np.asarray(rec_ts[lo:hi]), frame, summary if hi == n else {}, feed.contract == "inverse",
                      feed.contract_size)
        if lo < start:
            p = {k: v[1:] for k, v in p.items()}
        for row in pnl.per_day(p):
            have = days.setdefault(row["day"], row)
            if have is not row:
                for k in ("spread", "inventory", "fees", "funding", "pnl", "volume", "trades"):
                    have[k] += row[k]
                have["max_abs_position"] = max(have["max_abs_position"], row["max_abs_position"])
    return [days[d] for d in sorted(days)]


SERIES_COLUMNS = ("mid", "position", "balance", "fee", "num_trades", "trading_volume", "trading_value", "fair_value",
                  "reservation", "bid", "ask", "forecast", "risk", "funding")  # the records' columns, in order


def series_schema() -> dict[str, Any]:
    import polars as pl

    return {"timestamp": pl.Int64, **dict.fromkeys(SERIES_COLUMNS, pl.Float64)}


def per_second(rec_ts: np.ndarray, rec: np.ndarray) -> Any:
    """The records as hftbacktest's stats resample them at "1s" (polars ``group_by_dynamic``: windows
    [t, t + 1 s) labelled t), a chunk at a time: per window, the last value of each column and the
    sum of the per-record changes of the trade counters (``num_trades_``, ...; 0 for the first
    record). The stats then hold one row per second of the run, whatever the step."""
    import polars as pl

    cum = [D.R_NUM_TRADES, D.R_VOLUME, D.R_VALUE]
    out: list[Any] = []
    carry_ts, carry = np.zeros(0, np.int64), np.zeros((0, D.R_WIDTH))
    prev = None  # the counters of the record before the rows at hand (the first record's, at first)
    n = len(rec_ts)
    for lo, hi in spool.chunks(n):
        ts = np.concatenate([carry_ts, np.asarray(rec_ts[lo:hi])])
        r = np.concatenate([carry, np.asarray(rec[lo:hi])])
        c = r[:, cum]
        prev = c[:1] if prev is None else prev
        steps = np.diff(np.concatenate([prev, c]), axis=0)
        sec = ts // 1_000_000_000
        start = np.flatnonzero(np.r_[True, sec[1:] != sec[:-1]])
        keep = len(ts) if hi == n else int(start[-1])  # the last window may go on in the next chunk
        if keep:
            start = start[start < keep]
            last = np.r_[start[1:], keep] - 1
            sums = np.add.reduceat(steps[:keep], start, axis=0)
            out.append(pl.DataFrame({
                "timestamp": sec[start] * 1_000_000_000, "price": r[last, D.R_MID],
                "position": r[last, D.R_POSITION], "balance": r[last, D.R_BALANCE], "fee": r[last, D.R_FEE],
                "num_trades": r[last, D.R_NUM_TRADES], "trading_volume": r[last, D.R_VOLUME],
                "trading_value": r[last, D.R_VALUE], "num_trades_": sums[:, 0], "trading_volume_": sums[:, 1],
                "trading_value_": sums[:, 2]}))
            prev = c[keep - 1:keep]
        carry_ts, carry = ts[keep:], r[keep:]
    return pl.concat(out)


def hbt_records(rec_ts: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Our records in hftbacktest's record_dtype, for its stats."""
    out = np.zeros(len(rec_ts), record_dtype)
    out["timestamp"] = rec_ts
    out["price"] = rec[:, D.R_MID]
    out["position"] = rec[:, D.R_POSITION]
    out["balance"] = rec[:, D.R_BALANCE]
    out["fee"] = rec[:, D.R_FEE]
    out["num_trades"] = rec[:, D.R_NUM_TRADES]
    out["trading_volume"] = rec[:, D.R_VOLUME]
    out["trading_value"] = rec[:, D.R_VALUE]
    return out


def compute_stats(feed: Asset, rec_ts: np.ndarray, rec: np.ndarray) -> dict[str, Any]:
    """hftbacktest's stats. Annualised (and per-day) figures only for runs of a day or more, whose
    ``annualised`` entry says how they were computed: extrapolating minutes to a year gives numbers
    like a Sharpe ratio of 9,000 that mean nothing."""
    from hftbacktest.stats import (
        SR,
        AnnualRet,
        DailyNumberOfTrades,
        DailyTradingValue,
        InverseAssetRecord,
        LinearAssetRecord,
        MaxDrawdown,
        MaxPositionValue,
        ReturnOverMDD,
        ReturnOverTrade,
        Sortino,
    )

    if len(rec_ts) < 3:
        return {}
    record_cls = InverseAssetRecord if feed.contract == "inverse" else LinearAssetRecord
    record = record_cls(per_second(rec_ts, rec)).contract_size(feed.contract_size).resample("1s")
    days = (int(rec_ts[-1]) - int(rec_ts[0])) / DAY_NS
    metrics = [MaxDrawdown, ReturnOverMDD, ReturnOverTrade, MaxPositionValue]
    if days >= 1.0:
        metrics = [SR("SR", trading_days_per_year=365), Sortino("Sortino", trading_days_per_year=365),
                   AnnualRet("AnnualRet", trading_days_per_year=365), DailyNumberOfTrades, DailyTradingValue,
                   *metrics]
        how = (f"over {days:.2f} days of records: SR and Sortino are the mean of the 1-second equity changes "
               f"over their standard deviation (Sortino: downside deviation), times sqrt(86,400 x 365); AnnualRet "
               f"is the PnL ({pnl.currency(feed.symbol, feed.contract == 'inverse')}) / days x 365 (hftbacktest)")
    else:
        how = (f"not reported: the run covers {days * 24:.2f} h, less than a day, so SR, Sortino, AnnualRet and "
               f"the daily rates would be extrapolations")
    try:
        stats = record.stats(metrics)
    except Exception as exc:  # stats of a run with no variation can divide by zero inside polars
        return {"error": f"{type(exc).__name__}: {exc}", "annualised": how}
    row = stats.splits[-1]
    out = {k: (float(v) if isinstance(v, int | float | np.floating) else str(v)) for k, v in row.items()
           if k not in ("start", "end")}
    out["annualised"] = how
    return out


def save_result(result: RunResult, out_dir: Path, feed: Asset) -> Path:
    """Write summary.json, stats and the equity/position series; each file atomically."""
    import polars as pl

    out_dir.mkdir(parents=True, exist_ok=True)
    result.summary["stats"] = compute_stats(feed, result.record_ts, result.records)
    tmp = out_dir / ".series.parquet.tmp"
    try:
        with tempfile.TemporaryDirectory(prefix=".series-", dir=out_dir) as pieces:
            # a parquet file per chunk of records, joined by polars' streaming sink: a chunk in memory at a time
            files = []
            for lo, hi in spool.chunks(len(result.record_ts)):
                files.append(Path(pieces) / f"{lo:012d}.parquet")
                pl.DataFrame({"timestamp": np.asarray(result.record_ts[lo:hi]),
                              **{c: np.asarray(result.records[lo:hi, i]) for i, c in enumerate(SERIES_COLUMNS)}},
                             schema=series_schema()).write_parquet(files[-1])
            if files:
                pl.scan_parquet(files).sink_parquet(tmp)
            else:
                pl.DataFrame(schema=series_schema()).write_parquet(tmp)
        tmp.replace(out_dir / "series.parquet")
    except BaseException:  # a full disk, or a Ctrl-C while writing: no half file left in --out
        tmp.unlink(missing_ok=True)
        raise
    cat.atomic_write_json(out_dir / "summary.json", json.loads(json.dumps(result.summary, default=str)))
    return out_dir


def run_strategy(
    path: str | Path,
    catalog: str | Path | None = None,
    overrides: list[str] = (),
    out_dir: str | Path | None = None,
    registry: Any = None,
    strict: bool = False,
    check: bool = False,
    preload: bool = False,
    on_progress: Callable[[int], None] | None = None,
    progress: bool = False,
) -> RunResult:
    """Validate, compose and run the strategy YAML at ``path``.

    A trained model's part (``provenance`` param) must share the run's grid step; days it was trained on
    are listed in ``summary["in_sample"]`` (refused with ``strict``). ``check``: see :func:`run_loaded`.
    """
    from quotelab.strategy.provenance import strategy_in_sample

    loaded, registry, parts = load_strategy(path, overrides, registry=registry)
    in_sample = strategy_in_sample(loaded, parts, strict)
    result = run_loaded(loaded, registry, parts, catalog=catalog, out_dir=out_dir, check=check, preload=preload,
                        on_progress=on_progress, progress=progress)
    result.summary["in_sample"] = in_sample
    if result.out_dir is not None and in_sample:
        cat.atomic_write_json(result.out_dir / "summary.json", json.loads(json.dumps(result.summary, default=str)))
    return result
