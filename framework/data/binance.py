"""Binance spot / USD-M / COIN-M captures of the hftbacktest collector → catalog days.

Input: one message per line, ``<local receive ts> <combined-stream JSON>`` (gzip or plain); the
local timestamp's unit (ns, µs or ms) is detected per file by comparing it with the exchange time.

Why a hand-written parser: per-line ``json.loads`` costs more than everything else together. The
messages have a handful of fixed shapes, so a numba kernel scans a block of lines once, strictly
(anything it does not understand is reported with file and line, after orjson has had a look), and
writes numbers into flat arrays; the book is then built by the dense-book kernel in ``events``.

Book bridging follows Binance's rules: the REST snapshot (a line without ``stream``) is logged a
few messages after the first diffs, so diffs are buffered until it comes; diffs that end before it
are dropped; the first applied diff covers it (futures ``U <= lastUpdateId <= u``, spot
``U <= lastUpdateId + 1 <= u``); after that futures need ``pu == previous u`` and spot
``U == previous u + 1``. A break is a gap: the book resyncs from the next snapshot in the input, or
the conversion stops with the file, line and ids.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from hftbacktest.types import BUY_EVENT, SELL_EVENT, TRADE_EVENT, event_dtype
from numba import njit

from quotelab.data.events import (
    DAY_GRACE_NS,
    DAY_NS,
    LOCAL_BACK,
    ConvertJob,
    DaySplitter,
    DenseBook,
    Findings,
    Witness,
    clamp_local,
    depth_rows,
)
from quotelab.errors import DataError

try:  # ISA-L inflates gzip ~3x faster than zlib; optional, same API
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - depends on the environment
    import zlib as _zlib  # type: ignore[no-redef]

K_BAD, K_BLANK, K_DEPTH, K_TRADE, K_BT, K_SNAP, K_OTHER, K_ERRMSG = -1, 0, 1, 2, 3, 4, 5, 6
# Columns of the per-line integer and float outputs of the parser.
I_LTS, I_E, I_T, I_UU, I_U, I_PU, I_TID, I_LV0, I_LV1, I_SYM = range(10)
N_INT = 10
F_P, F_Q, F_P2, F_Q2 = range(4)
# Per-line byte flags: trade maker flag (-1 absent), whether a futures trade is a MARKET trade, and
# whether the message names a pair (``ps``: COIN-M's messages do, USD-M's and spot's do not).
B_M, B_MARKET, B_PS = range(3)

_POW10 = np.array([10.0**k for k in range(23)])
_TWO53 = 1 << 53


def _h(s: str) -> int:
    """Key hash, identical to the kernel's: keys are compared as 64-bit polynomial hashes."""
    h = 0
    for c in s.encode():
        h = (h * 257 + c) & 0xFFFFFFFFFFFFFFFF
    return h - (1 << 64) if h >= 1 << 63 else h


_KEYS = ["stream", "data", "lastUpdateId", "bids", "asks", "E", "T", "U", "u", "pu", "t", "b", "a",
         "B", "A", "p", "q", "m", "X", "e", "code", "s", "ps"]
(H_STREAM, H_DATA, H_LASTID, H_BIDS, H_ASKS, H_E, H_T, H_UU, H_U, H_PU, H_TID, H_B, H_A, H_BQ, H_AQ,
 H_P, H_Q, H_M, H_X, H_EV, H_CODE, H_S, H_PS) = (_h(k) for k in _KEYS)
V_DEPTHUPDATE, V_TRADE, V_BOOKTICKER, V_MARKET = _h("depthUpdate"), _h("trade"), _h("bookTicker"), _h("MARKET")
assert len({_h(k) for k in _KEYS}) == len(_KEYS)


@njit(cache=True, nogil=True)
def _hash(b, s, e):
    h = np.int64(0)
    for i in range(s, e):
        h = h * np.int64(257) + np.int64(b[i])
    return h


@njit(cache=True, nogil=True)
def _ws(b, i, e):
    while i < e and (b[i] == 32 or b[i] == 9 or b[i] == 13):
        i += 1
    return i


@njit(cache=True, nogil=True)
def _str_end(b, i, e):
    """``b[i]`` is an opening quote; index of the closing quote or -1."""
    i += 1
    while i < e:
        c = b[i]
        if c == 34:
            return i
        if c == 10:
            return -1  # lines are parsed without a prior newline scan: never run into the next one
        if c == 92:
            i += 2
        else:
            i += 1
    return -1


@njit(cache=True, nogil=True)
def _int(b, i, e):
    neg = False
    if i < e and b[i] == 45:
        neg = True
        i += 1
    s = i
    v = np.int64(0)
    while i < e and b[i] >= 48 and b[i] <= 57:
        if i - s >= 19:  # 19 digits hold ns timestamps; more cannot be an int64
            return v, -1
        v = v * 10 + (b[i] - 48)
        i += 1
    if i == s:
        return v, -1
    return (-v if neg else v), i


@njit(cache=True, nogil=True)
def _dec(b, s, e):
    """Decimal text ``b[s:e]`` → float, rounded like Python's float() for up to 15 digits."""
    m = np.int64(0)
    frac = -1
    nd = 0
    m_nz = np.int64(0)  # mantissa and scale up to the last non-zero decimal: trailing zeros dropped
    f_nz = 0
    i = s
    if i >= e:
        return 0.0, False
    while i < e:
        c = b[i]
        if c >= 48 and c <= 57:
            d = c - 48
            if m != 0 or d != 0:
                nd += 1
                if nd > 18:
                    return 0.0, False
            m = m * 10 + d
            if frac >= 0:
                frac += 1
                if d != 0:
                    m_nz = m
                    f_nz = frac
        elif c == 46 and frac < 0:
            frac = 0
            m_nz = m
        else:
            return 0.0, False
        i += 1
    if frac >= 0:
        m = m_nz
        frac = f_nz
    else:
        frac = 0
    if frac > 22 or m >= _TWO53:
        # Beyond the exact fast path: still a correct number, possibly one ulp from float().
        return m / 10.0**frac, True
    return m / _POW10[frac], True


@njit(cache=True, nogil=True)
def _qdec(b, i, e):
    """A quoted decimal at ``b[i] == '"'`` in one pass → (float, index after the closing quote) or
    (0.0, -1). Same rounding as :func:`_dec`."""
    i += 1
    m = np.int64(0)
    frac = -1
    nd = 0
    m_nz = np.int64(0)
    f_nz = 0
    s = i
    while i < e:
        c = b[i]
        if c >= 48 and c <= 57:
            d = c - 48
            if m != 0 or d != 0:
                nd += 1
                if nd > 18:
                    return 0.0, -1
            m = m * 10 + d
            if frac >= 0:
                frac += 1
                if d != 0:
                    m_nz = m
                    f_nz = frac
        elif c == 46 and frac < 0:
            frac = 0
            m_nz = m
        elif c == 34:
            break
        else:
            return 0.0, -1
        i += 1
    if i >= e or i == s:
        return 0.0, -1
    if frac >= 0:
        m = m_nz
        frac = f_nz
    else:
        frac = 0
    if frac > 22 or m >= _TWO53:
        return m / 10.0**frac, i + 1
    return m / _POW10[frac], i + 1


