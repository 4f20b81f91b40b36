"""``microprice``: Stoikov's micro-price, mid + g*(I, S), looked up in a table fitted offline.

``quotelab microprice fit ...`` (:mod:`quotelab.research.microprice`) writes the table: g* in ticks for each
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
from quotelab.component import Asset, Component, PackContext, Params, pack_fields, param_offsets
from quotelab.errors import ConfigError
from quotelab.kernels.imbalance import level_imbalance_nb
from quotelab.layout import ASK_QTY, BEST_ASK, BEST_BID, BID_QTY, TICK
from quotelab.research.microprice import MAX_BUCKETS, MAX_SPREADS, MicropriceTable


class MicropriceParams(Params):
    table: str = Field(description="Micro-price table (.json or .npz) written by `quotelab microprice fit`; a "
                                   "relative path starts from the strategy file's folder.")
    asset: Asset = "quoted"
    check_tick: bool = Field(True, description="Refuse a table fitted on another tick size (its spread buckets "
                                               "are in that tick); false applies it in this asset's ticks.")


# The table is packed at a fixed width whatever its size, so a sweep over tables never recompiles the
# strategy: n imbalance buckets, m spread buckets, their edges, and g* in ticks (row b, column j).
P = param_offsets(MicropriceParams, n_buckets=1, n_spreads=1, edges=MAX_BUCKETS + 1,
                  g_ticks=MAX_BUCKETS * MAX_SPREADS)


def load_table(p: MicropriceParams, base_dir: str = ".") -> MicropriceTable:
    path = Path(p.table) if Path(p.table).is_absolute() else Path(base_dir) / p.table
    return MicropriceTable.load(path)


def pack_table(table: MicropriceTable) -> dict[str, object]:
    """The derived values ``P`` declares, for :func:`quotelab.component.pack_fields`."""
    n, m = table.n_buckets, table.n_spreads
    edges = np.full(MAX_BUCKETS + 1, 2.0)  # unused edges above every imbalance: the bucket search stops at n-1
    edges[: n + 1] = table.imbalance_edges
    g = np.zeros((MAX_BUCKETS, MAX_SPREADS))
    g[:n, :m] = table.g_ticks
    return {"n_buckets": n, "n_spreads": m, "edges": edges, "g_ticks": g}


def _pack(p: MicropriceParams, ctx: PackContext) -> list[float]:
    table = load_table(p, ctx.base_dir)
    asset = ctx.quoted if p.asset == "quoted" else p.asset
    tick = ctx.tick_size.get(asset)
    if p.check_tick and tick is not None and not np.isclose(tick, table.tick_size, rtol=1e-9, atol=0.0):
        raise ConfigError(
            f"microprice: table {p.table} was fitted with tick {table.tick_size:g} but {asset} has tick {tick:g}; "
            f"fit a table on {asset}, or set check_tick: false to use it in {asset}'s ticks"
        )
    return pack_fields(p, ctx, **pack_table(table))


@njit(inline="always")
def microprice_nb(view, trades, state, params, out):
    a = int(params[P.asset])
    n = int(params[P.n_buckets])
    m = int(params[P.n_spreads])
    bid = view[a, BEST_BID]
    ask = view[a, BEST_ASK]
    imb = level_imbalance_nb(view[a, BID_QTY], view[a, ASK_QTY], 0.0)
    b = 0
    while b < n - 1 and imb >= params[P.edges + 1 + b]:
        b += 1
    tick = view[a, TICK]
    st = int(np.rint((ask - bid) / tick))
    j = min(max(st, 1), m) - 1
    return (bid + ask) / 2.0 + params[P.g_ticks + b * MAX_SPREADS + j] * tick


@hookimpl
def quotelab_register_components(register):
    register(Component(
        role="fair_value", name="microprice", params=MicropriceParams, kernel=microprice_nb, pack=_pack,
        doc="Stoikov's micro-price: the mid plus g*(imbalance bucket, spread bucket) from a table fitted offline by "
            "the iterated transition-matrix method (`quotelab microprice fit`).",
        formula="(bid + ask)/2 + g*(bucket(I), bucket(round((ask - bid)/tick))) * tick, I = (Qb - Qa)/(Qb + Qa); "
                "g* = sum_i B^(i-1) G1, G1 = (1 - Q)^-1 R K, B = (1 - Q)^-1 T (symmetrised transitions)",
    ))
