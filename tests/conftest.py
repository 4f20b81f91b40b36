"""Shared fixtures. Real data comes from one setting: QUOTELAB_DATA (default ../shared/data)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QUOTELAB_DATA", REPO.parent / "shared" / "data")).resolve()


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


# CI tests a fresh machine: compiled kernels and converted reference data start empty instead of
# coming from a warm ~/.cache/quotelab. Set before numba is imported; subprocesses inherit it.
if _ci():
    for _var in ("QUOTELAB_CACHE", "NUMBA_CACHE_DIR"):
        os.environ.setdefault(_var, tempfile.mkdtemp(prefix=f"ci-{_var.lower()}-"))


def pytest_report_header() -> list[str]:
    return [f"quotelab data: {SHARED_DATA}", *(f"{v}: {os.environ[v]}" for v in ("QUOTELAB_CACHE", "NUMBA_CACHE_DIR")
                                             if v in os.environ)]


# The real instruments each plugin reference test runs on (keys of reference_impls.INSTRUMENTS).
SYMBOLS = ["usdm_btc", "usdm_eth"]


@pytest.fixture(scope="session")
def registry():
    """The built-in plugins only (no entry points), loaded once. A test module that needs installed
    plugins too defines its own ``registry``."""
    from quotelab.registry import load_registry

    return load_registry(entry_points=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real captures. Missing: a skip on a laptop, a failure under CI=true."""
    if not (SHARED_DATA / "README.md").exists():
        msg = f"shared data not found at {SHARED_DATA} (set QUOTELAB_DATA to its folder)"
        if _ci():
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_catalog(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared USD-M BTCUSDT and ETHUSDT windows, converted once per session through the CLI."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("real_catalog")
    jobs = [
        ("binance-usdm", "BTCUSDT", ["usdm/btcusdt_20240808.gz"]),
        ("binance-usdm", "ETHUSDT", ["usdm/ethusdt_20240808.gz"]),
    ]
    for fmt, symbol, files in jobs:
        cmd = [sys.executable, "-m", "quotelab.cli", "convert", "--format", fmt, "--symbol", symbol,
               "--catalog", str(root), *(str(shared_data / "binance" / f) for f in files)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return root
