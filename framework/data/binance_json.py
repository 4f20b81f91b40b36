"""The Binance collector-file reader: a numba JSON parser for the few message shapes the hftbacktest
collector writes, and a two-thread pipeline that inflates and parses blocks of lines.

Why a hand-written parser: per-line ``json.loads`` costs more than everything else together. The
messages have a handful of fixed shapes, so a numba kernel scans a block of lines once, strictly
(anything it does not understand is flagged with its line, for the converter to report), and writes
numbers into flat arrays (the ``I_*``/``F_*``/``B_*`` columns, book levels apart); prices are parsed as
exact decimals (the double nearest the text). :mod:`quotelab.data.binance` builds the book from them.
"""

from __future__ import annotations

import mmap
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

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


def key_hash(s: str) -> int:
    """Key hash, identical to the kernel's: keys are compared as 64-bit polynomial hashes."""
    h = 0
    for c in s.encode():
        h = (h * 257 + c) & 0xFFFFFFFFFFFFFFFF
    return h - (1 << 64) if h >= 1 << 63 else h


_KEYS = ["stream", "data", "lastUpdateId", "bids", "asks", "E", "T", "U", "u", "pu", "t", "b", "a",
         "B", "A", "p", "q", "m", "X", "e", "code", "s", "ps"]
(H_STREAM, H_DATA, H_LASTID, H_BIDS, H_ASKS, H_E, H_T, H_UU, H_U, H_PU, H_TID, H_B, H_A, H_BQ, H_AQ,
 H_P, H_Q, H_M, H_X, H_EV, H_CODE, H_S, H_PS) = (key_hash(k) for k in _KEYS)
V_DEPTHUPDATE, V_TRADE, V_BOOKTICKER, V_MARKET = (key_hash(k) for k in ("depthUpdate", "trade", "bookTicker", "MARKET"))
assert len({key_hash(k) for k in _KEYS}) == len(_KEYS)


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
def _parse_block(b, kinds, ints, flts, flags, lv_side, lv_px, lv_qty, starts):
    """Parse the lines of ``b`` until it or ``kinds`` (the line capacity) is used up.

    Every output row is written for each line (the arrays are reused block after block, so nothing may
    be left from the previous block). Returns (lines, levels, first bad line or -1, bytes consumed).
    """
    n = b.shape[0]
    cap = kinds.shape[0]
    s = 0
    li = 0
    nlv = 0
    bad = -1
    while s < n and li < cap:
        starts[li] = s
        ints[li, I_LTS] = 0
        ints[li, I_E] = -1
        ints[li, I_T] = -1
        ints[li, I_UU] = -1
        ints[li, I_U] = -1
        ints[li, I_PU] = -1
        ints[li, I_TID] = -1
        ints[li, I_LV0] = nlv
        ints[li, I_LV1] = nlv
        ints[li, I_SYM] = 0
        flts[li, F_P] = 0.0
        flts[li, F_Q] = 0.0
        flts[li, F_P2] = 0.0
        flts[li, F_Q2] = 0.0
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


@njit(cache=True, nogil=True)
def _last_newline(b, lo, hi):
    """Index of the last newline in ``b[lo:hi]``, or -1."""
    for i in range(hi - 1, lo - 1, -1):
        if b[i] == 10:
            return i
    return -1


@njit(cache=True, nogil=True)
def _line_end(b, s):
    """Index of the newline ending the line that starts at ``s`` (the length if none)."""
    n = b.shape[0]
    while s < n and b[s] != 10:
        s += 1
    return s


# ---------------------------------------------------------------------------------------------
# Reading: a thread inflates, a thread parses (both release the GIL), the caller builds the book.
#
# Blocks travel in a fixed pool of slots, each a text buffer and the parser's output arrays for it,
# allocated once per file and reused: reader → parser → caller → back to the reader. The pool's size
# bounds the blocks in flight, and nothing of a block's size is allocated per block. (Fresh multi-MB
# arrays and bytes of varying sizes per block, ~8 blocks in flight, made glibc's heap grow with the
# number of blocks read: +40 MB for each 4x longer day; see the README, "Conversion streams too".)

_READ = 1 << 18  # compressed bytes read from the file at a time (a chunk: see _Source)
_FEED = 1 << 15  # compressed bytes given to one inflate call (what it leaves over is copied)
_INFLATE = 1 << 18  # the most inflated bytes one inflate call returns
_BLOCK = 4 << 20  # a block is cut at the first chunk end after this many bytes, after its last newline
_SLOT = 8 << 20  # text capacity of a slot: a block is _BLOCK and up to a chunk (~1-2 MB; more: a one-off)
_POOL = 4  # slots: one being filled, one being parsed, one with the caller, one ready


