"""One grammar for every verb that reads a YAML: FILE, ``--set PATH=VALUE`` (repeatable, the value read
by the one YAML loader, errors naming the ``--set``) and ``--catalog DIR``, the same options everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quotelab.errors import ConfigError
from quotelab.strategy.config import apply_overrides, load_yaml, place

CLI = [sys.executable, "-m", "quotelab.cli"]
YAML_VERBS = ["run", "evaluate", "train", "batch", "optimize"]


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SYNPERP over midnight: half an hour on 20240101 and half an hour on 20240102."""
    root = tmp_path_factory.mktemp("grammar_catalog")
    r = _cli("synth", "--catalog", root, "--start", "2024-01-01T23:30:00", "--duration", "1h", "--assets", "perp")
    assert r.returncode == 0, r.stderr
    return root


# The data section of the run, evaluate and train documents: SYNPERP on 20240101.
DATA = """\
data:
  catalog: {catalog}
  quote: perp
  assets:
    perp: {{venue: synthetic, symbol: SYNPERP, dates: [20240101]}}
"""

EVAL = """\
name: grammar_study
""" + DATA + """\
step: 100ms
horizons: [100ms, 1s, 10s]
estimators:
  - name: mid
    fair_value: [{{kind: mid}}]
  - name: weighted_mid
    fair_value: [{{kind: weighted_mid}}]
"""

STRATEGY = """\
name: grammar_run
""" + DATA + """\
engine: {{step: 100ms}}
fair_value: [{{kind: mid}}]
quoter:
  kind: fixed_spread
  params: {{half_spread: 2ticks, size: 0.01, max_position: 0.1}}
"""

TRAIN = """\
name: grammar_train
""" + DATA + """\
grid: {{step: 100ms}}
features:
  - kind: book_imbalance
    params: {{weights: [1.0]}}
target: {{horizon: 1s}}
model: {{kind: linear}}
validation: {{folds: 2, purge: 2s}}
"""

# batch and optimize: their --set paths are the base strategy's, as for `run`.
BATCH = """\
name: grammar_batch
strategy: run-doc.yaml
matrix:
  params:
    quoter.params.half_spread: [2, 3]
"""

OPTIMIZE = """\
name: grammar_optimize
strategy: run-doc.yaml
space:
  quoter.params.half_spread: {{low: 1, high: 3, step: 1}}
days: [20240101]
trials: 1
"""

DOCS = {"run": STRATEGY, "evaluate": EVAL, "train": TRAIN, "batch": BATCH, "optimize": OPTIMIZE}


def _write(tmp_path: Path, verb: str, catalog: Path, name: str = "doc.yaml") -> Path:
    if verb in ("batch", "optimize"):
        _write(tmp_path, "run", catalog)
    path = tmp_path / f"{verb}-{name}"
    path.write_text(DOCS[verb].format(catalog=catalog))
    return path


def yaml_verbs() -> dict[str, object]:
    """Every command (subcommands too) whose argument is a YAML file, by its help text: a verb added
    later is held to the same grammar without being listed here."""
    from typer.core import TyperArgument
    from typer.main import get_command

    from quotelab.cli import app

    out, todo = {}, [("", get_command(app))]
    while todo:
        prefix, group = todo.pop()
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):  # a group, such as `microprice`
                todo.append((f"{prefix}{name} ", cmd))
            elif any(isinstance(p, TyperArgument) and "YAML" in (p.help or "") for p in cmd.params):
                out[f"{prefix}{name}"] = cmd
    return out


def test_every_yaml_verb_declares_the_same_set_and_catalog_options():
    verbs = yaml_verbs()
    assert set(YAML_VERBS) <= set(verbs), verbs
    seen = {}
    for verb, cmd in verbs.items():
        opts = {p.opts[0]: p for p in cmd.params if p.opts and p.opts[0].startswith("--")}
        assert {"--set", "--catalog"} <= set(opts), f"{verb} reads a YAML but lacks --set or --catalog"
        seen[verb] = [(o, opts[o].help, opts[o].multiple, opts[o].metavar) for o in ("--set", "--catalog")]
    assert all(v == seen["run"] for v in seen.values()), seen
    assert seen["run"][0][2], "--set is repeatable"


def test_evaluate_set_gives_the_table_of_the_edited_copy(catalog, tmp_path):
    """Seen red: `evaluate` had no --set (exit 2, "No such option")."""
    study = _write(tmp_path, "evaluate", catalog)
    edited = tmp_path / "edited.yaml"
    edited.write_text(study.read_text().replace("dates: [20240101]", "dates: [20240102]"))
    with_set = _cli("evaluate", study, "--set", "data.assets.perp.dates=[20240102]")
    copy = _cli("evaluate", edited)
    original = _cli("evaluate", study)
    for r in (with_set, copy, original):
        assert r.returncode == 0, r.stderr
    assert "mean squared error by horizon" in with_set.stdout
    assert with_set.stdout == copy.stdout
    assert with_set.stdout != original.stdout  # other days, other errors: the override took effect


