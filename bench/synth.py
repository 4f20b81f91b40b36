"""Benchmark the synthetic market generator.

    python bench/synth.py            # one hour of perp + spot, median of 3 (after a compile warm-up)
    python bench/synth.py --day      # also one UTC day of the perp alone, with its peak memory

The day runs in a child process so its peak resident set is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quotelab.data import synth


def _hour(repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        synth.generate(Path(tmp) / "warm", seed=1, duration_s=10)  # compile (or load the cache)
        times, events = [], 0
        for i in range(repeats):
            t = time.perf_counter()
            s = synth.generate(Path(tmp) / f"h{i}", seed=7, duration_s=3600)
            times.append(time.perf_counter() - t)
            events = sum(v["events"] for v in s["symbols"].values())
    med = statistics.median(times)
    return {"what": "1 h perp+spot", "seconds_median": round(med, 2), "events": events,
            "events_per_s": round(events / med)}


def _day_child(folder: str) -> None:
    t = time.perf_counter()
    s = synth.generate(folder, seed=7, duration_s=86400, assets="perp")
    info = s["symbols"]["SYNPERP"]
    size = sum(Path(f).stat().st_size for f in info["files"])
    print(json.dumps({"what": "24 h perp", "seconds": round(time.perf_counter() - t, 1), "events": info["events"],
                      "trades": info["trades"], "file_mb": round(size / 2**20),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--day", action="store_true", help="also generate a full day of the perp")
    ap.add_argument("--day-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.day_child:
        _day_child(args.day_child)
        return
    print(json.dumps(_hour(args.repeats)))
    if args.day:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, __file__, "--day-child", tmp], capture_output=True, text=True,
                                 check=True)
            print(out.stdout.strip())


if __name__ == "__main__":
    main()