@njit(cache=True, nogil=True)
def _key(b, i, e):
    """Hash of the string at ``b[i] == '"'`` computed while finding its end → (hash, closing quote or -1)."""
    h = np.int64(0)
    i += 1
    while i < e:
        c = b[i]
        if c == 34:
            return h, i
        if c == 10:
            return h, -1
        if c == 92:
            h = h * np.int64(257) + np.int64(c)
            i += 1
            if i >= e:
                return h, -1
            c = b[i]
        h = h * np.int64(257) + np.int64(c)
        i += 1
    return h, -1


@njit(cache=True, nogil=True)
def _skip(b, i, e):
    if i >= e:
        return -1
    c = b[i]
    if c == 34:
        j = _str_end(b, i, e)
        return -1 if j < 0 else j + 1
    if c == 123 or c == 91:
        depth = 0
        while i < e:
            c = b[i]
            if c == 34:
                j = _str_end(b, i, e)
                if j < 0:
                    return -1
                i = j + 1
                continue
            if c == 123 or c == 91:
                depth += 1
            elif c == 125 or c == 93:
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return -1
    s = i
    while i < e:
        c = b[i]
        if c == 44 or c == 125 or c == 93 or c == 32 or c == 9 or c == 13:
            break
        i += 1
    return i if i > s else -1


@njit(cache=True, nogil=True)
def _levels(b, i, e, side, lv_side, lv_px, lv_qty, nlv):
    """Parse ``[["px","qty"],...]`` at ``b[i] == '['``; returns (next index or -1, new level count)."""
    i = _ws(b, i + 1, e)
    if i < e and b[i] == 93:
        return i + 1, nlv
    while True:
        if i >= e or b[i] != 91:
            return -1, nlv
        i = _ws(b, i + 1, e)
        if i >= e or b[i] != 34:
            return -1, nlv
        px, i = _qdec(b, i, e)
        if i < 0:
            return -1, nlv
        i = _ws(b, i, e)
        if i >= e or b[i] != 44:
            return -1, nlv
        i = _ws(b, i + 1, e)
        if i >= e or b[i] != 34:
            return -1, nlv
        qty, i = _qdec(b, i, e)
        if i < 0:
            return -1, nlv
        i = _ws(b, i, e)
        if i >= e or b[i] != 93:
            return -1, nlv
        if nlv >= lv_side.shape[0]:
            return -1, nlv
        lv_side[nlv] = side
        lv_px[nlv] = px
        lv_qty[nlv] = qty
        nlv += 1
        i = _ws(b, i + 1, e)
        if i < e and b[i] == 44:
            i = _ws(b, i + 1, e)
            continue
        if i < e and b[i] == 93:
            return i + 1, nlv
        return -1, nlv


@njit(cache=True, nogil=True)
def _str_dec(b, i, e):
    if i >= e or b[i] != 34:
        return 0.0, -1
    return _qdec(b, i, e)


@njit(cache=True, nogil=True)
def _parse_data(b, i, e, li, kind, ints, flts, flags, lv_side, lv_px, lv_qty, nlv):
    """The ``data`` object at ``b[i] == '{'``; returns (next index or -1, kind, level count)."""
    i = _ws(b, i + 1, e)
    if i < e and b[i] == 125:
        return i + 1, kind, nlv
    while True:
        if i >= e or b[i] != 34:
            return -1, kind, nlv
        h, j = _key(b, i, e)
        if j < 0:
            return -1, kind, nlv
        i = _ws(b, j + 1, e)
        if i >= e or b[i] != 58:
            return -1, kind, nlv
        i = _ws(b, i + 1, e)
        if kind == K_OTHER:
            i = _skip(b, i, e)
        elif h == H_EV:
            if i >= e or b[i] != 34:
                return -1, kind, nlv
            v, j = _key(b, i, e)
            if j < 0:
                return -1, kind, nlv
            if v == V_DEPTHUPDATE:
                kind = K_DEPTH
            elif v == V_TRADE:
                kind = K_TRADE
            elif v == V_BOOKTICKER:
                kind = K_BT
            else:
                kind = K_OTHER
            i = j + 1
        elif h == H_E or h == H_T or h == H_UU or h == H_U or h == H_PU or h == H_TID:  # noqa: SIM109 - a chain of == compiles to plain compares in numba
            v, i = _int(b, i, e)
            if h == H_E:
                ints[li, I_E] = v
            elif h == H_T:
                ints[li, I_T] = v
            elif h == H_UU:
                ints[li, I_UU] = v
            elif h == H_U:
                ints[li, I_U] = v
            elif h == H_PU:
                ints[li, I_PU] = v
            else:
                ints[li, I_TID] = v
        elif h == H_B or h == H_A:  # noqa: SIM109 - a chain of == compiles to plain compares in numba
            if i < e and b[i] == 91:
                i, nlv = _levels(b, i, e, 1 if h == H_B else -1, lv_side, lv_px, lv_qty, nlv)
            else:
                v, i = _str_dec(b, i, e)
                flts[li, F_P if h == H_B else F_P2] = v
        elif h == H_BQ or h == H_AQ or h == H_P or h == H_Q:  # noqa: SIM109 - a chain of == compiles to plain compares in numba
            v, i = _str_dec(b, i, e)
            if h == H_BQ or h == H_P:  # noqa: SIM109 - a chain of == compiles to plain compares in numba
                flts[li, F_Q if h == H_BQ else F_P] = v
            else:
                flts[li, F_Q2 if h == H_AQ else F_Q] = v
        elif h == H_M:
            if i + 4 <= e and b[i] == 116 and b[i + 1] == 114 and b[i + 2] == 117 and b[i + 3] == 101:
                flags[li, B_M] = 1
                i += 4
            elif (i + 5 <= e and b[i] == 102 and b[i + 1] == 97 and b[i + 2] == 108 and b[i + 3] == 115
                  and b[i + 4] == 101):
                flags[li, B_M] = 0
                i += 5
            else:
                return -1, kind, nlv
        elif h == H_X:
            if i >= e or b[i] != 34:
                return -1, kind, nlv
            j = _str_end(b, i, e)
            if j < 0:
                return -1, kind, nlv
            flags[li, B_MARKET] = 1 if _hash(b, i + 1, j) == V_MARKET else 0
            i = j + 1
        elif h == H_S:
            if i >= e or b[i] != 34:
                return -1, kind, nlv
            v, j = _key(b, i, e)
            if j < 0:
                return -1, kind, nlv
            ints[li, I_SYM] = v
            i = j + 1
        elif h == H_PS:
            flags[li, B_PS] = 1
            i = _skip(b, i, e)
        else:
            i = _skip(b, i, e)
        if i < 0:
            return -1, kind, nlv
        i = _ws(b, i, e)
        if i < e and b[i] == 44:
            i = _ws(b, i + 1, e)
            continue
        if i < e and b[i] == 125:
            return i + 1, kind, nlv
        return -1, kind, nlv


