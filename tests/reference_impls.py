"""Slow, obvious re-implementations of the built-in parts, written from their formulas.

They share no code with the kernels: numpy/pandas over the views the replayer recorded (the book
as a strategy saw it) and over the raw trade rows of the event files. Also the data the plugin tests
run on, by market key: the real captures (converted once per machine into the quotelab cache) and a
seeded synthetic market (generated once per session), which needs no real data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from hftbacktest.types import BUY_EVENT, LOCAL_EVENT, TRADE_EVENT

from quotelab import layout as L
from quotelab.data import catalog as cat
from quotelab.data import synth
from quotelab.data.assets import Asset

# (folder, file stem(s), tick, lot, contract size, inverse)
INSTRUMENTS: dict[str, tuple[str, tuple[str, ...], float, float, float, bool]] = {
    "usdm_btc": ("usdm", ("btcusdt_20240808",), 0.1, 0.001, 1.0, False),
    "usdm_eth": ("usdm", ("ethusdt_20240808",), 0.01, 0.001, 1.0, False),
    "cm_btc": ("cm", ("btcusd_perp_20240808",), 0.1, 1.0, 100.0, True),
    "cm_eth": ("cm", ("ethusd_perp_20240808",), 0.01, 1.0, 10.0, True),
}


def _cache() -> Path:
    root = Path(os.environ.get("QUOTELAB_CACHE", Path.home() / ".cache" / "quotelab")) / "test_data"
    root.mkdir(parents=True, exist_ok=True)
    return root


@cache
def npz_file(shared_data: Path, key: str) -> Path:
    """The hftbacktest npz of a shared capture (converted on first use, then reused)."""
    from hftbacktest.data.utils import binancefutures

    folder, stems, *_ = INSTRUMENTS[key]
    out = _cache() / f"{key}.npz"
    if not out.exists():
        arrays = [binancefutures.convert(str(shared_data / "binance" / folder / f"{s}.gz"), buffer_size=3_000_000)
                  for s in stems]
        tmp = out.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, data=np.concatenate(arrays))
        os.replace(tmp, out)
    return out


# hftbacktest has no spot converter: spot goes through quotelab's (the day that overlaps USD-M).
SPOT: dict[str, str] = {"spot_btc": "BTCUSDT", "spot_eth": "ETHUSDT"}


def _spot_catalog(shared_data: Path, key: str) -> Path:
    root = _cache() / "catalog"
    symbol = SPOT[key]
    if not cat.day_path(root, "binance-spot", symbol, "20240808").exists():
        files = [str(shared_data / "binance" / "spot" / f"{symbol.lower()}_{d}.gz") for d in ("20240808", "20240809")]
        subprocess.run([sys.executable, "-m", "quotelab.cli", "convert", "--format", "binance-spot", "--symbol",
                        symbol, "--catalog", str(root), *files], check=True, capture_output=True, text=True)
    return root


# The synthetic market's keys (its perp leads its spot): catalog symbols of quotelab.data.synth.
SYNTHETIC: dict[str, str] = {"synth_perp": "SYNPERP", "synth_spot": "SYNSPOT"}


@dataclass(frozen=True)
class Markets:
    """Where the market keys' data is: ``shared()`` gives the real captures' folder (or skips the test,
    fails it under CI, when they are missing); ``synthetic`` is a catalog holding the synthetic market."""

    shared: Callable[[], Path]
    synthetic: Path


def is_real(key: str) -> bool:
    return key not in SYNTHETIC


@cache
def _real_events(shared_data: Path, key: str) -> np.ndarray:
    if key in SPOT:
        return cat.load_day(_spot_catalog(shared_data, key), "binance-spot", SPOT[key], "20240808")
    with np.load(npz_file(shared_data, key)) as z:
        return z["data"]


@cache
def _synthetic_events(root: Path, key: str) -> np.ndarray:
    days = cat.list_days(root, synth.VENUE, SYNTHETIC[key])
    return np.concatenate([cat.load_day(root, synth.VENUE, SYNTHETIC[key], d) for d in days])


def events(markets: Markets, key: str) -> np.ndarray:
    if key in SYNTHETIC:
        return _synthetic_events(markets.synthetic, key)
    return _real_events(markets.shared(), key)


def yaml_variant(source: Path, tmp_path: Path, catalog: Path, **changes) -> Path:
    """A copy of the YAML at ``source`` reading ``catalog``, with top-level keys replaced by ``changes``."""
    import yaml

    doc = yaml.safe_load(source.read_text())
    doc["data"]["catalog"] = str(catalog)
    doc.update(changes)
    out = tmp_path / source.name
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def asset(markets: Markets, key: str, name: str | None = None) -> Asset:
    if key in SYNTHETIC:
        meta = cat.read_meta(markets.synthetic, synth.VENUE, SYNTHETIC[key])
        return Asset(name=name or key, events=[events(markets, key)], tick_size=meta["tick_size"],
                           lot_size=meta["lot_size"])
    if key in SPOT:
        meta = cat.read_meta(_spot_catalog(markets.shared(), key), "binance-spot", SPOT[key])
        return Asset(name=name or key, events=[events(markets, key)], tick_size=meta["tick_size"],
                           lot_size=meta["lot_size"])
    _, _, tick, lot, size, inverse = INSTRUMENTS[key]
    return Asset(name=name or key, events=[events(markets, key)], tick_size=tick, lot_size=lot,
                       contract_size=size, inverse=inverse)


# ------------------------------------------------------------------------------------------------
# Book-derived quantities, from a recorded view column of one asset
# ------------------------------------------------------------------------------------------------


def mids(views: np.ndarray, a: int) -> np.ndarray:
    return (views[:, a, L.BEST_BID] + views[:, a, L.BEST_ASK]) / 2.0


def level_imbalance(views: np.ndarray, a: int, level: int) -> np.ndarray:
    qb = views[:, a, L.BID_SZ + level]
    qa = views[:, a, L.ASK_SZ + level]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(qb + qa > 0, (qb - qa) / (qb + qa), 0.0)


def imbalance_mid(views: np.ndarray, a: int, f) -> np.ndarray:
    """mid + spread · f(I), I the top-of-book imbalance."""
    bid, ask = views[:, a, L.BEST_BID], views[:, a, L.BEST_ASK]
    return (bid + ask) / 2.0 + (ask - bid) * f(level_imbalance(views, a, 0))


SEED_SHAPES = {
    "linear": lambda i: i / 2.0,
    "cubic": lambda i: i ** 3 / 2.0,
    "nonic": lambda i: i * (i ** 8 + 1.0) / 4.0,
    "cubic_linear": lambda i: i * (i ** 2 + 1.0) / 4.0,
    "shifted": lambda i: (i + 0.3) * (i ** 4 + 0.7) / 3.8,
}


def local_trades(ev: np.ndarray) -> pd.DataFrame:
    """The trade rows a strategy receives, in arrival order, with side +1 buyer-initiated."""
    rows = ev[((ev["ev"] & LOCAL_EVENT) == LOCAL_EVENT) & ((ev["ev"] & 0xFF) == TRADE_EVENT)]
    rows = rows[np.argsort(rows["local_ts"], kind="stable")]
    return pd.DataFrame({
        "local_ts": rows["local_ts"], "exch_ts": rows["exch_ts"], "px": rows["px"], "qty": rows["qty"],
        "side": np.where((rows["ev"] & BUY_EVENT) == BUY_EVENT, 1.0, -1.0),
    })


def multi_level_imbalance(views: np.ndarray, a: int, weights) -> np.ndarray:
    return sum(w * level_imbalance(views, a, i) for i, w in enumerate(weights))


def time_ewma(x: np.ndarray, dt: np.ndarray, half_life: float) -> np.ndarray:
    """EWMA over time: the first value starts it, then each step moves by 1 - 2^(-dt/half_life)."""
    out = np.empty(len(x))
    for i in range(len(x)):
        out[i] = x[i] if i == 0 else out[i - 1] + (1 - 0.5 ** (dt[i] / half_life)) * (x[i] - out[i - 1])
    return out


def trade_flow(trades: pd.DataFrame, step_ts: np.ndarray, alpha: float, buy_side: float,
               adjust: bool = False) -> pd.DataFrame:
    """Per-side EWMAs as of each step (trades that arrived by then), with OI, QI, VI and the rate.

    ``buy_side`` +1: buyer-initiated trades are buys; -1: seller-initiated ones are. ``adjust``: pandas'
    adjusted EWMA instead of the recursive one.
    """
    cols = {}
    for name, sign in (("b", buy_side), ("s", -buy_side)):
        side = trades[trades["side"] == sign].copy()
        side["interval"] = side["exch_ts"].diff() / 1e9
        side["i_ewma"] = side["interval"].dropna().ewm(alpha=alpha, adjust=adjust).mean()
        side["q_ewma"] = side["qty"].ewm(alpha=alpha, adjust=adjust).mean()
        side = side[["local_ts", "i_ewma", "q_ewma"]].ffill()
        at = pd.merge_asof(pd.DataFrame({"local_ts": step_ts}), side, on="local_ts", direction="backward")
        cols[f"i_{name}"] = at["i_ewma"].to_numpy()
        cols[f"q_{name}"] = at["q_ewma"].to_numpy()
    df = pd.DataFrame(cols)
    lb, ls = 1 / df["i_b"], 1 / df["i_s"]
    ready = (df["i_b"] > 0) & (df["i_s"] > 0)
    df["OI"] = np.where(ready, (lb - ls) / (lb + ls), 0.0)
    df["QI"] = np.where(ready, (df["q_b"] - df["q_s"]) / (df["q_b"] + df["q_s"]), 0.0)
    df["VI"] = np.where(ready, (lb * df["q_b"] - ls * df["q_s"]) / (lb * df["q_b"] + ls * df["q_s"]), 0.0)
    df["arrival_rate"] = np.where(ready, lb + ls, 0.0)
    return df


def ofi(views: np.ndarray, a: int, weights, window: int, depth_scaled: bool) -> np.ndarray:
    """Cont-Kukanov-Stoikov OFI from the recorded book, summed over a rolling window of steps."""
    e = np.zeros(len(views))
    depth = np.zeros(len(views))
    for i, w in enumerate(weights):
        pb, qb = views[:, a, L.BID_PX + i], views[:, a, L.BID_SZ + i]
        pa, qa = views[:, a, L.ASK_PX + i], views[:, a, L.ASK_SZ + i]
        with np.errstate(invalid="ignore"):
            ei = (np.where(pb[1:] >= pb[:-1], qb[1:], 0.0) - np.where(pb[1:] <= pb[:-1], qb[:-1], 0.0)
                  - np.where(pa[1:] <= pa[:-1], qa[1:], 0.0) + np.where(pa[1:] >= pa[:-1], qa[:-1], 0.0))
        e[1:] += w * ei
        depth += (qb + qa) / 2.0
    depth /= len(weights)
    total = pd.Series(e[1:]).rolling(window, min_periods=1).sum().to_numpy()
    if depth_scaled:
        mean_depth = pd.Series(depth[1:]).rolling(window, min_periods=1).mean().to_numpy()
        total = np.where(mean_depth > 0, total / mean_depth, 0.0)
    return np.concatenate([[0.0], total])


def ewma_sigma_ticks(mid: np.ndarray, dt: np.ndarray, tick: float, prior_ticks: float, half_life: float) -> np.ndarray:
    """σ in ticks/√s: EWMA over time of (Δmid)²/Δt starting from the prior, as of each step."""
    var = (prior_ticks * tick) ** 2
    out = np.empty(len(mid))
    for i in range(len(mid)):
        if i > 0 and dt[i] > 0:
            var += (1 - 0.5 ** (dt[i] / half_life)) * ((mid[i] - mid[i - 1]) ** 2 / dt[i] - var)
        out[i] = np.sqrt(var) / tick
    return out


def volume_rate_imbalance(trades: pd.DataFrame, step_ts: np.ndarray, step_seconds: np.ndarray, alpha: float,
                          buy_side: float, prev_grid_ts: int) -> np.ndarray:
    """Per side, EWMA over steps of the step's traded volume per second; then (Rb - Rs)/(Rb + Rs).

    A step of zero duration (the first) has no rate and leaves the EWMAs as they are.
    """
    edges = np.concatenate([[prev_grid_ts], step_ts])
    step = np.searchsorted(edges, trades["local_ts"].to_numpy(), side="left") - 1
    inside = (step >= 0) & (step < len(step_ts))
    t = trades[inside].assign(step=step[inside])
    vol = {s: np.bincount(t["step"][t["side"] == s], weights=t["qty"][t["side"] == s], minlength=len(step_ts))
           for s in (1.0, -1.0)}
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = {s: pd.Series(np.where(step_seconds > 0, vol[s] / step_seconds, np.nan)) for s in vol}
    rb = rates[buy_side].ewm(alpha=alpha, adjust=False, ignore_na=True).mean().to_numpy()
    rs = rates[-buy_side].ewm(alpha=alpha, adjust=False, ignore_na=True).mean().to_numpy()
    with np.errstate(invalid="ignore"):
        return np.where(rb + rs > 0, (rb - rs) / (rb + rs), 0.0)


def arrival_depths(trades: pd.DataFrame, step_ts: np.ndarray, mid_ticks: np.ndarray, tick: float,
                   prev_grid_ts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per step, the deepest buy and sell trade past the previous step's mid, in half ticks (-1: none)."""
    edges = np.concatenate([[prev_grid_ts], step_ts])
    step = np.searchsorted(edges, trades["local_ts"].to_numpy(), side="left") - 1
    inside = (step >= 1) & (step < len(step_ts))  # step 0 has no previous mid
    t = trades[inside].assign(step=step[inside])
    t["dist"] = t["side"] * (t["px"] / tick - mid_ticks[t["step"].to_numpy() - 1])
    out = []
    for sign in (1.0, -1.0):
        deepest = t[t["side"] == sign].groupby("step")["dist"].max()
        h = np.full(len(step_ts), -1.0)
        h[deepest.index.to_numpy()] = np.round(2 * deepest.to_numpy())
        out.append(h)
    return out[0], out[1]


