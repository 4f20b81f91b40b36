"""Fair-value evaluation speed against its anchors, measured in the same run.

1. ``quotelab evaluate`` (replay + every estimator + scoring) against hftbacktest's bare
   ``wait_next_feed`` replay of the same catalog day: evaluation must rebuild the book too, so that
   loop is its limit (target >= 0.5 of its events/s).
2. ``quotelab evaluate`` end to end from the catalog against a pandas implementation of the same
   study (mid and weighted mid against future mids and trades) on top-of-book frames and trades
   already built in memory. Prints the ratio and whether the numbers are identical.
3. The seed's mid-price study (``strategies/midprice_study.yaml``, ``score: trades``) end to end
   from the catalog, against ``bench/seed_study.py``'s pandas procedure on trades and exchange-time
   top-of-book frames already built in memory; with the time split (load, replay, rest).

Runs on a synthetic day (>= 20 M events, made if absent) and on the shared USD-M BTCUSDT window,
each from a deflated catalog (the default) and from the same days stored uncompressed
(``--compression none``, memory-mapped).

    python bench/evaluate.py [--catalog DIR] [--hours 24] [--repeat 3]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def bare_feed_replay(day: np.ndarray, tick: float, lot: float) -> float:
    from handwritten import seed_asset
    from hftbacktest import HashMapMarketDepthBacktest
    from numba import njit

    @njit
    def loop(hbt):
        n = 0
        while hbt.wait_next_feed(False, 60_000_000_000) in (0, 2):
            n += 1
        return n

    hbt = HashMapMarketDepthBacktest([seed_asset([day]).tick_size(tick).lot_size(lot)])
    t = time.perf_counter()
    loop(hbt)
    dt = time.perf_counter() - t
    hbt.close()
    return dt


def study_yaml(tmp: Path, venue: str, symbol: str, date: str, catalog: Path) -> Path:
    doc = {
        "name": "bench",
        "data": {"catalog": str(catalog), "quote": "x", "assets": {"x": {"venue": venue, "symbol": symbol,
                                                                          "dates": [date]}}},
        "step": "100ms", "horizons": ["100ms", "1s", "10s", "60s"], "plots": False,
        "estimators": [{"name": "mid", "fair_value": [{"kind": "mid"}]},
                       {"name": "weighted_mid", "fair_value": [{"kind": "weighted_mid"}]}],
    }
    path = tmp / f"{symbol}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def pandas_study(tob, trades) -> dict:
    import pandas as pd

    mid = (tob.bid + tob.ask) / 2
    imb = (tob.bq - tob.aq) / (tob.bq + tob.aq)
    out = {}
    for name, est in {"mid": mid, "weighted_mid": mid + (tob.ask - tob.bid) * imb / 2}.items():
        for label, k in {"100ms": 1, "1s": 10, "10s": 100, "60s": 600}.items():
            err = (est - mid.shift(-k)).dropna()
            out[(name, label)] = float((err**2).mean())
        m = pd.merge_asof(trades, est.rename("est").reset_index(), on="ts", direction="backward").dropna()
        out[(name, "trade")] = float(((m.px - m.est) ** 2).mean())
    return out


def frames(day: np.ndarray, tick: float, lot: float):
    """hftbacktest's own top of book on the 100 ms grid, and the trades, as pandas frames."""
    import pandas as pd
    from handwritten import seed_asset
    from hftbacktest import HashMapMarketDepthBacktest
    from hftbacktest.types import EXCH_EVENT, TRADE_EVENT
    from numba import njit

    @njit
    def tob(hbt, ts, book):
        n = 0
        while hbt.elapse(100_000_000) == 0:
            d = hbt.depth(0)
            ts[n] = hbt.current_timestamp
            book[n, 0], book[n, 1] = d.best_bid, d.best_ask
            book[n, 2], book[n, 3] = d.best_bid_qty, d.best_ask_qty
            n += 1
        return n

    span = int(day["local_ts"].max() - day["local_ts"].min()) // 100_000_000 + 2
    ts, book = np.zeros(span, np.int64), np.zeros((span, 4))
    hbt = HashMapMarketDepthBacktest([seed_asset([day]).tick_size(tick).lot_size(lot)])
    n = tob(hbt, ts, book)
    hbt.close()
    df = pd.DataFrame(book[:n], columns=["bid", "ask", "bq", "aq"], index=pd.Index(ts[:n], name="ts"))
    df = df[np.isfinite(df.bid) & np.isfinite(df.ask)]
    tr = day[((day["ev"] & 0xFF) == TRADE_EVENT) & ((day["ev"] & EXCH_EVENT) == EXCH_EVENT)]
    trades = pd.DataFrame({"ts": tr["exch_ts"], "px": tr["px"]}).sort_values("ts", kind="stable")
    return df, trades


