"""Stoikov's micro-price (Stoikov 2018, "The micro-price: a high-frequency estimator of future prices").

The micro-price is mid + g*(I, S): the expected mid far in the future, given the top-of-book
imbalance I = (Qb − Qa)/(Qb + Qa) and the spread S now. It is estimated from a sample of the book
on a fixed grid:

1. Discretise: I into ``n`` buckets (edges over [−1, 1]), S into ``m`` buckets of 1, 2, …, ≥m ticks.
   A state x is the pair (imbalance bucket, spread bucket). Each pair of consecutive grid steps is
   one transition x → y with a mid change dM (in half ticks).
2. Symmetrise: add the mirror image of every transition (I → −I, so bucket b → n−1−b, and dM → −dM).
   Without it the chain's long-run drift in the sample would leak into g*.
3. Estimate, row-normalised over all transitions out of x:
   Q[x, y] = P(dM = 0, next state y | x)          (transient: the mid has not moved yet)
   T[x, y] = P(dM ≠ 0, next state y | x)          (absorbing: the mid moved, the chain restarts at y)
   R[x, k] = P(dM = K_k | x) for the non-zero sizes K.
4. G1 = (I − Q)⁻¹ R K is the expected mid change at the first mid move; B = (I − Q)⁻¹ T is the
   distribution of the state right after it. G_{i+1} = B G_i, and g* = Σ G_i (which converges
   because, on symmetrised data, the stationary distribution of B gives G1 zero mean).

The table (``n`` × ``m``, in ticks and in price units) is saved with its edges, tick size and training
window as JSON or npz; :mod:`quotelab.plugins.microprice` looks it up at every step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from quotelab import layout as L
from quotelab.errors import ConfigError, DataError

FORMAT = "quotelab.microprice/1"
MAX_BUCKETS = 32  # imbalance buckets a table may have (the plugin packs a fixed size)
MAX_SPREADS = 8  # spread buckets a table may have


@dataclass(frozen=True)
class MicropriceTable:
    """g*(imbalance bucket, spread bucket) in ticks, with what is needed to look it up and to trust it."""

    imbalance_edges: np.ndarray  # (n + 1,) from -1 to 1; bucket b holds edges[b] <= I < edges[b+1]
    g_ticks: np.ndarray  # (n, m); spread bucket j holds spreads of j+1 ticks (the last: >= m ticks)
    tick_size: float
    counts: np.ndarray  # (n, m) transitions out of each state in the sample, before symmetrisation
    move_sizes_ticks: np.ndarray  # the non-zero mid changes K seen in the (symmetrised) sample
    iterations: int  # G_i terms summed
    residual_ticks: float  # max |G_i| of the last term summed
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def n_buckets(self) -> int:
        return self.g_ticks.shape[0]

    @property
    def n_spreads(self) -> int:
        return self.g_ticks.shape[1]

    @property
    def g_price(self) -> np.ndarray:
        return self.g_ticks * self.tick_size

    def lookup_ticks(self, imbalance: np.ndarray, spread_ticks: np.ndarray) -> np.ndarray:
        """g* in ticks for arrays of imbalance and spread (in ticks), as the kernel looks it up."""
        b = imbalance_bucket(np.asarray(imbalance, dtype=float), self.imbalance_edges)
        j = spread_bucket(np.asarray(spread_ticks, dtype=float), self.n_spreads)
        return self.g_ticks[b, j]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "tick_size": self.tick_size,
            "imbalance_edges": self.imbalance_edges.tolist(),
            "spread_buckets_ticks": [*range(1, self.n_spreads), f">={self.n_spreads}"],
            "g_ticks": self.g_ticks.tolist(),
            "g_price": self.g_price.tolist(),
            "counts": self.counts.astype(int).tolist(),
            "move_sizes_ticks": self.move_sizes_ticks.tolist(),
            "iterations": self.iterations,
            "residual_ticks": self.residual_ticks,
            "training": self.training,
        }

    def save(self, path: str | Path) -> Path:
        """Write the table as ``.json`` or ``.npz`` (arrays plus the same fields as JSON in ``meta``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        if path.suffix == ".npz":
            np.savez(path, imbalance_edges=self.imbalance_edges, g_ticks=self.g_ticks, counts=self.counts,
                     move_sizes_ticks=self.move_sizes_ticks, meta=np.array(json.dumps(d)))
        elif path.suffix == ".json":
            path.write_text(json.dumps(d, indent=1) + "\n")
        else:
            raise ConfigError(f"microprice table {path}: the name must end in .json or .npz")
        return path

    @classmethod
    def load(cls, path: str | Path) -> MicropriceTable:
        """Read a table written by :meth:`save`; a wrong file names itself and how to make a right one."""
        path = Path(path)
        fix = "write one with `quotelab microprice fit ... --out FILE`"
        if not path.exists():
            raise ConfigError(f"microprice table {path}: file not found; {fix}")
        try:
            if path.suffix == ".npz":
                with np.load(path) as z:
                    d = json.loads(str(z["meta"]))
            else:
                d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
            table = cls(
                imbalance_edges=np.asarray(d["imbalance_edges"], dtype=float),
                g_ticks=np.asarray(d["g_ticks"], dtype=float).reshape(len(d["imbalance_edges"]) - 1, -1),
                tick_size=float(d["tick_size"]), counts=np.asarray(d["counts"], dtype=float),
                move_sizes_ticks=np.asarray(d["move_sizes_ticks"], dtype=float), iterations=int(d["iterations"]),
                residual_ticks=float(d["residual_ticks"]), training=dict(d.get("training", {})),
            )
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"microprice table {path}: not a micro-price table ({exc}); {fix}") from exc
        _check_shape(table.n_buckets, table.n_spreads, f"microprice table {path}")
        if not (np.all(np.diff(table.imbalance_edges) > 0) and np.isfinite(table.g_ticks).all()):
            raise ConfigError(f"microprice table {path}: edges must increase and g must be finite; {fix}")
        return table