def log_linear_fit(depth_h: np.ndarray, n_ticks: int, seconds: float) -> tuple[float, float, float, int]:
    """A, k, R², points of ln λ(δ) = ln A - k δ, λ(δ) = #(depth > δ)/seconds at δ = 0.5, 1, ..., n_ticks."""
    j = np.arange(1, 2 * n_ticks + 1)
    counts = (depth_h[:, None] > j[None, :]).sum(axis=0)
    ok = counts > 0
    if ok.sum() < 2:
        return np.nan, np.nan, np.nan, int(ok.sum())
    x, y = j[ok] / 2, np.log(counts[ok] / seconds)
    if len(set(counts[ok])) == 1:
        return float(counts[ok][0] / seconds), 0.0, np.nan, int(ok.sum())
    slope, intercept = np.polyfit(x, y, 1)
    r2 = np.corrcoef(x, y)[0, 1] ** 2
    return float(np.exp(intercept)), float(-slope), float(r2), int(ok.sum())


def arrival_fit(trades: pd.DataFrame, step_ts: np.ndarray, mid: np.ndarray, step_seconds: np.ndarray, tick: float,
                window: int, n_ticks: int, prev_grid_ts: int) -> tuple[np.ndarray, np.ndarray]:
    """A and k of λ(δ) = A exp(-k δ) fitted at each step over the window's arrival depths (both sides)."""
    hb, hs = arrival_depths(trades, step_ts, mid / tick, tick, prev_grid_ts)
    depth = np.maximum(hb, hs)
    big_a, k = np.full(len(step_ts), np.nan), np.full(len(step_ts), np.nan)
    for i in range(len(step_ts)):
        if not step_seconds[i] > 0:
            continue
        recent = depth[max(0, i - window + 1): i + 1]
        big_a[i], k[i], _, _ = log_linear_fit(recent, n_ticks, len(recent) * step_seconds[i])
    return big_a, k