@dataclass
class Parsed:
    """A block's lines as arrays (see the I_*/F_*/B_* columns), its book levels and its text.

    From :func:`iter_blocks`, the arrays are views of reused buffers, valid until the next block is asked
    for: keep copies, not views (a view kept is detected, and its buffer is then not reused).
    """

    kinds: np.ndarray
    ints: np.ndarray
    flts: np.ndarray
    flags: np.ndarray
    lv_side: np.ndarray
    lv_px: np.ndarray
    lv_qty: np.ndarray
    bad: int  # index of the first line that could not be parsed, or -1
    text: np.ndarray  # the block's bytes (uint8)
    starts: np.ndarray  # where each parsed line starts in ``text``

    def line(self, k: int) -> bytes:
        """Line ``k`` of the block (a copy, without its newline)."""
        s = int(self.starts[k])
        return self.text[s:_line_end(self.text, s)].tobytes()

    def _invalidate(self) -> None:
        self.kinds = self.ints = self.flts = self.flags = None  # type: ignore[assignment]
        self.lv_side = self.lv_px = self.lv_qty = self.text = self.starts = None  # type: ignore[assignment]


class _Arrays:
    """The parser's outputs for up to ``lines`` lines and ``levels`` book levels."""

    def __init__(self, lines: int, levels: int, mapped: bool) -> None:
        specs = [(lines, np.int8), (lines * N_INT, np.int64), (lines * 4, np.float64), (lines * 3, np.int8),
                 (lines, np.int64), (levels, np.int8), (levels, np.float64), (levels, np.float64)]
        self.roots = _alloc(specs, mapped)
        kinds, ints, flts, flags, starts, lv_side, lv_px, lv_qty = self.roots
        self.kinds, self.starts, self.lv_side, self.lv_px, self.lv_qty = kinds, starts, lv_side, lv_px, lv_qty
        self.ints, self.flts, self.flags = ints.reshape(lines, N_INT), flts.reshape(lines, 4), flags.reshape(lines, 3)

    def parse(self, text: np.ndarray) -> tuple[Parsed, int]:
        """Parse ``text``; returns the result and the bytes consumed (short of the text if the lines did
        not fit)."""
        n, nlv, bad, used = _parse_block(text, self.kinds, self.ints, self.flts, self.flags, self.lv_side,
                                         self.lv_px, self.lv_qty, self.starts)
        return Parsed(self.kinds[:n], self.ints[:n], self.flts[:n], self.flags[:n], self.lv_side[:nlv],
                      self.lv_px[:nlv], self.lv_qty[:nlv], bad, text, self.starts[:n]), used


def _alloc(specs: list[tuple[int, Any]], mapped: bool) -> list[np.ndarray]:
    """Flat arrays of the given lengths and types. ``mapped``: carved from one anonymous mapping, which
    the OS fills with pages only as they are first written, and which goes back to it whole when the last
    array is gone, outside malloc's heap."""
    if not mapped:
        return [np.empty(count, dtype) for count, dtype in specs]
    offsets, total = [], 0
    for count, dtype in specs:
        total = (total + 63) & ~63
        offsets.append(total)
        total += count * np.dtype(dtype).itemsize
    mem = mmap.mmap(-1, max(total, 1))
    return [np.frombuffer(mem, dtype, count, off) for (count, dtype), off in zip(specs, offsets, strict=True)]


def _levels_for(size: int) -> int:
    return size // 8 + 16  # a level takes at least 9 bytes: ["1","0"]


def _lines_for(size: int) -> int:
    return size // 64 + 256  # collector lines are ~100+ bytes; more lines fall back to exact arrays


def _parse_text(text: np.ndarray, arrays: _Arrays | None = None) -> Parsed:
    if arrays is not None:
        parsed, used = arrays.parse(text)
        if used >= text.shape[0] or parsed.bad >= 0:
            return parsed
    # More lines than guessed (short lines): arrays of the exact count, for this block only.
    lines = int(np.count_nonzero(text == 10)) + 1
    parsed, _ = _Arrays(lines, _levels_for(text.shape[0]), mapped=False).parse(text)
    return parsed


def parse_lines(block: bytes) -> Parsed:
    """Parse a block of lines into fresh arrays."""
    text = np.frombuffer(block, np.uint8)
    return _parse_text(text, _Arrays(_lines_for(len(block)), _levels_for(len(block)), mapped=False))


