"""Tardis.dev CSV datasets → the event catalog.

Reads ``incremental_book_L2`` (``exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,
amount``) and ``trades`` (``exchange,symbol,timestamp,local_timestamp,id,side,price,amount``), plain
or gzipped, for one symbol; the kind of each file is told by its header. Timestamps are µs since
the epoch (``timestamp`` is the exchange's, ``local_timestamp`` Tardis's receive time). A run of
rows with ``is_snapshot=true`` is a full book that replaces the current one; other rows set a
level's absolute amount, 0 removing it, and rows with the same timestamps form one message. Files
are merged by local time, each keeping its own order, so a book file and a trades file of the same
day can be passed together.

Each file is parsed whole by polars and converted a day at a time (a snapshot is applied on its
own), so a day of tens of millions of rows converts in seconds. When polars refuses a file, the
file is read again line by line with Python's csv module to find the line and say what is wrong
with it; that slow read only ever runs to produce the error.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from numba import njit

from quotelab.data.events import DAY_NS, ConvertJob, Findings
from quotelab.data.messages import MessageFeed, finish_summary, read_inflated
from quotelab.errors import DataError

BOOK_COLUMNS = ["exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side", "price", "amount"]
TRADE_COLUMNS = ["exchange", "symbol", "timestamp", "local_timestamp", "id", "side", "price", "amount"]
_TYPES = {"exchange": pl.Categorical, "symbol": pl.Categorical, "timestamp": pl.Int64,
          "local_timestamp": pl.Int64, "is_snapshot": pl.Categorical, "id": pl.String, "side": pl.Categorical,
          "price": pl.Float64, "amount": pl.Float64}
_REQUIRED = ["timestamp", "local_timestamp", "price", "amount"]  # a null here is a line the slow read names

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

DEPTH, SNAPSHOT, TRADE = 0, 1, 2


def venue_for(exchange: str) -> str:
    return EXCHANGE_VENUES.get(exchange, f"tardis-{exchange}")


def _flag(value: str) -> bool | None:
    return {"true": True, "false": False}.get(value.strip().lower())


@dataclass
class _File:
    """One file's rows of the symbol, in file order, and its messages as row ranges."""

    name: str
    line: np.ndarray  # int64, 1-based line of each row
    exch: np.ndarray  # ns
    local: np.ndarray  # ns
    side: np.ndarray  # int8: +1 bid / taker bought, -1 ask / taker sold
    px: np.ndarray
    qty: np.ndarray
    ival: np.ndarray
    m_start: np.ndarray
    m_kind: np.ndarray  # int8: DEPTH, SNAPSHOT or TRADE
    back: np.ndarray  # rows whose local time is below an earlier row's


def _line_text(raw: bytes, line: int) -> str:
    """Line ``line`` (1-based) of ``raw``, for an error message."""
    start = 0
    for _ in range(line - 1):
        start = raw.index(b"\n", start) + 1
    end = raw.find(b"\n", start)
    return raw[start:end if end >= 0 else len(raw)].decode("utf-8", errors="replace").rstrip("\r")


