"""Parts refer to each other by name: ``name:`` on a part, names in ``linear_forecast.inputs``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from quotelab.errors import ConfigError
from quotelab.strategy.config import load_strategy
from quotelab.strategy.registry import load_registry

SEED = Path(__file__).resolve().parents[1] / "strategies" / "seed_market_maker.yaml"


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _load(registry, tmp_path: Path, forecast: list[dict], fair_value: list[dict] | None = None):
    doc = yaml.safe_load(SEED.read_text())
    doc["forecast"] = forecast
    if fair_value is not None:
        doc["fair_value"] = fair_value
    path = tmp_path / "named.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_strategy(path, registry=registry)


def _lf(inputs: list) -> dict:
    return {"kind": "linear_forecast", "alpha": "1bps",
            "params": {"inputs": inputs, "coefficients": [1.0] * len(inputs)}}


def test_names_resolve_to_the_composed_index_and_mix_with_indices(registry, tmp_path):
    forecast = [{"kind": "book_imbalance", "name": "book", "alpha": 0},
                {"kind": "returns", "name": "ret", "alpha": 0},
                _lf(["ret", "book", 0, "wmid"])]
    fair_value = [{"kind": "mid"}, {"kind": "weighted_mid", "name": "wmid", "weight": 0}]
    _, _, parts = _load(registry, tmp_path, forecast, fair_value)
    # fair values 0, 1 (wmid); forecasts 2 (book), 3 (ret), 4
    assert parts[4].params.inputs == (3, 2, 0, 1)
    assert parts[4].component.pack(parts[4].params, _ctx())[:5] == [4.0, 3.0, 2.0, 0.0, 1.0]


def _ctx():
    from quotelab.component import PackContext

    return PackContext(asset_index={"perp": 0, "quoted": 0}, tick_size={}, lot_size={}, quoted="perp")


@pytest.mark.parametrize(("forecast", "message"), [
    ([{"kind": "book_imbalance", "name": "book", "alpha": 0}, _lf(["boko"])],
     r"named\.yaml:\d+: forecast\[1\]\.params\.inputs\[0\]: no part is named 'boko' in the strategy; named parts "
     r"that run before this one: 'book' \(forecast\[0\]\)"),
    ([_lf(["later"]), {"kind": "book_imbalance", "name": "later", "alpha": 0}],
     r"named\.yaml:\d+: forecast\[0\]\.params\.inputs\[0\]: 'later' is forecast\[1\], which runs after this "
     r"'linear_forecast'"),
    ([{"kind": "book_imbalance", "name": "x", "alpha": 0}, {"kind": "returns", "name": "x", "alpha": 0}],
     r"named\.yaml:\d+: forecast\[1\]\.name: name 'x' is already forecast\[0\]'s; names must be unique"),
    ([{"kind": "book_imbalance", "name": "1st", "alpha": 0}],
     r"a part name is a letter or _ then letters, digits or _"),
])
def test_an_unknown_later_duplicate_or_malformed_name_is_refused_with_its_place(registry, tmp_path, forecast,
                                                                                message):
    with pytest.raises(ConfigError) as err:
        _load(registry, tmp_path, forecast)
    assert re.search(message, str(err.value)), str(err.value)
