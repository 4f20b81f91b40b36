"""The synthetic market, checked from the files alone: an independent Python book, hftbacktest itself,
and the CLI in a subprocess."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hftbacktest.types import (
    BUY_EVENT,
    DEPTH_CLEAR_EVENT,
    DEPTH_EVENT,
    DEPTH_SNAPSHOT_EVENT,
    EXCH_EVENT,
    LOCAL_EVENT,
    TRADE_EVENT,
)

from quotelab.data import catalog, synth
from quotelab.errors import QuotelabError

VENUE = synth.VENUE


class Book:
    """A deliberately naive L2 book: two dicts, best prices by max/min."""

    def __init__(self) -> None:
        self.sides: dict[bool, dict[float, float]] = {True: {}, False: {}}

    def apply(self, kind: int, is_bid: bool, px: float, qty: float) -> None:
        side = self.sides[is_bid]
        if kind == DEPTH_CLEAR_EVENT:
            side.clear()
        elif kind in (DEPTH_EVENT, DEPTH_SNAPSHOT_EVENT):
            if qty == 0:
                side.pop(px, None)
            else:
                side[px] = qty

    def levels(self, is_bid: bool) -> list[tuple[float, float]]:
        return sorted(self.sides[is_bid].items(), reverse=is_bid)


def messages(ev: np.ndarray):
    """Rows grouped by message: the generator gives all rows of one event the same pair of timestamps."""
    brk = np.flatnonzero((np.diff(ev["exch_ts"]) != 0) | (np.diff(ev["local_ts"]) != 0)) + 1
    return np.split(np.arange(len(ev)), brk)


def replay(ev: np.ndarray, book: Book | None = None, check=None) -> Book:
    book = book or Book()
    kinds = (ev["ev"] & np.uint64(0xFF)).astype(int)
    bids = (ev["ev"] & np.uint64(BUY_EVENT)) != 0
    for rows in messages(ev):
        before = (book.levels(True), book.levels(False)) if check else None
        for r in rows:
            book.apply(kinds[r], bool(bids[r]), float(ev["px"][r]), float(ev["qty"][r]))
        if check:
            check(rows, before, book, kinds, bids)
    return book


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_short")
    synth.generate(root, seed=11, start="2024-03-05T12:00:00", duration_s=180)
    return root


@pytest.fixture(scope="module")
def hour(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth_hour")
    summary = synth.generate(root, seed=7, start="2024-01-01T00:00:00", duration_s=3600)
    return root, summary


def _day(root: Path, symbol: str) -> np.ndarray:
    (day,) = catalog.list_days(root, VENUE, symbol)
    return catalog.load_day(root, VENUE, symbol, day)


def test_same_seed_same_bytes_other_seed_other_market(tmp_path):
    args = dict(start="2024-01-01T23:59:00", duration_s=90, assets="perp,spot")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synth.generate(tmp_path / name, seed=seed, **args)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    # two symbols x (two days + meta.json), and the perp's funding table per day: the run crosses midnight
    assert len(files) == 8
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    day = catalog.load_day(tmp_path / "c", VENUE, "SYNPERP", "20240102")
    assert not np.array_equal(day, catalog.load_day(tmp_path / "a", VENUE, "SYNPERP", "20240102"))


def test_perp_alone_is_the_perp_of_the_pair(tmp_path, short):
    synth.generate(tmp_path, seed=11, start="2024-03-05T12:00:00", duration_s=180, assets="perp")
    np.testing.assert_array_equal(_day(tmp_path, "SYNPERP"), _day(short, "SYNPERP"))
    assert catalog.list_symbols(tmp_path) == ["synthetic/SYNPERP"]


@pytest.mark.parametrize("symbol", ["SYNPERP", "SYNSPOT"])
def test_event_order_flags_and_feed_latency(short, symbol):
    ev = _day(short, symbol)
    assert np.all(ev["ev"] & np.uint64(EXCH_EVENT | LOCAL_EVENT) == np.uint64(EXCH_EVENT | LOCAL_EVENT))
    assert np.all(np.diff(ev["exch_ts"]) >= 0) and np.all(np.diff(ev["local_ts"]) >= 0)
    lat = ev["local_ts"] - ev["exch_ts"]
    assert lat.min() > 0
    assert 0.5e6 < np.median(lat) < 20e6  # a few milliseconds
    kinds = ev["ev"] & np.uint64(0xFF)
    depth = kinds == DEPTH_EVENT
    assert np.all(np.diff(ev["ival"][depth]) >= 0) and ev["ival"][depth][-1] > ev["ival"][depth][0]
    trades = kinds == TRADE_EVENT
    assert np.all(np.diff(ev["ival"][trades]) == 1)  # trade ids are consecutive
    seconds = (ev["exch_ts"][-1] - ev["exch_ts"][0]) / 1e9
    if symbol == "SYNPERP":
        assert 250 < len(ev) / seconds < 700  # about 400 events/s, like the DESIGN's synthetic hour
    assert 0.5 < trades.sum() / seconds < 20  # a few trades per second


@pytest.mark.parametrize("symbol", ["SYNPERP", "SYNSPOT"])
def test_rebuilt_book_is_deep_never_crossed_and_trades_take_the_touch(short, symbol):
    ev = _day(short, symbol)
    meta = catalog.read_meta(short, VENUE, symbol)
    tick = meta["tick_size"]
    kinds0 = ev["ev"][:2] & np.uint64(0xFF)
    assert list(kinds0) == [DEPTH_CLEAR_EVENT, DEPTH_SNAPSHOT_EVENT]
    stats = {"msgs": 0, "deep": 0, "crossed": 0, "trades": 0, "spreads": []}

    def check(rows, before, book, kinds, bids):
        bid_lv, ask_lv = book.levels(True), book.levels(False)
        stats["msgs"] += 1
        if bid_lv and ask_lv:
            stats["crossed"] += bid_lv[0][0] >= ask_lv[0][0]
            stats["spreads"].append(ask_lv[0][0] - bid_lv[0][0])
        stats["deep"] += len(bid_lv) >= 20 and len(ask_lv) >= 20
        trade_rows = [r for r in rows if kinds[r] == TRADE_EVENT]
        if not trade_rows:
            return
        # A buyer takes the asks from the best one outward, a seller the bids; every level but the
        # last is used up, and the depth rows of the same message show what is left.
        taken = before[1] if bids[trade_rows[0]] else before[0]
        after = dict(ask_lv if bids[trade_rows[0]] else bid_lv)
        for k, r in enumerate(trade_rows):
            px, qty = float(ev["px"][r]), float(ev["qty"][r])
            assert bool(bids[r]) == bool(bids[trade_rows[0]])
            assert px == taken[k][0], f"trade {k} of a message at {px}, level {k} was {taken[k][0]}"
            assert qty <= taken[k][1] + 1e-12
            if k < len(trade_rows) - 1:
                assert math.isclose(qty, taken[k][1])
            left = after.get(px, 0.0)
            assert math.isclose(left, taken[k][1] - qty, abs_tol=1e-9), (px, left, taken[k][1], qty)
            stats["trades"] += 1

    replay(ev, check=check)
    assert stats["crossed"] == 0
    assert stats["deep"] >= 0.95 * stats["msgs"]
    assert stats["trades"] == int(np.sum((ev["ev"] & np.uint64(0xFF)) == TRADE_EVENT)) > 100
    spread_bps = np.array(stats["spreads"]) / np.median(ev["px"]) * 1e4
    assert np.min(spread_bps) < 1.01 * tick / np.median(ev["px"]) * 1e4  # at times one tick wide
    assert np.median(spread_bps) < 2.0  # a tight market most of the time, wide only in bursts


def test_each_day_starts_with_the_previous_days_closing_book(tmp_path):
    summary = synth.generate(tmp_path, seed=5, start="2024-02-28T23:58:30", duration_s=180)
    assert summary["symbols"]["SYNPERP"]["days"] == ["20240228", "20240229"]
    for symbol in ("SYNPERP", "SYNSPOT"):
        d1 = catalog.load_day(tmp_path, VENUE, symbol, "20240228")
        d2 = catalog.load_day(tmp_path, VENUE, symbol, "20240229")
        midnight = 1709164800 * 10**9  # 2024-02-29T00:00:00Z
        assert d1["exch_ts"].max() < midnight <= d2["exch_ts"].min()
        closing = replay(d1)
        kinds = d2["ev"] & np.uint64(0xFF)
        n_snap = int(np.argmax(~np.isin(kinds, [DEPTH_CLEAR_EVENT, DEPTH_SNAPSHOT_EVENT])))
        opening = replay(d2[:n_snap])
        assert opening.levels(True) == closing.levels(True)
        assert opening.levels(False) == closing.levels(False)
        assert len(opening.levels(True)) >= 20 and len(opening.levels(False)) >= 20
        meta = catalog.read_meta(tmp_path, VENUE, symbol)
        for day, d in (("20240228", d1), ("20240229", d2)):
            info = meta["days"][day]
            assert info["events"] == len(d)
            assert (info["first_ts"], info["last_ts"]) == (int(d["exch_ts"][0]), int(d["exch_ts"][-1]))
            assert info["counts"]["trade"] == int(np.sum(d["ev"] & np.uint64(0xFF) == TRADE_EVENT))
            assert info["quality"]["synthetic"] is True and info["quality"]["seed"] == 5


def test_meta_describes_the_instruments(short):
    perp = catalog.read_meta(short, VENUE, "SYNPERP")
    spot = catalog.read_meta(short, VENUE, "SYNSPOT")
    assert (perp["tick_size"], perp["lot_size"], perp["contract"]) == (0.1, 0.001, {"kind": "linear", "size": 1.0})
    assert (spot["tick_size"], spot["lot_size"]) == (0.01, 0.00001)
    ev = _day(short, "SYNPERP")
    ticks = ev["px"] / 0.1
    assert np.all(np.abs(ticks - np.round(ticks)) < 1e-6) and 50_000 < np.median(ev["px"]) < 70_000
    lots = ev["qty"] / 0.001
    assert np.all(np.abs(lots - np.round(lots)) < 1e-6)


def _backtest_mids(root: Path) -> np.ndarray:
    from hftbacktest import BacktestAsset, HashMapMarketDepthBacktest

    assets = []
    for symbol in ("SYNPERP", "SYNSPOT"):
        meta = catalog.read_meta(root, VENUE, symbol)
        (day,) = meta["days"]
        assets.append(
            BacktestAsset()
            .data([str(p) for p in catalog.stream_days(root, VENUE, symbol, [day])[1].paths])  # every part
            .linear_asset(1.0)
            .constant_order_latency(1_000_000, 1_000_000)
            .risk_adverse_queue_model()
            .no_partial_fill_exchange()
            .trading_value_fee_model(-0.00005, 0.0007)
            .tick_size(meta["tick_size"])
            .lot_size(meta["lot_size"])
        )
    hbt = HashMapMarketDepthBacktest(assets)
    mids = []
    while hbt.elapse(100_000_000) == 0:
        row = []
        for a in range(2):
            d = hbt.depth(a)
            row.append((d.best_bid, d.best_ask))
        mids.append(row)
    hbt.close()
    return np.array(mids)  # step x asset x (bid, ask)


@pytest.fixture(scope="module")
def hour_mids(hour) -> np.ndarray:
    return _backtest_mids(hour[0])


def test_hftbacktest_replays_an_hour(hour, hour_mids):
    _, summary = hour
    assert 1.0e6 < summary["symbols"]["SYNPERP"]["events"] < 2.5e6
    assert len(hour_mids) >= 35_000  # 100 ms steps over the hour
    assert np.isfinite(hour_mids).all()
    assert np.all(hour_mids[:, :, 0] < hour_mids[:, :, 1])


def test_perp_leads_spot_by_the_configured_lag(hour, hour_mids):
    root, _ = hour
    lag_s = catalog.read_meta(root, VENUE, "SYNSPOT")["days"]["20240101"]["quality"]["lag_behind_latent_s"]
    mid = hour_mids.mean(axis=2)
    r_perp, r_spot = np.diff(mid[:, 0]), np.diff(mid[:, 1])
    lags = np.arange(-10, 11)
    xc = [np.corrcoef(r_perp[: len(r_perp) - k], r_spot[k:])[0, 1] if k >= 0
          else np.corrcoef(r_perp[-k:], r_spot[: len(r_spot) + k])[0, 1] for k in lags]
    best = int(lags[int(np.argmax(xc))])
    assert abs(best * 0.1 - lag_s) <= 0.1, (best, xc)
    assert max(xc) > 0.2 and max(xc) > 5 * abs(xc[10])  # the peak is at the lag, not at 0
    # The basis perp - spot reverts around its mean: it never drifts away like a random walk.
    basis = mid[:, 0] - mid[:, 1]
    assert abs(basis.mean()) < 50 and basis.std() < 30


def test_bad_arguments_name_the_flag(tmp_path):
    with pytest.raises(QuotelabError, match=r"--duration '1x' is not a duration.*1h30m"):
        synth.parse_duration("1x")
    with pytest.raises(QuotelabError, match="--duration '0s' must be a positive"):
        synth.parse_duration("0s")
    assert synth.parse_duration("1h30m") == 5400 and synth.parse_duration("2d") == 172800
    assert synth.parse_duration("90") == 90
    with pytest.raises(QuotelabError, match="--assets: unknown asset.*choose from perp, spot"):
        synth.generate(tmp_path, assets="perp,future")
    with pytest.raises(QuotelabError, match="--start 'yesterday' is not an ISO date-time"):
        synth.generate(tmp_path, start="yesterday")
    assert not any(tmp_path.iterdir())


def _cli() -> list[str]:
    exe = shutil.which("quotelab", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "quotelab.cli"]


def test_cli_in_a_subprocess(tmp_path):
    out = subprocess.run(
        [*_cli(), "synth", "--catalog", str(tmp_path), "--seed", "9", "--start", "2024-05-01T10:00:00",
         "--duration", "45s", "--assets", "spot", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert list(summary["symbols"]) == ["SYNSPOT"]
    assert summary["symbols"]["SYNSPOT"]["days"] == ["20240501"]
    assert len(catalog.load_day(tmp_path, VENUE, "SYNSPOT", "20240501")) == summary["symbols"]["SYNSPOT"]["events"]

    bad = subprocess.run([*_cli(), "synth", "--catalog", str(tmp_path), "--duration", "soon"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "--duration 'soon' is not a duration" in bad.stderr
    assert "Traceback" not in bad.stderr



def test_uncompressed_synth_writes_the_same_rows_mapped(tmp_path):
    args = ["--seed", "9", "--start", "2024-05-01T10:00:00", "--duration", "45s", "--assets", "perp"]
    for compression in ("deflate", "none"):
        out = subprocess.run([*_cli(), "synth", "--catalog", str(tmp_path / compression), *args,
                              "--compression", compression], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    mapped = catalog.load_day(tmp_path / "none", VENUE, "SYNPERP", "20240501")
    assert isinstance(mapped.base, np.memmap)
    np.testing.assert_array_equal(mapped, catalog.load_day(tmp_path / "deflate", VENUE, "SYNPERP", "20240501"))
    with pytest.raises(synth.SynthError, match="unknown compression 'lz4'; use one of deflate, none"):
        synth.generate(tmp_path / "bad", duration_s=10, compression="lz4")

@pytest.mark.parametrize("symbol", ["SYNPERP", "SYNSPOT"])
def test_trades_come_in_bursts(hour, symbol):
    ev = _day(hour[0], symbol)
    aggressions = np.unique(ev["exch_ts"][(ev["ev"] & np.uint64(0xFF)) == TRADE_EVENT])
    per_second = np.bincount((aggressions - ev["exch_ts"][0]) // 10**9)
    assert 0.5 < per_second.mean() < 10
    assert per_second.var() / per_second.mean() > 1.3  # a Poisson stream would give 1
