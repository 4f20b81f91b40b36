"""Bybit legacy v2 (inverse) captures in cryptofeed's recording format → the event catalog.

Reads ``orderBookL2_25.<SYMBOL>`` (one ``snapshot`` per subscription, then ``delta`` messages with
``delete``/``update``/``insert`` lists; every level carries an ``id`` and its ``price``) and
``trade.<SYMBOL>`` for one symbol; messages of other symbols are counted, not converted.

This module also holds the pieces the OKX and Tardis converters share: the cryptofeed line reader
and :class:`MessageFeed`, a per-message sink over events.py's ``DenseBook`` + ``DaySplitter`` for
converters that parse in Python (events.py has no such per-message layer yet; the Binance converter
works in blocks inside its own class).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import orjson
from hftbacktest.types import BUY_EVENT, DEPTH_CLEAR_EVENT, DEPTH_EVENT, SELL_EVENT, TRADE_EVENT, event_dtype

from quotelab.data.events import DAY_NS, ConvertJob, DaySplitter, DenseBook, Findings
from quotelab.errors import DataError

VENUE = "bybit"

def note_others(findings: Findings, counts: dict[str, int], what: str) -> None:
    """Name what was in the input but not converted, so a wrong --symbol is obvious."""
    if counts:
        listed = ", ".join(f"{k} ({v:,})" for k, v in sorted(counts.items()))
        findings.add("other_" + what, f"messages of other {what} not converted: {listed}",
                     count=sum(counts.values()))


# ---------------------------------------------------------------------------------------------
# Reading cryptofeed recordings: `<unix seconds float>: <json>`, plus `<url> <-> ts` (connect) and
# `<url> <- ts: {...}` (a sent subscription) lines.


def open_text(path: Path) -> TextIO:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="") if gz else \
        open(path, encoding="utf-8", errors="replace", newline="")


def seconds_to_ns(text: str) -> int:
    """Exact decimal seconds → ns (a float would lose the µs digits of a 10-digit epoch)."""
    sec, _, frac = text.strip().partition(".")
    if not sec.isdigit() or (frac and not frac.isdigit()):
        raise ValueError(text)
    return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])


def _garbled(path: Path, line: int, text: str, why: str) -> DataError:
    snippet = text[:120]
    return DataError(
        f"{path}:{line}: garbled line: {why}: {snippet!r}{'…' if len(text) > 120 else ''}. "
        f"Fix: repair or delete that line (e.g. zcat FILE | sed '{line}d' | gzip > fixed.gz) and convert again.")


def iter_cryptofeed(path: Path, findings: Findings, stats: dict[str, int]) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(line, local_ns, message)`` per received message; ``message`` is ``None`` for a connect line.

    Sent subscriptions are skipped; blank lines are skipped, and named unless they trail the file.
    """
    path = Path(path)
    blank_at: int | None = None
    n_blank = 0
    with open_text(path) as fh:
        for line_no, raw in enumerate(fh, 1):
            text = raw.rstrip("\r\n")
            if not text.strip():
                blank_at = blank_at or line_no
                n_blank += 1
                continue
            if blank_at is not None:
                findings.add("blank_lines", "blank lines skipped", str(path), blank_at, n_blank)
                blank_at, n_blank = None, 0
            stats["lines"] += 1
            if text.startswith(("wss://", "ws://", "https://", "http://")):
                if " <-> " in text:
                    stats["connects"] += 1
                    try:
                        yield line_no, seconds_to_ns(text.rsplit(" ", 1)[1]), None
                    except ValueError:
                        raise _garbled(path, line_no, text, "connect line without a timestamp") from None
                else:
                    stats["sent_lines"] += 1
                continue
            ts, sep, body = text.partition(": ")
            try:
                local = seconds_to_ns(ts)
            except ValueError:
                local = -1
            if not sep or local < 0:
                raise _garbled(path, line_no, text, "does not start with '<unix seconds>: '")
            try:
                msg = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise _garbled(path, line_no, text, f"not valid JSON ({exc})") from None
            yield line_no, local, msg
    if stats["lines"] == 0:
        raise DataError(f"{path}: the file holds no messages")


# ---------------------------------------------------------------------------------------------
# A per-message sink: depth and trade messages in arrival order → DaySplitter rows.


