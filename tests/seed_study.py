"""The seed's mid-price study written the straightforward pandas way, from its procedure, not from the kernels.

Used by tests/test_midprice_study.py (the table must equal ``quotelab evaluate
strategies/midprice_study.yaml``) and by bench/evaluate.py (the pandas anchor). Inputs are what the
seed had: a trades frame and a top-of-book frame (one row per depth update, the top levels after
it), here both taken from the catalog's exchange-side rows. The book frame comes from a plain dict
book, so it shares nothing with quotelab's replay either.
"""

from __future__ import annotations

import heapq

import numpy as np
import pandas as pd
from hftbacktest.types import (
    BUY_EVENT,
    DEPTH_CLEAR_EVENT,
    DEPTH_EVENT,
    DEPTH_SNAPSHOT_EVENT,
    EXCH_EVENT,
    TRADE_EVENT,
)

LEVELS = 3
ALPHA = 0.1  # the seed's EWMA weight


def exchange_rows(days: list[np.ndarray]) -> np.ndarray:
    ev = np.concatenate(days)
    rows = ev[(ev["ev"] & EXCH_EVENT) == EXCH_EVENT]
    return rows[np.argsort(rows["exch_ts"], kind="stable")]


def trades_frame(rows: np.ndarray, unit_ns: int = 1_000_000) -> pd.DataFrame:
    """Binance's aggTrade columns the seed read: transact_time (ms; ``unit_ns=1`` keeps a finer clock's
    nanoseconds), price, quantity, is_buyer_maker."""
    t = rows[(rows["ev"] & 0xFF) == TRADE_EVENT]
    return pd.DataFrame({
        "transact_time": t["exch_ts"] // unit_ns, "price": t["px"], "quantity": t["qty"],
        "is_buyer_maker": (t["ev"] & BUY_EVENT) != BUY_EVENT,
    })


