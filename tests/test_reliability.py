"""Hostile input (issue 16, the input, config and CLI half): every case either runs or ends in a clear
one-line error before any work; nothing hangs, nothing is silently wrong, no computed result is lost."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotelab.backtest.engine import run_strategy
from quotelab.batch import load_batch
from quotelab.errors import ConfigError, PluginError, QuotelabError, RunError
from quotelab.research.evaluate import evaluate, load_eval
from quotelab.research.train import load_train
from quotelab.strategy.config import MAX_VALUES, load_strategy

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "strategies" / "seed_market_maker.yaml"


def _cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quotelab.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def _seed_text(catalog: Path | str = "../catalog") -> str:
    return SEED.read_text().replace("catalog: ../catalog", f"catalog: {catalog}")


def _line(text: str, fragment: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


# ------------------------------------------------------------------------------------------------
# YAML: one loader for every document
# ------------------------------------------------------------------------------------------------

# 9 levels of 9 aliases: 9**10 values once expanded; PyYAML parses it in milliseconds and any walk of
# the expanded tree never ends.
BOMB = 'a0: &a0 ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))

EVAL = """name: ev
data:
  catalog: {catalog}
  quote: btc
  assets:
    btc: {{venue: binance-usdm, symbol: BTCUSDT, dates: [20240808]}}
step: 100ms
horizons: [100ms, 1s]
plots: false
estimators:
  - name: mid
    fair_value: [{{kind: mid}}]