@njit(cache=True, nogil=True)
def _stream_kind(b, s, e):
    """Kind from a stream name such as ``btcusdt@depth@0ms``."""
    at = -1
    for i in range(s, e):
        if b[i] == 64:
            at = i
            break
    if at < 0:
        return K_OTHER
    r = at + 1
    if e - r >= 5 and b[r] == 100 and b[r + 1] == 101 and b[r + 2] == 112 and b[r + 3] == 116 and b[r + 4] == 104:
        return K_DEPTH
    h = _hash(b, r, e)
    if h == V_TRADE:
        return K_TRADE
    if h == V_BOOKTICKER:
        return K_BT
    return K_OTHER


@njit(cache=True, nogil=True)
def _parse_line(b, s, e, li, ints, flts, flags, lv_side, lv_px, lv_qty, nlv):
    """The line starting at ``s`` (``e`` is the block's end); returns (kind, level count, index of
    its newline). One pass: the JSON's own end is where the line must end."""
    i = _ws(b, s, e)
    if i >= e or b[i] == 10:
        return K_BLANK, nlv, i
    v, i = _int(b, s, e)
    if i < 0 or i >= e or b[i] != 32:
        return K_BAD, nlv, i
    ints[li, I_LTS] = v
    i = _ws(b, i, e)
    if i >= e or b[i] != 123:
        return K_BAD, nlv, i
    i = _ws(b, i + 1, e)
    kind = K_OTHER
    top = K_OTHER  # kind known from the top level (stream name, snapshot or error keys)
    ints[li, I_LV0] = nlv
    if i < e and b[i] == 125:
        i += 1
    else:
        while True:
            if i >= e or b[i] != 34:
                return K_BAD, nlv, i
            h, j = _key(b, i, e)
            if j < 0:
                return K_BAD, nlv, i
            i = _ws(b, j + 1, e)
            if i >= e or b[i] != 58:
                return K_BAD, nlv, i
            i = _ws(b, i + 1, e)
            if h == H_STREAM:
                if i >= e or b[i] != 34:
                    return K_BAD, nlv, i
                j = _str_end(b, i, e)
                if j < 0:
                    return K_BAD, nlv, i
                top = _stream_kind(b, i + 1, j)
                i = j + 1
            elif h == H_DATA:
                if i >= e or b[i] != 123:
                    return K_BAD, nlv, i
                i, kind, nlv = _parse_data(b, i, e, li, top, ints, flts, flags, lv_side, lv_px, lv_qty, nlv)
            elif h == H_LASTID:
                top = K_SNAP
                v, i = _int(b, i, e)
                ints[li, I_U] = v
            elif h == H_BIDS or h == H_ASKS:  # noqa: SIM109 - a chain of == compiles to plain compares in numba
                if i >= e or b[i] != 91:
                    return K_BAD, nlv, i
                i, nlv = _levels(b, i, e, 1 if h == H_BIDS else -1, lv_side, lv_px, lv_qty, nlv)
            elif h == H_E or h == H_T:  # noqa: SIM109 - a chain of == compiles to plain compares in numba
                v, i = _int(b, i, e)
                ints[li, I_E if h == H_E else I_T] = v
            elif h == H_CODE:
                top = K_ERRMSG
                i = _skip(b, i, e)
            else:
                i = _skip(b, i, e)
            if i < 0:
                return K_BAD, nlv, i
            i = _ws(b, i, e)
            if i < e and b[i] == 44:
                i = _ws(b, i + 1, e)
                continue
            if i < e and b[i] == 125:
                i += 1
                break
            return K_BAD, nlv, i
    i = _ws(b, i, e)
    if i < e and b[i] != 10:
        return K_BAD, nlv, i
    ints[li, I_LV1] = nlv
    if top == K_SNAP or top == K_ERRMSG:  # noqa: SIM109 - a chain of == compiles to plain compares in numba
        return top, nlv, i
    if kind == K_OTHER and top != K_OTHER:
        kind = top  # spot bookTicker payloads have no "e"
    return kind, nlv, i


@njit(cache=True, nogil=True)
def _parse_block(b, kinds, ints, flts, flags, lv_side, lv_px, lv_qty):
    """Parse the lines of ``b`` until it or ``kinds`` (the line capacity) is used up.

    Returns (lines, levels, first bad line or -1, bytes consumed).
    """
    n = b.shape[0]
    cap = kinds.shape[0]
    s = 0
    li = 0
    nlv = 0
    bad = -1
    while s < n and li < cap:
        ints[li, I_E] = -1
        ints[li, I_T] = -1
        ints[li, I_UU] = -1
        ints[li, I_U] = -1
        ints[li, I_PU] = -1
        ints[li, I_TID] = -1
        ints[li, I_SYM] = 0
        flags[li, B_M] = -1
        flags[li, B_MARKET] = 1
        flags[li, B_PS] = 0
        k, nlv, e = _parse_line(b, s, n, li, ints, flts, flags, lv_side, lv_px, lv_qty, nlv)
        kinds[li] = k
        li += 1
        if k == K_BAD:
            bad = li - 1
            break
        s = e + 1
    return li, nlv, bad, s


# ---------------------------------------------------------------------------------------------
# Reading: one thread inflates and parses (both release the GIL), the caller builds the book.

_READ = 1 << 18
_BLOCK = 4 << 20


@dataclass
class Parsed:
    """A block's lines as arrays (see the I_*/F_*/B_* columns) and its book levels."""

    kinds: np.ndarray
    ints: np.ndarray
    flts: np.ndarray
    flags: np.ndarray
    lv_side: np.ndarray
    lv_px: np.ndarray
    lv_qty: np.ndarray
    bad: int  # index of the first line that could not be parsed, or -1


