"""``funding_rate``: point-in-time lookup and time-to-settlement scaling against a slow reference on the
shared BTC window, file errors, and the shipped strategy with a funding file written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import yaml

from quotelab.backtest import driver as D
from quotelab.backtest.engine import run_strategy
from quotelab.data import catalog as cat
from quotelab.data.assets import Asset
from quotelab.errors import ConfigError
from quotelab.research.replay import replay_component
from quotelab.strategy.registry import load_registry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def btc(real_catalog: Path) -> Asset:
    return Asset("perp", [cat.load_day(real_catalog, "binance-usdm", "BTCUSDT", "20240808")], 0.1, 0.001)


@pytest.fixture(scope="module")
def comp():
    return load_registry(entry_points=False).get("signal", "funding_rate")


def _series(origin: int, n: int = 400, seed: int = 3, with_next: bool = True) -> pd.DataFrame:
    """Rates known at random times over the window; next settlements at whole minutes, some already stale."""
    rng = np.random.default_rng(seed)
    ts = origin + rng.integers(1_000_000_000, 360_000_000_000, n)
    df = pd.DataFrame({"ts": ts, "rate": rng.normal(1e-4, 5e-5, n)})
    if with_next:
        minute = 60_000_000_000
        df["next_funding_ts"] = (ts // minute + 1) * minute - rng.integers(0, 3, n) * minute
    return df


def reference(step_ts: np.ndarray, df: pd.DataFrame, mode: str, interval_s: float, latency_s: float,
              with_next: bool) -> np.ndarray:
    """The slow way, in integer ns: the last row known by each step, then tau from the settlement schedule."""
    interval = int(interval_s * 1e9)
    known = df.assign(usable=df["ts"] + int(latency_s * 1e9)).sort_values("usable", kind="stable")
    out = np.zeros(len(step_ts))
    for k, now in enumerate(step_ts):
        rows = known[known["usable"] <= now]
        if rows.empty:
            continue
        row = rows.iloc[-1]
        rate = row["rate"] * 1e4
        if with_next:
            nxt = int(row["next_funding_ts"])
            while nxt <= now:  # a settlement already past: the next one is an interval later
                nxt += interval
        else:
            nxt = (now // interval + 1) * interval  # settlements every interval from the epoch
        frac = (nxt - now) / interval
        out[k] = {"rate": rate, "rate_x_time_to_funding": rate * frac,
                  "rate_x_time_since_funding": rate * (1 - frac)}[mode]
    return out


@pytest.mark.parametrize("mode", ["rate", "rate_x_time_to_funding", "rate_x_time_since_funding"])
@pytest.mark.parametrize("with_next", [True, False])
def test_kernel_equals_slow_reference_at_every_step(perp_day, comp, tmp_path, mode, with_next):
    btc = perp_day.asset()
    df = _series(btc.first_ts(), with_next=with_next)
    path = tmp_path / ("f.parquet" if with_next else "f.csv")
    frame = pl.from_pandas(df)
    frame.write_parquet(path) if with_next else frame.write_csv(path)
    interval = 60.0 if with_next else 90.0  # short intervals, so settlements fall inside the 6-minute window
    res = replay_component(comp, {"file": str(path), "mode": mode, "interval": f"{interval}s", "latency": "300ms"},
                           [btc])
    assert len(res.values) > 3000
    want = reference(res.timestamps, df, mode, interval, 0.3, with_next)
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-12)
    assert (want == 0).any() and np.std(want[want != 0]) > 0.1
    if mode != "rate":  # tau wraps at the settlements inside the window
        frac = want / np.where(want != 0, reference(res.timestamps, df, "rate", interval, 0.3, with_next), 1)
        assert frac.min() < 0.05 and frac.max() > 0.95


def test_rate_in_bps_and_other_column_names(perp_day, comp, tmp_path):
    btc = perp_day.asset()
    df = _series(btc.first_ts(), with_next=False)
    pl.DataFrame({"t": df["ts"].to_numpy(), "r_bps": df["rate"].to_numpy() * 1e4}).write_parquet(tmp_path / "f.parquet")
    res = replay_component(comp, {"file": str(tmp_path / "f.parquet"), "time_column": "t", "rate_column": "r_bps",
                                  "rate_unit": "bps"}, [btc])
    np.testing.assert_allclose(res.values, reference(res.timestamps, df, "rate", 8 * 3600, 0.0, False), rtol=1e-12)


def test_file_errors_name_the_file_and_the_fix(btc, comp, tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.csv: file not found; write a parquet/CSV with columns ts \(ns\)"):
        replay_component(comp, {"file": str(tmp_path / "nope.csv")}, [btc])
    pl.DataFrame({"ts": [1], "funding": [0.0]}).write_csv(tmp_path / "f.csv")
    with pytest.raises(ConfigError, match=r"has no column 'rate'; it has: ts, funding; rename it or set rate_column"):
        replay_component(comp, {"file": str(tmp_path / "f.csv")}, [btc])
    pl.DataFrame({"ts": [1], "rate": [0.0]}).write_csv(tmp_path / "g.csv")
    with pytest.raises(ConfigError, match=r"has no column 'T'"):
        replay_component(comp, {"file": str(tmp_path / "g.csv"), "next_funding_column": "T"}, [btc])
    (tmp_path / "h.csv").write_text("ts,rate\n1,nan\n")
    with pytest.raises(ConfigError, match=r"row 0 has a non-finite rate"):
        replay_component(comp, {"file": str(tmp_path / "h.csv")}, [btc])


def test_shipped_strategy_trades_within_its_limits(real_catalog, btc, tmp_path):
    doc = yaml.safe_load((REPO / "strategies" / "funding.yaml").read_text())
    strategy = tmp_path / "strategies" / "funding.yaml"
    strategy.parent.mkdir()
    strategy.write_text((REPO / "strategies" / "funding.yaml").read_text())
    spec = next(p for p in doc["forecast"] if p["kind"] == "funding_rate")
    # A small funding file for the shared window, where the strategy's relative path points: a
    # markPrice-like rate each second, drifting from 0.5 to 1.5 bp, settling at 2024-08-09 00:00 UTC.
    path = (strategy.parent / spec["params"]["file"]).resolve()
    assert path.is_relative_to(tmp_path)
    path.parent.mkdir(parents=True)
    ts = np.arange(btc.first_ts() - 1_000_000_000, btc.last_ts(), 1_000_000_000)
    settle = 1723161600 * 1_000_000_000
    pd.DataFrame({"ts": ts, "rate": np.linspace(0.5e-4, 1.5e-4, len(ts)), "next_funding_ts": settle}).to_csv(
        path, index=False)
    result = run_strategy(strategy, catalog=real_catalog)
    s = result.summary
    assert s["num_trades"] > 50 and s["quoting_steps"] > 3000
    q = doc["quoter"]["params"]
    assert np.abs(result.records[:, D.R_POSITION]).max() <= q["max_position"] + q["size"] + 1e-9
    # the funding term is there: without it the forecast would be the imbalance term alone, within 2 ticks
    assert result.records[:, D.R_FORECAST].min() < -2 * 0.1 - 1.0
