"""A seeded synthetic market: a perpetual and a spot pair over one latent price, written to the catalog.

The model, in the order the kernels apply it:

* **Latent price.** A log random walk on a 1 ms grid whose volatility follows a slow mean-reverting
  factor (quiet and busy regimes), plus rare Gaussian jumps.
* **Fair price per asset.** The perpetual's fair price is the latent price. The spot's is the latent
  price ``lag`` earlier minus a mean-reverting basis (perp − spot, an Ornstein-Uhlenbeck process), so
  the perp leads the spot and the pair's basis drifts and reverts.
* **Book.** Each asset holds an L2 book of up to ``max_levels`` levels per side, driven by competing
  Poisson clocks: limit adds (distance from the fair price exponentially distributed, so intensity
  decays away from the touch), cancels (partial or full, intensity decaying with level index, and
  always for levels left too far from the touch), market orders (a Hawkes process, so trades come in
  bursts; their side leans toward the fair price; they take the best levels), and stale-quote
  handling: when the fair price runs through a side, makers pull the stale levels, or, once the
  mispricing pays a taker fee, an arbitrageur sweeps them. Adds never cross the opposite touch, so the
  book is never crossed. A side that runs short of levels is re-quoted behind its farthest level.
* **Feed.** Each message (one event of the model) gets an exchange time and a local time equal to
  the exchange time plus a lognormal latency, never earlier than the previous message's local time:
  a websocket delivers in order. Hence every row is both an EXCH and a LOCAL event for hftbacktest.

Everything runs in ``@njit(cache=True)`` kernels with a private xoshiro256** generator per stream, so
the files depend only on the seed and arguments (the latent stream and each asset's stream are
independent: generating only the perp gives the same perp). Events are produced in chunks and spooled
to a temporary file per day, then streamed into the day's npz, so memory stays bounded for days of
tens of millions of events.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from hftbacktest.types import (
    BUY_EVENT,
    DEPTH_CLEAR_EVENT,
    DEPTH_EVENT,
    DEPTH_SNAPSHOT_EVENT,
    EXCH_EVENT,
    LOCAL_EVENT,
    SELL_EVENT,
    TRADE_EVENT,
    event_dtype,
)
from numba import njit

from quotelab.data import catalog as _catalog
from quotelab.errors import QuotelabError
from quotelab.stopping import Interrupted, stop_signals, stopped

VENUE = "synthetic"
NS = 1_000_000_000
GRID_NS = 1_000_000  # latent price grid step: 1 ms
CHUNK_S = 900  # seconds of events per kernel call; bounds the working set, not the results
WARMUP_S = 120  # the book runs this long before `start` so the first snapshot looks like steady state


class SynthError(QuotelabError):
    """Invalid arguments for the synthetic market generator."""


# ---------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class LatentModel:
    """The latent price, shared by all assets, and the perp-spot relation."""

    price0: float = 60_000.0
    vol_annual: float = 0.45  # of the latent log price; BTC-like
    vol_factor_std: float = 0.35  # stationary std of the log-volatility factor
    vol_factor_halflife_s: float = 600.0
    jump_rate_per_hour: float = 2.0
    jump_std: float = 0.0012  # log-return std of a jump (~70 USD at 60k)
    spot_lag_s: float = 0.25  # spot's fair price is the latent price this long ago
    basis_mean: float = 6.0  # perp − spot, USD
    basis_std: float = 3.0  # stationary std, USD
    basis_halflife_s: float = 900.0


@dataclass(frozen=True)
class AssetModel:
    """One asset's instrument and order-flow intensities (rates are per second, distances in ticks)."""

    key: str
    symbol: str
    market: str
    tick_size: float
    lot_size: float
    add_rate: float
    cancel_rate: float
    mo_base_rate: float
    mo_alpha: float  # Hawkes jump of the market-order intensity per market order
    mo_beta: float  # its decay rate
    mo_size_median: float  # in base units
    mo_size_sigma: float
    add_size_median: float
    add_size_sigma: float
    half_spread: float  # makers quote at fair ± this many ticks
    touch_prob: float  # share of adds placed at the maker's quote itself
    add_dist_mean: float  # mean distance of the other adds behind it
    refill_gap_mean: float  # mean extra gap between re-quoted levels
    cancel_level_mean: float  # mean level index of a cancel (0 = touch)
    full_cancel_prob: float
    pull_rate: float  # how fast makers pull a stale side
    pull_tol: float  # a level is stale once it is this far through the fair price
    take_tol: float  # an arbitrageur sweeps once it is this far through (covers the taker fee)
    take_prob: float
    max_dist: float  # levels farther than this from the touch get cancelled first
    max_levels: int = 120
    min_levels: int = 30
    latency_median_ms: float = 3.0
    latency_sigma: float = 0.45
    # Set for a busy venue feed (see PROFILES): depth goes out as one message every ~msg_interval_ms
    # holding each level touched since the last one, and distances and cancel levels are lognormal
    # (median add_dist_mean / cancel_level_mean, these log-stds), heavy-tailed like a real book.
    msg_interval_ms: float = 0.0
    add_dist_sigma: float = 0.0
    cancel_level_sigma: float = 0.0
    burst: float = 0.0  # add and cancel rates × (1 + burst · the market orders' Hawkes excitation)
    extra: dict[str, Any] = field(default_factory=dict)


ASSETS: dict[str, AssetModel] = {
    "perp": AssetModel(
        key="perp",
        symbol="SYNPERP",
        market="perpetual",
        tick_size=0.1,
        lot_size=0.001,
        add_rate=185.0,
        cancel_rate=165.0,
        mo_base_rate=1.2,
        mo_alpha=1.1,
        mo_beta=2.5,
        mo_size_median=0.03,
        mo_size_sigma=1.3,
        add_size_median=0.08,
        add_size_sigma=1.2,
        half_spread=0.5,
        touch_prob=0.3,
        add_dist_mean=12.0,
        refill_gap_mean=2.0,
        cancel_level_mean=14.0,
        full_cancel_prob=0.45,
        pull_rate=80.0,
        pull_tol=1.0,
        take_tol=25.0,
        take_prob=0.7,
        max_dist=600.0,
    ),
    "spot": AssetModel(
        key="spot",
        symbol="SYNSPOT",
        market="spot",
        tick_size=0.01,
        lot_size=0.00001,
        add_rate=110.0,
        cancel_rate=95.0,
        mo_base_rate=0.8,
        mo_alpha=0.9,
        mo_beta=2.5,
        mo_size_median=0.01,
        mo_size_sigma=1.4,
        add_size_median=0.03,
        add_size_sigma=1.3,
        half_spread=0.5,
        touch_prob=0.3,
        add_dist_mean=90.0,
        refill_gap_mean=20.0,
        cancel_level_mean=14.0,
        full_cancel_prob=0.45,
        pull_rate=50.0,
        pull_tol=10.0,
        take_tol=400.0,
        take_prob=0.7,
        max_dist=5000.0,
    ),
}

