"""The example strategies of the plugin library run on the shared data: fills happen, limits hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from quotelab.backtest import driver as D
from quotelab.backtest.engine import run_strategy

STRATEGIES = Path(__file__).resolve().parents[1] / "strategies"
EXAMPLES = ["multi_venue_fair_value", "trade_flow_forecast", "avellaneda_stoikov", "glft", "linear_model"]


@pytest.fixture(scope="module")
def venues_catalog(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BTC on USD-M, spot and COIN-M, converted through the CLI."""
    root = tmp_path_factory.mktemp("venues_catalog")
    jobs = [
        ("binance-usdm", "BTCUSDT", ["usdm/btcusdt_20240808.gz"]),
        ("binance-spot", "BTCUSDT", ["spot/btcusdt_20240808.gz", "spot/btcusdt_20240809.gz"]),
        ("binance-cm", "BTCUSD_PERP", ["cm/btcusd_perp_20240808.gz", "cm/btcusd_perp_20240809.gz"]),
    ]
    for fmt, symbol, files in jobs:
        cmd = [sys.executable, "-m", "quotelab.cli", "convert", "--format", fmt, "--symbol", symbol,
               "--catalog", str(root), *(str(shared_data / "binance" / f) for f in files)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return root


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_strategy_trades_within_its_limits(venues_catalog, name):
    path = STRATEGIES / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text())
    result = run_strategy(path, catalog=venues_catalog)
    s = result.summary
    assert s["num_trades"] > 50
    assert s["quoting_steps"] > 3000
    quoter = doc["quoter"]["params"]
    limit, size = quoter["max_position"], quoter["size"]
    for risk in doc.get("risk", []):
        if risk["kind"] == "position_limits":
            limit = min(limit, risk["params"]["max_position"])
    # New orders stop at the limit; one order already in flight may still fill.
    assert np.abs(result.records[:, D.R_POSITION]).max() <= limit + size + 1e-9
    # Every part of the example takes part: a fair value other than the plain mid moves off it, forecasts move.
    plain_mid = [p for p in doc["fair_value"] if p.get("weight", 1.0) > 0] == [{"kind": "mid", "weight": 1.0}] or (
        [p["kind"] for p in doc["fair_value"]] == ["mid"])
    moved = np.std(result.records[:, D.R_FAIR_VALUE] - result.records[:, D.R_MID]) > 0
    assert moved != plain_mid
    if doc.get("forecast"):
        assert np.std(result.records[:, D.R_FORECAST]) > 0
