"""docs/plugins.md is `quotelab plugins --markdown` output, current, and has an entry for every built-in;
docs/writing-plugins.md names commands and files that exist."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from quotelab.strategy.registry import BLOCK_ENV, ENTRY_POINT_GROUP, load_registry

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "plugins.md"
GUIDE = REPO / "docs" / "writing-plugins.md"
# docs/plugins.md documents the built-ins and the example package that the test setup installs (README);
# any other installed plugin (another package, a scaffold being tested) is kept out of the comparison.
DOCUMENTED_ENTRY_POINTS = {"example"}


def _regenerate(tmp_path: Path) -> str:
    others = sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
                    - DOCUMENTED_ENTRY_POINTS)
    out = tmp_path / "plugins.md"
    proc = subprocess.run([sys.executable, "-m", "quotelab.cli", "plugins", "--markdown", str(out)],
                          capture_output=True, text=True, env={**os.environ, BLOCK_ENV: ",".join(others)})
    assert proc.returncode == 0, proc.stderr
    return out.read_text()


def entries(markdown: str) -> dict[str, str]:
    """Component name → its section of the reference page."""
    parts = re.split(r"^### `([^`]+)`\n", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def missing_builtins(markdown: str) -> list[str]:
    """Built-ins without a section, or whose section lacks their formula or a row for a param."""
    have = entries(markdown)
    missing = []
    for c in load_registry(entry_points=False).all():
        section = have.get(c.name, "")
        if not section or c.formula not in section or any(f"| `{p}` |" not in section for p in c.params.model_fields):
            missing.append(c.name)
    return missing


def test_plugins_md_is_the_current_generated_reference(tmp_path):
    fresh = _regenerate(tmp_path)
    assert DOC.read_text() == fresh, (
        "docs/plugins.md is stale; regenerate it with: quotelab plugins --markdown docs/plugins.md"
    )


def test_every_builtin_has_an_entry_in_plugins_md():
    assert missing_builtins(DOC.read_text()) == []


def test_a_missing_or_incomplete_entry_is_caught():
    text = DOC.read_text()
    assert "### `glft`" in text
    without = re.sub(r"^### `glft`\n.*?(?=^### |\Z)", "", text, flags=re.M | re.S)
    assert missing_builtins(without) == ["glft"]
    no_param = text.replace("| `half_spread` |", "| `half_spreads` |")
    assert "fixed_spread" in missing_builtins(no_param)


def test_the_page_follows_each_components_doc_formula_and_params():
    # The stale check above is only as good as the generator: a changed doc, formula or param of one
    # component must change that component's section, and nothing else.
    from dataclasses import replace

    from quotelab.docs import describe_components, markdown_reference

    registry = load_registry(entry_points=False)
    base = markdown_reference(describe_components(registry))
    mid = registry.get("fair_value", "mid")

    class WiderMidParams(mid.params):
        offset: float = Field(0.5, description="A param that is not there.")

    changes = [({"doc": "Mid price."}, "\nMid price.\n"), ({"formula": "(bid + ask) / 2"}, "```\n(bid + ask) / 2\n```"),
               ({"params": WiderMidParams}, "| `offset` | `0.5` |  | A param that is not there. |")]
    before = entries(base)
    try:
        for change, shown in changes:
            registry.components["fair_value"]["mid"] = replace(mid, **change)
            after = entries(markdown_reference(describe_components(registry)))
            assert [k for k in before if before[k] != after[k]] == ["mid"], change
            assert shown not in before["mid"] and shown in after["mid"], change
    finally:
        registry.components["fair_value"]["mid"] = mid


COMMAND = re.compile(r"^\s*(?:\$ )?quotelab ([a-z-]+)", re.M)


def test_writing_plugins_guide_names_real_commands_files_and_hooks():
    text = GUIDE.read_text()
    from typer.main import get_command

    from quotelab.cli import app

    commands = set(get_command(app).commands)
    used = set(COMMAND.findall(text))
    assert {"new-plugin", "check-plugin", "plugins", "run"} <= used
    assert used <= commands, f"the guide uses commands that do not exist: {used - commands}"
    for path in re.findall(r"`((?:examples|framework|docs|strategies)/[\w./-]+)`", text):
        assert (REPO / path).exists(), f"the guide names {path}, which does not exist"
    from quotelab import hookspecs

    for hook in re.findall(r"`(quotelab_[a-z_]+)`", text):
        assert hasattr(hookspecs, hook), f"the guide names hook {hook}, which hookspecs.py does not declare"


# A hook's entry in the guide: a heading with its call signature, then a bullet per parameter (as in
# datasette's docs test: the headings are parsed and compared with the declarations, both ways).
HOOK_HEADING = re.compile(r"^### `(quotelab_\w+)\(([^)]*)\)`[ \t]*$", re.M)


def declared_hooks() -> dict[str, list[str]]:
    """Every hook hookspecs.py declares (a function pluggy's marker marked), with its parameter names."""
    import inspect

    from quotelab import PROJECT_NAME, hookspecs

    return {name: list(inspect.signature(f).parameters) for name, f in vars(hookspecs).items()
            if inspect.isfunction(f) and hasattr(f, f"{PROJECT_NAME}_spec")}


def hook_doc_problems(doc: str, declared: dict[str, list[str]]) -> list[str]:
    """What the guide gets wrong about the hooks: a hook not documented, a documented one that does not
    exist, a signature that differs, a parameter without its bullet."""
    parts = HOOK_HEADING.split(doc)  # [before, name, params, body, name, params, body, ...]
    documented = {name: ([p.strip() for p in params.split(",") if p.strip()], body)
                  for name, params, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True)}
    problems = [f"{h}: declared in hookspecs.py, not documented" for h in declared if h not in documented]
    problems += [f"{h}: documented, but hookspecs.py declares no such hook" for h in documented if h not in declared]
    for h, (params, body) in documented.items():
        if h in declared and params != declared[h]:
            problems.append(f"{h}: documented as ({', '.join(params)}), declared as ({', '.join(declared[h])})")
        problems += [f"{h}: parameter {p} has no `- `{p}`:` entry" for p in params
                     if not re.search(rf"^- `{p}`:", body, re.M)]
    return problems


