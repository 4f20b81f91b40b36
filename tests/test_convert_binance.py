"""Binance converter on the real captures, checked against a second, simple implementation.

The converter's own agreement number is not trusted here: the catalog's npz rows are replayed with
a plain Python book and compared with bookTickers parsed independently (gzip + json) by update id.
Conversions go through the real CLI in a subprocess.
"""

from __future__ import annotations

import bisect
import gzip
import heapq
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hftbacktest.data.validation import validate_event_order
from hftbacktest.types import (
    BUY_EVENT,
    DEPTH_CLEAR_EVENT,
    DEPTH_EVENT,
    DEPTH_SNAPSHOT_EVENT,
    EXCH_EVENT,
    LOCAL_EVENT,
    SELL_EVENT,
    TRADE_EVENT,
    event_dtype,
)

from quotelab.timeunits import DAY_NS

WINDOWS = [
    ("binance-usdm", "BTCUSDT", ["usdm/btcusdt_20240808.gz"], 0.1),
    ("binance-usdm", "ETHUSDT", ["usdm/ethusdt_20240808.gz"], 0.01),
    ("binance-cm", "BTCUSD_PERP", ["cm/btcusd_perp_20240808.gz", "cm/btcusd_perp_20240809.gz"], 0.1),
    ("binance-cm", "ETHUSD_PERP", ["cm/ethusd_perp_20240808.gz", "cm/ethusd_perp_20240809.gz"], 0.01),
    ("binance-spot", "BTCUSDT", ["spot/btcusdt_20240808.gz", "spot/btcusdt_20240809.gz"], 0.01),
    ("binance-spot", "ETHUSDT", ["spot/ethusdt_20240808.gz", "spot/ethusdt_20240809.gz"], 0.01),
]
NEXO = ("binance-spot", "NEXOUSDT", ["spot/nexousdt_20240723.dat.gz", "spot/nexousdt_20240724.dat.gz",
                                     "spot/nexousdt_20240725.dat.gz"], 0.001)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotelab.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def convert_json(fmt: str, symbol: str, files: list[Path], catalog: Path, *extra: str) -> dict[str, Any]:
    r = run_cli("convert", "--format", fmt, "--symbol", symbol, "--catalog", catalog, "--json", *extra, *files)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# --- the second implementation ------------------------------------------------------------------


def raw_messages(files: list[Path]) -> tuple[list[tuple[int, float, float, float, float]], dict[int, bool], int]:
    """bookTickers (u, bid, ask, bid qty, ask qty) sorted by u, trade id → m, depth message count."""
    bts: list[tuple[int, float, float, float, float]] = []
    maker: dict[int, bool] = {}
    depth = 0
    for f in files:
        with gzip.open(f, "rt") as fh:
            for line in fh:
                msg = json.loads(line.split(" ", 1)[1])
                d = msg.get("data")
                if d is None:
                    continue
                if "bookTicker" in msg["stream"]:
                    bts.append((d["u"], float(d["b"]), float(d["a"]), float(d["B"]), float(d["A"])))
                elif d.get("e") == "trade":
                    maker[d["t"]] = d["m"]
                elif d.get("e") == "depthUpdate":
                    depth += 1
    bts.sort()
    return bts, maker, depth


class SimpleBook:
    """Price → qty per side; best price from heaps with lazy deletion (no cleverness to get wrong)."""

    def __init__(self) -> None:
        self.side: dict[int, dict[float, float]] = {1: {}, -1: {}}
        self.heap: dict[int, list[float]] = {1: [], -1: []}

    def clear(self, s: int) -> None:
        self.side[s].clear()
        self.heap[s].clear()

    def set(self, s: int, px: float, qty: float) -> None:
        if qty == 0:
            self.side[s].pop(px, None)
        else:
            if px not in self.side[s]:
                heapq.heappush(self.heap[s], -px if s == 1 else px)
            self.side[s][px] = qty

    def best(self, s: int) -> tuple[float, float] | None:
        h = self.heap[s]
        while h:
            px = -h[0] if s == 1 else h[0]
            if px in self.side[s]:
                return px, self.side[s][px]
            heapq.heappop(h)
        return None


