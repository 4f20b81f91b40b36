"""Benchmark: quotelab's Tardis converter against hftbacktest's, on Tardis CSVs of the synthetic market.

    python bench/tardis.py [--minutes 15] [--profile busy] [--repeat 7] [--gzip] [--write [--level6]]

The seeded synthetic perpetual (``quotelab.data.synth``, by default its ``busy`` profile: the shared
USD-M BTCUSDT capture's rates) is written as a Tardis ``incremental_book_L2`` file (the day's opening
book as ``is_snapshot=true`` rows, then every depth row) and a ``trades`` file, µs timestamps as Tardis
gives them (``quotelab synth --raw tardis``), plain or gzipped (``--gzip``). Both converters then run in
this process, after a warm-up, ``--repeat`` times each, interleaved; medians of wall time and of CPU time
(the process's, all threads: steadier than wall time on a shared machine) are printed, and the ratios are
hftbacktest's time over quotelab's, one line per like-for-like pair.

What each side does with the same two files:

- ``hftbacktest.data.utils.tardis.convert([trades, book])``: reads each file whole with polars (string
  columns, its thread pool; polars inflates a gzipped file itself), turns trades into TRADE rows and book
  rows into DEPTH rows, a snapshot run into CLEAR + SNAPSHOT rows (no book is kept); appends the book's
  rows after the trades' (no merge by time), shifts local times so that no latency is negative
  (``correct_local_timestamp``), sorts by both clocks and writes the EXCH/LOCAL-flagged rows
  (``correct_event_order``) and checks the order. One array for the whole input: no symbol filter, no
  tick/lot or line checks, no split into days, no day-start snapshot, no latency figures. With
  ``output_filename`` it also writes ``np.savez_compressed`` (zlib level 6, not settable).
- quotelab's ``tardis.convert``: reads blocks of lines (numba fast path, polars for anything unusual; ISA-L
  inflates gzip) with line-numbered errors on a reading thread, keeps one symbol and one exchange, merges the
  files by local time, checks every price and quantity on the tick/lot grid, keeps the L2 book (a snapshot
  at each day start, CLEAR rows reaching the old book's depth), splits UTC days, spills an open day's rows
  to a temporary file past 1,048,576 rows (memory bound), estimates the clock offset and the latency
  percentiles, and at the day's close orders and flags the rows as hftbacktest does. ``quotelab convert``
  (``convert_files``) also sniffs the files, writes each day into the catalog's staging folder as parts of
  1,048,576 rows (deflated at zlib level 1 by default, or stored: ``--compression none``), fsyncs them and
  commits them with meta.json.

The pairs:

- in memory: hftbacktest's array against quotelab's day as the parts it streams out (no concatenation:
  hftbacktest reads a day as a list of parts too).
- ``--write``, stored: hftbacktest's array saved by ``np.savez`` against ``convert_files(compression="none")``.
- ``--write``, zlib level 1: hftbacktest's array saved in ``np.savez_compressed``'s layout at level 1 (its
  own ``output_filename`` is fixed at level 6) against ``convert_files(compression="deflate")``.
- ``--level6`` (with ``--write``) adds hftbacktest's own ``output_filename`` against the catalog's level 1:
  not like for like (level 6 costs several times level 1), printed for reference only.

quotelab's rows are then checked against the synthetic market they came from: the book at the end
(last quantity per price level) and every trade (time, side, price, quantity) must be equal.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hftbacktest.data.utils import tardis as hbt_tardis
from hftbacktest.types import BUY_EVENT, DEPTH_CLEAR_EVENT, DEPTH_EVENT, DEPTH_SNAPSHOT_EVENT, EXCH_EVENT, TRADE_EVENT

from quotelab.data import catalog, rawfiles, synth, tardis
from quotelab.data.convert import convert_files
from quotelab.data.events import CollectDay, ConvertJob, DayResult
from quotelab.data.messages import open_binary

KIND = 0xFF


def write_tardis(cat: Path, out: Path, gz: bool) -> tuple[Path, Path, int]:
    """The synthetic perp's day as the two Tardis CSVs (``quotelab synth --raw tardis``: binance-futures ids,
    so the venue is binance-usdm), and their number of data lines."""
    written = rawfiles.write(cat, "synthetic", "SYNPERP", "tardis", out, gz=gz)
    book_path, trades_path = (Path(f) for f in written["files"])
    lines = 0
    for path in (book_path, trades_path):
        with open_binary(path) as fh:
            lines += sum(block.count(b"\n") for block in iter(lambda fh=fh: fh.read(1 << 24), b"")) - 1
    return book_path, trades_path, lines


def final_book(events: np.ndarray) -> dict[tuple[bool, float], float]:
    """Last quantity per (side, price) in exchange order from the last snapshot on, zeros dropped."""
    ev = events[(events["ev"] & EXCH_EVENT) != 0]
    kind = ev["ev"] & KIND
    clears = np.flatnonzero(kind == DEPTH_CLEAR_EVENT)
    start = int(clears[-2]) if clears.shape[0] >= 2 else 0  # a snapshot clears the bids, then the asks
    ev, kind = ev[start:], kind[start:]
    lv = ev[np.isin(kind, [DEPTH_EVENT, DEPTH_SNAPSHOT_EVENT])]
    book: dict[tuple[bool, float], float] = {}
    for e, px, qty in zip(lv["ev"].tolist(), np.round(lv["px"], 8).tolist(), lv["qty"].tolist(), strict=True):
        book[(bool(e & BUY_EVENT), px)] = qty
    return {k: v for k, v in book.items() if v != 0}


def trades_of(events: np.ndarray) -> np.ndarray:
    t = events[((events["ev"] & KIND) == TRADE_EVENT) & ((events["ev"] & EXCH_EVENT) != 0)]
    return np.stack([t["exch_ts"] // 1000, (t["ev"] & BUY_EVENT) != 0, t["px"], t["qty"]], axis=1)


def quotelab_convert(files: list[Path]) -> list[np.ndarray]:
    """The converted rows, kept in memory as the parts the day streams out in (no concatenation: hftbacktest
    reads a day as a list of parts too)."""
    sinks: list[CollectDay] = []

    def open_day(day: str) -> CollectDay:
        sinks.append(CollectDay())
        return sinks[-1]

    days: list[DayResult] = []
    job = ConvertJob("binance-usdm", "SYNPERP", {"tick_size": 0.1, "lot_size": 0.001}, days.append,
                     open_day=open_day)
    tardis.convert(files, job)
    return [p for sink in sinks for p in sink.parts]


def quiet(f: Callable[..., Any], *args: Any) -> Any:
    """``f(*args)`` with its progress prints (hftbacktest's "Reading ...") kept off the report."""
    with contextlib.redirect_stdout(io.StringIO()):
        return f(*args)


def cpu_time() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def race(contenders: dict[str, Callable[[], Any]], repeat: int, lines: int,
         pairs: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Run each contender once to warm up (numba compiles or loads its caches), then ``repeat`` times in
    turn; print medians and the ratios of ``pairs`` (time of the first over the second). The last outputs."""
    runs: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    out = {name: f() for name, f in contenders.items()}
    for _ in range(repeat):
        for name, f in contenders.items():
            t0, c0 = time.perf_counter(), cpu_time()
            out[name] = f()
            runs[name].append(time.perf_counter() - t0)
            cpu[name].append(cpu_time() - c0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    for name, m in med.items():
        print(f"{name:22s} median {m:6.2f} s  {lines / m / 1e6:5.2f} M rows/s  CPU {med_cpu[name]:5.2f} s  "
              f"(runs: {', '.join(f'{t:.2f}' for t in runs[name])}; CPU min {min(cpu[name]):.2f} s)")
    print(f"hftbacktest / quotelab, medians of {repeat} interleaved runs (above 1: quotelab is faster):")
    for a, b, what in pairs:
        print(f"  {med[a] / med[b]:.2f}x wall, {med_cpu[a] / med_cpu[b]:.2f}x CPU  {what} "
              f"(fastest runs {min(runs[a]) / min(runs[b]):.2f}x wall, {min(cpu[a]) / min(cpu[b]):.2f}x CPU)")
    return out


def save_npz(path: Path, data: np.ndarray, level: int) -> None:
    """``data`` as ``np.savez_compressed`` writes it (one zip member ``data.npy``), at zlib ``level``: its level
    is fixed at 6, the catalog's is 1."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=level, allowZip64=True) as zf, \
            zf.open("data.npy", "w", force_zip64=True) as fid:
        np.lib.format.write_array(fid, data, allow_pickle=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15.0, help="of the synthetic day (at most a day)")
    ap.add_argument("--profile", default="busy", help="synth profile: busy (the shared BTCUSDT capture's rates, "
                    "~1,500 events/s, 4%% trades) or demo (sparser)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--gzip", action="store_true", help="write and read gzipped CSVs, as Tardis serves them")
    ap.add_argument("--write", action="store_true", help="also race with the output written (see above)")
    ap.add_argument("--level6", action="store_true", help="with --write, also hftbacktest's own output_filename "
                    "(zlib level 6 against the catalog's level 1: not like for like, for reference)")
    ap.add_argument("--generate", type=Path, help=argparse.SUPPRESS)  # the child that writes the input
    args = ap.parse_args()
    if args.generate:
        synth.generate(args.generate / "cat", seed=7, start="2024-01-01T00:00:00", duration_s=args.minutes * 60,
                       assets=("perp",), compression="none", profile=args.profile)
        book, trades, n = write_tardis(args.generate / "cat", args.generate / "raw", args.gzip)
        (args.generate / "raw.json").write_text(json.dumps([str(book), str(trades), n]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # In a child: writing the raw files streams the catalog's days, which sets this process's allocator
        # for streaming replays (quotelab.spool.map_large_blocks), not the state `quotelab convert` runs in.
        subprocess.run([sys.executable, __file__, "--generate", str(root), "--minutes", str(args.minutes),
                        "--profile", args.profile, *(["--gzip"] if args.gzip else [])], check=True)
        source = catalog.load_day(root / "cat", "synthetic", "SYNPERP", "20240101")
        book_path, trades_path, lines = json.loads((root / "raw.json").read_text())
        book_path, trades_path = Path(book_path), Path(trades_path)
        size = (book_path.stat().st_size + trades_path.stat().st_size) / 1e6
        print(f"input: {lines:,} Tardis rows, {size:.0f} MB{' gzipped' if args.gzip else ''} "
              f"({args.minutes:g} min of the {args.profile} synthetic perpetual)")

        files = [book_path, trades_path]
        hbt_files = [str(trades_path), str(book_path)]  # hftbacktest wants the trades file first (its docstring)
        cat, npz = root / "written", root / "hbt.npz"

        def written(compression: str) -> Callable[[], Any]:
            def run() -> Any:
                shutil.rmtree(cat, ignore_errors=True)
                return convert_files("tardis", files, "SYNPERP", cat, tick_size=0.1, lot_size=0.001,
                                     compression=compression)
            return run

        def hbt_saved(level: int) -> Callable[[], None]:
            def run() -> None:
                data = quiet(hbt_tardis.convert, hbt_files)
                if level:
                    save_npz(npz, data, level)
                else:
                    np.savez(npz, data=data)
            return run

        contenders: dict[str, Callable[[], Any]] = {
            "quotelab": lambda: quotelab_convert(files), "hftbacktest": lambda: quiet(hbt_tardis.convert, hbt_files)}
        pairs = [("hftbacktest", "quotelab", "in memory: hftbacktest's array, quotelab's day as its parts")]
        if args.write:
            contenders |= {"quotelab none": written("none"), "hftbacktest stored": hbt_saved(0),
                           "quotelab deflate": written("deflate"), "hftbacktest deflate 1": hbt_saved(1)}
            pairs += [("hftbacktest stored", "quotelab none", "written, stored: np.savez against --compression none"),
                      ("hftbacktest deflate 1", "quotelab deflate",
                       "written, zlib level 1: savez_compressed's layout at level 1 against --compression deflate")]
            if args.level6:
                contenders["hftbacktest level 6"] = lambda: quiet(hbt_tardis.convert, hbt_files, str(npz))
                pairs.append(("hftbacktest level 6", "quotelab deflate",
                              "NOT like for like: hftbacktest's output_filename (zlib level 6) against level 1"))
        out = race(contenders, args.repeat, lines, pairs)

        ours = np.concatenate(out["quotelab"])
        book_ok = final_book(ours) == final_book(source)
        trades_ok = np.array_equal(trades_of(ours), trades_of(source))
        print(f"quotelab vs the synthetic source: final book {'equal' if book_ok else 'DIFFERENT'}, "
              f"{trades_of(source).shape[0]:,} trades {'equal' if trades_ok else 'DIFFERENT'}")
        if not (book_ok and trades_ok):
            sys.exit(1)


if __name__ == "__main__":
    main()