def _check_shape(n: int, m: int, where: str) -> None:
    if not 1 <= n <= MAX_BUCKETS or not 1 <= m <= MAX_SPREADS:
        raise ConfigError(f"{where}: {n} imbalance buckets x {m} spread buckets; "
                          f"the limits are 1..{MAX_BUCKETS} x 1..{MAX_SPREADS}")


# ------------------------------------------------------------------------------------------------
# Discretisation (the kernel in plugins/microprice.py repeats it step by step)
# ------------------------------------------------------------------------------------------------


def uniform_edges(n: int) -> np.ndarray:
    """n equal-width imbalance buckets over [−1, 1]: symmetric, so mirroring maps bucket b to n−1−b."""
    return np.linspace(-1.0, 1.0, n + 1)


def quantile_edges(imbalance: np.ndarray, n: int) -> np.ndarray:
    """Buckets holding equal shares of the symmetrised sample (I and −I pooled), made exactly symmetric."""
    pooled = np.concatenate([imbalance, -imbalance])
    e = np.quantile(pooled, np.linspace(0.0, 1.0, n + 1))
    e = (e - e[::-1]) / 2.0  # quantiles of a symmetric sample are symmetric up to rounding: remove it
    e[0], e[-1] = -1.0, 1.0
    if not np.all(np.diff(e) > 0):
        raise DataError(f"microprice: the imbalance sample has too few distinct values for {n} quantile buckets; "
                        "use fewer buckets or uniform edges")
    return e


