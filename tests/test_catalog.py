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


def test_day_files_are_byte_reproducible_and_hftbacktest_reads_them(tmp_path):
    from hftbacktest import BacktestAsset, HashMapMarketDepthBacktest
    from hftbacktest.types import BUY_EVENT, DEPTH_EVENT, EXCH_EVENT, LOCAL_EVENT, SELL_EVENT

    ev = np.zeros(4, event_dtype)
    ev["ev"] = [f | EXCH_EVENT | LOCAL_EVENT for f in (DEPTH_EVENT | BUY_EVENT, DEPTH_EVENT | SELL_EVENT) * 2]
    ev["exch_ts"] = ev["local_ts"] = [1, 1, 2, 2]
    ev["px"], ev["qty"] = [100.0, 100.5, 100.1, 100.4], [1.0, 2.0, 3.0, 4.0]
    a = catalog.write_day(tmp_path / "a", "synthetic", "X", "20240101", ev).read_bytes()
    b = catalog.write_day(tmp_path / "b", "synthetic", "X", "20240101", ev).read_bytes()
    assert a == b
    path = str(catalog.day_path(tmp_path / "a", "synthetic", "X", "20240101"))
    hbt = HashMapMarketDepthBacktest([BacktestAsset().data([path]).linear_asset(1.0).constant_order_latency(0, 0)
                                      .risk_adverse_queue_model().no_partial_fill_exchange()
                                      .trading_value_fee_model(0.0, 0.0).tick_size(0.1).lot_size(1.0)])
    hbt.elapse(10)
    assert (hbt.depth(0).best_bid_tick, hbt.depth(0).best_ask_tick) == (1001, 1004)
    hbt.close()