@njit(cache=True)
def _merge_nb(local: np.ndarray, file_end: np.ndarray) -> np.ndarray:
    """Message order across files: repeatedly the head with the smallest local time, ties to the
    earlier file. This is heapq.merge's rule, so a file whose local time steps back keeps its order."""
    k = file_end.shape[0]
    pos = np.empty(k, np.int64)
    pos[0] = 0
    pos[1:] = file_end[:-1]
    out = np.empty(file_end[-1], np.int64)
    for o in range(out.shape[0]):
        best = -1
        for f in range(k):
            if pos[f] < file_end[f] and (best < 0 or local[pos[f]] < local[pos[best]]):
                best = f
        out[o] = pos[best]
        pos[best] += 1
    return out


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

    def _bad(self, file: str, line: int, why: str, row: list[str] | str) -> DataError:
        text = ",".join(row) if isinstance(row, list) else row
        return DataError(f"{file}:{line}: {why}: {text[:120]!r}. Fix: repair or delete that line and "
                         f"convert again.")

    def _diagnose(self, raw: bytes, file: str, book: bool, why: str) -> DataError:
        """The error for the first line that polars refused, found with the csv module."""
        reader = csv.reader(io.StringIO(raw.decode("utf-8", errors="replace"), newline=""))
        next(reader, None)
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 8:
                return self._bad(file, line, f"{len(row)} columns, expected 8", row)
            try:
                int(row[2]), int(row[3]), float(row[6]), float(row[7])
            except ValueError as exc:
                return self._bad(file, line, f"not a number ({exc})", row)
            if book and (_flag(row[4]) is None or row[5] not in ("bid", "ask")):
                return self._bad(file, line, "is_snapshot must be true/false and side bid/ask", row)
        return DataError(f"{file}: not readable as Tardis CSV ({why.splitlines()[0]}). Fix: check that the file is "
                         f"a whole Tardis CSV export.")

    def _codes(self, df: pl.DataFrame, column: str, mapping: dict[str, int]) -> np.ndarray:
        """A categorical column's values as small ints via ``mapping`` of its (few) distinct values; -99 if unmapped."""
        col = df[column]
        out = np.full(col.shape[0], -99, np.int8)
        for value in col.drop_nulls().unique().to_list():
            if value in mapping:  # one comparison per distinct value beats a per-row dictionary lookup
                out[(col == value).fill_null(False).to_numpy()] = mapping[value]
        return out

    def _read(self, path: Path) -> _File:
        file = str(path)
        info: dict[str, Any] = {"file": file, "lines": 0, "kind": "?"}
        self.files.append(info)
        if not path.is_file():
            raise DataError(f"{file}: no such file")
        with open(path, "rb") as fh:
            plain = fh.read(2) != b"\x1f\x8b"
            fh.seek(0)
            first = fh.readline()
        # polars maps a plain file itself; a gzipped one is inflated here, once.
        raw = None if plain else read_inflated(path)
        if raw is not None:
            first = raw[:raw.find(b"\n") + 1 or len(raw)]

        def text() -> bytes:
            """The whole file, for the messages of the error paths."""
            return raw if raw is not None else path.read_bytes()

        head = first.decode("utf-8", errors="replace").rstrip("\r\n")
        if not head.strip() and not re.search(rb"\S", text()):
            raise DataError(f"{file}: the file is empty")
        header = [h.strip() for h in head.split(",")]
        if header == BOOK_COLUMNS:
            info["kind"] = "incremental_book_L2"
        elif header == TRADE_COLUMNS:
            info["kind"] = "trades"
        else:
            raise DataError(f"{file}:1: header {head.strip()!r} is neither Tardis incremental_book_L2 "
                            f"({','.join(BOOK_COLUMNS)}) nor trades ({','.join(TRADE_COLUMNS)}). Fix: pass "
                            f"Tardis CSV files with their header line.")
        book = info["kind"] == "incremental_book_L2"
        columns = BOOK_COLUMNS if book else TRADE_COLUMNS
        try:
            df = pl.read_csv(path if raw is None else raw, schema={c: _TYPES[c] for c in columns}, has_header=True,
                             encoding="utf8-lossy")
        except pl.exceptions.PolarsError as exc:
            raise self._diagnose(text(), file, book, str(exc)) from None
        info["lines"] = df.height
        self.stats["lines"] += df.height
        line = np.arange(2, df.height + 2, dtype=np.int64)  # polars keeps a blank line as a row of nulls
        blank = df.select(pl.all_horizontal(pl.all().is_null())).to_series().to_numpy()
        if blank.any():
            self._check_blank(text(), file, book, line[blank])
            self.findings.add("blank_lines", "blank lines skipped", file, int(line[blank][0]), int(blank.sum()))
        required = _REQUIRED + (["is_snapshot", "side"] if book else [])
        if df.select(pl.any_horizontal(pl.col(required).is_null())).to_series().to_numpy()[~blank].any():
            raise self._diagnose(text(), file, book, "a field is missing")
        exch_values = [v for v in df["exchange"].drop_nulls().unique(maintain_order=True).to_list()]
        exchange_code = self._codes(df, "exchange", {v: i for i, v in enumerate(exch_values)})
        if self.exchange is None and exch_values:
            self.exchange = exch_values[0]
        wrong = np.flatnonzero(~blank & (exchange_code != (exch_values.index(self.exchange)
                                                            if self.exchange in exch_values else -1)))
        if wrong.shape[0]:
            k = int(wrong[0])
            raise DataError(f"{file}:{int(line[k])}: exchange {df['exchange'][k] or ''!r}, but the input so far is "
                            f"from {self.exchange!r}. Fix: convert one exchange's files at a time.")
        symbols = df["symbol"].drop_nulls().unique().to_list()
        ours = self._codes(df, "symbol", {s: 1 for s in symbols if s.upper() == self.symbol}) == 1
        theirs = ~blank & ~ours
        if theirs.any():
            self.stats["other_symbol_rows"] += int(theirs.sum())
            for sym, n in df.filter(pl.Series(theirs))["symbol"].fill_null("").value_counts().iter_rows():
                self.other[sym] = self.other.get(sym, 0) + n
        keep = np.flatnonzero(ours)
        line = line[keep]
        df = df.filter(pl.Series(ours))  # no nulls left in the required columns, so to_numpy keeps int64
        exch = df["timestamp"].to_numpy() * 1_000
        local = df["local_timestamp"].to_numpy() * 1_000
        px = df["price"].to_numpy()
        qty = df["amount"].to_numpy()
        back = np.flatnonzero(local[1:] < np.maximum.accumulate(local)[:-1]) + 1
        if book:
            snap_code = self._codes(df, "is_snapshot", {v: int(f) for v in df["is_snapshot"].drop_nulls().unique()
                                                        .to_list() if (f := _flag(v)) is not None})
            side = self._codes(df, "side", {"bid": 1, "ask": -1})
            bad = np.flatnonzero((snap_code < 0) | (side == -99))
            if bad.shape[0]:
                ln = int(line[bad[0]])
                raise self._bad(file, ln, "is_snapshot must be true/false and side bid/ask", _line_text(text(), ln))
            snap = snap_code == 1
            new = np.ones(line.shape[0], bool)
            # A snapshot run is one message whatever its timestamps; deltas group per timestamp pair.
            new[1:] = (snap[1:] != snap[:-1]) | (~snap[1:] & ((exch[1:] != exch[:-1]) | (local[1:] != local[:-1])))
            ival = np.zeros(line.shape[0], np.int64)
            m_start = np.flatnonzero(new)
            m_kind = snap[m_start].astype(np.int8)
        else:
            side = self._codes(df, "side", {"buy": 1, "sell": -1})
            unknown = np.flatnonzero(side == -99)
            if unknown.shape[0]:
                self.findings.add("trade_side_unknown", f"trades with side {df['side'][int(unknown[0])]!r} "
                                  f"(no initiator) dropped", file, int(line[unknown[0]]), int(unknown.shape[0]))
                known = side != -99
                line, exch, local, px, qty, side = line[known], exch[known], local[known], px[known], qty[known], \
                    side[known]
                df = df.filter(pl.Series(known))
            ids = df["id"].fill_null("")
            digits = ids.str.contains(r"^[0-9]+$").to_numpy()
            ival = np.where(digits, ids.str.to_integer(strict=False).fill_null(0).to_numpy(), 0).astype(np.int64)
            m_start = np.arange(line.shape[0], dtype=np.int64)
            m_kind = np.full(line.shape[0], TRADE, np.int8)
        return _File(file, line, exch, local, side.astype(np.int8), px, qty, ival, m_start, m_kind, back)

    def _check_blank(self, raw: bytes, file: str, book: bool, lines: np.ndarray) -> None:
        """polars reads a line of empty fields as it reads a blank line; only a blank one may be skipped."""
        starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(raw, np.uint8) == 10) + 1, [len(raw)]])
        for ln in lines.tolist():
            if raw[starts[ln - 1]:starts[ln]].strip():
                raise self._diagnose(raw, file, book, f"line {ln} has only empty fields")

    # -- converting ------------------------------------------------------------------------------

    def run(self, paths: Sequence[Path]) -> None:
        files = [self._read(Path(p)) for p in paths]
        # Every file's messages, file after file, as row ranges into the files' rows end to end.
        row0 = np.cumsum([0] + [f.line.shape[0] for f in files])
        m_start = np.concatenate([f.m_start + row0[i] for i, f in enumerate(files)])
        m_end = np.concatenate([np.append(f.m_start[1:], f.line.shape[0]) + row0[i] for i, f in enumerate(files)])
        if not m_start.shape[0]:
            return
        m_kind = np.concatenate([f.m_kind for f in files])
        m_file = np.repeat(np.arange(len(files)), [f.m_start.shape[0] for f in files])
        m_local = np.maximum.reduceat(np.concatenate([f.local for f in files]), m_start)
        order = _merge_nb(m_local, np.cumsum([f.m_start.shape[0] for f in files]))
        lens = (m_end - m_start)[order]
        new_start = np.cumsum(lens) - lens
        rows = np.arange(lens.sum()) - np.repeat(new_start - m_start[order], lens)
        self._local_backwards(files, row0, rows)
        merged = len(files) > 1 and not np.array_equal(order, np.arange(order.shape[0]))
        columns = []
        for a in ("line", "exch", "local", "side", "px", "qty", "ival"):
            # One column at a time, each file's copy let go as soon as it is merged: a day is big.
            col = np.concatenate([getattr(f, a) for f in files])
            for f in files:
                setattr(f, a, None)
            columns.append(col[rows] if merged else col)
        line, exch, local, side, px, qty, ival = columns
        del columns
        m_kind, m_file, m_local = m_kind[order], m_file[order], m_local[order]
        m_start, m_end = new_start, new_start + lens
        # A depth message's exchange time is its rows' (one timestamp); a snapshot's the latest of its rows.
        m_exch = np.where(m_kind == SNAPSHOT, np.maximum.reduceat(exch, m_start), exch[m_start])
        names = [f.name for f in files]

        def where(msg: int, row: int) -> tuple[str, int]:
            return names[int(m_file[msg])], int(line[row] if row >= 0 else line[m_start[msg]])

        day = m_exch // DAY_NS
        snap = m_kind == SNAPSHOT
        cut = np.flatnonzero(snap[1:] | snap[:-1] | (day[1:] != day[:-1])) + 1
        bounds = np.concatenate([[0], cut, [m_kind.shape[0]]]).tolist()
        for a, z in zip(bounds[:-1], bounds[1:], strict=True):
            r0, r1 = int(m_start[a]), int(m_end[z - 1])
            if snap[a]:
                self.stats["snapshots"] += 1
                file, ln = where(a, -1)
                self.feed.snapshot(side[r0:r1], px[r0:r1], qty[r0:r1], int(m_exch[a]), int(m_local[a]), 0, file, ln)
            else:
                trade = m_kind[a:z] == TRADE
                n_depth_rows = int((m_end[a:z] - m_start[a:z])[~trade].sum())
                self.stats["depth_msgs"] += int((~trade).sum())
                self.stats["book_rows"] += n_depth_rows
                self.stats["trades"] += r1 - r0 - n_depth_rows
                self.feed.block(trade, m_exch[a:z], m_local[a:z], m_end[a:z] - r0, side[r0:r1], px[r0:r1],
                                qty[r0:r1], exch[r0:r1], ival[r0:r1],
                                lambda m, r, a=a, r0=r0: where(a + m, r0 + r if r >= 0 else -1))
            self.feed.split.close_ready()

    def _local_backwards(self, files: list[_File], row0: np.ndarray, rows: np.ndarray) -> None:
        """One finding for all files, placed at the row that comes first once the files are merged."""
        count = sum(f.back.shape[0] for f in files)
        if not count:
            return
        merged_at = np.empty_like(rows)
        merged_at[rows] = np.arange(rows.shape[0])
        f, k = min(((i, int(f.back[0])) for i, f in enumerate(files) if f.back.shape[0]),
                   key=lambda ik: merged_at[row0[ik[0]] + ik[1]])
        local = files[f].local
        self.findings.add("local_ts_backwards",
                          f"local_timestamp goes backwards (first by {(local[:k].max() - local[k]) / 1e6:.3f} ms); "
                          f"events are re-sorted by local time for hftbacktest", files[f].name,
                          int(files[f].line[k]), count)

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
