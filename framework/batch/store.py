"""The resumable record store of a batch or an optimisation, under its ``--out`` folder::

    runs/<run_id>/record.json      the run's row (written last, atomically: its presence means finished)
    runs/<run_id>/series.parquet   equity/position/quote series (engine.save_result)
    runs/<run_id>/summary.json     the engine's summary with stats
    results.parquet                one row per recorded run, rebuilt from the records
    batch.json                     the expanded runs of the last batch invocation
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from quotelab.errors import RunError
from quotelab.outputs import json_finite, rescue_folder

T = TypeVar("T")

RECORD = "record.json"
# Columns that differ between identical runs (timing, placement), left out of determinism comparisons.
VOLATILE = ("wall_seconds", "compile_seconds", "run_seconds", "driver_compiled", "worker", "events_per_second")


def record_path(out: Path, run_id: str) -> Path:
    return out / "runs" / run_id / RECORD


def write_record(out: Path, rec: dict[str, Any]) -> None:
    """Store a run's record, atomically and as plain JSON (non-finite numbers as null)."""
    from quotelab.data import catalog as cat  # here, not at the top: `quotelab report` reads the store
    # without numba and hftbacktest, which the catalog module loads

    cat.atomic_write_json(record_path(out, rec["run_id"]), json_finite(rec))


def read_records(out: str | Path, unreadable: list[str] | None = None) -> list[dict[str, Any]]:
    """The run records in ``out``; each one that cannot be read is left out and, with ``unreadable``,
    named there with why (records are written atomically, so this is a damaged or hand-edited file)."""
    recs = []
    for p in sorted(Path(out).glob(f"runs/*/{RECORD}")):
        try:
            rec = json.loads(p.read_text())
            if not isinstance(rec, dict) or "run_id" not in rec:
                raise ValueError("not a run record (no run_id)")
            recs.append(rec)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            if unreadable is not None:
                unreadable.append(f"{p}: {exc}")
    return sorted(recs, key=lambda r: r.get("index", 0))


def _scalar(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int | float):
        return float(v)
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def flat_row(rec: dict[str, Any]) -> dict[str, Any]:
    """One results-table row: identity, params as p.<path>, final state, stats.*, diag.*, timing, error."""
    row: dict[str, Any] = {
        "run_id": rec["run_id"], "index": rec.get("index"), "label": rec.get("label"), "status": rec.get("status"),
        "venue": rec.get("venue"), "symbol": rec.get("symbol"), "dates": ",".join(rec.get("dates") or []),
        "params": json.dumps(rec.get("params", {}), sort_keys=True),
    }
    for k, v in (rec.get("params") or {}).items():
        row[f"p.{k}"] = _scalar(v)
    for k in ("equity", "pnl_unit", "pnl_usd", "pnl_bps_of_notional", "funding", "traded_notional_usd", "position",
              "balance", "fee", "num_trades", "trading_volume", "trading_value", "last_mid", "steps",
              "quoting_steps", "events", "run_seconds"):
        row[k] = _scalar((rec.get("summary") or {}).get(k))
    for k, v in (rec.get("stats") or {}).items():
        row[f"stats.{k}"] = _scalar(v)
    for k, v in (rec.get("diagnostics") or {}).items():
        if not isinstance(v, dict | list):
            row[f"diag.{k}"] = _scalar(v)
    for k in ("wall_seconds", "compile_seconds", "driver_compiled", "worker", "error"):
        row[k] = _scalar(rec.get(k))
    return row


def write_results(out: str | Path, to: Path | None = None, also: Path | None = None) -> Path:
    """Rebuild results.parquet from the run records in ``out`` (and ``also``'s, which win), atomically, in
    ``to`` (default ``out``)."""
    import polars as pl

    from quotelab.data import catalog as cat

    out = Path(out)
    recs = {r["run_id"]: r for r in read_records(out) + (read_records(also) if also else [])}
    rows = [flat_row(r) for r in sorted(recs.values(), key=lambda r: r.get("index", 0))]
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    data = {c: [r.get(c) for r in rows] for c in cols}
    df = pl.DataFrame({c: pl.Series(c, v, strict=False) for c, v in data.items()}) if rows else pl.DataFrame(
        {"run_id": pl.Series([], dtype=pl.String)})
    path = (to or out) / "results.parquet"
    cat.atomic_write_bytes(path, lambda fh: df.write_parquet(fh))
    return path


class Store:
    """Writes a batch's or an optimisation's files into ``out``. A file that cannot be written there (disk
    full, a file where a folder should be) goes to one :func:`~quotelab.outputs.rescue_folder` instead, and
    :meth:`close` raises naming it: a finished run is never lost to an output folder gone bad meanwhile."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rescue: Path | None = None
        self.failed: list[tuple[str, str]] = []  # each file that went to the rescue folder, and why

    def write(self, what: str, write: Callable[[Path], T]) -> T:
        """``write(out)``, or after an OSError ``write(rescue folder)``."""
        try:
            return write(self.out)
        except OSError as exc:
            why = exc.strerror or str(exc)
            self.failed.append((what, why))
        if self.rescue is None:
            self.rescue = rescue_folder()
        try:
            return write(self.rescue)
        except OSError as exc:
            raise RunError(f"could not write {what} to {self.out} ({why}) nor to {self.rescue} "
                           f"({exc.strerror or exc}); free some space or fix {self.out}, then resume") from exc

    def record(self, rec: dict[str, Any]) -> None:
        self.write(f"runs/{rec['run_id']}/{RECORD}", lambda d: write_record(d, rec))

    def table(self, final: bool = True) -> None:
        """results.parquet, of every record; before the end, a table that cannot be written is left for the
        end (it is a view of the records, rebuilt then)."""
        if not final:
            with contextlib.suppress(OSError):
                write_results(self.out, also=self.rescue)
            return
        self.write("results.parquet", lambda d: write_results(self.out, to=d, also=self.rescue))

    def close(self, resume: str) -> None:
        """Raise, if anything went to the rescue folder, an error naming it and how to put it back."""
        if self.rescue is not None:
            raise RunError(self.note(resume))

    def note(self, resume: str) -> str:
        (what, why), n = self.failed[0], len(self.failed)
        head = f"{what} to {self.out} ({why})" if n == 1 else f"{n} files to {self.out} (first {what}: {why})"
        return (f"could not write {head}; saved to {self.rescue} instead. Once {self.out} can be written, copy "
                f"them back (cp -r {self.rescue}/. {self.out}/) and {resume}")

