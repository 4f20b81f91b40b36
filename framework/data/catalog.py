"""The event catalog: ``<catalog>/<venue>/<symbol>/<YYYYMMDD>.npz`` plus ``meta.json``.

Conventions every converter follows and every reader may rely on:

* A day is one file or, past :data:`PART_ROWS` rows, consecutive parts: ``<YYYYMMDD>.npz`` holds its
  first rows, ``<YYYYMMDD>.1.npz``, ``<YYYYMMDD>.2.npz``, ... the rest, in order; meta.json's day
  entry says how many (``parts``, absent for one). Each part is a plain npz like a whole day, so
  numpy reads it and hftbacktest takes the list of paths, reading a file at a time (and the next
  one ahead); replays stream them the same way (:class:`EventFiles`), so memory holds a part or
  two, not a day or a month. A catalog written before parts existed is read as it is: each of its
  days is one part.
* Converters write a day as it is produced (:class:`DayWriter`): rows are appended in order and each
  part is written once it has :data:`PART_ROWS` rows, so a writer holds at most one part, whatever the
  day's length; the files are those :func:`write_day` writes for the same rows.
* Each day file holds one array of hftbacktest's ``event_dtype`` under the key ``data``, deflated
  (the default) or stored uncompressed (``compression="none"``: ~7x the disk, but a day is then
  memory-mapped instead of inflated, ~10x faster to load). Both are plain npz files, ordered
  for hftbacktest (rows flagged ``EXCH_EVENT`` are non-decreasing in ``exch_ts``, rows flagged
  ``LOCAL_EVENT`` non-decreasing in ``local_ts``).
* A day is a UTC day of *exchange* time. It starts with a full depth snapshot
  (``DEPTH_CLEAR_EVENT`` per side, then ``DEPTH_SNAPSHOT_EVENT`` rows) so a backtest can start on
  any day.
* Depth rows carry the venue's final update id of their message in ``ival`` (0 where the venue
  has none); trade rows carry the trade id in ``ival`` and the initiator's side in the
  ``BUY_EVENT``/``SELL_EVENT`` flag.
* ``exch_ts`` is the venue's transaction time in ns (futures ``T``; spot depth has only ``E``).
  ``local_ts`` is the capture time in ns, shifted by the estimated clock offset recorded in the
  day's ``quality`` (never silently). Lines whose local clock steps back behind an earlier line take
  that line's time, and are reported with their count and range (``local_ts_backwards``): a few
  bad lines never move the offset of the whole day.

meta.json describes what the folder holds, and loading checks it:

* Per day it records the event count, the rows' CRC-32 and size (``crc32``, ``bytes``: the zip
  member's, which every read of the rows verifies, so comparing them with meta.json costs nothing
  more) and the ``tick_size`` and ``lot_size`` the day was converted with. :func:`load_days` refuses
  a day meta.json does not list, a file that is not the one listed, a top-level tick or lot that
  differs from the day's, and prices off the tick grid (a sample), each with an error naming
  meta.json or the day file. Days of older catalogs, without these fields, get the checks they can.
* :func:`list_days` lists the days whose files are there; a deleted day is not present.
* A day's ``funding_rows`` is the row count of its funding table, which :func:`load_funding` checks;
  committing a day without one removes the table an earlier conversion left.

Writes are atomic as a set, per symbol (:class:`Staging`): days are written into a private
``.staging-*`` folder of the catalog; the commit takes the symbol folder's lock, merges meta.json,
and renames the staged folder, new meta.json included, to ``<symbol>/.commit`` (the commit point),
then moves its days and meta.json (last) into place. A writer killed before the commit point leaves
the old state (and a staging folder the next writer removes: a live writer holds a lock on its
own); one killed after it leaves ``.commit``, which the next reader or writer of the symbol
finishes first. Readers hold the symbol's lock shared while they read meta.json and open the days,
so they see the old state or the new one, never a mix. Locks are ``flock`` on the folders
themselves: no lock files, and a read-only catalog can still be read. Files get the mode a plain
``open`` would (0666 less the umask), so other accounts can read what the umask allows.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import io
import json
import math
import os
import shutil
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from hftbacktest.types import event_dtype
from numba import njit

from quotelab import spool
from quotelab.errors import DataError

_PAD_FIELD = 0xA11E  # an unregistered zip extra-field id: readers skip it

VENUES: tuple[str, ...] = ("binance-spot", "binance-usdm", "binance-cm", "bybit", "okx", "synthetic")
# ... and `tardis-<exchange>` for Tardis data of exchanges quotelab has no venue name for.


def symbol_dir(catalog: Path | str, venue: str, symbol: str) -> Path:
    return Path(catalog) / venue / symbol


def day_path(catalog: Path | str, venue: str, symbol: str, day: str) -> Path:
    return symbol_dir(catalog, venue, symbol) / f"{day}.npz"


def funding_path(catalog: Path | str, venue: str, symbol: str, day: str) -> Path:
    """A day's funding side table (:data:`quotelab.data.funding.funding_dtype` rows), beside its events."""
    return symbol_dir(catalog, venue, symbol) / f"{day}.funding.npy"


def write_funding(catalog: Path | str, venue: str, symbol: str, day: str, table: np.ndarray) -> Path:
    """Atomically write one day's funding rows; returns the path."""
    path = funding_path(catalog, venue, symbol, day)
    atomic_write_bytes(path, lambda fh: np.save(fh, np.ascontiguousarray(table), allow_pickle=False))
    return path


