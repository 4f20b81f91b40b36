"""Slow, obvious re-implementations of the built-in parts, written from their formulas.

They share no code with the kernels: numpy/pandas over the views the replayer recorded (the book
as a strategy saw it) and over the raw trade rows of the event files. Also the shared-data
helpers the plugin tests use (converted once per machine into the quotelab cache).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from hftbacktest.types import BUY_EVENT, LOCAL_EVENT, TRADE_EVENT

from quotelab import layout as L
from quotelab.replay import ReplayAsset

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


@cache
def events(shared_data: Path, key: str) -> np.ndarray:
    with np.load(npz_file(shared_data, key)) as z:
        return z["data"]


def asset(shared_data: Path, key: str, name: str | None = None) -> ReplayAsset:
    _, _, tick, lot, size, inverse = INSTRUMENTS[key]
    return ReplayAsset(name=name or key, events=[events(shared_data, key)], tick_size=tick, lot_size=lot,
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
