"""OKX v5 public websocket captures in cryptofeed's recording format → the event catalog.

Reads ``books`` (a 400-level ``snapshot``, then ``update`` messages of absolute sizes, size "0"
removing a level) and ``trades`` for one ``instId``. Every book message carries OKX's CRC32
``checksum`` of the top 25 levels; it is verified after each message, on the venue's own price and
size strings (OKX computes it on those strings, so a float round trip could disagree with it).
A mismatch means the book is wrong from that message on: it is a named finding, deltas are dropped
until the next snapshot, and a conversion that never gets one fails naming the line.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quotelab.data.events import ConvertJob, Findings
from quotelab.data.messages import MessageFeed, finish_summary, iter_cryptofeed
from quotelab.errors import DataError

VENUE = "okx"
CHECKSUM_LEVELS = 25

INSTRUMENTS: dict[str, dict[str, Any]] = {
    "BTC-USDT": {"tick_size": 0.1, "lot_size": 1e-8, "contract": {"kind": "linear", "size": 1.0}},
}


def default_instrument(symbol: str) -> dict[str, Any] | None:
    spec = INSTRUMENTS.get(symbol.upper())
    return None if spec is None else {**spec, "origin": "built-in OKX spec"}


def okx_checksum(bids: Sequence[tuple[str, str]], asks: Sequence[tuple[str, str]]) -> int:
    """OKX's book checksum: top 25 of each side (best first), interleaved bid, ask, as ``px:sz``
    joined by ``:``; a side that runs out is skipped; CRC32 read as a signed 32-bit integer."""
    parts: list[str] = []
    b, a = bids[:CHECKSUM_LEVELS], asks[:CHECKSUM_LEVELS]
    for i in range(max(len(b), len(a))):
        if i < len(b):
            parts += b[i]
        if i < len(a):
            parts += a[i]
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


class _StringBook:
    """The venue's strings per level, kept sorted by tick, for the checksum."""

    def __init__(self) -> None:
        self.keys: list[list[int]] = [[], []]  # bids as -tick, asks as tick: both ascending = best first
        self.vals: list[dict[int, tuple[str, str]]] = [{}, {}]

    def clear(self) -> None:
        self.keys = [[], []]
        self.vals = [{}, {}]

    def set(self, side: int, tick: int, px: str, sz: str, remove: bool) -> None:
        s = 0 if side > 0 else 1
        key = -tick if side > 0 else tick
        vals, keys = self.vals[s], self.keys[s]
        if remove:
            if vals.pop(key, None) is not None:
                del keys[bisect.bisect_left(keys, key)]
        else:
            if key not in vals:
                bisect.insort(keys, key)
            vals[key] = (px, sz)

    def top(self, s: int) -> list[tuple[str, str]]:
        return [self.vals[s][k] for k in self.keys[s][:CHECKSUM_LEVELS]]

    def checksum(self) -> int:
        return okx_checksum(self.top(0), self.top(1))


