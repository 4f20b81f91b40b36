"""Optimisation benchmark: the same search (same seed, so the same trials) with 1 and 2 local workers.

Prints trials per minute for each (steady state: from the end of the first round, which holds each
worker's start and driver load, to the last trial) and their ratio (target >= 1.8 on 2 cores), and how
many runs compiled the driver (target: one per worker, none for later trials) with the largest
compile_seconds of any run after a worker's first (parameters travel as runtime arrays: no recompilation).

    python bench/optimize.py [--duration 600] [--days 2] [--trials 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import optuna
import yaml

from quotelab.batch.optimize import optimize
from quotelab.data import synth

BASE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "optimize" / "base.yaml"


def steady_rate(out: Path, name: str, first_round: int) -> tuple[float, int]:
    study = optuna.load_study(study_name=f"{name}-fold0", storage=f"sqlite:///{out / 'optuna.db'}")
    ends = sorted(t.datetime_complete for t in study.get_trials() if t.datetime_complete)
    span = (ends[-1] - ends[first_round - 1]).total_seconds()
    n = len(ends) - first_round
    return n / span * 60.0, n


def compiles(out: Path) -> tuple[int, int, float]:
    recs = [json.loads(p.read_text()) for p in out.glob("runs/*/record.json")]
    later = [r.get("compile_seconds") or 0.0 for r in recs if not r.get("driver_compiled")]
    return sum(bool(r.get("driver_compiled")) for r in recs), len(recs), max(later, default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of synthetic market per day")
    ap.add_argument("--days", type=int, default=2)
    ap.add_argument("--trials", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="quotelab-bench-opt-") as tmp:
        root = Path(tmp)
        days = []
        for d in range(1, args.days + 1):
            synth.generate(root / "cat", seed=20 + d, start=f"2024-01-{d:02d}T12:00:00", duration_s=args.duration,
                           assets="perp")
            days.append(f"202401{d:02d}")
        opt = root / "opt.yaml"
        opt.write_text(yaml.safe_dump({
            "name": "bench", "strategy": str(BASE), "seed": 1, "trials": args.trials, "parallel_trials": 2,
            "pruner": "none", "days": days,
            "space": {"quoter.params.half_spread": {"low": 1, "high": 8, "step": 1},
                      "risk[0].params.risk_aversion": {"low": 0.01, "high": 2.0, "log": True}}}))
        rates = {}
        for workers in (1, 2):
            out = root / f"w{workers}"
            res = optimize(opt, out, catalog=root / "cat", workers=workers, progress=lambda m: None)
            rate, n = steady_rate(out, "bench", 2)
            rates[workers] = rate
            c, runs, later = compiles(out)
            print(f"workers {workers}: {args.trials} trials x {len(days)} days in {res.seconds:.1f} s; steady "
                  f"{rate:.1f} trials/min over the last {n}; driver compiled in {c} of {runs} runs, later runs' "
                  f"compile_seconds <= {later:.3f}")
        print(f"speedup 2 workers / 1: {rates[2] / rates[1]:.2f}x (target >= 1.8)")


if __name__ == "__main__":
    main()