def load_funding(catalog: Path | str, venue: str, symbol: str, days: list[str]) -> np.ndarray | None:
    """The funding rows of ``days`` in exchange-time order, or None if no day has any.

    Read under the symbol's lock with meta.json, and checked against it: a day whose entry counts
    ``funding_rows`` must have a side table of that many rows; a table beside a day without the count
    (an older catalog, or written by hand with :func:`write_funding`) is read as it is.
    """
    from quotelab.data.funding import funding_dtype

    sym = symbol_dir(catalog, venue, symbol)
    parts = []
    with _reading(sym) if sym.is_dir() else contextlib.nullcontext():
        meta = _read_meta_file(sym / META) if (sym / META).exists() else {}
        for day in days:
            path = funding_path(catalog, venue, symbol, day)
            rec = meta.get("days", {}).get(day) or {}
            expected = rec.get("funding_rows")
            if not path.exists():
                if expected:
                    raise DataError(f"{path}: missing, but {sym / META} counts {expected} funding rows for day {day} "
                                    f"(deleted?); without them the run would settle no funding. Fix: convert the "
                                    f"day again.")
                continue
            try:
                table = np.load(path, allow_pickle=False)
            except Exception as exc:
                raise DataError(f"{path}: not a readable funding table ({type(exc).__name__}: {exc}); "
                                f"convert the day again") from exc
            if table.dtype != funding_dtype:
                raise DataError(f"{path}: dtype {table.dtype}, expected quotelab's funding_dtype; convert the day "
                                f"again")
            if expected is not None and len(table) != expected:
                raise DataError(f"{path}: {len(table)} funding rows, but {sym / META} counts {expected} for day "
                                f"{day}: the file was cut short or replaced after meta.json was written. Fix: "
                                f"convert the day again.")
            parts.append(table)
    if not parts:
        return None
    table = np.concatenate(parts)
    return table[np.argsort(table["exch_ts"], kind="stable")]


def _umask() -> int:
    try:  # Linux states it; os.umask can only be read by setting it, which races with other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file.
    The file gets the mode a plain ``open`` would give it (0666 less the umask), not mkstemp's 0600, so
    other accounts (a Ray node) can read catalogs and results where the umask lets them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


COMPRESSIONS: tuple[str, ...] = ("deflate", "none")
_ALIGN = 64  # numpy pads the npy header to 64 bytes; the zip header is padded so the rows are too


PART_ROWS = 1 << 20  # rows per part file (64 MiB of rows): what a replay holds of a day at a time


def part_path(path: Path | str, k: int) -> Path:
    """Part ``k`` of the day file ``path``: the file itself for k = 0, else ``<day>.<k>.npz`` beside it."""
    path = Path(path)
    return path if k == 0 else path.with_name(f"{path.stem}.{k}.npz")


def parts_of(path: Path | str) -> list[Path]:
    """A day file and its further parts, in order (see the module docstring)."""
    found = [Path(path)]
    while (nxt := part_path(path, len(found))).exists():
        found.append(nxt)
    return found