# The busy perpetual: event rates and depth messages like the shared USD-M BTCUSDT capture
# (2024-08-08 23:54-24:00, converted: ~1,360 exchange rows/s, 19 depth messages/s about 52 ms apart
# with 68 levels each on average (median 34, p90 142), 62 trades/s, depth rows a median 404 ticks
# from the touch (p10 59, p90 5,900), ~3,500 levels a side). Measured on it: see docs/synthetic.md.
BUSY_PERP = replace(
    ASSETS["perp"],
    add_rate=64.0,
    cancel_rate=49.0,
    burst=0.3,
    mo_base_rate=7.0,
    mo_alpha=2.6,
    mo_beta=3.0,
    mo_size_median=0.015,
    mo_size_sigma=1.6,
    add_size_median=0.05,
    add_size_sigma=1.6,
    touch_prob=0.4,
    add_dist_mean=400.0,
    add_dist_sigma=1.9,
    cancel_level_mean=300.0,
    cancel_level_sigma=1.5,
    refill_gap_mean=3.0,
    max_dist=30_000.0,
    max_levels=3_500,
    min_levels=200,
    msg_interval_ms=52.0,
)

PROFILES: dict[str, dict[str, AssetModel]] = {
    "demo": ASSETS,
    "busy": {**ASSETS, "perp": BUSY_PERP},
}

# ---------------------------------------------------------------------------------------------------
# Kernels (pure numba; names end in _nb)

_U1 = np.uint64(1)
_F_EXCH_LOCAL = np.uint64(EXCH_EVENT | LOCAL_EVENT)
_F_BUY = np.uint64(BUY_EVENT)
_F_SELL = np.uint64(SELL_EVENT)
_F_DEPTH = np.uint64(DEPTH_EVENT)
_F_TRADE = np.uint64(TRADE_EVENT)
_F_CLEAR = np.uint64(DEPTH_CLEAR_EVENT)
_F_SNAP = np.uint64(DEPTH_SNAPSHOT_EVENT)

# Parameter vector layout (one float64 array per asset, so one compiled kernel serves all assets).
(
    P_TICK,
    P_INV_TICK,
    P_INV_LOT,
    P_ADD_RATE,
    P_CANCEL_RATE,
    P_MO_BASE,
    P_MO_ALPHA,
    P_MO_BETA,
    P_MO_MU,
    P_MO_SIG,
    P_ADD_MU,
    P_ADD_SIG,
    P_HALF_SPREAD,
    P_ADD_DIST,
    P_REFILL_GAP,
    P_CANCEL_LVL,
    P_FULL_CANCEL,
    P_PULL_RATE,
    P_PULL_TOL,
    P_TAKE_TOL,
    P_TAKE_PROB,
    P_MAX_DIST,
    P_MIN_LEVELS,
    P_LAT_MU,
    P_LAT_SIG,
    P_TOUCH_PROB,
    P_DIST_SIG,
    P_CANCEL_SIG,
    P_BURST,
    P_LOCAL_STEP,
    N_PARAMS,
) = range(31)

# Integer state layout. S_MSG and S_NEXT_MSG: the last depth message's id and the next one's time,
# for an asset whose feed batches depth into messages (msg_interval_ms > 0).
S_NEXT_T, S_UID, S_TID, S_LAST_LOCAL, S_MO_T, S_MSG, S_NEXT_MSG, N_ISTATE = range(8)
MAX_SWEEP = 25


@njit(cache=True)
def _rotl_nb(x: np.uint64, k: np.uint64) -> np.uint64:
    return (x << k) | (x >> (np.uint64(64) - k))


@njit(cache=True)
def _u64_nb(s: np.ndarray) -> np.uint64:
    # xoshiro256**: tiny state, good statistics, identical on every platform.
    result = _rotl_nb(s[1] * np.uint64(5), np.uint64(7)) * np.uint64(9)
    t = s[1] << np.uint64(17)
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = _rotl_nb(s[3], np.uint64(45))
    return result


@njit(cache=True)
def _unif_nb(s: np.ndarray) -> float:
    return float(_u64_nb(s) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def _exp_nb(s: np.ndarray) -> float:
    return -math.log(1.0 - _unif_nb(s))


@njit(cache=True)
def _norm_nb(s: np.ndarray) -> float:
    u1 = 1.0 - _unif_nb(s)
    u2 = _unif_nb(s)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@njit(cache=True)
def latent_nb(n: int, rng: np.ndarray, st: np.ndarray, lp: np.ndarray, px: np.ndarray, basis: np.ndarray) -> None:
    """Advance the latent state ``st`` = [log price, log-vol factor, basis] by ``n`` grid steps.

    ``lp`` = [price0, sigma per sqrt(step), factor decay per step, factor shock std per step,
    jump probability per step, jump std, basis decay per step, basis shock std per step, basis mean].
    Writes the latent price into ``px[:n]`` and the basis into ``basis[:n]``.
    """
    x, v, b = st[0], st[1], st[2]
    sig, v_dec, v_sd = lp[1], lp[2], lp[3]
    p_jump, jump_sd = lp[4], lp[5]
    b_dec, b_sd, b_mean = lp[6], lp[7], lp[8]
    v_var = v_sd * v_sd / (1.0 - v_dec * v_dec)
    for i in range(n):
        v = v * v_dec + v_sd * _norm_nb(rng)
        # exp(v - var/2) keeps the mean variance at sig**2 whatever the factor's spread
        x += sig * math.exp(v - 0.5 * v_var) * _norm_nb(rng)
        if _unif_nb(rng) < p_jump:
            x += jump_sd * _norm_nb(rng)
        b = b_mean + (b - b_mean) * b_dec + b_sd * _norm_nb(rng)
        px[i] = lp[0] * math.exp(x)
        basis[i] = b
    st[0], st[1], st[2] = x, v, b


@njit(cache=True)
def _px_nb(tick: int, p: np.ndarray) -> float:
    # Dividing by an integral 1/tick yields the double nearest the decimal price (60000.1, not ...0006).
    if p[P_INV_TICK] > 0.0:
        return tick / p[P_INV_TICK]
    return tick * p[P_TICK]


@njit(cache=True)
def _row_nb(out, n: int, ev: np.uint64, t: int, loc: int, px: float, qty: float, ival: int) -> int:
    r = out[n]
    r.ev = ev | _F_EXCH_LOCAL
    r.exch_ts = t
    r.local_ts = loc
    r.px = px
    r.qty = qty
    r.order_id = 0
    r.ival = ival
    r.fval = 0.0
    return n + 1


@njit(cache=True)
def _side_price_nb(side: int, key: int) -> int:
    # Keys sort best-first on both sides: asks by price, bids by minus price.
    return key if side == 1 else -key


@njit(cache=True)
def _depth_row_nb(out, n, side, key, lots, t, loc, uid, p) -> int:
    flag = _F_DEPTH | (_F_BUY if side == 0 else _F_SELL)
    return _row_nb(out, n, flag, t, loc, _px_nb(_side_price_nb(side, key), p), lots / p[P_INV_LOT], uid)


@njit(cache=True)
def _lower_bound_nb(keys: np.ndarray, cnt: int, key: int) -> int:
    lo, hi = 0, cnt
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True)
def _remove_nb(kp: np.ndarray, kq: np.ndarray, cnt: np.ndarray, side: int, i: int) -> None:
    c = cnt[side]
    for j in range(i, c - 1):
        kp[side, j] = kp[side, j + 1]
        kq[side, j] = kq[side, j + 1]
    cnt[side] = c - 1


