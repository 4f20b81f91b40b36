"""Pieces shared by the converters that parse per message in Python (Bybit, OKX, Tardis).

The cryptofeed recording reader and :class:`MessageFeed`, a per-message sink over events.py's
``DenseBook`` + ``DaySplitter`` (the Binance converter works in blocks inside its own class).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import orjson
from hftbacktest.types import BUY_EVENT, DEPTH_CLEAR_EVENT, DEPTH_EVENT, SELL_EVENT, TRADE_EVENT, event_dtype
from numba import njit

from quotelab.data.events import (
    LOCAL_BACK,
    MAX_BOOK_TICKS,
    ConvertJob,
    DaySplitter,
    DenseBook,
    Findings,
    decimal_tick,
    tick_prices,
)
from quotelab.errors import DataError
from quotelab.timeunits import DAY_NS

try:
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - depends on the environment
    _gzip = gzip  # type: ignore[misc]


def note_others(findings: Findings, counts: dict[str, int], what: str) -> None:
    """Name what was in the input but not converted, so a wrong --symbol is obvious."""
    if counts:
        listed = ", ".join(f"{k} ({v:,})" for k, v in sorted(counts.items()))
        findings.add("other_" + what, f"messages of other {what} not converted: {listed}",
                     count=sum(counts.values()))


def finish_summary(feed: Any, no_snapshot_hint: str, stats: dict[str, int], findings: Findings,
                   others: dict[str, int], what: str) -> dict[str, Any]:
    """The tail every message converter shares: flush the feed (no snapshot is an error carrying
    ``no_snapshot_hint``), count what was dropped, name what was skipped; the summary's common keys."""
    try:
        feed.finish(no_snapshot_hint)
    except DataError as exc:
        if not others:
            raise
        # Most often the data is of another symbol than --symbol: say which ones it holds.
        held = ", ".join(f"{k} ({v:,})" for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:5])
        raise DataError(f"{exc} The files hold other {what}: {held}.") from None
    stats["dropped_depth_msgs"] = feed.dropped_depth
    stats["dropped_trades"] = feed.dropped_trades
    note_others(findings, others, what)
    return {"messages": stats, f"other_{what}": dict(sorted(others.items())), "findings": findings.as_list()}


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


def open_binary(path: Path) -> BinaryIO:
    """A plain or gzipped file, opened for reading bytes (ISA-L inflates when it is installed, ~3x zlib's
    speed). A damaged gzip stream raises OSError, EOFError or zlib.error from ``read``."""
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return _gzip.open(path, "rb") if gz else open(path, "rb")  # type: ignore[return-value]


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


_EVS = np.array([TRADE_EVENT | BUY_EVENT, TRADE_EVENT | SELL_EVENT, DEPTH_EVENT | BUY_EVENT, DEPTH_EVENT | SELL_EVENT],
                np.uint64)


@njit(cache=True, nogil=True)
def _off_grid_nb(px, qty, tick, lot):
    """(first bad row, what: 0 price not positive, 1 price off the tick, 2 quantity negative, 3 off the lot)."""
    for j in range(px.shape[0]):
        p = px[j]
        if not (p > 0.0 and np.isfinite(p)):
            return j, 0
        tf = p / tick
        if not abs(tf - np.rint(tf)) <= 1e-6:
            return j, 1
        q = qty[j]
        if not (q >= 0.0 and np.isfinite(q)):
            return j, 2
        lf = q / lot
        if not abs(lf - np.rint(lf)) <= 1e-6 * max(1.0, abs(lf)):
            return j, 3
    return -1, -1