def parse_lines(block: bytes) -> Parsed:
    b = np.frombuffer(block, np.uint8)
    # Collector lines are ~100+ bytes: guess the line count, and count exactly only if short of it.
    n_lines = len(block) // 64 + 256
    cap = len(block) // 8 + 16  # a level takes at least 9 bytes: ["1","0"]
    lv_side = np.empty(cap, np.int8)
    lv_px = np.empty(cap)
    lv_qty = np.empty(cap)
    while True:
        kinds = np.empty(n_lines, np.int8)
        ints = np.empty((n_lines, N_INT), np.int64)
        flts = np.zeros((n_lines, 4))
        flags = np.empty((n_lines, 3), np.int8)
        n, nlv, bad, used = _parse_block(b, kinds, ints, flts, flags, lv_side, lv_px, lv_qty)
        if used >= len(block) or bad >= 0:
            break
        n_lines = block.count(b"\n") + 1
    return Parsed(kinds[:n], ints[:n], flts[:n], flags[:n], lv_side[:nlv], lv_px[:nlv], lv_qty[:nlv], bad)


def _chunks(fh: Any) -> Iterator[bytes]:
    """Inflated bytes of a gzip (any number of members) or plain file; raises EOFError if cut short."""
    head = fh.read(2)
    fh.seek(0)
    if head != b"\x1f\x8b":
        while chunk := fh.read(_READ):
            yield chunk
        return
    d = _zlib.decompressobj(31)
    fed = False  # whether the current gzip member has received any input
    while raw := fh.read(_READ):
        while raw:
            fed = True
            out = d.decompress(raw)
            if out:
                yield out
            if d.eof:
                # Concatenated gzip members (e.g. appended captures) continue the stream.
                raw = d.unused_data
                d = _zlib.decompressobj(31)
                fed = False
            else:
                raw = b""
    if fed and not d.eof:
        raise EOFError("the gzip stream ends early (truncated file)")


def _reader_thread(path: Path, q: queue.Queue, stop: threading.Event) -> None:
    try:
        with open(path, "rb") as fh:
            pending: list[bytes] = []
            size = 0
            rest = b""
            # Small first blocks let the caller start while the rest is still being read.
            target = _BLOCK >> 4
            for chunk in _chunks(fh):
                pending.append(chunk)
                size += len(chunk)
                if size < target:
                    continue
                buf = rest + b"".join(pending)
                pending, size = [], 0
                cut = buf.rfind(b"\n") + 1
                if cut == 0:
                    rest = buf
                    continue
                block, rest = buf[:cut], buf[cut:]
                q.put(block)
                if stop.is_set():
                    return
                target = min(target * 2, _BLOCK)
            buf = rest + b"".join(pending)
            if buf:
                q.put(buf)
            q.put(None)
    except (EOFError, _zlib.error, OSError) as exc:
        # Complete lines before the damage were handed over; the partial one is what it cut.
        q.put(_Damaged(exc))
    except BaseException as exc:  # anything else still reaches the caller instead of a silent hang
        q.put(exc)


def _parser_thread(q_in: queue.Queue, q_out: queue.Queue, stop: threading.Event) -> None:
    try:
        while True:
            item = q_in.get()
            if item is None or isinstance(item, BaseException):
                q_out.put(item)
                return
            q_out.put((item, parse_lines(item)))
            if stop.is_set():
                return
    except BaseException as exc:
        q_out.put(exc)


class _Damaged(Exception):
    """The compressed stream is cut short or corrupt (raised after the last good block)."""


def iter_blocks(path: Path) -> Iterator[tuple[bytes, Parsed]]:
    """Yield blocks of complete lines with their parsed arrays.

    Three stages run at once: a thread inflates, a thread parses, the caller builds the book.
    """
    raw: queue.Queue = queue.Queue(maxsize=2)
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    threads = [threading.Thread(target=_reader_thread, args=(path, raw, stop), daemon=True),
               threading.Thread(target=_parser_thread, args=(raw, q, stop), daemon=True)]
    for t in threads:
        t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Unblock the reader if the consumer stopped early (an error downstream).
        stop.set()
        deadline = time.monotonic() + 10.0  # daemon threads: never hang the caller on them
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            for qq in (raw, q):
                with contextlib.suppress(queue.Empty):
                    qq.get(timeout=0.02)


# ---------------------------------------------------------------------------------------------
# The converter


@dataclass
class _Diff:
    """A buffered depth message (copied out of its block) while the book waits for a snapshot."""

    first: int
    last: int
    prev: int
    exch: int
    local: int
    side: np.ndarray
    px: np.ndarray
    qty: np.ndarray
    file: str
    line: int


@dataclass
class _Snap:
    last_id: int
    exch: int
    local: int
    file: str
    line: int
    side: np.ndarray
    tick: np.ndarray
    qty: np.ndarray


@dataclass
class _Gap:
    file: str
    line: int
    text: str


_MAX_BUFFERED = 200_000
_UNITS = {1: "ns", 1_000: "us", 1_000_000: "ms"}
# Each venue's depth messages: whether they carry ``pu`` (futures) and ``ps`` (COIN-M).
_MARKETS = {"binance-spot": (False, False), "binance-usdm": (True, False), "binance-cm": (True, True)}
MARKET_NAMES = {"binance-spot": "Binance spot", "binance-usdm": "Binance USD-M futures",
                 "binance-cm": "Binance COIN-M futures"}


def market_of(data: dict[str, Any]) -> tuple[str | None, str]:
    """The venue a combined-stream payload's fields say it is from, and which fields said so."""
    if "ps" in data:
        return "binance-cm", "it names a pair, 'ps'"
    if "pu" in data:
        return "binance-usdm", "its depth update has 'pu' and no 'ps'"
    if "X" in data:
        return "binance-usdm", "its trade has 'X' and no 'ps'"
    if data.get("e") == "depthUpdate":
        return "binance-spot", "its depth update has no 'pu'"
    if "M" in data or ("e" not in data and "u" in data):
        return "binance-spot", "its fields are spot's"
    return None, ""