@njit(cache=True)
def _insert_nb(kp, kq, cnt, side, pos, key, lots) -> None:
    c = cnt[side]
    for j in range(c, pos, -1):
        kp[side, j] = kp[side, j - 1]
        kq[side, j] = kq[side, j - 1]
    kp[side, pos] = key
    kq[side, pos] = lots
    cnt[side] = c + 1


@njit(cache=True)
def _lots_nb(rng, mu: float, sig: float) -> int:
    return max(1, int(math.exp(mu + sig * _norm_nb(rng))))


@njit(cache=True)
def _quote_key_nb(side: int, f: float, p: np.ndarray, kp, cnt) -> int:
    """The key of a maker's quote at the fair price, never crossing the opposite touch."""
    if side == 0:
        px = int(math.floor(f - p[P_HALF_SPREAD]))
        if cnt[1] > 0:
            px = min(px, kp[1, 0] - 1)
        return -px
    px = int(math.ceil(f + p[P_HALF_SPREAD]))
    if cnt[0] > 0:
        px = max(px, -kp[0, 0] + 1)
    return px


@njit(cache=True)
def _refill_nb(out, n, side, f, t, loc, uid, p, rng, kp, kq, cnt) -> int:
    """Re-quote a side that ran short of levels, behind its farthest level (so it cannot cross)."""
    target = int(p[P_MIN_LEVELS])
    if cnt[side] >= target:
        return n
    if cnt[side] == 0:
        key = _quote_key_nb(side, f, p, kp, cnt)
    else:
        key = kp[side, cnt[side] - 1] + 1 + int(_exp_nb(rng) * p[P_REFILL_GAP])
    while cnt[side] < target:
        lots = _lots_nb(rng, p[P_ADD_MU], p[P_ADD_SIG])
        _insert_nb(kp, kq, cnt, side, cnt[side], key, lots)
        n = _depth_row_nb(out, n, side, key, lots, t, loc, uid, p)
        key += 1 + int(_exp_nb(rng) * p[P_REFILL_GAP])
    return n


@njit(cache=True)
def _sweep_nb(out, n, side, rem, limit_key, t, loc, uid, p, ist, kp, kq, cnt) -> int:
    """An aggressive order consuming ``side`` from the touch up to ``limit_key``: trade rows, then depth rows.

    ``side`` is the side being consumed; the initiator is on the other side.
    """
    flag = _F_TRADE | (_F_BUY if side == 1 else _F_SELL)
    j = 0
    while rem > 0 and j < cnt[side] and j < MAX_SWEEP and kp[side, j] <= limit_key:
        fill = min(rem, kq[side, j])
        ist[S_TID] += 1
        n = _row_nb(out, n, flag, t, loc, _px_nb(_side_price_nb(side, kp[side, j]), p), fill / p[P_INV_LOT],
                    ist[S_TID])
        kq[side, j] -= fill
        rem -= fill
        j += 1
    for i in range(j):
        n = _depth_row_nb(out, n, side, kp[side, i], kq[side, i], t, loc, uid, p)
    emptied = j if (j == 0 or kq[side, j - 1] == 0) else j - 1
    for _ in range(emptied):
        _remove_nb(kp, kq, cnt, side, 0)
    return n


