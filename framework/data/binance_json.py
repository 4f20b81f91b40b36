"""The Binance collector-file reader: a numba JSON parser for the few message shapes the hftbacktest
collector writes, and a two-thread pipeline that inflates and parses blocks of lines.

Why a hand-written parser: per-line ``json.loads`` costs more than everything else together. The
messages have a handful of fixed shapes, so a numba kernel scans a block of lines once, strictly
(anything it does not understand is flagged with its line, for the converter to report), and writes
numbers into flat arrays (the ``I_*``/``F_*``/``B_*`` columns, book levels apart); prices are parsed as
exact decimals (the double nearest the text). :mod:`quotelab.data.binance` builds the book from them.
"""

from __future__ import annotations

import contextlib
import queue
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
        q.put(Damaged(exc))
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


class Damaged(Exception):
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
