"""Streamed conversion (issue 15): a day spilled to disk and written a block at a time must give what the
whole-day conversion gives, row for row and figure for figure (tests/convert_reference.py), whatever the
block and part sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import convert_reference as ref
import numpy as np
import pytest
from hftbacktest.types import BUY_EVENT, DEPTH_EVENT, SELL_EVENT, TRADE_EVENT, event_dtype

from quotelab.data import binance, bybit, catalog, messages, okx, tardis
from quotelab.data.events import ConvertJob, DayResult, FlagOrder, Spill, latency_stats_spilled
from quotelab.data.instruments import resolve

FIXTURES = Path(__file__).parent / "fixtures" / "tardis"
INSTR = {"tick_size": 0.1, "lot_size": 0.001}
# (converter, venue, symbol, files under the shared data or the fixtures, instrument)
SETS = {
    "usdm_btc": (binance.convert_usdm, "binance-usdm", "BTCUSDT", ["binance/usdm/btcusdt_20240808.gz"], None),
    "usdm_eth": (binance.convert_usdm, "binance-usdm", "ETHUSDT", ["binance/usdm/ethusdt_20240808.gz"], None),
    "cm_btc": (binance.convert_cm, "binance-cm", "BTCUSD_PERP",
               ["binance/cm/btcusd_perp_20240808.gz", "binance/cm/btcusd_perp_20240809.gz"], None),
    "cm_eth": (binance.convert_cm, "binance-cm", "ETHUSD_PERP",
               ["binance/cm/ethusd_perp_20240808.gz", "binance/cm/ethusd_perp_20240809.gz"], None),
    "spot_btc": (binance.convert_spot, "binance-spot", "BTCUSDT",
                 ["binance/spot/btcusdt_20240808.gz", "binance/spot/btcusdt_20240809.gz"], None),
    "spot_eth": (binance.convert_spot, "binance-spot", "ETHUSDT",
                 ["binance/spot/ethusdt_20240808.gz", "binance/spot/ethusdt_20240809.gz"], None),
    "spot_nexo": (binance.convert_spot, "binance-spot", "NEXOUSDT",
                  [f"binance/spot/nexousdt_2024072{d}.dat.gz" for d in (3, 4, 5)], None),
    "bybit": (bybit.convert, "bybit", "BTCUSD", ["other-venues/BYBIT.ws.26.0.gz"], None),
    "okx": (okx.convert, "okx", "BTC-USDT", ["other-venues/OKX.ws.1.0.gz"], None),
    "tardis": (tardis.convert, "binance-usdm", "BTCUSDT",
               [FIXTURES / "binance-futures_incremental_book_L2_BTCUSDT.csv",
                FIXTURES / "binance-futures_trades_BTCUSDT.csv.gz"], INSTR),
}


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows in arrival order with the disorder real captures have: local time mostly rising (a few steps
    back), exchange time behind it by a jittered latency, trades timed earlier than the depth around
    them, many ties in both clocks."""
    rows = np.zeros(n, event_dtype)
    local = np.cumsum(rng.integers(0, 3, n))
    back = rng.random(n) < 0.02
    local[back] -= rng.integers(1, 5, int(back.sum()))
    exch = local - rng.integers(0, 8, n)
    trade = rng.random(n) < 0.3
    exch[trade] -= rng.integers(0, 20, int(trade.sum()))
    rows["exch_ts"] = exch
    rows["local_ts"] = local
    rows["ev"] = np.where(trade, TRADE_EVENT | BUY_EVENT, DEPTH_EVENT | SELL_EVENT)
    rows["ival"] = np.arange(n)
    return rows


