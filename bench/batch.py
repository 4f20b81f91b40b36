"""Batch benchmark: the same 8-run batch on the synthetic market with 1 and 2 local workers, and on Ray.

Prints wall time, speedup (target >= 1.8x on 2 cores), driver compilations per worker (target 1) and the
Ray executor's overhead against the local pool (target <= 10%). Each executor starts fresh worker
processes, so every measurement includes each worker's start and its one load of the driver (from numba's
disk cache since the driver calls hftbacktest by symbol name: "compile s" is then ~0). With the default
10-minute market each run takes ~0.1 s, so the ratios measure start-up; --duration 86400 measures the work.

    python bench/batch.py [--duration 600] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from quotelab.batch import run_batch
from quotelab.data import synth

BATCH = Path(__file__).resolve().parents[1] / "strategies" / "batch_synthetic.yaml"


def per_worker(out: Path) -> dict[str, int]:
    compiles: dict[str, int] = {}
    for p in out.glob("runs/*/record.json"):
        rec = json.loads(p.read_text())
        compiles[rec["worker"]] = compiles.get(rec["worker"], 0) + int(rec["driver_compiled"])
    return compiles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=600.0, help="synthetic market length, seconds")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="quotelab-bench-batch-") as tmp:
        root = Path(tmp)
        synth.generate(root / "cat", seed=7, duration_s=args.duration)
        times: dict[str, float] = {}
        for name, kw in [("local x1", {"workers": 1}), ("local x2", {"workers": 2})] + (
                [] if args.skip_ray else [("ray x2", {"workers": 2, "executor": "ray"})]):
            out = root / name.replace(" ", "_")
            t0 = time.perf_counter()
            s = run_batch(BATCH, out, catalog=root / "cat", **kw)
            times[name] = time.perf_counter() - t0
            recs = [json.loads(p.read_text()) for p in out.glob("runs/*/record.json")]
            compile_s = sorted(round(r["compile_seconds"] or 0, 1) for r in recs if r["driver_compiled"])
            run_s = sum(r["wall_seconds"] or 0 for r in recs if not r["driver_compiled"])
            print(f"{name:9s} {times[name]:7.2f} s  done {s.done} failed {s.failed}  "
                  f"driver compilations per worker: {sorted(per_worker(out).values())}  "
                  f"compile s per worker: {compile_s}  wall of warm runs: {run_s:.2f} s")
        print(f"speedup 2 vs 1 local workers: {times['local x1'] / times['local x2']:.2f}x (target >= 1.8x)")
        if "ray x2" in times:
            print(f"ray overhead vs local pool (2 workers, incl. starting the local cluster): "
                  f"{(times['ray x2'] / times['local x2'] - 1) * 100:+.1f}% (target <= 10%)")


if __name__ == "__main__":
    main()