@njit(cache=True)
def simulate_nb(out: np.ndarray, t_end: int, fair: np.ndarray, grid_t0: int, grid_dt: int, p: np.ndarray,
                ist: np.ndarray, fst: np.ndarray, rng: np.ndarray, kp: np.ndarray, kq: np.ndarray,
                cnt: np.ndarray) -> int:
    """Run one asset's book until ``t_end`` (ns) or until ``out`` is nearly full; return rows written.

    ``fair`` holds the asset's fair price in ticks on the grid ``grid_t0 + i * grid_dt``. The time of
    the next event is kept in ``ist[S_NEXT_T]``, so splitting a run into calls changes nothing.
    """
    n = 0
    kmax = kp.shape[1]
    room = 2 * kmax + 2 * MAX_SWEEP + 8
    pull_rate = p[P_PULL_RATE]
    mo_base, mo_alpha, mo_beta = p[P_MO_BASE], p[P_MO_ALPHA], p[P_MO_BETA]
    min_levels = int(p[P_MIN_LEVELS])
    nf = fair.shape[0]
    while n + room <= out.shape[0]:
        t = ist[S_NEXT_T]
        if t >= t_end:
            break
        gi = (t - grid_t0) // grid_dt
        f = fair[min(max(gi, 0), nf - 1)]
        excite = fst[0] * math.exp(-mo_beta * (t - ist[S_MO_T]) * 1e-9)
        mo_rate = mo_base + excite
        # Book activity follows the trade bursts (P_BURST = 0: constant rates).
        burst = 1.0 + p[P_BURST] * excite
        add_rate = p[P_ADD_RATE] * burst
        cancel_rate = p[P_CANCEL_RATE] * burst
        loc = max(ist[S_LAST_LOCAL] + int(p[P_LOCAL_STEP]),
                  t + int(math.exp(p[P_LAT_MU] + p[P_LAT_SIG] * _norm_nb(rng))))
        # Thinning: candidates came at the bound fst[1] set at the previous event; the market-order
        # intensity only decays between market orders, so the bound holds and the rest is "no event".
        u = _unif_nb(rng) * fst[1]
        n0 = n
        ist[S_UID] += 1
        uid = ist[S_UID]
        if u < add_rate:
            side = 0 if _unif_nb(rng) < 0.5 else 1
            # Many adds join or improve the touch (makers competing for queue), the rest spread out.
            if _unif_nb(rng) < p[P_TOUCH_PROB]:
                d = 0
            elif p[P_DIST_SIG] > 0.0:
                d = int(min(p[P_MAX_DIST], p[P_ADD_DIST] * math.exp(p[P_DIST_SIG] * _norm_nb(rng))))
            else:
                d = int(_exp_nb(rng) * p[P_ADD_DIST])
            qkey = _quote_key_nb(side, f, p, kp, cnt)
            key = qkey + d
            lots = _lots_nb(rng, p[P_ADD_MU], p[P_ADD_SIG])
            c = cnt[side]
            pos = _lower_bound_nb(kp[side], c, key)
            if pos < c and kp[side, pos] == key:
                kq[side, pos] += lots
                n = _depth_row_nb(out, n, side, key, kq[side, pos], t, loc, uid, p)
            elif c < kmax:
                _insert_nb(kp, kq, cnt, side, pos, key, lots)
                n = _depth_row_nb(out, n, side, key, lots, t, loc, uid, p)
            elif pos < kmax:
                n = _depth_row_nb(out, n, side, kp[side, c - 1], 0, t, loc, uid, p)
                cnt[side] = c - 1
                _insert_nb(kp, kq, cnt, side, pos, key, lots)
                n = _depth_row_nb(out, n, side, key, lots, t, loc, uid, p)
            else:
                kq[side, c - 1] += lots
                n = _depth_row_nb(out, n, side, kp[side, c - 1], kq[side, c - 1], t, loc, uid, p)
        elif u < add_rate + cancel_rate:
            side = 0 if _unif_nb(rng) < 0.5 else 1
            c = cnt[side]
            full = _unif_nb(rng) < p[P_FULL_CANCEL]
            frac = 0.1 + 0.8 * _unif_nb(rng)
            if p[P_CANCEL_SIG] > 0.0:
                lvl = int(p[P_CANCEL_LVL] * math.exp(p[P_CANCEL_SIG] * _norm_nb(rng)))
            else:
                lvl = int(_exp_nb(rng) * p[P_CANCEL_LVL])
            if c > 0:
                if kp[side, c - 1] - kp[side, 0] > p[P_MAX_DIST]:
                    i = c - 1
                    full = True
                else:
                    i = min(c - 1, lvl)
                    if c <= min_levels:
                        full = False
                q = kq[side, i]
                rem = 0 if full else q - max(1, int(q * frac))
                if rem > 0 or full:
                    kq[side, i] = rem
                    n = _depth_row_nb(out, n, side, kp[side, i], rem, t, loc, uid, p)
                    if rem == 0:
                        _remove_nb(kp, kq, cnt, side, i)
                n = _refill_nb(out, n, side, f, t, loc, uid, p, rng, kp, kq, cnt)
        elif u < add_rate + cancel_rate + 2.0 * pull_rate:
            side = 0 if u < add_rate + cancel_rate + pull_rate else 1
            # Stale: the fair price has run through this side's touch (bids above it, asks below it).
            fk = -f if side == 0 else f
            stale_key = fk - p[P_PULL_TOL]
            take_key = fk - p[P_TAKE_TOL]
            take = _unif_nb(rng) < p[P_TAKE_PROB]
            if cnt[side] > 0 and kp[side, 0] <= stale_key:
                if take and kp[side, 0] <= take_key:
                    n = _sweep_nb(out, n, side, 1 << 62, int(math.floor(take_key)), t, loc, uid, p, ist,
                                  kp, kq, cnt)
                else:
                    while cnt[side] > 0 and kp[side, 0] <= stale_key:
                        n = _depth_row_nb(out, n, side, kp[side, 0], 0, t, loc, uid, p)
                        _remove_nb(kp, kq, cnt, side, 0)
                n = _refill_nb(out, n, side, f, t, loc, uid, p, rng, kp, kq, cnt)
        elif u < add_rate + cancel_rate + 2.0 * pull_rate + mo_rate:
            fst[0] = fst[0] * math.exp(-mo_beta * (t - ist[S_MO_T]) * 1e-9) + mo_alpha
            ist[S_MO_T] = t
            lean = 0.0
            if cnt[0] > 0 and cnt[1] > 0:
                mid = 0.5 * (kp[1, 0] - kp[0, 0])
                spread = kp[1, 0] + kp[0, 0]
                # Uninformed flow still leans toward the fair price: trade signs carry information.
                lean = 0.3 * math.tanh((f - mid) / (spread + 1.0))
            # A buy consumes the asks (side 1), a sell the bids (side 0).
            side = 1 if _unif_nb(rng) < 0.5 + lean else 0
            lots = _lots_nb(rng, p[P_MO_MU], p[P_MO_SIG])
            if cnt[side] > 0:
                n = _sweep_nb(out, n, side, lots, 1 << 62, t, loc, uid, p, ist, kp, kq, cnt)
                n = _refill_nb(out, n, side, f, t, loc, uid, p, rng, kp, kq, cnt)
        if n == n0:
            ist[S_UID] -= 1  # nothing happened: keep update ids dense
        else:
            ist[S_LAST_LOCAL] = loc
        excite = fst[0] * math.exp(-mo_beta * (t - ist[S_MO_T]) * 1e-9)
        burst = 1.0 + p[P_BURST] * excite
        bound = p[P_ADD_RATE] * burst + p[P_CANCEL_RATE] * burst + 2.0 * pull_rate + mo_base + excite
        fst[1] = bound
        ist[S_NEXT_T] = t + 1 + int(_exp_nb(rng) / bound * 1e9)
    return n


@njit(cache=True)
def snapshot_nb(out: np.ndarray, t: int, p: np.ndarray, ist: np.ndarray, rng: np.ndarray, kp: np.ndarray,
                kq: np.ndarray, cnt: np.ndarray) -> int:
    """Write the whole book as clear + snapshot rows (bids then asks, best first); return rows written."""
    loc = max(ist[S_LAST_LOCAL] + int(p[P_LOCAL_STEP]),
              t + int(math.exp(p[P_LAT_MU] + p[P_LAT_SIG] * _norm_nb(rng))))
    ist[S_LAST_LOCAL] = loc
    n = 0
    for side in range(2):
        c = cnt[side]
        if c == 0:
            continue
        sflag = _F_BUY if side == 0 else _F_SELL
        # Clear up to the farthest level we are about to send, as hftbacktest's own converters do.
        n = _row_nb(out, n, _F_CLEAR | sflag, t, loc, _px_nb(_side_price_nb(side, kp[side, c - 1]), p), 0.0,
                    ist[S_UID])
        for i in range(c):
            n = _row_nb(out, n, _F_SNAP | sflag, t, loc, _px_nb(_side_price_nb(side, kp[side, i]), p),
                        kq[side, i] / p[P_INV_LOT], ist[S_UID])
    return n


MS = 1_000_000


@njit(cache=True)
def _publish_nb(out, n, t, p, ist, rng, kp, kq, cnt, touched, tcnt) -> int:
    """One depth message at ``t``: every level touched since the last one, at its quantity now (0 if
    gone), bids then asks by ascending price as Binance lists them; ival = the message's id."""
    if tcnt[0] == 0 and tcnt[1] == 0:
        return n
    loc = max(ist[S_LAST_LOCAL] + int(p[P_LOCAL_STEP]),
              t + int(math.exp(p[P_LAT_MU] + p[P_LAT_SIG] * _norm_nb(rng))))
    ist[S_LAST_LOCAL] = loc
    ist[S_MSG] += 1
    for side in range(2):
        keys = np.sort(touched[side, :tcnt[side]])
        m = keys.shape[0]
        for j in range(m):
            # Bid keys are minus prices: walk them backwards for ascending prices on both sides.
            i = m - 1 - j if side == 0 else j
            key = keys[i]
            if (side == 0 and i + 1 < m and keys[i + 1] == key) or (side == 1 and i > 0 and keys[i - 1] == key):
                continue
            c = cnt[side]
            pos = _lower_bound_nb(kp[side], c, key)
            lots = kq[side, pos] if pos < c and kp[side, pos] == key else 0
            n = _depth_row_nb(out, n, side, key, lots, t, loc, ist[S_MSG], p)
        tcnt[side] = 0
    return n


