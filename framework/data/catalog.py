"""The event catalog: ``<catalog>/<venue>/<symbol>/<YYYYMMDD>.npz`` plus ``meta.json``.

Conventions every converter follows and every reader may rely on:

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
  day's ``quality`` (never silently).
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from hftbacktest.types import event_dtype
from numba import njit

from quotelab.errors import DataError

_PAD_FIELD = 0xA11E  # an unregistered zip extra-field id: readers skip it

VENUES: tuple[str, ...] = ("binance-spot", "binance-usdm", "binance-cm", "bybit", "okx", "synthetic")
# ... and `tardis-<exchange>` for Tardis data of exchanges quotelab has no venue name for.


def symbol_dir(catalog: Path | str, venue: str, symbol: str) -> Path:
    return Path(catalog) / venue / symbol


def day_path(catalog: Path | str, venue: str, symbol: str, day: str) -> Path:
    return symbol_dir(catalog, venue, symbol) / f"{day}.npz"


def funding_path(catalog: Path | str, venue: str, symbol: str, day: str) -> Path:
    """A day's funding side table (:data:`quotelab.funding.funding_dtype` rows), beside its events."""
    return symbol_dir(catalog, venue, symbol) / f"{day}.funding.npy"


def write_funding(catalog: Path | str, venue: str, symbol: str, day: str, table: np.ndarray) -> Path:
    """Atomically write one day's funding rows; returns the path."""
    path = funding_path(catalog, venue, symbol, day)
    atomic_write_bytes(path, lambda fh: np.save(fh, np.ascontiguousarray(table), allow_pickle=False))
    return path


def load_funding(catalog: Path | str, venue: str, symbol: str, days: list[str]) -> np.ndarray | None:
    """The funding rows of ``days`` in exchange-time order, or None if no day has a side table."""
    from quotelab.funding import funding_dtype

    parts = []
    for day in days:
        path = funding_path(catalog, venue, symbol, day)
        if not path.exists():
            continue
        try:
            table = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{path}: not a readable funding table ({type(exc).__name__}: {exc}); "
                            f"convert the day again") from exc
        if table.dtype != funding_dtype:
            raise DataError(f"{path}: dtype {table.dtype}, expected quotelab's funding_dtype; convert the day again")
        parts.append(table)
    if not parts:
        return None
    table = np.concatenate(parts)
    return table[np.argsort(table["exch_ts"], kind="stable")]


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


def write_event_npz(path: Path, rows: int, write_body: Callable[[IO[bytes]], None], compression: str = "deflate"
                    ) -> None:
    """An npz holding ``data``, an event array of ``rows`` rows whose raw bytes ``write_body`` writes.

    Atomic and byte-for-byte reproducible (the zip entry carries a fixed date, where ``np.savez``
    stamps the wall clock). ``deflate`` compresses at level 1: level 6 is several times slower for
    files ~5% smaller, since event floats are noisy. ``none`` stores the rows at a 64-byte aligned
    offset, so :func:`load_events` maps them without a copy. ``np.load`` and hftbacktest read both.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    header = {"descr": np.lib.format.dtype_to_descr(event_dtype), "fortran_order": False, "shape": (rows,)}

    def write(fh: IO[bytes]) -> None:
        with zipfile.ZipFile(fh, "w", allowZip64=True) as zf:
            info = zipfile.ZipInfo("data.npy", date_time=(1980, 1, 1, 0, 0, 0))
            if compression == "deflate":
                info.compress_type = zipfile.ZIP_DEFLATED
                info._compresslevel = 1  # public as compress_level only from Python 3.13
            else:
                info.compress_type = zipfile.ZIP_STORED
                # local header: 30 bytes + name + zip64 field (20) + this padding field (4 + n)
                used = 30 + len(info.filename) + 20 + 4
                info.extra = struct.pack("<HH", _PAD_FIELD, -used % _ALIGN) + bytes(-used % _ALIGN)
            with zf.open(info, "w", force_zip64=True) as fid:
                np.lib.format.write_array_header_1_0(fid, header)
                write_body(fid)

    atomic_write_bytes(path, write)


def write_day(catalog: Path | str, venue: str, symbol: str, day: str, events: np.ndarray,
              compression: str = "deflate") -> Path:
    """Atomically write one day's events (see :func:`write_event_npz` for ``compression``); returns the path."""
    if events.dtype != event_dtype:
        raise TypeError(f"events must have hftbacktest's event_dtype, got {events.dtype}")
    path = day_path(catalog, venue, symbol, day)
    raw = np.ascontiguousarray(events).view(np.uint8).reshape(-1)
    block = 16 << 20

    def body(fid: IO[bytes]) -> None:
        for i in range(0, len(raw), block):
            fid.write(raw[i:i + block].data)

    write_event_npz(path, len(events), body, compression)
    return path


