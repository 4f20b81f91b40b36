"""Composition cost: the YAML seed strategy against its anchors, measured in the same run.

Anchors: the hand-written @njit seed loop (bench/handwritten.py) and hftbacktest's bare
``elapse(100ms)`` loop, on the same synthetic hour, each fed the data the same way as the composed run:
preloaded arrays (``run_strategy(preload=True)``: the cost of composition alone) and the catalog's part
files, which hftbacktest inflates while the clock runs (quotelab's default, streamed). Prints medians
of --repeat runs as ratios, then compile times, medians of --compile-repeat fresh processes (wall, and the
process CPU time of composing, which a shared machine's load does not inflate): the first strategy, a
second different one, and a 20-set sweep.

    python bench/compose.py [--catalog DIR] [--repeat 5] [--compile-repeat 5]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SYNTH_OVERRIDES = [
    "data.assets.perp.venue=synthetic",
    "data.assets.perp.symbol=SYNPERP",
    "data.assets.perp.dates=[20240101]",
]


def bare_elapse(data) -> float:
    from handwritten import seed_asset
    from hftbacktest import HashMapMarketDepthBacktest
    from numba import njit

    @njit
    def loop(hbt):
        n = 0
        while hbt.elapse(100_000_000) == 0:
            n += 1
        return n

    hbt = HashMapMarketDepthBacktest([seed_asset(data)])
    t = time.perf_counter()
    loop(hbt)
    dt = time.perf_counter() - t
    hbt.close()
    return dt


def handwritten(data) -> tuple[float, dict]:
    import numpy as np
    from handwritten import seed_asset, seed_market_maker
    from hftbacktest import HashMapMarketDepthBacktest

    hbt = HashMapMarketDepthBacktest([seed_asset(data)])
    t = time.perf_counter()
    seed_market_maker(hbt, np.zeros(1_000_000))
    dt = time.perf_counter() - t
    sv = hbt.state_values(0)
    res = {"num_trades": int(sv.num_trades), "position": sv.position, "balance": sv.balance, "fee": sv.fee}
    hbt.close()
    return dt, res


COMPILE_SCRIPT = r"""
import json, sys, time
from quotelab.backtest import engine
from quotelab.backtest.engine import run_strategy
seed, demo, catalog = sys.argv[1], sys.argv[2], sys.argv[3]
synth = json.loads(sys.argv[4])
sweep = sys.argv[5] == "1"
cpu = []
compose = engine.compose
def timed(*a, **k):  # process CPU of composing (generating and compiling) each strategy: the machine is shared
    t = time.process_time(); r = compose(*a, **k); cpu.append(time.process_time() - t); return r
engine.compose = timed
out = {}
t = time.perf_counter(); r = run_strategy(seed, catalog=catalog, overrides=synth)
out["first_total_s"] = time.perf_counter() - t; out["first_compile_s"] = r.summary["compile_seconds"]
t = time.perf_counter(); r2 = run_strategy(demo, catalog=catalog)
out["second_total_s"] = time.perf_counter() - t; out["second_compile_s"] = r2.summary["compile_seconds"]
out["first_compose_cpu_s"], out["second_compose_cpu_s"] = cpu
out["second_run_s"] = r2.summary["run_seconds"]
modules, compiles = set(), []
for i in range(20 if sweep else 0):
    r = run_strategy(seed, catalog=catalog, overrides=synth + [f"quoter.params.half_spread={1 + i % 5}",
                                                                f"forecast[0].alpha={0.5 + 0.25 * i}ticks"])
    modules.add(r.composition.module); compiles.append(r.summary["compile_seconds"])
