"""quotelab train on the shared Binance windows: online/offline feature equality, walk-forward leakage
guards, transfer, export into a running strategy, and the bad inputs a user hits first."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from quotelab.backtest.driver import R_FORECAST, R_MID
from quotelab.backtest.engine import run_strategy
from quotelab.errors import ConfigError, DataError
from quotelab.research import train as T
from quotelab.research.replay import replay_component
from quotelab.strategy.registry import load_registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "strategies" / "train_btc_usdm.yaml"

DATA = """
data:
  quote: perp
  assets:
    perp: {venue: binance-usdm, symbol: BTCUSDT, dates: [20240808]}
    other: {venue: binance-usdm, symbol: ETHUSDT, dates: [20240808]}
"""  # both grids default to 100 ms: train's grid.step and the engine's engine.step
FEATURES = """
features:
  - kind: book_imbalance
    params: {weights: [0.5, 0.3, 0.2]}
  - kind: trade_flow_imbalance
    params: {output: VI, alpha: 0.1}
  - kind: returns
    params: {asset: other, horizon: 10}
"""


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def catalog(real_catalog: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session catalog plus spot BTCUSDT/ETHUSDT and COIN-M BTCUSD_PERP, for transfer."""
    root = tmp_path_factory.mktemp("train_catalog")
    shutil.copytree(real_catalog, root, dirs_exist_ok=True)
    b = shared_data / "binance"
    for fmt, symbol, files in (
        ("binance-spot", "BTCUSDT", ["spot/btcusdt_20240808.gz", "spot/btcusdt_20240809.gz"]),
        ("binance-spot", "ETHUSDT", ["spot/ethusdt_20240808.gz", "spot/ethusdt_20240809.gz"]),
        ("binance-cm", "BTCUSD_PERP", ["cm/btcusd_perp_20240808.gz", "cm/btcusd_perp_20240809.gz"]),
    ):
        subprocess.run([sys.executable, "-m", "quotelab.cli", "convert", "--format", fmt, "--symbol", symbol,
                        "--catalog", str(root), *(str(b / f) for f in files)], check=True, capture_output=True)
    return root


def write(tmp_path: Path, text: str, name: str = "train.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def example(catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> T.TrainResult:
    """The shipped example, run once with its exports."""
    return T.run_train(EXAMPLE, catalog=catalog, out_dir=tmp_path_factory.mktemp("train_out"))


# ------------------------------------------------------------------------------------------------
# offline features == online features
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature", [
    {"kind": "book_imbalance", "params": {"weights": [0.5, 0.3, 0.2]}},
    {"kind": "trade_flow_imbalance", "params": {"output": "VI", "alpha": 0.1}},
    {"kind": "returns", "params": {"asset": "other", "horizon": 10}},
])
def test_recorded_features_equal_engine_online_bitwise(catalog, tmp_path, registry, feature):
    """The engine records out[FORECAST] = v·(alpha + 0·fv·1e-4) = v exactly for one signal with alpha 1.0,
    so a hftbacktest run of that strategy gives the kernel's online value at every quoting step."""
    spec = yaml.safe_dump({"forecast": [{**feature, "alpha": 1.0}]})
    strategy = write(tmp_path, DATA + "fair_value: [{kind: mid}]\n" + spec + "quoter: {kind: fixed_spread}\n",
                     "strategy.yaml")
    online = run_strategy(strategy, catalog=catalog)

    train_yaml = write(tmp_path, DATA + "features:\n" + yaml.safe_dump([feature]))
    setup = T.load_train(train_yaml, registry)
    ds = T.load_dataset("native", setup.config.data, tmp_path, setup.where, catalog)
    frame = T.FeatureRecorder(setup, ds)()

    assert len(online.record_ts) > 3000
    np.testing.assert_array_equal(frame.timestamps, online.record_ts)
    assert np.array_equal(frame.X[:, 0], online.records[:, R_FORECAST])
    assert np.array_equal(frame.mid, online.records[:, R_MID])
    assert np.std(frame.X[:, 0]) > 0


# ------------------------------------------------------------------------------------------------
# walk-forward, purge and the look-ahead guards
# ------------------------------------------------------------------------------------------------


def test_walk_forward_trains_only_on_targets_that_end_before_the_test_block():
    t = np.arange(1000, dtype=np.int64) * 100_000_000
    purge = 2_000_000_000
    folds = T.walk_forward(t, 5, purge)
    assert len(folds) == 5
    for f in folds:
        start = t[f.test[0]]
        assert t[f.train].max() < start - purge + 1
        assert t[f.train].max() + 1_000_000_000 < start  # a 1 s target window ends before the block
        assert len(np.intersect1d(f.train, f.test)) == 0
    assert np.array_equal(np.concatenate([f.test for f in folds]), np.arange(folds[0].test[0], 1000))