def read_meta(catalog: Path | str, venue: str, symbol: str) -> dict[str, Any]:
    path = symbol_dir(catalog, venue, symbol) / "meta.json"
    if not path.exists():
        known = list_symbols(catalog)
        raise DataError(
            f"no meta.json for {venue}/{symbol} in catalog {catalog}; "
            f"the catalog holds: {', '.join(known) or 'nothing'}. Convert data with `quotelab convert` "
            f"or generate it with `quotelab synth`."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt meta.json at line {exc.lineno}: {exc.msg}") from exc


def update_meta(
    catalog: Path | str,
    venue: str,
    symbol: str,
    instrument: dict[str, Any],
    days: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Merge ``instrument`` fields and per-day entries into meta.json (atomic) and return it.

    ``instrument`` holds at least ``tick_size``, ``lot_size`` and ``contract`` (``{"kind":
    "linear"|"inverse", "size": float}``). ``days`` maps ``YYYYMMDD`` to ``{"first_ts", "last_ts",
    "events", "counts", "quality"}``.
    """
    for key in ("tick_size", "lot_size"):
        if not instrument.get(key, 0) > 0:
            raise DataError(
                f"{venue}/{symbol}: {key} must be > 0 (hftbacktest hangs on 0), got {instrument.get(key)}"
            )
    path = symbol_dir(catalog, venue, symbol) / "meta.json"
    meta: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    meta.update({"venue": venue, "symbol": symbol, **instrument})
    meta.setdefault("days", {}).update(days)
    atomic_write_json(path, meta)
    return meta


def list_symbols(catalog: Path | str) -> list[str]:
    root = Path(catalog)
    if not root.is_dir():
        return []
    return sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in root.glob("*/*/meta.json"))


def list_days(catalog: Path | str, venue: str, symbol: str) -> list[str]:
    return sorted(read_meta(catalog, venue, symbol).get("days", {}))


def load_day(catalog: Path | str, venue: str, symbol: str, day: str) -> np.ndarray:
    """Load one catalog day; a missing or unreadable day names the day, the catalog and what exists."""
    path = day_path(catalog, venue, symbol, day)
    if not path.exists():
        have = list_days(catalog, venue, symbol) if (path.parent / "meta.json").exists() else []
        raise DataError(
            f"catalog day {venue}/{symbol}/{day} is missing from catalog {catalog} (looked for {path}); "
            f"days present: {', '.join(have) or 'none'}"
        )
    return load_events(path)


def load_events(path: Path | str) -> np.ndarray:
    """Load an event npz (key ``data``), checking its dtype and zip CRC. An uncompressed day is
    memory-mapped copy-on-write: writing to the array never touches the file, and its CRC is checked
    once per process (until the file changes). A deflated day is inflated with ISA-L (BTC window:
    ~60 -> ~30 ms)."""
    try:
        data = _read_day(Path(path))
        if data is None:
            with np.load(path) as npz:
                data = npz["data"]
    except Exception as exc:  # zipfile, pickle and key errors all mean the same to a user
        raise DataError(f"{path}: not a readable event file ({type(exc).__name__}: {exc})") from exc
    if data.dtype != event_dtype:
        raise DataError(f"{path}: array 'data' has dtype {data.dtype}, expected hftbacktest's event_dtype")
    return data


def _npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(fh)


def _read_day(path: Path) -> np.ndarray | None:
    """The ``data`` array of a quotelab day file: mapped in place if stored, inflated if deflated;
    None for anything else (np.load reads it)."""
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
            return _inflated(fh.read(info.compress_size), info)
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
    return data


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
