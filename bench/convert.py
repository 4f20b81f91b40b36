"""Benchmark: quotelab's Binance converter against hftbacktest's, on the shared USD-M BTCUSDT file.

    python bench/convert.py [--data ../shared/data] [--repeat 3]

Both run in this process, after a warm-up (numba compiles once), each ``--repeat`` times; medians
of wall time and of process CPU time are printed (quotelab inflates and parses in two threads ahead
of the book builder, so on a busy machine wall time depends on the other load; CPU time less so).
Two comparisons, like for like:

* in memory: quotelab's parse + book + day arrays, against ``binancefutures.convert(opt='')``
  without an output file;
* to disk: ``quotelab convert`` into a catalog (compressed npz + meta.json), against
  ``binancefutures.convert`` writing its compressed npz.

Then both outputs are replayed by one plain Python book (below) and compared, after every depth
message, with the bookTicker whose update id is the last one at or below the message's final id.
hftbacktest's rows carry no update id, so its depth rows are matched to messages by position: it
emits each message's levels in file order and sorts stably by exchange time.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gzip
import heapq
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from hftbacktest.data.utils import binancefutures
from hftbacktest.types import BUY_EVENT, DEPTH_CLEAR_EVENT, DEPTH_EVENT, DEPTH_SNAPSHOT_EVENT, EXCH_EVENT

from quotelab.data import binance
from quotelab.data.convert import convert_files
from quotelab.data.events import ConvertJob, DayResult
from quotelab.data.instruments import resolve

REPO = Path(__file__).resolve().parents[1]
TICK = 0.1


@contextlib.contextmanager
def quiet_fd1() -> Iterator[None]:
    """hftbacktest prints progress from Python and from numba (C stdout): silence file descriptor 1."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def median_time(fn: Callable[[], Any], repeat: int) -> tuple[float, list[float], float, Any]:
    """Median wall time, all wall times, median CPU time of the process (all threads), last result."""
    times, cpu, out = [], [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(times), times, statistics.median(cpu), out


def quotelab_in_memory(path: Path) -> list[DayResult]:
    days: list[DayResult] = []
    job = ConvertJob("binance-usdm", "BTCUSDT", resolve("binance-usdm", "BTCUSDT"), days.append)
    binance.convert_usdm([path], job)
    return days


def quotelab_to_catalog(path: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return convert_files("binance-usdm", [path], "BTCUSDT", tmp)


def hftbacktest_convert(path: Path, out: bool) -> np.ndarray:
    with quiet_fd1(), tempfile.TemporaryDirectory() as tmp:
        # Its default buffer is 100 M rows (6.4 GB); 5 M holds this file.
        return binancefutures.convert(str(path), output_filename=str(Path(tmp) / "out.npz") if out else None,
                                      opt="", buffer_size=5_000_000)


# --- the witness, independent of both converters -------------------------------------------------


def raw_index(path: Path) -> tuple[list[tuple[int, float, float]], list[tuple[int, int, int, bool]]]:
    """bookTickers (u, bid, ask) sorted by u; row-producing book messages (T ms, rows, id, is_snapshot)
    in file order, as hftbacktest emits them."""
    bts: list[tuple[int, float, float]] = []
    msgs: list[tuple[int, int, int, bool]] = []
    with gzip.open(path, "rb") as fh:
        for line in fh:
            m = orjson.loads(line[line.index(b" ") + 1:])
            d = m.get("data")
            if d is None:
                rows = (len(m["bids"]) + 1 if m["bids"] else 0) + (len(m["asks"]) + 1 if m["asks"] else 0)
                msgs.append((m["T"], rows, m["lastUpdateId"], True))
            elif d["e"] == "bookTicker":
                bts.append((d["u"], float(d["b"]), float(d["a"])))
            elif d["e"] == "depthUpdate":
                msgs.append((d["T"], len(d["b"]) + len(d["a"]), d["u"], False))
    bts.sort()
    return bts, msgs


class Book:
    def __init__(self) -> None:
        self.q: dict[int, dict[int, float]] = {1: {}, -1: {}}
        self.h: dict[int, list[int]] = {1: [], -1: []}

    def clear(self, s: int) -> None:
        self.q[s].clear()
        self.h[s].clear()

    def set(self, s: int, t: int, qty: float) -> None:
        if qty == 0:
            self.q[s].pop(t, None)
        else:
            if t not in self.q[s]:
                heapq.heappush(self.h[s], -t if s == 1 else t)
            self.q[s][t] = qty

    def best(self, s: int) -> int | None:
        h = self.h[s]
        while h:
            t = -h[0] if s == 1 else h[0]
            if t in self.q[s]:
                return t
            heapq.heappop(h)
        return None


def agreement(events: np.ndarray, ids: np.ndarray, is_snap: np.ndarray,
              bts: list[tuple[int, float, float]]) -> tuple[int, int]:
    """Replay EXCH depth rows; ``ids[k]``/``is_snap[k]`` label row k's message. After each depth
    message (not snapshots), compare with the last bookTicker at or below its id."""
    bt_ids = [b[0] for b in bts]
    bt_px = [(round(b[1] / TICK), round(b[2] / TICK)) for b in bts]
    book = Book()
    compared = agreed = 0
    ev, px, qty = events["ev"].tolist(), events["px"].tolist(), events["qty"].tolist()
    n = len(ev)
    for k in range(n):
        kind = ev[k] & 0xFF
        s = 1 if ev[k] & BUY_EVENT else -1
        if kind == DEPTH_CLEAR_EVENT:
            book.clear(s)
        else:
            book.set(s, round(px[k] / TICK), qty[k])
        if k + 1 < n and ids[k + 1] == ids[k] and is_snap[k + 1] == is_snap[k]:
            continue
        if is_snap[k]:
            continue
        j = bisect.bisect_right(bt_ids, int(ids[k])) - 1
        if j < 0:
            continue
        compared += 1
        agreed += (book.best(1), book.best(-1)) == bt_px[j]
    return agreed, compared


def depth_rows(events: np.ndarray) -> np.ndarray:
    kinds = events["ev"] & 0xFF
    keep = ((events["ev"] & EXCH_EVENT) != 0) & np.isin(kinds, [DEPTH_EVENT, DEPTH_CLEAR_EVENT, DEPTH_SNAPSHOT_EVENT])
    return events[keep]


def hftbacktest_labels(rows: np.ndarray, msgs: list[tuple[int, int, int, bool]]) -> tuple[np.ndarray, np.ndarray]:
    order = sorted(range(len(msgs)), key=lambda i: msgs[i][0])  # stable, like its mergesort on exch_ts
    ids = np.repeat([msgs[i][2] for i in order], [msgs[i][1] for i in order])
    snap = np.repeat([msgs[i][3] for i in order], [msgs[i][1] for i in order])
    if ids.shape[0] != rows.shape[0]:
        raise SystemExit(f"could not match hftbacktest's {rows.shape[0]} depth rows to {ids.shape[0]} message rows")
    exch = np.repeat([msgs[i][0] * 1_000_000 for i in order], [msgs[i][1] for i in order])
    if not (exch == rows["exch_ts"]).all():
        raise SystemExit("hftbacktest's depth rows are not in the expected message order")
    return ids, snap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("QUOTELAB_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    path = args.data / "binance" / "usdm" / "btcusdt_20240808.gz"
    with gzip.open(path, "rb") as fh:
        lines = sum(1 for _ in fh)
    print(f"input: {path} ({lines:,} lines, {path.stat().st_size / 1e6:.1f} MB gz); cpus: {os.cpu_count()}, "
          f"load average: {os.getloadavg()[0]:.2f}")

    quotelab_in_memory(path)  # warm-up: numba compiles or loads its cache
    hftbacktest_convert(path, out=False)

    results = {}
    for name, fn in (
        ("quotelab, in memory", lambda: quotelab_in_memory(path)),
        ("hftbacktest, in memory", lambda: hftbacktest_convert(path, out=False)),
        ("quotelab, to catalog (npz + meta.json)", lambda: quotelab_to_catalog(path)),
        ("hftbacktest, to npz", lambda: hftbacktest_convert(path, out=True)),
    ):
        med, times, cpu, out = median_time(fn, args.repeat)
        results[name] = (med, out, cpu)
        print(f"{name:42s} median {med:6.3f} s  {lines / med:>10,.0f} lines/s  cpu {cpu:6.3f} s  "
              f"(runs: {', '.join(f'{t:.3f}' for t in times)})")
    for kind in ("in memory", "to catalog (npz + meta.json)"):
        q = results[f"quotelab, {kind}"]
        h = results["hftbacktest, " + ("in memory" if kind == "in memory" else "to npz")]
        print(f"speed-up {kind}: {h[0] / q[0]:.1f}x wall, {h[2] / q[2]:.1f}x cpu time")

    bts, msgs = raw_index(path)
    q_days: list[DayResult] = results["quotelab, in memory"][1]
    qa = qc = 0
    for day in q_days:
        rows = depth_rows(day.events)
        snap = (rows["ev"] & 0xFF) != DEPTH_EVENT
        a, c = agreement(rows, rows["ival"], snap, bts)
        qa, qc = qa + a, qc + c
    h_rows = depth_rows(results["hftbacktest, in memory"][1])
    ids, snap = hftbacktest_labels(h_rows, msgs)
    ha, hc = agreement(h_rows, ids, snap, bts)
    print(f"bookTicker agreement after each depth message (same replay for both):\n"
          f"  quotelab    {qa / qc:.4%} ({qa:,}/{qc:,})\n  hftbacktest {ha / hc:.4%} ({ha:,}/{hc:,})")


if __name__ == "__main__":
    main()