def test_purge_shorter_than_horizon_is_refused(tmp_path, registry):
    p = write(tmp_path, DATA + FEATURES + "target: {horizon: 1s}\nvalidation: {folds: 5, purge: 500ms}\n")
    with pytest.raises(ConfigError, match=r"train\.yaml:\d+: validation\.purge: purge 0\.5s is shorter than "
                                          r"target\.horizon 1s.*fix: purge >= 1s"):
        T.load_train(p, registry)


def test_example_reports_folds_transfer_and_coefficients(example):
    rep = example.report
    assert [f["fold"] for f in rep["folds"]] == [1, 2, 3, 4, 5]
    o = rep["overall"]
    # book imbalance predicts the 1 s mid return on this window: positive out-of-sample, IC about 0.3
    assert o["oos_r2"] > 0.005 and o["oos_ic"] > 0.2
    assert o["is_r2"] > o["oos_r2"]
    assert rep["causality"]["ok"] and rep["causality"]["checked_steps"] > 5000
    smp = example.samples["native"]
    lin = example.model.linear()
    ref = np.linalg.lstsq(np.column_stack([np.ones(len(smp.target)), smp.X]), smp.target, rcond=None)[0]
    np.testing.assert_allclose([lin[1], *lin[0]], ref, rtol=1e-8, atol=1e-12)
    assert o["coef"]["intercept"] == pytest.approx(ref[0])
    rows = {r["dataset"]: r for r in rep["transfer"]}
    assert set(rows) == {"native", "usdm_ethusdt", "spot_btcusdt", "cm_btcusd_perp"}
    assert rows["cm_btcusd_perp"]["asset"] == "binance-cm/BTCUSD_PERP"
    for r in rows.values():
        assert r["n"] > 2000 and r["transfer_ic"] > 0.1 and r["native_oos_ic"] > 0.1


def test_permuted_target_collapses_out_of_sample_r2(example):
    smp = example.samples["native"]
    spec = T.ModelSpec(kind="linear")
    honest = T.fit_walk_forward(spec, smp.X, smp.target, smp.t, smp.frame.names, 5, 2_000_000_000)
    rng = np.random.default_rng(7)
    shuffled = T.fit_walk_forward(spec, smp.X, rng.permutation(smp.target), smp.t, smp.frame.names, 5,
                                  2_000_000_000)
    assert honest.overall["oos_r2"] > 0.005
    assert -0.02 < shuffled.overall["oos_r2"] < 0.002
    assert abs(shuffled.overall["oos_ic"]) < 0.05


def test_permuted_target_collapses_gradient_boosting_too(example):
    smp = example.samples["native"]
    spec = T.ModelSpec(kind="gradient_boosting", max_iter=50)
    rng = np.random.default_rng(11)
    shuffled = T.fit_walk_forward(spec, smp.X, rng.permutation(smp.target), smp.t, smp.frame.names, 5,
                                  2_000_000_000)
    assert shuffled.overall["oos_r2"] < 0.002
    assert abs(shuffled.overall["oos_ic"]) < 0.05


def test_feature_shifted_one_step_into_the_future_is_caught(catalog, tmp_path, registry):
    setup = T.load_train(write(tmp_path, DATA + FEATURES), registry)
    ds = T.load_dataset("native", setup.config.data, tmp_path, setup.where, catalog)
    recorder = T.FeatureRecorder(setup, ds)
    full = recorder()
    cuts = [int(full.timestamps[i]) for i in (1000, 2000, 3000)]
    assert T.check_causality(recorder, cuts, full=full).checked_steps > 5000

    def shifted(end_ns):
        f = recorder(end_ns)
        X = f.X.copy()
        X[:-1, 1] = X[1:, 1]  # trade-flow VI at t takes its value at t + 1 step
        X[-1, 1] = np.nan
        return T.FeatureFrame(f.timestamps, f.mid, X, f.names, f.origin_ns)

    where = lambda j: T._feature_where(setup, j)  # noqa: E731
    with pytest.raises(T.LookAheadError, match=r"train\.yaml:\d+: features\[1\] \(trade_flow_imbalance.*look-ahead"):
        T.check_causality(shifted, cuts, where=where)