class _PartFile:
    """One part being written: a temporary file in the target folder holding an open zip entry."""

    def __init__(self, path: Path, rows: int, compression: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # as atomic_write_bytes
        self.fh = os.fdopen(fd, "wb")
        self.zf = zipfile.ZipFile(self.fh, "w", allowZip64=True)
        info = zipfile.ZipInfo("data.npy", date_time=(1980, 1, 1, 0, 0, 0))
        if compression == "deflate":
            info.compress_type = zipfile.ZIP_DEFLATED
            info._compresslevel = 1  # public as compress_level only from Python 3.13
        else:
            info.compress_type = zipfile.ZIP_STORED
            # local header: 30 bytes + name + zip64 field (20) + this padding field (4 + n)
            used = 30 + len(info.filename) + 20 + 4
            info.extra = struct.pack("<HH", _PAD_FIELD, -used % _ALIGN) + bytes(-used % _ALIGN)
        self.fid = self.zf.open(info, "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(event_dtype), "fortran_order": False, "shape": (rows,)}
        np.lib.format.write_array_header_1_0(self.fid, header)
        self.left = rows * event_dtype.itemsize

    def write(self, rows: np.ndarray) -> None:
        self.fid.write(memoryview(rows).cast("B"))
        self.left -= rows.nbytes

    def close(self) -> None:
        self.fid.close()
        self.zf.close()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()

    def discard(self) -> None:
        self.fh.close()
        self.zf.fp = None  # else the zip, collected, writes its directory into the closed file
        Path(self.tmp).unlink(missing_ok=True)


class _PartWriter:
    """A binary sink that cuts the rows written to it into part files of ``part_rows`` rows."""

    def __init__(self, path: Path, rows: int, compression: str, part_rows: int) -> None:
        self.path, self.compression = path, compression
        self.sizes = [min(part_rows, rows - at) for at in range(0, rows, part_rows)] or [0]
        self.done: list[_PartFile] = []
        self.open: _PartFile | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while True:
            if self.open is None:
                self.open = _PartFile(part_path(self.path, len(self.done)), self.sizes[len(self.done)],
                                      self.compression)
            take = min(self.open.left, len(view))
            self.open.fid.write(view[:take])
            self.open.left -= take
            view = view[take:]
            if self.open.left == 0 and len(self.done) + 1 < len(self.sizes):
                self.open.close()
                self.done.append(self.open)
                self.open = None
            if not len(view):
                return n

    def commit(self) -> None:
        if self.open is None:  # no rows at all: an empty day is one empty part
            self.open = _PartFile(self.path, 0, self.compression)
        self.open.close()
        self.done.append(self.open)
        self.open = None
        if len(self.done) != len(self.sizes) or any(p.left for p in self.done):
            raise ValueError(f"{self.path}: the body wrote a different number of rows than announced")
        _place_parts(self.path, self.done)

    def discard(self) -> None:
        for part in (*self.done, *([self.open] if self.open else [])):
            part.discard()


def _place_parts(path: Path, done: list[_PartFile]) -> None:
    """Rename written parts into place: later parts first, the day file last, then remove stale parts of
    an earlier, longer write."""
    for part in reversed(done):
        os.replace(part.tmp, part.path)
    k = len(done)
    while (stale := part_path(path, k)).exists():
        stale.unlink()
        k += 1


class DayWriter:
    """A day's rows appended in order, of any number, written as parts of ``part_rows`` rows as they come.

    An npy header states its row count, so a part is started once it is known to be full: when its last
    row has come or, if :meth:`expect` said the day has at least that many rows, at once. Until then its
    first :attr:`HOLD` rows are held as they were appended (not copied: a caller hands over rows it no
    longer changes) and the rest wait in an unlinked file beside the parts; after, they go straight to the
    part's file. Each part is written (CRC, deflate, the file)
    by a thread of its own, and two parts can be written at once: all of it leaves the GIL, so it runs
    beside the caller producing the next rows, a few blocks behind it at most. The parts are the files
    :func:`write_day` writes for the same rows, renamed into place together by :meth:`commit`.
    """

    AHEAD = 1  # writes queued before append waits for the oldest: the rows held for the writers (a block each;
    # one keeps a writer busy, more only held memory: 3 measured +30 MB of peak RssAnon converting 20 busy minutes)
    WRITERS = 2  # parts written at once
    HOLD = 1 << 16  # rows of a part of unknown size held in memory. A day's last part is one (its size is known
    # only at the end): held whole it was up to 64 MB at the close's peak, so convert's peak RssAnon followed the
    # size of that remainder (200-206 MB at 80 and 160 busy minutes, remainders of ~1 M rows; 189-192 at 320, 0.6 M)

    def __init__(self, path: Path, compression: str = "deflate", part_rows: int = PART_ROWS) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        if part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {part_rows}")
        self.path, self.compression, self.part_rows = Path(path), compression, part_rows
        self.held: list[np.ndarray] = []  # the current part's first rows, while its size is not known
        self.held_rows = 0
        self.waiting: IO[bytes] | None = None  # its rows past HOLD
        self.fill = 0  # rows of the current part so far
        self.rows = 0
        self.known = 0  # rows the day is known to have
        self.open: _PartFile | None = None  # the current part, once started
        self.done: list[_PartFile] = []
        self._writer: ThreadPoolExecutor | None = None  # the current part's
        self._queued: collections.deque[Future[None]] = collections.deque()
        self._closing: collections.deque[tuple[ThreadPoolExecutor, Future[None]]] = collections.deque()

    def expect(self, rows: int) -> None:
        """The day has at least ``rows`` rows: the parts they fill are written as their rows come."""
        self.known = max(self.known, rows)

    def append(self, rows: np.ndarray) -> None:
        if rows.dtype != event_dtype:
            raise TypeError(f"events must have hftbacktest's event_dtype, got {rows.dtype}")
        at, n = 0, rows.shape[0]
        while at < n:
            take = min(self.part_rows - self.fill, n - at)
            piece = rows[at:at + take]
            if self.open is None and self.known >= (len(self.done) + 1) * self.part_rows:
                self._start(self.part_rows)
            if self.open is not None:
                self._queued.append(self._writer.submit(self.open.write, np.ascontiguousarray(piece)))  # type: ignore[union-attr]
                while len(self._queued) > self.AHEAD:
                    self._queued.popleft().result()
            else:
                self._hold(piece)
            self.fill += take
            at += take
            if self.fill == self.part_rows:
                self._finish_part()
        self.rows += n

    def _hold(self, piece: np.ndarray) -> None:
        if self.waiting is None and self.held_rows + piece.shape[0] <= self.HOLD:
            self.held.append(piece)
            self.held_rows += piece.shape[0]
            return
        if self.waiting is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.waiting = tempfile.TemporaryFile(dir=self.path.parent)  # noqa: SIM115 - closed once written
        self.waiting.write(memoryview(np.ascontiguousarray(piece)).cast("B"))

    def _start(self, rows: int) -> None:
        while len(self._closing) >= self.WRITERS:
            self._retire()
        self.open = part = _PartFile(part_path(self.path, len(self.done)), rows, self.compression)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="day-writer")
        held, self.held, self.held_rows = [np.ascontiguousarray(p) for p in self.held], [], 0
        waiting, self.waiting = self.waiting, None
        if held or waiting is not None:
            self._queued.append(self._writer.submit(_write_held, part, held, waiting))

    def _finish_part(self) -> None:
        if self.open is None:
            self._start(self.fill)
        part, self.open = self.open, None
        self.done.append(part)  # type: ignore[arg-type]
        self._closing.append((self._writer, self._writer.submit(part.close)))  # type: ignore[union-attr]
        self._writer = None
        self.fill = 0

    def _retire(self) -> None:
        """Wait for the oldest part being written (its error, if any, raises here)."""
        pool, closed = self._closing.popleft()
        try:
            closed.result()
        finally:
            pool.shutdown(wait=True)

    def _drain(self) -> None:
        try:
            while self._queued:  # a failed write raises here, before its part counts as written
                self._queued.popleft().result()
            while self._closing:
                self._retire()
        finally:
            for pool, _ in self._closing:
                pool.shutdown(wait=True, cancel_futures=True)
            if self._writer is not None:
                self._writer.shutdown(wait=True, cancel_futures=True)
            self._closing.clear()
            self._queued.clear()
            self._writer = None

    def commit(self) -> None:
        if self.fill or not self.done:  # the last, partial part; an empty day is one empty part
            self._finish_part()
        self._drain()
        _place_parts(self.path, self.done)

    def discard(self) -> None:
        with contextlib.suppress(Exception):  # the write that failed is what is being discarded
            self._drain()
        for part in (*self.done, *([self.open] if self.open else [])):
            part.discard()
        if self.waiting is not None:
            self.waiting.close()
        self.done, self.open, self.held, self.held_rows, self.waiting = [], None, [], 0, None


def _write_held(part: _PartFile, held: list[np.ndarray], waiting: IO[bytes] | None) -> None:
    for rows in held:
        part.write(rows)
    if waiting is not None:
        with waiting:
            waiting.seek(0)
            while chunk := waiting.read(4 << 20):
                part.write(np.frombuffer(chunk, event_dtype))


def write_event_npz(path: Path, rows: int, write_body: Callable[[IO[bytes]], None], compression: str = "deflate",
                    part_rows: int = PART_ROWS) -> None:
    """An npz holding ``data``, an event array of ``rows`` rows whose raw bytes ``write_body`` writes,
    cut into parts of ``part_rows`` rows (:func:`parts_of`) as the bytes arrive.

    Atomic per part and byte-for-byte reproducible (the zip entry carries a fixed date, where
    ``np.savez`` stamps the wall clock); the parts are renamed into place together once all are
    written. ``deflate`` compresses at level 1: level 6 is several times slower for files ~5% smaller,
    since event floats are noisy. ``none`` stores the rows at a 64-byte aligned offset, so
    :func:`load_events` maps them without a copy. ``np.load`` and hftbacktest read both.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if part_rows < 1:
        raise ValueError(f"part_rows must be >= 1, got {part_rows}")
    out = _PartWriter(Path(path), rows, compression, part_rows)
    try:
        write_body(out)  # type: ignore[arg-type]
        out.commit()
    except BaseException:
        out.discard()
        raise


def write_day(catalog: Path | str, venue: str, symbol: str, day: str, events: np.ndarray,
              compression: str = "deflate", part_rows: int = PART_ROWS) -> Path:
    """Atomically write one day's events (see :func:`write_event_npz`); returns the day file's path."""
    if events.dtype != event_dtype:
        raise TypeError(f"events must have hftbacktest's event_dtype, got {events.dtype}")
    path = day_path(catalog, venue, symbol, day)
    raw = np.ascontiguousarray(events).view(np.uint8).reshape(-1)
    block = 16 << 20

    def body(fid: IO[bytes]) -> None:
        for i in range(0, len(raw), block):
            fid.write(raw[i:i + block].data)

    write_event_npz(path, len(events), body, compression, part_rows)
    return path


META = "meta.json"
_COMMIT = ".commit"  # a symbol's pending commit: new day files and meta.json, moved into place together
_STAGING = ".staging-"


@contextlib.contextmanager
def _flock(folder: Path, exclusive: bool) -> Iterator[None]:
    """An advisory lock on a folder itself (flock works on a directory's descriptor), so there are no
    lock files to leave behind, and a read-only catalog can be locked for reading."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _roll_forward(sym: Path) -> None:
    """Finish a commit whose ``.commit`` folder exists (its writer may have been killed half way): days
    first, meta.json last, then the folder goes. Call with the symbol's lock held exclusively."""
    pending = sym / _COMMIT
    if not pending.is_dir():
        return
    for day in pending.glob("*.npz"):
        # a day converted again without funding rows: its earlier table would be read as this one's
        if "." not in day.stem and not (pending / f"{day.stem}.funding.npy").exists():
            (sym / f"{day.stem}.funding.npy").unlink(missing_ok=True)
    for p in sorted(pending.iterdir()):
        if p.name != META and not p.name.startswith("."):
            os.replace(p, sym / p.name)
    if (pending / META).exists():
        os.replace(pending / META, sym / META)
    _fsync_dir(sym)
    shutil.rmtree(pending)


@contextlib.contextmanager
def _reading(sym: Path) -> Iterator[None]:
    """Hold the symbol's lock shared, so no commit moves files while meta.json and its days are read. A
    commit left half done by a killed writer is finished first (readers see old or new, never a mix)."""
    if (sym / _COMMIT).is_dir():
        try:
            with _flock(sym, exclusive=True):
                _roll_forward(sym)
        except OSError as exc:
            raise DataError(
                f"{sym / _COMMIT}: a write to this catalog was interrupted while committing, and it cannot be "
                f"completed from here ({exc.strerror}). Fix: run any `quotelab convert` of this symbol, or this "
                f"command, as an account that can write {sym}.") from None
    with _flock(sym, exclusive=False):
        yield


def _read_meta_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt meta.json at line {exc.lineno}: {exc.msg}") from exc


def read_meta(catalog: Path | str, venue: str, symbol: str) -> dict[str, Any]:
    sym = symbol_dir(catalog, venue, symbol)
    if not (sym / META).exists() and not (sym / _COMMIT / META).exists():
        known = list_symbols(catalog)
        raise DataError(
            f"no meta.json for {venue}/{symbol} in catalog {catalog}; "
            f"the catalog holds: {', '.join(known) or 'nothing'}. Convert data with `quotelab convert` "
            f"or generate it with `quotelab synth`."
        )
    with _reading(sym):
        return _read_meta_file(sym / META)


def _check_instrument(venue: str, symbol: str, instrument: dict[str, Any]) -> None:
    for key in ("tick_size", "lot_size"):
        if not instrument.get(key, 0) > 0:
            raise DataError(
                f"{venue}/{symbol}: {key} must be > 0 (hftbacktest hangs on 0), got {instrument.get(key)}"
            )


def _merge_meta(sym: Path, venue: str, symbol: str, instrument: dict[str, Any], days: dict[str, dict[str, Any]]
                ) -> dict[str, Any]:
    meta: dict[str, Any] = _read_meta_file(sym / META) if (sym / META).exists() else {}
    meta.update({"venue": venue, "symbol": symbol, **instrument})
    meta.setdefault("days", {}).update(days)
    return meta


def update_meta(
    catalog: Path | str,
    venue: str,
    symbol: str,
    instrument: dict[str, Any],
    days: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Merge ``instrument`` fields and per-day entries into meta.json (atomic, under the symbol's lock)
    and return it. Writers of day files use :class:`Staging` instead, which moves days and meta together.

    ``instrument`` holds at least ``tick_size``, ``lot_size`` and ``contract`` (``{"kind":
    "linear"|"inverse", "size": float}``). ``days`` maps ``YYYYMMDD`` to ``{"first_ts", "last_ts",
    "events", "counts", "quality"}``.
    """
    _check_instrument(venue, symbol, instrument)
    sym = symbol_dir(catalog, venue, symbol)
    sym.mkdir(parents=True, exist_ok=True)
    with _flock(sym, exclusive=True):
        _roll_forward(sym)
        meta = _merge_meta(sym, venue, symbol, instrument, days)
        atomic_write_json(sym / META, meta)
    return meta


def day_record(path: Path, instrument: dict[str, Any]) -> dict[str, Any]:
    """What meta.json records of a written day file so loading can tell it is the file described: its
    rows' CRC-32 and size (the zip member's, which every read of the rows verifies) and the tick and lot
    its prices and quantities were checked against when it was written."""
    parts = parts_of(path)
    infos = []
    for p in parts:
        with zipfile.ZipFile(p) as zf:
            infos.append(zf.getinfo("data.npy"))
    rec = {"crc32": infos[0].CRC, "bytes": infos[0].file_size, "tick_size": instrument["tick_size"],
           "lot_size": instrument["lot_size"]}
    if len(parts) > 1:  # the first part's crc32 and bytes above; every part's here
        rec["parts"] = len(parts)
        rec["part_crc32"] = [i.CRC for i in infos]
        rec["part_bytes"] = [i.file_size for i in infos]
    return rec


@dataclass(frozen=True)
class Shrink:
    """A staged day that covers less of a day the catalog already holds: its exchange-time span does
    not contain the catalog day's (``file``), so committing it would lose the rest of that day."""

    day: str
    file: Path
    old_span: tuple[int, int]
    old_events: int
    new_span: tuple[int, int]
    new_events: int

    def describe(self) -> str:
        return (f"{self.file}: catalog day {self.day} spans {_span(self.old_span)} with {self.old_events:,} events; "
                f"the new one spans {_span(self.new_span)} with {self.new_events:,} events, which does not cover it")


def utc_text(ns: int) -> str:
    """A time in ns as ``YYYY-MM-DD HH:MM:SS.mmm`` (UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 1_000_000_000)) + f".{ns // 1_000_000 % 1000:03d}"


def _span(span: tuple[int, int]) -> str:
    return f"{utc_text(span[0])} - {utc_text(span[1])} UTC"


def _shrinks(sym: Path, old: dict[str, Any], new: dict[str, dict[str, Any]]) -> list[Shrink]:
    """The days of ``new`` whose span does not contain that of the same day in ``old`` (meta.json's
    entries). A day whose file is gone, or whose entry has no span (written by hand), has nothing to lose."""
    out = []
    for day, rec in sorted(new.items()):
        was = old.get(day) or {}
        if not (sym / f"{day}.npz").exists() or was.get("first_ts") is None or was.get("last_ts") is None:
            continue
        if rec.get("first_ts") is None or rec.get("last_ts") is None:
            continue
        if rec["first_ts"] > was["first_ts"] or rec["last_ts"] < was["last_ts"]:
            out.append(Shrink(day, sym / f"{day}.npz", (int(was["first_ts"]), int(was["last_ts"])),
                              int(was.get("events", 0)), (int(rec["first_ts"]), int(rec["last_ts"])),
                              int(rec.get("events", 0))))
    return out


SHRINK_MODES = ("replace", "refuse", "drop")


class ShrinkError(DataError):
    """A commit refused because staged days would replace catalog days with less of them."""

    def __init__(self, message: str, shrinks: list[Shrink]) -> None:
        super().__init__(message)
        self.shrinks = shrinks


class Staging:
    """A writer's private folder in the catalog (``.staging-*``); days are written there and committed
    with their meta.json entries, per symbol, all at once.

    The folder is locked while its writer lives, so the next writer removes those of killed writers.
    :meth:`commit` holds the symbol's lock, merges meta.json, then renames the symbol's staged folder
    (days plus the new meta.json) to ``<symbol>/.commit``: that rename is the commit point. The files
    are then moved into place, meta.json last; a writer killed during the moves leaves ``.commit``
    behind, and the next reader or writer of the symbol finishes the moves before anything else.
    Only the days committed are moved: files of other staged days (a day a stopped conversion discards,
    perhaps with some parts already renamed into place) are removed first.
    """

    def __init__(self, catalog: Path | str) -> None:
        self.root = Path(catalog)
        self.root.mkdir(parents=True, exist_ok=True)
        with _flock(self.root, exclusive=True):
            _clean_dead_staging(self.root)
            self.dir = Path(tempfile.mkdtemp(prefix=_STAGING, dir=self.root))
            self._owner = os.open(self.dir, os.O_RDONLY)
            fcntl.flock(self._owner, fcntl.LOCK_EX)
        self.dropped: list[Shrink] = []  # the days the last commit left out (``shrinking="drop"``)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owner >= 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.close(self._owner)
            self._owner = -1

    def day_path(self, venue: str, symbol: str, day: str) -> Path:
        return day_path(self.dir, venue, symbol, day)

    def write_day(self, venue: str, symbol: str, day: str, events: np.ndarray, compression: str = "deflate",
                  part_rows: int = PART_ROWS) -> Path:
        return write_day(self.dir, venue, symbol, day, events, compression, part_rows)

    def open_day(self, venue: str, symbol: str, day: str, compression: str = "deflate",
                 part_rows: int = PART_ROWS) -> DayWriter:
        """A :class:`DayWriter` of a staged day: its rows streamed in, parts written as they fill."""
        return DayWriter(self.day_path(venue, symbol, day), compression, part_rows)

    def commit(self, venue: str, symbol: str, instrument: dict[str, Any], days: dict[str, dict[str, Any]],
               staged_venue: str | None = None, shrinking: str = "replace", fix: str = "") -> dict[str, Any]:
        """Move the staged days of ``staged_venue/symbol`` (default ``venue``) to ``venue/symbol`` together
        with their meta.json entries ``days``; returns the new meta.

        ``shrinking``: what to do with a day whose exchange-time span does not contain that of the catalog's
        day (:class:`Shrink`): ``replace`` it, ``refuse`` the whole commit (a :class:`ShrinkError` naming
        every such day, then ``fix``; nothing is moved), or ``drop`` those days and commit the others
        (listed in :attr:`dropped`). Checked under the symbol's lock, so a concurrent commit cannot slip a
        longer day in between the check and the move."""
        if shrinking not in SHRINK_MODES:
            raise ValueError(f"shrinking must be one of {SHRINK_MODES}, got {shrinking!r}")
        self.dropped = []
        _check_instrument(venue, symbol, instrument)
        src = symbol_dir(self.dir, staged_venue or venue, symbol)
        src.mkdir(parents=True, exist_ok=True)
        # Only the days committed go: a day stopped while its parts were being renamed into place (the day a
        # stopped convert discards) may have some of them here, which must not reach the catalog.
        _remove_staged_days_but(src, days)
        sym = symbol_dir(self.root, venue, symbol)
        records = {}
        for day, entry in days.items():
            staged = src / f"{day}.npz"
            if not staged.exists():
                raise DataError(f"{venue}/{symbol}: day {day} was never staged")
            records[day] = {**entry, **day_record(staged, instrument)}
        sym.mkdir(parents=True, exist_ok=True)
        with _flock(sym, exclusive=True):
            _roll_forward(sym)
            if shrinking != "replace":
                old = _read_meta_file(sym / META).get("days", {}) if (sym / META).exists() else {}
                shrinks = _shrinks(sym, old, records)
                if shrinks and shrinking == "refuse":
                    more = [s.day for s in shrinks[1:]]
                    raise ShrinkError(
                        f"{shrinks[0].describe()}, so it would replace that day with less of it"
                        + (f" (so would {', '.join(more)})" if more else "")
                        + f"; nothing was written{'. ' + fix if fix else ''}", shrinks)
                for sh in shrinks:
                    del records[sh.day]
                _remove_staged_days_but(src, records)  # their events, parts and funding tables
                self.dropped = shrinks
                if not records:  # nothing left to commit: meta.json stays byte for byte as it is
                    return _read_meta_file(sym / META)
            meta = _merge_meta(sym, venue, symbol, instrument, records)
            atomic_write_json(src / META, meta)
            _fsync_dir(src)
            os.rename(src, sym / _COMMIT)
            _fsync_dir(sym)
            _roll_forward(sym)
        return meta


def _remove_staged_days_but(src: Path, keep: Iterable[str]) -> None:
    """Remove the files in staging folder ``src`` of every day not in ``keep`` (a day's files are named
    ``<day>.*``; hidden files are not days')."""
    keep = set(keep)
    for p in src.iterdir():
        if not p.name.startswith(".") and p.name.split(".")[0] not in keep:
            p.unlink()


def _clean_dead_staging(root: Path) -> None:
    """Remove the staging folders of writers that died (their lock is free). Call with the catalog's lock."""
    for d in root.glob(f"{_STAGING}*"):
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer's
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".convert-*"):  # the staging folders of quotelab before Staging, never locked
        shutil.rmtree(d, ignore_errors=True)


def list_symbols(catalog: Path | str) -> list[str]:
    """``venue/symbol`` of each symbol with a meta.json, or one still in a commit its writer did not finish
    (the first conversion of a symbol killed after the commit point; its next reader finishes it)."""
    root = Path(catalog)
    if not root.is_dir():
        return []
    syms = [p.parent for p in root.glob(f"*/*/{META}")] + [p.parent.parent for p in root.glob(f"*/*/{_COMMIT}/{META}")]
    return sorted({f"{s.parent.name}/{s.name}" for s in syms})


def list_days(catalog: Path | str, venue: str, symbol: str) -> list[str]:
    """The days meta.json describes whose files are there (a deleted day is not listed)."""
    meta = read_meta(catalog, venue, symbol)
    return sorted(d for d in meta.get("days", {}) if day_path(catalog, venue, symbol, d).exists())


def load_day(catalog: Path | str, venue: str, symbol: str, day: str) -> np.ndarray:
    """Load one catalog day (its parts joined), checked against its meta.json entry (see :func:`load_days`)."""
    return load_days(catalog, venue, symbol, [day])[1][0]


def _day_parts(catalog: Path | str, venue: str, symbol: str, meta: dict[str, Any], day: str) -> list[Path]:
    """The files of a listed day, as meta.json counts them; a missing day names the catalog and the days present."""
    sym = symbol_dir(catalog, venue, symbol)
    path = day_path(catalog, venue, symbol, day)
    if not path.exists():
        listed = meta.get("days", {})
        have = sorted(d for d in listed if day_path(catalog, venue, symbol, d).exists())
        gone = f" ({sym / META} lists it, but its file is gone)" if day in listed else ""
        raise DataError(
            f"catalog day {venue}/{symbol}/{day} is missing from catalog {catalog} (looked for {path})"
            f"{gone}; days present: {', '.join(have) or 'none'}"
        )
    rec = meta.get("days", {}).get(day) or {}
    paths = [part_path(path, k) for k in range(int(rec.get("parts", 1)))]
    for part in paths[1:]:
        if not part.exists():
            raise DataError(f"{part}: part of day {day} listed in {sym / META} is missing. Fix: convert the day again.")
    return paths


def load_days(catalog: Path | str, venue: str, symbol: str, days: Sequence[str]
              ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """meta.json and the ``days`` it describes (each one array, its parts joined), read together under
    the symbol's lock.

    Each day is checked against its entry: listed at all, the same rows (CRC-32, size and event count,
    where the entry has them), converted with the tick and lot meta.json now states, and prices on that
    tick grid (a sample: the day-start book and the first and last rows). A missing day names the
    catalog and the days present.
    """
    sym = symbol_dir(catalog, venue, symbol)
    read_meta(catalog, venue, symbol)  # names the catalog's symbols if this one is not there
    out = []
    with _reading(sym):
        meta = _read_meta_file(sym / META)
        for day in days:
            paths = _day_parts(catalog, venue, symbol, meta, day)
            loaded = [_load_events_info(p) for p in paths]
            events = loaded[0][0] if len(loaded) == 1 else np.concatenate([e for e, _ in loaded])
            _check_record(sym / META, meta, day, paths[0], len(events), [i for _, i in loaded])
            _check_grid(sym / META, meta, day, paths[0], loaded[0][0])
            out.append(events)
    return meta, out


def stream_days(catalog: Path | str, venue: str, symbol: str, days: Sequence[str]
                ) -> tuple[dict[str, Any], EventFiles]:
    """meta.json and the files of ``days``, to be read a file at a time (:class:`EventFiles`).

    The checks of :func:`load_days`, without inflating a day: the counts, CRC-32s and sizes come from
    each part's zip directory and npy header; the tick-grid sample from the first part. The files are
    read later, outside the lock: a conversion of the same days during the replay is not guarded.
    """
    sym = symbol_dir(catalog, venue, symbol)
    read_meta(catalog, venue, symbol)
    files: list[Path] = []
    with _reading(sym):
        meta = _read_meta_file(sym / META)
        for day in days:
            paths = _day_parts(catalog, venue, symbol, meta, day)
            infos = []
            for p in paths:
                with zipfile.ZipFile(p) as zf:
                    infos.append(zf.getinfo("data.npy"))
            _check_record(sym / META, meta, day, paths[0], sum(count_rows(p) for p in paths), infos)
            _check_grid(sym / META, meta, day, paths[0], None)
            files += paths
    return meta, EventFiles(files)


class EventFiles(Sequence[np.ndarray]):
    """Event files read one at a time: item ``i`` is file ``i``, loaded (:func:`load_events`) each
    time it is asked for and let go by the caller, so a replay holds one file, not every day."""

    def __init__(self, paths: Sequence[Path | str]) -> None:
        self.paths = tuple(Path(p) for p in paths)
        self._rows: list[int] | None = None
        # Each part is inflated into a block of its own (here, or in hftbacktest's loader threads) and
        # freed at the next: mapped, those go back to the OS, so memory does not grow with the days.
        spool.map_large_blocks()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return load_events(self.paths[i])

    def __iter__(self) -> Iterator[np.ndarray]:
        # Sequence's own __iter__ keeps the file it yielded last while it loads the next: two in memory
        return (load_events(p) for p in self.paths)

    def rows(self) -> list[int]:
        """Each file's row count, from its npy header (nothing inflated)."""
        if self._rows is None:
            self._rows = [count_rows(p) for p in self.paths]
        return self._rows


def count_rows(path: Path | str) -> int:
    """The row count of an event npz, read from its header."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("data.npy") as fh:
            shape, _, dtype = _npy_header(fh)  # type: ignore[arg-type]
    except Exception as exc:
        raise DataError(f"{path}: not a readable event file ({type(exc).__name__}: {exc})") from exc
    if dtype != event_dtype or len(shape) != 1:
        raise DataError(f"{path}: array 'data' has dtype {dtype}, expected hftbacktest's event_dtype")
    return int(shape[0])


_GRID_SAMPLE = 1 << 16


def off_grid(events: np.ndarray, tick: float) -> tuple[int, float] | None:
    """The first (row, price) among the day's first and last ``_GRID_SAMPLE`` rows of book events whose
    price is not a multiple of ``tick``, or None. The day-start book alone holds hundreds of prices, so a
    wrong tick is all but certain to show. Only book prices must be on the grid (hftbacktest keys its book
    by tick); trade prices of a synthetic market may sit between ticks."""
    from hftbacktest.types import DEPTH_EVENT, DEPTH_SNAPSHOT_EVENT

    n = len(events)
    for start in (0, max(_GRID_SAMPLE, n - _GRID_SAMPLE)):
        part = events[start:start + _GRID_SAMPLE]
        kind = part["ev"] & np.uint64(0xFF)
        book = (kind == DEPTH_EVENT) | (kind == DEPTH_SNAPSHOT_EVENT)
        ratio = part["px"] / tick
        bad = np.flatnonzero(book & (np.abs(ratio - np.rint(ratio)) > 1e-6))
        if bad.shape[0]:
            return start + int(bad[0]), float(part["px"][bad[0]])
    return None


_ON_GRID: set[tuple] = set()  # (file identity, tick) whose sample this process found on the grid


def _check_record(meta_path: Path, meta: dict[str, Any], day: str, path: Path, events: int,
                  infos: list[zipfile.ZipInfo | None]) -> None:
    rec = meta.get("days", {}).get(day)
    if rec is None:
        raise DataError(
            f"{path}: day {day} is not described by {meta_path}, so it cannot be trusted (left by an interrupted "
            f"write, or copied in by hand?). Fix: convert the day again.")
    found: dict[str, Any] = {"events": events}
    if infos[0] is not None:
        found.update(crc32=infos[0].CRC, bytes=infos[0].file_size)
    if len(infos) > 1 and all(i is not None for i in infos):
        found.update(part_crc32=[i.CRC for i in infos], part_bytes=[i.file_size for i in infos])  # type: ignore[union-attr]
    differ = [f"{k} {rec[k]} in meta.json, {v} in the file" for k, v in found.items()
              if rec.get(k) is not None and rec[k] != v]
    if differ:
        raise DataError(
            f"{path}: not the day file {meta_path} describes ({'; '.join(differ)}): it was replaced after meta.json "
            f"was written. Fix: convert the day again.")
    for key in ("tick_size", "lot_size"):
        if rec.get(key) is not None and not math.isclose(float(rec[key]), float(meta.get(key, 0.0)), rel_tol=1e-9):
            option = "--" + key.replace("_", "-")
            raise DataError(
                f"{meta_path}: {key} is {meta.get(key)}, but day {day} was converted with {key} {rec[key]}. Fix: set "
                f"{key} back to {rec[key]} in meta.json, or convert the days again with the right {option}.")


def _check_grid(meta_path: Path, meta: dict[str, Any], day: str, path: Path, events: np.ndarray | None) -> None:
    """The tick-grid sample of :func:`off_grid` on the day's first file (loaded here if ``events`` is None)."""
    tick = meta.get("tick_size")
    if isinstance(tick, (int, float)) and tick > 0:
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, float(tick))
        if key in _ON_GRID:
            return
        bad = off_grid(load_events(path) if events is None else events, float(tick))
        if bad is None:
            _ON_GRID.add(key)
        else:
            raise DataError(
                f"{meta_path}: tick_size {tick} does not fit day {day}: price {bad[1]} (row {bad[0]} of {path.name}) "
                f"is not a multiple of it. Fix: set tick_size in meta.json to the venue's tick, or convert the day "
                f"again with the right --tick-size.")


def load_events(path: Path | str) -> np.ndarray:
    """Load an event npz (key ``data``), checking its dtype and zip CRC. An uncompressed day is
    memory-mapped copy-on-write: writing to the array never touches the file, and its CRC is checked
    once per process (until the file changes). A deflated day is inflated with ISA-L (BTC window:
    ~60 -> ~30 ms)."""
    return _load_events_info(path)[0]


def _load_events_info(path: Path | str) -> tuple[np.ndarray, zipfile.ZipInfo | None]:
    """:func:`load_events` and the zip entry of the rows (None for an npz of another writer)."""
    info = None
    try:
        got = _read_day(Path(path))
        if got is None:
            with np.load(path) as npz:
                data = npz["data"]
        else:
            data, info = got
    except Exception as exc:  # zipfile, pickle and key errors all mean the same to a user
        raise DataError(f"{path}: not a readable event file ({type(exc).__name__}: {exc})") from exc
    if data.dtype != event_dtype:
        raise DataError(f"{path}: array 'data' has dtype {data.dtype}, expected hftbacktest's event_dtype")
    return data, info


def _npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(fh)


def _read_day(path: Path) -> tuple[np.ndarray, zipfile.ZipInfo] | None:
    """The ``data`` array of a quotelab day file and its zip entry: mapped in place if stored, inflated
    if deflated; None for anything else (np.load reads it)."""
    with open(path, "rb") as fh:
        with zipfile.ZipFile(fh) as zf:
            info = zf.getinfo("data.npy")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            return None
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError("bad zip local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        if info.compress_type == zipfile.ZIP_DEFLATED:
            data = _inflated(fh.read(info.compress_size), info)
            return None if data is None else (data, info)
        start = fh.tell()
        shape, fortran, dtype = _npy_header(fh)
        if fortran or len(shape) != 1 or dtype != event_dtype:
            return None
        offset = fh.tell()
        fh.seek(start)
        header = fh.read(offset - start)
        stat = os.fstat(fh.fileno())
    if offset % _ALIGN:
        return None  # written by another tool; np.load's copy is aligned
    data = (np.empty(0, dtype=event_dtype) if shape[0] == 0 else
            np.memmap(path, dtype=event_dtype, mode="c", offset=offset, shape=shape).view(np.ndarray))
    _check_stored_crc(path, stat, header, data, info)
    return data, info


_VERIFIED: set[tuple[int, ...]] = set()  # stored days whose CRC this process has checked, by file identity


def _check_stored_crc(path: Path, stat: os.stat_result, header: bytes, data: np.ndarray, info: zipfile.ZipInfo
                      ) -> None:
    # A flipped bit in a mapped day would otherwise replay as a wrong price or size. The check reads
    # the day once per process (~0.05 s/GB once its pages are in memory; a replay touches them all
    # anyway), then is skipped until the file changes.
    from isal import isal_zlib

    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key in _VERIFIED:
        return
    crc = isal_zlib.crc32(memoryview(data.view(np.uint8)), isal_zlib.crc32(header))
    if len(header) + data.nbytes != info.file_size or crc != info.CRC:
        raise zipfile.BadZipFile(f"bad CRC or size for {info.filename}: the file is corrupt; convert the day again")
    _VERIFIED.add(key)


def _inflated(raw: bytes, info: zipfile.ZipInfo) -> np.ndarray | None:
    # ISA-L, 1 MB at a time straight into the array: inflating the whole day into one bytes object
    # and copying it out cost twice as much (page faults on two day-sized buffers).
    from isal import isal_zlib

    body = np.empty(info.file_size, dtype=np.uint8)
    inflate = isal_zlib.decompressobj(-15)  # a zip member is a raw deflate stream
    pos, crc, src = 0, 0, memoryview(raw)
    # input in slices too: the unconsumed tail is a copy, so feeding it all at once is quadratic
    for at in range(0, len(src), 1 << 18):
        rest = src[at:at + (1 << 18)]
        while rest:
            part = inflate.decompress(rest, min(1 << 20, len(body) - pos))
            if not part:
                break
            rest = inflate.unconsumed_tail
            body[pos:pos + len(part)] = np.frombuffer(part, dtype=np.uint8)
            crc = isal_zlib.crc32(part, crc)
            pos += len(part)
    if pos != len(body) or crc != info.CRC:
        raise zipfile.BadZipFile(f"bad CRC or size for {info.filename}")
    head = io.BytesIO(body[:65536].tobytes())
    shape, fortran, dtype = _npy_header(head)
    if fortran or len(shape) != 1 or dtype != event_dtype:
        return None
    start = head.tell()
    return body[start:start + shape[0] * event_dtype.itemsize].view(event_dtype)


def first_ts(events: np.ndarray) -> int:
    """Where hftbacktest starts an asset's clock: its first exchange-flagged or local-flagged event."""
    from hftbacktest.types import EXCH_EVENT, LOCAL_EVENT

    big = np.iinfo(np.int64).max
    found = [big, big]
    # Both firsts are near the start; look at a growing prefix rather than masking the whole day.
    size = 4096
    while True:
        head = events[:size]
        for k, (flag, col) in enumerate(((EXCH_EVENT, "exch_ts"), (LOCAL_EVENT, "local_ts"))):
            if found[k] == big:
                hits = np.flatnonzero((head["ev"] & flag) == flag)
                if len(hits):
                    found[k] = int(head[col][hits[0]])
        if (found[0] != big and found[1] != big) or size >= len(events):
            return min(found)
        size *= 16


def last_ts(events: np.ndarray) -> int:
    """The latest local or exchange time of any row (one pass: numpy's two maxima over the strided
    columns took 0.25 s on a 38 M-row day)."""
    return int(_latest_nb(events["local_ts"], events["exch_ts"])) if len(events) else int(np.iinfo(np.int64).min)


@njit(cache=True)
def _latest_nb(local_ts: np.ndarray, exch_ts: np.ndarray) -> int:
    latest = max(local_ts[0], exch_ts[0])
    for i in range(1, len(local_ts)):
        latest = max(latest, local_ts[i], exch_ts[i])
    return latest
