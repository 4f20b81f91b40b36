"""The slow, obvious Tardis converter the fast one is checked against.

Python's csv module, one row at a time; rows grouped into messages as they come; files merged with
``heapq.merge``; every message turned into rows on its own with plain numpy (``ReferenceFeed``, not
``MessageFeed.block``, which the fast converter and the per-message venues share). Snapshots, the
day splitting and the summary are the converter's own.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hftbacktest.types import BUY_EVENT, DEPTH_EVENT, SELL_EVENT, TRADE_EVENT, event_dtype

from quotelab.data.events import DAY_NS, ConvertJob
from quotelab.data.messages import MessageFeed, open_text
from quotelab.data.tardis import BOOK_COLUMNS, TRADE_COLUMNS, TardisConverter, _flag
from quotelab.errors import DataError


@dataclass
class Msg:
    local: int
    order: int  # file index, so that ties keep the command line's order
    line: int
    file: str
    kind: str  # "snapshot", "depth" or "trades"
    exch: np.ndarray
    side: np.ndarray
    px: np.ndarray
    qty: np.ndarray
    ival: np.ndarray

    def __lt__(self, other: Msg) -> bool:
        return (self.local, self.order, self.line) < (other.local, other.order, other.line)


class ReferenceFeed(MessageFeed):
    def _check(self, px: np.ndarray, qty: np.ndarray, file: str, line: int) -> np.ndarray:
        tf = px / self.tick
        if not (np.all(px > 0) and np.all(np.abs(tf - np.rint(tf)) <= 1e-6)):
            raise DataError(f"{file}:{line}: price off the tick")
        lf = qty / self.lot
        if not (np.all(qty >= 0) and np.all(np.abs(lf - np.rint(lf)) <= 1e-6 * np.maximum(1.0, np.abs(lf)))):
            raise DataError(f"{file}:{line}: quantity off the lot")
        return np.rint(tf).astype(np.int64)

    def depth(self, side: np.ndarray, px: np.ndarray, qty: np.ndarray, exch: int, local: int, ival: int,
              file: str, line: int) -> None:
        if not self.synced:
            self.dropped_depth += 1
            self.findings.add("delta_before_snapshot", "depth deltas before the first snapshot (or after a "
                              "reconnect / lost sync, before the next snapshot) dropped", file, line)
            return
        if exch < self.prev_depth_exch:
            self.findings.add("exch_ts_backwards", f"depth exchange time goes backwards (first by "
                              f"{(self.prev_depth_exch - exch) / 1e6:.3f} ms)", file, line)
        self.prev_depth_exch = max(self.prev_depth_exch, exch)
        tick = self._check(px, qty, file, line)
        d = self._day(exch, file, line, depth=True)
        self.book.apply(side, tick, qty, np.array([tick.shape[0]], np.int64), f"{file}:{line}")
        rows = np.zeros(tick.shape[0], event_dtype)
        rows["ev"] = np.where(side > 0, DEPTH_EVENT | BUY_EVENT, DEPTH_EVENT | SELL_EVENT)
        rows["exch_ts"] = exch
        rows["local_ts"] = local
        rows["px"] = tick * self.tick
        rows["qty"] = qty
        rows["ival"] = ival
        self.book.last_id = ival
        self.split.add_rows(d, rows, np.array([exch]), np.array([local]))

    def trades(self, buy: np.ndarray, px: np.ndarray, qty: np.ndarray, exch: np.ndarray, local: int,
               ival: np.ndarray, file: str, line: int) -> None:
        if self.book_start_exch is None:
            self.dropped_trades += int(px.shape[0])
            self.findings.add("trades_before_book", "trades before the book was established (no snapshot "
                              "yet) dropped", file, line, int(px.shape[0]))
            return
        self._check(px, qty, file, line)
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


class ReferenceTardis(TardisConverter):
    def __init__(self, job: ConvertJob) -> None:
        super().__init__(job)
        self.feed = ReferenceFeed(job, self.findings)

    def _messages(self, path: Path, order: int) -> Iterator[Msg]:
        file = str(path)
        info = {"file": file, "lines": 0, "kind": "?"}
        self.files.append(info)
        with open_text(path) as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader)]
            assert header in (BOOK_COLUMNS, TRADE_COLUMNS)
            book = header == BOOK_COLUMNS
            info["kind"] = "incremental_book_L2" if book else "trades"
            group: list[tuple[int, int, int, float, float, int]] = []
            g_key: tuple[Any, ...] | None = None
            g_line = 0
            prev_local = -1
            for row in reader:
                line = reader.line_num
                info["lines"] += 1
                self.stats["lines"] += 1
                if not row or (len(row) == 1 and not row[0].strip()):
                    self.findings.add("blank_lines", "blank lines skipped", file, line)
                    continue
                exchange, symbol = row[0], row[1]
                if self.exchange is None:
                    self.exchange = exchange
                if exchange != self.exchange:
                    raise DataError(f"{file}:{line}: exchange {exchange!r}")
                if symbol.upper() != self.symbol:
                    self.stats["other_symbol_rows"] += 1
                    self.other[symbol] = self.other.get(symbol, 0) + 1
                    continue
                exch, local, px, qty = int(row[2]) * 1_000, int(row[3]) * 1_000, float(row[6]), float(row[7])
                if local < prev_local:
                    self.findings.add("local_ts_backwards",
                                      f"local_timestamp goes backwards (first by {(prev_local - local) / 1e6:.3f} ms);"
                                      f" events are re-sorted by local time for hftbacktest", file, line)
                prev_local = max(prev_local, local)
                if book:
                    snap = _flag(row[4])
                    side = {"bid": 1, "ask": -1}[row[5]]
                    key: tuple[Any, ...] = ("snapshot",) if snap else ("depth", exch, local)
                    ival = 0
                else:
                    side = {"buy": 1, "sell": -1}.get(row[5], 0)
                    if not side:
                        self.findings.add("trade_side_unknown", f"trades with side {row[5]!r} (no initiator) "
                                          f"dropped", file, line)
                        continue
                    key = ("trades", line)
                    ival = int(row[4]) if row[4].isdigit() else 0
                if key != g_key and group:
                    yield self._msg(group, g_key, order, g_line, file)
                    group = []
                if not group:
                    g_key, g_line = key, line
                group.append((exch, local, side, px, qty, ival))
            if group:
                yield self._msg(group, g_key, order, g_line, file)

    def _msg(self, group: list[tuple[int, int, int, float, float, int]], key: tuple[Any, ...] | None,
             order: int, line: int, file: str) -> Msg:
        a = np.array(group, dtype=[("exch", "i8"), ("local", "i8"), ("side", "i1"), ("px", "f8"), ("qty", "f8"),
                                   ("ival", "i8")])
        kind = key[0] if key else "depth"
        # A snapshot counts as received when its last row was.
        return Msg(int(a["local"].max()), order, line, file, kind, a["exch"], a["side"], a["px"], a["qty"],
                   a["ival"])

    def run(self, paths: Sequence[Path]) -> None:
        for m in heapq.merge(*(self._messages(Path(f), i) for i, f in enumerate(paths))):
            if m.kind == "snapshot":
                self.stats["snapshots"] += 1
                self.feed.snapshot(m.side, m.px, m.qty, int(m.exch.max()), m.local, 0, m.file, m.line)
            elif m.kind == "depth":
                self.stats["depth_msgs"] += 1
                self.stats["book_rows"] += int(m.px.shape[0])
                self.feed.depth(m.side, m.px, m.qty, int(m.exch[0]), m.local, 0, m.file, m.line)
            else:
                self.stats["trades"] += int(m.px.shape[0])
                self.feed.trades(m.side > 0, m.px, m.qty, m.exch, m.local, m.ival, m.file, m.line)
            self.feed.split.close_ready()


def convert(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    conv = ReferenceTardis(job)
    conv.run(files)
    return conv.finish()
