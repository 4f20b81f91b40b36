"""Fair-value evaluation speed against its anchors, measured in the same run.

1. ``quotelab evaluate`` (replay + every estimator + scoring) against hftbacktest's bare
   ``wait_next_feed`` replay of the same catalog day: evaluation must rebuild the book too, so that
   loop is its limit (target >= 0.5 of its events/s).
2. ``quotelab evaluate`` end to end from the catalog against a pandas implementation of the same
   study (mid and weighted mid against future mids and trades) on top-of-book frames and trades
   already built in memory. Prints the ratio and whether the numbers are identical.

Runs on a synthetic day (>= 20 M events, made if absent) and on the shared USD-M BTCUSDT window.

    python bench/evaluate.py [--catalog DIR] [--hours 24] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


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
    from quotelab.evaluate import evaluate

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalog", type=Path, default=None)
    ap.add_argument("--hours", type=float, default=24.0, help="synthetic day length (24 h is ~38 M perp events)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    from quotelab.data.synth import generate

    tmp = Path(tempfile.mkdtemp(prefix="qlbench_eval_"))
    catalog = args.catalog or tmp / "catalog"
    if not (catalog / "synthetic" / "SYNPERP" / "20240101.npz").exists():
        generate(catalog, seed=7, start="2024-01-01T00:00:00", duration_s=args.hours * 3600, assets=("perp",))
    bench_one("synthetic", catalog, "synthetic", "SYNPERP", "20240101", args.repeat, tmp)
    shared = args.shared / "binance" / "usdm" / "btcusdt_20240808.gz"
    if shared.exists():
        subprocess.run([sys.executable, "-m", "quotelab.cli", "convert", "--format", "binance-usdm", "--symbol",
                        "BTCUSDT", "--catalog", str(catalog), str(shared)], check=True, capture_output=True)
        bench_one("shared", catalog, "binance-usdm", "BTCUSDT", "20240808", args.repeat, tmp)


if __name__ == "__main__":
    main()
