"""Bybit legacy v2 (inverse) captures in cryptofeed's recording format → the event catalog.

Reads ``orderBookL2_25.<SYMBOL>`` (one ``snapshot`` per subscription, then ``delta`` messages with
``delete``/``update``/``insert`` lists; every level carries an ``id`` and its ``price``) and
``trade.<SYMBOL>`` for one symbol; messages of other symbols are counted, not converted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quotelab.data.events import ConvertJob, Findings
from quotelab.data.messages import MessageFeed, finish_summary, iter_cryptofeed
from quotelab.errors import DataError

VENUE = "bybit"

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
            local = self.feed.check_local(local, file, line)
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
        hint = (f"no {self.book_topic} snapshot in {files}, so the book cannot be built. Fix: pass the files in time "
                f"order, starting with the one where the subscription was made (Bybit sends the snapshot right "
                f"after subscribing), and check --symbol.")
        summary = finish_summary(self.feed, hint, self.stats, self.findings, self.other_symbols, "symbols")
        return {"venue": VENUE, "files": self.files, **summary}


def convert(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    conv = BybitConverter(job)
    for f in files:
        conv.feed_file(Path(f))
    return conv.finish()
