"""quotelab new-plugin: the scaffolded package installs, its own reference test passes (and fails on a
wrong kernel), its strategy runs, and check-plugin compares its kernel with its Python twin."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from quotelab.scaffold import ScaffoldError, names, scaffold, validate_name

NAME = f"scaffold_probe_{os.getpid()}"


def _run(*args: str, cwd: Path | None = None, env: dict | None = None,
         python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})


@pytest.fixture
def installed(tmp_path):
    """The scaffold pip-installed (editable) into an overlay of the running venv; yields (root, python).

    Not into the running venv itself: another pytest session in the same venv would then find the
    package's entry point without the module (an editable install's path hook is read at interpreter
    start), and every load_registry() in it would fail. The overlay sees all of the running venv's
    packages through a .pth file and adds only this one."""
    root = tmp_path / "pkg"
    proc = _run("-m", "quotelab.cli", "new-plugin", NAME, "--dir", str(root))
    assert proc.returncode == 0, proc.stderr
    env_dir = tmp_path / "venv"
    venv = _run("-m", "venv", "--without-pip", str(env_dir))
    assert venv.returncode == 0, venv.stderr
    python = str(env_dir / "bin" / "python")
    paths = _run("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", python=python).stdout.strip()
    parent = sysconfig.get_paths()["purelib"]
    (Path(paths) / "_quotelab_parent_venv.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    pip = _run("-m", "pip", "--python", python, "install", "-q", "--no-deps", "-e", str(root))
    assert pip.returncode == 0, pip.stderr
    yield root, python


@pytest.mark.slow
def test_scaffolded_plugin_installs_tests_and_runs(installed, real_catalog, tmp_path):
    root, python = installed
    n = names(NAME)
    outside = _run("-m", "quotelab.cli", "plugins", "--json")
    assert NAME not in {r["name"] for r in json.loads(outside.stdout)}  # the running venv is left alone
    listed = _run("-m", "quotelab.cli", "plugins", "--json", python=python)
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows[NAME]["source"] == f"{n['dist']} 0.1.0" and f"py:{NAME}" in rows

    env = {"QUOTELAB_CATALOG": str(real_catalog)}
    tests = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests"), cwd=root, env=env,
                 python=python)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert re.search(r"\b3 passed\b", tests.stdout), tests.stdout

    run = _run("-m", "quotelab.cli", "run", str(root / "strategy.yaml"), "--catalog", str(real_catalog), "--json",
               python=python)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["num_trades"] > 0 and summary["name"] == f"{NAME}_strategy"

    check = _run("-m", "quotelab.cli", "check-plugin", NAME, "--catalog", str(real_catalog), python=python)
    assert check.returncode == 0 and "agree at all" in check.stdout, check.stdout + check.stderr

    # The generated reference test must catch a kernel that drifts from the formula.
    module = root / n["module"] / "__init__.py"
    kernel_end = "state[0] = ewma_nb(state[0], imbalance, params[P.alpha])\n    return state[0]\n"
    assert kernel_end in module.read_text()
    drifted = kernel_end.replace("return state[0]", "return state[0] * 1.000001")
    module.write_text(module.read_text().replace(kernel_end, drifted, 1))
    broken = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests"), cwd=root, env=env,
                  python=python)
    assert broken.returncode == 1, broken.stdout
    assert re.search(r"\b3 failed\b", broken.stdout), broken.stdout
    drift = _run("-m", "quotelab.cli", "check-plugin", NAME, "--catalog", str(real_catalog), python=python)
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
