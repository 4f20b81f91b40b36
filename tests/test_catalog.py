from __future__ import annotations

import os

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


def test_zero_tick_size_is_rejected(tmp_path):
    with pytest.raises(DataError, match="tick_size must be > 0"):
        catalog.update_meta(tmp_path, "synthetic", "X", {"tick_size": 0, "lot_size": 1.0}, {})


@pytest.mark.parametrize("compression", ["deflate", "none"])
def test_day_files_are_byte_reproducible_and_hftbacktest_reads_them(tmp_path, compression):
    from hftbacktest import BacktestAsset, HashMapMarketDepthBacktest

    ev = _book_rows()
    a = catalog.write_day(tmp_path / "a", "synthetic", "X", "20240101", ev, compression).read_bytes()
    b = catalog.write_day(tmp_path / "b", "synthetic", "X", "20240101", ev, compression).read_bytes()
    assert a == b
    path = str(catalog.day_path(tmp_path / "a", "synthetic", "X", "20240101"))
    hbt = HashMapMarketDepthBacktest([BacktestAsset().data([path]).linear_asset(1.0).constant_order_latency(0, 0)
                                      .risk_adverse_queue_model().no_partial_fill_exchange()
                                      .trading_value_fee_model(0.0, 0.0).tick_size(0.1).lot_size(1.0)])
    hbt.elapse(10)
    assert (hbt.depth(0).best_bid_tick, hbt.depth(0).best_ask_tick) == (1001, 1004)
    hbt.close()


def _book_rows() -> np.ndarray:
    from hftbacktest.types import BUY_EVENT, DEPTH_EVENT, EXCH_EVENT, LOCAL_EVENT, SELL_EVENT

    ev = np.zeros(4, event_dtype)
    ev["ev"] = [f | EXCH_EVENT | LOCAL_EVENT for f in (DEPTH_EVENT | BUY_EVENT, DEPTH_EVENT | SELL_EVENT) * 2]
    ev["exch_ts"] = ev["local_ts"] = [1, 1, 2, 2]
    ev["px"], ev["qty"] = [100.0, 100.5, 100.1, 100.4], [1.0, 2.0, 3.0, 4.0]
    return ev


@pytest.mark.parametrize("n", [0, 1, 4, 1000])
def test_uncompressed_days_are_mapped_aligned_and_equal_to_deflated_ones(tmp_path, n):
    ev = np.resize(_book_rows(), n)
    ev["local_ts"] = np.arange(n)
    stored = catalog.write_day(tmp_path / "none", "synthetic", "X", "20240101", ev, compression="none")
    deflated = catalog.write_day(tmp_path / "deflate", "synthetic", "X", "20240101", ev)
    mapped = catalog.load_events(stored)
    np.testing.assert_array_equal(mapped, ev)
    np.testing.assert_array_equal(catalog.load_events(deflated), ev)
    with np.load(stored) as npz:  # still a plain npz for any other reader
        np.testing.assert_array_equal(npz["data"], ev)
    assert isinstance(catalog.load_events(deflated).base, np.memmap) is False
    if n:
        assert isinstance(mapped.base, np.memmap)
        assert mapped.ctypes.data % 64 == 0 and mapped.flags.writeable
        before = stored.read_bytes()
        mapped["px"][:] = -1.0  # copy-on-write: the file keeps its rows
        assert stored.read_bytes() == before
    assert stored.stat().st_size > deflated.stat().st_size or n == 0


def test_deflated_days_inflate_in_slices_check_their_crc_and_stay_plain_npz(tmp_path):
    import zipfile

    rng = np.random.default_rng(3)
    ev = np.resize(_book_rows(), 200_000)  # ~13 MB of rows, several MB deflated: many slices each way
    ev["local_ts"] = ev["exch_ts"] = np.sort(rng.integers(0, 10**12, len(ev)))
    ev["px"] = np.round(rng.uniform(100, 200, len(ev)), 1)
    ev["qty"] = rng.exponential(1.0, len(ev))
    path = catalog.write_day(tmp_path, "synthetic", "X", "20240101", ev)
    assert path.stat().st_size > 2 << 20
    got = catalog.load_events(path)
    np.testing.assert_array_equal(got, ev)
    assert got.flags.writeable and got.flags.aligned
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["data"], ev)
    # rows that deflate 100x: a slice of input holds more than one slice of output
    dense = np.resize(_book_rows(), 200_000)
    dense_path = catalog.write_day(tmp_path / "dense", "synthetic", "X", "20240101", dense)
    assert dense_path.stat().st_size * 20 < dense.nbytes
    np.testing.assert_array_equal(catalog.load_events(dense_path), dense)
    # a flipped byte inside the deflated rows fails the CRC (or the inflate), naming the file
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"20240101\.npz: not a readable event file"):
        catalog.load_events(path)
    # members compressed some other way are read by np.load
    other = tmp_path / "bz2.npz"
    with zipfile.ZipFile(other, "w", compression=zipfile.ZIP_BZIP2) as zf, zf.open("data.npy", "w") as fh:
        np.lib.format.write_array(fh, ev[:1000])
    np.testing.assert_array_equal(catalog.load_events(other), ev[:1000])


def test_unknown_compression_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="compression must be one of deflate, none, got 'zstd'"):
        catalog.write_day(tmp_path, "synthetic", "X", "20240101", _book_rows(), compression="zstd")


def test_truncated_uncompressed_day_names_the_file(tmp_path):
    ev = np.resize(_book_rows(), 1000)
    path = catalog.write_day(tmp_path, "synthetic", "X", "20240101", ev, compression="none")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"20240101\.npz: not a readable event file"):
        catalog.load_events(path)


def test_mapped_day_checks_its_crc_once_per_file_version(tmp_path, monkeypatch):
    ev = np.resize(_book_rows(), 5000)
    path = catalog.write_day(tmp_path, "synthetic", "X", "20240101", ev, compression="none")
    np.testing.assert_array_equal(catalog.load_events(path), ev)
    good = path.read_bytes()
    rows_at = len(good) - ev.nbytes
    for at in (rows_at + ev.nbytes // 2 + 3, rows_at - 20):  # a price byte; a pad byte of the npy header
        raw = bytearray(good)
        raw[at] ^= 0x40
        path.write_bytes(bytes(raw))
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a coarse clock must not hide it
        with pytest.raises(DataError, match=r"20240101\.npz: not a readable event file .*bad CRC .*convert the day"):
            catalog.load_events(path)
    path.write_bytes(good)
    np.testing.assert_array_equal(catalog.load_events(path), ev)
    # checked once per version: loading the same file again does not read it again
    from isal import isal_zlib

    calls = []
    crc32 = isal_zlib.crc32
    monkeypatch.setattr(isal_zlib, "crc32", lambda *a: calls.append(1) or crc32(*a))
    np.testing.assert_array_equal(catalog.load_events(path), ev)
    assert calls == []
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    np.testing.assert_array_equal(catalog.load_events(path), ev)
    assert calls


@pytest.mark.parametrize("key", ["usdm_btc", "synth_perp"])
def test_last_ts_is_the_latest_time_on_either_clock(markets, key):
    from reference_impls import asset

    day = asset(markets, key).events[0]
    assert catalog.last_ts(day) == max(int(day["local_ts"].max()), int(day["exch_ts"].max()))
    late = day[:3].copy()
    late["exch_ts"][0] = late["local_ts"].max() + 5  # the latest time on the first row, exchange clock
    assert catalog.last_ts(late) == int(late["exch_ts"][0])
    assert catalog.last_ts(day[:0]) == np.iinfo(np.int64).min
