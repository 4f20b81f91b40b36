"""The whole-day conversion the streamed one must equal: every row of a day held in memory, ordered by a
slow, obvious merge, latencies from ``np.percentile``, the witness compared in one go. Plugged into the
real converters in place of ``events.DaySplitter`` and ``events.Witness`` (the way quotelab converted
before days were streamed), so the two differ only in how a day is closed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hftbacktest.types import (
    BUY_EVENT,
    DEPTH_CLEAR_EVENT,
    DEPTH_EVENT,
    DEPTH_SNAPSHOT_EVENT,
    EXCH_EVENT,
    LOCAL_EVENT,
    TRADE_EVENT,
    event_dtype,
)

from quotelab.data.events import DAY_GRACE_NS, ConvertJob, DayResult, DenseBook, Findings, day_of
from quotelab.errors import DataError
from quotelab.timeunits import DAY_NS


def order_and_flag(rows: np.ndarray) -> np.ndarray:
    """Rows in arrival order → hftbacktest's order: walk the rows sorted by (exch_ts, arrival) and by
    (local_ts, arrival) together; a row first in both is written once with both flags, else the first
    one to have arrived of the two heads is written with its own flag. Plain Python."""
    n = rows.shape[0]
    exch = rows["exch_ts"].tolist()
    local = rows["local_ts"].tolist()
    by_exch = sorted(range(n), key=lambda r: (exch[r], r))
    by_local = sorted(range(n), key=lambda r: (local[r], r))
    done_e: set[int] = set()
    done_l: set[int] = set()
    i = j = 0
    picks: list[tuple[int, int]] = []
    while True:
        while i < n and by_exch[i] in done_e:
            i += 1
        while j < n and by_local[j] in done_l:
            j += 1
        if i == n and j == n:
            break
        e = by_exch[i] if i < n else None
        lo = by_local[j] if j < n else None
        if e is not None and e == lo:
            picks.append((e, EXCH_EVENT | LOCAL_EVENT))
            done_e.add(e)
            done_l.add(e)
        elif lo is None or (e is not None and e < lo):
            picks.append((e, EXCH_EVENT))
            done_e.add(e)
        else:
            picks.append((lo, LOCAL_EVENT))
            done_l.add(lo)
    out = rows[np.array([p[0] for p in picks], np.int64)] if picks else np.zeros(0, event_dtype)
    out["ev"] |= np.array([p[1] for p in picks], np.uint64)
    return out


def latency_stats(lat_ns: np.ndarray) -> dict[str, float | None]:
    if not lat_ns.shape[0]:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "min_ms": None, "max_ms": None}
    p = np.percentile(lat_ns, [50, 90, 99]) / 1e6
    return {"p50_ms": round(float(p[0]), 3), "p90_ms": round(float(p[1]), 3),
            "p99_ms": round(float(p[2]), 3), "min_ms": round(float(lat_ns.min()) / 1e6, 3),
            "max_ms": round(float(lat_ns.max()) / 1e6, 3)}


def count_kinds(rows: np.ndarray) -> dict[str, int]:
    kind = rows["ev"] & np.uint64(0xFF)
    buy = (rows["ev"] & np.uint64(BUY_EVENT)) != 0
    return {"depth": int((kind == DEPTH_EVENT).sum()), "depth_clear": int((kind == DEPTH_CLEAR_EVENT).sum()),
            "depth_snapshot": int((kind == DEPTH_SNAPSHOT_EVENT).sum()),
            "trade_buy": int(((kind == TRADE_EVENT) & buy).sum()),
            "trade_sell": int(((kind == TRADE_EVENT) & ~buy).sum())}


class MemoryWitness:
    """The BBO feed held in memory; the witness of a depth message with final id u is the last BBO
    message (sorted stably by id) with id <= u."""

    def __init__(self, where: Any = None) -> None:
        self.ids = np.zeros(0, np.int64)
        self.vals = np.zeros((0, 4))

    def add_bbo(self, ids, bid_px, ask_px, bid_qty, ask_qty) -> None:
        if ids.shape[0]:
            self.ids = np.concatenate([self.ids, ids.astype(np.int64)])
            self.vals = np.concatenate([self.vals, np.stack([bid_px, ask_px, bid_qty, ask_qty], axis=1)])

    def agreement(self, book_ids: np.ndarray, book_bbo: np.ndarray, tick: float) -> dict[str, Any]:
        o = np.argsort(self.ids, kind="stable")
        self.ids, self.vals = self.ids[o], self.vals[o]
        res: dict[str, Any] = {"messages": int(book_ids.shape[0]), "compared": 0, "agreed": 0,
                               "agreed_with_qty": 0, "rate": None, "rate_with_qty": None,
                               "first_disagreement_id": None}
        if not self.ids.shape[0] or not book_ids.shape[0]:
            return res
        compared = agreed = with_qty = 0
        for u, b in zip(book_ids.tolist(), book_bbo.tolist(), strict=True):
            k = int(np.searchsorted(self.ids, u, side="right")) - 1
            if k < 0:
                continue
            w = self.vals[k]
            compared += 1
            ok = np.rint(w[0] / tick) == b[0] and np.rint(w[1] / tick) == b[1]
            agreed += ok
            with_qty += ok and np.isclose(w[2], b[2], rtol=1e-9, atol=0) and np.isclose(w[3], b[3], rtol=1e-9, atol=0)
            if not ok and res["first_disagreement_id"] is None:
                res["first_disagreement_id"] = u
        res.update(compared=compared, agreed=int(agreed), agreed_with_qty=int(with_qty))
        if compared:
            res["rate"], res["rate_with_qty"] = agreed / compared, with_qty / compared
        return res

    def prune_below(self, book_id: int) -> None:
        k = int(np.searchsorted(self.ids, book_id, side="right")) - 1
        if k > 0:
            self.ids, self.vals = self.ids[k:], self.vals[k:]


class WholeDaySplitter:
    """``events.DaySplitter``'s contract, holding each day's rows, latencies and book tops in lists."""

    def __init__(self, book: DenseBook, witness: MemoryWitness | None, job: ConvertJob) -> None:
        self.book, self.witness, self.on_day = book, witness, job.on_day
        self.days: dict[int, dict[str, Any]] = {}
        self.closed_below = -1
        self.offset_ns = 0
        self.max_exch = -1

    def _open(self, d: int) -> dict[str, Any]:
        if d not in self.days:
            if d <= self.closed_below:
                raise DataError(f"an event of UTC day {day_of(d * DAY_NS)} arrived after that day was "
                                f"closed (more than {DAY_GRACE_NS // 10**9} s late in exchange time)")
            self.days[d] = {"snapshot": None, "rows": [], "lat": [], "ids": [], "bbo": [], "findings": Findings()}
        return self.days[d]

    def depth_day(self, d: int) -> None:
        self._open(d)
        for k, day in self.days.items():
            if k <= d and day["snapshot"] is None:
                day["snapshot"] = self.book.snapshot_rows(0, 0)

    def add_rows(self, d: int, rows, msg_exch, msg_local) -> None:
        day = self._open(d)
        day["rows"].append(rows)
        day["lat"].append(np.asarray(msg_local, np.int64) - np.asarray(msg_exch, np.int64))
        if msg_exch.shape[0]:
            self.max_exch = max(self.max_exch, int(msg_exch.max()))

    def add_bbo(self, d: int, ids, bbo) -> None:
        day = self._open(d)
        day["ids"].append(ids)
        day["bbo"].append(bbo)

    def close_ready(self, final: bool = False) -> None:
        for d in sorted(self.days):
            if final or (d + 1) * DAY_NS + DAY_GRACE_NS <= self.max_exch:
                self._close(d)

    def _close(self, d: int) -> None:
        day = self.days.pop(d)
        self.closed_below = max(self.closed_below, d)
        lat = np.concatenate([np.zeros(0, np.int64), *day["lat"]])
        if lat.shape[0]:
            self.offset_ns = max(self.offset_ns, int(-lat.min()), 0)
        q: dict[str, Any] = {
            "clock_offset_ns": self.offset_ns,
            "clock_offset_note": (
                "local_ts shifted by +clock_offset_ns so that every message's local − exch >= 0 "
                "(the capture clock ran behind the exchange)" if self.offset_ns else
                "no shift needed: local − exch >= 0 throughout"),
            "raw_latency": latency_stats(lat), "latency": latency_stats(lat + self.offset_ns)}
        if self.offset_ns > 0:
            day["findings"].add("clock_behind", f"capture clock behind exchange: min local − exch was "
                                f"{lat.min() / 1e6:.3f} ms; local_ts shifted by +{self.offset_ns / 1e6:.3f} ms")
        snap = day["snapshot"] if day["snapshot"] is not None else self.book.snapshot_rows(0, 0)
        body = np.concatenate([np.zeros(0, event_dtype), *day["rows"]])
        body["local_ts"] += self.offset_ns
        if body.shape[0]:
            snap["exch_ts"] = body["exch_ts"].min()
            snap["local_ts"] = body["local_ts"].min()
        rows = np.concatenate([snap, body])
        events = order_and_flag(rows)
        counts = {**count_kinds(rows), "local_only_duplicates": int(events.shape[0] - rows.shape[0])}
        if self.witness is not None:
            ids = np.concatenate([np.zeros(0, np.int64), *day["ids"]])
            bbo = np.concatenate([np.zeros((0, 4)), *day["bbo"]])
            q["agreement"] = self.witness.agreement(ids, bbo, self.book.tick_size)
            if q["agreement"]["rate"] is None:
                day["findings"].add("no_witness", "no BBO message to compare the rebuilt book with")
            if ids.shape[0]:
                self.witness.prune_below(int(ids[-1]))
        q["findings"] = day["findings"].as_list()
        info = {"first_ts": int(rows["exch_ts"].min()), "last_ts": int(rows["exch_ts"].max()),
                "events": int(events.shape[0]), "counts": counts, "quality": q}
        self.on_day(DayResult(day_of(d * DAY_NS), events, info))
