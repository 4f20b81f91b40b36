"""The static HTML reports: of a batch's or an optimisation's results folder (:func:`build_report`: summary,
charts, failures, the runs table), and of one ``quotelab run --out`` folder (:func:`build_run_report`)."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quotelab.backtest import pnl
from quotelab.batch.diagnostics import HORIZONS, equity_series
from quotelab.batch.store import flat_row, read_records
from quotelab.errors import QuotelabError


class ReportError(QuotelabError):
    """A results folder cannot be reported on."""


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------

TABLE_COLS = ["index", "status", "venue", "symbol", "dates", "pnl_usd", "pnl_bps_of_notional", "equity", "pnl_unit",
              "num_trades", "position", "fee", "funding", "stats.SR", "stats.MaxDrawdown", "diag.pnl_spread",
              "diag.pnl_inventory", "diag.pnl_fees", "diag.pnl_funding",
              "diag.markout_bps_100ms", "diag.markout_bps_1s", "diag.markout_bps_10s", "diag.markout_bps_60s",
              "diag.quote_uptime", "diag.inventory_mean_abs", "wall_seconds", "run_id", "error"]

_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click', () => {
  const table = th.closest('table'), body = table.tBodies[0];
  const asc = th.dataset.dir !== 'asc'; table.querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? 'asc' : 'desc';
  const key = r => { const t = r.cells[col].dataset.v ?? r.cells[col].textContent; const x = parseFloat(t);
                     return isNaN(x) ? t : x; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
      const c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
      return asc ? c : -c; }).forEach(r => body.appendChild(r));
}));
"""

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222} table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right} th{background:#eee;cursor:pointer;position:sticky;top:0}
td.s{text-align:left} tr.failed{background:#fee} img{max-width:100%;border:1px solid #ddd;margin:6px 0}
.note{color:#666;font-size:13px} td.err{white-space:nowrap;max-width:30em;overflow:hidden;text-overflow:ellipsis}
details.fail{font-size:13px;margin:2px 0} details.fail pre{white-space:pre-wrap;background:#fafafa;padding:6px}
.lead{font-size:15px} .lead b{font-size:17px}"""


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


_LABELS = {
    "index": "#", "pnl_usd": "PnL (USD)", "pnl_bps_of_notional": "PnL / traded notional (bps)",
    "equity": "PnL (own unit)", "pnl_unit": "unit", "num_trades": "fills", "position": "final position",
    "fee": "fees paid", "funding": "funding received", "stats.SR": "Sharpe (annualised)",
    "stats.MaxDrawdown": "max drawdown", "diag.pnl_spread": "spread capture", "diag.pnl_inventory": "inventory PnL",
    "diag.pnl_fees": "fees (rebates +)", "diag.pnl_funding": "funding PnL", "diag.pnl_total": "PnL total",
    "diag.fills": "fills (net per step)", "diag.quote_uptime": "two-sided quote uptime",
    "diag.inventory_mean_abs": "mean |inventory|", "wall_seconds": "wall time (s)", "run_id": "run id",
    "traded_notional_usd": "traded notional (USD)", "max_abs_position": "max |position|",
}


def label(col: str) -> str:
    """A results column as a person reads it: ``p.quoter.params.half_spread`` → ``quoter › half_spread``."""
    if col in _LABELS:
        return _LABELS[col]
    if col.startswith("p."):
        return " › ".join(x for x in col[2:].split(".") if x != "params")
    if col.startswith("diag.markout_bps_"):
        return f"markout {col.rsplit('_', 1)[1]} (bps)"
    if col.startswith("diag.inventory_p"):
        return f"inventory p{int(col[16:])}"
    return col.split(".", 1)[-1].replace("_", " ")


def _table(rows: list[dict[str, Any]], cols: list[str], css: str = "sortable") -> str:
    head = "".join(f'<th title="{html.escape(c)}">{html.escape(label(c))}</th>' for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "error" and isinstance(v, str):  # one line; the whole message on hover
                cells.append(f'<td class="s err" title="{html.escape(v)}">{html.escape(v.splitlines()[0][:80])}</td>')
                continue
            cls = ' class="s"' if isinstance(v, str) else ""
            dv = f' data-v="{v!r}"' if isinstance(v, float) and math.isfinite(v) else ""
            cells.append(f"<td{cls}{dv}>{html.escape(_fmt(v))}</td>")
        body.append(f'<tr class="{html.escape(str(r.get("status", "")))}">{"".join(cells)}</tr>')
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


CHART_BUCKETS = 2000  # a line of a time chart: past 4x this many rows, its extremes per bucket of rows


def _series(results_dir: Path, run_id: str, inst: dict[str, Any], buckets: int | None = None
            ) -> dict[str, np.ndarray] | None:
    """A run's PnL (USD) and position over time, read from its series.parquet a chunk of rows at a
    time: every row while there are at most 4 × ``buckets`` of them, else each bucket of rows' first,
    last, lowest and highest of both lines, so a month of steps draws the same envelope from a
    bounded number of points."""
    import polars as pl

    from quotelab import spool

    p = results_dir / "runs" / run_id / "series.parquet"
    if not p.exists():
        return None
    buckets = buckets or CHART_BUCKETS
    lf = pl.scan_parquet(p).select("timestamp", "mid", "position", "balance", "fee")
    n = int(lf.select(pl.len()).collect().item())
    first_mid = lf.select(pl.col("mid").filter(pl.col("mid").is_finite()).first()).collect().item()
    carry = float("nan") if first_mid is None else float(first_mid)  # a leading gap takes the first mid
    thin = n > 4 * buckets
    got: dict[str, list[np.ndarray]] = {"timestamp": [], "pnl": [], "position": []}
    for lo, hi in spool.chunks(n):
        df = lf.slice(lo, hi - lo).collect()
        frame = {c: df[c].to_numpy() for c in df.columns}
        frame["mid"] = pnl.ffill(np.r_[carry, frame["mid"]])[1:]
        carry = float(frame["mid"][-1])
        eq = equity_series(frame, inst)
        if inst.get("contract") == "inverse":  # coin PnL, valued at the mid of its time
            eq = eq * frame["mid"]
        pos = np.asarray(frame["position"], dtype=float)
        keep = _extremes(np.arange(lo, hi) * buckets // n, eq, pos) if thin else slice(None)
        for k, v in (("timestamp", frame["timestamp"]), ("pnl", eq), ("position", pos)):
            got[k].append(v[keep])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in got.items()}


def _extremes(bucket: np.ndarray, *lines: np.ndarray) -> np.ndarray:
    """Rows to draw of a chunk: per run of equal ``bucket``, its first and last row and each line's
    lowest and highest (NaN rows are never the extremes), in row order."""
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    ends = np.r_[starts[1:], len(bucket)]
    rows = [starts, ends - 1]
    for y in lines:
        filled = np.where(np.isnan(y), np.inf, y)
        rows.append(starts + np.array([np.argmin(filled[a:b]) for a, b in zip(starts, ends, strict=True)]))
        filled = np.where(np.isnan(y), -np.inf, y)
        rows.append(starts + np.array([np.argmax(filled[a:b]) for a, b in zip(starts, ends, strict=True)]))
    return np.unique(np.concatenate(rows))


@dataclass
class _Runs:
    """A results folder's runs, as the report reads them: records by id, flat rows, the ranking stat."""

    results_dir: Path
    by_id: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]]
    stat: str
    bad: list[str]  # records that could not be read, with why
    done: list[dict[str, Any]] = field(init=False)  # finished runs with a finite stat
    varying: list[str] = field(init=False)  # the p.<path> columns that differ between runs

    def __post_init__(self) -> None:
        s = self.stat
        self.done = [r for r in self.rows if r["status"] == "done" and isinstance(r.get(s), float)
                     and math.isfinite(r[s])]
        self.varying = [c for c in self.pcols if len({json.dumps(r.get(c)) for r in self.rows}) > 1]

    @property
    def pcols(self) -> list[str]:
        return [c for c in self.rows[0] if c.startswith("p.")]

    @property
    def best(self) -> dict[str, Any]:
        return sorted(self.done, key=lambda r: r[self.stat])[-1]


def _read_runs(results_dir: Path, stat: str | None, unreadable: list[str] | None) -> _Runs:
    """The runs of ``results_dir`` and the stat to rank them by; a ReportError when there is nothing to rank."""
    bad: list[str] = []
    records = read_records(results_dir, bad)
    if unreadable is not None:
        unreadable.extend(bad)
    if not records:
        raise ReportError(f"{results_dir}: no readable run records (runs/*/record.json)"
                          + (f"; {len(bad)} could not be read, e.g. {bad[0]}" if bad else
                             "; run `quotelab batch` first"))
    rows = [flat_row(r) for r in records]
    if stat is None:  # PnL in USD compares runs in coin and in USDT; records from before it had only equity
        stat = "pnl_usd" if any(isinstance(r.get("pnl_usd"), float) for r in rows) else "equity"
    if stat not in rows[0] and f"stats.{stat}" in rows[0]:
        stat = f"stats.{stat}"
    if not any(isinstance(r.get(stat), float) for r in rows):
        have = sorted(k for k in rows[0] if isinstance(rows[0][k], float))
        raise ReportError(f"{results_dir}: no run has a numeric {stat!r}; numeric columns: {', '.join(have)}")
    return _Runs(results_dir, {r["run_id"]: r for r in records}, rows, stat, bad)


class _Figures:
    """Charts saved as PNGs beside the page; ``save`` returns the ``<img>`` that shows one."""

    def __init__(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.out, self.plt = out, plt

    def save(self, fig: Any, name: str) -> str:
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=90)
        self.plt.close(fig)
        return f'<img src="{name}" alt="{html.escape(name)}">'


def build_report(results_dir: str | Path, out: str | Path | None = None, stat: str | None = None,
                 x: str | None = None, y: str | None = None, unreadable: list[str] | None = None) -> Path:
    """Write ``<out>/index.html`` and its PNGs for the batch results in ``results_dir``; return the HTML path.

    Run records that cannot be read are listed in the report and appended to ``unreadable``."""
    # Imported here: `quotelab report` starts without numba and hftbacktest, which these load.
    from quotelab.batch.optimize import report_section
    from quotelab.data.catalog import atomic_write_bytes

    results_dir = Path(results_dir)
    runs = _read_runs(results_dir, stat, unreadable)
    out = Path(out) if out is not None else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out)
    # The charts first, then the tables they summarise, then every run.
    charts = [_lead(runs),
              report_section(results_dir, out, figs.save),  # a `quotelab optimize` folder: its trials first
              _unreadable_section(runs.bad), _params_chart(runs, x, y, figs), _best_worst_chart(runs, figs)]
    venues_chart, venues_table = _venues(runs, figs)
    diag_charts, diag_tables = _diagnostics_section(runs, figs)
    sections = [*charts, venues_chart, *diag_charts, _failed_section(runs), venues_table, *diag_tables,
                _all_runs_table(runs)]
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>quotelab batch report</title>"
            f"<style>{_CSS}</style></head><body><h1>quotelab batch report</h1>"
            f"<p class=note>{html.escape(str(results_dir.resolve()))}</p>{''.join(s for s in sections if s)}"
            f"<script>{_SORT_JS}</script></body></html>")
    path = out / "index.html"
    atomic_write_bytes(path, lambda fh: fh.write(page.encode()))
    return path


