"""hftbacktest's C functions for a ``HashMapMarketDepthBacktest``, declared by symbol name.

hftbacktest's own numba binding calls them through ctypes function objects. numba bakes their
addresses into the code, so no function that takes the backtest object can be cached on disk, and
the driver was compiled in every process (~6 s of a cold ``quotelab run``). Declared as external
symbols of the loaded library, the same calls are linked by name when cached code is loaded. The
signatures are read from hftbacktest's ctypes declarations, so they follow its installed version.

Functions here take the backtest's pointer as a ``voidptr``; :class:`Backtest` holds one.
"""

from __future__ import annotations

import ctypes
from typing import Any

import hftbacktest.binding as _binding
import llvmlite.binding as llvm
import numpy as np
from hftbacktest import _hftbacktest, build_hashmap_backtest
from hftbacktest.intrinsic import address_as_void_pointer, is_null_ptr, ptr_from_val, val_from_ptr
from hftbacktest.order import NEW, NONE, PARTIALLY_FILLED
from hftbacktest.types import event_dtype, order_dtype, state_values_dtype
from numba import carray, njit, types

llvm.load_library_permanently(_hftbacktest.__file__)

# C's bool is a byte; numba's boolean is a 1-bit value in registers, so bools cross as uint8.
_SCALARS = {ctypes.c_void_p: types.voidptr, ctypes.c_uint64: types.uint64, ctypes.c_int64: types.int64,
            ctypes.c_double: types.float64, ctypes.c_bool: types.uint8, ctypes.c_uint8: types.uint8}


def _numba_type(ctype: Any) -> types.Type:
    if ctype in _SCALARS:
        return _SCALARS[ctype]
    if issubclass(ctype, ctypes._Pointer):
        return types.CPointer(_numba_type(ctype._type_))
    raise TypeError(f"no numba type for {ctype!r}")


_DECLARED: list[types.ExternalFunction] = []


def _declare(name: str) -> types.ExternalFunction:
    f = getattr(_binding, name)
    _DECLARED.append(types.ExternalFunction(name, _numba_type(f.restype)(*map(_numba_type, f.argtypes))))
    return _DECLARED[-1]


elapse = _declare("hashmapbt_elapse")
wait_next_feed = _declare("hashmapbt_wait_next_feed")
current_timestamp = _declare("hashmapbt_current_timestamp")
depth = _declare("hashmapbt_depth")
_state_values = _declare("hashmapbt_state_values")
_last_trades = _declare("hashmapbt_last_trades")
clear_last_trades = _declare("hashmapbt_clear_last_trades")
orders = _declare("hashmapbt_orders")
submit_buy_order = _declare("hashmapbt_submit_buy_order")
submit_sell_order = _declare("hashmapbt_submit_sell_order")
cancel = _declare("hashmapbt_cancel")
clear_inactive_orders = _declare("hashmapbt_clear_inactive_orders")
orders_values = _declare("orders_values")
orders_values_next = _declare("orders_values_next")
orders_contains = _declare("orders_contains")
best_bid_tick = _declare("hashmapdepth_best_bid_tick")
best_ask_tick = _declare("hashmapdepth_best_ask_tick")
best_bid = _declare("hashmapdepth_best_bid")
best_ask = _declare("hashmapdepth_best_ask")
best_bid_qty = _declare("hashmapdepth_best_bid_qty")
best_ask_qty = _declare("hashmapdepth_best_ask_qty")
bid_qty_at_tick = _declare("hashmapdepth_bid_qty_at_tick")
ask_qty_at_tick = _declare("hashmapdepth_ask_qty_at_tick")

# What code compiled against this module bakes in (jitcache keys cached loops on it).
SIGNATURES = tuple((f.symbol, str(f.sig)) for f in _DECLARED) + tuple(
    str(d.descr) for d in (event_dtype, order_dtype, state_values_dtype)) + (NEW, NONE, PARTIALLY_FILLED)


@njit(inline="always")
def state_values(bt, asset):
    """The asset's state (``state_values_dtype``) as a one-row record array over the backtest's memory."""
    return carray(address_as_void_pointer(_state_values(bt, asset)), 1, state_values_dtype)


@njit(inline="always")
def last_trades(bt, asset):
    """The asset's trades since the last ``clear_last_trades``, as event rows over the backtest's memory."""
    length = np.uint64(0)
    at = ptr_from_val(length)
    ptr = _last_trades(bt, asset, at)
    return carray(address_as_void_pointer(ptr), val_from_ptr(at), event_dtype)


@njit(inline="always")
def next_order(values):
    """The next order of an ``orders_values`` iterator as a one-row ``order_dtype`` array, or an
    empty one at the end (hftbacktest's ``Values.has_next``/``get``)."""
    if is_null_ptr(values):
        return carray(values, 0, order_dtype)
    ptr = orders_values_next(values)
    if is_null_ptr(ptr):
        return carray(ptr, 0, order_dtype)
    return carray(ptr, 1, order_dtype)


@njit(inline="always")
def cancellable(order):
    """hftbacktest's ``Order.cancellable``: active (new or partly filled) with no request in flight."""
    return (order.status == NEW or order.status == PARTIALLY_FILLED) and order.req == NONE


class Backtest:
    """A ``HashMapMarketDepthBacktest`` held by its pointer, for the driver. hftbacktest's own object
    is a jitclass: building it and calling a method on it from Python compiled ~1.5 s of numba code
    in every process, none of which the driver needs."""

    def __init__(self, assets: list[Any]) -> None:
        self.ptr = int(build_hashmap_backtest(assets))

    def state_values(self, asset: int) -> dict[str, float]:
        """The asset's state now: position, balance, fee, num_trades, trading_volume, trading_value."""
        addr = _binding.hashmapbt_state_values(self.ptr, asset)
        raw = (ctypes.c_char * state_values_dtype.itemsize).from_address(addr)
        row = np.frombuffer(raw, dtype=state_values_dtype)[0]
        return {name: row[name].item() for name in state_values_dtype.names}

    def close(self) -> None:
        _binding.hashmapbt_close(self.ptr)