@njit(cache=True)
def messages_nb(out: np.ndarray, scratch: np.ndarray, t_end: int, fair: np.ndarray, grid_t0: int, grid_dt: int,
                p: np.ndarray, ist: np.ndarray, fst: np.ndarray, rng: np.ndarray, kp: np.ndarray, kq: np.ndarray,
                cnt: np.ndarray, touched: np.ndarray, tcnt: np.ndarray, gap: np.ndarray) -> int:
    """:func:`simulate_nb` behind a venue feed that batches depth: run the book a message interval at a
    time (into ``scratch``), pass its trades through at once (exchange time in whole ms, as Binance
    stamps it) and remember the levels its depth rows touched, then publish them as one message at
    the interval's end (:func:`_publish_nb`). ``gap`` = [min, max] ms between messages. Stops at
    ``t_end`` or when ``out`` is nearly full; the open interval carries over to the next call.
    """
    n = 0
    cap = touched.shape[1]
    while n + scratch.shape[0] + 2 * cap <= out.shape[0]:
        nxt = ist[S_NEXT_MSG]
        stop = min(t_end, nxt)
        if ist[S_NEXT_T] < stop:
            m = simulate_nb(scratch, stop, fair, grid_t0, grid_dt, p, ist, fst, rng, kp, kq, cnt)
            for i in range(m):
                r = scratch[i]
                if (r.ev & np.uint64(0xFF)) == _F_TRADE:
                    out[n] = r
                    out[n].exch_ts = r.exch_ts - r.exch_ts % MS
                    n += 1
                else:
                    side = 0 if (r.ev & _F_BUY) != 0 else 1
                    key = int(round(r.px * p[P_INV_TICK])) if p[P_INV_TICK] > 0.0 else int(round(r.px / p[P_TICK]))
                    touched[side, tcnt[side]] = -key if side == 0 else key
                    tcnt[side] += 1
            if m and max(tcnt[0], tcnt[1]) + scratch.shape[0] > cap:
                # More touches than one message can hold (not seen at the profiles' rates): publish
                # now, at the last event's time, rather than lose one.
                last = scratch[m - 1].exch_ts
                n = _publish_nb(out, n, last - last % MS, p, ist, rng, kp, kq, cnt, touched, tcnt)
            continue
        if nxt >= t_end:
            break
        n = _publish_nb(out, n, nxt, p, ist, rng, kp, kq, cnt, touched, tcnt)
        ist[S_NEXT_MSG] = nxt + (gap[0] + int(_unif_nb(rng) * (gap[1] - gap[0] + 1))) * MS
    return n


@njit(cache=True)
def init_book_nb(f: float, p: np.ndarray, rng: np.ndarray, kp: np.ndarray, kq: np.ndarray,
                 cnt: np.ndarray) -> None:
    """A plausible starting book around ``f`` (ticks); the warm-up then makes it the model's own."""
    cnt[0] = 0
    cnt[1] = 0
    for side in range(2):
        key = _quote_key_nb(side, f, p, kp, cnt)
        for i in range(int(p[P_MIN_LEVELS])):
            kp[side, i] = key
            kq[side, i] = _lots_nb(rng, p[P_ADD_MU], p[P_ADD_SIG])
            key += 1 + int(_exp_nb(rng) * p[P_REFILL_GAP])
        cnt[side] = int(p[P_MIN_LEVELS])


# ---------------------------------------------------------------------------------------------------
# Python side


def _splitmix64(x: int) -> tuple[int, int]:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x, z ^ (z >> 31)


def _rng(seed: int, stream: int) -> np.ndarray:
    """An independent xoshiro256** state per (seed, stream)."""
    x = (seed * 0x100000001B3 + stream * 0x9E3779B9) & 0xFFFFFFFFFFFFFFFF
    words = []
    for _ in range(4):
        x, z = _splitmix64(x)
        words.append(z)
    return np.array(words, dtype=np.uint64)


def _inverse(step: float) -> float:
    inv = round(1.0 / step)
    return float(inv) if inv > 0 and abs(inv * step - 1.0) < 1e-9 else 0.0


def _params(m: AssetModel) -> np.ndarray:
    p = np.zeros(N_PARAMS)
    p[P_TICK] = m.tick_size
    p[P_INV_TICK] = _inverse(m.tick_size)
    p[P_INV_LOT] = 1.0 / m.lot_size if _inverse(m.lot_size) == 0.0 else _inverse(m.lot_size)
    p[P_ADD_RATE] = m.add_rate
    p[P_CANCEL_RATE] = m.cancel_rate
    p[P_MO_BASE] = m.mo_base_rate
    p[P_MO_ALPHA] = m.mo_alpha
    p[P_MO_BETA] = m.mo_beta
    p[P_MO_MU] = math.log(m.mo_size_median / m.lot_size)
    p[P_MO_SIG] = m.mo_size_sigma
    p[P_ADD_MU] = math.log(m.add_size_median / m.lot_size)
    p[P_ADD_SIG] = m.add_size_sigma
    p[P_HALF_SPREAD] = m.half_spread
    p[P_ADD_DIST] = m.add_dist_mean
    p[P_REFILL_GAP] = m.refill_gap_mean
    p[P_CANCEL_LVL] = m.cancel_level_mean
    p[P_FULL_CANCEL] = m.full_cancel_prob
    p[P_PULL_RATE] = m.pull_rate
    p[P_PULL_TOL] = m.pull_tol
    p[P_TAKE_TOL] = m.take_tol
    p[P_TAKE_PROB] = m.take_prob
    p[P_MAX_DIST] = m.max_dist
    p[P_MIN_LEVELS] = m.min_levels
    p[P_LAT_MU] = math.log(m.latency_median_ms * 1e6)
    p[P_LAT_SIG] = m.latency_sigma
    p[P_TOUCH_PROB] = m.touch_prob
    p[P_DIST_SIG] = m.add_dist_sigma
    p[P_CANCEL_SIG] = m.cancel_level_sigma
    p[P_BURST] = m.burst
    # A batched feed's messages arrive at distinct local µs, as on a real socket: the converters then
    # see one order for exchange and local time (no row written twice), also from Tardis' µs.
    p[P_LOCAL_STEP] = 1000.0 if m.msg_interval_ms > 0 else 0.0
    return p


def _latent_params(lm: LatentModel) -> np.ndarray:
    dt = GRID_NS / NS
    year_s = 365.0 * 86400.0
    v_dec = 0.5 ** (dt / lm.vol_factor_halflife_s)
    b_dec = 0.5 ** (dt / lm.basis_halflife_s)
    return np.array([
        lm.price0,
        lm.vol_annual * math.sqrt(dt / year_s),
        v_dec,
        lm.vol_factor_std * math.sqrt(1.0 - v_dec * v_dec),
        lm.jump_rate_per_hour * dt / 3600.0,
        lm.jump_std,
        b_dec,
        lm.basis_std * math.sqrt(1.0 - b_dec * b_dec),
        lm.basis_mean,
    ])


