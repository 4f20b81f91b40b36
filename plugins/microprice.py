"""``microprice``: Stoikov's micro-price, mid + g*(I, S), looked up in a table fitted offline.

``quotelab microprice fit ...`` (:mod:`quotelab.microprice`) writes the table: g* in ticks for each
imbalance bucket (edges over [−1, 1]) and spread bucket (1, 2, …, ≥m ticks). The kernel buckets the
current top-of-book imbalance and spread exactly as the estimator did and adds g* (times the asset's
tick) to the mid. A spread wider than the table's last bucket uses the last bucket.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numba import njit
from pydantic import Field

from quotelab import hookimpl
from quotelab.component import Asset, Component, PackContext, Params
from quotelab.errors import ConfigError
from quotelab.layout import ASK_QTY, BEST_ASK, BEST_BID, BID_QTY, COMPONENTS, TICK
from quotelab.microprice import MAX_BUCKETS, MAX_SPREADS, MicropriceTable

# params: asset, n, m, edges[MAX_BUCKETS + 1], g_ticks[MAX_BUCKETS * MAX_SPREADS] (row b, column j)
P_EDGES = 3
P_TABLE = P_EDGES + MAX_BUCKETS + 1
P_WIDTH = P_TABLE + MAX_BUCKETS * MAX_SPREADS


class MicropriceParams(Params):
    table: str = Field(description="Micro-price table (.json or .npz) written by `quotelab microprice fit`; a "
                                   "relative path starts from the strategy file's folder.")
    asset: Asset = "quoted"
    check_tick: bool = Field(True, description="Refuse a table fitted on another tick size (its spread buckets "
                                               "are in that tick); false applies it in this asset's ticks.")


def load_table(p: MicropriceParams, base_dir: str = ".") -> MicropriceTable:
    path = Path(p.table) if Path(p.table).is_absolute() else Path(base_dir) / p.table
    return MicropriceTable.load(path)


def pack_table(table: MicropriceTable) -> list[float]:
    """Fixed width whatever the table's size, so a sweep over tables never recompiles the strategy."""
    n, m = table.n_buckets, table.n_spreads
    edges = np.full(MAX_BUCKETS + 1, 2.0)  # unused edges above every imbalance: the bucket search stops at n-1
    edges[: n + 1] = table.imbalance_edges
    g = np.zeros((MAX_BUCKETS, MAX_SPREADS))
    g[:n, :m] = table.g_ticks
    return [float(n), float(m), *edges.tolist(), *g.ravel().tolist()]


def _pack(p: MicropriceParams, ctx: PackContext) -> list[float]:
    table = load_table(p, ctx.base_dir)
    asset = ctx.quoted if p.asset == "quoted" else p.asset
    tick = ctx.tick_size.get(asset)
    if p.check_tick and tick is not None and not np.isclose(tick, table.tick_size, rtol=1e-9, atol=0.0):
        raise ConfigError(
            f"microprice: table {p.table} was fitted with tick {table.tick_size:g} but {asset} has tick {tick:g}; "
            f"fit a table on {asset}, or set check_tick: false to use it in {asset}'s ticks"
        )
    return [float(ctx.asset_index[p.asset]), *pack_table(table)]


@njit(inline="always")
def microprice_nb(view, trades, state, params, out):
    a = int(params[0])
    n = int(params[1])
    m = int(params[2])
    bid = view[a, BEST_BID]
    ask = view[a, BEST_ASK]
    qb = view[a, BID_QTY]
    qa = view[a, ASK_QTY]
    s = qb + qa
    imb = (qb - qa) / s if s > 0.0 else 0.0
    b = 0
    while b < n - 1 and imb >= params[P_EDGES + 1 + b]:
        b += 1
    tick = view[a, TICK]
    st = int(np.rint((ask - bid) / tick))
    j = min(max(st, 1), m) - 1
    return (bid + ask) / 2.0 + params[P_TABLE + b * MAX_SPREADS + j] * tick


@njit(inline="always")
def top_of_book_nb(view, trades, state, params, out):
    # Not a component: the estimator replays it to record what the microprice kernel reads.
    a = int(params[0])
    out[COMPONENTS] = view[a, BEST_BID]
    out[COMPONENTS + 1] = view[a, BEST_ASK]
    out[COMPONENTS + 2] = view[a, BID_QTY]
    out[COMPONENTS + 3] = view[a, ASK_QTY]
    return (view[a, BEST_BID] + view[a, BEST_ASK]) / 2.0


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="fair_value", name="microprice", params=MicropriceParams, kernel=microprice_nb, pack=_pack,
        doc="Stoikov's micro-price: the mid plus g*(imbalance bucket, spread bucket) from a table fitted offline by "
            "the iterated transition-matrix method (`quotelab microprice fit`).",
        formula="(bid + ask)/2 + g*(bucket(I), bucket(round((ask - bid)/tick))) * tick, I = (Qb - Qa)/(Qb + Qa); "
                "g* = sum_i B^(i-1) G1, G1 = (1 - Q)^-1 R K, B = (1 - Q)^-1 T (symmetrised transitions)",
    ))
