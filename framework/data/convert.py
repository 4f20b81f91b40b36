"""``quotelab convert``: pick the converter for a format, stage its days, commit them, summarise.

Adding a format is one line in :data:`FORMATS`: a name, the catalog venue it writes, and the
converter as ``"module:function"`` (imported only when used). A format whose data names its venue,
like Tardis's exchange column, also gives a ``venue_of(files)`` function: the instrument spec is
resolved for that venue, and the converter returns the ``venue`` it found, which wins. A converter is called as
``fn(files, job)`` with a :class:`~quotelab.data.events.ConvertJob`; it hands every finished day to
``job.on_day`` and returns conversion-wide facts (files, message counts, findings).

Streaming: a converter spills each open day to an unlinked file in the staging folder and, once the
stream is past the day, streams it out in hftbacktest's order to a :class:`~quotelab.data.catalog.DayWriter`
(``job.open_day``), which writes the day's parts as they fill; memory does not grow with a day's length
(:class:`~quotelab.data.events.DaySplitter`).

All or nothing: days are written into a :class:`~quotelab.data.catalog.Staging` folder inside the
catalog; only when the whole conversion succeeded are they committed, together with their meta.json
entries (see the catalog's docstring). A failure on any day removes the staging folder, so the
catalog and its meta.json stay exactly as they were: a DataError can be about a day already finished
(an event of it arriving late), so bad input keeps nothing.

A stop is not a failure: Ctrl-C or SIGTERM (a KeyboardInterrupt, :mod:`quotelab.stopping`) commits the
days already handed to ``on_day`` (each final: the converter never touches a day again once it is handed
over), with the funding rows read so far for them (``job.funding_so_far``), and discards the days still
open (``job.open_days``); it then raises :class:`~quotelab.errors.Stopped` naming both.

No silent shrink: a day that would replace a catalog day with less of it (its exchange-time span does
not contain the catalog day's, e.g. a file holding the day's last minutes) is refused at commit, before
anything moves, unless ``replace``; a stopped convert leaves such a day out and says so. The span is
only known once a day is finished, so the check is at commit, not as the day is handed over.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quotelab.data import catalog
from quotelab.data.events import ConvertJob, DayResult
from quotelab.data.instruments import resolve
from quotelab.data.sniff import sniff
from quotelab.errors import DataError, Stopped
from quotelab.progress import Days
from quotelab.stopping import Interrupted, stop_signals, stopped
from quotelab.timeunits import DAY_NS
from quotelab.units import MAX_MAGNITUDE


@dataclass(frozen=True)
class Format:
    venue: str
    converter: str  # "module:function"
    # "module:function" giving the venue the files' own data names (Tardis's exchange column), so the
    # instrument spec (tick, lot, linear or inverse) is the one of the market the data is from
    venue_of: str | None = None


FORMATS: dict[str, Format] = {
    "binance-spot": Format("binance-spot", "quotelab.data.binance:convert_spot"),
    "binance-usdm": Format("binance-usdm", "quotelab.data.binance:convert_usdm"),
    "binance-cm": Format("binance-cm", "quotelab.data.binance:convert_cm"),
    "bybit": Format("bybit", "quotelab.data.bybit:convert"),
    "okx": Format("okx", "quotelab.data.okx:convert"),
    "tardis": Format("tardis", "quotelab.data.tardis:convert", "quotelab.data.tardis:venue_of"),
}


def _load(ref: str) -> Any:
    module, func = ref.split(":")
    return getattr(importlib.import_module(module), func)


def convert_files(
    fmt_name: str,
    files: Sequence[Path | str],
    symbol: str,
    catalog_dir: Path | str,
    tick_size: float | None = None,
    lot_size: float | None = None,
    compression: str = "deflate",
    contract: str | None = None,
    contract_size: float | None = None,
    progress: bool = False,
    replace: bool = False,
) -> dict[str, Any]:
    """Convert ``files`` (one symbol, in time order) into the catalog; returns the summary
    (``progress``: days and events written so far on stderr, :mod:`quotelab.progress`).
    ``compression``: ``deflate`` or ``none`` (see :func:`quotelab.data.catalog.write_event_npz`).
    ``replace``: replace a catalog day even with one covering less of it (its exchange-time span does
    not contain the catalog day's); without it such a convert is refused and writes nothing."""
    fmt = FORMATS.get(fmt_name)
    if fmt is None:
        raise DataError(f"unknown format {fmt_name!r}; known formats: {', '.join(sorted(FORMATS))}")
    if not files:
        raise DataError("no input files given")
    if compression not in catalog.COMPRESSIONS:
        raise DataError(f"unknown compression {compression!r}; use one of {', '.join(catalog.COMPRESSIONS)}")
    for option, value in (("--tick-size", tick_size), ("--lot-size", lot_size), ("--contract-size", contract_size)):
        # the same domain the strategy YAML's tick_size/lot_size/contract_size fields have
        if value is not None and not (math.isfinite(value) and 0.0 < value <= MAX_MAGNITUDE):
            raise DataError(f"{option} must be a finite number above 0 and at most {MAX_MAGNITUDE:g}, "
                            f"got {value!r}")
    for f in files:
        if not Path(f).is_file():
            raise DataError(f"{f}: no such file")
        seen = sniff(Path(f))
        if seen is not None and seen.format != fmt_name:
            fix = f"--format {seen.format}" + (f" --symbol {seen.symbol}" if seen.symbol else "")
            raise DataError(f"{f}:{seen.line}: this file is {seen.what}, not --format {fmt_name}. Fix: convert it "
                            f"with {fix}.")
    venue = _load(fmt.venue_of)(list(map(Path, files))) if fmt.venue_of else fmt.venue
    instrument = resolve(venue, symbol, tick_size, lot_size, contract, contract_size)
    root = Path(catalog_dir)
    days: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    with catalog.Staging(root) as stage:
        def open_day(day: str) -> catalog.DayWriter:
            if day in days:
                raise DataError(f"{fmt.venue}/{symbol}: day {day} produced twice (input files not in time order?)")
            return stage.open_day(fmt.venue, symbol, day, compression)

        def on_day(res: DayResult) -> None:
            days[res.day] = res.info
            bar.add(res.info["events"])

        # Open days spill into the staging folder: the catalog's disk, removed with it.
        job = ConvertJob(venue, symbol, instrument, on_day, open_day=open_day, spill_dir=stage.dir)
        interrupt: KeyboardInterrupt | None = None
        try:
            with Days(f"convert {symbol}", progress) as bar:
                info = _load(fmt.converter)(list(map(Path, files)), job)
            # A multi-venue format (Tardis) learns the venue from the data and returns it.
            venue = info.pop("venue", venue)
            funding = info.pop("funding", None)
        except KeyboardInterrupt as exc:
            # Ctrl-C or SIGTERM (quotelab.stopping): the days already handed over are finished, whole and
            # final, so they are kept; the day being written or collected is discarded with the staging folder.
            interrupt, info = exc, {}
            funding = job.funding_so_far() if job.funding_so_far is not None else None
            if not days:
                raise _stopped(exc, root, [], job.open_days) from None
        with stop_signals() as late:  # the commit is not cut short: a stop during it is reported after
            _stage_funding(funding, stage.dir, fmt.venue, symbol, days, info)
            for day, entry in days.items():
                entry["file"] = str(catalog.day_path(root, venue, symbol, day))
            # A day covering less of a catalog day is refused before anything moves; a stopped convert
            # leaves such a day out and keeps the others (they are whole, and what was asked for).
            meta = stage.commit(venue, symbol, instrument, days, staged_venue=fmt.venue,
                                shrinking="replace" if replace else "drop" if interrupt else "refuse",
                                fix=SHRINK_FIX)
            dropped = stage.dropped
            stage.close()
    if interrupt is not None:
        kept = sorted(days.keys() - {s.day for s in dropped})
        raise _stopped(interrupt, root, kept, job.open_days - days.keys(), dropped) from None
    if late:
        raise stopped(Interrupted(late[0]), f"convert: every day was converted and kept ({', '.join(sorted(days))} "
                                            f"in {root}); the stop came while they were being committed")
    days = {d: meta["days"][d] for d in days}
    elapsed = time.perf_counter() - t0
    lines = int(info.get("messages", {}).get("lines", 0))
    return {
        "format": fmt_name, "venue": venue, "symbol": symbol, "catalog": str(root),
        "instrument": instrument, "seconds": round(elapsed, 3),
        "lines_per_s": round(lines / elapsed) if elapsed > 0 else None,
        **info,
        "days": {d: days[d] for d in sorted(days)},
    }


SHRINK_FIX = "Fix: pass --replace to replace it anyway, or convert files that cover the whole day."


def _stopped(exc: KeyboardInterrupt, root: Path, kept: list[str], discarded: set[str],
             dropped: Sequence[catalog.Shrink] = ()) -> Stopped:
    """What a stopped convert says: the days kept, the days left out because they would replace a catalog
    day with less of it, the days discarded, and how to finish."""
    lost = sorted(discarded)
    left = "".join(f"; did not keep finished day {s.day}: {s.describe()} (pass --replace to replace it anyway)"
                   for s in dropped)
    if not kept:
        if dropped:
            return stopped(exc, f"convert: nothing was written to {root}{left}"
                                + (f"; discarded {', '.join(lost)}, not finished" if lost else ""))
        return stopped(exc, f"convert: no day was finished, so nothing was written to {root}"
                            + (f" ({', '.join(lost)} discarded)" if lost else "") + "; convert the files again")
    where = f"kept the finished day{'s' if len(kept) > 1 else ''} {', '.join(kept)} in {root}"
    if not lost:
        return stopped(exc, f"convert: {where}{left}; no day was being converted (if files were left unread, "
                            f"convert them)")
    return stopped(exc, (
        f"convert: {where} (whole, as an uninterrupted convert writes them){left}; discarded {', '.join(lost)}, "
        f"not finished. To finish, convert the files holding {lost[0]} and later days; if they also hold a kept "
        f"day's last minutes, that convert is refused (it would replace the day with less of it): convert all "
        f"the files again instead"))


def _stage_funding(table: Any, staging: Path, venue: str, symbol: str, days: dict[str, dict[str, Any]],
                   info: dict[str, Any]) -> dict[str, Path]:
    """Write a converter's funding rows (mark, index, rate; :mod:`quotelab.data.funding`) per UTC day of
    exchange time beside the days it wrote; rows of days without events are counted, not kept."""
    import numpy as np

    if table is None or not len(table):
        return {}
    day_of = (table["exch_ts"] // DAY_NS).astype(np.int64)
    out: dict[str, Path] = {}
    dropped = 0
    for d in np.unique(day_of):
        day = time.strftime("%Y%m%d", time.gmtime(int(d) * 86_400))
        part = table[day_of == d]
        if day not in days:
            dropped += len(part)
            continue
        out[day] = catalog.write_funding(staging, venue, symbol, day, part)
        days[day]["funding_rows"] = len(part)
    if dropped:
        info.setdefault("findings", []).append({
            "kind": "funding_rows_outside_days", "count": dropped,
            "message": "funding rows on days with no depth or trades were not kept"})
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _ts(ns: int | None) -> str:
    return "-" if ns is None else catalog.utc_text(ns)


def render_summary(summary: dict[str, Any]) -> None:
    """Print the human summary (rich tables)."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    m = summary.get("messages", {})
    con.print(f"[bold]{summary['venue']}/{summary['symbol']}[/] → {summary['catalog']}  "
              f"({m.get('lines', 0):,} lines in {summary['seconds']} s, {summary['lines_per_s'] or 0:,} lines/s)")
    con.print(f"instrument: tick {summary['instrument']['tick_size']}, lot {summary['instrument']['lot_size']}, "
              f"{summary['instrument']['contract']['kind']} × {summary['instrument']['contract']['size']} "
              f"({summary['instrument']['origin']})")
    con.print("messages: " + ", ".join(f"{k} {v:,}" for k, v in m.items() if k != "lines"))
    # Metrics as rows and days as columns: stays readable in an 80-column terminal.
    t = Table(title="catalog days")
    t.add_column("")
    days = summary["days"]
    for day in days:
        t.add_column(day)
    rows: dict[str, list[str]] = {k: [] for k in (
        "file", "events", "depth / snapshot / clear", "trades buy / sell", "first (UTC, exch)", "last (UTC, exch)",
        "book = bookTicker", "clock offset applied", "latency p50/p90/p99", "findings")}
    for d in days.values():
        c, q = d["counts"], d["quality"]
        a = q.get("agreement") or {}
        lat = q["latency"]
        rows["file"].append(d.get("file", ""))
        rows["events"].append(f"{d['events']:,}")
        rows["depth / snapshot / clear"].append(f"{c['depth']:,} / {c['depth_snapshot']:,} / {c['depth_clear']}")
        rows["trades buy / sell"].append(f"{c['trade_buy']:,} / {c['trade_sell']:,}")
        rows["first (UTC, exch)"].append(_ts(d["first_ts"]))
        rows["last (UTC, exch)"].append(_ts(d["last_ts"]))
        rows["book = bookTicker"].append(
            "-" if a.get("rate") is None else f"{a['rate']:.4%} of {a['compared']:,} depth msgs")
        rows["clock offset applied"].append(f"+{q['clock_offset_ns'] / 1e6:.3f} ms")
        rows["latency p50/p90/p99"].append(f"{_ms(lat['p50_ms'])} / {_ms(lat['p90_ms'])} / {_ms(lat['p99_ms'])} ms")
        rows["findings"].append(", ".join(f["kind"] for f in q["findings"]) or "none")
    for name, vals in rows.items():
        t.add_row(name, *vals)
    con.print(t)
    findings = list(summary.get("findings", []))
    for day, d in summary["days"].items():
        findings += [{**f, "day": day} for f in d["quality"]["findings"]]
    if findings:
        ft = Table(title="findings")
        for col in ("kind", "count", "where", "message"):
            ft.add_column(col)
        for f in findings:
            where = f"{f.get('file', '')}:{f['line']}" if f.get("line") else f.get("day", "")
            last = (f.get("last_file"), f.get("last_line"))
            if last[1] is not None and last != (f.get("file"), f.get("line")):
                same = last[0] == f.get("file")
                where += f" – {'' if same else f.get('last_file', '') + ':'}{f['last_line']}"
            ft.add_row(f["kind"], str(f["count"]), where, f["message"])
        con.print(ft)
