"""Every built-in part has a doc, a formula, a reference test and a shipped strategy that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quotelab.registry import BUILTIN_PLUGINS, load_registry

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


@pytest.mark.parametrize("component", BUILTINS, ids=lambda c: c.name)
def test_builtin_is_documented_tested_and_shipped(component):
    assert component.doc and component.formula, f"{component.name}: doc and formula are required"
    tests = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    assert f'"{component.name}"' in tests, f"{component.name}: no test names it"
    assert component.name in _kinds_in_strategies(), f"{component.name}: no strategy in strategies/ uses it"
