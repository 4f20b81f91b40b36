"""A run's PnL, split into spread capture, inventory, fees and funding, per record step and per UTC day;
and its figures in one currency.

With equity ``E = s·(balance − s·F) + V(q, m) − fee + F`` (``s = 1, V = q·m·c`` linear; ``s = −1,
V = −q·c/m`` inverse; ``F`` the funding received so far, which the recorded balance already holds)
and records ``i−1 → i``:

* spread capture ``s·Δbalance − ΔF + V(q_i, m_{i−1}) − V(q_{i−1}, m_{i−1})``: the trades valued at the
  mid quoted against;
* inventory ``V(q_i, m_i) − V(q_i, m_{i−1})``: the held position marked to the mid's move;
* fees ``−Δfee`` (rebates are positive); funding ``ΔF``.

They telescope to ``E_end − E_start``. The series opens with the empty account and is closed with the
run's final state, so their sum is the final equity.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from quotelab.timeunits import DAY_NS

_QUOTES = ("USDT", "USDC", "BUSD", "FDUSD", "USD")


def ffill(x: np.ndarray) -> np.ndarray:
    """``x`` with each non-finite value replaced by the last finite one before it (the first finite one
    before any): a mid series has gaps where the book was one-sided."""
    x = np.asarray(x, dtype=float).copy()
    ok = np.isfinite(x)
    if not ok.any():
        return x
    idx = np.where(ok, np.arange(len(x)), 0)
    np.maximum.accumulate(idx, out=idx)
    x = x[idx]
    x[:int(np.argmax(ok))] = x[int(np.argmax(ok))]
    return x


def parts(ts: np.ndarray, frame: dict[str, np.ndarray], final: dict[str, Any], inverse: bool, cs: float
          ) -> dict[str, np.ndarray]:
    """Per step (``t``: its end time): spread, inventory, fees, funding; ``q``, volume and trades at its end.
    ``frame`` holds mid, position, balance, fee and optionally funding, trading_volume, num_trades."""
    n = len(ts)
    s = -1.0 if inverse else 1.0

    def col(name: str) -> np.ndarray:
        return np.asarray(frame[name], float) if name in frame else np.zeros(n)

    def value(q: np.ndarray, m: np.ndarray) -> np.ndarray:
        return -q * cs / m if inverse else q * m * cs

    mid = ffill(frame["mid"])
    keys = ("position", "balance", "fee", "funding", "trading_volume", "num_trades")
    closing = all(isinstance(final.get(k), int | float) for k in ("position", "balance", "fee")) and \
        math.isfinite(float(final.get("last_mid") or np.nan))
    cols = {}
    for k in keys:
        tail = [float(final.get(k) or 0.0)] if closing else []
        cols[k] = np.concatenate([[0.0], col(k), tail])
    m = np.concatenate([[mid[0] if n else np.nan], mid, [float(final["last_mid"])] if closing else []])
    t = np.concatenate([np.asarray(ts, np.int64), [int(ts[-1])] if closing and n else []]).astype(np.int64)
    q, f = cols["position"], cols["funding"]
    return {
        "t": t,
        "spread": s * np.diff(cols["balance"]) - np.diff(f) + value(q[1:], m[:-1]) - value(q[:-1], m[:-1]),
        "inventory": value(q[1:], m[1:]) - value(q[1:], m[:-1]),
        "fees": -np.diff(cols["fee"]),
        "funding": np.diff(f),
        "q": q[1:],
        "volume": np.diff(cols["trading_volume"]),
        "trades": np.diff(cols["num_trades"]),
    }


def per_day(p: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The per-UTC-day table: PnL and its parts, volume, trades, max |position|."""
    out = []
    day = p["t"] // DAY_NS
    for d in np.unique(day):
        k = day == d
        row: dict[str, Any] = {"day": time.strftime("%Y-%m-%d", time.gmtime(int(d) * 86_400))}
        for name in ("spread", "inventory", "fees", "funding"):
            row[name] = float(np.nansum(p[name][k]))
        row["pnl"] = row["spread"] + row["inventory"] + row["fees"] + row["funding"]
        row["volume"] = float(np.nansum(p["volume"][k]))
        row["trades"] = int(round(float(np.nansum(p["trades"][k]))))
        row["max_abs_position"] = float(np.nanmax(np.abs(p["q"][k]))) if k.any() else 0.0
        out.append(row)
    return out


def currency(symbol: str, inverse: bool, venue: str = "") -> str:
    """The unit of a run's PnL: the coin for an inverse contract (BTCUSD_PERP: BTC), else the quote
    currency the symbol ends with (USD for the synthetic market and symbols quotelab cannot split)."""
    s = symbol.upper().replace("-", "").replace("_PERP", "").replace("SWAP", "")
    if inverse:
        for quote in _QUOTES:
            if s.endswith(quote) and len(s) > len(quote):
                return s[: -len(quote)]
        return "coin"
    for quote in _QUOTES:
        if s.endswith(quote):
            return quote
    return "USD"


def in_usd(pnl: float, unit: str, inverse: bool, mark: float) -> tuple[float, str]:
    """PnL in USD and how it was converted: coin at the final mark; USD stablecoins at par."""
    if inverse:
        return pnl * mark, f"{unit} × final mark {mark:g}"
    return pnl, "at par" if unit != "USD" else "USD"
