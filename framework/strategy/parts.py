"""What a strategy kernel does with each part's value, compiled into that part's own module.

:func:`quotelab.strategy.codegen.part_source` wraps one component's kernel in a function with :data:`PART_SIG`:
it calls the kernel on its slices of ``state`` and ``params`` and hands the value to its role's step here,
which records it in ``out`` and adds it to the blend's running terms, and returns the value. A strategy
kernel is then only a list of calls to these wrappers, each compiled once per process and cached on disk,
whatever strategy uses them. A non-finite value puts the part's index + 1 in ``out[STATUS]`` instead; the
strategy stops there.

The running terms live in ``out`` (``FAIR_VALUE``, ``FORECAST``, ``RISK``), summed in the same order as a
hand-written ``fv += w * v`` would, so the reservation is bit-for-bit the same.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

from quotelab import layout as L

_f8 = types.float64
# view, trades, state, params, out (all whole), then the part's index i, its state slice [s0, s1), its params
# slice [p0, p1) and where its header (weight or alpha) starts in params.
PART_SIG = _f8(_f8[:, ::1], _f8[:, :, ::1], _f8[::1], _f8[::1], _f8[::1], types.int64, types.int64,
                         types.int64, types.int64, types.int64, types.int64)


@njit(types.void(_f8[::1]), cache=True, forceinline=True, _nrt=False)
def begin_nb(out):
    """Reset the step's terms and flags before the first part runs."""
    out[L.STATUS] = 0.0
    out[L.FAIR_VALUE] = 0.0
    out[L.FORECAST] = 0.0
    out[L.RISK] = 0.0
    out[L.BID_WIDEN_TICKS] = 0.0
    out[L.ASK_WIDEN_TICKS] = 0.0
    out[L.BID_ENABLED] = 1.0
    out[L.ASK_ENABLED] = 1.0
    out[L.N_BID] = 0.0
    out[L.N_ASK] = 0.0


@njit(_f8(_f8[::1]), cache=True, forceinline=True, _nrt=False)
def reservation_nb(out):
    """The reservation price, once every fair value, signal and risk has run."""
    out[L.RESERVATION] = out[L.FAIR_VALUE] + out[L.FORECAST] - out[L.RISK]
    return out[L.RESERVATION]


@njit(inline="always")
def _record(out, v, i):
    if not np.isfinite(v):
        out[L.STATUS] = i + 1.0
        return False
    out[L.COMPONENTS + i] = v
    return True


@njit(inline="always")
def fair_value_nb(view, params, out, v, i, h):
    """A fair value, weighted by ``params[h]`` (the weights are normalised)."""
    if _record(out, v, i):
        out[L.FAIR_VALUE] += params[h] * v


@njit(inline="always")
def signal_nb(view, params, out, v, i, h):
    """A signal times its alpha: ``params[h]`` in price units, ``params[h + 1]`` in bps of the fair value,
    ``params[h + 2]`` in spreads of asset ``params[h + 3]``. The spread term is guarded: a book with one side
    missing must not turn a price-only alpha into NaN."""
    if not _record(out, v, i):
        return
    fc = out[L.FORECAST] + v * (params[h] + params[h + 1] * out[L.FAIR_VALUE] * 1e-4)
    if params[h + 2] != 0.0:
        sq = int(params[h + 3])
        fc += v * params[h + 2] * (view[sq, L.BEST_ASK] - view[sq, L.BEST_BID])
    out[L.FORECAST] = fc


@njit(inline="always")
def risk_nb(view, params, out, v, i, h):
    """A risk adjustment, subtracted from the reservation."""
    if _record(out, v, i):
        out[L.RISK] += v


@njit(inline="always")
def quoter_nb(view, params, out, v, i, h):
    """The quoter (its quotes are in ``out`` already)."""
    _record(out, v, i)