def test_truncation_reads_a_part_at_a_time_and_keeps_what_filtering_the_whole_days_keeps(catalog, tmp_path,
                                                                                        registry):
    setup = T.load_train(write(tmp_path, DATA + FEATURES), registry)
    ds = T.load_dataset("native", setup.config.data, tmp_path, setup.where, catalog)
    full = T.FeatureRecorder(setup, ds)()
    cut = int(full.timestamps[1500])
    for a, got in zip(ds.assets, T.truncate(ds.assets, cut), strict=True):
        assert not isinstance(got.events, list) and len(got.events) == len(a.events) + 1
        whole = np.concatenate(list(a.events))
        want = whole[whole["local_ts"] <= cut]
        assert 0 < len(want) < len(whole)
        np.testing.assert_array_equal(np.concatenate([got.events[i] for i in range(len(a.events))]), want)
        assert got.events[-1]["local_ts"] == got.events[-1]["exch_ts"] == cut


def _external_mid(catalog: Path, tmp_path: Path, registry, origin_ns: int) -> Path:
    """ETH's mid on a 10 ms grid (the same origin), as a file of (timestamp, mid): an 'external' series."""
    from quotelab.data.assets import load_assets
    from quotelab.strategy.config import DataSection

    data = DataSection.model_validate(
        {"quote": "eth", "assets": {"eth": {"venue": "binance-usdm", "symbol": "ETHUSDT", "dates": ["20240808"]}}})
    res = replay_component(registry.get("fair_value", "mid"), {"asset": "quoted"},
                           load_assets(data, tmp_path, str, catalog), step=0.01, origin_ns=origin_ns)
    path = tmp_path / "eth_mid.parquet"
    pl.DataFrame({"timestamp": res.timestamps, "mid": res.values}).write_parquet(path)
    return path


EXTERNAL = """
external:
  - {name: eth_mid_return, file: eth_mid.parquet, value: mid, transform: log_return, horizon: 10}
target: {horizon: 1s}
validation: {folds: 3, purge: 1s}
"""


def test_external_series_resampled_equals_the_kernel_and_a_left_label_is_caught(catalog, tmp_path, registry,
                                                                              monkeypatch):
    from quotelab.data.assets import load_assets

    setup = T.load_train(write(tmp_path, DATA + FEATURES + EXTERNAL), registry)
    feeds = load_assets(setup.config.data, tmp_path, setup.where, catalog)
    _external_mid(catalog, tmp_path, registry, feeds[0].first_ts())
    ds = T.load_dataset("native", setup.config.data, tmp_path, setup.where, catalog)
    frame = T.FeatureRecorder(setup, ds)()
    kernel, external = frame.X[:, 2], frame.X[:, 3]
    ok = np.isfinite(external)
    ok[:10] = False  # the kernel reports 0 until its horizon has passed; the series is NaN there
    assert ok.sum() > 3000
    np.testing.assert_allclose(external[ok], kernel[ok], rtol=1e-12, atol=1e-12)

    result = T.run_train(setup.file, catalog=catalog)
    assert result.report["causality"]["ok"]

    def left_labelled(ts, values, grid_ns, origin_ns, step_ns):
        # polars' default window labels: [t, t + step) labelled t, i.e. a value from the next step
        df = pl.DataFrame({"t": ts - origin_ns, "v": values}).sort("t")
        res = df.group_by_dynamic("t", every=f"{step_ns}i").agg(pl.col("v").last())
        grid = pl.DataFrame({"t": grid_ns - origin_ns})
        return grid.join_asof(res, on="t").get_column("v").fill_null(strategy="forward").to_numpy()

    monkeypatch.setattr(T, "resample_external", left_labelled)
    with pytest.raises(T.LookAheadError, match=r"train\.yaml:\d+: external\[0\] \(eth_mid_return\).*look-ahead"):
        T.run_train(setup.file, catalog=catalog)


