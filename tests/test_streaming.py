"""Days stored as parts and replayed a file at a time give what the whole days held in memory give."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hftbacktest.types import event_dtype

from quotelab import layout as L
from quotelab.data import catalog as cat
from quotelab.data.synth import generate
from quotelab.timeunits import DAY_NS

REPO = Path(__file__).resolve().parents[1]
FINAL = ("num_trades", "position", "trading_volume")


@pytest.fixture(scope="module")
def two_catalogs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The synthetic market over midnight (two days), as one file a day and as parts of 20 k rows."""
    whole = tmp_path_factory.mktemp("whole")
    generate(whole, start="2024-01-01T23:57:00", duration_s=360.0, compression="deflate")
    parts = tmp_path_factory.mktemp("parts")
    for symbol in ("SYNPERP", "SYNSPOT"):
        meta = cat.read_meta(whole, "synthetic", symbol)
        with cat.Staging(parts) as stage:
            for i, day in enumerate(sorted(meta["days"])):
                # a mixed catalog: parts deflated on one day, stored (memory-mapped) on the other
                stage.write_day("synthetic", symbol, day, cat.load_day(whole, "synthetic", symbol, day),
                                compression=("deflate", "none")[i % 2], part_rows=20_000)
            drop = ("crc32", "bytes", "parts", "part_crc32", "part_bytes")
            stage.commit("synthetic", symbol, {k: meta[k] for k in ("tick_size", "lot_size", "contract")},
                         {d: {k: v for k, v in e.items() if k not in drop} for d, e in meta["days"].items()})
        for day in meta["days"]:  # the funding tables meta.json counts (the perp's)
            if cat.funding_path(whole, "synthetic", symbol, day).exists():
                shutil.copy(cat.funding_path(whole, "synthetic", symbol, day),
                            cat.funding_path(parts, "synthetic", symbol, day))
    return whole, parts


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    for ra, rb in zip(got, want, strict=True):
        assert ra.keys() == rb.keys()
        for k, v in rb.items():
            if isinstance(v, float):
                assert ra[k] == pytest.approx(v, rel=1e-12, abs=1e-15, nan_ok=True), k
            else:
                assert ra[k] == v, k


def test_parts_round_trip_and_are_plain_npz(two_catalogs):
    whole, parts = two_catalogs
    _, files = cat.stream_days(parts, "synthetic", "SYNPERP", ["20240101"])
    files = list(files.paths)
    assert cat.read_meta(parts, "synthetic", "SYNPERP")["days"]["20240101"]["parts"] == len(files)
    assert len(files) > 3 and [f.name for f in files[:3]] == ["20240101.npz", "20240101.1.npz", "20240101.2.npz"]
    joined = np.concatenate([np.load(f)["data"] for f in files])  # numpy reads each part as it is
    np.testing.assert_array_equal(joined, cat.load_day(whole, "synthetic", "SYNPERP", "20240101"))
    assert all(cat.count_rows(f) == 20_000 for f in files[:-1])
    # A shorter rewrite leaves no stale part behind.
    cat.write_day(parts / "again", "synthetic", "X", "20240101", joined, part_rows=20_000)
    cat.write_day(parts / "again", "synthetic", "X", "20240101", joined[:30_000], part_rows=20_000)
    assert len(cat.parts_of(cat.day_path(parts / "again", "synthetic", "X", "20240101"))) == 2