class _AssetRun:
    """One asset's mutable generator state and its day spool."""

    def __init__(self, model: AssetModel, seed: int, stream: int, f0: float) -> None:
        self.model = model
        self.p = _params(model)
        self.rng = _rng(seed, stream)
        self.ist = np.zeros(N_ISTATE, np.int64)
        self.fst = np.array([0.0, model.add_rate + model.cancel_rate + 2 * model.pull_rate + model.mo_base_rate])
        k = model.max_levels
        self.kp = np.zeros((2, k), np.int64)
        self.kq = np.zeros((2, k), np.int64)
        self.cnt = np.zeros(2, np.int64)
        init_book_nb(f0 / model.tick_size, self.p, self.rng, self.kp, self.kq, self.cnt)
        self.batched = model.msg_interval_ms > 0
        if self.batched:
            scratch = 1 << 15
            self.scratch = np.zeros(scratch, event_dtype)
            self.touched = np.zeros((2, 2 * scratch), np.int64)
            self.tcnt = np.zeros(2, np.int64)
            jitter = max(1, round(0.1 * model.msg_interval_ms))
            self.gap = np.array([max(1, round(model.msg_interval_ms) - jitter), round(model.msg_interval_ms) + jitter])
            self.buf = np.zeros(1 << 19, event_dtype)
        else:
            self.buf = np.zeros(1 << 18, event_dtype)

    def start(self, t: int) -> None:
        self.ist[S_NEXT_T] = t
        self.ist[S_LAST_LOCAL] = t
        self.ist[S_NEXT_MSG] = t - t % 1_000_000

    def run(self, t_end: int, fair_ticks: np.ndarray, grid_t0: int, sink: Any) -> None:
        while True:
            if self.batched:
                n = messages_nb(self.buf, self.scratch, t_end, fair_ticks, grid_t0, GRID_NS, self.p, self.ist,
                                self.fst, self.rng, self.kp, self.kq, self.cnt, self.touched, self.tcnt, self.gap)
            else:
                n = simulate_nb(self.buf, t_end, fair_ticks, grid_t0, GRID_NS, self.p, self.ist, self.fst,
                                self.rng, self.kp, self.kq, self.cnt)
            if sink is not None and n:
                sink(self.buf[:n])
            if self.ist[S_NEXT_T] >= t_end and (not self.batched or self.ist[S_NEXT_MSG] >= t_end):
                return

    def snapshot(self, t: int) -> np.ndarray:
        out = np.zeros(2 * self.model.max_levels + 2, event_dtype)
        n = snapshot_nb(out, t, self.p, self.ist, self.rng, self.kp, self.kq, self.cnt)
        if self.batched:
            out["ival"][:n] = self.ist[S_MSG] + 1  # the snapshot's lastUpdateId: the next message covers it
        return out[:n]


