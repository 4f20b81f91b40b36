"""Tardis.dev CSV datasets → the event catalog.

Reads ``incremental_book_L2`` (``exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,
amount``) and ``trades`` (``exchange,symbol,timestamp,local_timestamp,id,side,price,amount``), plain
or gzipped, for one symbol; the kind of each file is told by its header. Timestamps are µs since
the epoch (``timestamp`` is the exchange's, ``local_timestamp`` Tardis's receive time). A run of
rows with ``is_snapshot=true`` is a full book that replaces the current one; other rows set a
level's absolute amount, 0 removing it. Files are merged by local time, so a book file and a trades
file of the same day can be passed together.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quotelab.data.events import ConvertJob, Findings
from quotelab.data.messages import MessageFeed, finish_summary, open_text
from quotelab.errors import DataError

BOOK_COLUMNS = ["exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side", "price", "amount"]
TRADE_COLUMNS = ["exchange", "symbol", "timestamp", "local_timestamp", "id", "side", "price", "amount"]

# Tardis exchange ids → quotelab venues, where the markets are the same; others get `tardis-<id>`.
EXCHANGE_VENUES: dict[str, str] = {
    "binance": "binance-spot",
    "binance-futures": "binance-usdm",
    "binance-delivery": "binance-cm",
    "bybit": "bybit",
    "okex": "okx",
    "okex-swap": "okx",
    "okex-futures": "okx",
    "okex-options": "okx",
    "okx": "okx",
    "okx-swap": "okx",
    "okx-futures": "okx",
    "okx-options": "okx",
}


def venue_for(exchange: str) -> str:
    return EXCHANGE_VENUES.get(exchange, f"tardis-{exchange}")


@dataclass
class _Msg:
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

    def __lt__(self, other: _Msg) -> bool:
        return (self.local, self.order, self.line) < (other.local, other.order, other.line)


def _flag(value: str) -> bool | None:
    return {"true": True, "false": False}.get(value.strip().lower())


class TardisConverter:
    def __init__(self, job: ConvertJob) -> None:
        self.job = job
        self.symbol = job.symbol.upper()
        self.findings = Findings()
        self.feed = MessageFeed(job, self.findings)
        self.stats: dict[str, int] = {"lines": 0, "book_rows": 0, "snapshots": 0, "depth_msgs": 0, "trades": 0,
                                      "other_symbol_rows": 0}
        self.other: dict[str, int] = {}
        self.files: list[dict[str, Any]] = []
        self.exchange: str | None = None

    # -- reading -------------------------------------------------------------------------------

    def _bad(self, file: str, line: int, why: str, row: list[str]) -> DataError:
        return DataError(f"{file}:{line}: {why}: {','.join(row)[:120]!r}. Fix: repair or delete that line and "
                         f"convert again.")

    def _rows(self, path: Path, order: int) -> Iterator[_Msg]:
        """One file's messages: rows grouped by (timestamp, local_timestamp); a snapshot run is one message."""
        file = str(path)
        info = {"file": file, "lines": 0, "kind": "?"}
        self.files.append(info)
        with open_text(path) as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{file}: the file is empty")
            header = [h.strip() for h in header]
            if header == BOOK_COLUMNS:
                info["kind"] = "incremental_book_L2"
            elif header == TRADE_COLUMNS:
                info["kind"] = "trades"
            else:
                raise DataError(f"{file}:1: header {','.join(header)!r} is neither Tardis incremental_book_L2 "
                                f"({','.join(BOOK_COLUMNS)}) nor trades ({','.join(TRADE_COLUMNS)}). Fix: pass "
                                f"Tardis CSV files with their header line.")
            book = info["kind"] == "incremental_book_L2"
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
                if len(row) != 8:
                    raise self._bad(file, line, f"{len(row)} columns, expected 8", row)
                exchange, symbol = row[0], row[1]
                if self.exchange is None:
                    self.exchange = exchange
                elif exchange != self.exchange:
                    raise DataError(f"{file}:{line}: exchange {exchange!r}, but the input so far is from "
                                    f"{self.exchange!r}. Fix: convert one exchange's files at a time.")
                if symbol.upper() != self.symbol:
                    self.stats["other_symbol_rows"] += 1
                    self.other[symbol] = self.other.get(symbol, 0) + 1
                    continue
                try:
                    exch = int(row[2]) * 1_000
                    local = int(row[3]) * 1_000
                    px = float(row[6])
                    qty = float(row[7])
                except ValueError as exc:
                    raise self._bad(file, line, f"not a number ({exc})", row) from None
                if local < prev_local:
                    self.findings.add("local_ts_backwards",
                                      f"local_timestamp goes backwards (first by {(prev_local - local) / 1e6:.3f} ms);"
                                      f" events are re-sorted by local time for hftbacktest", file, line)
                prev_local = max(prev_local, local)
                if book:
                    snap = _flag(row[4])
                    side = {"bid": 1, "ask": -1}.get(row[5])
                    if snap is None or side is None:
                        raise self._bad(file, line, "is_snapshot must be true/false and side bid/ask", row)
                    # A snapshot run is one message whatever its timestamps; deltas group per timestamp pair.
                    key: tuple[Any, ...] = ("snapshot",) if snap else ("depth", exch, local)
                    ival = 0
                else:
                    side = {"buy": 1, "sell": -1}.get(row[5])
                    if side is None:
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
             order: int, line: int, file: str) -> _Msg:
        a = np.array(group, dtype=[("exch", "i8"), ("local", "i8"), ("side", "i1"), ("px", "f8"), ("qty", "f8"),
                                   ("ival", "i8")])
        kind = key[0] if key else "depth"
        # A snapshot counts as received when its last row was.
        return _Msg(int(a["local"].max()), order, line, file, kind, a["exch"], a["side"], a["px"], a["qty"],
                    a["ival"])

    # -- converting ------------------------------------------------------------------------------

    def run(self, files: Sequence[Path]) -> None:
        streams = [self._rows(Path(f), i) for i, f in enumerate(files)]
        for m in heapq.merge(*streams):
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

    def finish(self) -> dict[str, Any]:
        names = ", ".join(f["file"] for f in self.files)
        hint = (f"no incremental_book_L2 snapshot rows (is_snapshot=true) for {self.symbol} in {names}, so the book "
                f"cannot be built. Fix: pass the day's incremental_book_L2 file (Tardis starts each with a snapshot), "
                f"and check --symbol.")
        summary = finish_summary(self.feed, hint, self.stats, self.findings, self.other, "symbols")
        exchange = self.exchange or "?"
        return {"exchange": exchange, "venue": venue_for(exchange), "files": self.files, **summary}


def convert(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    conv = TardisConverter(job)
    conv.run(files)
    return conv.finish()
