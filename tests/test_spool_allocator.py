"""Reading a catalog's parts sets glibc to map large blocks on their own (spool.map_large_blocks)."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

# In a fresh process: glibc's own rule first (a freed 20 MiB mapped block raises its threshold, so a
# 2 MiB block then comes from the heap), then what creating EventFiles does to it. mallinfo2's hblkhd
# is the bytes of blocks mapped on their own.
PROBE = r"""
import ctypes, ctypes.util, json
from quotelab.data import catalog

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

def mapped(size):
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(size)
    during = libc.mallinfo2().hblkhd
    libc.free(p)
    return during - before, libc.mallinfo2().hblkhd - before

libc.free(libc.malloc(20 << 20))
out = {"default": mapped(2 << 20)}
catalog.EventFiles([])
out["set"] = mapped(4 << 20)
print(json.dumps(out))
"""


def _has_mallinfo2() -> bool:  # glibc >= 2.33
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33 only (elsewhere spool.map_large_blocks does nothing)")
def test_reading_parts_maps_large_blocks_and_unmaps_them_when_freed():
    import json

    out = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                    check=True).stdout.splitlines()[-1])
    assert out["default"] == [0, 0]  # glibc's default: from the heap, kept there once freed
    size, left = out["set"]
    assert size >= 4 << 20 and left == 0  # mapped on its own, and unmapped when freed