def test_train_set_gives_the_report_of_the_edited_copy_and_records_it(catalog, tmp_path):
    doc = _write(tmp_path, "train", catalog)
    edited = tmp_path / "edited.yaml"
    edited.write_text(doc.read_text().replace("horizon: 1s", "horizon: 2s"))
    with_set = _cli("train", doc, "--set", "target.horizon=2s", "--json", "--out", tmp_path / "out")
    copy = _cli("train", edited, "--json")
    assert with_set.returncode == 0, with_set.stderr
    assert copy.returncode == 0, copy.stderr
    a, b = json.loads(with_set.stdout), json.loads(copy.stdout)
    assert a["horizon_s"] == 2.0 and a["overrides"] == ["target.horizon=2s"] and b["overrides"] == []
    assert a["folds"] == b["folds"] and a["overall"] == b["overall"]
    assert "quotelab train train-doc.yaml --set target.horizon=2s" in (tmp_path / "out" / "forecast.yaml").read_text()


@pytest.mark.parametrize("verb", YAML_VERBS)
def test_a_bad_set_path_is_an_error_naming_it(verb, catalog, tmp_path):
    doc = _write(tmp_path, verb, catalog)
    out = ["--out", tmp_path / "out"] if verb in ("batch", "optimize") else []
    r = _cli(verb, doc, "--set", "data.assets.perp.datez=[20240102]", *out)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    named = ("--set 'data.assets.perp.datez=[20240102]': data.assets.perp.datez: unknown key; expected one of: "
             "venue, symbol, dates")
    if verb in ("batch", "optimize"):  # the base strategy of every run is invalid: that error, within theirs
        assert named in r.stderr, r.stderr
    else:
        assert r.stderr.startswith(f"error: {named}"), r.stderr
        assert r.stderr.count("\n") == 1


def test_a_set_path_that_does_not_exist_or_an_invalid_value_is_named(catalog, tmp_path):
    doc = _write(tmp_path, "evaluate", catalog)
    r = _cli("evaluate", doc, "--set", "data.assets.perp.dates[3]=20240102")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --set 'data.assets.perp.dates[3]=20240102': data.assets.perp.dates[3] does not "
                               "exist (the list has 1 item; "), r.stderr
    r = _cli("evaluate", doc, "--set", "data.assets.perp.dates=[2024")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --set 'data.assets.perp.dates=[2024': invalid YAML"), r.stderr


def test_an_invalid_set_value_names_the_set_not_a_line_of_the_file(catalog, tmp_path):
    doc = _write(tmp_path, "evaluate", catalog)
    r = _cli("evaluate", doc, "--set", "step=fast", "--set", "horizons=[1s]")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --set 'step=fast': step: "), r.stderr
    r = _cli("evaluate", doc, "--set", "horizons=[1s]", "--set", "estimators[0].fair_value[0].kind=mdi")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --set 'estimators[0].fair_value[0].kind=mdi': "
                               "estimators[0].fair_value[0].kind: unknown fair_value kind 'mdi'"), r.stderr
    # A value the file wrote is still named by its line, with --set given for something else.
    bad = tmp_path / "bad.yaml"
    bad.write_text(doc.read_text().replace("step: 100ms", "step: fast"))
    r = _cli("evaluate", bad, "--set", "horizons=[1s]")
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {bad}:7: step: "), r.stderr


# ------------------------------------------------------------------------------------------------
# Where an error points: the file's line, or the --set that put the value there
# ------------------------------------------------------------------------------------------------

DOC = "a:\n  b: 1\n  c: [1, 2]\nd: x\n"


def test_place_names_the_deepest_set_that_wrote_the_value():
    raw, lines = load_yaml("f.yaml", DOC)
    apply_overrides(raw, ["a={b: 2, c: [3]}", "a.c[0]=4", "e.f=5"], lines)
    assert raw == {"a": {"b": 2, "c": [4]}, "d": "x", "e": {"f": 5}}
    assert place("f.yaml", lines, ("a", "b")) == "--set 'a={b: 2, c: [3]}'"
    assert place("f.yaml", lines, ("a", "c", 0)) == "--set 'a.c[0]=4'"
    assert place("f.yaml", lines, ("e",)) == "--set 'e.f=5'"  # created by it
    assert place("f.yaml", lines, ("d",)) == "f.yaml:4"
    assert place("f.yaml", lines, ()) == "f.yaml:1"
    # A later set of a whole mapping replaces what earlier, deeper sets wrote inside it.
    apply_overrides(raw, ["a={b: 7}"], lines)
    assert place("f.yaml", lines, ("a", "c", 0)) == "--set 'a={b: 7}'"


def test_overrides_are_applied_in_order_and_paths_are_checked():
    raw, lines = load_yaml("f.yaml", DOC)
    apply_overrides(raw, ["d=1", "d=2"], lines)
    assert raw["d"] == 2
    for bad, msg in [("a", "expected PATH=VALUE"), ("a..b=1", "cannot parse path segment ''"),
                     ("a.c[5]=1", "a.c[5] does not exist (the list has 2 items"), ("d.x.y=1", "d.x does not exist"),
                     ("a.c.x=1", "cannot assign at a.c.x: a.c is a list: name an item by index"),
                     ("d.x=1", "cannot assign at d.x: d is 2, not a mapping")]:
        with pytest.raises(ConfigError) as e:
            apply_overrides(raw, [bad], lines)
        assert str(e.value).startswith(f"--set {bad!r}: ") and msg in str(e.value), (bad, str(e.value))
