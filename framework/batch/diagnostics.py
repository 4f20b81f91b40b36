"""Market-making diagnostics of one run, from its recorded series (one row per step: mid, position, balance,
fee, quotes): markouts, the PnL split, quote uptime, fill rate by distance and the inventory distribution.

Fills are inferred from position changes between consecutive records, so several fills inside one
step show as one net fill at their average price; a step where both sides filled and the position
did not move shows no fill, and its spread shows up in spread capture all the same.

PnL decomposition (exact, for linear and inverse contracts): spread capture, inventory, fees and
funding, as :mod:`quotelab.backtest.pnl` defines them; they sum to the recorded equity.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from quotelab.backtest import pnl

HORIZONS = {"100ms": 100_000_000, "1s": 1_000_000_000, "10s": 10_000_000_000, "60s": 60_000_000_000}


def equity_series(frame: dict[str, np.ndarray], inst: dict[str, Any]) -> np.ndarray:
    inverse = inst.get("contract") == "inverse"
    cs = float(inst.get("contract_size", 1.0))
    mid = pnl.ffill(frame["mid"])
    q, bal, fee = (np.asarray(frame[k], dtype=float) for k in ("position", "balance", "fee"))
    if inverse:
        return -bal - q * cs / mid - fee
    return bal + q * mid * cs - fee


def diagnostics(ts: np.ndarray, frame: dict[str, np.ndarray], summary: dict[str, Any],
                inst: dict[str, Any]) -> dict[str, Any]:
    """Markouts, PnL split, quote uptime, fill rate by distance and inventory distribution of one run."""
    n = len(ts)
    if n == 0:
        return {"fills": 0}
    inverse = inst.get("contract") == "inverse"
    cs = float(inst.get("contract_size", 1.0))
    tick = float(inst.get("tick_size") or float("nan"))
    s = -1.0 if inverse else 1.0

    ts = np.asarray(ts, dtype=np.int64)
    mid = pnl.ffill(frame["mid"])
    # Close with the final state so the split sums to the recorded equity; open with the empty account.
    final = [summary.get(k) for k in ("position", "balance", "fee")]
    have_final = all(isinstance(v, int | float) for v in final) and math.isfinite(float(summary.get("last_mid")
                                                                                         or np.nan))
    q = np.concatenate([[0.0], np.asarray(frame["position"], float), [final[0]] if have_final else []])
    bal = np.concatenate([[0.0], np.asarray(frame["balance"], float), [final[1]] if have_final else []])
    m = np.concatenate([[mid[0]], mid, [float(summary["last_mid"])] if have_final else []])
    t = np.concatenate([[ts[0]], ts, [ts[-1]] if have_final else []])

    if "funding" in frame:  # the recorded balance holds the funding; fills are read from the trades' part
        fund = np.concatenate([[0.0], np.asarray(frame["funding"], float),
                               [float(summary.get("funding") or 0.0)] if have_final else []])
        bal = bal - s * fund
    dq, dbal = np.diff(q), np.diff(bal)
    split = pnl.parts(ts, frame, summary, inverse, cs)
    out: dict[str, Any] = {f"pnl_{k}": float(np.nansum(split[k])) for k in ("spread", "inventory", "fees", "funding")}
    out["pnl_total"] = out["pnl_spread"] + out["pnl_inventory"] + out["pnl_fees"] + out["pnl_funding"]

    # Fills: net position change per step, at the price the balance change implies.
    idx = np.nonzero(np.abs(dq) > 1e-12)[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        px = -dbal[idx] / (dq[idx] * cs) if not inverse else -dq[idx] * cs / dbal[idx]
    ref = m[idx]
    # A step with fills on both sides implies a price far from the book; those are left out of markouts.
    clean = np.isfinite(px) & (np.abs(px / ref - 1.0) < 0.02)
    f_idx, f_px, f_q = idx[clean], px[clean], dq[idx][clean]
    f_t = t[f_idx + 1]
    side, w = np.sign(f_q), np.abs(f_q)
    out["fills"] = int(len(idx))
    out["fills_ambiguous"] = int((~clean).sum())
    out["filled_qty"] = float(np.abs(dq).sum())
    rec_t, rec_m = ts, mid
    for name, h in {"0": 0, **HORIZONS}.items():
        j = np.searchsorted(rec_t, f_t + h, side="left")
        ok = j < len(rec_t)
        if not ok.any():
            out[f"markout_bps_{name}"] = None
            continue
        mo = side[ok] * (rec_m[j[ok]] - f_px[ok]) / f_px[ok] * 1e4
        out[f"markout_bps_{name}"] = float(np.average(mo, weights=w[ok]))

    bid, ask = np.asarray(frame["bid"], float), np.asarray(frame["ask"], float)
    out["quote_uptime"] = float(np.mean(np.isfinite(bid) & np.isfinite(ask)))
    out["quote_uptime_any"] = float(np.mean(np.isfinite(bid) | np.isfinite(ask)))

    pos = np.asarray(frame["position"], float)
    qs = np.nanquantile(pos, [0.05, 0.25, 0.5, 0.75, 0.95]) if len(pos) else [np.nan] * 5
    out.update({f"inventory_p{p:02d}": float(v) for p, v in zip((5, 25, 50, 75, 95), qs, strict=True)})
    out["inventory_mean_abs"] = float(np.nanmean(np.abs(pos)))
    out["inventory_max_abs"] = float(np.nanmax(np.abs(pos)))
    values, counts = np.unique(np.round(pos, 12), return_counts=True)
    out["inventory_hist"] = {"values": values.tolist(), "share": (counts / counts.sum()).tolist()}

    # Fill rate by quote distance: a quote resting through a step at d ticks from the mid, and whether
    # the position moved its way by the next record. Net fills only, so it is a lower bound per side.
    if math.isfinite(tick) and tick > 0 and n > 1:
        rates: dict[str, list[float]] = {}
        dpos = np.diff(pos)
        for _side, qp, sign in (("bid", bid, 1.0), ("ask", ask, -1.0)):
            d = np.round(sign * (mid[:-1] - qp[:-1]) / tick)
            ok = np.isfinite(d)
            filled = (sign * dpos) > 1e-12
            for dist in np.unique(np.clip(d[ok], -1, 20)).astype(int):
                sel = ok & (np.clip(d, -1, 20) == dist)
                key = str(dist)
                k = rates.setdefault(key, [0.0, 0.0])
                k[0] += float(sel.sum())
                k[1] += float((sel & filled).sum())
        out["fill_rate_by_distance"] = {k: {"quotes": int(v[0]), "fill_rate": v[1] / v[0] if v[0] else None}
                                        for k, v in sorted(rates.items(), key=lambda kv: int(kv[0]))}
    return out