# ------------------------------------------------------------------------------------------------
# export: the trained block runs in a strategy, unchanged
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_exported_forecast_block_runs_in_quotelab_run_unchanged(catalog, tmp_path):
    train_yaml = write(tmp_path, DATA + FEATURES + "target: {horizon: 1s}\nvalidation: {folds: 4, purge: 1s}\n")
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "quotelab.cli"]
    proc = subprocess.run([*cli, "train", str(train_yaml), "--catalog", str(catalog), "--json", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["outputs"]["forecast"] == "forecast.yaml"
    block = (out / "forecast.yaml").read_text()
    doc = json.loads((out / "model.json").read_text())

    strategy = write(tmp_path, DATA + "fair_value:\n  - kind: mid\n" + block + "quoter:\n  kind: fixed_spread\n"
                     "  params: {half_spread: 2ticks, size: 0.001, max_position: 0.01}\n", "strategy.yaml")
    run_out = tmp_path / "run"
    proc = subprocess.run([*cli, "run", str(strategy), "--catalog", str(catalog), "--json", "--out", str(run_out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["quoting_steps"] > 3000
    # the block was fitted on this very day: the run says so, and --strict refuses it
    assert summary["in_sample"] == ["perp binance-usdm/BTCUSDT 20240808", "other binance-usdm/ETHUSDT 20240808"]
    assert "warning: in-sample" in proc.stderr
    strict = subprocess.run([*cli, "run", str(strategy), "--catalog", str(catalog), "--strict"],
                            capture_output=True, text=True)
    assert strict.returncode == 2 and "--strict refuses" in strict.stderr
    step = subprocess.run([*cli, "run", str(strategy), "--catalog", str(catalog), "--set", "engine.step=50ms"],
                          capture_output=True, text=True)
    assert step.returncode == 2 and "trained on a 0.1 s grid, this run steps 0.05 s" in step.stderr
    # evaluate labels it the same way, and checks the grid step too
    est = {"name": "model", "fair_value": [{"kind": "mid"}], "forecast": yaml.safe_load(block)["forecast"]}
    ev_doc = yaml.safe_load(DATA) | {"estimators": [est], "horizons": [1.0], "plots": False}
    ev_doc["data"]["catalog"] = str(catalog)
    ev = write(tmp_path, yaml.safe_dump(ev_doc), "eval.yaml")
    proc = subprocess.run([*cli, "evaluate", str(ev), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(proc.stdout)["summary"]["in_sample"]) == sorted(summary["in_sample"])
    strict = subprocess.run([*cli, "evaluate", str(ev), "--strict"], capture_output=True, text=True)
    assert strict.returncode == 2 and "--strict refuses" in strict.stderr
    ev.write_text(yaml.safe_dump(ev_doc | {"step": "50ms"}))
    step = subprocess.run([*cli, "evaluate", str(ev)], capture_output=True, text=True)
    assert step.returncode == 2 and "trained on a 0.1 s grid, this run steps 0.05 s" in step.stderr
    series = pl.read_parquet(run_out / "series.parquet")

    # the engine's forecast is the model's prediction (bps) times the fair value, at every step
    setup = T.load_train(train_yaml)
    ds = T.load_dataset("native", setup.config.data, tmp_path, setup.where, catalog)
    frame = T.FeatureRecorder(setup, ds)()
    pred = doc["intercept"] + frame.X @ np.asarray(doc["coefficients"])
    np.testing.assert_array_equal(series["timestamp"].to_numpy(), frame.timestamps)
    np.testing.assert_allclose(series["forecast"].to_numpy(), pred * frame.mid * 1e-4, rtol=1e-9, atol=1e-12)
    assert np.std(series["forecast"].to_numpy()) > 0

    # linear_forecast reads its features by name: pasted after another fair value it still runs ...
    items = yaml.safe_load(block)["forecast"]
    names = [item["name"] for item in items[:-1]]
    assert items[-1]["params"]["inputs"] == names and len(set(names)) == len(names) >= 2
    quoter = "quoter:\n  kind: fixed_spread\n  params: {half_spread: 2ticks, size: 0.001, max_position: 0.01}\n"
    two = write(tmp_path, DATA + "fair_value:\n  - kind: mid\n  - kind: weighted_mid\n" + block + quoter, "two.yaml")
    proc = subprocess.run([*cli, "run", str(two), "--catalog", str(catalog), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # ... and a block that lost a feature it names is refused, at the input that names it
    broken = yaml.safe_dump({"forecast": items[1:]}, sort_keys=False)
    wrong = write(tmp_path, DATA + "fair_value:\n  - kind: mid\n" + broken + quoter, "wrong.yaml")
    proc = subprocess.run([*cli, "run", str(wrong), "--catalog", str(catalog)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert re.search(rf"wrong\.yaml:\d+: forecast\[\d\]\.params\.inputs\[0\]: no part is named '{names[0]}' in the "
                     r"strategy; named parts that run before this one: ", proc.stderr), proc.stderr


def test_non_linear_model_exports_out_of_sample_predictions_with_latency(catalog, tmp_path):
    p = write(tmp_path, DATA + FEATURES + "model: {kind: ensemble}\nvalidation: {folds: 3, purge: 1s}\n"
              "export: {latency: 50ms}\n")
    res = T.run_train(p, catalog=catalog, out_dir=tmp_path / "out")
    assert "forecast" not in res.report["outputs"]
    pred = pl.read_parquet(tmp_path / "out" / "predictions_native.parquet")
    assert (pred["usable_ts"] - pred["timestamp"]).unique().to_list() == [50_000_000]
    # only test blocks carry values: the first block is training data for every fold
    first = res.report["folds"][0]["test_start_ns"]
    assert pred.filter(pl.col("timestamp") < first)["value"].is_nan().all()
    assert pred.filter(pl.col("timestamp") >= first)["value"].is_nan().mean() < 0.01
    assert res.report["overall"]["oos_ic"] > 0.1


def test_rolling_linear_refits_and_scores(catalog, tmp_path):
    p = write(tmp_path, DATA + FEATURES + "model: {kind: rolling_linear, window: 60s, refit: 10s}\n"
              "validation: {folds: 3, purge: 1s}\n")
    rep = T.run_train(p, catalog=catalog).report
    assert all(f["refits"] >= 5 for f in rep["folds"])
    assert rep["overall"]["oos_ic"] > 0.1 and rep["overall"]["n_oos"] > 2000


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_empty_window_is_a_clear_error(catalog, tmp_path, registry):
    from hftbacktest.types import TRADE_EVENT

    from quotelab.data.catalog import load_day

    ev = load_day(catalog, "binance-usdm", "BTCUSDT", "20240808")
    np.savez(tmp_path / "trades_only.npz", data=ev[(ev["ev"] & 0xFF) == TRADE_EVENT])
    text = """
data:
  quote: perp
  assets:
    perp: {files: [trades_only.npz], tick_size: 0.1, lot_size: 0.001}
features:
  - kind: book_imbalance
"""
    with pytest.raises(DataError, match=r"train\.yaml:\d+: data: .*empty window.*fix:"):
        T.run_train(write(tmp_path, text), catalog=catalog)
    np.savez(tmp_path / "nothing.npz", data=ev[:0])
    with pytest.raises(DataError, match=r"train\.yaml:\d+: data\.assets\.perp: .* has no events"):
        T.run_train(write(tmp_path, text.replace("trades_only", "nothing")), catalog=catalog)


def test_horizon_longer_than_the_data_is_a_clear_error(catalog, tmp_path):
    p = write(tmp_path, DATA + FEATURES + "target: {horizon: 1h}\nvalidation: {purge: 1h}\n")
    with pytest.raises(ConfigError, match=r"train\.yaml:\d+: target\.horizon: horizon 3600s is longer than the data "
                                          r".*\(34\d\.\ds of ready steps\); fix:"):
        T.run_train(p, catalog=catalog)


def test_model_file_with_other_features_or_order_is_refused(catalog, tmp_path):
    out = tmp_path / "out"
    T.run_train(write(tmp_path, DATA + FEATURES + "validation: {folds: 3}\n"), catalog=catalog, out_dir=out)
    model_ref = "model: {file: out/model.json}\n"
    swapped = """
features:
  - kind: trade_flow_imbalance
    params: {output: VI, alpha: 0.1}
  - kind: book_imbalance
    params: {weights: [0.5, 0.3, 0.2]}
  - kind: returns
    params: {asset: other, horizon: 10}
"""
    with pytest.raises(ConfigError, match=r"(?s)apply\.yaml:\d+: features: the model file .*model\.json was trained "
                                          r"on the same features in a different order.*fix: list the features"):
        T.run_train(write(tmp_path, DATA + swapped + model_ref, "apply.yaml"), catalog=catalog)
    other = FEATURES.replace("horizon: 10", "horizon: 5")
    with pytest.raises(ConfigError, match=r"different features; not in the model: \['returns\(asset=\"other\", "
                                          r"horizon=5\)'\]"):
        T.run_train(write(tmp_path, DATA + other + model_ref, "apply.yaml"), catalog=catalog)
    # the matching file applies as is, on its own training day: the scores are labelled in-sample
    rep = T.run_train(write(tmp_path, DATA + FEATURES + model_ref, "apply.yaml"), catalog=catalog).report
    assert rep["overall"]["n_is"] > 3000 and rep["overall"]["is_ic"] > 0.2 and "oos_ic" not in rep["overall"]
    assert rep["in_sample"] == ["perp binance-usdm/BTCUSDT 20240808", "other binance-usdm/ETHUSDT 20240808"]
    with pytest.raises(ConfigError, match=r"apply\.yaml:\d+: model\.file: the model file out/model\.json was trained "
                                          r"on perp binance-usdm/BTCUSDT 20240808.*--strict"):
        T.run_train(write(tmp_path, DATA + FEATURES + model_ref, "apply.yaml"), catalog=catalog, strict=True)
    doc = json.loads((out / "model.json").read_text())
    prov = doc["provenance"]
    assert prov["step_s"] == 0.1 and prov["horizon_s"] == 1.0 and len(prov["data_sha256"]) == 16
    assert prov["assets"]["perp"] == {"venue": "binance-usdm", "symbol": "BTCUSDT", "dates": ["20240808"]}
    with pytest.raises(ConfigError, match=r"grid\.step: the model file .* was trained with step_s 0\.1, "
                                          r"this file has 0\.05"):
        T.run_train(write(tmp_path, DATA + FEATURES + model_ref.replace("}\n", "}\ngrid: {step: 50ms}\n"),
                          "apply.yaml"), catalog=catalog)


def test_unknown_feature_and_missing_transfer_asset_name_their_lines(tmp_path, registry):
    bad = DATA + "features:\n  - kind: book_imbalanse\n"
    with pytest.raises(ConfigError, match=r"train\.yaml:8: features\[0\]\.kind: unknown signal kind "
                                          r"'book_imbalanse'; registered: book_imbalance"):
        T.load_train(write(tmp_path, bad), registry)
    tr = DATA + FEATURES + "transfer:\n  - name: eth\n    assets: {perp: {venue: binance-usdm, symbol: ETHUSDT, " \
        "dates: [20240808]}}\n"
    with pytest.raises(ConfigError, match=r"train\.yaml:\d+: transfer\[0\]\.assets: transfer 'eth' has no asset "
                                          r"named other"):
        T.load_train(write(tmp_path, tr), registry)


def test_cli_reports_a_config_error_without_traceback(tmp_path):
    p = write(tmp_path, DATA + FEATURES + "target: {horizon: 150ms}\n")
    proc = subprocess.run([sys.executable, "-m", "quotelab.cli", "train", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.yaml:" in proc.stderr and "whole number of grid steps" in proc.stderr
    assert "Traceback" not in proc.stderr



def test_cross_asset_example_stops_where_the_first_read_asset_ends(catalog):
    """Spot and COIN-M run to 00:05, the USD-M perp to 23:59:59: after that its book is frozen, its
    mid return is 0 and a sample there would be fiction, so samples end with the perp's data."""
    res = T.run_train(REPO / "strategies" / "train_cross_asset.yaml", catalog=catalog)
    smp = res.samples["native"]
    end = smp.frame.data_end_ns
    assert smp.frame.timestamps[-1] > end + 60e9  # the grid runs on with the other markets
    assert smp.t.max() + 1_000_000_000 <= end
    assert end - smp.t.max() < 2e9
    rep = res.report
    assert rep["model"] == "ridge" and len(rep["overall"]["coef"]) == 5
    assert rep["samples"] == len(smp.t) < 0.6 * rep["steps"]


# ------------------------------------------------------------------------------------------------
# out-of-sample numbers with noise features and planted signals
# ------------------------------------------------------------------------------------------------


def _trending(rng: np.random.Generator, n: int = 3000, k: int = 1, beta: float = 0.0):
    """Targets with a level that drifts over time (each test block has its own mean), features of noise
    plus ``beta`` times a planted signal in the first column."""
    t = np.arange(n, dtype=np.int64) * 100_000_000
    X = rng.standard_normal((n, k))
    y = np.linspace(-3.0, 3.0, n) + beta * X[:, 0] + rng.standard_normal(n)
    return X, y, t


def test_pooled_ic_is_demeaned_within_folds_noise_scores_zero_and_a_planted_signal_does_not():
    spec = T.ModelSpec(kind="linear")
    raw, demeaned, fold_means = [], [], []
    for seed in range(40):
        X, y, t = _trending(np.random.default_rng(seed))
        fit = T.fit_walk_forward(spec, X, y, t, ["noise"], 5, 0)
        ok = np.isfinite(fit.oos_pred)
        raw.append(T.information_coefficient(y[ok], fit.oos_pred[ok]))  # the old pooled figure
        demeaned.append(fit.overall["oos_ic"])
        fold_means.append(fit.overall["oos_ic_fold_mean"])
        assert len(fit.folds) == 5 and fit.overall["oos_ic_fold_std"] > 0
    # ranking the concatenated blocks scores each block's intercept: a noise feature looks predictive
    assert abs(np.mean(raw)) > 0.05 and min(abs(v) for v in raw) > 0.02
    assert abs(np.mean(demeaned)) < 0.01 and abs(np.mean(fold_means)) < 0.01
    X, y, t = _trending(np.random.default_rng(99), beta=0.5)
    planted = T.fit_walk_forward(spec, X, y, t, ["signal"], 5, 0).overall
    assert planted["oos_ic"] > 0.3 and planted["oos_ic_fold_mean"] > 0.3


def test_transfer_models_are_causal_a_noise_fit_does_not_transfer():
    # Source and target share features and targets (two venues of one market): a model fitted on all the
    # source data has seen the target's test blocks, so its noise fit "transfers"; causal models do not.
    spec = T.ModelSpec(kind="linear")
    final_ics, causal_ics = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        n, k = 2000, 30
        t = np.arange(n, dtype=np.int64) * 100_000_000
        X, y = rng.standard_normal((n, k)), rng.standard_normal(n)
        blocks = [f.test for f in T.walk_forward(t, 4, 0)]
        test = np.concatenate(blocks)
        final = T.StaticModel(spec).fit(X, y)
        final_ics.append(T.information_coefficient(y[test], final.predict(X[test])))
        pred = T.causal_transfer_predict(spec, X, y, t, X, t, blocks, 0)
        causal_ics.append(T.block_scores(y, pred, blocks)["ic"])
        assert np.isfinite(pred[test]).all() and np.isnan(np.delete(pred, test)).all()
    assert np.mean(final_ics) > 0.05
    assert abs(np.mean(causal_ics)) < 0.02


def test_gradient_boosting_chooses_its_iterations_on_a_time_ordered_split():
    # A planted signal that fades out over time: a random validation split mixes early and late samples,
    # the last-in-time block sees only the late regime. The choice must be the time-ordered one.
    rng = np.random.default_rng(3)
    n = 4000
    t = np.arange(n, dtype=np.int64) * 100_000_000
    X = rng.standard_normal((n, 3))
    y = np.where(np.arange(n) < 3000, 1.5 * X[:, 0], 0.0) + rng.standard_normal(n)
    spec = T.ModelSpec(kind="gradient_boosting", max_iter=60, learning_rate=0.1)
    m = T.StaticModel(spec).fit(X, y, t, 1_000_000_000).members[0]
    assert m.early_stopping is False  # sklearn's random split is never used
    # the slow way: fit on samples whose targets end 1 s before the last 10 %, score each iteration there
    from sklearn.ensemble import HistGradientBoostingRegressor

    val = slice(3600, n)
    train = t < t[3600] - 1_000_000_000
    probe = HistGradientBoostingRegressor(max_iter=60, max_depth=3, learning_rate=0.1, random_state=0,
                                          early_stopping=False).fit(X[train], y[train])
    best = int(np.argmin([np.mean((y[val] - p) ** 2) for p in probe.staged_predict(X[val])])) + 1
    assert m.max_iter == best == m.n_iter_ and best < 60
    assert T.StaticModel(spec.model_copy(update={"early_stopping": False})).fit(X, y, t).members[0].n_iter_ == 60


# ------------------------------------------------------------------------------------------------
# bounded memory: fits from sums a chunk at a time, rows models sampled past max_rows
# ------------------------------------------------------------------------------------------------


def test_sufficient_statistics_fit_equals_sklearn_on_the_rows(monkeypatch):
    """Linear and ridge fitted from sums over 777-row chunks give sklearn's coefficients on the whole
    rows (to 1e-10 relative), also for a rank-deficient X (the minimum-norm solution)."""
    from sklearn.linear_model import LinearRegression, Ridge

    from quotelab import spool

    monkeypatch.setattr(spool, "CHUNK", 777)
    rng = np.random.default_rng(5)
    n = 20_000
    X = rng.normal(size=(n, 4)) @ rng.normal(size=(4, 4)) + rng.normal(0, 3, 4)  # correlated, off-centre
    y = X @ np.array([0.5, -1.0, 0.0, 2.0]) + 7.0 + rng.normal(0, 2, n)
    for ours, ref in ((T.SufficientLinear(), LinearRegression()), (T.SufficientLinear(25.0), Ridge(alpha=25.0))):
        ours.fit(X, y)
        ref.fit(X, y)
        np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-10)
        assert ours.intercept_ == pytest.approx(ref.intercept_, rel=1e-10)
        np.testing.assert_allclose(ours.predict(X), ref.predict(X), rtol=1e-10)
    twice = np.column_stack([X, X[:, 1]])  # a repeated column: singular normal equations
    ours, ref = T.SufficientLinear().fit(twice, y), LinearRegression().fit(twice, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-8)
    assert ours.coef_[1] == pytest.approx(ours.coef_[4], rel=1e-8)


def test_walk_forward_in_chunks_equals_sklearn_on_the_whole_rows(catalog, tmp_path, monkeypatch):
    """quotelab train on the real day, every array as long as the data in scratch files and read 300
    rows at a time, gives what sklearn fits and scores on the whole rows in memory: each fold's and
    the final coefficients, the out-of-sample predictions and scores, and the provenance hash."""
    import hashlib

    from sklearn.linear_model import Ridge

    from quotelab import spool

    monkeypatch.setattr(spool, "CHUNK", 300)
    path = write(tmp_path, DATA + FEATURES + "model: {kind: ridge, alpha: 3.0}\nvalidation: {folds: 3, purge: 2s}\n")
    res = T.run_train(path, catalog=catalog, out_dir=tmp_path / "out")
    smp = res.samples["native"]
    assert isinstance(smp.X, np.memmap) and len(smp.target) > 10 * 300
    X, y, t = np.array(smp.X), np.array(smp.target), np.array(smp.t)
    oos = np.full(len(y), np.nan)
    edges = np.linspace(0, len(y), 5).astype(np.int64)
    for k, row in enumerate(res.report["folds"], start=1):
        train = t < t[edges[k]] - 2_000_000_000
        ref = Ridge(alpha=3.0).fit(X[train], y[train])
        assert row["n_train"] == train.sum()
        np.testing.assert_allclose([row["coef"][n] for n in smp.frame.names], ref.coef_, rtol=1e-9, atol=1e-12)
        assert row["coef"]["intercept"] == pytest.approx(ref.intercept_, rel=1e-9, abs=1e-12)
        test = slice(edges[k], edges[k + 1])
        oos[test] = ref.predict(X[test])
        r2 = 1 - np.sum((y[test] - oos[test]) ** 2) / np.sum((y[test] - y[test].mean()) ** 2)
        assert row["oos_r2"] == pytest.approx(r2, rel=1e-9)
        assert row["oos_ic"] == pytest.approx(T.information_coefficient(y[test], oos[test]), rel=1e-9)
    np.testing.assert_allclose(res.fit.oos_pred, oos, rtol=1e-9, atol=1e-12)
    final = Ridge(alpha=3.0).fit(X, y)
    np.testing.assert_allclose(res.model.linear()[0], final.coef_, rtol=1e-9, atol=1e-12)
    ok = np.isfinite(oos)
    assert res.report["overall"]["oos_r2"] == pytest.approx(
        1 - np.sum((y[ok] - oos[ok]) ** 2) / np.sum((y[ok] - y[ok].mean()) ** 2), rel=1e-9)
    h = hashlib.sha256(np.ascontiguousarray(X).tobytes() + np.ascontiguousarray(y).tobytes())
    assert res.report["provenance"]["data_sha256"] == h.hexdigest()[:16]
    pred = pl.read_parquet(tmp_path / "out" / "predictions_native.parquet")
    assert len(pred) == len(smp.frame.timestamps) > len(y)
    np.testing.assert_array_equal(pred["value"].to_numpy()[np.asarray(smp.keep)], res.fit.oos_pred)


def test_gradient_boosting_past_max_rows_fits_evenly_spaced_rows_and_says_so(monkeypatch):
    """Past model.max_rows, gradient boosting is fitted on that many rows evenly spaced in time (the
    same fit as sklearn's on those rows), and the report and a warning say how many it used."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    rng = np.random.default_rng(9)
    n = 6_000
    X = rng.normal(size=(n, 2))
    y = np.sin(X[:, 0]) + 0.1 * rng.normal(size=n)
    t = np.arange(n, dtype=np.int64) * 100_000_000
    spec = T.ModelSpec(kind="gradient_boosting", max_iter=20, early_stopping=False, max_rows=1000)
    m = T.StaticModel(spec).fit(X, y, t)
    assert m.sampled == (n, 1000)
    rows = np.unique(np.linspace(0, n - 1, 1000).round().astype(np.int64))
    ref = HistGradientBoostingRegressor(max_iter=20, max_depth=3, learning_rate=0.05, random_state=0,
                                        early_stopping=False).fit(X[rows], y[rows])
    np.testing.assert_array_equal(m.predict(X), ref.predict(X))
    with pytest.warns(UserWarning, match=r"gradient boosting fitted on 1,000 of [\d,]+ training rows"):
        fit = T.fit_walk_forward(spec, X, y, t, ["a", "b"], 2, 0)
    assert fit.overall["sampled_rows"] == {"rows": n, "used": 1000, "max_rows": 1000}
    assert "sampled_rows" not in T.fit_walk_forward(spec.model_copy(update={"max_rows": n}), X, y, t, ["a", "b"], 2,
                                                    0).overall