def imbalance_bucket(imbalance: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket b with edges[b] <= I < edges[b+1] (I = 1 in the last)."""
    return np.searchsorted(edges[1:-1], imbalance, side="right")


def spread_bucket(spread_ticks: np.ndarray, m: int) -> np.ndarray:
    """Spread of 1..m−1 ticks → bucket 0..m−2; m ticks or more → m−1 (a crossed or locked book: 0)."""
    return (np.clip(np.rint(spread_ticks), 1, m) - 1).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# The estimator
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    g_ticks: np.ndarray  # (n, m)
    move_sizes_ticks: np.ndarray
    iterations: int
    residual_ticks: float
    G1: np.ndarray  # (n*m,) state index s*n + b
    B: np.ndarray  # (n*m, n*m)


def estimate(
    imb: np.ndarray, spread: np.ndarray, dm_half_ticks: np.ndarray, imb_next: np.ndarray, spread_next: np.ndarray,
    n: int, m: int, *, symmetrise: bool = True, tol: float = 1e-10, max_iter: int = 100_000,
) -> Estimate:
    """g*(I bucket, S bucket) in ticks from transitions (buckets now, mid change in half ticks, buckets next)."""
    imb, spread, dmh = (np.asarray(a, dtype=np.int64) for a in (imb, spread, dm_half_ticks))
    imb_next, spread_next = np.asarray(imb_next, dtype=np.int64), np.asarray(spread_next, dtype=np.int64)
    if symmetrise:
        imb, imb_next = np.concatenate([imb, n - 1 - imb]), np.concatenate([imb_next, n - 1 - imb_next])
        spread, spread_next = np.concatenate([spread, spread]), np.concatenate([spread_next, spread_next])
        dmh = np.concatenate([dmh, -dmh])
    ns = n * m
    x = spread * n + imb
    y = spread_next * n + imb_next
    still = dmh == 0
    sizes = np.unique(dmh[~still])
    q_counts = np.zeros((ns, ns))
    np.add.at(q_counts, (x[still], y[still]), 1.0)
    t_counts = np.zeros((ns, ns))
    np.add.at(t_counts, (x[~still], y[~still]), 1.0)
    r_counts = np.zeros((ns, len(sizes)))
    np.add.at(r_counts, (x[~still], np.searchsorted(sizes, dmh[~still])), 1.0)
    total = q_counts.sum(axis=1) + t_counts.sum(axis=1)
    # A state never seen has no row: it gets g* = 0 and, as a target, acts as an absorbing end.
    norm = np.where(total > 0, total, 1.0)[:, None]
    Q, T, R = q_counts / norm, t_counts / norm, r_counts / norm
    K = sizes / 2.0
    stuck = _never_moving_states(Q, T, total, n)
    if stuck:
        raise DataError(
            f"microprice: states {stuck} (imbalance bucket, spread bucket) never lead to a mid change in the sample "
            f"of {len(x)} transitions (symmetrised), so g* is undefined there; use fewer buckets or spreads, or a "
            f"longer training window"
        )
    A = np.eye(ns) - Q
    G1 = np.linalg.solve(A, R @ K)
    B = np.linalg.solve(A, T)
    g = G1.copy()
    G = G1
    it = 1
    while np.abs(G).max(initial=0.0) > tol and it < max_iter:
        G = B @ G
        g += G
        it += 1
    residual = float(np.abs(G).max(initial=0.0))
    if residual > tol:
        raise DataError(f"microprice: G_i did not converge in {max_iter} iterations (max |G_i| = {residual:.3g} "
                        f"ticks); symmetrise the data, or use fewer buckets or a longer training window")
    return Estimate(g_ticks=g.reshape(m, n).T.copy(), move_sizes_ticks=K, iterations=it, residual_ticks=residual,
                    G1=G1, B=B)


def _never_moving_states(Q: np.ndarray, T: np.ndarray, total: np.ndarray, n: int) -> list[tuple[int, int]]:
    # States from which no path of no-move transitions reaches a move: a closed class of Q.
    reaches = T.sum(axis=1) > 0
    for _ in range(len(Q)):
        new = reaches | ((Q > 0) & reaches[None, :]).any(axis=1)
        if (new == reaches).all():
            break
        reaches = new
    return [(int(s % n), int(s // n)) for s in np.flatnonzero((total > 0) & ~reaches)]


def transitions(
    ts: np.ndarray, bid: np.ndarray, ask: np.ndarray, bid_qty: np.ndarray, ask_qty: np.ndarray, tick: float,
    step_ns: int, edges: np.ndarray, m: int, horizon: int = 1,
) -> dict[str, np.ndarray]:
    """Buckets now, mid change (half ticks) and buckets ``horizon`` grid steps later, for every pair of
    samples exactly that far apart on the grid with a two-sided, uncrossed book at both ends."""
    ts = np.asarray(ts, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = bid_qty + ask_qty
        imbalance = np.where(s > 0, (bid_qty - ask_qty) / s, 0.0)
        spread_t = (ask - bid) / tick
    valid = np.isfinite(bid) & np.isfinite(ask) & (np.rint(np.nan_to_num(spread_t)) >= 1)
    ib = imbalance_bucket(imbalance, edges)
    sb = spread_bucket(np.nan_to_num(spread_t, nan=1.0), m)
    mid_half = np.rint(np.nan_to_num((bid + ask) / tick)).astype(np.int64)  # 2·mid in ticks
    # The grid times of the samples, so steps skipped (book not ready) never pair across a gap.
    j = np.searchsorted(ts, ts + horizon * step_ns)
    j_ok = j < len(ts)
    i = np.flatnonzero(j_ok)
    j = j[j_ok]
    keep = (ts[j] == ts[i] + horizon * step_ns) & valid[i] & valid[j]
    i, j = i[keep], j[keep]
    return {"imb": ib[i], "spread": sb[i], "dm_half_ticks": mid_half[j] - mid_half[i], "imb_next": ib[j],
            "spread_next": sb[j], "imbalance": imbalance[i]}


def fit_book(
    ts: np.ndarray, bid: np.ndarray, ask: np.ndarray, bid_qty: np.ndarray, ask_qty: np.ndarray, *, tick: float,
    step_ns: int, n_buckets: int = 10, n_spreads: int = 2, edges: str = "uniform", horizon: int = 1,
    max_move_ticks: float | None = None, training: dict[str, Any] | None = None,
) -> MicropriceTable:
    """The micro-price table from a top-of-book sample on a grid of ``step_ns``.

    ``max_move_ticks`` drops transitions whose mid moved by more (Stoikov's own code keeps |dM| <= 1
    tick); by default every transition counts, jumps included."""
    _check_shape(n_buckets, n_spreads, "microprice fit")
    if horizon < 1:
        raise ConfigError(f"microprice fit: horizon is a number of grid steps >= 1, got {horizon}")
    if edges == "uniform":
        e = uniform_edges(n_buckets)
    elif edges == "quantile":
        with np.errstate(invalid="ignore", divide="ignore"):
            s = bid_qty + ask_qty
            imbalance = np.where(s > 0, (bid_qty - ask_qty) / s, 0.0)
        e = quantile_edges(imbalance[np.isfinite(bid) & np.isfinite(ask)], n_buckets)
    else:
        raise ConfigError(f"microprice fit: edges must be uniform or quantile, got {edges!r}")
    tr = transitions(ts, bid, ask, bid_qty, ask_qty, tick, step_ns, e, n_spreads, horizon)
    if max_move_ticks is not None:
        small = np.abs(tr["dm_half_ticks"]) <= 2.0 * max_move_ticks + 1e-9
        tr = {k: v[small] for k, v in tr.items()}
    if len(tr["imb"]) < 2:
        raise DataError("microprice fit: fewer than 2 transitions in the training window; use a longer window")
    est = estimate(tr["imb"], tr["spread"], tr["dm_half_ticks"], tr["imb_next"], tr["spread_next"], n_buckets,
                   n_spreads)
    counts = np.zeros((n_buckets, n_spreads))
    np.add.at(counts, (tr["imb"], tr["spread"]), 1.0)
    info = {"transitions": len(tr["imb"]), "step_s": step_ns / 1e9, "horizon_steps": horizon, "edges": edges,
            "max_move_ticks": max_move_ticks}
    return MicropriceTable(
        imbalance_edges=e, g_ticks=est.g_ticks, tick_size=float(tick), counts=counts,
        move_sizes_ticks=est.move_sizes_ticks, iterations=est.iterations, residual_ticks=est.residual_ticks,
        training={**info, **(training or {})},
    )


# ------------------------------------------------------------------------------------------------
# From the catalog, on the engine's grid
# ------------------------------------------------------------------------------------------------


@njit(inline="always")
def top_of_book_nb(view, trades, state, params, out):
    # Not a component: replayed to record what the microprice kernel reads (params: the asset's row).
    a = int(params[0])
    out[L.COMPONENTS] = view[a, L.BEST_BID]
    out[L.COMPONENTS + 1] = view[a, L.BEST_ASK]
    out[L.COMPONENTS + 2] = view[a, L.BID_QTY]
    out[L.COMPONENTS + 3] = view[a, L.ASK_QTY]
    return (view[a, L.BEST_BID] + view[a, L.BEST_ASK]) / 2.0


def top_of_book(assets: Sequence[Any] | Any, quoted: int = 0, step: float = 0.1,
                origin_ns: int | None = None) -> dict[str, np.ndarray]:
    """The quoted asset's top of book at every ready step of the engine's grid (the replayer's view)."""
    from quotelab.research.replay import replay

    cols = [L.COMPONENTS + k for k in range(4)]
    res = replay(assets, top_of_book_nb, np.array([float(quoted)]), quoted=quoted, step=step, origin_ns=origin_ns,
                 ready=[quoted], keep_out=True, out_columns=cols)
    return {"ts": res.timestamps, "bid": res.outs[:, 0], "ask": res.outs[:, 1], "bid_qty": res.outs[:, 2],
            "ask_qty": res.outs[:, 3], "origin_ns": np.int64(res.origin_ns)}


def fit_catalog(
    catalog: str | Path, venue: str, symbol: str, dates: Sequence[str], *, step: float = 0.1, n_buckets: int = 10,
    n_spreads: int = 2, edges: str = "uniform", horizon: int = 1, max_move_ticks: float | None = None,
) -> MicropriceTable:
    """Fit on catalog days, replayed on the grid a strategy with ``step`` quoting this symbol sees."""
    from quotelab.data import catalog as cat
    from quotelab.data.assets import Asset

    if not dates:
        raise ConfigError("microprice fit: give at least one date (--dates YYYYMMDD[,YYYYMMDD...])")
    meta = cat.read_meta(catalog, venue, symbol)
    asset = Asset(symbol, cat.stream_days(catalog, venue, symbol, dates)[1],
                  float(meta["tick_size"]), float(meta["lot_size"]), venue=venue, symbol=symbol)
    book = top_of_book([asset], step=step)
    ts = book["ts"]
    training = {"venue": venue, "symbol": symbol, "dates": list(dates), "samples": len(ts),
                "first_ts": int(ts[0]) if len(ts) else None, "last_ts": int(ts[-1]) if len(ts) else None,
                "origin_ns": int(book["origin_ns"])}
    return fit_book(ts, book["bid"], book["ask"], book["bid_qty"], book["ask_qty"], tick=asset.tick_size,
                    step_ns=int(round(step * 1e9)), n_buckets=n_buckets, n_spreads=n_spreads, edges=edges,
                    horizon=horizon, max_move_ticks=max_move_ticks, training=training)