"""


def _load_as(kind: str, path: Path) -> object:
    return {"strategy": load_strategy, "batch": load_batch, "evaluation": load_eval, "training": load_train}[kind](path)


@pytest.mark.parametrize("kind", ["strategy", "batch", "evaluation", "training"])
def test_alias_bomb_is_an_error_in_every_loader(tmp_path, kind):
    """Seen red: `run`, `batch`, `evaluate` and `train` hung at 1.5 GB and growing."""
    path = tmp_path / f"{kind}.yaml"
    path.write_text(BOMB + _seed_text())
    with pytest.raises(ConfigError, match=rf"{kind}\.yaml:\d+: a\d\[.*: the document expands to more than "
                                          rf"{MAX_VALUES} values \(nested aliases\?\)"):
        _load_as(kind, path)


def test_duplicate_key_is_an_error_naming_both_lines(tmp_path):
    """Seen red: the last one won, exit 0."""
    text = _seed_text().replace("  params: {half_spread: 2ticks,", "  params: {half_spread: 9, half_spread: 2ticks,")
    text = text.replace("name: seed_market_maker\n", "name: seed_market_maker\nname: other\n")
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    first, second = _line(text, "name: seed_market_maker"), _line(text, "name: other")
    with pytest.raises(ConfigError, match=rf"^\S+dup\.yaml:{second}: name: duplicate key \(first at line {first}\)"):
        load_strategy(path)
    path.write_text(text.replace("name: other\n", ""))  # in a flow mapping too, with its path
    with pytest.raises(ConfigError, match=r"dup\.yaml:\d+: quoter\.params\.half_spread: duplicate key"):
        load_strategy(path)


def test_recursive_alias_deep_nesting_and_bad_scalars_are_one_line_errors(tmp_path):
    for body, expect in [("a: &a [*a]\n", r"a\[0\]: an alias refers to a mapping or list that contains it"),
                         ("a: " + "[" * 150 + "]" * 150 + "\n", r"nested more than 100 levels deep"),
                         ("a: !!int abc\n", r"a: invalid value: ValueError"),
                         ("? [a]\n: 1\n", r"a key must be a plain value"),
                         ("name: !!python/object/apply:os.system [x]\n", r"is not allowed")]:
        path = tmp_path / "x.yaml"
        path.write_text(body)
        with pytest.raises(ConfigError, match=expect) as info:
            load_strategy(path)
        assert "\n" not in str(info.value)


def test_merge_keys_merge_and_written_keys_win(tmp_path):
    text = _seed_text().replace("quoter:\n  kind: fixed_spread\n  params: {half_spread: 2ticks,",
                                "base: &q {half_spread: 7ticks, size: 0.01}\nquoter:\n  kind: fixed_spread\n"
                                "  params: {<<: *q, half_spread: 2ticks,")
    raw = yaml.safe_load(text)  # PyYAML's own reading of the same merge: the reference
    from quotelab.strategy.config import load_yaml

    data, _ = load_yaml(tmp_path / "m.yaml", text)
    assert data["quoter"]["params"] == raw["quoter"]["params"] == {"half_spread": "2ticks", "size": 0.01,
                                                                    "max_position": 0.1}


@pytest.mark.parametrize("value, expect", [
    ("[1,2", r"invalid YAML: did not find expected ',' or '\]'"),
    ("!!python/name:os.system", r"could not determine a constructor for the tag .*python/name:os\.system"),
    ("{a: 1, a: 2}", r"a: duplicate key"),
])
def test_set_values_go_through_the_same_loader(value, expect):
    """Seen red: a YAML traceback for an unterminated list and for a !!python tag."""
    with pytest.raises(ConfigError, match=rf"^--set 'quoter\.params\.half_spread={re.escape(value)}': {expect}") as e:
        load_strategy(SEED, [f"quoter.params.half_spread={value}"])
    assert "\n" not in str(e.value)
    loaded, _, parts = load_strategy(SEED, ["forecast[0].params.weights=[0.5, 0.5]"])
    assert parts[1][4].weights == (0.5, 0.5)


# ------------------------------------------------------------------------------------------------
# Numeric domains, checked before anything compiles or runs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, value, expect", [
    # seen red: each ran (exit 0, silently wrong) or ended in a traceback
    ("quoter.params.max_position", "1e308", r"1e\+308 is out of range \(at most 1e\+15 in magnitude\)"),
    ("quoter.params.max_position", ".inf", r"Input should be a finite number"),
    ("engine.step", "1e20ms", r"expected between 1 µs and 1 day, got 1e\+17 s"),
    ("engine.step", "1ns", r"expected between 1 µs and 1 day, got 1e-09 s"),
    ("engine.step", ".nan", r"Input should be a finite number"),
    ("engine.defaults.last_trades_capacity", "100000000000", r"Input should be less than or equal to 1000000"),
    ("engine.defaults.fees.maker", ".nan", r"Input should be a finite number"),
    ("engine.defaults.fees.taker", "2", r"a value fee is a fraction of the traded value \(0\.0002 = 2 bps\); 2 is "
                                        r"over 1%"),
    ("engine.defaults.latency.entry", "-10ms", r"expected between 0 s and 1 h, got -0\.01 s"),
    ("quoter.params.half_spread", ".inf", r"Input should be a finite number"),
    ("engine.record_every", "1ns", r"expected between 1 µs and 1 day \(or 0 for off\)"),
    ("engine.max_scan_ticks", "1000000000", r"Input should be less than or equal to 1000000"),
    ("forecast[0].alpha", "1e999 ticks", r"expected a number"),
    ("fair_value[0].weight", ".nan", r"Input should be a finite number"),
])
def test_numeric_domain_errors_name_where_the_value_came_from_and_its_path(path, value, expect):
    with pytest.raises(ConfigError) as info:
        load_strategy(SEED, [f"{path}={value}"])
    msg = str(info.value)  # the value came from the command line: the error names the --set, not a line
    assert re.fullmatch(rf"--set {re.escape(repr(f'{path}={value}'))}: {re.escape(path)}: {expect}.*", msg), msg
    key = path.split(".")[-1]
    text = SEED.read_text()
    if f"  {key}: " in text:  # the same value written in the file: its file and line
        line = _line(text, f"  {key}: ")
        lines = text.splitlines()
        lines[line - 1] = lines[line - 1].split(":")[0] + f": {value}"
        with pytest.raises(ConfigError) as info:
            load_strategy(SEED, text="\n".join(lines) + "\n")
        assert re.fullmatch(rf"\S+seed_market_maker\.yaml:{line}: {re.escape(path)}: {expect}.*", str(info.value))


def test_evaluate_step_and_horizon_domains(tmp_path):
    """Seen red: step 0 a ZeroDivisionError; horizon 0 'not a whole number of steps'; 1e30 s NaN everywhere."""
    for old, new, expect in [("step: 100ms", "step: 0", r"step: expected between 1 µs and 1 day, got 0 s"),
                             ("horizons: [100ms, 1s]", "horizons: [0]", r"horizons\[0\]: expected between 1 µs and "
                                                                        r"30 days, got 0 s"),
                             ("horizons: [100ms, 1s]", "horizons: [1e30]", r"horizons\[0\]: .* got 1e\+30 s"),
                             ("horizons: [100ms, 1s]", "horizons: []", r"horizons: List should have at least 1")]:
        path = tmp_path / "ev.yaml"
        text = EVAL.format(catalog="x").replace(old, new)
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"ev\.yaml:{_line(text, new.split(':')[0] + ':')}: {expect}"):
            load_eval(path)


def test_evaluate_horizon_longer_than_the_data_is_an_error_before_replay(real_catalog, tmp_path):
    path = tmp_path / "ev.yaml"
    path.write_text(EVAL.format(catalog=real_catalog).replace("horizons: [100ms, 1s]", "horizons: [100ms, 1h]"))
    with pytest.raises(ConfigError, match=r"horizons\[1\]: horizon 3600s is not shorter than the data of target "
                                          r"'btc' \(343\.\d+s\)"):
        evaluate(path)


# ------------------------------------------------------------------------------------------------
# The CLI's one error path
# ------------------------------------------------------------------------------------------------

BAD_PLUGIN = '''
import numpy as np
from numba import njit
from quotelab import hookimpl
from quotelab.component import Component, Params


class P(Params):
    after: float = 60.0


@njit(inline="always")
def raises_nb(view, trades, state, params, out):
    if view[0, 0] > params[0]:
        raise ValueError("boom in the kernel")
    return 0.0


@njit(inline="always")
def overread_nb(view, trades, state, params, out):
    return state[0] + state[3] * 0.0  # its state has one element


@hookimpl
def quotelab_register_components(register):
    register(Component(role="signal", name="raises", params=P, kernel=raises_nb))
    register(Component(role="signal", name="overread", params=P, kernel=overread_nb, state=lambda p: np.zeros(1)))
'''


def _with_plugin_signal(tmp_path: Path, catalog: Path, kind: str) -> Path:
    (tmp_path / "bad.py").write_text(BAD_PLUGIN)
    text = _seed_text(catalog).replace("name: seed_market_maker\n", "name: seed_market_maker\nplugins: [bad.py]\n")
    text = text.replace("forecast:\n", f"forecast:\n  - kind: {kind}\n    alpha: 0\n")
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow  # whole runs or replays in subprocesses: 10-25 s
def test_a_kernel_that_raises_is_one_line_naming_the_plugin_with_its_traceback_in_a_file(real_catalog, tmp_path):
    """Seen red: a numba traceback from `run` (batch already recorded a clean error)."""
    path = _with_plugin_signal(tmp_path, real_catalog, "raises")
    r = _cli("run", str(path), env={**os.environ, "TMPDIR": str(tmp_path)})  # where the traceback file goes
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.splitlines()
    m = re.fullmatch(r'error: Error in plugin ".*bad\.py": kernel raises_nb of forecast\[0\] \(signal \'raises\'\) '
                     r"raised ValueError: boom in the kernel \(traceback: (\S+)\)", line)
    assert m, line
    assert Path(m.group(1)).parent == tmp_path
    assert 'bad.py", line' in Path(m.group(1)).read_text() and "raise ValueError" in Path(m.group(1)).read_text()
    r = _cli("run", str(path), "--debug")
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr and "raise ValueError" in r.stderr


def test_an_unexpected_exception_is_a_summary_and_a_traceback_file(tmp_path):
    script = ("import sys\nfrom quotelab import cli\nfrom quotelab.backtest import engine\n"
              "def broken(*a, **k):\n    raise KeyError('no such thing')\n"
              "engine.run_strategy = broken\nsys.argv = ['quotelab', *sys.argv[1:]]\ncli.main()\n")
    r = subprocess.run([sys.executable, "-c", script, "run", str(SEED)], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 1
    (line,) = r.stderr.splitlines()
    m = re.fullmatch(r"error: unexpected KeyError: 'no such thing'; the full traceback is in (\S+) \(rerun with "
                     r"--debug to print it\)", line)
    assert m, line
    assert Path(m.group(1)).parent == tmp_path and "in broken" in Path(m.group(1)).read_text()
    r = subprocess.run([sys.executable, "-c", script, "run", str(SEED), "--debug"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "in broken" in r.stderr


# ------------------------------------------------------------------------------------------------
# Output locations
# ------------------------------------------------------------------------------------------------

def test_an_output_that_cannot_be_a_folder_is_refused_before_any_work(tmp_path):
    """Seen red: `run --out FILE` computed the whole backtest, then a FileExistsError traceback."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for args in (["run", str(SEED)], ["evaluate", str(REPO / "strategies" / "fair_value_study.yaml")],
                 ["train", str(REPO / "strategies" / "train_btc_usdm.yaml")]):
        r = _cli(*args, "--out", str(afile))
        assert r.returncode == 2 and r.stderr == f"error: --out {afile}: a file of that name exists; give a folder " \
                                                 "(it is created if missing)\n", r.stderr
    r = _cli("run", str(SEED), "--out", str(afile / "sub"))
    assert r.returncode == 2 and f"{afile} is a file, so {afile / 'sub'} cannot be created" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    r = _cli("run", str(SEED), "--out", str(ro / "out"))
    assert r.returncode == 2 and "is not writable by this user" in r.stderr


