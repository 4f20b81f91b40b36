"""Rows that grow with the data (per-step records, trades), kept off private memory.

A :class:`Spool` takes rows chunk by chunk. The first chunk stays in memory, so short runs touch no
file; from the second on, the rows go to an unlinked temporary file and are read back memory-mapped.
Pages of a file mapping are file-backed: the OS writes them out and drops them under pressure, so a
month of records costs disk, not private memory (RssAnon).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

CHUNK = 1 << 16  # rows a caller buffers before handing them over (a few MB for any row width used here)


class Spool:
    """Append-only rows of ``dtype`` and ``row_shape``; :meth:`array` gives them all."""

    def __init__(self, dtype: Any, row_shape: tuple[int, ...] = ()) -> None:
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.rows = 0
        self._first: np.ndarray | None = None
        self._fh: Any = None

    def add(self, block: np.ndarray) -> None:
        """Append ``block`` (rows of this spool's shape); it is copied."""
        if not len(block):
            return
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if self._fh is None and self._first is None:
            self._first = block.copy()
        else:
            if self._fh is None:
                self._fh = tempfile.TemporaryFile(prefix="quotelab-spool-")  # noqa: SIM115 - lives with the rows
                self._fh.write(self._first.tobytes())  # type: ignore[union-attr]
                self._first = None
            self._fh.write(block.tobytes())
        self.rows += len(block)

    def array(self, writable: bool = False) -> np.ndarray:
        """All rows: in memory while they fit one chunk, else memory-mapped (``writable``: a private
        copy-on-write mapping, whose written pages become private memory)."""
        if self._fh is not None:
            self._fh.flush()
            return np.memmap(self._fh, dtype=self.dtype, mode="c" if writable else "r",
                             shape=(self.rows, *self.row_shape))
        if self._first is not None:
            return self._first
        return np.empty((0, *self.row_shape), dtype=self.dtype)


def scratch(n: int, dtype: Any = np.float64, row_shape: tuple[int, ...] = ()) -> np.ndarray:
    """A writable array of ``n`` rows of ``row_shape`` in an unlinked file (shared mapping: file-backed
    pages), for work arrays as long as the data, e.g. a sorted copy; in memory while it is small."""
    size = n * int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size < CHUNK * 64:
        return np.empty((n, *row_shape), dtype=dtype)
    with tempfile.TemporaryFile(prefix="quotelab-scratch-") as fh:
        fh.truncate(size)
        return np.memmap(fh, dtype=dtype, mode="w+", shape=(n, *row_shape))


def chunks(n: int, size: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive slices of ``range(n)``, :data:`CHUNK` long by default."""
    size = size or CHUNK
    for start in range(0, n, size):
        yield start, min(start + size, n)


def release_freed(every: float = 0.0) -> None:
    """Hand what glibc's allocator keeps of freed memory back to the OS (``malloc_trim``, every arena),
    at most once every ``every`` seconds; nothing on another C library. Call it after letting go of
    a part of the data: parts are inflated into buffers of tens of MB, and what the allocator kept
    of them grew with the number of parts read (evaluate's score: trades, 4 days against 1:
    +21 MB peak, +4 MB trimmed after each part)."""
    global _TRIMMED
    if time.monotonic() - _TRIMMED < every:
        return
    _TRIMMED = time.monotonic()
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def map_large_blocks() -> bool:
    """Have glibc map every block of :data:`MMAP_THRESHOLD` bytes or more on its own, unmapped when
    freed, and trim its heaps past twice that; process-wide, idempotent; False (nothing done) on
    another C library. Called when parts are to be streamed (:class:`quotelab.data.catalog.EventFiles`).

    A replay inflates each part into a block of its own (numpy in the research replays, hftbacktest's
    loader threads in a run): 64 MiB, but a day's last part is shorter. By default glibc raises its
    threshold (up to 32 MiB) each time a mapped block is freed and from then on serves smaller blocks
    from its heaps, which keep them once freed. Peak RssAnon, 4 busy 1-hour days against 1, medians
    of 3: ``run`` 213 vs 215 MB with the threshold fixed, 230 vs 227 MB without."""
    if (libc := _glibc()) is None:
        return False
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)  # glibc's own rule while it moves the threshold
    libc.malloc_trim(0)  # the heaps' free tops, so the blocks asked for next are mapped
    return True


def _glibc() -> Any:
    """The C library if it is glibc (it has ``malloc_trim`` and ``mallopt``), else None."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC or None


MMAP_THRESHOLD = 1 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
_LIBC: Any = None
_TRIMMED = float("-inf")
