"""The progress display: on when stderr is a terminal (a real pty here), off under --json or a pipe."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def strategy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("progress")
    subprocess.run([sys.executable, "-m", "quotelab.cli", "synth", "--catalog", str(root / "cat"), "--duration", "3m"],
                   check=True, capture_output=True)
    doc = yaml.safe_load((REPO / "strategies" / "demo_synthetic.yaml").read_text())
    doc["data"]["catalog"] = str(root / "cat")
    path = root / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(args: list[str], tty: bool) -> tuple[str, str]:
    """(stdout, stderr) of ``quotelab run``, stderr a pseudo-terminal if ``tty``."""
    env = {k: v for k, v in os.environ.items() if k != "QUOTELAB_PROGRESS"}
    cmd = [sys.executable, "-m", "quotelab.cli", "run", *args]
    if not tty:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        return p.stdout, p.stderr
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=env, text=True)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, err.decode(errors="replace")
    return out, err.decode(errors="replace")


def test_progress_on_a_terminal_and_off_under_json_or_a_pipe(strategy):
    _, err = _run([str(strategy)], tty=True)
    assert "ev/s" in err and "events" in err and "ETA" in err
    out, err = _run([str(strategy), "--json"], tty=True)
    assert "ev/s" not in err and out.lstrip().startswith("{")
    _, err = _run([str(strategy)], tty=False)
    assert "ev/s" not in err
