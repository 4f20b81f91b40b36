"""``quotelab calibrate``: σ, A and k for Avellaneda–Stoikov and GLFT, fitted from catalog days.

Measured as hftbacktest's GLFT example measures them, at a fixed step (the quoting step):

* **σ**: the standard deviation of the step's change of the mid, in ticks, per √second
  (std / √step), the unit of the quoters' ``volatility``.
* **λ(δ) = A·e^(−kδ)**: at each step, the deepest buy trade above and the deepest sell trade below
  the previous step's mid, in half ticks (:func:`quotelab.kernels.arrival_fit.arrival_depths_nb`). A
  quote δ = 0.5, 1, ..., ``max_ticks`` ticks from the mid is reached in a step when the depth is
  strictly beyond it; λ(δ) = steps reaching δ / seconds. ln λ = ln A − kδ is fitted by least squares
  over the δ reached at least once, per side (buy: trades lifting asks, sell: hitting bids) and
  pooled (the deeper of the two per step: the online fit of the quoters' ``fit_window``).

Days are replayed one at a time (each catalog day starts with a snapshot), a part file at a time,
with the per-step probes spooled (:mod:`quotelab.spool`) and counted a chunk at a time, so memory
is one part's events whatever the days; the per-asset totals add the days' counts, not their events.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from quotelab import layout as L
from quotelab import spool
from quotelab.data import catalog as cat
from quotelab.data.assets import Asset
from quotelab.errors import QuotelabError
from quotelab.kernels.arrival_fit import arrival_depths_nb, log_linear_fit_nb
from quotelab.research.replay import replay

SIDES = ("buy", "sell", "pooled")
MAX_TICKS_LIMIT = 500


class CalibrationError(QuotelabError):
    """Calibration input that cannot be fitted."""


@njit(inline="always")
def calibration_probe_nb(view, trades, state, params, out):
    # Kernel with the layout signature: returns the mid in ticks, writes the step's arrival depths.
    hb, hs = arrival_depths_nb(view, trades, 0, state[0])
    mid = (view[0, L.BEST_BID_TICK] + view[0, L.BEST_ASK_TICK]) / 2.0
    state[0] = mid
    out[L.COMPONENTS] = hb
    out[L.COMPONENTS + 1] = hs
    return mid


@njit
def reached_counts_nb(depth_h, n_half):
    """counts[j−1] = steps whose depth (half ticks) is beyond δ = j/2, j = 1..n_half."""
    counts = np.zeros(n_half)
    for h in depth_h:
        top = min(int(h) - 1, n_half)  # h > j  <=>  j <= h - 1
        for j in range(top):
            counts[j] += 1.0
    return counts


@njit
def mid_change_moments_nb(mid_ticks):
    """(n, Σx, Σx²) of the finite step changes of the mid."""
    n = 0
    s = 0.0
    ss = 0.0
    for i in range(1, len(mid_ticks)):
        x = mid_ticks[i] - mid_ticks[i - 1]
        if x == x:
            n += 1
            s += x
            ss += x * x
    return n, s, ss


@dataclass
class DayMeasure:
    """What one day adds: step count, reach counts per side, and the mid-change moments."""

    steps: int
    trades: int
    counts: dict[str, np.ndarray]
    moments: tuple[int, float, float]

    def __add__(self, other: DayMeasure) -> DayMeasure:
        return DayMeasure(self.steps + other.steps, self.trades + other.trades,
                          {s: self.counts[s] + other.counts[s] for s in SIDES},
                          tuple(a + b for a, b in zip(self.moments, other.moments, strict=True)))  # type: ignore


def measure_day(events: np.ndarray | Sequence[np.ndarray], tick: float, lot: float, step: float, max_ticks: int
                ) -> DayMeasure:
    """Replay one day (its events, or its parts: :func:`quotelab.data.catalog.stream_days`) at ``step``
    seconds and count how far trades reached from the mid, a chunk of steps at a time."""
    asset = Asset("x", [events] if isinstance(events, np.ndarray) else events, tick, lot)
    res = replay([asset], calibration_probe_nb, np.zeros(1), np.array([np.nan]), step=step, keep_out=True,
                 out_columns=[L.COMPONENTS, L.COMPONENTS + 1])
    n_half = 2 * max_ticks
    counts = {s: np.zeros(n_half) for s in SIDES}
    trades = 0
    for lo, hi in spool.chunks(len(res.values)):
        hb, hs = np.asarray(res.outs[lo:hi, 0]), np.asarray(res.outs[lo:hi, 1])
        counts["buy"] += reached_counts_nb(hb, n_half)
        counts["sell"] += reached_counts_nb(hs, n_half)
        counts["pooled"] += reached_counts_nb(np.maximum(hb, hs), n_half)
        trades += int(np.asarray(res.n_trades[lo:hi]).sum())
    return DayMeasure(len(res.values), trades, counts, mid_change_moments_nb(res.values))


def fit(m: DayMeasure, step: float, max_ticks: int) -> list[dict[str, Any]]:
    """Rows per side: A (1/s), k (1/ticks), R² of the log-linear fit, points, σ (ticks/√s)."""
    n, s, ss = m.moments
    sigma = math.sqrt(max(ss / n - (s / n) ** 2, 0.0) * n / (n - 1) / step) if n > 1 else math.nan
    rows = []
    for side in SIDES:
        a, k, r2, pts = log_linear_fit_nb(m.counts[side], 2 * max_ticks, m.steps * step)
        rows.append({"side": side, "A": float(a), "k": float(k), "r2": float(r2), "points": int(pts),
                     "sigma": sigma, "steps": m.steps, "trades": m.trades,
                     "reached_half_tick": int((m.counts[side] > 0).sum())})
    return rows


@dataclass
class Calibration:
    rows: list[dict[str, Any]]  # per asset, day (or "all") and side
    measures: dict[tuple[str, str], DayMeasure]
    step: float
    max_ticks: int

    def params_block(self, asset: str) -> dict[str, float]:
        """The quoters' params from the pooled fit over all the asset's days."""
        row = next(r for r in self.rows if r["asset"] == asset and r["day"] == "all" and r["side"] == "pooled")
        return {"k": round(row["k"], 6), "arrival_rate": round(row["A"], 6), "volatility": round(row["sigma"], 6)}


def calibrate(catalog: Path | str, assets: list[str], dates: list[str] | None = None, step: float = 0.1,
              max_ticks: int = 35) -> Calibration:
    """Fit each ``venue/symbol`` in ``assets`` per day and over all its days (counts added)."""
    if not 1 <= max_ticks <= MAX_TICKS_LIMIT:
        raise CalibrationError(f"--max-ticks must be in 1..{MAX_TICKS_LIMIT}, got {max_ticks}")
    if not step > 0:
        raise CalibrationError(f"--step must be > 0 seconds, got {step}")
    rows: list[dict[str, Any]] = []
    measures: dict[tuple[str, str], DayMeasure] = {}
    for name in assets:
        venue, _, symbol = name.partition("/")
        if not symbol:
            raise CalibrationError(f"--asset {name!r}: expected VENUE/SYMBOL, e.g. binance-usdm/BTCUSDT")
        meta = cat.read_meta(catalog, venue, symbol)
        have = cat.list_days(catalog, venue, symbol)
        days = have if not dates else [d for d in dates if d in have]
        missing = sorted(set(dates or []) - set(have))
        if missing or not days:
            raise CalibrationError(f"{name}: no catalog day {', '.join(missing) or '(none at all)'} in {catalog}; "
                                   f"it holds {', '.join(have) or 'no days'}")
        total: DayMeasure | None = None
        for day in days:
            m = measure_day(cat.stream_days(catalog, venue, symbol, [day])[1], meta["tick_size"], meta["lot_size"],
                            step, max_ticks)
            measures[(name, day)] = m
            rows += [{"asset": name, "day": day, **r} for r in fit(m, step, max_ticks)]
            total = m if total is None else total + m
        measures[(name, "all")] = total  # type: ignore[assignment]
        rows += [{"asset": name, "day": "all", **r} for r in fit(total, step, max_ticks)]  # type: ignore[arg-type]
    return Calibration(rows, measures, step, max_ticks)


def plot(c: Calibration, asset: str, day: str, path: Path) -> None:
    """λ(δ) per side on a log scale with the fitted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = c.measures[(asset, day)]
    delta = np.arange(1, 2 * c.max_ticks + 1) / 2
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seconds = m.steps * c.step
    for side, color in zip(SIDES, ("tab:green", "tab:red", "tab:blue"), strict=True):
        lam = m.counts[side] / seconds
        ok = lam > 0
        row = next(r for r in c.rows if r["asset"] == asset and r["day"] == day and r["side"] == side)
        ax.semilogy(delta[ok], lam[ok], "o", ms=3, color=color, label=f"{side}: A={row['A']:.3g}/s, "
                    f"k={row['k']:.3g}/tick, R²={row['r2']:.3f}")
        if math.isfinite(row["A"]):
            ax.semilogy(delta, row["A"] * np.exp(-row["k"] * delta), "-", lw=1, color=color)
    ax.set_xlabel("δ, ticks from the mid")
    ax.set_ylabel("λ(δ), steps reaching δ per second")
    sigma = next(r["sigma"] for r in c.rows if r["asset"] == asset and r["day"] == day)
    ax.set_title(f"{asset} {day}: step {c.step:g} s, σ = {sigma:.3g} ticks/√s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(c: Calibration, out: Path) -> list[Path]:
    """calibration.parquet/.csv, one PNG per asset and day, and params.yaml (pooled, all days, per asset)."""
    import polars as pl
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    table = pl.DataFrame(c.rows)
    written = [out / "calibration.parquet", out / "calibration.csv"]
    table.write_parquet(written[0])
    table.write_csv(written[1])
    for asset, day in c.measures:
        path = out / f"fit_{asset.replace('/', '_')}_{day}.png"
        plot(c, asset, day, path)
        written.append(path)
    lines = [f"# quotelab calibrate, step {c.step:g} s, λ(δ) fitted at δ = 0.5..{c.max_ticks} ticks; paste an",
             "# asset's block under quoter.params of an avellaneda_stoikov or glft strategy (k, volatility;",
             "# arrival_rate is glft's A)."]
    for asset in dict.fromkeys(a for a, _ in c.measures):
        row = next(r for r in c.rows if r["asset"] == asset and r["day"] == "all" and r["side"] == "pooled")
        lines.append(f"# {asset}: pooled fit over {row['steps']:,} steps, R² {row['r2']:.3f} on {row['points']} "
                     f"points")
        lines.append(yaml.safe_dump({asset: c.params_block(asset)}, sort_keys=False).rstrip())
    written.append(out / "params.yaml")
    written[-1].write_text("\n".join(lines) + "\n")
    return written