class MessageFeed:
    """Turns parsed depth/trade messages into catalog rows, one message at a time.

    Owns the checks every venue shares: prices on the tick, quantities on the lot, local time not
    running backwards, depth exchange time not running backwards, deltas before any snapshot.
    """

    def __init__(self, job: ConvertJob, findings: Findings) -> None:
        self.job = job
        self.tick = float(job.instrument["tick_size"])
        self.lot = float(job.instrument["lot_size"])
        self.origin = job.instrument.get("origin", "spec")
        self.book = DenseBook(self.tick)
        self.split = DaySplitter(self.book, None, job.on_day)
        self.findings = findings
        self.synced = False  # the book holds a snapshot and every delta since
        self.book_start_exch: int | None = None
        self.prev_local = -(1 << 62)
        self.prev_depth_exch = -(1 << 62)
        self.prev_id = -(1 << 62)
        self.dropped_depth = 0
        self.dropped_trades = 0

    # -- checks ----------------------------------------------------------------------------------

    def check_local(self, local: int, file: str, line: int) -> None:
        if local < self.prev_local:
            self.findings.add("local_ts_backwards",
                              f"local timestamps go backwards (first by {(self.prev_local - local) / 1e6:.3f} ms); "
                              f"events are re-sorted by local time for hftbacktest", file, line)
        self.prev_local = max(self.prev_local, local)

    def ticks(self, px: np.ndarray, qty: np.ndarray, file: str, line: int) -> np.ndarray:
        tf = px / self.tick
        ticks = np.rint(tf)
        bad = np.flatnonzero(np.abs(tf - ticks) > 1e-6)
        if bad.shape[0]:
            raise DataError(f"{file}:{line}: price {float(px[bad[0]])!r} is not a multiple of the tick size "
                            f"{self.tick} ({self.origin}). Fix: pass the right --tick-size.")
        lf = qty / self.lot
        badq = np.flatnonzero(np.abs(lf - np.rint(lf)) > 1e-6 * np.maximum(1.0, np.abs(lf)))
        if badq.shape[0]:
            raise DataError(f"{file}:{line}: quantity {float(qty[badq[0]])!r} is not a multiple of the lot "
                            f"size {self.lot} ({self.origin}). Fix: pass the right --lot-size.")
        return ticks.astype(np.int64)

    def _day(self, exch: int, file: str, line: int, depth: bool) -> int:
        d = exch // DAY_NS
        try:
            if depth:
                self.split.depth_day(d)
            else:
                self.split._open(d)  # noqa: SLF001 - raises the same "day already closed" error add_rows would
        except DataError as exc:
            raise DataError(f"{file}:{line}: {exc}. Fix: pass the files in time order.") from None
        return d

    # -- depth -----------------------------------------------------------------------------------

    def snapshot(self, side: np.ndarray, px: np.ndarray, qty: np.ndarray, exch: int, local: int, ival: int,
                 file: str, line: int) -> None:
        """Replace the book. The first snapshot of a day is that day's start state; a later one is
        written as CLEAR + SNAPSHOT rows clearing at least as deep as the book it replaces."""
        tick = self.ticks(px, qty, file, line)
        d = exch // DAY_NS
        fresh = d not in self.split.days
        old_bt, _, old_at, _ = self.book.levels()
        keep = qty > 0
        self.book.load(side[keep], tick[keep], qty[keep], f"{file}:{line}")
        self.book.last_id = ival
        if self.book_start_exch is None:
            self.book_start_exch = exch
        self.synced = True
        self.prev_depth_exch = max(self.prev_depth_exch, exch)
        if fresh:
            self._day(exch, file, line, depth=True)
            return
        self._day(exch, file, line, depth=True)
        rows = self.book.snapshot_rows(exch, local)
        clear = (rows["ev"] & 0xFF) == DEPTH_CLEAR_EVENT
        bid_clear, ask_clear = np.flatnonzero(clear)
        # hftbacktest clears a side from its best level down to `px`: reach the old book's far end too.
        if old_bt.shape[0]:
            rows["px"][bid_clear] = min(rows["px"][bid_clear], old_bt[-1] * self.tick)
        if old_at.shape[0]:
            rows["px"][ask_clear] = max(rows["px"][ask_clear], old_at[-1] * self.tick)
        self.split.add_rows(d, rows, np.array([exch]), np.array([local]))

    def depth(self, side: np.ndarray, px: np.ndarray, qty: np.ndarray, exch: int, local: int, ival: int,
              file: str, line: int) -> None:
        """Apply one delta message (absolute quantities per level, 0 removes) and write its rows."""
        if not self.synced:
            self.dropped_depth += 1
            self.findings.add("delta_before_snapshot", "depth deltas before the first snapshot (or after a "
                              "reconnect / lost sync, before the next snapshot) dropped", file, line)
            return
        if exch < self.prev_depth_exch:
            self.findings.add("exch_ts_backwards", f"depth exchange time goes backwards (first by "
                              f"{(self.prev_depth_exch - exch) / 1e6:.3f} ms)", file, line)
        self.prev_depth_exch = max(self.prev_depth_exch, exch)
        if not px.shape[0]:
            return
        tick = self.ticks(px, qty, file, line)
        d = self._day(exch, file, line, depth=True)
        self.book.ensure(int(tick.min()), int(tick.max()), f"{file}:{line}")
        self.book.apply(side, tick, qty, np.array([tick.shape[0]], np.int64))
        rows = np.zeros(tick.shape[0], event_dtype)
        rows["ev"] = np.where(side > 0, DEPTH_EVENT | BUY_EVENT, DEPTH_EVENT | SELL_EVENT)
        rows["exch_ts"] = exch
        rows["local_ts"] = local
        rows["px"] = tick * self.tick
        rows["qty"] = qty
        rows["ival"] = ival
        self.book.last_id = ival
        self.split.add_rows(d, rows, np.array([exch]), np.array([local]))

    def lose_sync(self) -> None:
        """The book can no longer be trusted: drop deltas until the next snapshot."""
        self.synced = False

    # -- trades ----------------------------------------------------------------------------------

    def trades(self, buy: np.ndarray, px: np.ndarray, qty: np.ndarray, exch: np.ndarray, local: int,
               ival: np.ndarray, file: str, line: int) -> None:
        """Trades of one message; ``buy`` is True where the initiator (taker) bought."""
        if self.book_start_exch is None:
            self.dropped_trades += int(px.shape[0])
            self.findings.add("trades_before_book", "trades before the book was established (no snapshot "
                              "yet) dropped", file, line, int(px.shape[0]))
            return
        self.ticks(px, qty, file, line)
        rows = np.zeros(px.shape[0], event_dtype)
        rows["ev"] = np.where(buy, TRADE_EVENT | BUY_EVENT, TRADE_EVENT | SELL_EVENT)
        rows["exch_ts"] = exch
        rows["local_ts"] = local
        rows["px"] = px
        rows["qty"] = qty
        rows["ival"] = ival
        days = exch // DAY_NS
        for d in np.unique(days).tolist():
            sel = days == d
            self._day(int(d) * DAY_NS, file, line, depth=False)
            self.split.add_rows(int(d), rows[sel], exch[sel], np.full(int(sel.sum()), local, np.int64))

    def finish(self, no_snapshot_hint: str) -> None:
        if self.book_start_exch is None:
            raise DataError(f"missing snapshot: {no_snapshot_hint}")
        self.split.close_ready(final=True)


