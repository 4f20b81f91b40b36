"""quotelab new-plugin: the scaffolded package installs, its own reference test passes (and fails on a
wrong kernel), its strategy runs, and check-plugin compares its kernel with its Python twin."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quotelab.scaffold import ScaffoldError, names, scaffold, validate_name

# One name per process: a concurrent test run in the same venv must not uninstall our package.
NAME = f"scaffold_probe_{os.getpid()}"


def _run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def installed(tmp_path):
    root = tmp_path / "pkg"
    proc = _run("-m", "quotelab.cli", "new-plugin", NAME, "--dir", str(root))
    assert proc.returncode == 0, proc.stderr
    dist = names(NAME)["dist"]
    pip = _run("-m", "pip", "install", "-q", "--no-deps", "-e", str(root))
    assert pip.returncode == 0, pip.stderr
    try:
        yield root
    finally:
        _run("-m", "pip", "uninstall", "-y", "-q", dist)


def test_scaffolded_plugin_installs_tests_and_runs(installed, real_catalog, tmp_path):
    root = installed
    n = names(NAME)
    listed = _run("-m", "quotelab.cli", "plugins", "--json")
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows[NAME]["source"] == f"{n['dist']} 0.1.0" and f"py:{NAME}" in rows

    env = {"QUOTELAB_CATALOG": str(real_catalog)}
    tests = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests"), cwd=root, env=env)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert re.search(r"\b3 passed\b", tests.stdout), tests.stdout

    run = _run("-m", "quotelab.cli", "run", str(root / "strategy.yaml"), "--catalog", str(real_catalog), "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["num_trades"] > 0 and summary["name"] == f"{NAME}_strategy"

    check = _run("-m", "quotelab.cli", "check-plugin", NAME, "--catalog", str(real_catalog))
    assert check.returncode == 0 and "agree at all" in check.stdout, check.stdout + check.stderr

    # The generated reference test must catch a kernel that drifts from the formula.
    module = root / n["module"] / "__init__.py"
    module.write_text(module.read_text().replace(
        "state[0] = alpha * imbalance + (1.0 - alpha) * state[0]\n    return state[0]",
        "state[0] = alpha * imbalance + (1.0 - alpha) * state[0]\n    return state[0] * 1.000001", 1))
    broken = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests"), cwd=root, env=env)
    assert broken.returncode == 1, broken.stdout
    assert re.search(r"\b3 failed\b", broken.stdout), broken.stdout
    drift = _run("-m", "quotelab.cli", "check-plugin", NAME, "--catalog", str(real_catalog))
    assert drift.returncode == 1 and "first difference at step " in drift.stdout, drift.stdout + drift.stderr


def test_scaffolded_files_lint_clean(tmp_path):
    root = scaffold("lint_probe", tmp_path / "pkg", check_registry=False).root
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "--config",
                           str(Path(__file__).resolve().parents[1] / "pyproject.toml"), str(root)],
                          capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout
    text = (root / "quotelab_lint_probe" / "__init__.py").read_text()
    assert '@njit(inline="always")' in text and "class LintProbeParams(Params)" in text
    assert 'lint_probe = "quotelab_lint_probe"' in (root / "pyproject.toml").read_text()
    assert "kind: lint_probe" in (root / "strategy.yaml").read_text()


@pytest.mark.parametrize(("name", "message"), [
    ("Bad-Name", "not a valid plugin name; use lower-case snake_case"),
    ("1signal", "not a valid plugin name"),
    ("trailing_", "not a valid plugin name"),
    ("", "not a valid plugin name"),
    ("class", "a Python keyword cannot name a module"),
    ("x" * 41, "longer than 40 characters"),
])
def test_bad_names_are_refused(name, message):
    with pytest.raises(ScaffoldError, match=re.escape(message)):
        validate_name(name)


def test_a_registered_name_is_refused_naming_its_plugin(tmp_path):
    with pytest.raises(ScaffoldError, match=r"'book_imbalance' is already registered by quotelab 0\.1\.0 \(signal\)"):
        scaffold("book_imbalance", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_reports_a_bad_name_and_a_used_folder(tmp_path):
    bad = _run("-m", "quotelab.cli", "new-plugin", "My-Signal", "--dir", str(tmp_path / "a"))
    assert bad.returncode == 2 and "error: new-plugin 'My-Signal': not a valid plugin name" in bad.stderr
    assert not (tmp_path / "a").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    used = _run("-m", "quotelab.cli", "new-plugin", "fresh_probe", "--dir", str(tmp_path / "used"))
    assert used.returncode == 2 and "exists and is not an empty folder; pass --dir NEW_FOLDER" in used.stderr
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["keep.txt"]