def bench_one(label: str, catalog: Path, venue: str, symbol: str, date: str, repeat: int, tmp: Path) -> None:
    from quotelab.data import catalog as cat
    from quotelab.research.evaluate import evaluate

    meta = cat.read_meta(catalog, venue, symbol)
    day = cat.load_day(catalog, venue, symbol, date)
    tick, lot = meta["tick_size"], meta["lot_size"]
    path = study_yaml(tmp, venue, symbol, date, catalog)
    evaluate(path)  # compile once
    bare_feed_replay(day, tick, lot)
    t_eval_replay, t_eval_total, t_bare, t_pandas = [], [], [], []
    tob, trades = frames(day, tick, lot)
    for _ in range(repeat):
        t = time.perf_counter()
        res = evaluate(path)
        t_eval_total.append(time.perf_counter() - t)
        t_eval_replay.append(res.summary["replay_seconds"])
        t_bare.append(bare_feed_replay(day, tick, lot))
        t = time.perf_counter()
        ref = pandas_study(tob, trades)
        t_pandas.append(time.perf_counter() - t)
    mine = {(r["estimator"], r["horizon"]): r["mse"] for r in res.rows}
    same = all(abs(mine[k] - v) <= 1e-9 * abs(v) for k, v in ref.items())
    ev = len(day)
    er, et, b, p = (statistics.median(x) for x in (t_eval_replay, t_eval_total, t_bare, t_pandas))
    print(f"[{label}] {venue}/{symbol} {date}: {ev:,} events")
    print(f"  evaluate replay+score   {er:.3f} s  ({ev / er / 1e6:.2f} M events/s)")
    print(f"  bare wait_next_feed     {b:.3f} s  ({ev / b / 1e6:.2f} M events/s)")
    print(f"  evaluate / bare events/s: {b / er:.3f}  (target >= 0.5)")
    print(f"  evaluate end to end from the catalog {et:.3f} s; pandas on in-memory frames {p:.3f} s; "
          f"pandas / quotelab time: {p / et:.3f} (target > 1); identical numbers: {same}")


def exchange_frames(days: list[np.ndarray], tick: float, lot: float, shared: bool):
    """The seed study's inputs: its trades frame and the top-3 levels after each exchange timestamp.

    On the shared window the frame comes from seed_study's plain dict book (independent of quotelab);
    a 20 M-event day is too long for it, so there the levels are recorded by quotelab's exchange-clock
    replay, called once per depth timestamp."""
    import pandas as pd
    from hftbacktest.types import EXCH_EVENT, TRADE_EVENT
    from seed_study import LEVELS, book_frame, exchange_rows, trades_frame

    from quotelab import layout as L
    from quotelab.data.assets import Asset
    from quotelab.research.replay import TradeTape, prepare_exchange, replay_trades
    from quotelab.strategy.codegen import STRATEGY_SIG

    rows = exchange_rows(days)
    trades = trades_frame(rows, 1_000_000 if shared else 1)  # the synthetic clock has nanoseconds
    if shared:
        return trades, book_frame(rows, tick, lot)
    from numba import njit

    @njit(STRATEGY_SIG)
    def levels(view, trades, state, params, out):
        for k in range(3):
            out[k] = view[0, L.BID_PX + k]
            out[3 + k] = view[0, L.BID_SZ + k]
            out[6 + k] = view[0, L.ASK_PX + k]
            out[9 + k] = view[0, L.ASK_SZ + k]
        return 0.0

    data = prepare_exchange([Asset("x", days, tick, lot)])
    ev, exch_ts = np.concatenate([d["ev"] for d in days]), np.concatenate([d["exch_ts"] for d in days])
    ts = np.unique(exch_ts[((ev & 0xFF) != TRADE_EVENT) & ((ev & EXCH_EVENT) == EXCH_EVENT)])
    z = np.zeros(len(ts))
    got = replay_trades(data, TradeTape(ts, z, z, z + 1.0, 0), levels, np.zeros(0), np.zeros(0), n_levels=LEVELS,
                        out_columns=list(range(12)))
    cols = {"transact_time": ts}
    for k in range(LEVELS):
        cols |= {f"bid_{k}_price": got[:, k], f"bid_{k}_quantity": got[:, 3 + k], f"ask_{k}_price": got[:, 6 + k],
                 f"ask_{k}_quantity": got[:, 9 + k]}
    return trades, pd.DataFrame(cols)


