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


def trades_frame(rows: np.ndarray, unit_ns: int = 1_000_000, clock: str = "exch_ts") -> pd.DataFrame:
    """Binance's aggTrade columns the seed read: transact_time (ms; ``unit_ns=1`` keeps a finer clock's
    nanoseconds; ``clock="local_ts"`` times them by receipt), price, quantity, is_buyer_maker."""
    t = rows[(rows["ev"] & 0xFF) == TRADE_EVENT]
    return pd.DataFrame({
        "transact_time": t[clock] // unit_ns, "price": t["px"], "quantity": t["qty"],
        "is_buyer_maker": (t["ev"] & BUY_EVENT) != BUY_EVENT,
    })


def book_frame(rows: np.ndarray, tick: float, lot: float, clock: str = "exch_ts", unit_ns: int = 1_000_000
               ) -> pd.DataFrame:
    """bid_k_price/bid_k_quantity/ask_k_* (k = 0..LEVELS-1) after each timestamp's depth rows (``clock``)."""
    bids: dict[int, float] = {}
    asks: dict[int, float] = {}
    out = []
    kinds = rows["ev"] & 0xFF
    is_book = (kinds == DEPTH_EVENT) | (kinds == DEPTH_SNAPSHOT_EVENT) | (kinds == DEPTH_CLEAR_EVENT)
    r = rows[is_book]
    kinds = kinds[is_book]
    ts = r[clock]
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
        row = {"transact_time": ts[i] // unit_ns}
        for name, side, pick in (("bid", bids, heapq.nlargest), ("ask", asks, heapq.nsmallest)):
            top = pick(LEVELS, side)
            for k in range(LEVELS):
                row[f"{name}_{k}_price"] = top[k] * tick if k < len(top) else np.nan
                row[f"{name}_{k}_quantity"] = side[top[k]] if k < len(top) else np.nan  # In[9]: no column
        out.append(row)
    return pd.DataFrame(out)


def estimates(trades: pd.DataFrame, depths: pd.DataFrame, tick: float) -> pd.DataFrame:
    """The seed's columns, one row per aggregated trade, cell by cell (In[4], In[15]-In[31]).

    Kept as the cells have it: NaN wherever pandas gives it (0/0 on an empty level, a side's EWMAs
    before its second trade, the shifted VI), ``ewm(alpha=alpha)`` with pandas' default adjust=True.
    ``round(ask - bid, 4)`` rounded to the seed's 4 decimals of its 0.0001 tick: here the tick's decimals.
    """
    trades = trades.groupby(["transact_time", "is_buyer_maker"]).agg(
        {"price": "first", "quantity": "sum"}).reset_index()
    df = pd.merge_asof(trades, depths, on="transact_time", direction="backward")
    # In[17]
    df["spread"] = round(df["ask_0_price"] - df["bid_0_price"], max(0, -int(np.floor(np.log10(tick) + 1e-9))))
    df["mid_price"] = (df["bid_0_price"] + df["ask_0_price"]) / 2
    df["I"] = (df["bid_0_quantity"] - df["ask_0_quantity"]) / (df["bid_0_quantity"] + df["ask_0_quantity"])
    df["weight_mid_price"] = df["mid_price"] + df["spread"] * df["I"] / 2
    df["adjust_mid_price"] = df["mid_price"] + df["spread"] * (df["I"]) * (df["I"] ** 8 + 1) / 4
    df["adjust_mid_price_2"] = df["mid_price"] + df["spread"] * df["I"] * (df["I"] ** 2 + 1) / 4
    df["adjust_mid_price_3"] = df["mid_price"] + df["spread"] * df["I"] ** 3 / 2
    df["adjust_mid_price_4"] = df["mid_price"] + df["spread"] * (df["I"] + 0.3) * (df["I"] ** 4 + 0.7) / 3.8
    # In[19]
    df["I_2"] = (df["bid_1_quantity"] - df["ask_1_quantity"]) / (df["bid_1_quantity"] + df["ask_1_quantity"])
    df["I_3"] = (df["bid_2_quantity"] - df["ask_2_quantity"]) / (df["bid_2_quantity"] + df["ask_2_quantity"])
    # In[20]
    df["adjust_mid_price_5"] = df["mid_price"] + df["spread"] * (0.7 * df["I"] + 0.3 * df["I_2"]) / 2
    df["adjust_mid_price_6"] = df["mid_price"] + df["spread"] * (0.7 * df["I"] + 0.3 * df["I_2"]) ** 3 / 2
    df["adjust_mid_price_7"] = df["mid_price"] + df["spread"] * (0.7 * df["I"] + 0.3 * df["I_2"] + 0.3) * (
        (0.7 * df["I"] + 0.3 * df["I_2"]) ** 4 + 0.7) / 3.8
    df["adjust_mid_price_8"] = df["mid_price"] + df["spread"] * (
        0.7 * df["I"] + 0.2 * df["I_2"] + 0.1 * df["I_3"] + 0.3) * (
        (0.7 * df["I"] + 0.3 * df["I_2"] + 0.1 * df["I_3"]) ** 4 + 0.7) / 3.8
    # In[22]-In[25]; "buy" is is_buyer_maker == True, as in the seed: the seller-initiated trades
    alpha = ALPHA
    buy, sell = df["is_buyer_maker"] == True, df["is_buyer_maker"] == False  # noqa: E712 (the seed's test)
    for col in ("avg_buy_interval", "avg_sell_interval", "avg_buy_quantity", "avg_sell_quantity"):
        df[col] = np.nan
    df.loc[buy, "avg_buy_interval"] = df[buy]["transact_time"].diff().ewm(alpha=alpha).mean()
    df.loc[sell, "avg_sell_interval"] = df[sell]["transact_time"].diff().ewm(alpha=alpha).mean()
    df.loc[buy, "avg_buy_quantity"] = df[buy]["quantity"].ewm(alpha=alpha).mean()
    df.loc[sell, "avg_sell_quantity"] = df[sell]["quantity"].ewm(alpha=alpha).mean()
    for col in ("avg_buy_quantity", "avg_sell_quantity", "avg_buy_interval", "avg_sell_interval"):
        df[col] = df[col].ffill()
    df["avg_buy_rate"] = 1000 / df["avg_buy_interval"]
    df["avg_sell_rate"] = 1000 / df["avg_sell_interval"]
    df["avg_buy_volume"] = df["avg_buy_rate"] * df["avg_buy_quantity"]
    df["avg_sell_volume"] = df["avg_sell_rate"] * df["avg_sell_quantity"]
    # In[26]
    df["OI"] = (df["avg_buy_rate"] - df["avg_sell_rate"]) / (df["avg_buy_rate"] + df["avg_sell_rate"])
    df["VI"] = (df["avg_buy_volume"] - df["avg_sell_volume"]) / (df["avg_buy_volume"] + df["avg_sell_volume"])
    # In[28]: the first adjust_mid_price is kept under its name; the redefinition gets its own column
    df["adjust_mid_price@In28"] = df["mid_price"] + df["spread"] * df["I"] / 2
    df["adjust_mid_price_9"] = df["mid_price"] + df["spread"] * (-df["OI"]) * 2
    df["adjust_mid_price_10"] = df["mid_price"] + df["spread"] * (-df["VI"]) * 1.4
    # In[30]-In[31]
    df["CI"] = -1.5 * df["VI"].shift() + 0.7 * (0.7 * df["I"] + 0.2 * df["I_2"] + 0.1 * df["I_3"]) ** 3
    df["adjust_mid_price_11"] = df["mid_price"] + df["spread"] * (df["CI"])
    return df


ESTIMATORS = ["mid_price", "weight_mid_price", "adjust_mid_price", *(f"adjust_mid_price_{k}" for k in range(2, 12)),
              "adjust_mid_price@In28"]


def study_table(trades: pd.DataFrame, depths: pd.DataFrame, tick: float) -> pd.DataFrame:
    """Per estimator: the sum and mean of (price - estimate)², trades scored and trades left out."""
    df = estimates(trades, depths, tick)
    rows = []
    for name in ESTIMATORS:
        sq = (df["price"] - df[name]) ** 2
        rows.append({"estimator": name, "sse": sq.sum(), "mse": sq.mean(), "n": int(sq.notna().sum()),
                     "n_undefined": int(sq.isna().sum())})
    return pd.DataFrame(rows).set_index("estimator")
