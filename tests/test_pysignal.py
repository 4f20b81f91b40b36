"""Python-function signals: registered through their hook, run by the engine step by step, and compared
with their kernel twin by check-plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from quotelab.backtest.engine import run_strategy
from quotelab.errors import ConfigError, PluginError
from quotelab.pysignal import PREFIX, compare
from quotelab.strategy.registry import load_registry

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "strategies" / "seed_market_maker.yaml"
FINAL = ("num_trades", "position", "balance", "fee")

# The book_imbalance formula written again as plain Python, registered as the Python twin of the
# built-in kernel. {plant} may add a difference to it.
TWIN = '''
from quotelab import hookimpl
from quotelab.component import Reads
from quotelab.layout import ASK_SZ, BID_SZ, TIME
from quotelab.plugins.book_imbalance import P, BookImbalanceParams
from quotelab.pysignal import PythonSignal

CALLS = [0]


def book_imbalance_py(view, trades, state, params):
    CALLS[0] += 1
    a = int(params[P.asset])
    total = 0.0
    for i in range(int(params[P.n_weights])):
        qb, qa = view[a, BID_SZ + i], view[a, ASK_SZ + i]
        total += params[P.weights + i] * ((qb - qa) / (qb + qa) if qb + qa > 0.0 else 0.0)
    {plant}
    return total


@hookimpl
def quotelab_register_python_signals(register):
    register(PythonSignal(
        name="book_imbalance", func=book_imbalance_py, params=BookImbalanceParams,
        reads=lambda p: Reads(assets=(p.asset,), depth_levels=len(p.weights)),
    ))
'''
PLANT_AT_S = 100.0
PLANT = f"if view[a, TIME] > {PLANT_AT_S}:\n        total += 1e-6"


def _twin_file(tmp_path: Path, plant: str = "pass", name: str = "twin.py") -> Path:
    path = tmp_path / name
    path.write_text(TWIN.replace("{plant}", plant))
    return path


def _strategy(tmp_path: Path, catalog: Path, kind: str, plugin: Path | None) -> Path:
    doc = yaml.safe_load(SEED.read_text())
    doc["data"]["catalog"] = str(catalog)
    doc["forecast"][0]["kind"] = kind
    if plugin is not None:
        doc["plugins"] = [str(plugin)]
    path = tmp_path / f"{kind.replace(':', '_')}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quotelab.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


# -------------------------------------------------------------------------------------------------
# In a strategy: the same fills as the kernel
# -------------------------------------------------------------------------------------------------


def test_python_signal_in_quotelab_run_gives_the_kernels_fills(real_catalog, tmp_path):
    plugin = _twin_file(tmp_path)
    py_yaml = _strategy(tmp_path, real_catalog, PREFIX + "book_imbalance", plugin)
    proc = _cli("run", str(py_yaml), "--json")
    assert proc.returncode == 0, proc.stderr
    by_python = json.loads(proc.stdout)
    kernel = run_strategy(_strategy(tmp_path, real_catalog, "book_imbalance", None)).summary
    assert kernel["num_trades"] > 50
    assert {k: by_python[k] for k in FINAL} == {k: kernel[k] for k in FINAL}
    assert by_python["quoting_steps"] == kernel["quoting_steps"]


def test_the_engine_really_calls_the_python_function_every_step(real_catalog, tmp_path):
    result = run_strategy(_strategy(tmp_path, real_catalog, PREFIX + "book_imbalance", _twin_file(tmp_path)))
    assert "numba.objmode" in result.composition.source and "book_imbalance_py" in result.composition.source
    generated = sys.modules[result.composition.module]
    func = next(v for v in vars(generated).values() if getattr(v, "__name__", "") == "book_imbalance_py")
    calls = func.__globals__["CALLS"][0]
    assert calls == result.summary["quoting_steps"] > 1000


def test_a_python_signal_changes_quotes_when_it_differs(real_catalog, tmp_path):
    # The fills comparison above means something only if a different Python signal changes fills.
    plugin = _twin_file(tmp_path, "total = -total", name="negated.py")
    flipped = run_strategy(_strategy(tmp_path, real_catalog, PREFIX + "book_imbalance", plugin)).summary
    kernel = run_strategy(_strategy(tmp_path, real_catalog, "book_imbalance", None)).summary
    assert {k: flipped[k] for k in FINAL} != {k: kernel[k] for k in FINAL}


def test_kernel_with_python_part_is_disk_cached_across_processes(tmp_path):
    plugin = _twin_file(tmp_path)
    script = f'''
import numpy as np
from quotelab.component import PackContext
from quotelab.strategy.composer import Part, compose
from quotelab.strategy.config import Alpha
from quotelab.strategy.registry import load_registry
r = load_registry(local_files=[{str(plugin)!r}], entry_points=False)
def part(role, name, params, where):
    c = r.get(role, name)
    return Part(c, c.make_params(params), where, alpha=Alpha(price=1.0 if role == "signal" else 0.0))
ctx = PackContext(asset_index={{"quoted": 0}}, tick_size={{"quoted": 0.1}}, lot_size={{"quoted": 0.001}},
                  quoted="quoted")
comp = compose([part("fair_value", "mid", {{}}, "fair_value[0]")],
               [part("signal", "py:book_imbalance", {{}}, "forecast[0]")], [],
               part("quoter", "fixed_spread", {{}}, "quoter"), ctx)
print(sum(comp.kernel.stats.cache_hits.values()), sum(comp.kernel.stats.cache_misses.values()))
'''
    env = {**os.environ, "QUOTELAB_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[0].stdout.split() == ["0", "1"]  # hits, misses: compiled and written
    assert runs[1].stdout.split() == ["1", "0"]  # loaded from the disk cache


def test_an_exception_in_the_python_function_names_the_part_and_function(real_catalog, tmp_path):
    plugin = _twin_file(tmp_path, f"if view[a, TIME] > {PLANT_AT_S}:\n        raise KeyError('boom')", "raises.py")
    with pytest.raises(PluginError, match=r"forecast\[0\]: python signal .*book_imbalance_py raised KeyError: 'boom'"):
        run_strategy(_strategy(tmp_path, real_catalog, PREFIX + "book_imbalance", plugin))


def test_a_non_float_return_is_an_error(real_catalog, tmp_path):
    plugin = _twin_file(tmp_path, "return None", "none.py")
    with pytest.raises(PluginError, match=r"forecast\[0\]: python signal .* must return a float, got None"):
        run_strategy(_strategy(tmp_path, real_catalog, PREFIX + "book_imbalance", plugin))


def test_unknown_python_kind_lists_the_registered_ones(real_catalog, tmp_path):
    path = _strategy(tmp_path, real_catalog, PREFIX + "book_imbalanse", _twin_file(tmp_path))
    with pytest.raises(ConfigError, match=r"unknown signal kind 'py:book_imbalanse'; registered: py:book_imbalance"):
        run_strategy(path)


# -------------------------------------------------------------------------------------------------
# check-plugin
# -------------------------------------------------------------------------------------------------


def _kernel_replay(real_catalog: Path):
    from quotelab.pysignal import catalog_asset
    from quotelab.research.replay import replay_component

    registry = load_registry(entry_points=False)
    return replay_component(registry.get("signal", "book_imbalance"), {},
                            [catalog_asset(real_catalog, "binance-usdm", "BTCUSDT")])


def test_check_plugin_finds_a_planted_difference_at_its_step(real_catalog, tmp_path):
    plugin = _twin_file(tmp_path, PLANT, "planted.py")
    proc = _cli("check-plugin", "book_imbalance", "--catalog", str(real_catalog), "--plugin", str(plugin), "--json")
    assert proc.returncode == 1, proc.stderr
    got = json.loads(proc.stdout)["first_difference"]
    ref = _kernel_replay(real_catalog)
    i = int(np.flatnonzero((ref.timestamps - ref.origin_ns) * 1e-9 > PLANT_AT_S)[0])
    assert 0 < i < len(ref.timestamps) - 1
    assert got["step"] == i and got["timestamp_ns"] == int(ref.timestamps[i])
    assert got["kernel"] == ref.values[i]
    assert got["python"] == pytest.approx(ref.values[i] + 1e-6, abs=1e-15)
    text = _cli("check-plugin", "book_imbalance", "--catalog", str(real_catalog), "--plugin", str(plugin))
    assert text.returncode == 1
    assert f"first difference at step {i} of {len(ref.timestamps)}, timestamp {int(ref.timestamps[i])}" in text.stdout


def test_check_plugin_passes_when_the_twins_agree(real_catalog, tmp_path):
    proc = _cli("check-plugin", "book_imbalance", "--catalog", str(real_catalog), "--plugin",
                str(_twin_file(tmp_path)), "--json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert out["first_difference"] is None and out["steps"] > 3000 and out["max_abs_diff"] == 0.0


# Printed at the function's first call, through Python's sys.stdout and straight to file descriptor 1 (as a
# library's C code or a child process writes).
PRINTS = ("if CALLS[0] == 1:\n        print('a python signal prints')\n        import os\n"
          "        os.write(1, b'a python signal writes to fd 1\\n')")


@pytest.mark.parametrize("verb", ["run", "check-plugin"])
def test_under_json_stdout_is_the_json_alone_when_a_python_signal_prints(real_catalog, tmp_path, verb):
    """Seen red: the signal's two lines came first on stdout, so json.loads (and `| jq`) failed; only batch
    and optimize moved stdout aside."""
    plugin = _twin_file(tmp_path, PRINTS, "prints.py")
    if verb == "run":
        proc = _cli("run", str(_strategy(tmp_path, real_catalog, PREFIX + "book_imbalance", plugin)), "--json")
    else:
        proc = _cli("check-plugin", "book_imbalance", "--catalog", str(real_catalog), "--plugin", str(plugin), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # the whole of stdout
    assert out["num_trades"] > 50 if verb == "run" else out["first_difference"] is None
    assert "a python signal prints\n" in proc.stderr and "a python signal writes to fd 1\n" in proc.stderr


@pytest.mark.slow
def test_check_plugin_checks_a_signal_of_another_asset_given_with_with(real_catalog, tmp_path):
    from quotelab.pysignal import catalog_asset
    from quotelab.research.replay import replay_component

    eth = ("--with", "eth=binance-usdm:ETHUSDT", "--params", '{"asset": "eth"}')
    proc = _cli("check-plugin", "book_imbalance", "--catalog", str(real_catalog), "--plugin",
                str(_twin_file(tmp_path, PLANT, "planted.py")), *eth, "--json")
    assert proc.returncode == 1, proc.stderr
    got = json.loads(proc.stdout)
    # the kernel's values are ETH's book imbalance on BTC's grid, steps where both books are two-sided
    btc = catalog_asset(real_catalog, "binance-usdm", "BTCUSDT")
    other = catalog_asset(real_catalog, "binance-usdm", "ETHUSDT", name="eth")
    ref = replay_component(load_registry(entry_points=False).get("signal", "book_imbalance"), {"asset": "eth"},
                           [btc, other])
    alone = replay_component(load_registry(entry_points=False).get("signal", "book_imbalance"), {}, [btc])
    i = got["first_difference"]["step"]
    assert got["steps"] == len(ref.timestamps) > 3000
    assert got["first_difference"]["kernel"] == ref.values[i] != alone.values[i]
    text = _cli("check-plugin", "book_imbalance", "--catalog", str(real_catalog), "--plugin",
                str(_twin_file(tmp_path)), *eth)
    assert text.returncode == 0, text.stderr
    assert "agree at all" in text.stdout and "of binance-usdm/BTCUSDT, eth=binance-usdm/ETHUSDT" in text.stdout

    missing = _cli("check-plugin", "book_imbalance", "--catalog", str(real_catalog), "--plugin",
                   str(_twin_file(tmp_path)), "--params", '{"asset": "eth"}')
    assert missing.returncode == 2
    assert "params read asset 'eth', which is not given (assets: quoted); add it with --with eth=VENUE:SYMBOL" \
        in missing.stderr
    bad = _cli("check-plugin", "book_imbalance", "--catalog", str(real_catalog), "--with", "eth=ETHUSDT")
    assert bad.returncode == 2 and "--with 'eth=ETHUSDT': expected NAME=VENUE:SYMBOL" in bad.stderr


def test_check_plugin_without_a_python_twin_says_how_to_add_one(real_catalog):
    proc = _cli("check-plugin", "book_imbalance", "--catalog", str(real_catalog))
    assert proc.returncode == 2
    assert "no python signal 'book_imbalance' is registered" in proc.stderr
    assert "quotelab_register_python_signals" in proc.stderr


def test_compare_tolerance_and_nans():
    ts = np.arange(5, dtype=np.int64)
    k = np.array([1.0, np.nan, 2.0, 3.0, np.nan])
    same = compare("x", ts, k, k.copy(), rtol=0.0, atol=0.0)
    assert same.first_difference is None and same.n_different == 0
    p = np.array([1.0 + 1e-13, np.nan, 2.0, 3.5, 0.0])
    res = compare("x", ts, k, p, rtol=0.0, atol=1e-12)
    assert res.first_difference is not None and res.first_difference.step == 3 and res.n_different == 2
    assert compare("x", ts, k, p, rtol=0.0, atol=0.0).first_difference.step == 0
    assert compare("x", ts, k, p, rtol=1.0, atol=0.0).first_difference.step == 4  # NaN never matches a number


def test_compare_a_chunk_at_a_time_finds_what_one_pass_finds(monkeypatch):
    from quotelab import spool

    rng = np.random.default_rng(5)
    ts = np.arange(10_000, dtype=np.int64)
    k = rng.normal(size=10_000)
    p = k + np.where(rng.random(10_000) < 0.01, rng.normal(size=10_000), 0.0)
    p[[17, 9_000]] = np.nan
    k[[17, 5_000]] = np.nan
    whole = compare("x", ts, k, p, rtol=0.0, atol=1e-12)
    monkeypatch.setattr(spool, "CHUNK", 100)
    got = compare("x", ts, k, p, rtol=0.0, atol=1e-12)
    assert whole.n_different > 50
    assert (got.first_difference, got.n_different, got.max_abs_diff) == (
        whole.first_difference, whole.n_different, whole.max_abs_diff)
    bad = ~(np.isnan(k) & np.isnan(p)) & ~(np.abs(k - p) <= 1e-12)
    assert whole.n_different == bad.sum() and whole.max_abs_diff == np.nanmax(np.abs(k - p))
    assert whole.first_difference.step == np.flatnonzero(bad)[0] > 100  # found past the first chunk


# -------------------------------------------------------------------------------------------------
# Registration
# -------------------------------------------------------------------------------------------------

BAD_FUNC = '''
from quotelab import hookimpl
from quotelab.component import Params
from quotelab.pysignal import PythonSignal


class P(Params):
    pass


{body}
'''


@pytest.mark.parametrize(("body", "message"), [
    ("@hookimpl\ndef quotelab_register_python_signals(register):\n"
     "    def inner(view, trades, state, params):\n        return 0.0\n"
     "    register(PythonSignal(name='x', func=inner, params=P))",
     r"python signal 'x': .*inner must be defined at module level"),
    ("def f(view, trades):\n    return 0.0\n\n\n@hookimpl\ndef quotelab_register_python_signals(register):\n"
     "    register(PythonSignal(name='x', func=f, params=P))",
     r"python signal 'x': .*\.f must take \(view, trades, state, params\)"),
    ("@hookimpl\ndef quotelab_register_python_signals(register):\n    register(lambda *a: 0.0)",
     r'Error in plugin ".*bad\.py": the python-signal register\(\) takes a quotelab\.pysignal\.PythonSignal'),
])
def test_bad_registrations_are_named(tmp_path, body, message):
    path = tmp_path / "bad.py"
    path.write_text(BAD_FUNC.replace("{body}", body))
    with pytest.raises(PluginError, match=message):
        load_registry(local_files=[path], entry_points=False)


def test_python_signal_never_hides_its_kernel_twin(tmp_path):
    registry = load_registry(local_files=[_twin_file(tmp_path)], entry_points=False)
    assert registry.get("signal", "book_imbalance").kernel is not None
    py = registry.get("signal", PREFIX + "book_imbalance")
    assert py.func.__name__ == "book_imbalance_py" and py.source.endswith("twin.py")


def test_python_signal_scores_like_its_kernel_in_evaluate(real_catalog, tmp_path):
    from reference_impls import yaml_variant

    from quotelab.research.evaluate import evaluate

    estimators = [{"name": name, "fair_value": [{"kind": "mid"}], "forecast": [{"kind": kind, "alpha": "1tick"}]}
                  for name, kind in (("kernel", "book_imbalance"), ("python", "py:book_imbalance"))]
    path = yaml_variant(REPO / "strategies" / "fair_value_study.yaml", tmp_path, real_catalog, targets=["btc"],
                        plots=False, estimators=estimators, plugins=[str(_twin_file(tmp_path))])
    rows = evaluate(path).rows
    by = {(r["estimator"], r["horizon"]): r for r in rows}
    horizons = {r["horizon"] for r in rows}
    assert len(horizons) == 5
    for h in horizons:
        k, p = by[("kernel", h)], by[("python", h)]
        assert (k["n"], k["sse"], k["bias"]) == (p["n"], p["sse"], p["bias"]), h
    assert by[("kernel", "1s")]["sse"] != by[("kernel", "100ms")]["sse"]


def test_python_signal_that_raises_in_evaluate_names_its_place(real_catalog, tmp_path):
    from reference_impls import yaml_variant

    from quotelab.research.evaluate import evaluate

    estimators = [{"name": "python", "fair_value": [{"kind": "mid"}],
                   "forecast": [{"kind": "py:book_imbalance", "alpha": "1tick"}]}]
    plant = f"if view[a, TIME] > {PLANT_AT_S}:\n        raise ValueError('boom')"
    path = yaml_variant(REPO / "strategies" / "fair_value_study.yaml", tmp_path, real_catalog, targets=["btc"],
                        plots=False, estimators=estimators, plugins=[str(_twin_file(tmp_path, plant))])
    with pytest.raises(PluginError, match=r"estimators\[0\]\.forecast\[0\].*boom"):
        evaluate(path)


FUNDING_TWIN = '''
from quotelab import hookimpl
from quotelab.plugins import funding_rate
from quotelab.pysignal import PythonSignal


def funding_rate_py(view, trades, state, params):
    return funding_rate.funding_rate_nb.py_func(view, trades, state, params, None)


@hookimpl
def quotelab_register_python_signals(register):
    from quotelab.strategy.registry import load_registry

    kernel = load_registry(entry_points=False).get("signal", "funding_rate")
    register(PythonSignal.twin_of(kernel, funding_rate_py))
'''


def test_check_plugin_gives_a_funding_signal_the_catalogs_funding_rows(tmp_path):
    """Seen red: catalog_asset loaded no funding rows, so checking a funding-reading signal failed with
    "asset 'quoted' has no funding rows in the catalog" on a catalog that has them."""
    from quotelab.data import catalog as cat
    from quotelab.data import synth
    from quotelab.pysignal import catalog_asset, check_signal

    synth.generate(tmp_path, duration_s=600, assets="perp", funding_interval_s=240)
    (tmp_path / "funding_twin.py").write_text(FUNDING_TWIN)
    registry = load_registry(local_files=[tmp_path / "funding_twin.py"], entry_points=False)
    asset = catalog_asset(tmp_path, "synthetic", "SYNPERP")
    rows = cat.load_funding(tmp_path, "synthetic", "SYNPERP", ["20240101"])
    res = check_signal(registry, "funding_rate", [asset], step=1.0)
    assert np.array_equal(asset.funding, rows)
    assert res.first_difference is None and res.steps > 500
    # the values are the rows' rates, point-in-time: the last row at or before each step (bps)
    i = np.searchsorted(rows["exch_ts"], res.timestamps, side="right") - 1
    want = np.where(i >= 0, rows["rate"][np.maximum(i, 0)] * 1e4, 0.0)
    assert np.unique(want).size > 100 and np.array_equal(res.kernel, want)
