"""``precomputed_forecast``: point-in-time lookup, and a recorded signal replayed from a file trades the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from quotelab.backtest.engine import run_strategy
from quotelab.data import catalog as cat
from quotelab.data.assets import Asset
from quotelab.errors import ConfigError
from quotelab.research.replay import replay_component
from quotelab.strategy.registry import load_registry

REPO = Path(__file__).resolve().parents[1]


def _btc(real_catalog: Path) -> Asset:
    return Asset("perp", [cat.load_day(real_catalog, "binance-usdm", "BTCUSDT", "20240808")], 0.1, 0.001)


def test_lookup_uses_only_values_whose_time_has_come(perp_day, tmp_path):
    asset = perp_day.asset()
    origin = asset.first_ts()
    rng = np.random.default_rng(5)
    times = np.sort(origin + rng.integers(0, 300_000_000_000, size=500))
    values = rng.normal(size=500)
    pl.DataFrame({"t": times, "v": values}).write_parquet(tmp_path / "f.parquet")
    comp = load_registry(entry_points=False).get("signal", "precomputed_forecast")
    params = comp.make_params({"file": str(tmp_path / "f.parquet"), "time_column": "t", "value_column": "v",
                               "latency": "250ms"})
    res = replay_component(comp, params, [asset])
    # the slow way: for each step, the last value whose time + latency is at or before the step
    usable = times + 250_000_000
    idx = np.searchsorted(usable, res.timestamps, side="right") - 1
    expected = np.where(idx >= 0, values[np.clip(idx, 0, None)], 0.0)
    np.testing.assert_array_equal(res.values, expected)
    assert (idx < 0).any() and (idx >= 0).any()


def test_recorded_signal_replayed_from_a_file_trades_exactly_like_the_kernel(real_catalog, tmp_path):
    comp = load_registry(entry_points=False).get("signal", "book_imbalance")
    rec = replay_component(comp, {}, [_btc(real_catalog)])
    pl.DataFrame({"usable_ts": rec.timestamps, "value": rec.values}).write_parquet(tmp_path / "imb.parquet")
    seed = yaml.safe_load((REPO / "strategies" / "seed_market_maker.yaml").read_text())
    seed["data"]["catalog"] = str(real_catalog)
    pre = yaml.safe_load((REPO / "strategies" / "precomputed_forecast.yaml").read_text())
    pre["data"]["catalog"] = str(real_catalog)
    pre["forecast"][0]["params"]["file"] = "imb.parquet"  # relative: from the strategy file's folder
    for name, doc in (("seed.yaml", seed), ("pre.yaml", pre)):
        (tmp_path / name).write_text(yaml.safe_dump(doc))
    a = run_strategy(tmp_path / "seed.yaml").summary
    b = run_strategy(tmp_path / "pre.yaml").summary
    assert a["num_trades"] > 50
    assert [a[k] for k in ("num_trades", "position", "balance", "fee")] == \
        [b[k] for k in ("num_trades", "position", "balance", "fee")]


def test_missing_file_or_column_is_named(real_catalog, tmp_path):
    comp = load_registry(entry_points=False).get("signal", "precomputed_forecast")
    with pytest.raises(ConfigError, match=r"nope\.parquet: file not found"):
        replay_component(comp, {"file": str(tmp_path / "nope.parquet")}, [_btc(real_catalog)])
    pl.DataFrame({"ts": [1], "value": [0.0]}).write_csv(tmp_path / "f.csv")
    with pytest.raises(ConfigError, match=r"has no column 'usable_ts'; it has: ts, value"):
        replay_component(comp, {"file": str(tmp_path / "f.csv")}, [_btc(real_catalog)])


def test_before_the_first_value_and_on_nan_a_fallback_or_a_skip(real_catalog, tmp_path):
    # A walk-forward predictions file: NaN over the first fold's training span, then values.
    asset = _btc(real_catalog)
    comp = load_registry(entry_points=False).get("signal", "book_imbalance")
    rec = replay_component(comp, {}, [asset])
    values = rec.values.copy()
    values[: len(values) // 4] = np.nan
    pl.DataFrame({"usable_ts": rec.timestamps + 50_000_000, "value": values}).write_parquet(tmp_path / "p.parquet")
    pre = load_registry(entry_points=False).get("signal", "precomputed_forecast")
    got = {}
    for missing in ("fallback", "skip"):
        params = pre.make_params({"file": str(tmp_path / "p.parquet"), "missing": missing, "fallback": 0.25})
        got[missing] = replay_component(pre, params, [asset]).values
    # the value in force at each step: the last one usable at or before it, written the slow way
    idx = np.searchsorted(rec.timestamps + 50_000_000, rec.timestamps, side="right") - 1
    want = np.where(idx >= 0, values[np.clip(idx, 0, None)], np.nan)
    missing = np.isnan(want)
    assert missing[: len(values) // 4].all() and not missing[len(values) // 4 + 1:].any()
    np.testing.assert_array_equal(got["fallback"], np.where(missing, 0.25, want))
    np.testing.assert_array_equal(got["skip"][~missing], want[~missing])
    assert np.isnan(got["skip"][missing]).all()

    # the shipped example on such a file quotes from the first step to the last (it stopped at step 1)
    doc = yaml.safe_load((REPO / "strategies" / "precomputed_forecast.yaml").read_text())
    doc["data"]["catalog"] = str(real_catalog)
    doc["forecast"][0]["params"]["file"] = str(tmp_path / "p.parquet")
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(doc))
    s = run_strategy(tmp_path / "pre.yaml").summary
    assert s["quoting_steps"] == s["steps"] > 3000 and s["num_trades"] > 0
    doc["forecast"][0]["params"]["missing"] = "skip"
    doc["engine"]["on_nonfinite"] = "skip"
    (tmp_path / "skip.yaml").write_text(yaml.safe_dump(doc))
    s = run_strategy(tmp_path / "skip.yaml").summary
    assert s["nonfinite_skipped"] == int(missing.sum()) and s["quoting_steps"] == s["steps"] - int(missing.sum())
