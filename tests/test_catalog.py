from __future__ import annotations

import numpy as np
import pytest
from hftbacktest.types import event_dtype

from quotelab.data import catalog
from quotelab.errors import DataError


def test_write_day_is_atomic_and_round_trips(tmp_path):
    ev = np.zeros(3, event_dtype)
    ev["px"] = [1.0, 2.0, 3.0]
    path = catalog.write_day(tmp_path, "synthetic", "X", "20240101", ev)
    assert [p.name for p in path.parent.iterdir()] == ["20240101.npz"]
    np.testing.assert_array_equal(catalog.load_events(path), ev)


def test_missing_day_names_day_and_catalog(tmp_path):
    catalog.update_meta(tmp_path, "synthetic", "X", {"tick_size": 0.1, "lot_size": 1.0,
                        "contract": {"kind": "linear", "size": 1.0}}, {"20240101": {}})
    with pytest.raises(DataError, match=r"synthetic/X/20240102 is missing.*days present: 20240101"):
        catalog.load_day(tmp_path, "synthetic", "X", "20240102")


def test_zero_tick_size_is_rejected(tmp_path):
    with pytest.raises(DataError, match="tick_size must be > 0"):
        catalog.update_meta(tmp_path, "synthetic", "X", {"tick_size": 0, "lot_size": 1.0}, {})
