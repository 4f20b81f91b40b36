"""Plugin loading: built-ins, entry points and local files through one registration path."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from quotelab import hookspecs
from quotelab.backtest.engine import run_strategy
from quotelab.errors import PluginError
from quotelab.strategy.registry import BUILTIN_PLUGINS, load_registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "quotelab-plugin-example"

PLUGIN = '''
from numba import njit
from quotelab import hookimpl
from quotelab.component import Component, Params


class P(Params):
    pass


@njit(inline="always")
def k_nb(view, trades, state, params, out):
    return 0.0


@hookimpl
def quotelab_register_components(register):
    register(Component(role="signal", name="{name}", params=P, kernel=k_nb))
'''


def test_every_hook_is_documented_with_params_and_return():
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("quotelab_")]
    assert specs
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        for param in inspect.signature(spec).parameters:
            assert f":param {param}:" in doc, f"{spec.__name__} does not document {param}"
        assert ":return:" in doc


def test_builtins_register_through_the_hook():
    registry = load_registry(entry_points=False)
    modules = {c.kernel_ref[0] for c in registry.all()}
    assert modules <= set(BUILTIN_PLUGINS)
    assert {c.source for c in registry.all()} == {f"quotelab {__import__('quotelab').__version__}"}


def test_example_package_is_found_through_its_entry_point():
    registry = load_registry()
    component = registry.get("signal", "trade_sign_ewma")
    assert component.source == "quotelab-plugin-example 0.1.0"


def test_example_plugin_strategy_runs_from_its_installed_package(real_catalog):
    s = run_strategy(EXAMPLE / "strategy.yaml", catalog=real_catalog).summary
    seed = run_strategy(REPO / "strategies" / "seed_market_maker.yaml", catalog=real_catalog).summary
    assert s["num_trades"] > 0
    assert (s["num_trades"], s["balance"]) != (seed["num_trades"], seed["balance"])  # the signal moved quotes


def test_trade_sign_ewma_kernel_against_naive_loop():
    import numpy as np
    from quotelab_plugin_example import trade_sign_ewma_nb

    from quotelab import layout as L

    rng = np.random.default_rng(3)
    view = np.zeros((1, L.VIEW_WIDTH))
    trades = np.zeros((1, 50, L.TR_WIDTH))
    state = np.zeros(1)
    expected = 0.0
    for _ in range(20):
        n = rng.integers(0, 50)
        sides = rng.choice([-1.0, 1.0], size=n)
        trades[0, :n, L.TR_SIDE] = sides
        view[0, L.N_TRADES] = n
        got = trade_sign_ewma_nb(view, trades, state, np.array([0.0, 0.2]), np.zeros(L.OUT_WIDTH))
        for side in sides:
            expected = 0.2 * side + 0.8 * expected
        assert got == pytest.approx(expected, abs=1e-12)


def test_registry_is_kept_per_process_unless_local_files_or_blocking_change(tmp_path, monkeypatch):
    from quotelab.strategy.registry import BLOCK_ENV

    monkeypatch.delenv(BLOCK_ENV, raising=False)
    shared = load_registry()
    assert load_registry() is shared
    assert load_registry(entry_points=False) is not shared
    local = tmp_path / "local.py"
    local.write_text(PLUGIN.format(name="local_only"))
    with_local = load_registry(local_files=[local])
    assert with_local is not shared and with_local.get("signal", "local_only")
    assert "local_only" not in shared.components["signal"]  # a local file never leaks into the kept one
    assert load_registry(local_files=[local]) is not with_local  # local files are imported every time
    monkeypatch.setenv(BLOCK_ENV, "example")  # the example package's entry point
    blocked = load_registry()
    assert blocked is not shared and "trade_sign_ewma" not in blocked.components["signal"]
    assert "trade_sign_ewma" in shared.components["signal"]


def test_duplicate_component_names_name_both_plugins(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(PLUGIN.format(name="twin"))
    b.write_text(PLUGIN.format(name="twin"))
    with pytest.raises(PluginError, match=r"two signal components are named 'twin': one from .*a\.py.*b\.py"):
        load_registry(local_files=[a, b], entry_points=False)


def test_duplicate_of_a_builtin_is_an_error(tmp_path):
    a = tmp_path / "a.py"
    a.write_text(PLUGIN.format(name="book_imbalance"))
    with pytest.raises(PluginError, match=r"named 'book_imbalance': one from \"quotelab 0\.1\.0\""):
        load_registry(local_files=[a], entry_points=False)


def test_plugin_import_error_names_the_plugin(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import not_a_module_anywhere\n")
    with pytest.raises(PluginError, match=r'Error importing plugin ".*broken\.py": ModuleNotFoundError'):
        load_registry(local_files=[bad], entry_points=False)


def test_plugin_raising_in_its_hook_is_named(tmp_path):
    bad = tmp_path / "raises.py"
    bad.write_text("from quotelab import hookimpl\n\n@hookimpl\ndef quotelab_register_components(register):\n"
                   "    raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match=r'Error in plugin ".*raises\.py": RuntimeError: boom'):
        load_registry(local_files=[bad], entry_points=False)


def test_non_inlined_kernel_is_rejected(tmp_path):
    bad = tmp_path / "slow.py"
    bad.write_text(PLUGIN.format(name="slow").replace('@njit(inline="always")', "@njit"))
    with pytest.raises(PluginError, match="must be declared @njit\\(inline='always'\\)"):
        load_registry(local_files=[bad], entry_points=False)


def test_plugins_command_lists_params_units_and_sources():
    proc = subprocess.run([sys.executable, "-m", "quotelab.cli", "plugins", "--json"], capture_output=True,
                          text=True, check=True)
    import json

    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    spread = {p["name"]: p for p in rows["fixed_spread"]["params"]}
    assert spread["half_spread"]["unit"] == "ticks" and spread["half_spread"]["default"] == 2.0
    assert rows["trade_sign_ewma"]["source"] == "quotelab-plugin-example 0.1.0"


LIFECYCLE = '''
import json
from pathlib import Path
from quotelab import hookimpl

LOG = Path(__file__).with_name("lifecycle.log")


@hookimpl
def quotelab_run_start(run):
    if run["name"] == "boom":
        raise RuntimeError("refused")
    with LOG.open("a") as fh:
        fh.write(json.dumps(["start", run["name"], sorted(run["assets"])]) + "\\n")


@hookimpl
def quotelab_run_end(run, result):
    with LOG.open("a") as fh:
        fh.write(json.dumps(["end", run["name"], result["num_trades"]]) + "\\n")
    raise ValueError("end hook broke")
'''

# An implementation may take only the hook parameters it uses, as pluggy allows.
RESULT_ONLY = '''
from pathlib import Path
from quotelab import hookimpl


@hookimpl
def quotelab_run_end(result):
    Path(__file__).with_name("result_only.log").write_text(str(result["num_trades"]))
'''


def test_lifecycle_hooks_run_around_a_backtest(real_catalog, tmp_path):
    import json

    import yaml

    (tmp_path / "life.py").write_text(LIFECYCLE)
    (tmp_path / "result_only.py").write_text(RESULT_ONLY)
    doc = yaml.safe_load((REPO / "strategies" / "seed_market_maker.yaml").read_text())
    doc["data"]["catalog"] = str(real_catalog)
    doc["plugins"] = ["life.py", "result_only.py"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    s = run_strategy(tmp_path / "s.yaml").summary
    log = [json.loads(line) for line in (tmp_path / "lifecycle.log").read_text().splitlines()]
    assert log == [["start", "seed_market_maker", ["perp"]], ["end", "seed_market_maker", s["num_trades"]]]
    # a failing end hook is reported with the plugin's name; the result is kept
    assert len(s["hook_errors"]) == 1 and "life.py" in s["hook_errors"][0] and "end hook broke" in s["hook_errors"][0]
    assert (tmp_path / "result_only.log").read_text() == str(s["num_trades"])  # seen red: a TypeError in hook_errors
    doc["name"] = "boom"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    refused = r'Error in plugin ".*life\.py" \(quotelab_run_start\): RuntimeError: refused'
    with pytest.raises(PluginError, match=refused):
        run_strategy(tmp_path / "s.yaml")
