"""Where results go: checked before any work starts, so a long run never ends unable to save."""

from __future__ import annotations

import errno
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from quotelab.errors import ConfigError, RunError

T = TypeVar("T")


def _writable_ancestor(path: Path, option: str, start: Path | None = None) -> None:
    """The nearest existing folder at or above ``start`` (default ``path``) is a folder this process
    may create entries in."""
    anc = (start or path).absolute()
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{option} {path}: {anc} is a file, so {path} cannot be created; give another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(anc) else "is not writable by this user"
        raise ConfigError(f"{option} {path}: {anc} {why}; give a folder you can write to")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output_dir(path: Path | None, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that is a file or cannot be created or written."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: a file of that name exists; give a folder (it is created if missing)")
    _writable_ancestor(path, option)


def check_output_file(path: Path | None, option: str = "--out") -> None:
    """Refuse, before any work, an output file that is a folder or whose folder cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {path}: exists and is not writable ({os.strerror(errno.EACCES)})")
    _writable_ancestor(path, option, start=path.parent)


def rescue_folder() -> Path:
    """A new folder under the system's temp directory, for results that could not be written where asked."""
    return Path(tempfile.mkdtemp(prefix="quotelab-results-"))


def save_or_rescue(write: Callable[[Path], T], out: Path, what: str) -> tuple[T, str | None]:
    """``write(out)``; if that fails, ``write`` into a new :func:`rescue_folder`. Returns what ``write``
    returned and, after a rescue, the message saying where the results went (else None)."""
    try:
        return write(out), None
    except OSError as exc:
        rescue = rescue_folder()
        return write(rescue), (f"could not write the {what} to {out} ({exc.strerror or exc}); they were saved to "
                               f"{rescue} instead")


def write_or_rescue(write: Callable[[Path], T], out: Path, what: str) -> T:
    """:func:`save_or_rescue`, raising the rescue's message: work already done is never lost to an output
    folder gone bad meanwhile, and the error says where it is."""
    done, lost = save_or_rescue(write, out, what)
    if lost is not None:
        raise RunError(lost)
    return done


def json_finite(x: Any) -> Any:
    """``x`` as plain JSON data: every non-finite float (in nested dicts, lists and tuples) None, tuples lists,
    numpy scalars Python ones."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_finite(v) for v in x]
    return x


# What the per-step records of one run or replay may allocate up front; more is a config asking for
# billions of rows (a 1 µs grid over a day), refused before anything is allocated or compiled.
MAX_RECORD_BYTES = 2 << 30


def check_record_budget(rows: int, row_bytes: int, where: str, what: str, fix: str) -> None:
    """Refuse ``rows`` records of ``row_bytes`` when they would take more than ``MAX_RECORD_BYTES``."""
    if rows * row_bytes > MAX_RECORD_BYTES:
        raise ConfigError(f"{where}: {what} is {rows:,} records, {rows * row_bytes / 2**30:.3g} GiB held in memory "
                          f"(at most {MAX_RECORD_BYTES / 2**30:g} GiB); {fix}")