def replay_against_bookticker(events: np.ndarray, bts: list[tuple[int, float, float, float, float]],
                              tick: float) -> tuple[int, int, int]:
    """Replay EXCH rows; after each group of depth rows sharing an ``ival`` (one message), compare the
    best bid/ask with the last bookTicker whose u <= ival. Returns (groups, compared, agreed)."""
    bt_ids = [b[0] for b in bts]
    book = SimpleBook()
    groups = compared = agreed = 0
    ev = events["ev"]
    kinds = ev & 0xFF
    exch_rows = np.flatnonzero(ev & EXCH_EVENT)
    pending: int | None = None

    def check(ival: int) -> None:
        nonlocal groups, compared, agreed
        groups += 1
        k = bisect.bisect_right(bt_ids, ival) - 1
        if k < 0:
            return
        compared += 1
        bb, ba = book.best(1), book.best(-1)
        if bb is None or ba is None:
            return
        if round(bb[0] / tick) == round(bts[k][1] / tick) and round(ba[0] / tick) == round(bts[k][2] / tick):
            agreed += 1

    for r in exch_rows.tolist():
        kind = int(kinds[r])
        if kind not in (DEPTH_EVENT, DEPTH_CLEAR_EVENT, DEPTH_SNAPSHOT_EVENT):
            continue
        ival = int(events["ival"][r])
        if pending is not None and ival != pending:
            check(pending)
        pending = ival
        s = 1 if ev[r] & BUY_EVENT else -1
        if kind == DEPTH_CLEAR_EVENT:
            book.clear(s)
        else:
            book.set(s, round(float(events["px"][r]) / tick) * tick, float(events["qty"][r]))
    if pending is not None:
        check(pending)
    return groups, compared, agreed


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("binance_catalog")
    out = {}
    for fmt, symbol, files, tick in WINDOWS:
        paths = [shared_data / "binance" / f for f in files]
        out[f"{fmt}/{symbol}"] = (convert_json(fmt, symbol, paths, root), paths, tick)
    return {"root": root, "runs": out}


@pytest.mark.parametrize("key", [f"{w[0]}/{w[1]}" for w in WINDOWS])
def test_catalog_book_matches_bookticker_by_update_id(converted: dict[str, Any], key: str) -> None:
    summary, paths, tick = converted["runs"][key]
    bts, _, n_depth = raw_messages(paths)
    days = summary["days"]
    assert list(days) == ["20240808", "20240809"], "the windows cross midnight UTC in exchange time"
    total_groups = 0
    for day, info in days.items():
        events = np.load(info["file"])["data"]
        groups, compared, agreed = replay_against_bookticker(events, bts, tick)
        total_groups += groups
        assert compared >= 0.95 * groups, (day, groups, compared)
        assert agreed / compared >= 0.999, f"{key} {day}: {agreed}/{compared} agree with bookTicker"
        # The converter's own figure, kept in meta.json, must tell the same story.
        meta = json.loads((Path(info["file"]).parent / "meta.json").read_text())
        rate = meta["days"][day]["quality"]["agreement"]["rate"]
        assert rate >= 0.999 and abs(rate - agreed / compared) < 0.002
    # Every depth message after the snapshot appears once (plus one snapshot group per day).
    dropped = summary["messages"]["dropped_depth_msgs"]
    assert total_groups >= n_depth - dropped


