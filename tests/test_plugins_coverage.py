"""Every built-in part has a doc, a formula, a reference test and a shipped strategy that uses it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from quotelab.strategy.registry import BUILTIN_PLUGINS, load_registry

REPO = Path(__file__).resolve().parents[1]
BUILTINS = [c for c in load_registry(entry_points=False).all() if c.source.startswith("quotelab ")]


def _kinds_in_strategies() -> set[str]:
    kinds = set()
    for path in (REPO / "strategies").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict):
            continue
        for section in ("fair_value", "forecast", "risk"):
            kinds |= {p.get("kind") for p in doc.get(section) or [] if isinstance(p, dict)}
        if isinstance(doc.get("quoter"), dict):
            kinds.add(doc["quoter"].get("kind"))
    return kinds


def test_every_builtin_module_registers_a_component():
    modules = {c.kernel_ref[0] for c in BUILTINS}
    assert set(BUILTIN_PLUGINS) <= modules
    assert len(BUILTINS) >= 18


# What runs a kernel: a replay, a composition, a backtest, the check-plugin twin, or the CLI.
RUNNERS = {"replay_component", "replay_composition", "replay", "compose", "run_strategy", "check_signal", "_run",
           "_steps", "_cli", "run"}


def _names(node: ast.AST) -> set[str]:
    return {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
            if isinstance(n, ast.Name | ast.Attribute)}


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def exercised_kinds(source: str) -> set[str]:
    """The string constants of every test function (with its decorators) that calls something that runs
    a kernel; a YAML text among them counts by its ``kind:`` entries. Docstrings, comments and helpers that
    no test calls do not count."""
    tree = ast.parse(source)
    helpers = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("test_")}
    kinds: set[str] = set()
    for f in tree.body:
        if not (isinstance(f, ast.FunctionDef) and f.name.startswith("test_")):
            continue
        called = _names(f) | set().union(*(_names(helpers[n]) for n in _names(f) if n in helpers))
        if not called & RUNNERS:
            continue
        doc = ast.get_docstring(f)
        for text in _strings(f) | set().union(*(_strings(d) for d in f.decorator_list)):
            if text != doc:
                kinds.add(text)
                kinds |= set(re.findall(r"kind:\s*([\w:]+)", text))
    return kinds


def test_exercised_kinds_ignores_docstrings_comments_and_tests_that_run_nothing():
    source = (
        'def test_a(registry):\n    """uses glft"""\n    # "mid"\n    _run(registry, "weighted_mid", {})\n'
        'def test_b():\n    assert "returns" in {"returns"}\n'
        '@pytest.mark.parametrize("q", ["avellaneda_stoikov"])\ndef test_c(q):\n    run_strategy(q)\n'
        'def test_d():\n    helper("fair_value:\\n  - kind: spot_plus_basis\\n")\n'
        'def helper(text):\n    return compose(text)\n'
    )
    got = exercised_kinds(source) & {c.name for c in BUILTINS}
    assert got == {"weighted_mid", "avellaneda_stoikov", "spot_plus_basis"}


EXERCISED = set().union(*(exercised_kinds(p.read_text()) for p in (REPO / "tests").glob("test_*.py")))


@pytest.mark.parametrize("component", BUILTINS, ids=lambda c: c.name)
def test_builtin_is_documented_tested_and_shipped(component):
    assert component.doc and component.formula, f"{component.name}: doc and formula are required"
    assert component.name in EXERCISED, f"{component.name}: no test that runs a kernel names it"
    assert component.name in _kinds_in_strategies(), f"{component.name}: no strategy in strategies/ uses it"
