"""The composed seed strategy against the hand-written loop, and the engine's contracts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from handwritten import run_seed_by_hand
from hftbacktest.types import LOCAL_EVENT

from quotelab.backtest.engine import run_strategy
from quotelab.data import catalog as cat
from quotelab.errors import ConfigError, DataError, RunError

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "strategies" / "seed_market_maker.yaml"
FINAL = ("num_trades", "position", "balance", "fee")


@pytest.mark.slow
def test_seed_yaml_reproduces_handwritten_loop_exactly(real_catalog):
    composed = run_strategy(SEED, catalog=real_catalog).summary
    by_hand = run_seed_by_hand([cat.load_day(real_catalog, "binance-usdm", "BTCUSDT", "20240808")])
    assert composed["num_trades"] > 50  # the comparison means something only if it trades
    assert {k: composed[k] for k in FINAL} == {k: by_hand[k] for k in FINAL}
    assert composed["quoting_steps"] == by_hand["quoting_steps"]



@pytest.mark.slow
def test_uncompressed_catalog_converts_maps_and_runs_identically(real_catalog, shared_data, tmp_path):
    """`convert --compression none` writes the same rows; the mapped days run and evaluate as the deflated ones."""
    from quotelab.research.evaluate import evaluate

    for symbol in ("BTCUSDT", "ETHUSDT"):
        raw = shared_data / "binance" / "usdm" / f"{symbol.lower()}_20240808.gz"
        out = subprocess.run([sys.executable, "-m", "quotelab.cli", "convert", "--format", "binance-usdm", "--symbol",
                              symbol, "--catalog", str(tmp_path), "--compression", "none", str(raw)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        for day in cat.list_days(real_catalog, "binance-usdm", symbol):
            mapped = cat.load_day(tmp_path, "binance-usdm", symbol, day)
            assert isinstance(mapped.base, np.memmap)
            np.testing.assert_array_equal(mapped, cat.load_day(real_catalog, "binance-usdm", symbol, day))
    timing = ("compile_seconds", "run_seconds", "events_per_second", "seconds")
    mapped_run, deflated_run = (run_strategy(SEED, catalog=c).summary for c in (tmp_path, real_catalog))
    assert mapped_run["num_trades"] > 50
    same = {k for k in mapped_run if k not in timing and not isinstance(mapped_run[k], float)}
    assert {k: mapped_run[k] for k in same} == {k: deflated_run[k] for k in same}
    # floats to 1e-12: hftbacktest's balance can differ in its last bits between processes on the
    # same data (seen on the synthetic demo), so exact float equality would test hftbacktest
    floats = [k for k in mapped_run if k not in timing and k not in same]
    np.testing.assert_allclose([mapped_run[k] for k in floats], [deflated_run[k] for k in floats], rtol=1e-12)
    study = REPO / "strategies" / "midprice_study.yaml"
    mapped_rows, deflated_rows = (json.dumps(evaluate(study, catalog=c).rows) for c in (tmp_path, real_catalog))
    assert mapped_rows == deflated_rows  # as text: NaN (the undefined ic) equals itself there

    bad = subprocess.run([sys.executable, "-m", "quotelab.cli", "convert", "--format", "binance-usdm", "--symbol",
                          "ETHUSDT", "--catalog", str(tmp_path), "--compression", "zip", str(raw)],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "unknown compression 'zip'; use one of deflate, none" in bad.stderr
    assert "Traceback" not in bad.stderr

def _write(tmp_path: Path, doc: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _seed_doc(real_catalog: Path) -> dict:
    doc = yaml.safe_load(SEED.read_text())
    doc["data"]["catalog"] = str(real_catalog)
    return doc


def test_reference_asset_does_not_shift_quoted_fills(real_catalog, tmp_path):
    # Without an explicit grid origin hftbacktest starts the step grid at the earliest event of all
    # assets, so a reference asset that starts earlier would shift the quoted asset's fills (#315).
    from quotelab.data.assets import Asset

    first = {}
    for sym in ("BTCUSDT", "ETHUSDT"):
        day = cat.load_day(real_catalog, "binance-usdm", sym, "20240808")
        first[sym] = Asset(sym, [day], 1, 1).first_ts()
    quoted, ref = sorted(first, key=first.get, reverse=True)
    assert first[ref] < first[quoted]  # the reference really starts earlier
    doc = _seed_doc(real_catalog)
    doc["data"]["assets"]["perp"]["symbol"] = quoted
    alone = run_strategy(_write(tmp_path, doc, "alone.yaml")).summary
    doc["data"]["assets"]["ref"] = {"venue": "binance-usdm", "symbol": ref, "dates": [20240808]}
    with_ref = run_strategy(_write(tmp_path, doc, "with_ref.yaml")).summary
    assert alone["num_trades"] > 50
    assert {k: with_ref[k] for k in FINAL} == {k: alone[k] for k in FINAL}
    doc["engine"]["origin"] = "first"  # hftbacktest's implicit grid: the fills do move
    shifted = run_strategy(_write(tmp_path, doc, "shifted.yaml")).summary
    assert {k: shifted[k] for k in FINAL} != {k: alone[k] for k in FINAL}


def test_parameter_sweep_does_not_recompile(real_catalog):
    first = run_strategy(SEED, catalog=real_catalog, overrides=["quoter.params.half_spread=3"])
    results = [run_strategy(SEED, catalog=real_catalog, overrides=[f"quoter.params.half_spread={h}"])
               for h in (1, 2, 4)]
    assert all(r.composition.module == first.composition.module for r in results)
    assert all(r.summary["compile_seconds"] < 0.5 for r in results)
    # different values really reach the kernel: fills differ across half spreads
    assert len({r.summary["num_trades"] for r in results}) == 3


def test_event_mode_runs_and_quotes(real_catalog, tmp_path):
    doc = _seed_doc(real_catalog)
    doc["engine"]["mode"] = "event"
    doc["engine"]["record_every"] = "1s"
    s = run_strategy(_write(tmp_path, doc)).summary
    day = cat.load_day(real_catalog, "binance-usdm", "BTCUSDT", "20240808")
    arrivals = np.unique(day["local_ts"][(day["ev"] & LOCAL_EVENT) == LOCAL_EVENT])
    # one step per feed arrival after the first (the clock starts on it)
    assert s["steps"] == len(arrivals) - 1
    assert s["num_trades"] > 0


NAN_PLUGIN = '''
import numpy as np
from numba import njit
from quotelab import hookimpl
from quotelab.component import Component, Params
from quotelab.layout import TIME


class P(Params):
    after_seconds: float = 60.0


@njit(inline="always")
def nan_after_nb(view, trades, state, params, out):
    return np.nan if view[0, TIME] > params[0] else 0.0


@hookimpl
def quotelab_register_components(register):
    register(Component(role="signal", name="nan_after", params=P, kernel=nan_after_nb))
'''


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_kernel_output_stops_or_skips(real_catalog, tmp_path, policy):
    (tmp_path / "nanplug.py").write_text(NAN_PLUGIN)
    doc = _seed_doc(real_catalog)
    doc["plugins"] = ["nanplug.py"]
    doc["engine"]["on_nonfinite"] = policy
    doc["forecast"].append({"kind": "nan_after", "alpha": 1.0, "params": {"after_seconds": 60.0}})
    path = _write(tmp_path, doc)
    if policy == "stop":
        with pytest.raises(RunError, match=r"forecast\[1\] \(signal 'nan_after'\) produced a non-finite value at "
                                           r"timestamp \d+") as info:
            run_strategy(path)
        kept = info.value.result.summary
        assert 500 < kept["quoting_steps"] < 700  # the first minute's work is kept, not lost
    else:
        s = run_strategy(path).summary
        assert s["nonfinite_skipped"] > 0
        assert s["quoting_steps"] + s["nonfinite_skipped"] + s["warmup_steps"] == s["steps"]


def test_config_errors_name_file_line_and_path(real_catalog, tmp_path):
    doc = _seed_doc(real_catalog)
    doc["forecast"][0]["params"] = {"weights": [1.0], "levlels": 3}
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError, match=r"s\.yaml:\d+: forecast\[0\]\.params\.levlels: unknown key; expected one "
                                          r"of: asset, weights"):
        run_strategy(path)
    doc = _seed_doc(real_catalog)
    doc["forecast"][0]["kind"] = "book_imbalanse"
    with pytest.raises(ConfigError, match=r"forecast\[0\]\.kind: unknown signal kind 'book_imbalanse'; "
                                          r"registered: book_imbalance"):
        run_strategy(_write(tmp_path, doc))
    doc = _seed_doc(real_catalog)
    doc["quoter"]["params"]["half_spread"] = "5bps"
    with pytest.raises(ConfigError, match=r"quoter\.params\.half_spread: unit mismatch: expected ticks"):
        run_strategy(_write(tmp_path, doc))
    doc = _seed_doc(real_catalog)
    doc["forecast"][0]["params"]["asset"] = "spot"
    with pytest.raises(ConfigError, match=r"reads asset 'spot', which has no data; data.assets has: perp"):
        run_strategy(_write(tmp_path, doc))
    doc = _seed_doc(real_catalog)
    doc["forecast"][0]["alpha"] = "2 spreadz"
    with pytest.raises(ConfigError, match=r"forecast\[0\]\.alpha: .*'<n> ticks', '<n> bps' or '<n> spreads', "
                                          r"got '2 spreadz'"):
        run_strategy(_write(tmp_path, doc))


def test_yaml_typo_line_number_is_the_typo_line(real_catalog, tmp_path):
    text = SEED.read_text().replace("  step: 100ms", "  stepp: 100ms")
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    line = text.splitlines().index("  stepp: 100ms") + 1
    with pytest.raises(ConfigError, match=rf"typo\.yaml:{line}: engine\.stepp: unknown key"):
        run_strategy(path, catalog=real_catalog)


def test_yaml_tags_that_construct_objects_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text('name: !!python/object/apply:os.system ["touch pwned"]\n')
    with pytest.raises(ConfigError, match="is not allowed"):
        run_strategy(path)
    assert not Path("pwned").exists()


def test_missing_day_and_zero_tick(real_catalog, tmp_path):
    doc = _seed_doc(real_catalog)
    doc["data"]["assets"]["perp"]["dates"] = [20240807]
    with pytest.raises(DataError, match=r"binance-usdm/BTCUSDT/20240807 is missing from catalog .*days present: "
                                        r"20240808"):
        run_strategy(_write(tmp_path, doc))
    doc = _seed_doc(real_catalog)
    doc["data"]["assets"]["perp"]["tick_size"] = 0
    with pytest.raises(ConfigError, match=r"s\.yaml:\d+: data\.assets\.perp\.tick_size: Input should be greater "
                                          r"than 0"):
        run_strategy(_write(tmp_path, doc))


def test_cli_run_json_in_subprocess(real_catalog, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "quotelab.cli", "run", str(SEED), "--catalog", str(real_catalog), "--json",
         "--set", "quoter.params.half_spread=3", "--out", str(out)],
        capture_output=True, text=True, check=True,
    )
    s = json.loads(proc.stdout)
    for key in ("num_trades", "position", "balance", "fee", "equity", "steps", "events", "compile_seconds",
                "run_seconds"):
        assert key in s
    saved = json.loads((out / "summary.json").read_text())
    assert saved["num_trades"] == s["num_trades"] and "MaxDrawdown" in saved["stats"]
    assert "SR" not in saved["stats"]  # six minutes: nothing annualised
    import polars as pl

    series = pl.read_parquet(out / "series.parquet")
    assert len(series) == s["quoting_steps"]
    assert series["num_trades"][-1] <= s["num_trades"]


@pytest.mark.slow
def test_driver_is_loaded_from_the_disk_cache_in_a_new_process(real_catalog, tmp_path):
    """The driver calls hftbacktest's C functions by name (backtest_c), so numba caches it: a second
    process loads it instead of compiling it, and runs the same backtest."""
    script = (
        "import json, sys\n"
        "from quotelab.backtest import driver as D\n"
        "from quotelab.backtest.engine import run_strategy\n"
        f"s = run_strategy({str(SEED)!r}, catalog={str(real_catalog)!r}).summary\n"
        "print(json.dumps([sum(D.run_driver.stats.cache_hits.values()), sum(D.run_driver.stats.cache_misses.values()),"
        " [s[k] for k in ('num_trades', 'position', 'balance', 'fee', 'quoting_steps')]]))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "QUOTELAB_CACHE": str(tmp_path / "kernels")}
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                                      check=True).stdout) for _ in range(2)]
    assert runs[0][:2] == [0, 1]  # compiled and written
    assert runs[1][:2] == [1, 0]  # loaded
    assert runs[1][2] == runs[0][2] and runs[0][2][0] > 100
    hand = run_seed_by_hand([cat.load_day(real_catalog, "binance-usdm", "BTCUSDT", "20240808")])
    assert runs[1][2] == [hand[k] for k in (*FINAL, "quoting_steps")]


def test_cli_error_is_one_line_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {quote: x, assets: {}}\nfair_value: []\nquoter: {kind: fixed_spread}\nbogus: 1\n")
    proc = subprocess.run([sys.executable, "-m", "quotelab.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "bad.yaml:4: bogus: unknown key" in proc.stderr


CONST_PLUGIN = '''
from numba import njit
from quotelab import hookimpl
from quotelab.component import Component, Params


class P(Params):
    pass


@njit(inline="always")
def constant_nb(view, trades, state, params, out):
    return {value}


@hookimpl
def quotelab_register_components(register):
    register(Component(role="signal", name="constant", params=P, kernel=constant_nb))
'''


@pytest.mark.slow
def test_edited_plugin_is_never_served_from_a_stale_cache(real_catalog, tmp_path):
    plugin = tmp_path / "constplug.py"
    doc = _seed_doc(real_catalog)
    doc["plugins"] = ["constplug.py"]
    doc["forecast"] = [{"kind": "constant", "alpha": "1tick"}]
    path = _write(tmp_path, doc)
    env = {**__import__("os").environ, "QUOTELAB_CACHE": str(tmp_path / "cache")}
    results, modules = [], []
    for value in ("0.0", "3.0", "0.0"):
        plugin.write_text(CONST_PLUGIN.format(value=value))
        proc = subprocess.run([sys.executable, "-m", "quotelab.cli", "run", str(path), "--json"],
                              capture_output=True, text=True, check=True, env=env)
        results.append(json.loads(proc.stdout))
        modules.append({p.name for p in (tmp_path / "cache" / "kernels").glob("k_*.py")})
    assert results[0]["balance"] != results[1]["balance"]  # the edit reached the fused kernel
    assert results[0]["balance"] == results[2]["balance"]  # and reverting it restores the old result
    # the edit wrote new modules (the edited part and the strategy calling it); the revert wrote none
    assert modules[0] < modules[1] == modules[2]


HELPER_PLUGIN = '''
from numba import njit
from helpermod import offset_nb
from quotelab import hookimpl
from quotelab.component import Component, Params


class P(Params):
    pass


@njit(inline="always")
def offset_signal_nb(view, trades, state, params, out):
    return offset_nb()


@hookimpl
def quotelab_register_components(register):
    register(Component(role="signal", name="offset_signal", params=P, kernel=offset_signal_nb))
'''


@pytest.mark.slow
def test_edited_helper_kernel_in_another_module_is_recompiled(real_catalog, tmp_path):
    # numba's cache does not see edits of functions in other files: the key must follow the imports.
    (tmp_path / "helperplug.py").write_text(HELPER_PLUGIN)
    doc = _seed_doc(real_catalog)
    doc["plugins"] = ["helperplug.py"]
    doc["forecast"] = [{"kind": "offset_signal", "alpha": "1tick"}]
    path = _write(tmp_path, doc)
    env = {**__import__("os").environ, "QUOTELAB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    balances = []
    for value in ("0.0", "3.0"):
        (tmp_path / "helpermod.py").write_text(f"from numba import njit\n\n\n@njit(inline='always')\n"
                                               f"def offset_nb():\n    return {value}\n")
        proc = subprocess.run([sys.executable, "-m", "quotelab.cli", "run", str(path), "--json"],
                              capture_output=True, text=True, check=True, env=env)
        balances.append(json.loads(proc.stdout)["balance"])
    assert balances[0] != balances[1]


def test_linear_forecast_reads_only_earlier_components_of_the_kinds_it_names(tmp_path):
    from quotelab.research.evaluate import load_eval
    from quotelab.strategy.config import load_strategy

    doc = yaml.safe_load((REPO / "strategies" / "linear_model.yaml").read_text())
    lin = doc["forecast"][1]["params"]

    def load(**params):
        doc["forecast"][1]["params"] = {**lin, **params}
        return load_strategy(_write(tmp_path, doc))

    load()
    load(features=["multi_level_imbalance_mid", "mid", "order_flow_imbalance"])
    before = (r"it can read 0: fair_value\[0\] \(mid\); 1: fair_value\[1\] \(multi_level_imbalance_mid\); "
              r"2: forecast\[0\] \(order_flow_imbalance\)")
    with pytest.raises(ConfigError, match=r"s\.yaml:\d+: forecast\[1\]\.params\.inputs\[2\]: input 3 is not a "
                                          r"component that runs before this 'linear_forecast' \(component 3 of the "
                                          r"strategy\); " + before):
        load(inputs=[1, 0, 3])
    with pytest.raises(ConfigError, match=r"forecast\[1\]\.params\.inputs\[0\]: input 1 is fair_value\[1\] "
                                          r"\(multi_level_imbalance_mid\), but features\[0\] is 'mid': the block was "
                                          r"made for another order of parts"):
        load(features=["mid", "multi_level_imbalance_mid", "order_flow_imbalance"])
    with pytest.raises(ConfigError, match=r"forecast\[1\]\.params.*one feature kind per input"):
        load(features=["mid"])

    # in an evaluation's bank a later slot holds another estimator's output: refused the same way
    ev = {"name": "e", "data": doc["data"], "estimators": [
        {"name": "a", "fair_value": [{"kind": "mid"}]},
        {"name": "b", "fair_value": [{"kind": "mid"}], "forecast": [
            {"kind": "book_imbalance", "alpha": 0}, {"kind": "linear_forecast", "alpha": 1.0,
                                                     "params": {"inputs": [1, 2], "coefficients": [1.0, 1.0]}}]}]}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(ev, sort_keys=False))
    with pytest.raises(ConfigError, match=r"eval\.yaml:\d+: estimators\[1\]\.forecast\[1\]\.params\.inputs\[1\]: "
                                          r"input 2 is not a component .*estimator 'b'\); it can read 0: "
                                          r"estimators\[1\]\.fair_value\[0\] \(mid\); 1: estimators\[1\]\.forecast"):
        load_eval(path)
    ev["estimators"][1]["forecast"][1]["params"]["inputs"] = [1, 0]
    path.write_text(yaml.safe_dump(ev, sort_keys=False))
    load_eval(path)