@pytest.mark.parametrize("key", [f"{w[0]}/{w[1]}" for w in WINDOWS])
def test_days_follow_catalog_conventions(converted: dict[str, Any], key: str) -> None:
    summary, paths, _ = converted["runs"][key]
    _, maker, _ = raw_messages(paths)
    trade_ids: list[int] = []
    for day, info in summary["days"].items():
        ev = np.load(info["file"])["data"]
        assert ev.dtype == event_dtype
        validate_event_order(ev)  # hftbacktest's own check of the EXCH/LOCAL orders
        kinds = ev["ev"] & 0xFF
        # A full snapshot opens the day: CLEAR bid, bid levels, CLEAR ask, ask levels.
        assert kinds[0] == DEPTH_CLEAR_EVENT and ev["ev"][0] & BUY_EVENT
        n_bid = int(np.argmax(kinds[1:] != DEPTH_SNAPSHOT_EVENT)) + 1
        assert n_bid > 100 and kinds[n_bid] == DEPTH_CLEAR_EVENT and ev["ev"][n_bid] & SELL_EVENT
        assert (ev["ev"][:n_bid] & (EXCH_EVENT | LOCAL_EVENT) == EXCH_EVENT | LOCAL_EVENT).all()
        # UTC day of exchange time; local time corrected so that no latency is negative.
        start = int(np.datetime64(f"{day[:4]}-{day[4:6]}-{day[6:]}", "ns").astype(np.int64))
        assert (ev["exch_ts"] >= start).all() and (ev["exch_ts"] < start + DAY_NS).all()
        assert (ev["local_ts"] >= ev["exch_ts"]).all()
        # Depth rows carry the message's final update id; trades their id and the initiator's side.
        depth = kinds == DEPTH_EVENT
        assert (ev["ival"][depth] > 0).all()
        tr = (kinds == TRADE_EVENT) & ((ev["ev"] & EXCH_EVENT) != 0)
        for tid, flag in zip(ev["ival"][tr].tolist(), ev["ev"][tr].tolist(), strict=True):
            # Binance m == true: the buyer was the maker, so the seller initiated.
            assert bool(flag & SELL_EVENT) == maker[tid] and bool(flag & BUY_EVENT) == (not maker[tid])
        trade_ids += ev["ival"][tr].tolist()
        q = info["quality"]
        assert 1.2e9 < q["clock_offset_ns"] < 1.35e9, "the 2024-08 capture clock is ~1.27 s behind"
        assert q["latency"]["min_ms"] >= 0 and q["latency"]["p50_ms"] > 0
        assert any(f["kind"] == "clock_behind" for f in q["findings"])
    # Every trade after the book started is there exactly once.
    assert len(trade_ids) == len(set(trade_ids)) == len(maker) - summary["messages"]["dropped_trades"]


def test_meta_json_has_instrument_and_days(converted: dict[str, Any]) -> None:
    root = converted["root"]
    meta = json.loads((root / "binance-cm" / "BTCUSD_PERP" / "meta.json").read_text())
    assert meta["tick_size"] == 0.1 and meta["lot_size"] == 1.0
    assert meta["contract"] == {"kind": "inverse", "size": 100.0}
    assert set(meta["days"]) == {"20240808", "20240809"}
    d = meta["days"]["20240809"]
    assert {"first_ts", "last_ts", "events", "counts", "quality"} <= set(d)
    assert d["quality"]["agreement"]["rate"] >= 0.999
    spot = json.loads((root / "binance-spot" / "BTCUSDT" / "meta.json").read_text())
    assert spot["tick_size"] == 0.01 and spot["lot_size"] == 0.00001 and spot["contract"]["kind"] == "linear"


def test_nexousdt_microsecond_files_over_34_hours(shared_data: Path, tmp_path: Path) -> None:
    fmt, symbol, files, tick = NEXO
    paths = [shared_data / "binance" / f for f in files]
    summary = convert_json(fmt, symbol, paths, tmp_path)
    assert [f["local_ts_unit"] for f in summary["files"]] == ["us", "us", "us"]
    assert list(summary["days"]) == ["20240723", "20240724", "20240725"]
    bts, _, _ = raw_messages(paths)
    for day, info in summary["days"].items():
        ev = np.load(info["file"])["data"]
        validate_event_order(ev)
        groups, compared, agreed = replay_against_bookticker(ev, bts, tick)
        assert compared >= 0.95 * groups and agreed / compared >= 0.999, (day, agreed, compared)
        # µs stamps became ns: local and exchange times agree to within seconds.
        assert np.abs(ev["local_ts"] - ev["exch_ts"]).max() < 5e9
        assert info["quality"]["latency"]["min_ms"] >= 0


