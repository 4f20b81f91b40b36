"""The slow, obvious Tardis converter the fast one is checked against.

Python's csv module, one row at a time; rows grouped into messages as they come; files merged with
``heapq.merge``; every message handed to ``MessageFeed`` on its own (``snapshot``, ``depth``,
``trades``), the way the Bybit and OKX converters feed it. Reading and the summary are
``TardisConverter``'s; only ``run`` differs.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quotelab.data.events import LOCAL_BACK, ConvertJob
from quotelab.data.messages import open_text
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


class ReferenceTardis(TardisConverter):
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
                if local < prev_local:  # the line arrived after the one before it: it takes that one's time
                    by = prev_local - local
                    self.findings.add("local_ts_backwards", LOCAL_BACK.format(ms=by / 1e6), file, line,
                                      last=(file, line), amount_ms=by / 1e6)
                    local = prev_local
                prev_local = local
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