def test_results_are_saved_elsewhere_when_writing_fails_after_the_run(real_catalog, tmp_path, monkeypatch):
    """Seen red: with a read-only --out the backtest finished, then its result was lost."""
    from quotelab.backtest import engine

    real_save = engine.save_result
    out = tmp_path / "out"

    def save(result, out_dir, feed):
        if out_dir == out:
            raise PermissionError(13, "Permission denied")
        return real_save(result, out_dir, feed)

    monkeypatch.setattr(engine, "save_result", save)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the results are rescued to
    path = tmp_path / "s.yaml"
    path.write_text(_seed_text(real_catalog))
    with pytest.raises(RunError, match=rf"could not write the results to {out} \(Permission denied\); they were "
                                       r"saved to (\S+) instead") as info:
        run_strategy(path, out_dir=out)
    rescued = info.value.result.out_dir
    assert str(rescued) in str(info.value) and rescued.parent == tmp_path
    saved = json.loads((rescued / "summary.json").read_text())
    assert saved["num_trades"] == info.value.result.summary["num_trades"] > 100
    assert (rescued / "series.parquet").exists()


# ------------------------------------------------------------------------------------------------
# Kernel safety: run --check
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow  # whole runs or replays in subprocesses: 10-25 s
def test_run_check_names_a_kernel_that_reads_past_its_state(real_catalog, tmp_path):
    """Seen red: the kernel read the next component's state and the fills changed, exit 0."""
    path = _with_plugin_signal(tmp_path, real_catalog, "overread")
    with pytest.raises(PluginError, match=r'Error in plugin ".*bad\.py": kernel overread_nb of forecast\[0\] '
                                          r"\(signal 'overread'\) indexed outside its arrays \(IndexError: index is "
                                          r"out of bounds; found by bounds checking\)"):
        run_strategy(path, check=True)
    # a correct strategy checked gives the same result, from a kernel module of its own
    seed = tmp_path / "seed.yaml"
    seed.write_text(_seed_text(real_catalog))
    plain, checked = run_strategy(seed), run_strategy(seed, check=True)
    assert checked.composition.module != plain.composition.module
    assert "boundscheck=True" in checked.composition.source and "boundscheck" not in plain.composition.source
    for key in ("num_trades", "position", "balance", "fee", "quoting_steps"):
        assert checked.summary[key] == plain.summary[key]


