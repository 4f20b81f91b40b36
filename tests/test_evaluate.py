"""quotelab evaluate against an independent reference: hftbacktest's own book on the same grid, scored
with pandas (merge_asof for the trades), on the shared USD-M windows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from handwritten import seed_asset
from hftbacktest import HashMapMarketDepthBacktest
from hftbacktest.types import EXCH_EVENT, TRADE_EVENT
from numba import njit
from reference_impls import yaml_variant

from quotelab.data import catalog as cat
from quotelab.errors import ConfigError
from quotelab.research.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "strategies" / "fair_value_study.yaml"


@njit
def _top_of_book(hbt, ts, book):
    n = 0
    while hbt.elapse(100_000_000) == 0:
        d = hbt.depth(0)
        ts[n] = hbt.current_timestamp
        book[n, 0] = d.best_bid
        book[n, 1] = d.best_ask
        book[n, 2] = d.best_bid_qty
        book[n, 3] = d.best_ask_qty
        n += 1
    return n


def _reference(day: np.ndarray, tick: float, lot: float, horizons_steps: dict[str, int]) -> pd.DataFrame:
    asset = seed_asset([day]).tick_size(tick).lot_size(lot)
    hbt = HashMapMarketDepthBacktest([asset])
    ts, book = np.zeros(200_000, np.int64), np.zeros((200_000, 4))
    n = _top_of_book(hbt, ts, book)
    hbt.close()
    df = pd.DataFrame(book[:n], columns=["bid", "ask", "bq", "aq"], index=pd.Index(ts[:n], name="ts"))
    df = df[np.isfinite(df.bid) & np.isfinite(df.ask)].copy()
    df["mid"] = (df.bid + df.ask) / 2
    imb = (df.bq - df.aq) / (df.bq + df.aq)
    estimates = {"mid": df.mid, "weighted_mid": df.mid + (df.ask - df.bid) * imb / 2}
    trades = day[((day["ev"] & 0xFF) == TRADE_EVENT) & ((day["ev"] & EXCH_EVENT) == EXCH_EVENT)]
    tr = pd.DataFrame({"ts": trades["exch_ts"], "px": trades["px"]}).sort_values("ts", kind="stable")
    rows = []
    for name, est in estimates.items():
        for label, k in horizons_steps.items():
            fut = df.mid.shift(-k)
            err = (est - fut).dropna()
            ok = est.notna() & fut.notna()
            # information coefficient: Spearman (ties share their average rank) of the predicted
            # move against the realised one
            ic = (est - df.mid)[ok].corr((fut - df.mid)[ok], method="spearman")
            rows.append({"estimator": name, "horizon": label, "n": len(err), "mse": float((err**2).mean()),
                         "ic": float(ic)})
        m = pd.merge_asof(tr, est.rename("est").reset_index(), on="ts", direction="backward",
                          allow_exact_matches=True).dropna()
        rows.append({"estimator": name, "horizon": "trade", "n": len(m), "mse": float(((m.px - m.est) ** 2).mean()),
                     "ic": float("nan")})
    return pd.DataFrame(rows)


def _study(real_catalog: Path, tmp_path: Path, **changes) -> Path:
    return yaml_variant(STUDY, tmp_path, real_catalog, **changes)


@pytest.mark.filterwarnings("ignore:An input array is constant")  # a plain mid predicts no move: IC undefined
@pytest.mark.parametrize("symbol,target,tick", [("BTCUSDT", "btc", 0.1), ("ETHUSDT", "eth", 0.01)])
def test_scores_equal_hftbacktest_book_scored_with_pandas(real_catalog, tmp_path, symbol, target, tick):
    result = evaluate(_study(real_catalog, tmp_path))
    got = {(r["estimator"], r["horizon"]): r for r in result.rows if r["target"] == target}
    day = cat.load_day(real_catalog, "binance-usdm", symbol, "20240808")
    ref = _reference(day, tick, 0.001, {"100ms": 1, "1s": 10, "10s": 100, "60s": 600})
    assert len(ref) == 10
    for r in ref.itertuples():
        mine = got[(r.estimator, r.horizon)]
        assert mine["n"] == r.n, (r.estimator, r.horizon)
        assert mine["mse"] == pytest.approx(r.mse, rel=1e-9), (r.estimator, r.horizon)
        if r.horizon != "trade":
            assert mine["ic"] == pytest.approx(r.ic, rel=1e-9, nan_ok=True), (r.estimator, r.horizon)
    assert np.isfinite(got[("weighted_mid", "1s")]["ic"])
    # an estimator with a forecast has an information coefficient, a plain mid has none
    assert np.isfinite(got[("mid+book_imbalance", "1s")]["forecast_ic"])
    assert got[("mid+book_imbalance", "1s")]["forecast_ic"] > 0.05  # imbalance predicts the next move


def test_cli_writes_tables_and_plots(real_catalog, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "quotelab.cli", "evaluate", str(_study(real_catalog, tmp_path)),
                           "--out", str(out), "--json"], capture_output=True, text=True, check=True)
    doc = json.loads(proc.stdout)
    assert len(doc["rows"]) == 2 * 5 * 5  # targets x estimators x (4 horizons + trades)
    import polars as pl

    scores = pl.read_parquet(out / "scores.parquet")
    assert scores.height == len(doc["rows"])
    assert (out / "scores.csv").exists() and (out / "mse_by_venue_symbol.csv").exists()
    assert pl.read_parquet(out / "bias_by_bucket.parquet")["n"].sum() > 0
    png = (out / "conditional_mean_btc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_horizon_and_unknown_target(real_catalog, tmp_path):
    with pytest.raises(ConfigError, match=r"horizon 0.15s is not a whole number of steps of 0.1s"):
        evaluate(_study(real_catalog, tmp_path, horizons=["150ms"]))
    with pytest.raises(ConfigError, match=r"study\.yaml:\d+: targets: target 'sol' is not in data.assets"):
        evaluate(_study(real_catalog, tmp_path, targets=["btc", "sol"]))
    with pytest.raises(ConfigError, match=r"estimators\[0\]\.fair_value\[0\]\.kind: unknown fair_value kind 'midd'"):
        evaluate(_study(real_catalog, tmp_path, estimators=[{"name": "x", "fair_value": [{"kind": "midd"}]}]))


def test_information_coefficient_is_scipys_spearman_with_ties():
    from scipy.stats import spearmanr

    from quotelab.research.evaluate import information_coefficient

    rng = np.random.default_rng(11)
    x = rng.normal(size=5000)
    y = np.round(0.3 * x + rng.normal(size=5000), 0)  # a handful of values: mostly ties
    assert information_coefficient(x, y) == pytest.approx(spearmanr(x, y).statistic, rel=1e-12)
    assert information_coefficient(np.round(x), y) == pytest.approx(spearmanr(np.round(x), y).statistic, rel=1e-12)
    assert np.isnan(information_coefficient(np.ones(10), y[:10]))
    assert np.isnan(information_coefficient(x[:2], y[:2]))
