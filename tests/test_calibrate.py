"""``quotelab calibrate``: kernels against naive references on real data and on the synthetic market, a
planted law recovered from a synthetic market through the CLI, and the quoters' online fit agreeing with
the offline one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from numba import njit
from reference_impls import arrival_depths, local_trades, log_linear_fit

from quotelab import layout as L
from quotelab.data import catalog as cat
from quotelab.data.assets import Asset
from quotelab.kernels.arrival_fit import FIT_MAX_WINDOW, arrival_fit_nb, fit_state
from quotelab.kernels.ewma import sigma_ticks_nb
from quotelab.research.calibrate import (
    CalibrationError,
    calibrate,
    calibration_probe_nb,
    mid_change_moments_nb,
    reached_counts_nb,
)
from quotelab.research.replay import replay

BTC = "binance-usdm/BTCUSDT"
DAY = "20240808"
MAX_TICKS = 35


def _day(catalog: Path, asset: str = BTC, day: str = DAY) -> tuple[np.ndarray, Asset]:
    ev = cat.load_day(catalog, *asset.split("/"), day)
    return ev, Asset("btc", [ev], 0.1, 0.001)


@pytest.fixture(params=["real", "synthetic"])
def one_day(request) -> tuple[Path, str, str]:
    """(catalog, venue/symbol, day): the shared BTCUSDT day, or the synthetic perp's (its tick is 0.1 too)."""
    if request.param == "real":
        return request.getfixturevalue("real_catalog"), BTC, DAY
    return request.getfixturevalue("synthetic_catalog"), "synthetic/SYNPERP", "20240101"


def test_kernels_equal_naive_references(one_day):
    catalog, asset, day = one_day
    ev, a = _day(catalog, asset, day)
    res = replay([a], calibration_probe_nb, np.zeros(1), np.array([np.nan]), keep_out=True, keep_view=True,
                 out_columns=[L.COMPONENTS, L.COMPONENTS + 1])
    mid_ticks = (res.views[:, 0, L.BEST_BID] + res.views[:, 0, L.BEST_ASK]) / 2 / 0.1
    np.testing.assert_allclose(res.values, mid_ticks, rtol=1e-12)
    hb, hs = arrival_depths(local_trades(ev), res.timestamps, mid_ticks, 0.1, res.timestamps[0] - 100_000_000)
    np.testing.assert_array_equal(res.outs[:, 0], hb)
    np.testing.assert_array_equal(res.outs[:, 1], hs)
    assert (hb > 1).sum() > 150 and (hs > 1).sum() > 150  # steps whose trades went past the touch
    for depth in (hb, hs, np.maximum(hb, hs)):
        naive = np.array([(depth > j).sum() for j in range(1, 2 * MAX_TICKS + 1)], dtype=float)
        np.testing.assert_array_equal(reached_counts_nb(depth, 2 * MAX_TICKS), naive)
    # the table's figures, recomputed the plain numpy way
    rows = {r["side"]: r for r in calibrate(catalog, [asset], [day], max_ticks=MAX_TICKS).rows}
    seconds = len(res.values) * 0.1
    for side, depth in (("buy", hb), ("sell", hs), ("pooled", np.maximum(hb, hs))):
        want = log_linear_fit(depth, MAX_TICKS, seconds)
        got = rows[side]
        np.testing.assert_allclose([got["A"], got["k"], got["r2"]], want[:3], rtol=1e-9)
        assert got["points"] == want[3]
    sigma = np.std(np.diff(mid_ticks), ddof=1) / np.sqrt(0.1)
    assert rows["pooled"]["sigma"] == pytest.approx(sigma, rel=1e-9)
    n, s, ss = mid_change_moments_nb(np.array([1.0, np.nan, 2.0, 4.0, 3.0]))
    assert (n, s, ss) == (2, 1.0, 5.0)  # only changes between finite neighbours count