class _Slot:
    """A text buffer of ``cap`` bytes and the parser's outputs for it."""

    def __init__(self, cap: int, pooled: bool) -> None:
        self.cap = cap
        self.pooled = pooled  # False: never reused (a block longer than the pool's slots, or a pool of 0)
        (self.text,) = _alloc([(cap, np.uint8)], mapped=True)
        self.arrays = _Arrays(_lines_for(cap), _levels_for(cap), mapped=True)
        self.n = 0  # bytes of the block in ``text``
        self.parsed: Parsed | None = None
        self.refs = self._refs()

    def _refs(self) -> list[int]:
        return [sys.getrefcount(a) for a in (self.text, *self.arrays.roots)]

    def unreferenced(self) -> bool:
        """Whether nothing but the slot refers to its buffers (every view of them is gone)."""
        return self._refs() == self.refs


_NEW = object()  # in the free queue: a slot to allocate afresh (one was kept referenced)


class _Pool:
    def __init__(self, cap: int, size: int) -> None:
        if size == 1:
            raise ValueError("the pool needs 2 slots at least (the caller's and the one being filled), or 0 "
                             "for fresh buffers every block")
        self.cap = cap
        self.size = size
        self.made = 0  # pooled slots allocated so far: a small file never maps the whole pool
        self.free: queue.Queue = queue.Queue()
        self.blocks = 0  # blocks the caller gave back
        self.oversize = 0  # of which in one-off slots
        self.replaced = 0  # of which still referenced, so not reused

    def take(self, carry: int) -> _Slot | None:
        """A slot with room for ``carry`` bytes and more (reader thread only); None when stopping."""
        if carry >= self.cap:
            return _Slot(2 * carry, pooled=False)
        if not self.size:
            return _Slot(self.cap, pooled=False)
        got = None if self.made < self.size else self.free.get()
        if got is None and self.made >= self.size:
            return None  # stopping
        if got is None or got is _NEW:
            self.made += 1
            return _Slot(self.cap, pooled=True)
        return got

    def give_back(self, slot: _Slot) -> None:
        if slot.pooled:
            self.free.put(slot)

    def release(self, slot: _Slot) -> None:
        """The caller is done with ``slot``'s block: drop the views handed out, and reuse the slot unless
        something still refers to its buffers (reusing it would change what that sees)."""
        parsed, slot.parsed = slot.parsed, None
        if parsed is not None:
            parsed._invalidate()
        del parsed
        self.blocks += 1
        self.oversize += slot.cap > self.cap
        if not slot.pooled:
            return
        if slot.unreferenced():
            self.free.put(slot)
        else:
            self.replaced += 1
            self.free.put(_NEW)


class _Source:
    """The inflated bytes of a gzip (any number of members) or plain file, read into a buffer given.

    It also tells where each *chunk* ends: the output of one read of :data:`_READ` bytes of the file (of a
    gzip member's end, and of what follows it in that read). Blocks are cut only there, where the
    reader cut them when it joined whole chunks: the converter's output depends on where blocks end (it
    hands a block's depth rows to the day before its trades), so the same cuts keep it byte-identical.
    """

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.gz = fh.read(2) == b"\x1f\x8b"
        fh.seek(0)
        self.pos = 0  # plain files: bytes read
        self.d = _zlib.decompressobj(31)
        self.fed = False  # whether the current gzip member has received any input
        self.head: Any = b""  # input to give first: what the last call did not consume
        self.raw = memoryview(b"")  # the rest of the last read
        self.full = False  # the last call's output filled the room given: inflate may hold more

    def readinto(self, out: np.ndarray) -> tuple[int, bool]:
        """Put the next inflated bytes at the start of ``out``: (their count, whether a chunk ends with
        them); (-1, True) at the end of the file. Raises EOFError if the gzip stream is cut short."""
        room = min(out.shape[0], _INFLATE)
        if not self.gz:
            room = min(room, _READ - self.pos % _READ)
            got = self.fh.readinto(memoryview(out)[:room])
            if not got:
                return -1, True
            self.pos += got
            return got, got < room or self.pos % _READ == 0
        while True:
            if self.head:
                data, self.head = self.head, b""
            elif self.raw:
                data, self.raw = self.raw[:_FEED], self.raw[_FEED:]
            elif self.full:
                data = b""  # what inflate holds of the input already given, before any new input
            else:
                self.raw = memoryview(self.fh.read(_READ))
                data, self.raw = self.raw[:_FEED], self.raw[_FEED:]
                if not data:  # the end of the file
                    if self.fed and not self.d.eof:
                        raise EOFError("the gzip stream ends early (truncated file)")
                    return -1, True
            if data:
                self.fed = True
            got = self.d.decompress(data, room)
            self.full = len(got) == room
            if self.d.eof:
                # Concatenated gzip members (e.g. appended captures) continue the stream.
                self.head = self.d.unused_data
                self.d = _zlib.decompressobj(31)
                self.fed = self.full = False
                end = True
            else:
                self.head = self.d.unconsumed_tail
                end = not self.head and not self.raw and not self.full
            if got or end:
                out[:len(got)] = np.frombuffer(got, np.uint8)
                return len(got), end