@pytest.mark.slow  # whole runs or replays in subprocesses: 10-25 s
def test_the_run_check_flag_reaches_the_kernel(real_catalog, tmp_path):
    path = _with_plugin_signal(tmp_path, real_catalog, "overread")
    r = _cli("run", str(path), "--check", env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 2 and "kernel overread_nb of forecast[0] (signal 'overread') indexed outside" in r.stderr
    assert len(r.stderr.splitlines()) == 1


TWINS = BAD_PLUGIN.replace("from quotelab.component import Component, Params", "from quotelab.component import "
                           "Component, Params\nfrom quotelab.pysignal import PythonSignal") + '''

def overread_py(view, trades, state, params):
    return state[0]


@hookimpl
def quotelab_register_python_signals(register):
    register(PythonSignal(name="overread", func=overread_py, params=P, state=lambda p: np.zeros(1)))
'''


@pytest.mark.slow  # whole runs or replays in subprocesses: 10-25 s
def test_check_plugin_checks_the_kernels_bounds(real_catalog, tmp_path):
    """Seen red: the kernel read past its state and the two 'agreed at all 3446 steps' (exit 0)."""
    (tmp_path / "twins.py").write_text(TWINS)
    r = _cli("check-plugin", "overread", "--catalog", str(real_catalog), "--plugin", str(tmp_path / "twins.py"),
             env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.match(r'error: Error in plugin ".*twins\.py": kernel overread_nb of signal \'overread\' indexed outside '
                    r"its arrays \(index is out of bounds; found by bounds checking\)", r.stderr), r.stderr


# ------------------------------------------------------------------------------------------------
# Property: any strategy YAML either validates or is a one-line error per problem
# ------------------------------------------------------------------------------------------------

def _assert_clean_error(exc: QuotelabError, path: Path) -> None:
    for line in str(exc).splitlines():
        assert line.startswith(f"{path}:") or line.startswith("--set "), str(exc)
    assert "Traceback" not in str(exc)


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(),
    st.text(alphabet="abc01.-e µ:", max_size=10),
    st.sampled_from(["100ms", "1ns", "1e20ms", "-1s", "2ticks", "5bps", "3 spreads", "1e308", ".inf", "quoted",
                     "perp", "mid", "20240808", "20240808..20240807"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(alphabet="abkindparms_", max_size=8), inner, max_size=4)),
    max_leaves=10)
# Raw text spliced into the dumped YAML: syntax errors, anchors, aliases, tags, duplicate keys.
JUNK = st.one_of(st.text(alphabet=":-[]{}&*!|>'\"#%@` \n\tab1", min_size=1, max_size=8),
                 st.sampled_from(["\nname: twice\n", "\nx: &a [1, 2]\ny: [*a, *a]\n", " !!python/name:os.system",
                                  " !!binary x", " *undefined", "\n  - kind: mid\n", " &k", "\n<<: {name: m}\n"]))


def _nodes(doc: object, at: tuple = ()) -> list[tuple]:
    out = [at]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _nodes(v, (*at, i))
    return out


HOSTILE = st.sampled_from([1e308, float("inf"), float("nan"), 0, -1, 10**11, "1ns", "1e20ms", "-10ms", 2**63])


def _numbers(doc: object) -> list[tuple]:
    out = []
    for at in _nodes(doc)[1:]:
        if at[0] == "data":  # a date or a tick size only picks data: the defects were in what runs
            continue
        node = doc
        for k in at:
            node = node[k]
        if isinstance(node, int | float) and not isinstance(node, bool) or isinstance(node, str) and node[:1].isdigit():
            out.append(at)
    return out


@st.composite
def hostile_numbers(draw: st.DrawFn, catalog: str) -> str:
    """The seed strategy with one to three of its numbers (with or without a unit) replaced by hostile values."""
    doc = yaml.safe_load(_seed_text(catalog))
    for at in draw(st.lists(st.sampled_from(_numbers(doc)), min_size=1, max_size=3, unique=True)):
        parent = doc
        for k in at[:-1]:
            parent = parent[k]
        parent[at[-1]] = draw(HOSTILE)
    return yaml.safe_dump(doc, sort_keys=False)


@st.composite
def strategy_texts(draw: st.DrawFn, catalog: str = "../catalog") -> str:
    """The seed strategy with a few random edits: values of any type replaced, keys removed or added,
    numbers perturbed, then maybe raw YAML text spliced in."""
    doc = yaml.safe_load(_seed_text(catalog))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.sampled_from(_nodes(doc)[1:]))
        parent = doc
        for k in at[:-1]:
            parent = parent[k]
        old = parent[at[-1]]
        op = draw(st.sampled_from(["replace", "number", "delete", "add"]))
        if op == "replace":
            parent[at[-1]] = draw(VALUES)
        elif op == "number" and isinstance(old, int | float | str) and not isinstance(old, bool):
            parent[at[-1]] = draw(st.floats() | st.integers(-(10**12), 10**12) | st.sampled_from(
                [f"{x}{u}" for x in ("0", "-1", "1e-7", "1e30", "nan") for u in ("ms", "ticks", "")]))
        elif op == "delete" and isinstance(parent, dict):
            del parent[at[-1]]
        elif op == "add" and isinstance(old, dict):
            old[draw(st.text(alphabet="abkindparms_", min_size=1, max_size=8))] = draw(VALUES)
    text = yaml.safe_dump(doc, sort_keys=False)
    if draw(st.booleans()):
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(JUNK) + text[i:]
    return text