def _lead(runs: _Runs) -> str:
    """How many runs, how many failed, and the best and worst by the stat."""
    rows, stat = runs.rows, runs.stat
    n_failed = sum(r["status"] != "done" for r in rows)
    lead = (f"<p class=lead>{len(rows)} runs: {len(rows) - n_failed} done, {n_failed} failed. "
            f"Ranked by <b>{html.escape(label(stat))}</b>.")
    if runs.done:
        top = max(runs.done, key=lambda r: r[stat])
        low = min(runs.done, key=lambda r: r[stat])
        for tag, r in (("Best", top), ("Worst", low)):
            bps = r.get("pnl_bps_of_notional")
            lead += (f"<br>{tag}: {html.escape(str(r.get('label') or r['index']))}: {html.escape(label(stat))} "
                     f"<b>{_fmt(r[stat])}</b>"
                     + (f", {bps:.3g} bps of traded notional" if isinstance(bps, float) else ""))
    return lead + "</p>"


def _unreadable_section(bad: list[str]) -> str | None:
    if not bad:
        return None
    return (f"<h2>Unreadable run records ({len(bad)})</h2><p class=note>Left out of every table and "
            "plot; rerun them with <code>quotelab batch --resume</code>.</p><ul>"
            + "".join(f"<li>{html.escape(b)}</li>" for b in bad) + "</ul>")


