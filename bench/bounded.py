"""Benchmark: peak private memory (RssAnon) of the research verbs on 4 days against 1 day.

    python bench/bounded.py [--hours 4] [--repeat 3] [--catalog DIR] [--only evaluate-trades,train,report]

The synthetic perpetual (``quotelab synth``, the default demo density, ``--hours`` a day, days
20240101-04) goes through, in a child process each (bench/_mem.py samples its RssAnon):

* ``evaluate`` with ``score: trades``: every trade of the target scored against the estimates;
* ``train``: a linear model of four signal features, walk-forward over 5 folds, causality guard on;
* ``report`` of a batch results folder (the best and worst run's PnL and position charts) and of
  one ``run --out`` folder (its PnL, position and quote charts), each over 1 and 4 days.

Each line prints both peaks and their ratio: a verb whose private memory does not depend on the
number of days prints ~1.0. ``--catalog`` reuses a catalog that already holds the four days.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _mem import peak_rss_anon  # noqa: E402

QL = [sys.executable, "-m", "quotelab.cli"]
DAYS = [20240101, 20240102, 20240103, 20240104]
PERP = {"venue": "synthetic", "symbol": "SYNPERP"}
EVALUATE = {
    "name": "trades", "score": "trades",
    "estimators": [{"name": "mid", "fair_value": [{"kind": "mid"}]},
                   {"name": "weighted_mid", "fair_value": [{"kind": "weighted_mid"}]},
                   {"name": "mid_flow", "fair_value": [{"kind": "mid"}],
                    "forecast": [{"kind": "trade_flow_imbalance", "alpha": "1ticks", "params": {"alpha": 0.1}}]}],
}
TRAIN = {
    "name": "train", "grid": {"step": "100ms"}, "target": {"horizon": "1s"},
    "features": [{"kind": "book_imbalance", "params": {"weights": [1.0]}},
                 {"kind": "book_imbalance", "params": {"weights": [0.5, 0.3, 0.2]}},
                 {"kind": "trade_flow_imbalance", "params": {"output": "VI", "alpha": 0.1, "side": "aggressor"}},
                 {"kind": "returns", "params": {"horizon": 10}}],
    "model": {"kind": "linear"}, "validation": {"folds": 5, "purge": "2s"},
}
STRATEGY = yaml.safe_load((Path(__file__).resolve().parents[1] / "strategies" / "batch_synthetic.yaml").read_text()
                          )["strategy"]


def _data(catalog: Path, n: int) -> dict:
    return {"catalog": str(catalog), "quote": "perp", "assets": {"perp": {**PERP, "dates": DAYS[:n]}}}


def _yaml(doc: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _peak(cmd: list[str], repeat: int) -> float:
    return statistics.median(peak_rss_anon(cmd)[0] for _ in range(repeat))


def _ratio(what: str, peaks: dict[int, float]) -> None:
    print(f"{what:24s} peak RssAnon: 1 day {peaks[1]:6.0f} MB, 4 days {peaks[4]:6.0f} MB, "
          f"4 days / 1 day {peaks[4] / peaks[1]:.3f}x (target <= 1.05)", flush=True)


def evaluate_trades(root: Path, catalog: Path, repeat: int) -> None:
    _ratio("evaluate (score: trades)", {
        n: _peak([*QL, "evaluate", str(_yaml({**EVALUATE, "data": _data(catalog, n)}, root / f"ev{n}.yaml")),
                  "--json"], repeat) for n in (1, 4)})


def train(root: Path, catalog: Path, repeat: int) -> None:
    _ratio("train (linear)", {
        n: _peak([*QL, "train", str(_yaml({**TRAIN, "data": _data(catalog, n)}, root / f"tr{n}.yaml")),
                  "--json"], repeat) for n in (1, 4)})


def report(root: Path, catalog: Path, repeat: int) -> None:
    batch_peaks, run_peaks = {}, {}
    for n in (1, 4):
        strategy = json.loads(json.dumps(STRATEGY))
        strategy["data"] = {"quote": "quoted", "assets": {"quoted": {**PERP, "dates": DAYS[:n]}}}
        doc = {"name": f"report{n}", "strategy": strategy,
               "matrix": {"params": {"quoter.params.half_spread": [2, 4]}}}
        out = root / f"batch{n}"
        subprocess.run([*QL, "batch", str(_yaml(doc, root / f"batch{n}.yaml")), "--catalog", str(catalog),
                        "--out", str(out), "--json"], check=True, capture_output=True)
        batch_peaks[n] = _peak([*QL, "report", str(out), "--out", str(root / f"html{n}")], repeat)
        run = root / f"run{n}"
        strategy["data"]["catalog"] = str(catalog)
        subprocess.run([*QL, "run", str(_yaml(strategy, root / f"run{n}.yaml")), "--out", str(run), "--json"],
                       check=True, capture_output=True)
        run_peaks[n] = _peak([*QL, "report", str(run), "--out", str(root / f"runhtml{n}")], repeat)
    _ratio("report (batch)", batch_peaks)
    _ratio("report (one run)", run_peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=4.0, help="synthetic hours a day")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--catalog", type=Path, help="a catalog holding synthetic/SYNPERP 20240101-04 already")
    ap.add_argument("--only", default="evaluate-trades,train,report")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="quotelab-bounded-") as tmp:
        root = Path(tmp)
        catalog = args.catalog or root / "cat"
        if args.catalog is None:
            for day in map(str, DAYS):
                subprocess.run([*QL, "synth", "--catalog", str(catalog), "--assets", "perp", "--start",
                                f"{day[:4]}-{day[4:6]}-{day[6:]}T00:00:00", "--duration", f"{args.hours:g}h",
                                "--json"], check=True, capture_output=True)
        print(f"synthetic perp, {args.hours:g} h a day ({catalog}); medians of {args.repeat}", flush=True)
        for name in args.only.split(","):
            {"evaluate-trades": evaluate_trades, "train": train, "report": report}[name](root, catalog, args.repeat)


if __name__ == "__main__":
    main()