if sweep:
    out["sweep_modules"] = len(modules); out["sweep_max_compile_s"] = max(compiles)
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalog", type=Path, default=None,
                    help="catalog with synthetic SYNPERP 20240101 (made if absent)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compile-repeat", type=int, default=5, help="fresh processes for the compile times")
    args = ap.parse_args()

    from quotelab.backtest.engine import run_strategy
    from quotelab.data import catalog as cat
    from quotelab.data.synth import generate

    scratch = tempfile.mkdtemp(prefix="qlbench_")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    catalog = args.catalog or Path(scratch) / "catalog"
    if not (catalog / "synthetic" / "SYNPERP" / "20240101.npz").exists():
        generate(catalog, seed=7, start="2024-01-01T00:00:00", duration_s=3600.0, assets=("perp", "spot"))
    arrays = [cat.load_day(catalog, "synthetic", "SYNPERP", "20240101")]
    files = [str(p) for p in cat.parts_of(cat.day_path(catalog, "synthetic", "SYNPERP", "20240101"))]
    seed = REPO / "strategies" / "seed_market_maker.yaml"
    demo = REPO / "strategies" / "demo_synthetic.yaml"
    events = sum(len(d) for d in arrays)

    for label, data, preload in (("preloaded arrays", arrays, True), ("streamed part files", files, False)):
        # warm every compile first so the loop timings below are run time only
        handwritten(data)
        bare_elapse(data)
        run_strategy(seed, catalog=catalog, overrides=SYNTH_OVERRIDES, preload=preload)
        t_hand, t_comp, t_bare = [], [], []
        for _ in range(args.repeat):
            dt, by_hand = handwritten(data)
            t_hand.append(dt)
            r = run_strategy(seed, catalog=catalog, overrides=SYNTH_OVERRIDES, preload=preload)
            t_comp.append(r.summary["run_seconds"])
            t_bare.append(bare_elapse(data))
        same = all(r.summary[k] == by_hand[k] for k in by_hand)
        h, c, b = (statistics.median(x) for x in (t_hand, t_comp, t_bare))
        print(f"synthetic hour, {label} ({len(data)} of them): {events:,} events, {r.summary['steps']:,} steps "
              f"of 100 ms, {by_hand['num_trades']} fills")
        print(f"  hand-written loop      {h:.3f} s  ({events / h / 1e6:.2f} M events/s)")
        print(f"  composed YAML          {c:.3f} s  ({events / c / 1e6:.2f} M events/s)")
        print(f"  bare elapse loop       {b:.3f} s  ({events / b / 1e6:.2f} M events/s)")
        print(f"  composed / hand-written run time: {c / h:.3f}  (target <= 1.05; identical results: {same})")
        print(f"  bare loop / composed throughput:  {b / c:.3f}  (share of the engine's limit left; aim >= 0.6)")

    # Fresh processes, each with a fresh kernel cache, so the second strategy's kernel really compiles (the cold
    # case); the parts' kinds it shares with the first are compiled by then. The sweep runs in the first only.
    runs = []
    for i in range(args.compile_repeat):
        with tempfile.TemporaryDirectory(prefix="qlcache_") as cache:
            proc = subprocess.run(
                [sys.executable, "-c", COMPILE_SCRIPT, str(seed), str(demo), str(catalog),
                 json.dumps(SYNTH_OVERRIDES), "1" if i == 0 else "0"],
                capture_output=True, text=True, check=True, env={**os.environ, "QUOTELAB_CACHE": cache},
            )
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    m = {k: statistics.median(r[k] for r in runs) for k in runs[0] if not k.startswith("sweep")}
    print(f"fresh processes ({len(runs)}, medians), cold kernel cache; compile is wall time, CPU the process CPU "
          f"time of composing the strategy:")
    print(f"  first strategy:             {m['first_total_s']:.2f} s in all, compile {m['first_compile_s']:.2f} s "
          f"(CPU {m['first_compose_cpu_s']:.2f} s: its kernel and parts from a cold kernel cache, the driver from "
          f"numba's disk cache)")
    print(f"  second, different strategy: {m['second_total_s']:.2f} s in all (incl. loading 2 assets), compile "
          f"{m['second_compile_s']:.3f} s, CPU {m['second_compose_cpu_s']:.3f} s with a cold kernel cache "
          f"(target <= 0.5 s)")
    print(f"  sweep of 20 parameter sets: {runs[0]['sweep_modules']} kernel module(s), max compile "
          f"{runs[0]['sweep_max_compile_s']:.4f} s (target: no recompilation)")


if __name__ == "__main__":
    main()