def _params_chart(runs: _Runs, x: str | None, y: str | None, figs: _Figures) -> str | None:
    """The stat over two params as a heatmap (mean over everything else: venues, symbols, other params), or
    over one as a line per venue/symbol. ``x`` and ``y`` default to the first params that vary."""
    done, stat, varying, plt = runs.done, runs.stat, runs.varying, figs.plt
    x = f"p.{x}" if x and not x.startswith("p.") else x
    y = f"p.{y}" if y and not y.startswith("p.") else y
    if x is None and len(varying) >= 1:
        x = varying[0]
    if y is None and len(varying) >= 2:
        y = varying[1] if varying[1] != x else None
    if not (done and x):
        return None
    if not y:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({(r["venue"], r["symbol"]) for r in done}):
            pts = sorted(((r[x], r[stat]) for r in done if (r["venue"], r["symbol"]) == key), key=lambda p: str(p[0]))
            ax.plot([_fmt(p[0]) for p in pts], [p[1] for p in pts], marker="o", label="/".join(key))
        ax.set_xlabel(label(x))
        ax.set_ylabel(label(stat))
        ax.legend(fontsize=7)
        return (f"<h2>{html.escape(label(stat))} by {html.escape(label(x))}</h2>"
                '<p class="note">Only one parameter varies, so a line per venue/symbol instead of a '
                "heatmap.</p>" + figs.save(fig, "heatmap.png"))
    xs = sorted({r[x] for r in done}, key=str)
    ys = sorted({r[y] for r in done}, key=str)
    grid = np.full((len(ys), len(xs)), np.nan)
    for i, yv in enumerate(ys):
        for j, xv in enumerate(xs):
            vals = [r[stat] for r in done if r[x] == xv and r[y] == yv]
            grid[i, j] = np.mean(vals) if vals else np.nan
    fig, ax = plt.subplots(figsize=(6, 4.5))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="RdYlGn")
    ax.set_xticks(range(len(xs)), [_fmt(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_fmt(v) for v in ys])
    ax.set_xlabel(label(x))
    ax.set_ylabel(label(y))
    for i in range(len(ys)):
        for j in range(len(xs)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, label=label(stat))
    ax.set_title(f"mean {label(stat)} over {label(x)} × {label(y)}")
    return "<h2>Heatmap</h2>" + figs.save(fig, "heatmap.png")


def _best_worst_chart(runs: _Runs, figs: _Figures) -> str | None:
    """PnL (USD) and position over time of the best and the worst run."""
    if not runs.done:
        return None
    ranked = sorted(runs.done, key=lambda r: r[runs.stat])
    picks = [("best", ranked[-1]), ("worst", ranked[0])] if len(ranked) > 1 else [("best", ranked[-1])]
    fig, axes = figs.plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for tag, r in picks:
        s = _series(runs.results_dir, r["run_id"], runs.by_id[r["run_id"]].get("instrument") or {})
        if s is None or not len(s["timestamp"]):
            continue
        t = (s["timestamp"] - s["timestamp"][0]) / 1e9
        axes[0].plot(t, s["pnl"], label=f"{tag}: {r['label']}")
        axes[1].plot(t, s["position"], label=tag)
    axes[0].set_ylabel("PnL (USD)")
    axes[1].set_ylabel("position")
    axes[1].set_xlabel("seconds")
    axes[0].legend(fontsize=7)
    return f"<h2>Best and worst runs by {html.escape(label(runs.stat))}</h2>" + figs.save(fig, "best_worst.png")


def _venues(runs: _Runs, figs: _Figures) -> tuple[str, str]:
    """The mean stat per venue/symbol as a chart, and its table (runs, failures, best, worst, markout, uptime)."""
    stat = runs.stat
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs.rows:
        groups.setdefault(f"{r['venue']}/{r['symbol']}", []).append(r)
    comp = []
    for key, rs in groups.items():
        ok = [r for r in rs if r in runs.done]
        vals = [r[stat] for r in ok]
        comp.append({"venue/symbol": key, "runs": len(rs), "failed": sum(r["status"] != "done" for r in rs),
                     f"mean {label(stat)}": float(np.mean(vals)) if vals else None,
                     f"best {label(stat)}": float(np.max(vals)) if vals else None,
                     f"worst {label(stat)}": float(np.min(vals)) if vals else None,
                     "mean markout 1s (bps)": _mean([r.get("diag.markout_bps_1s") for r in ok]),
                     "mean quote uptime": _mean([r.get("diag.quote_uptime") for r in ok])})
    fig, ax = figs.plt.subplots(figsize=(max(5, 1.2 * len(comp)), 4))
    ax.bar([c["venue/symbol"] for c in comp], [c[f"mean {label(stat)}"] or 0.0 for c in comp], color="#4a7")
    ax.set_ylabel(f"mean {label(stat)}")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    return ("<h2>Per venue / symbol</h2>" + figs.save(fig, "venues.png"),
            "<h2>Per venue / symbol</h2>" + _table(comp, list(comp[0])))


def _diagnostics_section(runs: _Runs, figs: _Figures) -> tuple[list[str], list[str]]:
    """Market-making diagnostics: the charts, and the tables (every finished run; the best run per UTC day)."""
    if not runs.done:
        return [], []
    best = runs.best
    best_diag = runs.by_id[best["run_id"]]["diagnostics"]
    note = ("<h2>Market-making diagnostics</h2><p class=note>Fills are inferred from position changes between "
            "recorded steps; markouts are the mid after the horizon vs the fill price, signed by side, weighted by "
            "size. The PnL split (spread capture at the mid quoted against, inventory marked to the mid's moves, "
            "fees/rebates, funding) adds up to the recorded PnL; the chart shows it in USD.</p>")
    charts = [note + _markouts_and_split_chart(runs, best, figs) + _inventory_and_fill_rate_chart(runs, best,
                                                                                                 best_diag, figs)]
    diag_cols = ["index", "venue", "symbol", *runs.varying, "equity", "diag.pnl_spread", "diag.pnl_inventory",
                 "diag.pnl_fees", "diag.pnl_funding", "diag.pnl_total", "diag.fills", "diag.markout_bps_0",
                 "diag.markout_bps_100ms", "diag.markout_bps_1s", "diag.markout_bps_10s",
                 "diag.markout_bps_60s", "diag.quote_uptime", "diag.inventory_p05", "diag.inventory_p50",
                 "diag.inventory_p95"]
    tables = ["<h2>Market-making diagnostics</h2>"
              + _table(runs.done, [c for c in diag_cols if any(c in r for r in runs.done)])]
    days = (runs.by_id[best["run_id"]].get("summary") or {}).get("days") or []
    if days:
        tables.append(f"<h2>Per UTC day, best run ({html.escape(str(best.get('label') or best['index']))}; "
                      f"{html.escape(str(best.get('pnl_unit') or ''))})</h2>"
                      + _table(days, ["day", "pnl", "spread", "inventory", "fees", "funding", "volume", "trades",
                                      "max_abs_position"]))
    return charts, tables


def _markouts_and_split_chart(runs: _Runs, best: dict[str, Any], figs: _Figures) -> str:
    """Fill markouts by horizon (every run, the best in colour) beside the PnL split of each run in USD."""
    done = runs.done
    fig, axes = figs.plt.subplots(1, 2, figsize=(11, 4))
    hz = ["0", *HORIZONS]
    for r in done:
        ys_ = [r.get(f"diag.markout_bps_{h}") for h in hz]
        is_best = r is best
        axes[0].plot(hz, [np.nan if v is None else v for v in ys_], color="C1" if is_best else "#999",
                     alpha=1.0 if is_best else 0.4, lw=2 if is_best else 1, marker="o" if is_best else None)
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_title("fill markouts, bps (best run in colour)")
    axes[0].set_xlabel("horizon")
    labels = [str(r["index"]) for r in done]
    bottom_pos = np.zeros(len(done))
    bottom_neg = np.zeros(len(done))
    for part, color in (("spread", "C2"), ("inventory", "C0"), ("fees", "C3"), ("funding", "C4")):
        v = np.array([(r.get(f"diag.pnl_{part}") or 0.0) * _usd(r) for r in done])
        base = np.where(v >= 0, bottom_pos, bottom_neg)
        axes[1].bar(labels, v, bottom=base, color=color, label=part)
        bottom_pos += np.where(v >= 0, v, 0)
        bottom_neg += np.where(v < 0, v, 0)
    axes[1].scatter(labels, [(r.get("equity") or 0.0) * _usd(r) for r in done], color="k", marker="_", s=200,
                    label="recorded PnL", zorder=3)
    axes[1].set_title("PnL split by run index (USD)")
    axes[1].legend(fontsize=7)
    axes[1].tick_params(axis="x", labelsize=7)
    return figs.save(fig, "diagnostics.png")


def _inventory_and_fill_rate_chart(runs: _Runs, best: dict[str, Any], best_diag: dict[str, Any],
                                   figs: _Figures) -> str:
    """The best run's inventory distribution beside the fill rate by quote distance of every run."""
    fig, axes = figs.plt.subplots(1, 2, figsize=(11, 4))
    hist = best_diag.get("inventory_hist") or {}
    if hist:
        axes[0].bar([_fmt(v) for v in hist["values"]], hist["share"], color="C0")
        axes[0].tick_params(axis="x", rotation=60, labelsize=7)
    axes[0].set_title("inventory distribution (best run, share of steps)")
    for r in runs.done:
        d = runs.by_id[r["run_id"]]["diagnostics"].get("fill_rate_by_distance") or {}
        pts = sorted((int(k), v["fill_rate"]) for k, v in d.items() if v["fill_rate"] is not None)
        is_best = r is best
        if pts:
            axes[1].plot(*zip(*pts, strict=True), color="C1" if is_best else "#999", alpha=1 if is_best else 0.4,
                         marker="o" if is_best else None)
    axes[1].set_xlabel("quote distance from mid (ticks)")
    has_rates = best_diag.get("fill_rate_by_distance")
    axes[1].set_title("fill rate per step by quote distance" + ("" if has_rates else " (no tick size)"))
    return figs.save(fig, "inventory_fills.png")


def _failed_section(runs: _Runs) -> str | None:
    """One line per failed run; its whole message on demand."""
    failed = [r for r in runs.rows if r["status"] != "done"]
    if not failed:
        return None
    return f"<h2>Failed runs ({len(failed)})</h2>" + "".join(
        f'<details class=fail><summary>#{r["index"]} {html.escape(str(r["venue"]))}/'
        f'{html.escape(str(r["symbol"]))} {html.escape(str(r.get("label") or ""))}: '
        f'{html.escape(str(r.get("error") or "no error recorded").splitlines()[0][:100])}</summary>'
        f'<pre>{html.escape(str(r.get("error") or ""))}</pre></details>' for r in failed)


def _all_runs_table(runs: _Runs) -> str:
    """Every run: identity, params, results and diagnostics, the ranking stat last."""
    cols = TABLE_COLS[:5] + runs.pcols + [c for c in TABLE_COLS[5:] if c != runs.stat] + [runs.stat]
    cols = [c for c in cols if any(c in r for r in runs.rows)]
    return ("<h2>All runs</h2><p class=note>Click a column header to sort; hover a header for its "
            "field name.</p>" + _table(runs.rows, cols))


def _usd(row: dict[str, Any]) -> float:
    """USD per unit of a run's PnL: its final mark if the PnL is in coin, else 1 (stablecoins at par)."""
    unit = row.get("pnl_unit")
    if unit is None or unit in ("USD", "USDT", "USDC", "BUSD", "FDUSD"):
        return 1.0
    return float(row.get("last_mid") or np.nan)


def _mean(vals: list[Any]) -> float | None:
    v = [x for x in vals if isinstance(x, float) and math.isfinite(x)]
    return float(np.mean(v)) if v else None


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------


def _fills(ts: np.ndarray, s: dict[str, np.ndarray], inst: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """(time, price, signed qty) of the net fill of each step, its price from the trades' balance change."""
    inverse = inst.get("contract") == "inverse"
    cs = float(inst.get("contract_size", 1.0))
    sign = -1.0 if inverse else 1.0
    q = np.concatenate([[0.0], s["position"]])
    bal = np.concatenate([[0.0], s["balance"] - sign * s.get("funding", np.zeros(len(ts)))])
    dq, dbal = np.diff(q), np.diff(bal)
    k = np.flatnonzero(np.abs(dq) > 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        px = -dq[k] * cs / dbal[k] if inverse else -dbal[k] / (dq[k] * cs)
    return ts[k], px, dq[k]


RUN_LINES = ("spread", "inventory", "fees", "funding", "total", "position", "bid", "ask")
MAX_FILLS = 20_000  # fills drawn as they are; past it, each bucket's extremes per side


@dataclass
class _RunLines:
    """What the one-run chart draws: per kept step its time and the lines (PnL parts summed, position,
    quotes in ticks from the mid); per kept fill its time, price, quantity and ticks from the mid."""

    ts: np.ndarray
    lines: dict[str, np.ndarray]
    fills: dict[str, np.ndarray]
    all_fills: dict[str, np.ndarray]  # every fill (for the zoom), spooled
    n: int


def _run_lines(series: Path, summary: dict[str, Any], buckets: int | None = None) -> _RunLines:
    """The run chart's lines from ``series``, read a chunk of rows at a time: the PnL parts (pnl.parts)
    summed as the whole series would be, each step carrying the last row of the chunk before; every
    step while there are at most 4 × ``buckets`` of them, else each bucket's first, last, lowest and
    highest of every line; every fill up to MAX_FILLS, else each bucket's extremes per side."""
    import polars as pl

    from quotelab import spool

    inst = summary.get("instrument") or {}
    inverse = inst.get("contract") == "inverse"
    cs = float(inst.get("contract_size", 1.0))
    tick = float(inst.get("tick_size") or 1.0)
    buckets = buckets or CHART_BUCKETS
    lf = pl.scan_parquet(series)
    cols = [c for c in ("timestamp", "mid", "position", "balance", "fee", "funding", "bid", "ask")
            if c in lf.collect_schema().names()]
    lf = lf.select(cols)
    n = int(lf.select(pl.len()).collect().item())
    first_mid = lf.select(pl.col("mid").filter(pl.col("mid").is_finite()).first()).collect().item()
    prev: dict[str, float] = {"mid": float("nan") if first_mid is None else float(first_mid)}
    sums = dict.fromkeys(("spread", "inventory", "fees", "funding", "total"), 0.0)
    thin = n > 4 * buckets
    kept: dict[str, list[np.ndarray]] = {k: [] for k in ("ts", *RUN_LINES)}
    fills = {k: spool.Spool(d) for k, d in (("t", np.int64), ("px", np.float64), ("q", np.float64),
                                            ("ticks", np.float64))}
    for lo, hi in spool.chunks(n):
        df = lf.slice(lo, hi - lo).collect()
        f = {c: df[c].to_numpy() for c in df.columns if c != "timestamp"}
        ts = df["timestamp"].to_numpy()
        f["mid"] = pnl.ffill(np.r_[prev["mid"], f["mid"]])[1:]
        if lo == 0:  # the series opens on the empty account, as pnl.parts and _fills do
            parts = pnl.parts(ts, f, {}, inverse, cs)
            ft, fpx, fq = _fills(ts, f, inst)
            at = np.clip(np.searchsorted(ts, ft) - 1, 0, len(ts) - 1)
            fmid = f["mid"][at]
        else:  # the chunk after the last row of the one before: drop that row's own step
            ext = {c: np.r_[prev[c], f[c]] for c in f}
            ext_ts = np.r_[prev["ts"], ts].astype(np.int64)
            parts = {k: v[1:] for k, v in pnl.parts(ext_ts, ext, {}, inverse, cs).items()}
            ft, fpx, fq = _fills(ext_ts, ext, inst)
            keep = ft != ext_ts[0]
            ft, fpx, fq = ft[keep], fpx[keep], fq[keep]
            fmid = ext["mid"][np.searchsorted(ext_ts, ft) - 1]
        lines = {}
        for k in ("spread", "inventory", "fees", "funding"):
            lines[k] = np.cumsum(np.r_[sums[k], parts[k]])[1:]  # the whole series' running sum, step for step
        lines["total"] = np.cumsum(np.r_[sums["total"], parts["spread"] + parts["inventory"] + parts["fees"]
                                         + parts["funding"]])[1:]
        for k in sums:
            sums[k] = float(lines[k][-1])
        lines["position"] = np.asarray(f["position"], dtype=float)
        lines["bid"], lines["ask"] = (f["bid"] - f["mid"]) / tick, (f["ask"] - f["mid"]) / tick
        rows = _extremes(np.arange(lo, hi) * buckets // n, *lines.values()) if thin else slice(None)
        kept["ts"].append(ts[rows])
        for k, v in lines.items():
            kept[k].append(v[rows])
        for k, v in (("t", ft), ("px", fpx), ("q", fq), ("ticks", (fpx - fmid) / tick)):
            fills[k].add(v)
        prev = {c: f[c][-1] for c in f} | {"ts": int(ts[-1])}
    got = {k: np.concatenate(v) if v else np.zeros(0) for k, v in kept.items()}
    fill = {k: sp.array() for k, sp in fills.items()}
    return _RunLines(got.pop("ts"), got, _thin_fills(fill, len(fill["t"]), buckets), fill, n)


def _thin_fills(fill: dict[str, np.ndarray], count: int, buckets: int) -> dict[str, np.ndarray]:
    """The fills to draw: all of them up to MAX_FILLS, else per bucket of time and side the ones
    furthest from the mid either way (and the first and last), read a chunk at a time."""
    from quotelab import spool

    if count <= MAX_FILLS:
        return {k: np.asarray(v) for k, v in fill.items()}
    t0, t1 = int(fill["t"][0]), int(fill["t"][-1]) + 1
    out: dict[str, list[np.ndarray]] = {k: [] for k in fill}
    for lo, hi in spool.chunks(count):
        part = {k: np.asarray(v[lo:hi]) for k, v in fill.items()}
        bucket = ((part["t"] - t0) / (t1 - t0) * buckets).astype(np.int64) * 2 + (part["q"] > 0)
        order = np.argsort(bucket, kind="stable")
        rows = order[_extremes(bucket[order], part["ticks"][order])]
        rows.sort()
        for k, v in part.items():
            out[k].append(v[rows])
    return {k: np.concatenate(v) for k, v in out.items()}


def _busiest_window(ft: np.ndarray, t0: int) -> tuple[int, int] | None:
    """The window of the quotes zoom: start with 60 s and shorten it by 3 down to 2 s while one holds more
    than 60 fills; then the window (lo, hi) with the most fills. ``ft`` (in time order) is read a chunk at
    a time, counting fills per window as runs of equal window numbers."""
    from quotelab import spool

    if not len(ft):
        return None

    def busiest(span: int) -> tuple[int, int]:
        best, best_w, run, run_w = 0, 0, 0, -1
        for lo, hi in spool.chunks(len(ft)):
            w = (np.asarray(ft[lo:hi]) - t0) // span
            starts = np.flatnonzero(np.r_[True, w[1:] != w[:-1]])
            counts = np.diff(np.r_[starts, len(w)])
            for wi, c in zip(w[starts].tolist(), counts.tolist(), strict=True):
                run = run + c if wi == run_w else c
                run_w = wi
                if run > best:
                    best, best_w = run, wi
        return best, best_w

    span = 60_000_000_000
    most, w = busiest(span)
    while span > 2_000_000_000 and most > 60:
        span //= 3
        most, w = busiest(span)
    return t0 + w * span, t0 + (w + 1) * span


def build_run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``<out>/index.html`` for one ``quotelab run --out`` folder: the figures, PnL and its parts
    over time, position, the quotes around the mid with fills, the per-day table; return the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    from quotelab.data.catalog import atomic_write_bytes

    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        got = _run_lines(run_dir / "series.parquet", summary)
    except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
        raise ReportError(f"{run_dir}: not a readable run folder ({exc}); write one with `quotelab run ... --out`"
                          ) from exc
    ts, lines, fills = got.ts, got.lines, got.fills
    if not got.n:
        raise ReportError(f"{run_dir}: the run recorded no steps; nothing to plot")
    inst = summary.get("instrument") or {}
    unit = summary.get("pnl_unit", "")
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    t = (ts - ts[0]) / 6e10

    fig, axes = plt.subplots(3, 1, figsize=(11, 10), sharex=True, gridspec_kw={"height_ratios": [3, 1.3, 3]})
    for name, color in (("spread", "C2"), ("inventory", "C0"), ("fees", "C3"), ("funding", "C4")):
        axes[0].plot(t, lines[name], color=color, lw=1, label=name)
    axes[0].plot(t, lines["total"], color="k", lw=1.6, label="PnL")
    axes[0].axhline(0, color="#888", lw=0.5)
    axes[0].set_ylabel(f"PnL ({unit})")
    axes[0].legend(fontsize=8, ncol=5)
    axes[0].set_title(f"{summary.get('name', '')}: PnL and its parts")
    axes[1].step(t, lines["position"], where="post", color="C1")
    axes[1].axhline(0, color="#888", lw=0.5)
    axes[1].set_ylabel("position")
    # quotes around the mid, in ticks: readable over hours where absolute prices are not
    axes[2].step(t, lines["bid"], where="post", color="C2", lw=0.6, label="our bid − mid")
    axes[2].step(t, lines["ask"], where="post", color="C3", lw=0.6, label="our ask − mid")
    axes[2].axhline(0, color="k", lw=0.5)
    ok = np.isfinite(fills["px"])
    for side, mark, color in ((1, "^", "C2"), (-1, "v", "C3")):
        k = ok & (np.sign(fills["q"]) == side)
        axes[2].scatter((fills["t"][k] - ts[0]) / 6e10, fills["ticks"][k], marker=mark, s=12, color=color,
                        edgecolor="k", linewidth=0.3, label="buy fills" if side > 0 else "sell fills", zorder=3)
    axes[2].set_ylabel("ticks from the mid")
    axes[2].set_xlabel("minutes from the first step")
    axes[2].legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "run.png", dpi=90)
    plt.close(fig)

    # a zoom on the quotes: the window with the most fills, short enough to see each (~60 at most)
    window = _busiest_window(got.all_fills["t"], int(ts[0]))
    if window is not None:
        lo, hi = window
        w = (pl.scan_parquet(run_dir / "series.parquet").select("timestamp", "mid", "bid", "ask")
             .filter((pl.col("timestamp") >= lo) & (pl.col("timestamp") < hi)).collect())
        a, b = np.searchsorted(got.all_fills["t"], [lo, hi])
        ft, fpx, fq = (np.asarray(got.all_fills[k][a:b]) for k in ("t", "px", "q"))
        fig, ax = plt.subplots(figsize=(11, 4))
        tw = (w["timestamp"].to_numpy() - lo) / 1e9
        ax.plot(tw, w["mid"].to_numpy(), color="k", lw=0.8, label="mid")
        ax.step(tw, w["bid"].to_numpy(), where="post", color="C2", lw=1, label="our bid")
        ax.step(tw, w["ask"].to_numpy(), where="post", color="C3", lw=1, label="our ask")
        k = np.isfinite(fpx)
        ax.scatter((ft[k] - lo) / 1e9, fpx[k], c=np.where(fq[k] > 0, "C2", "C3"), marker="o", s=30, zorder=3,
                   label="fills")
        ax.set_xlabel(f"seconds from {(lo - ts[0]) / 1e9:g} s into the run (the {(hi - lo) / 1e9:g} s with the most "
                      f"fills)")
        ax.set_ylabel("price")
        ax.legend(fontsize=8, ncol=4)
        fig.tight_layout()
        fig.savefig(out / "quotes.png", dpi=90)
        plt.close(fig)

    figures = [("PnL", f"{_fmt(summary.get('pnl'))} {unit}")]
    if summary.get("pnl_usd_method") not in (None, "USD", "at par"):
        figures.append(("PnL in USD", f"{_fmt(summary.get('pnl_usd'))} ({summary['pnl_usd_method']})"))
    figures += [("PnL per traded notional", f"{_fmt(summary.get('pnl_bps_of_notional'))} bps"),
                ("funding", f"{_fmt(summary.get('funding'))} {unit}, {len(summary.get('settlements') or [])} "
                            "settlements"),
                ("fills", _fmt(summary.get("num_trades"))), ("fees paid", f"{_fmt(summary.get('fee'))} {unit}"),
                ("final position", _fmt(summary.get("position"))),
                ("traded notional", f"{_fmt(summary.get('traded_notional_usd'))} USD")]
    stats = summary.get("stats") or {}
    figures += [(label(k), _fmt(v)) for k, v in stats.items()]
    head = "".join(f"<tr><td class=s>{html.escape(k)}</td><td class=s>{html.escape(v)}</td></tr>" for k, v in figures)
    day_cols = ["day", "pnl", "spread", "inventory", "fees", "funding", "volume", "trades", "max_abs_position"]
    days = [{**d, "max |position|": d.get("max_abs_position")} for d in summary.get("days") or []]
    sections = [
        f"<h1>{html.escape(str(summary.get('name', 'run')))}</h1><p class=note>{html.escape(str(run_dir.resolve()))}"
        f" — {html.escape(str(inst.get('venue', '')))}/{html.escape(str(inst.get('symbol', '')))}, "
        f"{html.escape(str(inst.get('contract', '')))}</p>",
        f"<table>{head}</table>",
        '<h2>PnL, position, quotes</h2><img src="run.png" alt="run.png">',
    ]
    if len(got.all_fills["t"]):
        sections.append('<img src="quotes.png" alt="quotes.png">')
    sections.append(f"<h2>Per UTC day ({html.escape(unit)})</h2>"
                    + _table(days, [c if c != "max_abs_position" else "max |position|" for c in day_cols], css=""))
    if summary.get("settlements"):
        sections.append("<h2>Funding settlements</h2>" + _table(summary["settlements"],
                                                                 ["ts", "rate", "mark", "position", "amount"], css=""))
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>quotelab run report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>")
    path = out / "index.html"
    atomic_write_bytes(path, lambda fh: fh.write(page.encode()))
    return path
