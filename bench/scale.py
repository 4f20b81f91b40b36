"""Benchmark: quotelab at scale. Memory as peak private memory (RssAnon) of a child process.

    python bench/scale.py [--hours 4] [--repeat 3] [--tardis-hours 0.5] [--full] [--profile busy]
    python bench/scale.py --profile busy --hours 1 --repeat 1 --skip-tardis        # busy, quick
    python bench/scale.py --profile busy --hours 1 --catalog DIR    # items 1-2 on 4 days synthesized once
    python bench/scale.py --profile busy --only-full --full-catalog DIR --full-raw RAW  # a day made by hand

1. ``run`` (without and with ``--out``) and ``evaluate`` on 4 days against 1 day of the synthetic
   market (``--hours`` of it a day, deflated, days cut into parts): the ratio of peak RssAnon
   (target <= 1.05). A day of 4 h
   is ~6 M events, 6 parts: hftbacktest holds the current part and the next, and briefly a third
   at a switch, which a day of fewer than 3 parts never shows, so shorter days flatter 1 day.
2. Throughput of ``run`` streamed from the part files against the same run on days preloaded
   into memory (``preload=True``, the path before streaming), same data, same process, medians
   (target >= 0.95): events over the wall time of ``run_strategy``, loading included for both.
3. Tardis ``convert`` against hftbacktest's ``tardis.convert`` (bench/tardis.py, its ratio line).
4. With ``--full``: one whole synthetic day (~38 M events, ~450 events/s) through ``run`` and
   ``evaluate``, peak RssAnon each (target <= 1.5 GB; a real busy day has ~127 M events), and with
   ``--full-convert`` through ``convert --format tardis`` too (with ``--profile busy``: ``convert``
   of the day's raw Binance USD-M files). Slow: run it once, on a quiet machine.
5. ``convert`` of one day 4x as long against 1x, peak RssAnon (target <= 1.05; ``--only-convert``):
   the busy perp written as raw Binance USD-M and Tardis files, ``--convert-minutes`` of it (>= 2
   parts, so every buffer is at its size) against 4x as many minutes, converted as ``quotelab convert``
   does. A day's length, where item 1 measures the number of days.

With ``--profile busy`` the days are the busy perpetual (``synth --profile busy``: the shared USD-M
BTCUSDT capture's density, ~1,470 events/s, so 1 h a day is ~5.3 M events, 6 parts) and item 1
also measures ``convert`` of the days' raw Binance USD-M files and of their Tardis CSVs
(``quotelab.data.rawfiles``), 1 day against 4 in one call (``--only-memory``: just item 1).
``--full-catalog``/``--full-raw`` measure a busy day generated once by hand
(``quotelab synth --profile busy --assets perp --duration 1d --raw binance-usdm --raw-dir RAW``).

Each measurement is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _mem import peak_rss_anon  # noqa: E402

QL = [sys.executable, "-m", "quotelab.cli"]
CONVERT = ["--format", "binance-usdm", "--symbol", "SYNPERP", "--tick-size", "0.1", "--lot-size", "0.001"]
DAYS = ["20240101", "20240102", "20240103", "20240104"]
STRATEGY = {
    "name": "scale",
    "data": {"quote": "perp", "assets": {"perp": {"venue": "synthetic", "symbol": "SYNPERP", "dates": []}}},
    "engine": {"step": "100ms", "defaults": {"latency": {"entry": "10ms", "response": "10ms"},
                                              "fees": {"maker": -0.00005, "taker": 0.0007}}},
    "fair_value": [{"kind": "mid", "params": {"asset": "perp"}}],
    "forecast": [{"kind": "book_imbalance", "alpha": "2ticks",
                  "params": {"asset": "perp", "weights": [0.7, 0.2, 0.1]}}],
    "risk": [{"kind": "inventory_skew", "params": {"risk_aversion": 0.5, "position_unit": 0.01,
                                                   "volatility": "10ticks"}}],
    "quoter": {"kind": "fixed_spread", "params": {"half_spread": "3ticks", "size": 0.01, "max_position": 0.1}},
}
EVALUATION = {
    "name": "scale_eval",
    "data": {"quote": "perp", "assets": {"perp": {"venue": "synthetic", "symbol": "SYNPERP", "dates": []}}},
    "step": "100ms", "horizons": ["1s", "10s"],
    "estimators": [{"name": "mid", "fair_value": [{"kind": "mid"}]},
                   {"name": "weighted_mid", "fair_value": [{"kind": "weighted_mid"}]}],
}


def _write(doc: dict, path: Path, catalog: Path, days: list[str]) -> Path:
    doc = json.loads(json.dumps(doc))
    doc["data"]["catalog"] = str(catalog)
    doc["data"]["assets"]["perp"]["dates"] = [int(d) for d in days]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _median_peak(cmd: list[str], repeat: int) -> float:
    return statistics.median(peak_rss_anon(cmd)[0] for _ in range(repeat))


def memory(root: Path, cat: Path, hours: float, repeat: int, profile: str) -> None:
    if cat == root / "cat":
        for day in DAYS:
            start = f"{day[:4]}-{day[4:6]}-{day[6:]}T00:00:00"
            subprocess.run([*QL, "synth", "--catalog", str(cat), "--assets", "perp", "--start", start,
                            "--duration", f"{hours}h", "--profile", profile, "--json"], check=True,
                           capture_output=True)
    print(f"synthetic perp ({profile} profile), {hours:g} h a day, deflated, parts of 1 M rows ({cat}); "
          f"medians of {repeat}")
    verbs: list[tuple[str, dict | None]] = [("run", STRATEGY), ("run --out", STRATEGY), ("evaluate", EVALUATION)]
    if profile == "busy":
        from quotelab.data import rawfiles

        # One writer for the four days: days 2-4 (separate synth calls) get a REST snapshot after
        # their first message, so the converter resyncs on each, as after a collector's reconnect.
        raw = rawfiles.write(cat, "synthetic", "SYNPERP", "binance-usdm", root / "raw", gz=True)["files"]
        tardis_raw = rawfiles.write(cat, "synthetic", "SYNPERP", "tardis", root / "rawt", gz=True)["files"]
        verbs += [("convert", None), ("convert tardis", None)]
    for verb, doc in verbs:
        peaks = {}
        for n in (1, 4):
            if verb == "convert":  # the days' raw Binance USD-M files, n in one call
                cmd = [*QL, "convert", *CONVERT, "--catalog", str(root / f"conv{n}"), *raw[:n], "--json"]
            elif verb == "convert tardis":  # a book and a trades CSV a day
                cmd = [*QL, "convert", "--format", "tardis", *CONVERT[2:], "--catalog", str(root / f"convt{n}"),
                       *tardis_raw[:2 * n], "--json"]
            else:
                name = verb.split()[0]
                cmd = [*QL, name, str(_write(doc, root / f"{name}{n}.yaml", cat, DAYS[:n])), "--json"]
                if verb == "run --out":  # the series and stats written too
                    cmd += ["--out", str(root / f"out{n}")]
            peaks[n] = _median_peak(cmd, repeat)
        ratio = peaks[4] / peaks[1]
        print(f"{verb:14s} peak RssAnon: 1 day {peaks[1]:6.0f} MB, 4 days {peaks[4]:6.0f} MB, "
              f"4 days / 1 day {ratio:.3f}x (target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")


THROUGHPUT = """
import json, statistics, sys, time
from quotelab.backtest.engine import run_strategy
path, repeat = sys.argv[1], int(sys.argv[2])
run_strategy(path)  # compile (or load) the driver, warm the page cache
rates = {True: [], False: []}
for _ in range(repeat):
    for preload in (True, False):
        t0 = time.perf_counter()
        s = run_strategy(path, preload=preload).summary
        rates[preload].append(s["events"] / (time.perf_counter() - t0))