def _is_one_line_per_problem(message: str, path: Path) -> bool:
    lines = message.splitlines()
    return bool(lines) and "Traceback" not in message and (
        len(lines) == 1 or all(line.startswith(f"{path}:") for line in lines))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=strategy_texts())
def test_any_strategy_yaml_validates_or_is_a_clean_error(tmp_path, text):
    """Through the config layer, in process: validation either passes or raises a QuotelabError (anything
    else, a traceback, fails the test); a hang would stop it."""
    path = tmp_path / "h.yaml"
    path.write_text(text)
    try:
        load_strategy(path)
    except QuotelabError as exc:
        assert _is_one_line_per_problem(str(exc), path), str(exc)


@pytest.mark.slow  # up to 5 `quotelab run` subprocesses, two of them full backtests: ~16-23 s
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(data=st.data())
def test_generated_strategies_run_or_fail_cleanly_through_the_cli(real_catalog, tmp_path, data):
    """A few strategies with hostile numbers through a real `quotelab run` (where most of issue 16's
    tracebacks were): exit 0 with a result, or exit 2 with one error line per problem; exit 1
    (unexpected) or a traceback fails the test."""
    text = data.draw(hostile_numbers(str(real_catalog)))
    path = tmp_path / "h.yaml"
    path.write_text(text)
    r = _cli("run", str(path), "--json")
    if r.returncode == 0:
        assert json.loads(r.stdout)["steps"] > 0
    else:
        assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
        assert _is_one_line_per_problem(r.stderr.removeprefix("error: "), path), r.stderr