@pytest.mark.slow
def test_recovers_a_planted_arrival_law_through_the_cli(tmp_path):
    # Buy side A=4/s k=0.3/tick, sell side A=2.5/s k=0.5/tick, σ = √(0.2/0.1) ticks/√s, two hours.
    # Over three seeds the estimates were within 2 % of the truth; the bounds allow 5 % (A), 4 % (k), 2 % (σ).
    root = tmp_path / "cat"
    cli = [sys.executable, "-m", "quotelab.cli"]
    subprocess.run([*cli, "synth", "--catalog", str(root), "--arrival", "4,0.3,2.5,0.5", "--duration", "2h",
                    "--seed", "3"], check=True, capture_output=True, text=True)
    out = tmp_path / "out"
    proc = subprocess.run([*cli, "calibrate", "--catalog", str(root), "--asset", "synthetic/SYNARRIVAL",
                           "--max-ticks", "6", "--out", str(out), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["day"], r["side"]): r for r in json.loads(proc.stdout)}
    for side, (a, k) in (("buy", (4.0, 0.3)), ("sell", (2.5, 0.5))):
        r = rows[("all", side)]
        assert r["A"] == pytest.approx(a, rel=0.05) and r["k"] == pytest.approx(k, rel=0.04), r
        assert r["r2"] > 0.99 and r["points"] == 12
    assert rows[("all", "pooled")]["sigma"] == pytest.approx(np.sqrt(2.0), rel=0.02)
    assert {p.name for p in out.iterdir()} >= {"calibration.parquet", "calibration.csv", "params.yaml",
                                               "fit_synthetic_SYNARRIVAL_all.png"}
    block = yaml.safe_load((out / "params.yaml").read_text())["synthetic/SYNARRIVAL"]
    pooled = rows[("all", "pooled")]
    assert block == {"k": round(pooled["k"], 6), "arrival_rate": round(pooled["A"], 6),
                     "volatility": round(pooled["sigma"], 6)}


@njit(inline="always")
def _online_nb(view, trades, state, params, out):
    fa, fk = arrival_fit_nb(view, trades, 0, state[3:], params[0], params[1])
    out[L.COMPONENTS] = fk
    out[L.COMPONENTS + 1] = sigma_ticks_nb(view, 0, state[:3], params[2], params[3])
    return fa


def test_the_quoters_online_fit_agrees_with_the_offline_one(one_day):
    """A window covering the whole day gives the offline day fit to 1e-9 (the same measurement, two code
    paths). The online σ is an EWMA (60 s half-life) of the squared changes from a prior of 10 ticks/√s:
    once it has forgotten the prior (after 2 minutes) its RMS is within 10 % of the day's σ (measured 4 %)."""
    catalog, asset, day = one_day
    _, a = _day(catalog, asset, day)
    rows = {r["side"]: r for r in calibrate(catalog, [asset], [day], max_ticks=MAX_TICKS).rows}
    offline = rows["pooled"]
    state = np.concatenate([[np.nan, 0.0, 0.0], fit_state()])
    prior = 10.0
    res = replay([a], _online_nb, np.array([FIT_MAX_WINDOW, MAX_TICKS, prior, 60.0]), state, keep_out=True,
                 out_columns=[L.COMPONENTS, L.COMPONENTS + 1])
    assert len(res.values) == offline["steps"] < FIT_MAX_WINDOW
    assert res.values[-1] == pytest.approx(offline["A"], rel=1e-9)
    assert res.outs[-1, 0] == pytest.approx(offline["k"], rel=1e-9)
    online_sigma = np.sqrt(np.mean(res.outs[1200:, 1] ** 2))
    assert online_sigma == pytest.approx(offline["sigma"], rel=0.10)


def test_a_missing_day_is_named(real_catalog):
    with pytest.raises(CalibrationError, match=r"binance-usdm/BTCUSDT: no catalog day 20240101 .*it holds 20240808"):
        calibrate(real_catalog, [BTC], ["20240101"])


def test_a_day_streamed_and_counted_in_chunks_measures_as_the_loaded_day(real_catalog, monkeypatch):
    from quotelab import spool
    from quotelab.research.calibrate import measure_day

    ev, _ = _day(real_catalog)
    whole = measure_day(ev, 0.1, 0.001, 0.1, MAX_TICKS)
    monkeypatch.setattr(spool, "CHUNK", 300)  # probes spooled and counted 300 steps at a time
    parts = cat.stream_days(real_catalog, "binance-usdm", "BTCUSDT", [DAY])[1]
    got = measure_day(parts, 0.1, 0.001, 0.1, MAX_TICKS)
    assert got.steps == whole.steps > 10 * 300 and got.trades == whole.trades > 0
    for side in ("buy", "sell", "pooled"):
        np.testing.assert_array_equal(got.counts[side], whole.counts[side])
    assert got.moments[0] == whole.moments[0]
    np.testing.assert_allclose(got.moments[1:], whole.moments[1:], rtol=1e-12)