def _reader_thread(path: Path, pool: _Pool, q: queue.Queue, stop: threading.Event) -> None:
    slot: _Slot | None = None
    nl = -1  # the last newline in the slot's text so far
    try:
        with open(path, "rb") as fh:
            src = _Source(fh)
            slot = pool.take(0)
            fill = 0
            size = 0  # bytes inflated since the last cut (or attempt)
            chunk = 0  # bytes of the current chunk
            # Small first blocks let the caller start while the rest is still being read.
            target = _BLOCK >> 4
            while slot is not None and not stop.is_set():
                if fill == slot.cap:  # full: a chunk or a line longer than the slot can hold
                    big = _Slot(2 * slot.cap, pooled=False)
                    big.text[:fill] = slot.text[:fill]
                    pool.give_back(slot)
                    slot = big
                got, end = src.readinto(slot.text[fill:])
                if got < 0:
                    if fill:
                        slot.n = fill
                        q.put(slot)
                        slot = None
                    break
                if got:
                    nl = max(nl, _last_newline(slot.text, fill, fill + got))
                    fill += got
                    size += got
                    chunk += got
                if not end or not chunk:
                    continue
                chunk = 0
                if size < target:
                    continue
                size = 0
                if nl < 0:
                    continue
                # Hand over the complete lines; the partial last one starts the next slot (copied before the
                # handover: the caller checks a slot for references once it is back, none may be in flight).
                carry = fill - nl - 1
                nxt = pool.take(carry)
                if nxt is None:
                    break
                nxt.text[:carry] = slot.text[nl + 1:fill]
                slot.n = nl + 1
                q.put(slot)
                slot, fill, nl = nxt, carry, -1
                target = min(target * 2, _BLOCK)
            q.put(None)
    except (EOFError, _zlib.error, OSError) as exc:
        # The complete lines before the damage are handed over; the partial one is where it broke.
        if slot is not None and nl >= 0:
            slot.n = nl + 1
            q.put(slot)
        q.put(Damaged(exc))
    except BaseException as exc:  # anything else still reaches the caller instead of a silent hang
        q.put(exc)


def _parser_thread(pool: _Pool, q_in: queue.Queue, q_out: queue.Queue, stop: threading.Event) -> None:
    try:
        while True:
            slot = q_in.get()
            if slot is None or isinstance(slot, BaseException):
                q_out.put(slot)
                return
            if not stop.is_set():
                slot.parsed = _parse_text(slot.text[:slot.n], slot.arrays)
            q_out.put(slot)
    except BaseException as exc:
        q_out.put(exc)


class Damaged(Exception):
    """The compressed stream is cut short or corrupt (raised after the last good block)."""


def iter_blocks(path: Path, slot: int | None = None, pool: int | None = None,
                stats: dict[str, int] | None = None) -> Iterator[Parsed]:
    """Yield the file's blocks of complete lines, parsed; each is valid until the next is asked for.

    Three stages run at once: a thread inflates, a thread parses, the caller builds the book. ``slot``
    (bytes of text a slot holds) and ``pool`` (slots; 0: fresh buffers for every block, none reused)
    default to :data:`_SLOT` and :data:`_POOL`. ``stats`` receives, once the
    iteration ends, the blocks handed over (``blocks``), those in one-off slots for lines longer than a
    block (``oversize``), those given back still referenced (``replaced``, each cost a fresh slot), and
    the pooled slots allocated (``slots``).
    """
    slots = _Pool(slot or _SLOT, _POOL if pool is None else pool)
    raw: queue.Queue = queue.Queue()  # the pool bounds what the queues hold
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    threads = [threading.Thread(target=_reader_thread, args=(path, slots, raw, stop), daemon=True,
                                name="binance-read"),
               threading.Thread(target=_parser_thread, args=(slots, raw, q, stop), daemon=True,
                                name="binance-parse")]
    for t in threads:
        t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item.parsed
            slots.release(item)
            item = None
    finally:
        # Stop the reader if the consumer stopped early (an error downstream); it may wait for a slot.
        stop.set()
        slots.free.put(None)
        deadline = time.monotonic() + 10.0  # daemon threads: never hang the caller on them
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if stats is not None:
            stats.update(blocks=slots.blocks, oversize=slots.oversize, replaced=slots.replaced, slots=slots.made)