# ---------------------------------------------------------------------------------------------
# Bybit


_SIDE = {"Buy": 1, "Sell": -1}


class BybitConverter:
    """Streams Bybit v2 recordings of one symbol, in time order, into a :class:`MessageFeed`."""

    def __init__(self, job: ConvertJob) -> None:
        self.job = job
        self.symbol = job.symbol.upper()
        self.findings = Findings()
        self.feed = MessageFeed(job, self.findings)
        self.book_topic = f"orderBookL2_25.{self.symbol}"
        self.trade_topic = f"trade.{self.symbol}"
        self.stats: dict[str, int] = {"lines": 0, "connects": 0, "sent_lines": 0, "snapshots": 0, "depth_msgs": 0,
                                      "trade_msgs": 0, "trades": 0, "control_msgs": 0, "other_msgs": 0}
        self.other_symbols: dict[str, int] = {}
        self.files: list[dict[str, Any]] = []
        self.levels: dict[int, tuple[int, float]] = {}  # level id → (side, price): checks ids against prices
        self.prev_seq = -1

    def feed_file(self, path: Path) -> None:
        path = Path(path)
        file = str(path)
        lines0 = self.stats["lines"]
        for line, local, msg in iter_cryptofeed(path, self.findings, self.stats):
            if msg is None:
                # A new connection gets a new snapshot; deltas until then would not fit the old book.
                self.feed.lose_sync()
                continue
            self.feed.check_local(local, file, line)
            topic = msg.get("topic") if isinstance(msg, dict) else None
            if topic is None:
                self.stats["control_msgs"] += 1
                if isinstance(msg, dict) and msg.get("success") is False:
                    self.findings.add("venue_error", f"the venue refused a request: {msg.get('ret_msg')!r}",
                                      file, line)
                continue
            try:
                if topic == self.book_topic:
                    self._book(msg, local, file, line)
                elif topic == self.trade_topic:
                    self._trades(msg, local, file, line)
                else:
                    self.stats["other_msgs"] += 1
                    sym = topic.rsplit(".", 1)[-1]
                    self.other_symbols[sym] = self.other_symbols.get(sym, 0) + 1
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{file}:{line}: {topic} message lacks or mangles a field ({type(exc).__name__}: "
                                f"{exc}). Fix: repair or delete the line.") from None
        self.files.append({"file": file, "lines": self.stats["lines"] - lines0})

    def _book(self, msg: dict[str, Any], local: int, file: str, line: int) -> None:
        exch = int(msg["timestamp_e6"]) * 1_000
        seq = int(msg["cross_seq"])
        if msg["type"] == "snapshot":
            self.stats["snapshots"] += 1
            data = msg["data"]
            self.levels = {int(e["id"]): (_SIDE[e["side"]], float(e["price"])) for e in data}
            side = np.array([_SIDE[e["side"]] for e in data], np.int8)
            px = np.array([float(e["price"]) for e in data])
            qty = np.array([float(e["size"]) for e in data])
            self.prev_seq = seq
            self.feed.snapshot(side, px, qty, exch, local, seq, file, line)
            return
        if msg["type"] != "delta":
            raise DataError(f"{file}:{line}: unknown {self.book_topic} message type {msg['type']!r}. "
                            f"Fix: repair or delete the line.")
        self.stats["depth_msgs"] += 1
        if not self.feed.synced:
            self.feed.depth(np.zeros(0, np.int8), np.zeros(0), np.zeros(0), exch, local, seq, file, line)
            return
        if seq < self.prev_seq:
            self.findings.add("update_id_backwards", f"cross_seq goes backwards ({self.prev_seq} → {seq})",
                              file, line)
        self.prev_seq = seq
        data = msg["data"]
        side: list[int] = []
        px: list[float] = []
        qty: list[float] = []
        # Bybit's order within a message: deletes, then updates, then inserts.
        for kind in ("delete", "update", "insert"):
            for e in data.get(kind, ()):
                lid, s, p = int(e["id"]), _SIDE[e["side"]], float(e["price"])
                known = self.levels.get(lid)
                if kind == "insert":
                    if known is not None:
                        self.findings.add("insert_existing_level", f"insert of level id {lid} that is already in "
                                          f"the book", file, line)
                    self.levels[lid] = (s, p)
                elif known is None:
                    self.findings.add("unknown_level_id", f"{kind} of level id {lid} that is not in the book "
                                      f"(applied by price {p})", file, line)
                elif known != (s, p):
                    self.findings.add("level_id_moved", f"level id {lid} was {known}, {kind} says {(s, p)} "
                                      f"(applied by the message's price)", file, line)
                if kind == "delete":
                    self.levels.pop(lid, None)
                else:
                    self.levels[lid] = (s, p)
                side.append(s)
                px.append(p)
                qty.append(0.0 if kind == "delete" else float(e["size"]))
        self.feed.depth(np.array(side, np.int8), np.array(px), np.array(qty), exch, local, seq, file, line)

    def _trades(self, msg: dict[str, Any], local: int, file: str, line: int) -> None:
        data = msg["data"]
        self.stats["trade_msgs"] += 1
        self.stats["trades"] += len(data)
        if not data:
            return
        sides = [e["side"] for e in data]
        if any(s not in _SIDE for s in sides):
            raise DataError(f"{file}:{line}: trade side {next(s for s in sides if s not in _SIDE)!r} is neither "
                            f"'Buy' nor 'Sell'. Fix: repair or delete the line.")
        buy = np.array([s == "Buy" for s in sides])
        px = np.array([float(e["price"]) for e in data])
        qty = np.array([float(e["size"]) for e in data])
        exch = np.array([int(e["trade_time_ms"]) * 1_000_000 for e in data], np.int64)
        # Bybit v2 trade ids are UUIDs, not numbers: ival stays 0 as for venues without an id.
        ival = np.zeros(len(data), np.int64)
        self.feed.trades(buy, px, qty, exch, local, ival, file, line)

    def finish(self) -> dict[str, Any]:
        files = ", ".join(f["file"] for f in self.files)
        self.feed.finish(f"no {self.book_topic} snapshot in {files}, so the book cannot be built. Fix: pass the "
                         f"files in time order, starting with the one where the subscription was made (Bybit sends "
                         f"the snapshot right after subscribing), and check --symbol.")
        self.stats["dropped_depth_msgs"] = self.feed.dropped_depth
        self.stats["dropped_trades"] = self.feed.dropped_trades
        note_others(self.findings, self.other_symbols, "symbols")
        return {"venue": VENUE, "files": self.files, "messages": self.stats,
                "other_symbols": dict(sorted(self.other_symbols.items())), "findings": self.findings.as_list()}


def convert(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    conv = BybitConverter(job)
    for f in files:
        conv.feed_file(Path(f))
    return conv.finish()