print(json.dumps({k: statistics.median(v) for k, v in (("preloaded", rates[True]), ("streamed", rates[False]))}))
"""


def throughput(root: Path, cat: Path, repeat: int) -> None:
    path = _write(STRATEGY, root / "tp.yaml", cat, DAYS[:1])
    out = subprocess.run([sys.executable, "-c", THROUGHPUT, str(path), str(repeat)], check=True, capture_output=True,
                         text=True).stdout
    r = json.loads(out)
    print(f"run throughput: streamed {r['streamed'] / 1e6:.2f} M ev/s, preloaded {r['preloaded'] / 1e6:.2f} M ev/s, "
          f"streamed / preloaded {r['streamed'] / r['preloaded']:.3f} (target >= 0.95)")


def tardis(hours: float, repeat: int) -> None:
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "tardis.py"), "--minutes", str(hours * 60),
                          "--repeat", str(repeat)], check=True, capture_output=True, text=True).stdout
    lines = out.splitlines()
    at = next((i for i, x in enumerate(lines) if x.startswith("hftbacktest / quotelab")), None)
    ratio = lines[at + 1].strip() if at is not None and at + 1 < len(lines) else out
    print(f"tardis convert, {hours:g} h synthetic, hftbacktest / quotelab: {ratio} (target >= 1x)")


def convert_memory(root: Path, minutes: float, repeat: int) -> None:
    """Peak RssAnon of ``quotelab convert`` on 4x the input against 1x (see the module docstring)."""
    runs: dict[str, dict[int, list[Path]]] = {"binance-usdm": {}, "tardis": {}}
    for k in (1, 4):
        cmd = [*QL, "synth", "--catalog", str(root / f"busy{k}"), "--assets", "perp", "--profile", "busy", "--duration",
               f"{minutes * k:g}m", "--raw", "binance-usdm,tardis", "--raw-dir", str(root / f"raw{k}"), "--json"]
        got = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        for raw in json.loads(got)["raw"]:
            runs[raw["format"]][k] = [Path(f) for f in raw["files"]]
        shutil.rmtree(root / f"busy{k}")
    print(f"convert peak RssAnon, busy synthetic perp ({minutes:g} min against {4 * minutes:g} min), "
          f"medians of {repeat}")
    spec = ["--symbol", "SYNPERP", "--tick-size", "0.1", "--lot-size", "0.001"]
    for fmt, files in runs.items():
        _convert_ratio(fmt, files, ["--format", fmt, *spec], root, repeat)


def _convert_ratio(what: str, runs: dict[int, list[Path]], args: list[str], root: Path, repeat: int) -> None:
    peaks, events = {}, {}
    for k, files in runs.items():
        samples = []
        for i in range(repeat):
            out = root / f"conv_{k}_{i}"
            mb, _, text = peak_rss_anon([*QL, "convert", *args, "--catalog", str(out), "--json", *map(str, files)])
            samples.append(mb)
            shutil.rmtree(out)
        peaks[k] = statistics.median(samples)
        events[k] = sum(d["events"] for d in json.loads(text)["days"].values())
    lo, hi = sorted(runs)
    print(f"{what:32s} {lo}x {events[lo]:>11,} events {peaks[lo]:6.0f} MB, {hi}x {events[hi]:>11,} events "
          f"{peaks[hi]:6.0f} MB, {hi}x / {lo}x {peaks[hi] / peaks[lo]:.3f} (target <= 1.05)")


def full(root: Path, convert: bool, profile: str, catalog_dir: Path | None, raw_dir: Path | None) -> None:
    """One whole day through run and evaluate (and convert): peak RssAnon each, target <= 1.5 GB."""
    from quotelab.data import catalog

    cat = catalog_dir or root / "full"
    if catalog_dir is None:
        cmd = [*QL, "synth", "--catalog", str(cat), "--assets", "perp", "--duration", "1d", "--profile", profile,
               "--json"]
        if convert and profile == "busy":
            raw_dir = root / "raw"
            cmd += ["--raw", "binance-usdm", "--raw-dir", str(raw_dir)]
        subprocess.run(cmd, check=True, capture_output=True)
    day = catalog.list_days(cat, "synthetic", "SYNPERP")[0]
    events = sum(catalog.stream_days(cat, "synthetic", "SYNPERP", [day])[1].rows())
    print(f"one full synthetic day ({profile} profile, {cat}): {events:,} events")
    for verb, doc in (("run", STRATEGY), ("evaluate", EVALUATION)):
        path = _write(doc, root / f"full_{verb}.yaml", cat, [day])
        mb, s, out = peak_rss_anon([*QL, verb, str(path), "--json"])
        # run says how many events it replayed, so a run cut short can't pass for a whole day
        seen = f", {json.loads(out)['events']:,} events replayed" if verb == "run" else ""
        print(f"{verb:9s} peak RssAnon {mb:6.0f} MB in {s:.0f} s{seen} (target <= 1536 MB)")
    if not convert:
        return
    if raw_dir is not None:
        files = sorted(str(p) for p in Path(raw_dir).glob(f"synperp_{day}*"))
        mb, s, out = peak_rss_anon([*QL, "convert", *CONVERT, "--catalog", str(root / "conv"), *files, "--json"])
        size = sum(Path(f).stat().st_size for f in files) / 1e9
        back = sum(d["events"] for d in json.loads(out)["days"].values())
        print(f"convert   peak RssAnon {mb:6.0f} MB in {s:.0f} s, raw Binance USD-M {size:.1f} GB gzipped, "
              f"{back:,} events out (target <= 1536 MB)")
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from tardis import write_tardis

    book, trades, rows = write_tardis(cat, root, gz=False)
    mb, s, _ = peak_rss_anon([*QL, "convert", "--format", "tardis", *CONVERT[2:], "--catalog",
                              str(root / "conv"), str(book), str(trades), "--json"])
    print(f"convert   peak RssAnon {mb:6.0f} MB in {s:.0f} s, {rows:,} Tardis rows (target <= 1536 MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=4.0, help="synthetic hours a day for the memory ratios (>= 3 parts)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--catalog", type=Path, help="items 1-2 on this catalog's synthetic/SYNPERP 20240101-04 (made "
                                                "once with synth as item 1 does, of --hours and --profile) "
                                                "instead of generating the days")
    ap.add_argument("--tardis-hours", type=float, default=0.5)
    ap.add_argument("--full", action="store_true", help="also the one full-day measurement (slow)")
    ap.add_argument("--skip-tardis", action="store_true")
    ap.add_argument("--full-convert", action="store_true",
                    help="with --full, also convert the day (its Tardis CSVs; busy: its raw Binance files)")
    ap.add_argument("--only-full", action="store_true", help="just the full-day measurement")
    ap.add_argument("--profile", choices=["demo", "busy"], default="demo",
                    help="synthetic density: busy is the shared USD-M BTCUSDT capture's (~1,470 events/s); its "
                         "memory ratios include convert of the days' raw Binance files")
    ap.add_argument("--full-catalog", type=Path, help="with --only-full: a catalog holding the day already "
                                                      "(synthetic/SYNPERP, first day), instead of generating it")
    ap.add_argument("--full-raw", type=Path, help="with --full-catalog: the folder of its raw Binance files "
                                                  "(synth --raw binance-usdm), to measure convert on them")
    ap.add_argument("--convert-minutes", type=float, default=20.0, help="busy minutes of the 1x day of item 5")
    ap.add_argument("--skip-convert", action="store_true", help="skip item 5")
    ap.add_argument("--only-convert", action="store_true", help="just item 5")
    ap.add_argument("--only-memory", action="store_true", help="just item 1 (4 days against 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="quotelab-scale-") as tmp:
        root = Path(tmp)
        if args.only_convert:
            convert_memory(root, args.convert_minutes, args.repeat)
            return
        days = args.catalog.resolve() if args.catalog else root / "cat"
        if args.only_memory:
            memory(root, days, args.hours, args.repeat, args.profile)
            return
        if not args.only_full:
            memory(root, days, args.hours, args.repeat, args.profile)
            throughput(root, days, args.repeat)
            if not args.skip_tardis:
                tardis(args.tardis_hours, args.repeat)
            if not args.skip_convert:
                convert_memory(root, args.convert_minutes, args.repeat)
        if args.full or args.only_full:
            # the verbs run in a temporary folder, so relative paths are resolved here
            full(root, args.full_convert or args.full_raw is not None, args.profile,
                 args.full_catalog and args.full_catalog.resolve(), args.full_raw and args.full_raw.resolve())


if __name__ == "__main__":
    main()