def test_streamed_multi_part_run_fills_as_the_preloaded_whole_days(two_catalogs, tmp_path, monkeypatch):
    import polars as pl

    from quotelab import spool
    from quotelab.backtest import engine
    from quotelab.backtest.engine import run_strategy

    whole, parts = two_catalogs
    doc = yaml.safe_load((REPO / "strategies" / "demo_synthetic.yaml").read_text())
    for asset in doc["data"]["assets"].values():
        asset["dates"] = [20240101, 20240102]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    preloaded = run_strategy(path, catalog=whole, preload=True)
    # The driver pauses and resumes, and its records go through the spool file, many times over.
    monkeypatch.setattr(engine, "REC_CHUNK", 500)
    monkeypatch.setattr(engine, "PAUSE_STEPS", 700)
    monkeypatch.setattr(engine, "FIGURE_CHUNK", 600)  # the per-day table a chunk of records at a time
    monkeypatch.setattr(spool, "CHUNK", 900)  # series.parquet and the stats a chunk of records at a time
    seen: list[int] = []
    streamed = run_strategy(path, catalog=parts, on_progress=seen.append, out_dir=tmp_path / "out")
    series = pl.read_parquet(tmp_path / "out" / "series.parquet")
    assert series.columns == ["timestamp", *engine.SERIES_COLUMNS] and len(streamed.record_ts) > 3 * 900
    np.testing.assert_array_equal(series["timestamp"].to_numpy(), streamed.record_ts)
    np.testing.assert_array_equal(series.drop("timestamp").to_numpy(), streamed.records)
    assert "MaxDrawdown" in streamed.summary["stats"]
    assert len(seen) > len(preloaded.record_ts) // 500 and seen == sorted(seen)
    assert isinstance(streamed.records.base, np.memmap) or isinstance(streamed.records, np.memmap)
    assert preloaded.summary["num_trades"] > 20  # it trades, on both days
    assert len(set((preloaded.record_ts // DAY_NS).tolist())) == 2
    assert {k: streamed.summary[k] for k in FINAL} == {k: preloaded.summary[k] for k in FINAL}
    np.testing.assert_array_equal(streamed.record_ts, preloaded.record_ts)
    days = [streamed.summary["days"], preloaded.summary["days"]]
    assert [d["day"] for d in days[0]] == [d["day"] for d in days[1]] == ["2024-01-01", "2024-01-02"]
    for a, b in zip(*days, strict=True):
        assert a["trades"] == b["trades"] and a["trades"] > 0
        np.testing.assert_allclose([a[k] for k in ("pnl", "spread", "inventory", "volume", "max_abs_position")],
                                   [b[k] for k in ("pnl", "spread", "inventory", "volume", "max_abs_position")],
                                   rtol=1e-9, atol=1e-9)
    # several orders filled by one event are summed in an order that varies (README): last-bit noise
    np.testing.assert_allclose(streamed.records, preloaded.records, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_streamed_replay_equals_the_preloaded_replay(two_catalogs):
    from quotelab.data.assets import load_assets
    from quotelab.research.replay import replay_component
    from quotelab.strategy.config import DataSection
    from quotelab.strategy.registry import load_registry

    whole, parts = two_catalogs
    section = DataSection.model_validate({"quote": "perp", "assets": {
        "perp": {"venue": "synthetic", "symbol": "SYNPERP", "dates": [20240101, 20240102]},
        "spot": {"venue": "synthetic", "symbol": "SYNSPOT", "dates": [20240101, 20240102]}}})
    results = []
    for root, preload in ((whole, True), (parts, False)):
        assets = load_assets(section, REPO, str, root, preload=preload)
        assert isinstance(assets[0].events, list if preload else cat.EventFiles)
        component = load_registry(entry_points=False).get("fair_value", "weighted_mid")
        results.append(replay_component(component, {"asset": "spot"}, assets, n_levels=3))
    a, b = results
    assert len(a.timestamps) > 2000
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.n_trades, b.n_trades)


def test_empty_day_is_one_empty_part(tmp_path):
    path = cat.write_day(tmp_path, "synthetic", "X", "20240101", np.zeros(0, event_dtype), part_rows=10)
    assert cat.parts_of(path) == [path] and len(cat.load_events(path)) == 0


def test_replay_records_spooled_in_chunks_equal_one_chunk(two_catalogs, monkeypatch):
    from quotelab import spool
    from quotelab.data.assets import load_assets
    from quotelab.research.replay import replay_component
    from quotelab.strategy.config import DataSection
    from quotelab.strategy.registry import load_registry

    _, parts = two_catalogs
    section = DataSection.model_validate({"quote": "perp", "assets": {
        "perp": {"venue": "synthetic", "symbol": "SYNPERP", "dates": [20240101, 20240102]}}})
    assets = load_assets(section, REPO, str, parts)
    component = load_registry(entry_points=False).get("fair_value", "weighted_mid")
    whole = replay_component(component, {}, assets, n_levels=3, keep_out=True, keep_view=True)
    assert not isinstance(whole.values, np.memmap)  # a short replay stays in memory
    monkeypatch.setattr(spool, "CHUNK", 500)  # the records fill and go to the spool file many times
    spooled = replay_component(component, {}, assets, n_levels=3, keep_out=True, keep_view=True)
    assert len(whole.timestamps) > 6 * 500 and isinstance(spooled.values, np.memmap)
    for got, want in zip((spooled.timestamps, spooled.values, spooled.n_trades, spooled.outs, spooled.views),
                         (whole.timestamps, whole.values, whole.n_trades, whole.outs, whole.views), strict=True):
        np.testing.assert_array_equal(got, want)
    assert (spooled.grid_steps, spooled.trades_dropped) == (whole.grid_steps, whole.trades_dropped)


def test_rank_correlation_in_chunks_is_the_in_memory_ic(monkeypatch):
    from quotelab import spool
    from quotelab.research.evaluate import information_coefficient, rank_correlation

    rng = np.random.default_rng(7)
    x = np.round(rng.normal(size=20_000), 1)  # many ties, as mid changes have
    y = np.round(0.3 * x + rng.normal(size=20_000), 2)
    monkeypatch.setattr(spool, "CHUNK", 500)  # sorted copies in scratch files, ranks 500 at a time
    assert isinstance(spool.scratch(len(x)), np.memmap)
    assert rank_correlation(x, y) == pytest.approx(information_coefficient(x, y), rel=1e-12)
    assert np.isnan(rank_correlation(np.ones(5000), y[:5000])) and np.isnan(rank_correlation(x[:2], y[:2]))


def test_streamed_evaluation_scores_as_the_whole_series(two_catalogs, tmp_path, monkeypatch):
    """Two days of parts, scored a chunk of steps at a time with the records spooled, give the table
    of the whole days scored at once (every series one chunk, in memory)."""
    from quotelab import spool
    from quotelab.research.evaluate import evaluate

    whole, parts = two_catalogs
    doc = {"name": "s", "data": {"quote": "perp", "assets": {
        "perp": {"venue": "synthetic", "symbol": "SYNPERP", "dates": [20240101, 20240102]}}},
        "step": "100ms", "horizons": ["1s", "10s"], "plots": False,
        "estimators": [{"name": "mid", "fair_value": [{"kind": "mid"}]},
                       {"name": "wmid+imb", "fair_value": [{"kind": "weighted_mid"}],
                        "forecast": [{"kind": "book_imbalance", "alpha": "2ticks",
                                      "params": {"weights": [0.7, 0.3]}}]}]}
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(doc))
    one = evaluate(path, catalog=whole)
    monkeypatch.setattr(spool, "CHUNK", 500)
    streamed = evaluate(path, catalog=parts)
    for a, b in ((streamed.rows, one.rows), (streamed.bias, one.bias), (streamed.conditional, one.conditional)):
        assert len(a) == len(b) > 0
        _assert_same_rows(a, b)
    assert sum(r["n"] for r in one.rows if r["horizon"] == "1s") > 6 * 500
    assert all(np.isfinite(r["ic"]) for r in one.rows if r["horizon"] == "1s" and r["estimator"] != "mid")
    assert np.isfinite(next(r["forecast_ic"] for r in one.rows if "forecast_ic" in r))


def _naive_tape(ts: np.ndarray, px: np.ndarray, qty: np.ndarray, seller: np.ndarray) -> tuple[np.ndarray, ...]:
    """The trade tape of the whole trades at once: sorted by time then side, one row per (time, side)."""
    order = np.lexsort((seller, ts))
    ts, px, qty, seller = ts[order], px[order], qty[order], seller[order]
    start = np.flatnonzero(np.r_[True, (np.diff(ts) != 0) | (np.diff(seller) != 0)])
    return ts[start], px[start], np.add.reduceat(qty, start), np.where(seller[start], -1.0, 1.0)


def _book_and_trade(view, trades, state, params, out):
    out[0], out[1], out[2] = view[0, L.BEST_BID], view[0, L.ASK_QTY], view[0, L.BID_PX + 1]
    out[3], out[4] = view[0, L.TIME], view[0, L.STEP_SECONDS]
    state[0] += trades[0, 0, L.TR_QTY] * trades[0, 0, L.TR_SIDE]  # flow state carried across the chunks
    out[5] = state[0]
    return 0.0


@pytest.mark.parametrize("local", [False, True])
def test_trade_tape_and_its_replay_in_chunks_equal_the_whole_tape(two_catalogs, monkeypatch, local):
    """score: trades' tape, aggregated and replayed 37 trades at a time (chunks cut inside days and
    next to groups of equal times) over two days of parts, equals the whole tape built at once
    and replayed in one chunk."""
    from hftbacktest.types import EXCH_EVENT, LOCAL_EVENT
    from numba import njit

    from quotelab import spool
    from quotelab.data.assets import Asset
    from quotelab.research.replay import aggregate_trades, prepare_exchange, replay_trades

    whole, parts = two_catalogs
    kernel = njit(_book_and_trade)

    def run(catalog: Path) -> tuple[object, np.ndarray, object]:
        _, days = cat.stream_days(catalog, "synthetic", "SYNPERP", ["20240101", "20240102"])
        data = prepare_exchange([Asset("perp", days, 0.1, 0.001)], LOCAL_EVENT if local else EXCH_EVENT)
        tape = aggregate_trades(data)
        return data, tape, replay_trades(data, tape, kernel, np.zeros(0), np.zeros(1), n_levels=2,
                                         out_columns=range(6), strict=local)

    data, one_tape, one = run(whole)
    ts, px, qty, seller = (np.asarray(x) for x in data.rows[0].trades)
    assert np.all(np.diff(ts) >= 0) and np.any(np.diff(ts) == 0)  # in clock order, with groups to aggregate
    naive = _naive_tape(ts, px, qty, seller)
    assert len(naive[0]) < len(ts)
    for got, want in zip((one_tape.ts, one_tape.px, one_tape.qty, one_tape.side), naive, strict=True):
        np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(spool, "CHUNK", 37)
    _, tape, chunked = run(parts)
    assert len(tape.ts) > 20 * 37 and isinstance(chunked, np.memmap)
    for got, want in zip((tape.ts, tape.px, tape.qty, tape.side), naive, strict=True):
        np.testing.assert_array_equal(got, want)
    assert tape.raw_trades == one_tape.raw_trades == len(ts)
    np.testing.assert_array_equal(chunked, one)
    assert np.isfinite(one[:, 0]).mean() > 0.9 and np.ptp(one[:, 5]) > 0


def test_streamed_trades_evaluation_scores_as_the_whole_tape(two_catalogs, tmp_path, monkeypatch):
    """score: trades over two days of parts, 37 trades at a time, gives the table of the whole days
    scored in one chunk."""
    from quotelab import spool
    from quotelab.research.evaluate import evaluate

    whole, parts = two_catalogs
    doc = {"name": "t", "score": "trades", "data": {"quote": "perp", "assets": {
        "perp": {"venue": "synthetic", "symbol": "SYNPERP", "dates": [20240101, 20240102]}}},
        "estimators": [{"name": "mid", "fair_value": [{"kind": "mid"}]},
                       {"name": "wmid+flow", "fair_value": [{"kind": "weighted_mid"}],
                        "forecast": [{"kind": "trade_flow_imbalance", "alpha": "1ticks", "params": {"alpha": 0.1}}]}]}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc))
    one = evaluate(path, catalog=whole)
    monkeypatch.setattr(spool, "CHUNK", 37)
    streamed = evaluate(path, catalog=parts)
    assert one.summary["trades_scored"] == streamed.summary["trades_scored"] > 20 * 37
    assert len(one.rows) == len(streamed.rows) == 2
    _assert_same_rows(streamed.rows, one.rows)
    assert one.rows[0]["sse"] != one.rows[1]["sse"]