class BinanceConverter:
    """Streams Binance collector files of one symbol, in time order, into a :class:`DaySplitter`."""

    def __init__(self, venue: str, job: ConvertJob) -> None:
        if venue not in ("binance-spot", "binance-usdm", "binance-cm"):
            raise DataError(f"unknown Binance venue {venue!r}")
        self.venue = venue
        self.spot = venue == "binance-spot"
        self.job = job
        self.sym_hash = _h(job.symbol)
        self.tick = float(job.instrument["tick_size"])
        self.lot = float(job.instrument["lot_size"])
        self.spec_origin = job.instrument.get("origin", "spec")
        self.book = DenseBook(self.tick)
        self.witness = Witness()
        self.split = DaySplitter(self.book, self.witness, job.on_day)
        self.findings = Findings()
        self.synced = False
        self.ever_synced = False
        self.book_start_exch: int | None = None
        self.buffer: deque[_Diff] = deque(maxlen=_MAX_BUFFERED)
        self.snap_wait: _Snap | None = None  # a snapshot waiting for the diff that covers it
        self.gap: _Gap | None = None
        self.prev_local = -(1 << 62)
        self.prev_depth_exch = -(1 << 62)
        self.prev_trade_id = -1
        self.prev_where = ("", 0)
        self.stats: dict[str, int] = {"lines": 0, "depth_msgs": 0, "trade_msgs": 0, "bookticker_msgs": 0,
                                      "snapshots": 0, "other_msgs": 0, "dropped_depth_msgs": 0,
                                      "dropped_trades": 0}
        self.files: list[dict[str, Any]] = []
        self.funding: list[tuple] = []  # markPriceUpdate rows (quotelab.funding columns)

    # -- reading -------------------------------------------------------------------------------

    def feed(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        self.file = str(path)
        self.line0 = 0
        self.factor = 0
        try:
            # closing(): an error in _block must stop the reader threads now, not at garbage collection
            # (at interpreter exit they could no longer run, and the cleanup would wait forever).
            with contextlib.closing(iter_blocks(path)) as blocks:
                for block, parsed in blocks:
                    self._block(block, parsed)
        except _Damaged as exc:
            cause = exc.args[0]
            what = ("truncated gzip" if isinstance(cause, EOFError)
                    else f"corrupt gzip ({type(cause).__name__}: {cause})")
            line = self.line0 + 1
            raise DataError(
                f"{path}:{line}: {what}: the file ends or breaks inside line {line}; the {self.line0:,} lines "
                f"before it were read. Fix: re-download or re-capture the file, or keep the good part "
                f"(zcat {path.name} | head -n {self.line0} | gzip > fixed.gz; zcat warns about the damage)."
            ) from None
        if self.line0 == 0:
            raise DataError(f"{path}: the file is empty")
        self.files.append({"file": str(path), "lines": self.line0, "local_ts_unit": _UNITS.get(self.factor, "?")})

    def _garbled(self, block: bytes, li: int) -> DataError:
        lines = block.split(b"\n")
        text = lines[li] if li < len(lines) else b""
        line = self.line0 + li + 1
        sp = text.find(b" ")
        try:
            orjson.loads(text[sp + 1:] if sp >= 0 else text)
            why = "JSON is valid but not a Binance collector message this converter knows"
        except orjson.JSONDecodeError as exc:
            why = f"not valid JSON ({exc})"
        if sp <= 0 or not text[:sp].isdigit():
            why = "does not start with '<local timestamp> '"
        snippet = text[:120].decode("utf-8", "replace")
        return DataError(
            f"{self.file}:{line}: garbled line: {why}: {snippet!r}{'…' if len(text) > 120 else ''}. "
            f"Fix: repair or delete that line (e.g. zcat FILE | sed '{line}d' | gzip > fixed.gz) and convert again."
        )

    def _detect_unit(self, ints: np.ndarray, kinds: np.ndarray) -> None:
        ex = np.where(ints[:, I_T] > 0, ints[:, I_T], ints[:, I_E])
        ok = np.flatnonzero((ex > 0) & (kinds != K_BLANK))
        if not ok.shape[0]:
            return
        k = ok[0]
        local, exch_ns = int(ints[k, I_LTS]), int(ex[k]) * 1_000_000
        for f in (1, 1_000, 1_000_000):
            if abs(local * f - exch_ns) < 86_400 * 10**9:
                self.factor = f
                return
        raise DataError(
            f"{self.file}:{self.line0 + k + 1}: local timestamp {local} is not within a day of the exchange "
            f"time {ex[k]} ms in ns, µs or ms; is this a collector file (`<local ts> <json>` per line)?"
        )

    def _block(self, block: bytes, p: Parsed) -> None:
        kinds, ints, flts, flags = p.kinds, p.ints, p.flts, p.flags
        lv_side, lv_px, lv_qty, bad = p.lv_side, p.lv_px, p.lv_qty, p.bad
        n = kinds.shape[0]
        if bad >= 0:
            raise self._garbled(block, bad)
        if self.factor == 0:
            self._detect_unit(ints, kinds)
            if self.factor == 0:
                # Only snapshot lines so far: judge by magnitude (19 digits ns, 16 µs, 13 ms).
                digits = len(str(int(ints[0, I_LTS]))) if n else 19
                self.factor = 1 if digits >= 18 else 1_000 if digits >= 15 else 1_000_000
        real = kinds != K_BLANK
        if not real.all():
            idx = np.flatnonzero(~real)
            self.findings.add("blank_lines", "blank lines skipped", self.file,
                              self.line0 + int(idx[0]) + 1, int(idx.shape[0]))
        self._check_market(block, kinds, ints, flags)
        local = self._check_local(ints[:, I_LTS] * self.factor, real)
        self.stats["lines"] += int(real.sum())

        ticks = self._ticks(lv_px, lv_qty, ints, kinds)
        # bookTicker → witness
        bt = np.flatnonzero(kinds == K_BT)
        self.stats["bookticker_msgs"] += bt.shape[0]
        if bt.shape[0]:
            self.witness.add_bbo(ints[bt, I_U], flts[bt, F_P], flts[bt, F_P2], flts[bt, F_Q], flts[bt, F_Q2])
        other = np.flatnonzero((kinds == K_OTHER) | (kinds == K_ERRMSG))
        if other.shape[0] and not self.spot:
            other = self._mark_prices(block, other, local)
        if other.shape[0]:
            self.stats["other_msgs"] += other.shape[0]
            k = int(other[0])
            what = "error message from the venue" if kinds[k] == K_ERRMSG else "message of another stream"
            self.findings.add("ignored_messages", f"ignored lines (first: {what})", self.file,
                              self.line0 + k + 1, int(other.shape[0]))

        exch = np.where(ints[:, I_T] > 0, ints[:, I_T], ints[:, I_E]) * 1_000_000
        self._depth(kinds, ints, exch, local, lv_side, lv_px, lv_qty, ticks)
        self._trades(kinds, ints, flts, flags, exch, local)
        self.split.close_ready()
        self.line0 += n

    def _mark_prices(self, block: bytes, other: np.ndarray, local: np.ndarray) -> np.ndarray:
        """Keep ``markPriceUpdate`` lines (mark ``p``, index ``i``, rate ``r``, next settlement ``T``)
        as funding rows; return the other lines still unknown. One a second: parsed in Python."""
        lines = block.split(b"\n")
        rest = []
        for k in other.tolist():
            line = lines[k]
            if b"markPriceUpdate" not in line:
                rest.append(k)
                continue
            d = orjson.loads(line[line.find(b" ") + 1:]).get("data", {})
            try:
                self.funding.append((int(d["E"]) * 1_000_000, int(local[k]), float(d["p"]),
                                     float(d.get("i", "nan")), float(d["r"]) if d.get("r") not in (None, "") else
                                     np.nan, int(d.get("T") or 0) * 1_000_000))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{self.file}:{self.line0 + k + 1}: markPriceUpdate without a usable {exc}: "
                                f"{line[:120].decode('utf-8', 'replace')!r}") from None
        self.stats["mark_price_msgs"] = self.stats.get("mark_price_msgs", 0) + len(other) - len(rest)
        return np.array(rest, dtype=np.int64)

    def _check_market(self, block: bytes, kinds: np.ndarray, ints: np.ndarray, flags: np.ndarray) -> None:
        """Every message is of the symbol asked for, and every depth message of the venue's market."""
        msgs = (kinds == K_DEPTH) | (kinds == K_TRADE) | (kinds == K_BT)
        sym = ints[:, I_SYM]
        want_futures, want_coin = _MARKETS[self.venue]
        market = ((ints[:, I_PU] != -1) == want_futures) & ((flags[:, B_PS] == 1) == want_coin)
        wrong = np.flatnonzero((msgs & (sym != 0) & (sym != self.sym_hash)) | ((kinds == K_DEPTH) & ~market))
        if not wrong.shape[0]:
            return
        k = int(wrong[0])
        text = block.split(b"\n", k + 1)[k]
        data = orjson.loads(text[text.find(b" ") + 1:]).get("data", {})
        symbol = str(data.get("s", "?"))
        venue, why = market_of(data)
        saw = f"{MARKET_NAMES.get(venue, 'Binance')} {symbol}" + (f" ({why})" if why else "")
        fix = f"--format {venue or self.venue} --symbol {symbol}"
        raise DataError(
            f"{self.file}:{self.line0 + k + 1}: this line is {saw}, but the command converts "
            f"--format {self.venue} --symbol {self.job.symbol}. Fix: convert these files with {fix}, or pass the "
            f"captures of {self.job.symbol} on {MARKET_NAMES[self.venue]}.")

    def _check_local(self, local: np.ndarray, real: np.ndarray) -> np.ndarray:
        """``local`` with the lines whose clock stepped back set to the latest local time before them."""
        lt = local[real]
        if not lt.shape[0]:
            return local
        if self.line0 == 0 and lt[0] < self.prev_local - DAY_GRACE_NS:
            raise DataError(
                f"{self.file}:1: this file starts at local time {lt[0]}, {(self.prev_local - lt[0]) / 1e9:.0f} s "
                f"before the previous file ended; pass the files of one symbol in time order.")
        fixed, by = clamp_local(lt, self.prev_local)
        back = np.flatnonzero(by)
        if back.shape[0]:
            at = np.flatnonzero(real)[back]
            self.findings.add("local_ts_backwards", LOCAL_BACK.format(ms=by[back[0]] / 1e6), self.file,
                              self.line0 + int(at[0]) + 1, int(back.shape[0]),
                              last=(self.file, self.line0 + int(at[-1]) + 1), amount_ms=float(by.max()) / 1e6)
            local = local.copy()
            local[real] = fixed
        self.prev_local = int(fixed[-1])
        return local

    def _where_level(self, ints: np.ndarray, kinds: np.ndarray, j: int) -> int:
        has = np.flatnonzero((kinds == K_DEPTH) | (kinds == K_SNAP))
        k = has[np.searchsorted(ints[has, I_LV1], j, side="right")]
        return self.line0 + int(k) + 1

    def _ticks(self, px: np.ndarray, qty: np.ndarray, ints: np.ndarray, kinds: np.ndarray) -> np.ndarray:
        if not px.shape[0]:
            return np.zeros(0, np.int64)
        tf = px / self.tick
        ticks = np.rint(tf)
        bad = np.flatnonzero(np.abs(tf - ticks) > 1e-6)
        if bad.shape[0]:
            j = int(bad[0])
            raise DataError(
                f"{self.file}:{self._where_level(ints, kinds, j)}: price {float(px[j])} is not a multiple of the tick "
                f"size {self.tick} ({self.spec_origin}). Fix: pass the right --tick-size.")
        lf = qty / self.lot
        badq = np.flatnonzero(np.abs(lf - np.rint(lf)) > 1e-6)
        if badq.shape[0]:
            # Seen on Binance spot: book levels aggregate resting orders at a finer step than today's
            # lot (trades and bookTicker respect it). Not an error for a book, but worth knowing.
            j = int(badq[0])
            self.findings.add(
                "depth_qty_finer_than_lot",
                f"depth quantities not multiples of the lot size {self.lot} (first: {float(qty[j])}); kept as is",
                self.file, self._where_level(ints, kinds, j), int(badq.shape[0]))
        return ticks.astype(np.int64)

    # -- depth -----------------------------------------------------------------------------------

    def _depth(self, kinds, ints, exch, local, lv_side, lv_px, lv_qty, ticks) -> None:
        ev = np.flatnonzero((kinds == K_DEPTH) | (kinds == K_SNAP))
        self.stats["depth_msgs"] += int((kinds[ev] == K_DEPTH).sum())
        self.stats["snapshots"] += int((kinds[ev] == K_SNAP).sum())
        pos = 0
        n = ev.shape[0]
        is_snap = kinds[ev] == K_SNAP
        while pos < n:
            if not self.synced:
                k = int(ev[pos])
                if is_snap[pos]:
                    self._on_snapshot(k, ints, exch, local, lv_side, lv_px, lv_qty, ticks)
                else:
                    lv0, lv1 = ints[k, I_LV0], ints[k, I_LV1]
                    self._on_unsynced_diff(_Diff(
                        int(ints[k, I_UU]), int(ints[k, I_U]), int(ints[k, I_PU]), int(exch[k]), int(local[k]),
                        lv_side[lv0:lv1].copy(), lv_px[lv0:lv1].copy(), lv_qty[lv0:lv1].copy(),
                        self.file, self.line0 + k + 1))
                pos += 1
                continue
            if is_snap[pos]:
                k = int(ev[pos])
                self.findings.add("snapshot_ignored", "REST snapshot while the book was in sync: not needed",
                                  self.file, self.line0 + k + 1)
                pos += 1
                continue
            # The run of diffs up to the next snapshot line, applied with one kernel call.
            nxt = np.flatnonzero(is_snap[pos:])
            end = pos + int(nxt[0]) if nxt.shape[0] else n
            run = ev[pos:end]
            first, last, prev = ints[run, I_UU], ints[run, I_U], ints[run, I_PU]
            before = np.concatenate([[self.book.last_id], last[:-1]])
            ok = (first == before + 1) if self.spot else (prev == before)
            brk = np.flatnonzero(~ok)
            stop = int(brk[0]) if brk.shape[0] else run.shape[0]
            if stop:
                self._apply(run[:stop], ints, exch, local, lv_side, ticks, lv_px, lv_qty)
            if stop < run.shape[0]:
                k = int(run[stop])
                self._on_gap(k, int(before[stop]), int(first[stop]), int(last[stop]), int(prev[stop]))
            pos += stop if stop < run.shape[0] else run.shape[0]

    def _apply(self, run, ints, exch, local, lv_side, ticks, lv_px, lv_qty, local_floor: int = 0) -> None:
        """Apply consecutive depth lines ``run`` (indexes into the block's line arrays)."""
        lv0, lv1 = int(ints[run[0], I_LV0]), int(ints[run[-1], I_LV1])
        self._apply_levels(exch[run], local[run], ints[run, I_U], ints[run, I_LV1] - lv0,
                           lv_side[lv0:lv1], ticks[lv0:lv1], lv_px[lv0:lv1], lv_qty[lv0:lv1], local_floor)

    def _apply_levels(self, m_exch, m_local, m_id, m_end, side, tick, px, qty, local_floor: int = 0) -> None:
        if local_floor:
            m_local = np.maximum(m_local, local_floor)
        back = np.flatnonzero(m_exch < np.concatenate([[self.prev_depth_exch], m_exch[:-1]]))
        if back.shape[0]:
            self.findings.add("exch_ts_backwards", "depth exchange time goes backwards while update ids advance",
                              self.file, None, int(back.shape[0]))
        self.prev_depth_exch = int(m_exch[-1])
        days = m_exch // DAY_NS
        cuts = np.flatnonzero(days[1:] != days[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        stops = np.concatenate([cuts, [m_exch.shape[0]]])
        for a, z in zip(starts.tolist(), stops.tolist(), strict=True):
            d = int(days[a])
            self.split.depth_day(d)
            l0 = int(m_end[a - 1]) if a else 0
            l1 = int(m_end[z - 1])
            t = tick[l0:l1]
            s = side[l0:l1]
            ends = (m_end[a:z] - l0).astype(np.int64)
            bbo = self.book.apply(s, t, qty[l0:l1], ends, self.file)
            rows = depth_rows(s, px[l0:l1], qty[l0:l1], ends, m_exch[a:z], m_local[a:z], m_id[a:z])
            self.split.add_rows(d, rows, m_exch[a:z], m_local[a:z])
            self.split.add_bbo(d, m_id[a:z].astype(np.int64), bbo)
            self.book.last_id = int(m_id[z - 1])

    def _covers(self, diff: _Diff, last_id: int) -> bool:
        return diff.first <= (last_id + 1 if self.spot else last_id) <= diff.last

    def _on_unsynced_diff(self, diff: _Diff) -> None:
        if self.snap_wait is not None:
            last_id = self.snap_wait.last_id
            if diff.last < last_id + (1 if self.spot else 0):
                self.stats["dropped_depth_msgs"] += 1
                return
            if self._covers(diff, last_id):
                self._sync(diff_list=[diff])
                return
            self._snapshot_too_old(diff)
            return
        self.buffer.append(diff)

    def _snapshot_too_old(self, diff: _Diff) -> None:
        snap = self.snap_wait
        self.findings.add(
            "snapshot_unusable",
            f"REST snapshot lastUpdateId={snap.last_id} is older than the first diff after it (U={diff.first}); "
            f"waiting for a later snapshot", snap.file, snap.line)
        self.snap_wait = None
        self.buffer.clear()
        self.buffer.append(diff)

    def _on_snapshot(self, k, ints, exch, local, lv_side, lv_px, lv_qty, ticks) -> None:
        lv0, lv1 = int(ints[k, I_LV0]), int(ints[k, I_LV1])
        last_id = int(ints[k, I_U])
        self.snap_wait = _Snap(last_id, int(exch[k]) if exch[k] > 0 else 0, int(local[k]), self.file,
                               self.line0 + k + 1, lv_side[lv0:lv1].copy(), ticks[lv0:lv1].copy(),
                               lv_qty[lv0:lv1].copy())
        keep = last_id + (1 if self.spot else 0)
        dropped = 0
        while self.buffer and self.buffer[0].last < keep:
            self.buffer.popleft()
            dropped += 1
        self.stats["dropped_depth_msgs"] += dropped
        if not self.buffer:
            return  # the covering diff is still to come
        if self._covers(self.buffer[0], last_id):
            self._sync(diff_list=list(self.buffer))
            self.buffer.clear()
        else:
            first = self.buffer.popleft()
            self._snapshot_too_old(first)

    def _sync(self, diff_list: list[_Diff]) -> None:
        """Load the waiting snapshot, then apply ``diff_list`` (the first covers the snapshot)."""
        snap = self.snap_wait
        self.snap_wait = None
        last_id, s_local, s_file, s_line = snap.last_id, snap.local, snap.file, snap.line
        # Spot snapshots carry no time: the covering diff's event time is the closest exchange time.
        start_exch = snap.exch or diff_list[0].exch
        self.book.load(snap.side, snap.tick, snap.qty, f"{s_file}:{s_line}")
        self.book.last_id = last_id
        if self.ever_synced:
            gap = self.gap
            self.findings.add(
                "resynced", f"book resynced from the REST snapshot at {s_file}:{s_line} "
                f"(lastUpdateId={last_id}) after the gap at {gap.file}:{gap.line} ({gap.text})", gap.file, gap.line)
            d = start_exch // DAY_NS
            self.split.depth_day(d)
            rows = self.book.snapshot_rows(start_exch, s_local)
            self.split.add_rows(d, rows, np.zeros(0, np.int64), np.zeros(0, np.int64))
        else:
            self.book_start_exch = start_exch
            self.split.depth_day(start_exch // DAY_NS)
        self.gap = None
        self.synced = True
        self.ever_synced = True
        # Buffered diffs were received before the snapshot; their content is only usable from then on.
        for i, dff in enumerate(diff_list):
            if i and not ((dff.first == self.book.last_id + 1) if self.spot else (dff.prev == self.book.last_id)):
                self.synced = False
                self.gap = _Gap(dff.file, dff.line, self._gap_text(self.book.last_id, dff.first, dff.last, dff.prev))
                self.buffer.extend(diff_list[i:])
                return
            tick = np.rint(dff.px / self.tick).astype(np.int64)
            self._apply_levels(np.array([dff.exch]), np.array([dff.local]), np.array([dff.last]),
                               np.array([dff.px.shape[0]]), dff.side, tick, dff.px, dff.qty, local_floor=s_local)

    def _gap_text(self, prev_last: int, first: int, last: int, prev: int) -> str:
        if self.spot:
            return f"previous message ended at u={prev_last}, this one starts at U={first} (u={last}); " \
                   f"{first - prev_last - 1} update ids missing"
        return f"previous message ended at u={prev_last}, this one has pu={prev} (U={first}, u={last})"

    def _on_gap(self, k: int, prev_last: int, first: int, last: int, prev: int) -> None:
        line = self.line0 + k + 1
        self.gap = _Gap(self.file, line, self._gap_text(prev_last, first, last, prev))
        self.findings.add("gap", f"gap in depth update ids: {self.gap.text}", self.file, line)
        self.synced = False
        self.buffer.clear()

    # -- trades ----------------------------------------------------------------------------------

    def _trades(self, kinds, ints, flts, flags, exch, local) -> None:
        tr = np.flatnonzero(kinds == K_TRADE)
        if not tr.shape[0]:
            return
        self.stats["trade_msgs"] += tr.shape[0]
        if (flags[tr, B_M] < 0).any() or (ints[tr, I_TID] < 0).any():
            k = int(tr[np.flatnonzero((flags[tr, B_M] < 0) | (ints[tr, I_TID] < 0))[0]])
            raise DataError(f"{self.file}:{self.line0 + k + 1}: trade message without 'm' or 't'. Fix: repair or "
                            f"delete the line.")
        tids = ints[tr, I_TID]
        prev = np.concatenate([[self.prev_trade_id], tids[:-1]])
        jump = np.flatnonzero((prev >= 0) & (tids != prev + 1))
        if jump.shape[0]:
            k = int(tr[jump[0]])
            self.findings.add("trade_id_gap", f"trade ids not consecutive (first: {prev[jump[0]]} → "
                              f"{tids[jump[0]]})", self.file, self.line0 + k + 1, int(jump.shape[0]))
        self.prev_trade_id = int(tids[-1])
        market = flags[tr, B_MARKET] == 1
        if not market.all():
            k = int(tr[np.flatnonzero(~market)[0]])
            self.findings.add("non_market_trades", "trades with X != MARKET (insurance fund / ADL) skipped",
                              self.file, self.line0 + k + 1, int((~market).sum()))
            tr = tr[market]
        px, qty = flts[tr, F_P], flts[tr, F_Q]
        tf = px / self.tick
        bad = np.flatnonzero(np.abs(tf - np.rint(tf)) > 1e-6)
        if bad.shape[0]:
            k = int(tr[bad[0]])
            raise DataError(f"{self.file}:{self.line0 + k + 1}: trade price {float(px[bad[0]])} is not a multiple of "
                            f"the tick size {self.tick} ({self.spec_origin}). Fix: pass the right --tick-size.")
        lf = qty / self.lot
        badq = np.flatnonzero(np.abs(lf - np.rint(lf)) > 1e-6)
        if badq.shape[0]:
            k = int(tr[badq[0]])
            raise DataError(f"{self.file}:{self.line0 + k + 1}: trade quantity {float(qty[badq[0]])} is not a multiple "
                            f"of the lot size {self.lot} ({self.spec_origin}). Fix: pass the right --lot-size.")
        t_exch = exch[tr]
        start = self.book_start_exch
        keep = np.zeros(tr.shape[0], bool) if start is None else t_exch >= start
        if not keep.all():
            self.stats["dropped_trades"] += int((~keep).sum())
            self.findings.add("trades_before_book", "trades before the book was established (no snapshot yet) "
                              "dropped", self.file, self.line0 + int(tr[np.flatnonzero(~keep)[0]]) + 1,
                              int((~keep).sum()))
            tr, px, qty, t_exch = tr[keep], px[keep], qty[keep], t_exch[keep]
        if not tr.shape[0]:
            return
        rows = np.zeros(tr.shape[0], event_dtype)
        # Binance m == true: the buyer was the maker, so the initiator (taker) sold.
        rows["ev"] = np.where(flags[tr, B_M] == 1, TRADE_EVENT | SELL_EVENT, TRADE_EVENT | BUY_EVENT)
        rows["exch_ts"] = t_exch
        rows["local_ts"] = local[tr]
        rows["px"] = px
        rows["qty"] = qty
        rows["ival"] = ints[tr, I_TID]
        days = t_exch // DAY_NS
        for d in np.unique(days).tolist():
            sel = days == d
            try:
                self.split.add_rows(int(d), rows[sel], t_exch[sel], local[tr][sel])
            except DataError as exc:
                k = int(tr[np.flatnonzero(sel)[0]])
                raise DataError(f"{self.file}:{self.line0 + k + 1}: {exc}. Fix: sort the capture by time, or "
                                f"convert the late part separately.") from None

    # -- end -------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        if not self.ever_synced:
            if self.snap_wait is not None:
                snap = self.snap_wait
                raise DataError(
                    f"{snap.file}:{snap.line}: the REST snapshot (lastUpdateId={snap.last_id}) "
                    f"is never covered by a depth diff after it, so the book cannot be built. Fix: include the "
                    f"capture that follows the snapshot.")
            files = ", ".join(f["file"] for f in self.files)
            raise DataError(
                f"missing snapshot: no REST depth snapshot (a line without a 'stream' key, with 'lastUpdateId') in "
                f"{files}, so the book cannot be built. Fix: pass the files in time order, starting with the one "
                f"that holds the snapshot (the collector writes one when it connects).")
        if not self.synced and self.gap is not None:
            g = self.gap
            raise DataError(
                f"{g.file}:{g.line}: gap in depth update ids: {g.text}; no later REST snapshot in the input to "
                f"resync from. Fix: convert only the files before the gap, or add a capture with a snapshot "
                f"after it.")
        self.split.close_ready(final=True)
        out = {"venue": self.venue, "files": self.files, "messages": self.stats, "findings": self.findings.as_list()}
        if self.funding:
            from quotelab.funding import rows

            out["funding"] = rows(*map(np.array, zip(*self.funding, strict=True)))
        return out


def _convert(venue: str, files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    conv = BinanceConverter(venue, job)
    for f in files:
        conv.feed(Path(f))
    return conv.finish()


def convert_spot(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    return _convert("binance-spot", files, job)


def convert_usdm(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    return _convert("binance-usdm", files, job)


def convert_cm(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    return _convert("binance-cm", files, job)