def _streamed(rows: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """FlagOrder fed ``rows`` ``block`` at a time with the suffix minima the splitter gives it."""
    n = rows.shape[0]
    starts = list(range(0, n, block)) or [0]
    big = np.iinfo(np.int64).max
    mins_e = [int(rows["exch_ts"][a:a + block].min()) for a in starts] + [big]
    mins_l = [int(rows["local_ts"][a:a + block].min()) for a in starts] + [big]
    suf_e = np.minimum.accumulate(mins_e[::-1])[::-1]
    suf_l = np.minimum.accumulate(mins_l[::-1])[::-1]
    order = FlagOrder()
    out = []
    for b, a in enumerate(starts):
        final = b + 1 == len(starts)
        out.append(order.add(rows[a:a + block], int(suf_e[b + 1]), int(suf_l[b + 1]), final))
    return np.concatenate(out), order.most


@pytest.mark.parametrize("seed", range(6))
def test_windowed_order_equals_the_whole_day_merge(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = _rows(rng, 3000)
    want = ref.order_and_flag(rows)
    assert want.shape[0] > rows.shape[0], "the data must make rows that are written twice"
    for block in (1, 2, 7, 64, 1000, 5000):
        got, most = _streamed(rows, block)
        assert got.tobytes() == want.tobytes(), block
        if block == 64:
            assert most < 400, "the window holds the disorder, not the day"


def test_windowed_order_holds_a_late_row_until_its_block() -> None:
    """One row timed far back arriving last: nothing after its exchange time may leave before it."""
    rows = _rows(np.random.default_rng(9), 500)
    rows["exch_ts"][-1] = rows["exch_ts"][10]
    got, most = _streamed(rows, 16)
    assert got.tobytes() == ref.order_and_flag(rows).tobytes()
    assert most > 400


@pytest.mark.parametrize("n", [1, 2, 3, 4, 10, 101, 1000, 4097])
@pytest.mark.parametrize("memory_rows", [0, 50, 10**6])  # on disk from the start, from the 51st, never
def test_spilled_latency_percentiles_are_numpys(n: int, memory_rows: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(n)
    for lat in (rng.integers(-10**9, 10**10, n), rng.integers(0, 5, n) * 1_000_000,
                np.full(n, 7), rng.integers(-2**61, 2**61, n)):
        spill = Spill(np.int64, tmp_path, memory_rows)
        spill.add(lat[: n // 2])
        spill.add(lat[n // 2:])
        shift = int(rng.integers(0, 10**9))
        got = latency_stats_spilled(spill, int(lat.min()), int(lat.max()), [0, shift], block_rows=7)
        assert got == [ref.latency_stats(lat), ref.latency_stats(lat + shift)]


@pytest.mark.parametrize("memory_rows", [0, 1, 37, 500, 10**6])
def test_spill_reads_back_what_was_added(memory_rows: int, tmp_path: Path) -> None:
    """Held in memory, on disk, or the first part held and the rest on disk: every range reads back as added."""
    rng = np.random.default_rng(memory_rows)
    pieces = [rng.integers(-10**12, 10**12, int(k)) for k in rng.integers(1, 60, 40)]
    spill = Spill(np.int64, tmp_path, memory_rows)
    for p in pieces:
        spill.add(p[1:] if len(p) > 1 else p)  # views too
    whole = np.concatenate([p[1:] if len(p) > 1 else p for p in pieces])
    for start, count in [(0, whole.shape[0]), *rng.integers(0, whole.shape[0], (30, 2)).tolist()]:
        assert np.array_equal(spill.read(start, count), whole[start:start + count])
    got = []
    for at, blk in zip(range(0, spill.n, 13), spill.blocks(13), strict=True):
        got.append(blk)
        spill.release(at + 13)
    assert np.array_equal(np.concatenate(got), whole)
    spill.close()


@pytest.mark.parametrize("rows", [0, 5, 64, 128, 200])
@pytest.mark.parametrize("compression", ["deflate", "none"])
@pytest.mark.parametrize("expect", [0, 0.5, 1])  # of the rows told in advance: parts held, some streamed, all
@pytest.mark.parametrize("hold", [1 << 16, 20])  # rows of a part of unknown size held before the rest wait on disk
def test_day_writer_writes_the_files_write_day_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: int,
                                                       compression: str, expect: float, hold: int) -> None:
    monkeypatch.setattr(catalog.DayWriter, "HOLD", hold)
    events = _rows(np.random.default_rng(rows), rows)
    whole = catalog.write_day(tmp_path / "a", "v", "S", "20240101", events, compression, part_rows=64)
    w = catalog.DayWriter(catalog.day_path(tmp_path / "b", "v", "S", "20240101"), compression, part_rows=64)
    w.expect(int(rows * expect))
    at = 0
    for size in (3, 50, 1, 100, 1000):
        w.append(events[at:at + size])
        at += size
    w.commit()
    a, b = catalog.parts_of(whole), catalog.parts_of(catalog.day_path(tmp_path / "b", "v", "S", "20240101"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == max(1, -(-rows // 64))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert not list((tmp_path / "b").rglob("*.tmp"))


def test_day_writer_discarded_while_rows_wait_on_disk_leaves_no_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog.DayWriter, "HOLD", 10)
    w = catalog.DayWriter(catalog.day_path(tmp_path, "v", "S", "20240101"), "deflate", part_rows=64)
    w.append(_rows(np.random.default_rng(1), 8))
    w.append(_rows(np.random.default_rng(2), 40))
    waiting = w.waiting
    assert waiting is not None and w.held_rows == 8
    w.discard()
    assert waiting.closed and w.waiting is None and not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_day_writer_write_error_raises_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A part written on the writer's thread that fails (a full disk) fails the day; nothing is left."""
    def full(self: Any, rows: np.ndarray) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(catalog._PartFile, "write", full)
    path = catalog.day_path(tmp_path, "v", "S", "20240101")
    w = catalog.DayWriter(path, "deflate", part_rows=64)
    w.expect(200)
    with pytest.raises(OSError, match="No space"):
        for at in range(0, 200, 10):
            w.append(_rows(np.random.default_rng(at), 10))
        w.commit()
    w.discard()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def _whole_day(files: list[Path], convert, venue: str, symbol: str, instrument: dict, mp: pytest.MonkeyPatch
               ) -> tuple[dict[str, Any], dict[str, DayResult]]:
    days: dict[str, DayResult] = {}
    with mp.context() as m:
        for mod in (binance, messages):
            m.setattr(mod, "DaySplitter", ref.WholeDaySplitter)
        m.setattr(binance, "Witness", ref.MemoryWitness)
        summary = convert(files, ConvertJob(venue, symbol, instrument, lambda d: days.__setitem__(d.day, d)))
    return summary, days


@pytest.mark.parametrize("key", list(SETS))
def test_streamed_conversion_equals_the_whole_day(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  key: str) -> None:
    """Every shared capture, spilled and read back 997 rows at a time, written in parts of 50,000 rows:
    the same rows, counts, latencies, agreement and findings as the whole day ordered in memory."""
    convert, venue, symbol, names, instrument = SETS[key]
    instrument = instrument or resolve(venue, symbol)
    files = [shared_data / f for f in names]
    want_summary, want = _whole_day(files, convert, venue, symbol, instrument, monkeypatch)
    days: dict[str, DayResult] = {}
    job = ConvertJob(venue, symbol, instrument, lambda d: days.__setitem__(d.day, d),
                     open_day=lambda day: catalog.DayWriter(tmp_path / f"{day}.npz", "deflate", 50_000),
                     spill_dir=tmp_path, block_rows=997)
    summary = convert(files, job)
    assert json.dumps(summary, sort_keys=True, default=str) == json.dumps(want_summary, sort_keys=True, default=str)
    assert list(days) == list(want)
    for day, res in days.items():
        assert res.events is None
        parts = catalog.parts_of(tmp_path / f"{day}.npz")
        got = np.concatenate([catalog.load_events(p) for p in parts])
        assert got.tobytes() == want[day].events.tobytes(), day
        assert res.info == want[day].info, day
        assert len(parts) == -(-got.shape[0] // 50_000)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".npz")) == [], "spills are unlinked"


@pytest.mark.parametrize("shuffled", [False, True])
def test_witness_over_days_equals_the_in_memory_one(tmp_path: Path, shuffled: bool) -> None:
    """Three days of book tops against a BBO feed, compared a few records at a time (ids in order) or
    whole (BBO ids out of order): the same agreement, and the same BBO messages kept for the next day."""
    from quotelab.data.events import BBO_DTYPE, Witness

    rng = np.random.default_rng(4)
    ours, theirs = Witness(tmp_path), ref.MemoryWitness()
    next_id = 100
    for day in range(3):
        n = 300
        ids = np.sort(rng.integers(next_id, next_id + 2000, n))
        if shuffled and day == 1:
            ids = rng.permutation(ids)
        px = rng.integers(1000, 1004, (n, 2)).astype(float)
        qty = rng.integers(1, 3, (n, 2)).astype(float)
        ours.add_bbo(ids, px[:, 0] * 0.5, px[:, 1] * 0.5, qty[:, 0], qty[:, 1])
        theirs.add_bbo(ids, px[:, 0] * 0.5, px[:, 1] * 0.5, qty[:, 0], qty[:, 1])
        book = np.zeros(200, BBO_DTYPE)
        book["id"] = np.sort(rng.integers(next_id - 50, next_id + 2100, 200))
        book["v"] = np.concatenate([rng.integers(1000, 1004, (200, 2)), rng.integers(1, 3, (200, 2))], axis=1)
        spill = Spill(BBO_DTYPE, tmp_path)
        spill.add(book)
        got = ours.close_day(spill, True, 0.5, block_rows=13)
        want = theirs.agreement(book["id"], book["v"], 0.5)
        theirs.prune_below(int(book["id"][-1]))
        assert got == want and 0 < got["agreed"] < got["compared"], day
        next_id += 1500