@njit(cache=True, nogil=True)
def _block_rows_nb(rows, d_side, d_tick, d_qty, d_end, lat_exch, lat_local, is_trade, m_end, m_exch, m_local, side,
                   px, qty, exch, ival, tick_size, tick_m, tick_s, has_base, base, max_span, evs):
    """One pass over a block's rows: the event rows, the depth levels for the book, one latency sample per
    depth message and per trade, and the first depth row that would stretch the book past ``max_span``."""
    j = nd = ndm = n_lat = 0
    wide = -1
    lo = base if has_base else np.int64(1) << 62
    hi = -(np.int64(1) << 62)
    for k in range(m_end.shape[0]):
        trade = is_trade[k]
        if not trade:
            lat_exch[n_lat] = m_exch[k]
            lat_local[n_lat] = m_local[k]
            n_lat += 1
        while j < m_end[k]:
            r = rows[j]
            buy = side[j] > 0
            r.local_ts = m_local[k]
            r.qty = qty[j]
            r.order_id = 0
            r.ival = ival[j]
            r.fval = 0.0
            if trade:
                r.ev = evs[0] if buy else evs[1]
                r.exch_ts = exch[j]
                r.px = px[j]
                lat_exch[n_lat] = exch[j]
                lat_local[n_lat] = m_local[k]
                n_lat += 1
            else:
                t = np.int64(np.rint(px[j] / tick_size))
                r.ev = evs[2] if buy else evs[3]
                r.exch_ts = m_exch[k]
                r.px = (t * tick_m) / tick_s  # the decimal price (events.decimal_tick)
                d_side[nd] = side[j]
                d_tick[nd] = t
                d_qty[nd] = qty[j]
                nd += 1
                lo = min(lo, t)
                hi = max(hi, t)
                if wide < 0 and (lo < 0 or hi - lo > max_span):
                    wide = j
            j += 1
        if not trade:
            d_end[ndm] = nd
            ndm += 1
    return nd, n_lat, wide


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
        self.split = DaySplitter(self.book, None, job)
        self.findings = findings
        self.synced = False  # the book holds a snapshot and every delta since
        self.book_start_exch: int | None = None
        self.prev_local = -(1 << 62)
        self.prev_depth_exch = -(1 << 62)
        self.prev_id = -(1 << 62)
        self.dropped_depth = 0
        self.dropped_trades = 0

    # -- checks ----------------------------------------------------------------------------------

    def check_local(self, local: int, file: str, line: int) -> int:
        """The message's local time, set to the latest before it where the clock stepped back."""
        if local < self.prev_local:
            by = self.prev_local - local
            self.findings.add("local_ts_backwards", LOCAL_BACK.format(ms=by / 1e6), file, line,
                              last=(file, line), amount_ms=by / 1e6)
            return self.prev_local
        self.prev_local = local
        return local

    def off_grid(self, px: np.ndarray, qty: np.ndarray) -> tuple[int, str] | None:
        """The first row whose price is not a positive multiple of the tick or whose quantity is
        not a non-negative multiple of the lot, and what is wrong with it; None if all are."""
        row, what = _off_grid_nb(px, qty, self.tick, self.lot)
        if row < 0:
            return None
        texts = (
            "price {!r} is not a positive number. Fix: repair that line.",
            f"price {{!r}} is not a multiple of the tick size {self.tick} ({self.origin}). Fix: pass the right "
            f"--tick-size.",
            "quantity {!r} is not a non-negative number. Fix: repair that line.",
            f"quantity {{!r}} is not a multiple of the lot size {self.lot} ({self.origin}). Fix: pass the right "
            f"--lot-size.",
        )
        return row, texts[what].format(float((px if what < 2 else qty)[row]))

    def ticks(self, px: np.ndarray, qty: np.ndarray, file: str, line: int) -> np.ndarray:
        bad = self.off_grid(px, qty)
        if bad is not None:
            raise DataError(f"{file}:{line}: {bad[1]}")
        return np.rint(px / self.tick).astype(np.int64)

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
            rows["px"][bid_clear] = min(rows["px"][bid_clear], float(tick_prices(old_bt[-1], self.tick)))
        if old_at.shape[0]:
            rows["px"][ask_clear] = max(rows["px"][ask_clear], float(tick_prices(old_at[-1], self.tick)))
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
        rows["px"] = tick_prices(tick, self.tick)
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

    def block(self, is_trade: np.ndarray, m_exch: np.ndarray, m_local: np.ndarray, m_end: np.ndarray,
              side: np.ndarray, px: np.ndarray, qty: np.ndarray, exch: np.ndarray, ival: np.ndarray,
              where: Callable[[int, int], tuple[str, int]]) -> None:
        """Many messages at once, with the checks and rows of :meth:`depth` and :meth:`trades` per message.
        Those two stay for the venues that must look at the book after every message (OKX's checksum, Bybit's
        update ids): one message through here costs ~35 µs more than through them.

        The messages are in arrival order, none a snapshot, and every row's exchange time falls on one
        UTC day. Message ``k`` is a trade message if ``is_trade[k]``, else a depth message (absolute
        quantities per level, 0 removes; its rows' ``exch`` are its own ``m_exch``); its rows end at
        ``m_end[k]``. ``side`` is +1 for a bid or a trade whose taker bought. ``where(k, row)`` is the
        file and line of message ``k``, or of ``row`` when ``row >= 0``, for the messages this raises.
        """
        if not m_end.shape[0]:
            return
        lens = np.diff(m_end, prepend=0)
        keep = np.ones(m_end.shape[0], bool)
        depth_msgs = np.flatnonzero(~is_trade)
        if depth_msgs.shape[0] and not self.synced:
            self.dropped_depth += int(depth_msgs.shape[0])
            self.findings.add("delta_before_snapshot", "depth deltas before the first snapshot (or after a "
                              "reconnect / lost sync, before the next snapshot) dropped",
                              *where(int(depth_msgs[0]), -1), int(depth_msgs.shape[0]))
            keep[depth_msgs] = False
            depth_msgs = depth_msgs[:0]
        trade_msgs = np.flatnonzero(is_trade)
        if trade_msgs.shape[0] and self.book_start_exch is None:
            n = int(lens[trade_msgs].sum())
            self.dropped_trades += n
            self.findings.add("trades_before_book", "trades before the book was established (no snapshot yet) "
                              "dropped", *where(int(trade_msgs[0]), -1), n)
            keep[trade_msgs] = False
        if depth_msgs.shape[0]:
            de = m_exch[depth_msgs]
            prev = np.maximum.accumulate(np.concatenate([[self.prev_depth_exch], de]))
            back = np.flatnonzero(de < prev[:-1])
            if back.shape[0]:
                k = int(back[0])
                self.findings.add("exch_ts_backwards", f"depth exchange time goes backwards (first by "
                                  f"{(prev[k] - de[k]) / 1e6:.3f} ms)", *where(int(depth_msgs[k]), -1),
                                  int(back.shape[0]))
            self.prev_depth_exch = int(prev[-1])
        if not keep.any():
            return
        if not keep.all():
            msgs = np.flatnonzero(keep)
            kept_rows = np.flatnonzero(np.repeat(keep, lens))
            inner = where
            is_trade, m_exch, m_local, lens = is_trade[msgs], m_exch[msgs], m_local[msgs], lens[msgs]
            side, px, qty, exch, ival = (a[kept_rows] for a in (side, px, qty, exch, ival))
            m_end = np.cumsum(lens)
            depth_msgs = np.flatnonzero(~is_trade)

            def where(m: int, r: int) -> tuple[str, int]:
                return inner(int(msgs[m]), int(kept_rows[r]) if r >= 0 else -1)

        bad = self.off_grid(px, qty)
        if bad is not None:
            file, line = where(int(np.searchsorted(m_end, bad[0], side="right")), bad[0])
            raise DataError(f"{file}:{line}: {bad[1]}")
        first = int(depth_msgs[0]) if depth_msgs.shape[0] else 0
        exch0 = int(m_exch[0] if not is_trade[0] else exch[0])
        self._day(exch0, *where(first, -1), depth=bool(depth_msgs.shape[0]))
        n = px.shape[0]
        rows = np.empty(n, event_dtype)  # the kernel sets every field
        d_side, d_tick, d_qty = np.empty(n, np.int8), np.empty(n, np.int64), np.empty(n)
        d_end = np.empty(depth_msgs.shape[0], np.int64)
        lat_exch, lat_local = np.empty(n, np.int64), np.empty(n, np.int64)
        nd, n_lat, wide = _block_rows_nb(rows, d_side, d_tick, d_qty, d_end, lat_exch, lat_local, is_trade, m_end,
                                         m_exch, m_local, side, px, qty, exch, ival, self.tick,
                                         *decimal_tick(self.tick), self.book.pages > 0, self.book.base,
                                         MAX_BOOK_TICKS, _EVS)
        if depth_msgs.shape[0]:
            at = where(int(np.searchsorted(m_end, wide, side="right")), wide) if wide >= 0 else where(first, -1)
            self.book.apply(d_side[:nd], d_tick[:nd], d_qty[:nd], d_end, f"{at[0]}:{at[1]}")
            self.book.last_id = int(ival[m_end[depth_msgs[-1]] - 1])  # the last depth message's
        self.split.add_rows(exch0 // DAY_NS, rows, lat_exch[:n_lat], lat_local[:n_lat])

    def finish(self, no_snapshot_hint: str) -> None:
        if self.book_start_exch is None:
            raise DataError(f"missing snapshot: {no_snapshot_hint}")
        self.split.close_ready(final=True)
