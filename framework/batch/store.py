"""The resumable record store of a batch or an optimisation, under its ``--out`` folder::

    runs/<run_id>/record.json      the run's row (written last, atomically: its presence means finished)
    runs/<run_id>/series.parquet   equity/position/quote series (engine.save_result)
    runs/<run_id>/summary.json     the engine's summary with stats
    results.parquet                one row per recorded run, rebuilt from the records
    batch.json                     the expanded runs of the last batch invocation
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quotelab.outputs import json_finite

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


def write_results(out: str | Path) -> Path:
    """Rebuild results.parquet from the run records, atomically."""
    import polars as pl

    from quotelab.data import catalog as cat

    out = Path(out)
    rows = [flat_row(r) for r in read_records(out)]
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    data = {c: [r.get(c) for r in rows] for c in cols}
    df = pl.DataFrame({c: pl.Series(c, v, strict=False) for c, v in data.items()}) if rows else pl.DataFrame(
        {"run_id": pl.Series([], dtype=pl.String)})
    path = out / "results.parquet"
    cat.atomic_write_bytes(path, lambda fh: df.write_parquet(fh))
    return path

