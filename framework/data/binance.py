"""Binance spot / USD-M / COIN-M captures of the hftbacktest collector → catalog days.

Input: one message per line, ``<local receive ts> <combined-stream JSON>`` (gzip or plain); the
local timestamp's unit (ns, µs or ms) is detected per file by comparing it with the exchange time.
:mod:`quotelab.data.binance_json` reads and parses the lines into flat arrays (a numba kernel; lines it
does not understand are reported here with file and line, after orjson has had a look); the book is
then built by the dense-book kernel in ``events``.

Book bridging follows Binance's rules: the REST snapshot (a line without ``stream``) is logged a
few messages after the first diffs, so diffs are buffered until it comes; diffs that end before it
are dropped; the first applied diff covers it (futures ``U <= lastUpdateId <= u``, spot
``U <= lastUpdateId + 1 <= u``); after that futures need ``pu == previous u`` and spot
``U == previous u + 1``. A break is a gap: the book resyncs from the next snapshot in the input, or
the conversion stops with the file, line and ids.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from hftbacktest.types import BUY_EVENT, SELL_EVENT, TRADE_EVENT, event_dtype

from quotelab.data.binance_json import (
    B_M,
    B_MARKET,
    B_PS,
    F_P,
    F_P2,
    F_Q,
    F_Q2,
    I_E,
    I_LTS,
    I_LV0,
    I_LV1,
    I_PU,
    I_SYM,
    I_T,
    I_TID,
    I_U,
    I_UU,
    K_BLANK,
    K_BT,
    K_DEPTH,
    K_ERRMSG,
    K_OTHER,
    K_SNAP,
    K_TRADE,
    Damaged,
    Parsed,
    iter_blocks,
    key_hash,
)
from quotelab.data.events import (
    DAY_GRACE_NS,
    LOCAL_BACK,
    ConvertJob,
    DaySplitter,
    DenseBook,
    Findings,
    Witness,
    clamp_local,
    depth_rows,
)
from quotelab.errors import DataError
from quotelab.timeunits import DAY_NS

# ---------------------------------------------------------------------------------------------
# The converter


@dataclass
class _Diff:
    """A buffered depth message (copied out of its block) while the book waits for a snapshot."""

    first: int
    last: int
    prev: int
    exch: int
    local: int
    side: np.ndarray
    px: np.ndarray
    qty: np.ndarray
    file: str
    line: int


@dataclass
class _Snap:
    last_id: int
    exch: int
    local: int
    file: str
    line: int
    side: np.ndarray
    tick: np.ndarray
    qty: np.ndarray


@dataclass
class _Gap:
    file: str
    line: int
    text: str


_MAX_BUFFERED = 200_000
_UNITS = {1: "ns", 1_000: "us", 1_000_000: "ms"}
# Each venue's depth messages: whether they carry ``pu`` (futures) and ``ps`` (COIN-M).
_MARKETS = {"binance-spot": (False, False), "binance-usdm": (True, False), "binance-cm": (True, True)}
MARKET_NAMES = {"binance-spot": "Binance spot", "binance-usdm": "Binance USD-M futures",
                 "binance-cm": "Binance COIN-M futures"}


def market_of(data: dict[str, Any]) -> tuple[str | None, str]:
    """The venue a combined-stream payload's fields say it is from, and which fields said so."""
    if "ps" in data:
        return "binance-cm", "it names a pair, 'ps'"
    if "pu" in data:
        return "binance-usdm", "its depth update has 'pu' and no 'ps'"
    if "X" in data:
        return "binance-usdm", "its trade has 'X' and no 'ps'"
    if data.get("e") == "depthUpdate":
        return "binance-spot", "its depth update has no 'pu'"
    if "M" in data or ("e" not in data and "u" in data):
        return "binance-spot", "its fields are spot's"
    return None, ""


