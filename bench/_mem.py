"""Peak private memory (RssAnon) of a child process, sampled from /proc every 20 ms."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def rss_anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def peak_rss_anon(cmd: list[str], **kw: object) -> tuple[float, float, str]:
    """Run ``cmd``; return (peak RssAnon in MB, wall seconds, stdout). Raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)  # type: ignore[call-overload]
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_anon_kb(proc.pid))
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return peak / 1024, time.perf_counter() - t0, out


if __name__ == "__main__":
    mb, s, _ = peak_rss_anon(sys.argv[1:])
    print(f"peak RssAnon {mb:.0f} MB, {s:.1f} s")
