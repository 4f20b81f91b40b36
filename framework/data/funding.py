"""Perpetual funding: the rows converters keep, and the settlements a backtest charges.

A funding row is one mark-price update of the venue (Binance USD-M/COIN-M ``markPriceUpdate``, a
Tardis ``derivative_ticker`` line, a synthetic one): exchange and local time (ns), mark and index
price, the funding rate announced for the next settlement (a fraction per interval: 0.0001 = 1 bp)
and that settlement's time (ns; 0 when the venue does not say). The catalog keeps them per day beside
the events, in ``<YYYYMMDD>.funding.npy`` (:func:`quotelab.data.catalog.funding_path`), so hftbacktest
never sees them and no event count or replay loop changes.

Settlement (:func:`schedule`, :func:`payment_nb`): at each settlement time ``T`` named by the rows, a
position held at ``T`` pays (a negative amount) or receives

* linear: ``-position * contract_size * mark * rate``, in the quote currency;
* inverse: ``-position * contract_size / mark * rate``, in coin (position in contracts),

where ``rate`` is the last rate for ``T`` announced at an exchange time ``<= T`` and ``mark`` the
last mark at or before ``T``: what the venue knows at ``T``, never a later row. So a long pays when
the rate is positive, as on every venue.
"""

from __future__ import annotations

import numpy as np
from numba import njit

funding_dtype = np.dtype([("exch_ts", "i8"), ("local_ts", "i8"), ("mark", "f8"), ("index", "f8"),
                          ("rate", "f8"), ("next_ts", "i8")])


def rows(exch_ts, local_ts, mark, index, rate, next_ts) -> np.ndarray:
    """A funding table from columns, ordered by exchange time (stable)."""
    out = np.zeros(len(exch_ts), funding_dtype)
    for name, col in zip(funding_dtype.names, (exch_ts, local_ts, mark, index, rate, next_ts), strict=True):
        out[name] = col
    return out[np.argsort(out["exch_ts"], kind="stable")]


def schedule(table: np.ndarray, start_ns: int, end_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The settlements in ``(start_ns, end_ns]``: (time ns, rate, mark), in time order.

    A settlement time is any ``next_ts`` the rows name. Its rate is that of the last row with
    ``next_ts == T`` and ``exch_ts <= T`` (a row announcing the settlement after it happened is not
    used), its mark the last mark with ``exch_ts <= T``. A time no row announces before it, or with no
    mark before it, is skipped: there is nothing to settle with.
    """
    if table is None or not len(table):
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    t = table[np.argsort(table["exch_ts"], kind="stable")]
    times = np.unique(t["next_ts"][t["next_ts"] > 0])
    times = times[(times > start_ns) & (times <= end_ns)]
    ts, rates, marks = [], [], []
    for T in times:
        known = t[t["exch_ts"] <= T]
        for_t = known[known["next_ts"] == T]
        if not len(for_t) or not np.isfinite(known["mark"][-1]):
            continue
        ts.append(int(T))
        rates.append(float(for_t["rate"][-1]))
        marks.append(float(known["mark"][-1]))
    return np.array(ts, np.int64), np.array(rates), np.array(marks)


@njit(inline="always")
def payment_nb(position, contract_size, mark, rate, inverse):
    """What a position receives at a settlement (negative: pays); quote currency, or coin if inverse."""
    if inverse:
        return -position * contract_size / mark * rate
    return -position * contract_size * mark * rate