class OkxConverter:
    """Streams OKX v5 recordings of one instId, in time order, into a :class:`MessageFeed`."""

    def __init__(self, job: ConvertJob) -> None:
        self.job = job
        self.inst = job.symbol.upper()
        self.findings = Findings()
        self.feed = MessageFeed(job, self.findings)
        self.strings = _StringBook()
        self.stats: dict[str, int] = {"lines": 0, "connects": 0, "sent_lines": 0, "snapshots": 0, "depth_msgs": 0,
                                      "checksums_verified": 0, "checksum_mismatches": 0, "trade_msgs": 0,
                                      "trades": 0, "control_msgs": 0, "other_msgs": 0}
        self.other: dict[str, int] = {}
        self.files: list[dict[str, Any]] = []
        self.seq = -1
        self.prev_trade_id = -1
        self.lost_at: tuple[str, int, str] | None = None

    def feed_file(self, path: Path) -> None:
        path = Path(path)
        file = str(path)
        lines0 = self.stats["lines"]
        for line, local, msg in iter_cryptofeed(path, self.findings, self.stats):
            if msg is None:
                self.feed.lose_sync()
                continue
            local = self.feed.check_local(local, file, line)
            if not isinstance(msg, dict) or "data" not in msg or not isinstance(msg.get("arg"), dict):
                self.stats["control_msgs"] += 1
                if isinstance(msg, dict) and msg.get("event") == "error":
                    self.findings.add("venue_error", f"the venue refused a request: {msg.get('msg')!r}", file, line)
                continue
            channel, inst = msg["arg"].get("channel"), msg["arg"].get("instId")
            try:
                if inst == self.inst and channel == "books":
                    self._book(msg, local, file, line)
                elif inst == self.inst and channel == "trades":
                    self._trades(msg, local, file, line)
                else:
                    self.stats["other_msgs"] += 1
                    key = f"{channel}:{inst}"
                    self.other[key] = self.other.get(key, 0) + 1
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise DataError(f"{file}:{line}: {channel} {inst} message lacks or mangles a field "
                                f"({type(exc).__name__}: {exc}). Fix: repair or delete the line.") from None
        self.files.append({"file": file, "lines": self.stats["lines"] - lines0})

    def _levels(self, data: dict[str, Any]) -> tuple[list[int], list[str], list[str]]:
        side: list[int] = []
        px: list[str] = []
        sz: list[str] = []
        for s, key in ((1, "bids"), (-1, "asks")):
            for lv in data[key]:
                side.append(s)
                px.append(lv[0])
                sz.append(lv[1])
        return side, px, sz

    def _book(self, msg: dict[str, Any], local: int, file: str, line: int) -> None:
        action = msg.get("action")
        if action not in ("snapshot", "update"):
            raise DataError(f"{file}:{line}: books message with action {action!r} (expected 'snapshot' or "
                            f"'update'). Fix: repair or delete the line.")
        for data in msg["data"]:
            self._book_data(action, data, local, file, line)

    def _book_data(self, action: str, data: dict[str, Any], local: int, file: str, line: int) -> None:
        exch = int(data["ts"]) * 1_000_000
        seq = int(data.get("seqId", 0))
        side_l, px_s, sz_s = self._levels(data)
        side = np.array(side_l, np.int8)
        px = np.array(px_s, dtype=float)
        qty = np.array(sz_s, dtype=float)
        if action == "snapshot":
            self.stats["snapshots"] += 1
            if self.lost_at is not None:
                lf, ll, why = self.lost_at
                self.findings.add("resynced", f"book resynced from the snapshot at {file}:{line} after "
                                  f"{why} at {lf}:{ll}", lf, ll)
                self.lost_at = None
            self.feed.snapshot(side, px, qty, exch, local, seq, file, line)
            tick = np.rint(px / self.feed.tick).astype(np.int64)
            self.strings.clear()
        else:
            self.stats["depth_msgs"] += 1
            if not self.feed.synced:
                self.feed.depth(side[:0], px[:0], qty[:0], exch, local, seq, file, line)
                return
            prev = data.get("prevSeqId")
            if prev is not None and int(prev) != self.seq:
                self._lose(file, line, "gap", f"sequence gap: prevSeqId {prev} after seqId {self.seq}")
                return
            self.feed.depth(side, px, qty, exch, local, seq, file, line)
            tick = np.rint(px / self.feed.tick).astype(np.int64)
        self.seq = seq
        for s, t, p, z, q in zip(side_l, tick.tolist(), px_s, sz_s, qty.tolist(), strict=True):
            self.strings.set(s, t, p, z, q == 0.0)
        want = data.get("checksum")
        if want is None:
            self.findings.add("no_checksum", "book messages without a checksum: not verified", file, line)
            return
        got = self.strings.checksum()
        if got != int(want):
            self.stats["checksum_mismatches"] += 1
            self._lose(file, line, "checksum_mismatch",
                       f"checksum mismatch: the rebuilt top {CHECKSUM_LEVELS} levels give {got}, the message says "
                       f"{want}")
            return
        self.stats["checksums_verified"] += 1

    def _lose(self, file: str, line: int, kind: str, text: str) -> None:
        self.findings.add(kind, f"{text}; depth dropped until the next snapshot", file, line)
        self.lost_at = (file, line, text)
        self.feed.lose_sync()

    def _trades(self, msg: dict[str, Any], local: int, file: str, line: int) -> None:
        data = msg["data"]
        self.stats["trade_msgs"] += 1
        self.stats["trades"] += len(data)
        if not data:
            return
        sides = [e["side"] for e in data]
        if any(s not in ("buy", "sell") for s in sides):
            bad = next(s for s in sides if s not in ("buy", "sell"))
            raise DataError(f"{file}:{line}: trade side {bad!r} is neither 'buy' nor 'sell'. Fix: repair or delete "
                            f"the line.")
        ids = np.array([int(e["tradeId"]) for e in data], np.int64)
        prev = np.concatenate([[self.prev_trade_id], ids[:-1]])
        back = np.flatnonzero((prev >= 0) & (ids <= prev))
        if back.shape[0]:
            self.findings.add("trade_id_backwards", f"trade ids repeat or go backwards ({prev[back[0]]} → "
                              f"{ids[back[0]]})", file, line, int(back.shape[0]))
        self.prev_trade_id = max(self.prev_trade_id, int(ids.max()))
        # OKX's side is the taker's.
        buy = np.array([s == "buy" for s in sides])
        px = np.array([float(e["px"]) for e in data])
        qty = np.array([float(e["sz"]) for e in data])
        exch = np.array([int(e["ts"]) * 1_000_000 for e in data], np.int64)
        self.feed.trades(buy, px, qty, exch, local, ids, file, line)

    def finish(self) -> dict[str, Any]:
        files = ", ".join(f["file"] for f in self.files)
        hint = (f"no books snapshot for {self.inst} in {files}, so the book cannot be built. Fix: pass the files in "
                f"time order, starting with the one where the subscription was made (OKX sends the snapshot right "
                f"after subscribing), and check --symbol.")
        summary = finish_summary(self.feed, hint, self.stats, self.findings, self.other, "streams")
        if self.lost_at is not None:
            lf, ll, why = self.lost_at
            raise DataError(f"{lf}:{ll}: {why}; the book is wrong from there on and no later snapshot in the input "
                            f"resyncs it. Fix: convert only the lines before it (e.g. zcat FILE | head -n {ll - 1}), "
                            f"or add a capture that resubscribed after it.")
        return {"venue": VENUE, "files": self.files, **summary}


def convert(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    conv = OkxConverter(job)
    for f in files:
        conv.feed_file(Path(f))
    return conv.finish()
