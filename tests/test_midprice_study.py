"""The seed's mid-price study: ``quotelab evaluate strategies/midprice_study.yaml`` against the pandas
procedure in seed_study.py, on the shared USD-M BTCUSDT and ETHUSDT windows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from reference_impls import yaml_variant
from seed_study import ESTIMATORS, book_frame, exchange_rows, study_table, trades_frame

from quotelab.data import catalog as cat
from quotelab.data.assets import Asset
from quotelab.errors import ConfigError
from quotelab.research.evaluate import evaluate
from quotelab.research.replay import aggregate_trades, prepare_exchange

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "strategies" / "midprice_study.yaml"
WINDOW = ("20240808", "20240809")
SYMBOLS = {"btc": ("BTCUSDT", 0.1), "eth": ("ETHUSDT", 0.01)}


@pytest.fixture(scope="module")
def study(real_catalog: Path) -> dict:
    """The table as a user gets it: the CLI in a subprocess, --json."""
    proc = subprocess.run([sys.executable, "-m", "quotelab.cli", "evaluate", str(STUDY), "--catalog",
                           str(real_catalog), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _days(catalog: Path, symbol: str) -> list[np.ndarray]:
    return [cat.load_day(catalog, "binance-usdm", symbol, d) for d in WINDOW]


@pytest.mark.parametrize("target", ["btc", "eth"])
def test_study_table_equals_the_pandas_procedure(study, real_catalog, target):
    symbol, tick = SYMBOLS[target]
    rows = exchange_rows(_days(real_catalog, symbol))
    want = study_table(trades_frame(rows), book_frame(rows, tick, 0.001), tick)
    got = {r["estimator"]: r for r in study["rows"] if r["target"] == target}
    assert list(got) == ESTIMATORS
    for name in ESTIMATORS:
        w, g = want.loc[name], got[name]
        assert (g["n"], g["n_undefined"]) == (w["n"], w["n_undefined"]), name
        assert g["sse"] == pytest.approx(w["sse"], rel=1e-9, abs=0), name
        assert g["mse"] == pytest.approx(w["mse"], rel=1e-9, abs=0), name
    # the flow estimators are undefined for the first trades, and only they are
    assert all(got[n]["n_undefined"] == 0 for n in ESTIMATORS if n not in ("adjust_mid_price_9",
                                                                           "adjust_mid_price_10",
                                                                           "adjust_mid_price_11"))
    assert 0 < got["adjust_mid_price_10"]["n_undefined"] < got["adjust_mid_price_11"]["n_undefined"]
    # In[28]'s redefinition is the weighted mid again (the seed's Out[29] repeats Out[18]'s figure);
    # every other estimator differs: the table is not one number repeated
    assert got["adjust_mid_price@In28"]["sse"] == got["weight_mid_price"]["sse"]
    assert len({round(g["sse"], 6) for g in got.values()}) == len(ESTIMATORS) - 1


def test_study_names_its_conventions(study):
    text = " ".join(study["summary"]["conventions"])
    for phrase in ("is_buyer_maker == True", "In[28]", "adjust_mid_price_8", "forward-filled", "merge_asof",
                   "first price, summed quantity"):
        assert phrase in text
    notes = {r["estimator"]: r["note"] for r in study["rows"]}
    assert "different weights" in notes["adjust_mid_price_8"]


@pytest.mark.parametrize("target", ["btc", "eth"])
def test_trade_aggregation_equals_pandas_groupby(real_catalog, target):
    symbol, tick = SYMBOLS[target]
    days = _days(real_catalog, symbol)
    tape = aggregate_trades(prepare_exchange([Asset(target, days, tick, 0.001)]))
    df = trades_frame(exchange_rows(days))
    want = df.groupby(["transact_time", "is_buyer_maker"]).agg({"price": "first", "quantity": "sum"}).reset_index()
    assert tape.raw_trades == len(df) > len(tape.ts) == len(want)
    np.testing.assert_array_equal(tape.ts // 1_000_000, want["transact_time"])
    np.testing.assert_array_equal(tape.side < 0, want["is_buyer_maker"])
    np.testing.assert_array_equal(tape.px, want["price"])
    np.testing.assert_allclose(tape.qty, want["quantity"], rtol=1e-12)


def _variant(tmp_path: Path, catalog: Path, **changes) -> Path:
    return yaml_variant(STUDY, tmp_path, catalog, **changes)


def test_without_aggregation_every_trade_is_scored(tmp_path, real_catalog):
    res = evaluate(_variant(tmp_path, real_catalog, aggregate_trades=False, targets=["eth"],
                            estimators=[{"name": "mid_price", "fair_value": [{"kind": "mid"}]}]))
    (row,) = res.rows
    assert row["n"] + row["n_undefined"] == res.summary["trades_raw"] == res.summary["trades_scored"]
    assert "no aggregation" in res.summary["conventions"][0]


def test_trades_mode_rejects_a_cross_asset_estimator_naming_the_place(tmp_path, real_catalog):
    estimators = [{"name": "mid_price", "fair_value": [{"kind": "mid"}]},
                  {"name": "two", "fair_value": [{"kind": "mid"}, {"kind": "mid", "params": {"asset": "eth"}}]}]
    path = _variant(tmp_path, real_catalog, targets=["btc"], estimators=estimators)
    with pytest.raises(ConfigError, match=r"midprice_study\.yaml:\d+: estimators\[1\]\.fair_value\[1\]: "
                                          r"'mid' reads 'eth'.*score: grid"):
        evaluate(path)


def test_a_study_estimator_pasted_into_a_strategy_runs_unchanged(real_catalog, tmp_path):
    import polars as pl
    from reference_impls import local_trades, trade_flow

    from quotelab import layout as L
    from quotelab.research.replay import replay_component
    from quotelab.strategy.registry import load_registry

    study = yaml.safe_load(STUDY.read_text())
    est = next(e for e in study["estimators"] if e["name"] == "adjust_mid_price_10")
    doc = {"name": "pasted", "engine": {"step": "100ms", "on_nonfinite": "skip"},
           "data": {"catalog": str(real_catalog), "quote": "btc", "assets": {"btc": study["data"]["assets"]["btc"]}},
           "fair_value": est["fair_value"], "forecast": est["forecast"],
           "quoter": {"kind": "fixed_spread", "params": {"half_spread": "2ticks", "size": 0.001, "max_position": 0.01}}}
    path = tmp_path / "pasted.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "quotelab.cli", "run", str(path), "--json", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["quoting_steps"] > 3000 and summary["nonfinite_skipped"] > 0  # VI undefined while warming up
    series = pl.read_parquet(out / "series.parquet")
    ts = series["timestamp"].to_numpy()

    # forecast = -1.4 spread VI, VI counting seller-initiated trades as buys, written from the formula
    days = _days(real_catalog, "BTCUSDT")
    vi = trade_flow(local_trades(np.concatenate(days)), ts, 0.1, -1.0, adjust=True)["VI"].to_numpy()
    book = replay_component(load_registry(entry_points=False).get("fair_value", "mid"), {},
                            [Asset("btc", days, 0.1, 0.001)], keep_view=True)
    at = np.searchsorted(book.timestamps, ts)
    assert np.array_equal(book.timestamps[at], ts)
    spread = book.views[at, 0, L.BEST_ASK] - book.views[at, 0, L.BEST_BID]
    np.testing.assert_allclose(series["forecast"].to_numpy(), -1.4 * spread * vi, rtol=1e-9, atol=1e-12)
    assert np.std(series["forecast"].to_numpy()) > 0


def test_a_grid_only_key_in_a_trades_study_is_an_error_naming_it(tmp_path, real_catalog):
    with pytest.raises(ConfigError, match=r"midprice_study\.yaml:\d+: horizons: horizons applies to score: grid only"):
        evaluate(_variant(tmp_path, real_catalog, horizons=["1s"]))
    with pytest.raises(ConfigError, match=r"aggregate_trades applies to score: trades only"):
        evaluate(_variant(tmp_path, real_catalog, score="grid"))


def test_default_match_is_the_book_received_strictly_before_the_trade(tmp_path, real_catalog):
    """Without ``match``, a trade meets the book a trader had: rows received strictly before it (local time),
    written here as pandas merge_asof on receive times with exact matches excluded."""
    import pandas as pd
    from hftbacktest.types import LOCAL_EVENT

    doc = yaml.safe_load(STUDY.read_text())
    doc["data"]["catalog"] = str(real_catalog)
    del doc["match"]
    doc["targets"] = ["btc"]
    doc["estimators"] = [e for e in doc["estimators"] if e["name"] in ("mid_price", "weight_mid_price")]
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(doc))
    local = {r["estimator"]: r for r in evaluate(tmp_path / "local.yaml").rows}
    doc["match"] = "exchange_inclusive"
    (tmp_path / "exch.yaml").write_text(yaml.safe_dump(doc))
    exch = {r["estimator"]: r for r in evaluate(tmp_path / "exch.yaml").rows}

    ev = np.concatenate(_days(real_catalog, "BTCUSDT"))
    rows = ev[(ev["ev"] & LOCAL_EVENT) == LOCAL_EVENT]
    rows = rows[np.argsort(rows["local_ts"], kind="stable")]
    trades = trades_frame(rows, unit_ns=1, clock="local_ts")
    trades = trades.groupby(["transact_time", "is_buyer_maker"]).agg({"price": "first", "quantity": "sum"})
    trades = trades.reset_index()
    depths = book_frame(rows, 0.1, 0.001, clock="local_ts", unit_ns=1)
    df = pd.merge_asof(trades, depths, on="transact_time", direction="backward", allow_exact_matches=False)
    mid = (df["bid_0_price"] + df["ask_0_price"]) / 2
    i = (df["bid_0_quantity"] - df["ask_0_quantity"]) / (df["bid_0_quantity"] + df["ask_0_quantity"])
    for name, est in (("mid_price", mid), ("weight_mid_price", mid + (df["ask_0_price"] - df["bid_0_price"]) * i / 2)):
        sq = (df["price"] - est) ** 2
        assert (local[name]["n"], local[name]["n_undefined"]) == (int(sq.notna().sum()), int(sq.isna().sum()))
        assert local[name]["sse"] == pytest.approx(sq.sum(), rel=1e-9)
        assert local[name]["sse"] != pytest.approx(exch[name]["sse"], rel=1e-6)  # the two conventions differ
