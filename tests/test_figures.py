"""A run's figures: PnL in one currency, per traded notional, the per-day table, honest statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from quotelab.backtest import driver as D
from quotelab.backtest.engine import compute_stats, run_strategy
from quotelab.backtest.pnl import currency
from quotelab.data import synth
from quotelab.data.assets import Asset
from quotelab.timeunits import DAY_NS

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "strategies" / "seed_market_maker.yaml"


def _equity(rec: np.ndarray, inverse: bool, cs: float) -> np.ndarray:
    q, m, b, f = (rec[:, c] for c in (D.R_POSITION, D.R_MID, D.R_BALANCE, D.R_FEE))
    return -b - q * cs / m - f if inverse else b + q * m * cs - f


def test_per_day_table_against_equity_differences_across_midnight(tmp_path):
    synth.generate(tmp_path, start="2024-01-01T23:57:00", duration_s=360, assets="perp", funding_interval_s=60)
    doc = {
        "name": "midnight", "data": {"catalog": str(tmp_path), "quote": "perp", "assets": {
            "perp": {"venue": "synthetic", "symbol": "SYNPERP", "dates": [20240101, 20240102]}}},
        "fair_value": [{"kind": "mid"}],
        "risk": [{"kind": "inventory_skew", "params": {"risk_aversion": 0.1, "position_unit": 0.01,
                                                       "volatility": "10ticks"}}],
        "quoter": {"kind": "fixed_spread", "params": {"half_spread": "3ticks", "size": 0.01, "max_position": 0.1}},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = run_strategy(path)
    s, ts, rec = res.summary, res.record_ts, res.records
    days = s["days"]
    assert [d["day"] for d in days] == ["2024-01-01", "2024-01-02"]
    assert len(s["settlements"]) >= 4 and s["funding"] != 0.0
    # a second way: equity, volume and fills at each day's last record, the last day closed by the summary
    eq = _equity(rec, False, 1.0)
    last = [int(np.flatnonzero(ts // DAY_NS == ts[0] // DAY_NS)[-1]), len(ts) - 1]
    ends = [eq[last[0]], s["equity"]]
    assert days[0]["pnl"] == pytest.approx(ends[0], abs=1e-9)
    assert days[1]["pnl"] == pytest.approx(ends[1] - ends[0], abs=1e-9)
    assert days[0]["volume"] == pytest.approx(rec[last[0], D.R_VOLUME])
    assert days[1]["volume"] == pytest.approx(s["trading_volume"] - rec[last[0], D.R_VOLUME])
    assert days[0]["trades"] + days[1]["trades"] == s["num_trades"]
    assert days[0]["trades"] == rec[last[0], D.R_NUM_TRADES]
    assert days[0]["max_abs_position"] == np.abs(rec[: last[0] + 1, D.R_POSITION]).max()
    for d in days:
        assert d["pnl"] == pytest.approx(d["spread"] + d["inventory"] + d["fees"] + d["funding"], abs=1e-12)
    assert sum(d["funding"] for d in days) == pytest.approx(s["funding"], abs=1e-12)
    day_of = [t // DAY_NS for t in (x["ts"] for x in s["settlements"])]
    assert days[0]["funding"] == pytest.approx(sum(x["amount"] for x, d in zip(s["settlements"], day_of,
                                                                                  strict=True) if d == ts[0] // DAY_NS))
    assert s["pnl_unit"] == "USD" and s["pnl_usd"] == s["pnl"]


def test_inverse_pnl_in_coin_and_usd_and_short_runs_are_not_annualised(real_catalog, tmp_path):
    doc = yaml.safe_load(SEED.read_text())
    doc["data"]["catalog"] = str(real_catalog)
    doc["data"]["assets"]["perp"].update(contract="inverse", contract_size=100.0)
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(doc))
    s = run_strategy(path, out_dir=tmp_path / "out").summary
    assert s["pnl_unit"] == "BTC" and s["pnl"] == s["equity"]
    assert s["pnl_usd"] == pytest.approx(s["pnl"] * s["last_mid"], rel=1e-12)
    assert s["traded_notional_usd"] == pytest.approx(s["trading_volume"] * 100.0)
    assert s["pnl_bps_of_notional"] == pytest.approx(s["pnl_usd"] / s["traded_notional_usd"] * 1e4)
    for key in ("SR", "Sortino", "AnnualRet", "DailyNumberOfTrades"):
        assert key not in s["stats"]
    assert s["stats"]["annualised"].startswith("not reported: the run covers 0.1")
    assert "MaxDrawdown" in s["stats"]


def test_annualised_figures_from_a_day_up_say_how():
    rng = np.random.default_rng(1)
    n = 2 * 86_400 // 60
    ts = 1_700_000_000 * 10**9 + np.arange(n, dtype=np.int64) * 60 * 10**9
    rec = np.zeros((n, D.R_WIDTH))
    rec[:, D.R_MID] = 100.0 + np.cumsum(rng.normal(0, 0.1, n))
    rec[:, D.R_POSITION] = rng.integers(-3, 4, n)
    rec[:, D.R_BALANCE] = -np.cumsum(np.diff(rec[:, D.R_POSITION], prepend=0.0) * rec[:, D.R_MID])
    rec[:, D.R_NUM_TRADES] = np.arange(n)
    feed = Asset("perp", [], 0.01, 1.0, venue="v", symbol="XUSDT")
    stats = compute_stats(feed, ts, rec)
    assert {"SR", "Sortino", "AnnualRet"} <= set(stats)
    assert stats["annualised"].startswith("over 2.00 days of records") and "sqrt(86,400 x 365)" in stats["annualised"]


@pytest.mark.parametrize(("symbol", "inverse", "unit"), [
    ("BTCUSDT", False, "USDT"), ("BTCUSD_PERP", True, "BTC"), ("ETHUSD_PERP", True, "ETH"),
    ("BTC-USDT-SWAP", False, "USDT"), ("SYNPERP", False, "USD"), ("BTCUSD", True, "BTC"),
])
def test_currency_of_a_symbol(symbol, inverse, unit):
    assert currency(symbol, inverse) == unit


@pytest.mark.parametrize("inverse", [False, True])
def test_stats_resampled_a_chunk_at_a_time_equal_hftbacktests_resample(monkeypatch, inverse):
    from quotelab import spool
    from quotelab.backtest import engine

    rng = np.random.default_rng(3)
    gaps = rng.uniform(0.05, 2.5, 80_000)  # several records in some seconds, none in others: 1.2 days
    ts = 1_700_000_000 * 10**9 + np.cumsum(gaps * 1e9).astype(np.int64)
    n = len(ts)
    rec = np.zeros((n, D.R_WIDTH))
    rec[:, D.R_MID] = 100.0 + np.cumsum(rng.normal(0, 0.05, n))
    rec[:, D.R_POSITION] = np.cumsum(rng.integers(-1, 2, n)) * 0.01
    rec[:, D.R_BALANCE] = -np.cumsum(np.diff(rec[:, D.R_POSITION], prepend=0.0) * rec[:, D.R_MID])
    rec[:, D.R_FEE] = np.cumsum(rng.uniform(0, 1e-3, n))
    rec[:, D.R_NUM_TRADES] = np.cumsum(rng.integers(0, 3, n))
    rec[:, D.R_VOLUME] = np.cumsum(rng.uniform(0, 0.02, n))
    rec[:, D.R_VALUE] = np.cumsum(rng.uniform(0, 2.0, n))
    feed = Asset("perp", [], 0.01, 1.0, 10.0 if inverse else 1.0, inverse, venue="v",
                 symbol="XUSD_PERP" if inverse else "XUSDT")
    monkeypatch.setattr(spool, "CHUNK", 777)  # windows of a second cut by chunk ends, many times
    got = compute_stats(feed, ts, rec)
    assert len(engine.per_second(ts, rec)) == len(np.unique(ts // 10**9))  # a row a second, chunks or not
    monkeypatch.setattr(engine, "per_second", engine.hbt_records)  # the whole records, resampled by hftbacktest
    want = compute_stats(feed, ts, rec)
    assert {"SR", "Sortino", "MaxDrawdown", "DailyTradingValue"} <= set(want) and "error" not in want
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v), k