class _DaySpool:
    """Rows of one day spooled to a temp file beside the catalog day, then streamed into the npz."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".synth-", suffix=".spool", dir=folder)
        self.path = Path(name)
        self.fh = os.fdopen(fd, "wb")
        self.rows = 0
        self.first_ts = None
        self.last_ts = None
        self.counts = {"depth": 0, "trade": 0, "snapshot": 0, "clear": 0}

    def __call__(self, rows: np.ndarray) -> None:
        self.fh.write(rows.tobytes())
        self.rows += len(rows)
        if self.first_ts is None:
            self.first_ts = int(rows["exch_ts"][0])
        self.last_ts = int(rows["exch_ts"][-1])
        kind = rows["ev"] & np.uint64(0xFF)
        self.counts["depth"] += int(np.count_nonzero(kind == DEPTH_EVENT))
        self.counts["trade"] += int(np.count_nonzero(kind == TRADE_EVENT))
        self.counts["snapshot"] += int(np.count_nonzero(kind == DEPTH_SNAPSHOT_EVENT))
        self.counts["clear"] += int(np.count_nonzero(kind == DEPTH_CLEAR_EVENT))

    def commit(self, path: Path, compression: str) -> None:
        self.fh.close()
        try:
            _write_npz(path, self.path, self.rows, compression)
        finally:
            self.discard()

    def discard(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        self.path.unlink(missing_ok=True)


def _write_npz(path: Path, spool: Path, rows: int, compression: str) -> None:
    """The catalog's npz, with the rows copied from the spool file in 16 MiB blocks, so a 40 M-row
    day never sits in memory (a memmap would: its pages count toward the resident set as read)."""
    if spool.stat().st_size != rows * event_dtype.itemsize:
        raise QuotelabError(f"{spool}: spool holds {spool.stat().st_size} bytes, expected {rows} events")

    def body(fid: Any) -> None:
        with open(spool, "rb") as src:
            shutil.copyfileobj(src, fid, 16 << 20)

    _catalog.write_event_npz(path, rows, body, compression)


_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str, flag: str = "--duration") -> float:
    """Seconds in ``text`` such as ``90s``, ``15m``, ``1h``, ``1h30m``, ``2d`` or a plain number of seconds."""
    s = text.strip().lower()
    try:
        seconds = float(s)
    except ValueError:
        m = _DURATION_RE.match(s)
        if not s or m is None or not any(m.groups()):
            raise SynthError(
                f"{flag} {text!r} is not a duration; expected e.g. 90s, 15m, 1h, 1h30m, 2d or a number of seconds"
            ) from None
        d, h, mi, se = (float(g) if g else 0.0 for g in m.groups())
        seconds = d * 86400 + h * 3600 + mi * 60 + se
    if not seconds > 0 or not math.isfinite(seconds):
        raise SynthError(f"{flag} {text!r} must be a positive duration")
    return seconds


def parse_start(text: str | datetime, flag: str = "--start") -> datetime:
    """A UTC datetime from ISO text (naive means UTC)."""
    if isinstance(text, datetime):
        dt = text
    else:
        try:
            dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise SynthError(f"{flag} {text!r} is not an ISO date-time; expected e.g. 2024-01-01T00:00:00") from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def parse_assets(text: str | list[str] | tuple[str, ...], flag: str = "--assets") -> tuple[str, ...]:
    names = [a.strip().lower() for a in (text.split(",") if isinstance(text, str) else text) if a.strip()]
    unknown = [a for a in names if a not in ASSETS]
    if unknown or not names:
        raise SynthError(
            f"{flag}: unknown asset(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ASSETS)}"
        )
    return tuple(a for a in ASSETS if a in names)  # fixed order: the output does not depend on how they were listed


def _ns(dt: datetime) -> int:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    delta = dt - epoch
    return (delta.days * 86400 + delta.seconds) * NS + delta.microseconds * 1000


def generate(
    catalog: Path | str,
    seed: int = 7,
    start: str | datetime = "2024-01-01T00:00:00",
    duration_s: float = 3600.0,
    assets: str | list[str] | tuple[str, ...] = ("perp", "spot"),
    latent: LatentModel | None = None,
    compression: str = "deflate",
    funding_interval_s: float = 8 * 3600.0,
    profile: str = "demo",
) -> dict[str, Any]:
    """Write the synthetic market for ``[start, start + duration_s)`` into ``catalog``; return a summary.
    ``compression``: ``deflate`` or ``none`` (see :func:`quotelab.data.catalog.write_event_npz`).

    Days are UTC days of exchange time; each day file starts with a full snapshot of the book as it
    stands at the day's first instant. Day files that exist are replaced; meta.json is merged, each
    symbol's days and meta.json committed together.
    The perp also gets a funding side table (:class:`_Funding`), settling every ``funding_interval_s``.
    """
    lm = latent or LatentModel()
    keys = parse_assets(assets)
    if profile not in PROFILES:
        raise SynthError(f"--profile {profile!r} is not a profile; choose from {', '.join(PROFILES)}")
    models = PROFILES[profile]
    t_start = parse_start(start)
    if not duration_s > 0 or not math.isfinite(duration_s):
        raise SynthError(f"duration must be a positive number of seconds, got {duration_s}")
    if compression not in _catalog.COMPRESSIONS:
        raise SynthError(f"unknown compression {compression!r}; use one of {', '.join(_catalog.COMPRESSIONS)}")
    if not 0 <= seed < 2**63:
        raise SynthError(f"--seed must be a non-negative 64-bit integer, got {seed}")
    if not funding_interval_s >= 1 or not math.isfinite(funding_interval_s):
        raise SynthError(f"--funding-interval must be at least 1 s, got {funding_interval_s}")
    root = Path(catalog)
    t0 = _ns(t_start)
    t1 = t0 + int(round(duration_s * NS))
    wall = time.perf_counter()

    lag_steps = int(round(lm.spot_lag_s * NS / GRID_NS))
    lp = _latent_params(lm)
    lrng = _rng(seed, 0)
    lstate = np.array([0.0, 0.0, lm.basis_mean])
    tail = np.full(lag_steps, lm.price0)
    runs = {k: _AssetRun(models[k], seed, i + 1, lm.price0 - (lm.basis_mean if k == "spot" else 0.0))
            for i, k in enumerate(ASSETS) if k in keys}

    def fair_chunk(c0: int, c1: int) -> dict[str, np.ndarray]:
        nonlocal tail
        n = -(-(c1 - c0) // GRID_NS)
        px = np.empty(n)
        basis = np.empty(n)
        latent_nb(n, lrng, lstate, lp, px, basis)
        ext = np.concatenate([tail, px])
        tail = ext[len(ext) - lag_steps:]
        out: dict[str, np.ndarray] = {}
        for k, run in runs.items():
            fair = px if k == "perp" else ext[:n] - basis
            out[k] = fair / run.model.tick_size
        out["_px"], out["_index"] = px, ext[:n] - basis
        return out

    funding = _Funding(int(round(funding_interval_s * NS)), ASSETS["perp"].latency_median_ms) if "perp" in runs \
        else None

    # Warm-up: the book evolves before `start` without being written.
    warm0 = t0 - WARMUP_S * NS
    for run in runs.values():
        run.start(warm0)
    c = warm0
    while c < t0:
        c1 = min(t0, c + CHUNK_S * NS)
        fairs = fair_chunk(c, c1)
        for k, run in runs.items():
            run.run(c1, fairs[k], c, None)
        c = c1

    days_out: dict[str, dict[str, dict[str, Any]]] = {ASSETS[k].symbol: {} for k in runs}
    with _catalog.Staging(root) as stage:
        day_start = t0
        while day_start < t1:
            d = datetime.fromtimestamp(day_start // NS, UTC)
            next_midnight = _ns(datetime(d.year, d.month, d.day, tzinfo=UTC) + timedelta(days=1))
            day_end = min(t1, next_midnight)
            day = d.strftime("%Y%m%d")
            spools = {k: _DaySpool(stage.day_path(VENUE, run.model.symbol, day).parent) for k, run in runs.items()}
            try:
                for k, run in runs.items():
                    spools[k](run.snapshot(day_start))
                c = day_start
                while c < day_end:
                    c1 = min(day_end, c + CHUNK_S * NS)
                    fairs = fair_chunk(c, c1)
                    for k, run in runs.items():
                        run.run(c1, fairs[k], c, spools[k])
                    if funding is not None:
                        funding.add(c, c1, fairs["_px"], fairs["_index"])
                    c = c1
                for k, run in runs.items():
                    sp = spools[k]
                    sp.commit(stage.day_path(VENUE, run.model.symbol, day), compression)
                    days_out[run.model.symbol][day] = {
                        "first_ts": sp.first_ts,
                        "last_ts": sp.last_ts,
                        "events": sp.rows,
                        "counts": sp.counts,
                        "quality": _quality(seed, run.model, lm, t0, t1),
                    }
                    if k == "perp" and funding is not None:
                        table = funding.take()
                        _catalog.write_funding(stage.dir, VENUE, run.model.symbol, day, table)
                        days_out[run.model.symbol][day]["funding_rows"] = len(table)
            finally:
                for sp in spools.values():
                    sp.discard()
            day_start = day_end
        with stop_signals() as late:  # every symbol's days or none: a stop waits for the commits
            for run in runs.values():
                stage.commit(VENUE, run.model.symbol, _instrument(run.model), days_out[run.model.symbol])
            stage.close()
    if late:
        raise stopped(Interrupted(late[0]), f"synth: every day was written to {root} (the stop came while they "
                                            f"were being committed); nothing else was (no --raw files)")

    summary: dict[str, Any] = {
        "catalog": str(root),
        "venue": VENUE,
        "seed": seed,
        "start": t_start.isoformat(),
        "duration_s": duration_s,
        "symbols": {},
    }
    for run in runs.values():
        m = run.model
        days = days_out[m.symbol]
        summary["symbols"][m.symbol] = {
            "days": sorted(days),
            "events": sum(v["events"] for v in days.values()),
            "trades": sum(v["counts"]["trade"] for v in days.values()),
            "files": [str(_catalog.day_path(root, VENUE, m.symbol, day)) for day in sorted(days)],
        }
    summary["seconds"] = round(time.perf_counter() - wall, 3)
    return summary


class _Funding:
    """The perp's mark-price stream, once a second: mark = the perp's fair price, index = the spot's
    (the lagging latent price minus the basis), and the funding rate announced for the next
    settlement, the mean premium (mark − index) / index since the last one. Binance adds an interest
    term clamped to ±0.05 % of it, which would pin this market's rate (premium ≈ 0.01 %) at 0.01 %."""

    def __init__(self, interval_ns: int, latency_ms: float) -> None:
        self.interval = interval_ns
        self.latency = int(latency_ms * 1e6)
        self.sum, self.n, self.settle = 0.0, 0, -1
        self.rows: list[tuple] = []

    def add(self, c0: int, c1: int, px: np.ndarray, index: np.ndarray) -> None:
        for t in range(-(-c0 // NS) * NS, c1, NS):
            i = (t - c0) // GRID_NS
            nxt = (t // self.interval + 1) * self.interval
            if nxt != self.settle:
                self.sum, self.n, self.settle = 0.0, 0, nxt
            self.sum += (px[i] - index[i]) / index[i]
            self.n += 1
            self.rows.append((t, t + self.latency, px[i], index[i], self.sum / self.n, nxt))

    def take(self) -> np.ndarray:
        from quotelab.data.funding import funding_dtype

        out = np.array(self.rows, dtype=funding_dtype)
        self.rows = []
        return out


def _instrument(m: AssetModel) -> dict[str, Any]:
    return {
        "tick_size": m.tick_size,
        "lot_size": m.lot_size,
        "contract": {"kind": "linear", "size": 1.0},
        "market": m.market,
    }


def _quality(seed: int, m: AssetModel, lm: LatentModel, t0: int, t1: int) -> dict[str, Any]:
    q: dict[str, Any] = {"synthetic": True, "seed": seed, "window": [t0, t1]}
    if m.key == "spot":
        # What a researcher should recover from the data, recorded so tests and demos can check it.
        q["lag_behind_latent_s"] = lm.spot_lag_s
        q["basis_mean"] = lm.basis_mean
    return q


# ---------------------------------------------------------------------------------------------------
# A market with a known trade-arrival law, for `quotelab calibrate`

ARRIVAL_SYMBOL = "SYNARRIVAL"


def arrival_market(
    catalog: Path | str,
    buy: tuple[float, float] = (0.5, 0.3),
    sell: tuple[float, float] | None = None,
    move_prob: float = 0.2,
    step_s: float = 0.1,
    seed: int = 7,
    start: str | datetime = "2024-01-01T00:00:00",
    duration_s: float = 3600.0,
    tick_size: float = 0.1,
    price0: float = 60_000.0,
) -> dict[str, Any]:
    """Write ``synthetic/SYNARRIVAL``: a one-tick market whose trades follow λ(δ) = A·e^(−kδ) per side.

    Every ``step_s`` the mid moves one tick up or down, each with probability ``move_prob``/2, so
    σ = √(move_prob/step_s) ticks per √second. Within each step, the deepest buyer-initiated trade
    goes beyond δ ticks above the step's opening mid with probability λ(δ)·step_s, for every δ on the
    half-tick grid (its depth is sampled continuously and rounded up to half ticks, so trade prices
    can sit between ticks); ``buy`` = (A, k) for those, ``sell`` (default: ``buy``) for the deepest
    seller-initiated trade below. A·step_s must be at most 1. The fit of ``quotelab calibrate`` measures
    exactly this per-step reach probability, so it should recover A and k up to sampling noise.
    """
    sell = buy if sell is None else sell
    for name, (a, k) in (("buy", buy), ("sell", sell)):
        if not (a > 0 and k > 0 and a * step_s <= 1):
            raise SynthError(f"arrival {name}: need A > 0, k > 0 and A·step ≤ 1, got A={a}, k={k}, step={step_s}")
    if not 0 <= move_prob <= 1:
        raise SynthError(f"move_prob must be in [0, 1], got {move_prob}")
    rng = np.random.default_rng(seed)
    t0 = _ns(parse_start(start))
    dt = int(round(step_s * NS))
    n = int(duration_s / step_s)
    if n < 3:
        raise SynthError(f"duration {duration_s} s holds fewer than 3 steps of {step_s} s")
    u = rng.random(n)
    move = np.where(u < move_prob / 2, -1, np.where(u < move_prob, 1, 0))
    move[0] = 0
    bid = int(round(price0 / tick_size)) + np.cumsum(move)  # bid tick after step k's move
    rows: list[tuple[int, int, float, float]] = []  # (ts, ev, px, qty)
    snap = DEPTH_SNAPSHOT_EVENT | EXCH_EVENT | LOCAL_EVENT
    rows += [(t0, snap | BUY_EVENT, bid[0] * tick_size, 1.0), (t0, snap | SELL_EVENT, (bid[0] + 1) * tick_size, 1.0)]
    depth_ev = DEPTH_EVENT | EXCH_EVENT | LOCAL_EVENT
    for k in np.flatnonzero(move):
        t = t0 + int(k) * dt - 1000
        old, new = int(bid[k - 1]), int(bid[k])
        # The side the mid moves toward is moved first, so the book never crosses.
        first = [(t, depth_ev | SELL_EVENT, (old + 1) * tick_size, 0.0),
                 (t, depth_ev | SELL_EVENT, (new + 1) * tick_size, 1.0)]
        second = [(t, depth_ev | BUY_EVENT, old * tick_size, 0.0), (t, depth_ev | BUY_EVENT, new * tick_size, 1.0)]
        rows += first + second if new > old else second + first
    trade_ev = TRADE_EVENT | EXCH_EVENT | LOCAL_EVENT
    for sign, (a, kk), flag in ((1, buy, BUY_EVENT), (-1, sell, SELL_EVENT)):
        # P(depth > δ) = A·step·e^(−kδ): depth = ln(A·step/U)/k, rounded up to half ticks.
        depth = np.log(a * step_s / rng.random(n)) / kk
        half = np.ceil(2 * depth)
        steps = np.flatnonzero(half >= 1)
        steps = steps[(steps >= 1) & (steps < n - 1)]
        for k in steps:
            mid = bid[k] + 0.5
            rows.append((t0 + int(k) * dt + dt // 2, trade_ev | flag, (mid + sign * half[k] / 2) * tick_size, 1.0))
    rows.sort(key=lambda r: r[0])
    ev = np.zeros(len(rows), dtype=event_dtype)
    ev["exch_ts"] = ev["local_ts"] = [r[0] for r in rows]
    ev["ev"] = [r[1] for r in rows]
    ev["px"] = [r[2] for r in rows]
    ev["qty"] = [r[3] for r in rows]
    day = datetime.fromtimestamp(t0 // NS, UTC).strftime("%Y%m%d")
    if datetime.fromtimestamp((t0 + n * dt) // NS, UTC).strftime("%Y%m%d") != day:
        raise SynthError("the arrival market must fit in one UTC day; shorten --duration or move --start")
    truth = {"buy": {"A": buy[0], "k": buy[1]}, "sell": {"A": sell[0], "k": sell[1]},
             "sigma": math.sqrt(move_prob / step_s), "step_s": step_s}
    with _catalog.Staging(catalog) as stage:
        stage.write_day(VENUE, ARRIVAL_SYMBOL, day, ev)
        stage.commit(VENUE, ARRIVAL_SYMBOL,
                     {"tick_size": tick_size, "lot_size": 1.0, "contract": {"kind": "linear", "size": 1.0},
                      "market": "perp"},
                     {day: {"first_ts": int(ev["exch_ts"][0]), "last_ts": int(ev["exch_ts"][-1]),
                            "events": len(ev), "quality": {"synthetic": True, "seed": seed, "arrival": truth}}})
    return {"symbol": ARRIVAL_SYMBOL, "day": day, "events": len(ev), "truth": truth}
