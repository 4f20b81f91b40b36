"""Shared fixtures. Real data comes from one setting: QUOTELAB_DATA (default ../shared/data)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
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


# The markets each kernel's reference test runs on: two real instruments (keys of reference_impls.INSTRUMENTS,
# skipped without the shared data, failed under CI) and the synthetic perp, always there.
SYMBOLS = ["usdm_btc", "usdm_eth", "synth_perp"]
# (perp, spot) pairs of one coin, for the parts that read both.
PERP_SPOT = [("usdm_btc", "spot_btc"), ("usdm_eth", "spot_eth"), ("synth_perp", "synth_spot")]


@pytest.fixture(scope="session")
def registry():
    """The built-in plugins only (no entry points), loaded once. A test module that needs installed
    plugins too defines its own ``registry``."""
    from quotelab.strategy.registry import load_registry

    return load_registry(entry_points=False)


def require_shared_data() -> Path:
    """The real captures' folder. Missing: a skip on a laptop, a failure under CI=true."""
    if not (SHARED_DATA / "README.md").exists():
        msg = f"shared data not found at {SHARED_DATA} (set QUOTELAB_DATA to its folder)"
        if _ci():
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def synthetic_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded synthetic market, a perp and a spot over one latent price for 10 minutes (~6,000 steps of
    100 ms, ~3,400 trades), generated once per session in ~5 s."""
    from quotelab.data import synth

    root = tmp_path_factory.mktemp("synthetic_catalog")
    synth.generate(root, seed=11, duration_s=600.0, assets=["perp", "spot"])
    return root


@pytest.fixture(scope="session")
def markets(synthetic_catalog: Path):
    """The data of the market keys (reference_impls.Markets): a test on a real key skips without the shared
    data (fails under CI); one on a synthetic key always runs."""
    from reference_impls import Markets

    return Markets(require_shared_data, synthetic_catalog)


@dataclass(frozen=True)
class CatalogDay:
    """One day of one perp in a quotelab catalog."""

    catalog: Path
    venue: str
    symbol: str
    day: str
    tick: float
    lot: float

    def asset(self, name: str = "perp"):
        from quotelab.data import catalog as cat
        from quotelab.data.assets import Asset

        return Asset(name, [cat.load_day(self.catalog, self.venue, self.symbol, self.day)], self.tick, self.lot)


@pytest.fixture(scope="module", params=["real", "synthetic"])
def perp_day(request: pytest.FixtureRequest) -> CatalogDay:
    """The shared USD-M BTCUSDT day (skipped without the shared data, failed under CI), or the synthetic perp's."""
    if request.param == "real":
        return CatalogDay(request.getfixturevalue("real_catalog"), "binance-usdm", "BTCUSDT", "20240808", 0.1, 0.001)
    return CatalogDay(request.getfixturevalue("synthetic_catalog"), "synthetic", "SYNPERP", "20240101", 0.1, 0.001)


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