class BinanceConverter:
    """Streams Binance collector files of one symbol, in time order, into a :class:`DaySplitter`."""

    def __init__(self, venue: str, job: ConvertJob) -> None:
        if venue not in ("binance-spot", "binance-usdm", "binance-cm"):
            raise DataError(f"unknown Binance venue {venue!r}")
        self.venue = venue
        self.spot = venue == "binance-spot"
        self.job = job
        self.sym_hash = key_hash(job.symbol)
        self.tick = float(job.instrument["tick_size"])
        self.lot = float(job.instrument["lot_size"])
        self.spec_origin = job.instrument.get("origin", "spec")
        self.book = DenseBook(self.tick)
        self.witness = Witness(job.spill_dir)
        self.split = DaySplitter(self.book, self.witness, job)
        self.findings = Findings()
        self.synced = False
        self.ever_synced = False
        self.book_start_exch: int | None = None
        self.buffer: deque[_Diff] = deque(maxlen=_MAX_BUFFERED)
        self.snap_wait: _Snap | None = None  # a snapshot waiting for the diff that covers it
        self.gap: _Gap | None = None
        self.prev_local = -(1 << 62)
        self.prev_depth_exch = -(1 << 62)
        self.prev_trade_id = -1
        self.prev_where = ("", 0)
        self.stats: dict[str, int] = {"lines": 0, "depth_msgs": 0, "trade_msgs": 0, "bookticker_msgs": 0,
                                      "snapshots": 0, "other_msgs": 0, "dropped_depth_msgs": 0,
                                      "dropped_trades": 0}
        self.files: list[dict[str, Any]] = []
        self.funding: list[tuple] = []  # markPriceUpdate rows (quotelab.data.funding columns) not yet in a table
        self.funding_tables: list[np.ndarray] = []  # 40 bytes a row: ~3.5 MB a day at one a second
        job.funding_so_far = self._funding_table

    # -- reading -------------------------------------------------------------------------------

    def feed(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        self.file = str(path)
        self.line0 = 0
        self.factor = 0
        try:
            # closing(): an error in _block must stop the reader threads now, not at garbage collection
            # (at interpreter exit they could no longer run, and the cleanup would wait forever).
            # Each block's arrays are reused once the next is asked for: nothing here keeps a view of them
            # (what outlives a block is copied: buffered diffs, the snapshot, rows for the spills).
            with contextlib.closing(iter_blocks(path)) as blocks:
                for parsed in blocks:
                    self._block(parsed)
        except Damaged as exc:
            cause = exc.args[0]
            what = ("truncated gzip" if isinstance(cause, EOFError)
                    else f"corrupt gzip ({type(cause).__name__}: {cause})")
            line = self.line0 + 1
            raise DataError(
                f"{path}:{line}: {what}: the file ends or breaks inside line {line}; the {self.line0:,} lines "
                f"before it were read. Fix: re-download or re-capture the file, or keep the good part "
                f"(zcat {path.name} | head -n {self.line0} | gzip > fixed.gz; zcat warns about the damage)."
            ) from None
        if self.line0 == 0:
            raise DataError(f"{path}: the file is empty")
        self.files.append({"file": str(path), "lines": self.line0, "local_ts_unit": _UNITS.get(self.factor, "?")})

    def _garbled(self, p: Parsed, li: int) -> DataError:
        text = p.line(li)
        line = self.line0 + li + 1
        sp = text.find(b" ")
        try:
            orjson.loads(text[sp + 1:] if sp >= 0 else text)
            why = "JSON is valid but not a Binance collector message this converter knows"
        except orjson.JSONDecodeError as exc:
            why = f"not valid JSON ({exc})"
        if sp <= 0 or not text[:sp].isdigit():
            why = "does not start with '<local timestamp> '"
        snippet = text[:120].decode("utf-8", "replace")
        return DataError(
            f"{self.file}:{line}: garbled line: {why}: {snippet!r}{'…' if len(text) > 120 else ''}. "
            f"Fix: repair or delete that line (e.g. zcat FILE | sed '{line}d' | gzip > fixed.gz) and convert again."
        )

    def _detect_unit(self, ints: np.ndarray, kinds: np.ndarray) -> None:
        ex = np.where(ints[:, I_T] > 0, ints[:, I_T], ints[:, I_E])
        ok = np.flatnonzero((ex > 0) & (kinds != K_BLANK))
        if not ok.shape[0]:
            return
        k = ok[0]
        local, exch_ns = int(ints[k, I_LTS]), int(ex[k]) * 1_000_000
        for f in (1, 1_000, 1_000_000):
            if abs(local * f - exch_ns) < DAY_NS:
                self.factor = f
                return
        raise DataError(
            f"{self.file}:{self.line0 + k + 1}: local timestamp {local} is not within a day of the exchange "
            f"time {ex[k]} ms in ns, µs or ms; is this a collector file (`<local ts> <json>` per line)?"
        )

    def _block(self, p: Parsed) -> None:
        kinds, ints, flts, flags = p.kinds, p.ints, p.flts, p.flags
        lv_side, lv_px, lv_qty, bad = p.lv_side, p.lv_px, p.lv_qty, p.bad
        n = kinds.shape[0]
        if bad >= 0:
            raise self._garbled(p, bad)
        if self.factor == 0:
            self._detect_unit(ints, kinds)
            if self.factor == 0:
                # Only snapshot lines so far: judge by magnitude (19 digits ns, 16 µs, 13 ms).
                digits = len(str(int(ints[0, I_LTS]))) if n else 19
                self.factor = 1 if digits >= 18 else 1_000 if digits >= 15 else 1_000_000
        real = kinds != K_BLANK
        if not real.all():
            idx = np.flatnonzero(~real)
            self.findings.add("blank_lines", "blank lines skipped", self.file,
                              self.line0 + int(idx[0]) + 1, int(idx.shape[0]))
        self._check_market(p, kinds, ints, flags)
        local = self._check_local(ints[:, I_LTS] * self.factor, real)
        self.stats["lines"] += int(real.sum())

        ticks = self._ticks(lv_px, lv_qty, ints, kinds)
        # bookTicker → witness
        bt = np.flatnonzero(kinds == K_BT)
        self.stats["bookticker_msgs"] += bt.shape[0]
        if bt.shape[0]:
            self.witness.add_bbo(ints[bt, I_U], flts[bt, F_P], flts[bt, F_P2], flts[bt, F_Q], flts[bt, F_Q2])
        other = np.flatnonzero((kinds == K_OTHER) | (kinds == K_ERRMSG))
        if other.shape[0] and not self.spot:
            other = self._mark_prices(p, other, local)
        if other.shape[0]:
            self.stats["other_msgs"] += other.shape[0]
            k = int(other[0])
            what = "error message from the venue" if kinds[k] == K_ERRMSG else "message of another stream"
            self.findings.add("ignored_messages", f"ignored lines (first: {what})", self.file,
                              self.line0 + k + 1, int(other.shape[0]))

        exch = np.where(ints[:, I_T] > 0, ints[:, I_T], ints[:, I_E]) * 1_000_000
        self._depth(kinds, ints, exch, local, lv_side, lv_px, lv_qty, ticks)
        self._trades(kinds, ints, flts, flags, exch, local)
        self.split.close_ready()
        self.line0 += n

    def _mark_prices(self, p: Parsed, other: np.ndarray, local: np.ndarray) -> np.ndarray:
        """Keep ``markPriceUpdate`` lines (mark ``p``, index ``i``, rate ``r``, next settlement ``T``)
        as funding rows; return the other lines still unknown. One a second: parsed in Python."""
        rest = []
        for k in other.tolist():
            line = p.line(k)
            if b"markPriceUpdate" not in line:
                rest.append(k)
                continue
            d = orjson.loads(line[line.find(b" ") + 1:]).get("data", {})
            try:
                self.funding.append((int(d["E"]) * 1_000_000, int(local[k]), float(d["p"]),
                                     float(d.get("i", "nan")), float(d["r"]) if d.get("r") not in (None, "") else
                                     np.nan, int(d.get("T") or 0) * 1_000_000))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{self.file}:{self.line0 + k + 1}: markPriceUpdate without a usable {exc}: "
                                f"{line[:120].decode('utf-8', 'replace')!r}") from None
        self.stats["mark_price_msgs"] = self.stats.get("mark_price_msgs", 0) + len(other) - len(rest)
        if len(self.funding) >= 4096:
            self._table_funding()
        return np.array(rest, dtype=np.int64)

    def _check_market(self, p: Parsed, kinds: np.ndarray, ints: np.ndarray, flags: np.ndarray) -> None:
        """Every message is of the symbol asked for, and every depth message of the venue's market."""
        msgs = (kinds == K_DEPTH) | (kinds == K_TRADE) | (kinds == K_BT)
        sym = ints[:, I_SYM]
        want_futures, want_coin = _MARKETS[self.venue]
        market = ((ints[:, I_PU] != -1) == want_futures) & ((flags[:, B_PS] == 1) == want_coin)
        wrong = np.flatnonzero((msgs & (sym != 0) & (sym != self.sym_hash)) | ((kinds == K_DEPTH) & ~market))
        if not wrong.shape[0]:
            return
        k = int(wrong[0])
        text = p.line(k)
        data = orjson.loads(text[text.find(b" ") + 1:]).get("data", {})
        symbol = str(data.get("s", "?"))
        venue, why = market_of(data)
        saw = f"{MARKET_NAMES.get(venue, 'Binance')} {symbol}" + (f" ({why})" if why else "")
        fix = f"--format {venue or self.venue} --symbol {symbol}"
        raise DataError(
            f"{self.file}:{self.line0 + k + 1}: this line is {saw}, but the command converts "
            f"--format {self.venue} --symbol {self.job.symbol}. Fix: convert these files with {fix}, or pass the "
            f"captures of {self.job.symbol} on {MARKET_NAMES[self.venue]}.")

    def _check_local(self, local: np.ndarray, real: np.ndarray) -> np.ndarray:
        """``local`` with the lines whose clock stepped back set to the latest local time before them."""
        lt = local[real]
        if not lt.shape[0]:
            return local
        if self.line0 == 0 and lt[0] < self.prev_local - DAY_GRACE_NS:
            raise DataError(
                f"{self.file}:1: this file starts at local time {lt[0]}, {(self.prev_local - lt[0]) / 1e9:.0f} s "
                f"before the previous file ended; pass the files of one symbol in time order.")
        fixed, by = clamp_local(lt, self.prev_local)
        back = np.flatnonzero(by)
        if back.shape[0]:
            at = np.flatnonzero(real)[back]
            self.findings.add("local_ts_backwards", LOCAL_BACK.format(ms=by[back[0]] / 1e6), self.file,
                              self.line0 + int(at[0]) + 1, int(back.shape[0]),
                              last=(self.file, self.line0 + int(at[-1]) + 1), amount_ms=float(by.max()) / 1e6)
            local = local.copy()
            local[real] = fixed
        self.prev_local = int(fixed[-1])
        return local

    def _where_level(self, ints: np.ndarray, kinds: np.ndarray, j: int) -> int:
        has = np.flatnonzero((kinds == K_DEPTH) | (kinds == K_SNAP))
        k = has[np.searchsorted(ints[has, I_LV1], j, side="right")]
        return self.line0 + int(k) + 1

    def _ticks(self, px: np.ndarray, qty: np.ndarray, ints: np.ndarray, kinds: np.ndarray) -> np.ndarray:
        if not px.shape[0]:
            return np.zeros(0, np.int64)
        tf = px / self.tick
        ticks = np.rint(tf)
        bad = np.flatnonzero(np.abs(tf - ticks) > 1e-6)
        if bad.shape[0]:
            j = int(bad[0])
            raise DataError(
                f"{self.file}:{self._where_level(ints, kinds, j)}: price {float(px[j])} is not a multiple of the tick "
                f"size {self.tick} ({self.spec_origin}). Fix: pass the right --tick-size.")
        lf = qty / self.lot
        badq = np.flatnonzero(np.abs(lf - np.rint(lf)) > 1e-6)
        if badq.shape[0]:
            # Seen on Binance spot: book levels aggregate resting orders at a finer step than today's
            # lot (trades and bookTicker respect it). Not an error for a book, but worth knowing.
            j = int(badq[0])
            self.findings.add(
                "depth_qty_finer_than_lot",
                f"depth quantities not multiples of the lot size {self.lot} (first: {float(qty[j])}); kept as is",
                self.file, self._where_level(ints, kinds, j), int(badq.shape[0]))
        return ticks.astype(np.int64)

    # -- depth -----------------------------------------------------------------------------------

    def _depth(self, kinds, ints, exch, local, lv_side, lv_px, lv_qty, ticks) -> None:
        ev = np.flatnonzero((kinds == K_DEPTH) | (kinds == K_SNAP))
        self.stats["depth_msgs"] += int((kinds[ev] == K_DEPTH).sum())
        self.stats["snapshots"] += int((kinds[ev] == K_SNAP).sum())
        pos = 0
        n = ev.shape[0]
        is_snap = kinds[ev] == K_SNAP
        while pos < n:
            if not self.synced:
                k = int(ev[pos])
                if is_snap[pos]:
                    self._on_snapshot(k, ints, exch, local, lv_side, lv_px, lv_qty, ticks)
                else:
                    lv0, lv1 = ints[k, I_LV0], ints[k, I_LV1]
                    self._on_unsynced_diff(_Diff(
                        int(ints[k, I_UU]), int(ints[k, I_U]), int(ints[k, I_PU]), int(exch[k]), int(local[k]),
                        lv_side[lv0:lv1].copy(), lv_px[lv0:lv1].copy(), lv_qty[lv0:lv1].copy(),
                        self.file, self.line0 + k + 1))
                pos += 1
                continue
            if is_snap[pos]:
                k = int(ev[pos])
                self.findings.add("snapshot_ignored", "REST snapshot while the book was in sync: not needed",
                                  self.file, self.line0 + k + 1)
                pos += 1
                continue
            # The run of diffs up to the next snapshot line, applied with one kernel call.
            nxt = np.flatnonzero(is_snap[pos:])
            end = pos + int(nxt[0]) if nxt.shape[0] else n
            run = ev[pos:end]
            first, last, prev = ints[run, I_UU], ints[run, I_U], ints[run, I_PU]
            before = np.concatenate([[self.book.last_id], last[:-1]])
            ok = (first == before + 1) if self.spot else (prev == before)
            brk = np.flatnonzero(~ok)
            stop = int(brk[0]) if brk.shape[0] else run.shape[0]
            if stop:
                self._apply(run[:stop], ints, exch, local, lv_side, ticks, lv_px, lv_qty)
            if stop < run.shape[0]:
                k = int(run[stop])
                self._on_gap(k, int(before[stop]), int(first[stop]), int(last[stop]), int(prev[stop]))
            pos += stop if stop < run.shape[0] else run.shape[0]

    def _apply(self, run, ints, exch, local, lv_side, ticks, lv_px, lv_qty, local_floor: int = 0) -> None:
        """Apply consecutive depth lines ``run`` (indexes into the block's line arrays)."""
        lv0, lv1 = int(ints[run[0], I_LV0]), int(ints[run[-1], I_LV1])
        self._apply_levels(exch[run], local[run], ints[run, I_U], ints[run, I_LV1] - lv0,
                           lv_side[lv0:lv1], ticks[lv0:lv1], lv_px[lv0:lv1], lv_qty[lv0:lv1], local_floor)

    def _apply_levels(self, m_exch, m_local, m_id, m_end, side, tick, px, qty, local_floor: int = 0) -> None:
        if local_floor:
            m_local = np.maximum(m_local, local_floor)
        back = np.flatnonzero(m_exch < np.concatenate([[self.prev_depth_exch], m_exch[:-1]]))
        if back.shape[0]:
            self.findings.add("exch_ts_backwards", "depth exchange time goes backwards while update ids advance",
                              self.file, None, int(back.shape[0]))
        self.prev_depth_exch = int(m_exch[-1])
        days = m_exch // DAY_NS
        cuts = np.flatnonzero(days[1:] != days[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        stops = np.concatenate([cuts, [m_exch.shape[0]]])
        for a, z in zip(starts.tolist(), stops.tolist(), strict=True):
            d = int(days[a])
            self.split.depth_day(d)
            l0 = int(m_end[a - 1]) if a else 0
            l1 = int(m_end[z - 1])
            t = tick[l0:l1]
            s = side[l0:l1]
            ends = (m_end[a:z] - l0).astype(np.int64)
            bbo = self.book.apply(s, t, qty[l0:l1], ends, self.file)
            rows = depth_rows(s, px[l0:l1], qty[l0:l1], ends, m_exch[a:z], m_local[a:z], m_id[a:z])
            self.split.add_rows(d, rows, m_exch[a:z], m_local[a:z])
            self.split.add_bbo(d, m_id[a:z].astype(np.int64), bbo)
            self.book.last_id = int(m_id[z - 1])

    def _covers(self, diff: _Diff, last_id: int) -> bool:
        return diff.first <= (last_id + 1 if self.spot else last_id) <= diff.last

    def _on_unsynced_diff(self, diff: _Diff) -> None:
        if self.snap_wait is not None:
            last_id = self.snap_wait.last_id
            if diff.last < last_id + (1 if self.spot else 0):
                self.stats["dropped_depth_msgs"] += 1
                return
            if self._covers(diff, last_id):
                self._sync(diff_list=[diff])
                return
            self._snapshot_too_old(diff)
            return
        self.buffer.append(diff)

    def _snapshot_too_old(self, diff: _Diff) -> None:
        snap = self.snap_wait
        self.findings.add(
            "snapshot_unusable",
            f"REST snapshot lastUpdateId={snap.last_id} is older than the first diff after it (U={diff.first}); "
            f"waiting for a later snapshot", snap.file, snap.line)
        self.snap_wait = None
        self.buffer.clear()
        self.buffer.append(diff)

    def _on_snapshot(self, k, ints, exch, local, lv_side, lv_px, lv_qty, ticks) -> None:
        lv0, lv1 = int(ints[k, I_LV0]), int(ints[k, I_LV1])
        last_id = int(ints[k, I_U])
        self.snap_wait = _Snap(last_id, int(exch[k]) if exch[k] > 0 else 0, int(local[k]), self.file,
                               self.line0 + k + 1, lv_side[lv0:lv1].copy(), ticks[lv0:lv1].copy(),
                               lv_qty[lv0:lv1].copy())
        keep = last_id + (1 if self.spot else 0)
        dropped = 0
        while self.buffer and self.buffer[0].last < keep:
            self.buffer.popleft()
            dropped += 1
        self.stats["dropped_depth_msgs"] += dropped
        if not self.buffer:
            return  # the covering diff is still to come
        if self._covers(self.buffer[0], last_id):
            self._sync(diff_list=list(self.buffer))
            self.buffer.clear()
        else:
            first = self.buffer.popleft()
            self._snapshot_too_old(first)

    def _sync(self, diff_list: list[_Diff]) -> None:
        """Load the waiting snapshot, then apply ``diff_list`` (the first covers the snapshot)."""
        snap = self.snap_wait
        self.snap_wait = None
        last_id, s_local, s_file, s_line = snap.last_id, snap.local, snap.file, snap.line
        # Spot snapshots carry no time: the covering diff's event time is the closest exchange time.
        start_exch = snap.exch or diff_list[0].exch
        self.book.load(snap.side, snap.tick, snap.qty, f"{s_file}:{s_line}")
        self.book.last_id = last_id
        if self.ever_synced:
            gap = self.gap
            self.findings.add(
                "resynced", f"book resynced from the REST snapshot at {s_file}:{s_line} "
                f"(lastUpdateId={last_id}) after the gap at {gap.file}:{gap.line} ({gap.text})", gap.file, gap.line)
            d = start_exch // DAY_NS
            self.split.depth_day(d)
            rows = self.book.snapshot_rows(start_exch, s_local)
            self.split.add_rows(d, rows, np.zeros(0, np.int64), np.zeros(0, np.int64))
        else:
            self.book_start_exch = start_exch
            self.split.depth_day(start_exch // DAY_NS)
        self.gap = None
        self.synced = True
        self.ever_synced = True
        # Buffered diffs were received before the snapshot; their content is only usable from then on.
        for i, dff in enumerate(diff_list):
            if i and not ((dff.first == self.book.last_id + 1) if self.spot else (dff.prev == self.book.last_id)):
                self.synced = False
                self.gap = _Gap(dff.file, dff.line, self._gap_text(self.book.last_id, dff.first, dff.last, dff.prev))
                self.buffer.extend(diff_list[i:])
                return
            tick = np.rint(dff.px / self.tick).astype(np.int64)
            self._apply_levels(np.array([dff.exch]), np.array([dff.local]), np.array([dff.last]),
                               np.array([dff.px.shape[0]]), dff.side, tick, dff.px, dff.qty, local_floor=s_local)

    def _gap_text(self, prev_last: int, first: int, last: int, prev: int) -> str:
        if self.spot:
            return f"previous message ended at u={prev_last}, this one starts at U={first} (u={last}); " \
                   f"{first - prev_last - 1} update ids missing"
        return f"previous message ended at u={prev_last}, this one has pu={prev} (U={first}, u={last})"

    def _on_gap(self, k: int, prev_last: int, first: int, last: int, prev: int) -> None:
        line = self.line0 + k + 1
        self.gap = _Gap(self.file, line, self._gap_text(prev_last, first, last, prev))
        self.findings.add("gap", f"gap in depth update ids: {self.gap.text}", self.file, line)
        self.synced = False
        self.buffer.clear()

    # -- trades ----------------------------------------------------------------------------------

    def _trades(self, kinds, ints, flts, flags, exch, local) -> None:
        tr = np.flatnonzero(kinds == K_TRADE)
        if not tr.shape[0]:
            return
        self.stats["trade_msgs"] += tr.shape[0]
        if (flags[tr, B_M] < 0).any() or (ints[tr, I_TID] < 0).any():
            k = int(tr[np.flatnonzero((flags[tr, B_M] < 0) | (ints[tr, I_TID] < 0))[0]])
            raise DataError(f"{self.file}:{self.line0 + k + 1}: trade message without 'm' or 't'. Fix: repair or "
                            f"delete the line.")
        tids = ints[tr, I_TID]
        prev = np.concatenate([[self.prev_trade_id], tids[:-1]])
        jump = np.flatnonzero((prev >= 0) & (tids != prev + 1))
        if jump.shape[0]:
            k = int(tr[jump[0]])
            self.findings.add("trade_id_gap", f"trade ids not consecutive (first: {prev[jump[0]]} → "
                              f"{tids[jump[0]]})", self.file, self.line0 + k + 1, int(jump.shape[0]))
        self.prev_trade_id = int(tids[-1])
        market = flags[tr, B_MARKET] == 1
        if not market.all():
            k = int(tr[np.flatnonzero(~market)[0]])
            self.findings.add("non_market_trades", "trades with X != MARKET (insurance fund / ADL) skipped",
                              self.file, self.line0 + k + 1, int((~market).sum()))
            tr = tr[market]
        px, qty = flts[tr, F_P], flts[tr, F_Q]
        tf = px / self.tick
        bad = np.flatnonzero(np.abs(tf - np.rint(tf)) > 1e-6)
        if bad.shape[0]:
            k = int(tr[bad[0]])
            raise DataError(f"{self.file}:{self.line0 + k + 1}: trade price {float(px[bad[0]])} is not a multiple of "
                            f"the tick size {self.tick} ({self.spec_origin}). Fix: pass the right --tick-size.")
        lf = qty / self.lot
        badq = np.flatnonzero(np.abs(lf - np.rint(lf)) > 1e-6)
        if badq.shape[0]:
            k = int(tr[badq[0]])
            raise DataError(f"{self.file}:{self.line0 + k + 1}: trade quantity {float(qty[badq[0]])} is not a multiple "
                            f"of the lot size {self.lot} ({self.spec_origin}). Fix: pass the right --lot-size.")
        t_exch = exch[tr]
        start = self.book_start_exch
        keep = np.zeros(tr.shape[0], bool) if start is None else t_exch >= start
        if not keep.all():
            self.stats["dropped_trades"] += int((~keep).sum())
            self.findings.add("trades_before_book", "trades before the book was established (no snapshot yet) "
                              "dropped", self.file, self.line0 + int(tr[np.flatnonzero(~keep)[0]]) + 1,
                              int((~keep).sum()))
            tr, px, qty, t_exch = tr[keep], px[keep], qty[keep], t_exch[keep]
        if not tr.shape[0]:
            return
        rows = np.zeros(tr.shape[0], event_dtype)
        # Binance m == true: the buyer was the maker, so the initiator (taker) sold.
        rows["ev"] = np.where(flags[tr, B_M] == 1, TRADE_EVENT | SELL_EVENT, TRADE_EVENT | BUY_EVENT)
        rows["exch_ts"] = t_exch
        rows["local_ts"] = local[tr]
        rows["px"] = px
        rows["qty"] = qty
        rows["ival"] = ints[tr, I_TID]
        days = t_exch // DAY_NS
        for d in np.unique(days).tolist():
            sel = days == d
            try:
                self.split.add_rows(int(d), rows[sel], t_exch[sel], local[tr][sel])
            except DataError as exc:
                k = int(tr[np.flatnonzero(sel)[0]])
                raise DataError(f"{self.file}:{self.line0 + k + 1}: {exc}. Fix: sort the capture by time, or "
                                f"convert the late part separately.") from None

    # -- end -------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        if not self.ever_synced:
            if self.snap_wait is not None:
                snap = self.snap_wait
                raise DataError(
                    f"{snap.file}:{snap.line}: the REST snapshot (lastUpdateId={snap.last_id}) "
                    f"is never covered by a depth diff after it, so the book cannot be built. Fix: include the "
                    f"capture that follows the snapshot.")
            files = ", ".join(f["file"] for f in self.files)
            raise DataError(
                f"missing snapshot: no REST depth snapshot (a line without a 'stream' key, with 'lastUpdateId') in "
                f"{files}, so the book cannot be built. Fix: pass the files in time order, starting with the one "
                f"that holds the snapshot (the collector writes one when it connects).")
        if not self.synced and self.gap is not None:
            g = self.gap
            raise DataError(
                f"{g.file}:{g.line}: gap in depth update ids: {g.text}; no later REST snapshot in the input to "
                f"resync from. Fix: convert only the files before the gap, or add a capture with a snapshot "
                f"after it.")
        self.split.close_ready(final=True)
        out = {"venue": self.venue, "files": self.files, "messages": self.stats, "findings": self.findings.as_list()}
        table = self._funding_table()
        if table is not None:
            out["funding"] = table
        return out

    def _funding_table(self) -> np.ndarray | None:
        """Every funding row read so far in one table, by exchange time (also what a stopped convert keeps
        of the days it finished)."""
        self._table_funding()
        if not self.funding_tables:
            return None
        table = np.concatenate(self.funding_tables)  # each sorted: sorting again orders as one table would
        return table[np.argsort(table["exch_ts"], kind="stable")]

    def _table_funding(self) -> None:
        if self.funding:
            from quotelab.data.funding import rows

            table = rows(*map(np.array, zip(*self.funding, strict=True)))
            # One statement moves the rows from the list to the tables: Python runs a signal's handler (a
            # Ctrl-C's KeyboardInterrupt) at calls and backward jumps, not between the stores of one
            # assignment; two statements could leave them in both, and a stopped convert keep them twice.
            self.funding, self.funding_tables = [], [*self.funding_tables, table]


def _convert(venue: str, files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    conv = BinanceConverter(venue, job)
    for f in files:
        conv.feed(Path(f))
    return conv.finish()


def convert_spot(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    return _convert("binance-spot", files, job)


def convert_usdm(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    return _convert("binance-usdm", files, job)


def convert_cm(files: Sequence[Path], job: ConvertJob) -> dict[str, Any]:
    return _convert("binance-cm", files, job)
