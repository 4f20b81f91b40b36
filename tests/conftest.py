"""Shared fixtures. Real data comes from one setting: QUOTELAB_DATA (default ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QUOTELAB_DATA", REPO.parent / "shared" / "data")).resolve()


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real captures. Missing: a skip on a laptop, a failure under CI=true."""
    if not (SHARED_DATA / "README.md").exists():
        msg = f"shared data not found at {SHARED_DATA} (set QUOTELAB_DATA to its folder)"
        if _ci():
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
    return SHARED_DATA