def test_every_hook_is_documented_in_the_guide_with_its_parameters():
    declared = declared_hooks()
    assert {"quotelab_register_components", "quotelab_run_start", "quotelab_run_end"} <= set(declared)
    assert hook_doc_problems(GUIDE.read_text(), declared) == []


def test_a_missing_stale_or_misdescribed_hook_is_caught():
    text, declared = GUIDE.read_text(), declared_hooks()
    renamed = text.replace("### `quotelab_run_end(run, result)`", "### `quotelab_run_finished(run, result)`")
    assert hook_doc_problems(renamed, declared) == [
        "quotelab_run_end: declared in hookspecs.py, not documented",
        "quotelab_run_finished: documented, but hookspecs.py declares no such hook"]
    fewer = text.replace("### `quotelab_run_end(run, result)`", "### `quotelab_run_end(result)`")
    assert hook_doc_problems(fewer, declared) == [
        "quotelab_run_end: documented as (result), declared as (run, result)"]
    undescribed = text.replace("- `result`: the run's summary", "- the run's summary")
    assert hook_doc_problems(undescribed, declared) == ["quotelab_run_end: parameter result has no `- `result`:` entry"]
    assert hook_doc_problems(text, {**declared, "quotelab_new_hook": ["x"]}) == [
        "quotelab_new_hook: declared in hookspecs.py, not documented"]


@pytest.mark.parametrize("section", ["new-plugin", "check-plugin", "py:", "quotelab-plugin-example",
                                     "entry-points.quotelab", "@njit(inline=\"always\")"])
def test_writing_plugins_guide_covers(section):
    assert section in GUIDE.read_text()


def test_ci_runs_exactly_the_readmes_test_command_with_the_pinned_set() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert blocks[1] == ci_command
    assert "-c constraints.txt" in blocks[0] and "-c constraints.txt" in ci_command
    assert "--no-cache-dir" in ci_command and "venv --clear" in ci_command
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    for name in ("numpy", "numba", "llvmlite", "hftbacktest", "polars", "ray"):
        assert importlib.metadata.version(name) == pins[name], f"{name} installed differs from constraints.txt"