def bench_seed_study(label: str, catalog: Path, venue: str, symbol: str, dates: list[str], repeat: int, tmp: Path
                     ) -> None:
    from seed_study import study_table

    from quotelab.data import catalog as cat
    from quotelab.research.evaluate import evaluate

    doc = yaml.safe_load((REPO / "strategies" / "midprice_study.yaml").read_text())
    doc["data"] = {"catalog": str(catalog), "quote": "x",
                   "assets": {"x": {"venue": venue, "symbol": symbol, "dates": [int(d) for d in dates]}}}
    doc["targets"] = ["x"]
    path = tmp / f"study_{symbol}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    meta = cat.read_meta(catalog, venue, symbol)
    days = [cat.load_day(catalog, venue, symbol, d) for d in dates]
    trades, depths = exchange_frames(days, meta["tick_size"], meta["lot_size"], shared=label.startswith("shared"))
    evaluate(path)  # compile once
    t_eval, t_replay, t_pandas, t_load = [], [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        for d in dates:
            cat.load_day(catalog, venue, symbol, d)
        t_load.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = evaluate(path)
        t_eval.append(time.perf_counter() - t)
        t_replay.append(res.summary["replay_seconds"])
        t = time.perf_counter()
        ref = study_table(trades, depths, meta["tick_size"])
        t_pandas.append(time.perf_counter() - t)
    same = all(r["n"] == ref.loc[r["estimator"], "n"] and abs(r["sse"] - ref.loc[r["estimator"], "sse"])
               <= 1e-9 * abs(ref.loc[r["estimator"], "sse"]) for r in res.rows)
    e, rp, pd_, ld = (statistics.median(x) for x in (t_eval, t_replay, t_pandas, t_load))
    n_ev = sum(len(d) for d in days)
    print(f"[{label}] seed mid-price study, {venue}/{symbol} {'+'.join(dates)}: {n_ev:,} events, "
          f"{res.summary['trades_raw']:,} trades -> {res.summary['trades_scored']:,} aggregated, "
          f"{len(depths):,} book frames")
    print(f"  evaluate end to end {e:.3f} s (catalog load {ld:.3f} s, exchange-clock replay + bank {rp:.3f} s); "
          f"pandas on in-memory frames {pd_:.3f} s")
    print(f"  pandas / quotelab time: {pd_ / e:.3f} (target > 1); replay alone: {pd_ / rp:.3f}; "
          f"identical numbers: {same}")


def uncompressed_copy(catalog: Path, venue: str, symbol: str, dest: Path) -> Path:
    """The symbol's days rewritten with ``compression='none'`` (same rows) under ``dest``."""
    from quotelab.data import catalog as cat

    meta = cat.read_meta(catalog, venue, symbol)
    for day in meta["days"]:
        if not cat.day_path(dest, venue, symbol, day).exists():
            cat.write_day(dest, venue, symbol, day, cat.load_day(catalog, venue, symbol, day), compression="none")
    cat.update_meta(dest, venue, symbol, {k: v for k, v in meta.items() if k not in ("days", "venue", "symbol")},
                    meta["days"])
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalog", type=Path, default=None)
    ap.add_argument("--hours", type=float, default=24.0, help="synthetic day length (24 h is ~38 M perp events)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    from quotelab.data.synth import generate

    tmp = Path(tempfile.mkdtemp(prefix="qlbench_eval_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    catalog = args.catalog or tmp / "catalog"
    mapped = tmp / "catalog_uncompressed"
    if not (catalog / "synthetic" / "SYNPERP" / "20240101.npz").exists():
        generate(catalog, seed=7, start="2024-01-01T00:00:00", duration_s=args.hours * 3600, assets=("perp",))
    uncompressed_copy(catalog, "synthetic", "SYNPERP", mapped)
    shared = args.shared / "binance" / "usdm" / "btcusdt_20240808.gz"
    if shared.exists():
        subprocess.run([sys.executable, "-m", "quotelab.cli", "convert", "--format", "binance-usdm", "--symbol",
                        "BTCUSDT", "--catalog", str(catalog), str(shared)], check=True, capture_output=True)
        uncompressed_copy(catalog, "binance-usdm", "BTCUSDT", mapped)
    for form, cat_dir in (("deflated", catalog), ("uncompressed", mapped)):
        bench_one(f"synthetic, {form}", cat_dir, "synthetic", "SYNPERP", "20240101", args.repeat, tmp)
        if shared.exists():
            bench_one(f"shared, {form}", cat_dir, "binance-usdm", "BTCUSDT", "20240808", args.repeat, tmp)
            bench_seed_study(f"shared, {form}", cat_dir, "binance-usdm", "BTCUSDT", ["20240808", "20240809"],
                             args.repeat, tmp)
        bench_seed_study(f"synthetic, {form}", cat_dir, "synthetic", "SYNPERP", ["20240101"], args.repeat, tmp)


if __name__ == "__main__":
    main()