def _limited_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a regression fails here, not the machine


def test_a_grid_that_records_billions_of_rows_is_refused_before_allocating(real_catalog, tmp_path):
    """Seen red: a 1 µs step over the 343 s window tried to allocate 35.8 GiB of records (MemoryError
    traceback under a 4 GB limit). Run in a process with that limit, so a regression cannot take the machine."""
    path = tmp_path / "s.yaml"
    path.write_text(_seed_text(real_catalog).replace("step: 100ms", "step: 1us"))
    r = subprocess.run([sys.executable, "-m", "quotelab.cli", "run", str(path)], capture_output=True, text=True,
                       preexec_fn=_limited_memory, timeout=600)
    assert r.returncode == 2, r.stderr
    assert re.fullmatch(r"error: \S+s\.yaml:\d+: engine\.record_every: 343\.4\d+ s of data recorded every 1e-06 s is "
                        r"343,4\d\d,\d\d\d records, \d+\.\d GiB held in memory \(at most 2 GiB\); "
                        r"set engine\.record_every \(e\.g\. 1s\) or a longer engine\.step\n", r.stderr), r.stderr
    path.write_text(_seed_text(real_catalog).replace("step: 100ms", "step: 1us\n  record_every: 1s"))
    assert load_strategy(path)  # recording every second is what the message suggests, and it validates

    # evaluate and train replay on a grid too (seen red: a MemoryError traceback from each)
    ev = tmp_path / "ev.yaml"
    ev.write_text(EVAL.format(catalog=real_catalog).replace("step: 100ms", "step: 1us").replace("[100ms, 1s]", "[1ms]"))
    tr = tmp_path / "tr.yaml"
    text = (REPO / "strategies" / "train_btc_usdm.yaml").read_text()
    tr.write_text(text[:text.index("transfer:")].replace("catalog: ../catalog", f"catalog: {real_catalog}")
                  .replace("grid: {step: 100ms}", "grid: {step: 1us}"))
    for command, path, key in (("evaluate", ev, "step"), ("train", tr, r"grid\.step")):
        r = subprocess.run([sys.executable, "-m", "quotelab.cli", command, str(path)], capture_output=True, text=True,
                           preexec_fn=_limited_memory, timeout=600)
        want = rf"error: \S+:\d+: {key}: 343\.\d+ s of .* on a 1e-06 s grid is 343,4\d\d,\d\d\d records, .*; use "
        assert r.returncode == 2 and re.match(want, r.stderr) and len(r.stderr.splitlines()) == 1, r.stderr
