"""A ring of the last ``RING`` values in a part's state: ``state = [count, ring...]``."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

RING = 128  # longest horizon + 1; fixed so the state size, hence the compiled kernel, never changes


def ring_state(p: Any) -> np.ndarray:
    """A part's initial state (``p``, its params, is unused): nothing pushed yet."""
    return np.zeros(1 + RING)


@njit(inline="always")
def ring_push_nb(state, x):
    """Store x as the newest value."""
    n = int(state[0])
    state[1 + n % RING] = x
    state[0] = n + 1


@njit(inline="always")
def ring_ago_nb(state, h):
    """The value pushed h pushes before the newest, or NaN if not yet."""
    n = int(state[0])
    if h >= n:
        return np.nan
    return state[1 + (n - 1 - h) % RING]