def book_frame(rows: np.ndarray, tick: float, lot: float) -> pd.DataFrame:
    """bid_k_price/bid_k_quantity/ask_k_* (k = 0..LEVELS-1) after each exchange timestamp's depth rows."""
    bids: dict[int, float] = {}
    asks: dict[int, float] = {}
    out = []
    kinds = rows["ev"] & 0xFF
    is_book = (kinds == DEPTH_EVENT) | (kinds == DEPTH_SNAPSHOT_EVENT) | (kinds == DEPTH_CLEAR_EVENT)
    r = rows[is_book]
    kinds = kinds[is_book]
    ts = r["exch_ts"]
    for i in range(len(r)):
        book = bids if (r["ev"][i] & BUY_EVENT) == BUY_EVENT else asks
        t = round(r["px"][i] / tick)
        if kinds[i] == DEPTH_CLEAR_EVENT:  # a side cleared from its best down to (and including) px
            for k in [k for k in book if (k >= t if book is bids else k <= t)]:
                del book[k]
        elif round(r["qty"][i] / lot) > 0:
            book[t] = r["qty"][i]
        else:
            book.pop(t, None)
        if i + 1 < len(r) and ts[i + 1] == ts[i]:
            continue
        row = {"transact_time": ts[i] // 1_000_000}
        for name, side, pick in (("bid", bids, heapq.nlargest), ("ask", asks, heapq.nsmallest)):
            top = pick(LEVELS, side)
            for k in range(LEVELS):
                row[f"{name}_{k}_price"] = top[k] * tick if k < len(top) else np.nan
                row[f"{name}_{k}_quantity"] = side[top[k]] if k < len(top) else 0.0
        out.append(row)
    return pd.DataFrame(out)


def _side_ewm(df: pd.DataFrame, col: str, buy: bool, diff: bool) -> pd.Series:
    # The EWMA runs over that side's own trades only, then is forward-filled over all rows.
    side = df[df["is_buyer_maker"] == buy]
    x = side["transact_time"].diff() if diff else side[col]
    return x.ewm(alpha=ALPHA, adjust=False).mean().reindex(df.index).ffill()


def estimates(trades: pd.DataFrame, depths: pd.DataFrame) -> pd.DataFrame:
    """The seed's columns, one row per aggregated trade."""
    trades = trades.groupby(["transact_time", "is_buyer_maker"]).agg(
        {"price": "first", "quantity": "sum"}).reset_index()
    df = pd.merge_asof(trades, depths, on="transact_time", direction="backward")
    df["mid_price"] = (df["bid_0_price"] + df["ask_0_price"]) / 2
    df["spread"] = df["ask_0_price"] - df["bid_0_price"]
    for k in range(LEVELS):
        qb, qa = df[f"bid_{k}_quantity"], df[f"ask_{k}_quantity"]
        df[f"I_{k + 1}"] = ((qb - qa) / (qb + qa)).where(qb + qa > 0, 0.0)
    mid, spread, i1 = df["mid_price"], df["spread"], df["I_1"]
    book = 0.7 * df["I_1"] + 0.2 * df["I_2"] + 0.1 * df["I_3"]
    df["weight_mid_price"] = mid + spread * i1 / 2
    df["adjust_mid_price"] = mid + spread * i1 * (i1 ** 8 + 1) / 4
    df["adjust_mid_price_2"] = mid + spread * i1 * (i1 ** 2 + 1) / 4
    df["adjust_mid_price_3"] = mid + spread * i1 ** 3 / 2
    df["adjust_mid_price_4"] = mid + spread * (i1 + 0.3) * (i1 ** 4 + 0.7) / 3.8
    df["adjust_mid_price_5"] = mid + spread * book / 2
    df["adjust_mid_price_6"] = mid + spread * book ** 3 / 2
    df["adjust_mid_price_7"] = mid + spread * (book + 0.3) * (book ** 4 + 0.7) / 3.8
    other = 0.6 * df["I_1"] + 0.3 * df["I_2"] + 0.1 * df["I_3"]
    df["adjust_mid_price_8"] = mid + spread * book * (other ** 8 + 1) / 4
    # "buy" is is_buyer_maker == True, as in the seed: the seller-initiated trades.
    interval_b, interval_s = _side_ewm(df, "", True, True), _side_ewm(df, "", False, True)
    qty_b, qty_s = _side_ewm(df, "quantity", True, False), _side_ewm(df, "quantity", False, False)
    lam_b, lam_s = 1 / interval_b, 1 / interval_s
    df["OI"] = (lam_b - lam_s) / (lam_b + lam_s)
    df["VI"] = (lam_b * qty_b - lam_s * qty_s) / (lam_b * qty_b + lam_s * qty_s)
    df["CI"] = -1.5 * df["VI"].shift() + 0.7 * book ** 3
    df["adjust_mid_price_9"] = mid - 2 * spread * df["OI"]
    df["adjust_mid_price_10"] = mid - 1.4 * spread * df["VI"]
    df["adjust_mid_price_11"] = mid + spread * df["CI"]
    df["adjust_mid_price@In28"] = mid + spread * book * (book ** 8 + 1) / 4
    return df


ESTIMATORS = ["mid_price", "weight_mid_price", "adjust_mid_price", *(f"adjust_mid_price_{k}" for k in range(2, 12)),
              "adjust_mid_price@In28"]


def study_table(trades: pd.DataFrame, depths: pd.DataFrame) -> pd.DataFrame:
    """Per estimator: the sum and mean of (price - estimate)², trades scored and trades left out."""
    df = estimates(trades, depths)
    rows = []
    for name in ESTIMATORS:
        sq = (df["price"] - df[name]) ** 2
        rows.append({"estimator": name, "sse": sq.sum(), "mse": sq.mean(), "n": int(sq.notna().sum()),
                     "n_undefined": int(sq.isna().sum())})
    return pd.DataFrame(rows).set_index("estimator")