def test_human_summary_names_days_agreement_and_offset(shared_data: Path, tmp_path: Path) -> None:
    f = shared_data / "binance" / "usdm" / "ethusdt_20240808.gz"
    r = run_cli("convert", "--format", "binance-usdm", "--symbol", "ETHUSDT", "--catalog", tmp_path, f)
    assert r.returncode == 0, r.stderr
    for text in ("20240808", "20240809", "book = bookTicker", "100.0000%", "clock offset applied", "+1272",
                 "clock_behind", "latency p50/p90/p99"):
        assert text in r.stdout, text


def test_unknown_symbol_needs_tick_and_lot_flags(shared_data: Path, tmp_path: Path) -> None:
    f = shared_data / "binance" / "usdm" / "ethusdt_20240808.gz"
    r = run_cli("convert", "--format", "binance-usdm", "--symbol", "SOLUSDT", "--catalog", tmp_path, f)
    assert r.returncode == 2
    assert "binance-usdm/SOLUSDT" in r.stderr and "--tick-size and --lot-size" in r.stderr
    r = run_cli("convert", "--format", "binance-usdm", "--symbol", "SOLUSDT", "--catalog", tmp_path,
                "--tick-size", "0.01", f)
    assert r.returncode == 2 and "--lot-size" in r.stderr and "--tick-size" not in r.stderr.split("pass")[1]


def test_overrides_are_used_recorded_and_checked(shared_data: Path, tmp_path: Path) -> None:
    f = shared_data / "binance" / "usdm" / "ethusdt_20240808.gz"
    s = convert_json("binance-usdm", "ETHUSDT", [f], tmp_path, "--tick-size", "0.01", "--lot-size", "0.001")
    assert "overridden" in s["instrument"]["origin"]
    # A tick the data contradicts is refused, naming the price, the place and the flag.
    r = run_cli("convert", "--format", "binance-usdm", "--symbol", "ETHUSDT", "--catalog", tmp_path / "x",
                "--tick-size", "0.1", f)
    assert r.returncode == 2
    assert "is not a multiple of the tick size 0.1" in r.stderr and "--tick-size" in r.stderr
    assert f"{f}:" in r.stderr


def test_unknown_format_lists_known_ones(tmp_path: Path) -> None:
    r = run_cli("convert", "--format", "binance-options", "--symbol", "X", "--catalog", tmp_path, __file__)
    assert r.returncode == 2 and "binance-usdm" in r.stderr and "binance-spot" in r.stderr


@pytest.mark.parametrize("key", [f"{w[0]}/{w[1]}" for w in WINDOWS])
def test_every_price_and_quantity_is_the_decimal_the_exchange_sent(converted: dict[str, Any], key: str) -> None:
    from decimal import Decimal

    summary, _, tick = converted["runs"][key]
    for info in summary["days"].values():
        ev = np.load(info["file"])["data"]
        priced = (ev["ev"] & 0xFF) != DEPTH_CLEAR_EVENT
        # Prices on the tick grid; quantities as sent, to at most 8 decimals (spot sends finer than its lot).
        for col, step in (("px", Decimal(repr(tick))), ("qty", Decimal("1e-8"))):
            values = np.unique(ev[col][priced])
            k = np.rint(values / float(step)).astype(np.int64)
            # One double per level: a snapshot row and a depth row of the same level agree bit for bit.
            assert len(np.unique(k)) == len(values), f"{key} {col}: levels stored as two different doubles"
            # ... and it is the double nearest the decimal, computed a second way through Decimal.
            want = np.array([float(Decimal(int(i)) * step) for i in k.tolist()])
            bad = values != want
            assert not bad.any(), f"{key} {col}: {values[bad][:3]} should be {want[bad][:3]}"
