"""The busy synthetic perpetual (``synth --profile busy``) and its raw venue files, converted back by
``quotelab convert`` in real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hftbacktest.types import BUY_EVENT, DEPTH_EVENT, DEPTH_SNAPSHOT_EVENT, EXCH_EVENT, LOCAL_EVENT, TRADE_EVENT

from quotelab.data import catalog, synth

# ~30 s: one minute of the busy market (plus the 2 min warm-up) and three CLI subprocesses, cold numba.
pytestmark = pytest.mark.slow

QL = [sys.executable, "-m", "quotelab.cli"]
KIND = np.uint64(0xFF)


def _ql(*args: str) -> dict:
    out = subprocess.run([*QL, *args, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def busy(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("busy")
    summary = _ql("synth", "--catalog", str(root / "cat"), "--profile", "busy", "--assets", "perp",
                  "--start", "2024-02-29T23:59:30", "--duration", "60s", "--raw", "binance-usdm,tardis",
                  "--raw-dir", str(root / "raw"))
    return root / "cat", root / "raw", summary


def _day(cat: Path, venue: str, day: str) -> np.ndarray:
    return catalog.load_day(cat, venue, "SYNPERP", day)


def test_busy_rates_are_the_captures(busy):
    """Rates measured on the shared USD-M BTCUSDT capture: ~1,470 events/s, 19 depth messages/s of
    ~68 levels, 62 trades/s (see docs/synthetic.md); the synthetic window must be near them."""
    cat, _, _ = busy
    ev = np.concatenate([_day(cat, "synthetic", d) for d in ("20240229", "20240301")])
    kind = ev["ev"] & KIND
    seconds = 60.0
    depth = ev[kind == DEPTH_EVENT]
    msgs, sizes = np.unique(depth["ival"], return_counts=True)
    assert 1200 < ev.shape[0] / seconds < 1800
    assert 17 < msgs.shape[0] / seconds < 21
    assert 50 < sizes.mean() < 100
    assert 40 < np.count_nonzero(kind == TRADE_EVENT) / seconds < 90
    # Binance stamps exchange time in ms; each message's rows share their time and id, and ids run on.
    assert np.all(ev["exch_ts"] % 1_000_000 == 0)
    first = np.flatnonzero(np.r_[True, depth["ival"][1:] != depth["ival"][:-1]])
    assert np.array_equal(depth["ival"][first], np.arange(depth["ival"][0], depth["ival"][0] + first.shape[0]))
    same = np.repeat(first, np.diff(np.r_[first, depth.shape[0]]))
    assert np.array_equal(depth["exch_ts"], depth["exch_ts"][same])
    assert np.array_equal(depth["local_ts"], depth["local_ts"][same])
    # Messages ~52 ms apart (48-58 ms on the capture).
    gaps = np.diff(depth["exch_ts"][first]) / 1e6
    assert 45 <= np.median(gaps) <= 60


def test_busy_book_is_deep_and_never_crossed(busy):
    cat, _, _ = busy
    ev = _day(cat, "synthetic", "20240229")
    kind = ev["ev"] & KIND
    tick = 0.1
    bids: dict[int, float] = {}
    asks: dict[int, float] = {}
    depth = ev[(kind == DEPTH_EVENT) | (kind == DEPTH_SNAPSHOT_EVENT)]
    buy = (depth["ev"] & np.uint64(BUY_EVENT)) != 0
    keys = np.rint(depth["px"] / tick).astype(np.int64)
    ends = np.flatnonzero(np.r_[depth["ival"][1:] != depth["ival"][:-1], True])
    start = 0
    for end in ends.tolist():
        for i in range(start, end + 1):
            book = bids if buy[i] else asks
            if depth["qty"][i] == 0:
                book.pop(int(keys[i]), None)
            else:
                book[int(keys[i])] = float(depth["qty"][i])
        start = end + 1
        assert max(bids) < min(asks)
    assert min(len(bids), len(asks)) > 500


def _rows(ev: np.ndarray) -> np.ndarray:
    kind = ev["ev"] & KIND
    return ev[(kind == DEPTH_EVENT) | (kind == TRADE_EVENT)]


def _book(ev: np.ndarray) -> list[tuple[int, float, float]]:
    s = ev[(ev["ev"] & KIND) == DEPTH_SNAPSHOT_EVENT]
    return sorted(zip((s["ev"] & np.uint64(BUY_EVENT)).tolist(), s["px"].tolist(), s["qty"].tolist(), strict=True))


@pytest.mark.parametrize("fmt", ["binance-usdm", "tardis"])
def test_raw_files_convert_back_to_the_catalog(busy, tmp_path, fmt):
    """Depth and trade rows come back equal, field by field and in the same order, written once each
    (no EXCH-only/LOCAL-only pairs). What differs, by design:
    - the opening book's snapshot rows hold the same levels, but the converter stamps them with the
      first message applied after the snapshot, where synth stamps them at the day's first instant;
    - later days open with the converter's own snapshot of the book (the collector stream runs on);
    - Tardis gives µs, so local times come back floored to µs, and has no depth message ids (ival)."""
    cat, raw, summary = busy
    files = sorted(raw.glob("synperp_*.gz") if fmt == "binance-usdm" else raw.glob("binance-futures_*.csv.gz"))
    assert len(files) == 2 if fmt == "binance-usdm" else 4
    assert {r["format"] for r in summary["raw"]} == {"binance-usdm", "tardis"}
    out = _ql("convert", "--format", fmt, "--symbol", "SYNPERP", "--tick-size", "0.1", "--lot-size", "0.001",
              "--catalog", str(tmp_path), *map(str, files))
    assert sorted(out["days"]) == ["20240229", "20240301"]
    for day in ("20240229", "20240301"):
        ours, back = _day(cat, "synthetic", day), _day(tmp_path, "binance-usdm", day)
        assert out["days"][day]["counts"]["local_only_duplicates"] == 0
        assert np.all((back["ev"] & np.uint64(EXCH_EVENT | LOCAL_EVENT)) == np.uint64(EXCH_EVENT | LOCAL_EVENT))
        a, b = _rows(ours), _rows(back)
        if fmt == "tardis":
            a = a.copy()
            a["local_ts"] = a["local_ts"] // 1000 * 1000
            a["ival"][(a["ev"] & KIND) == DEPTH_EVENT] = 0
            b = b.copy()
            b["ival"][(b["ev"] & KIND) == DEPTH_EVENT] = 0
        assert a.shape[0] > 10_000
        assert np.array_equal(a, b)
    assert _book(_day(cat, "synthetic", "20240229")) == _book(_day(tmp_path, "binance-usdm", "20240229"))


def test_unknown_profile_is_named(tmp_path):
    with pytest.raises(synth.SynthError, match="--profile 'bussy' is not a profile; choose from demo, busy"):
        synth.generate(tmp_path / "c", duration_s=60, profile="bussy")


def test_days_made_apart_convert_with_a_resync(tmp_path):
    """Two days from separate synth calls do not continue each other's ids: the second file carries a
    REST snapshot after its first message, so the converter resyncs (a gap, then `resynced`) and
    every depth and trade row of both days still comes back."""
    from quotelab.data import rawfiles

    cat = tmp_path / "cat"
    for day in ("2024-01-01", "2024-01-02"):
        synth.generate(cat, start=f"{day}T00:00:00", duration_s=10, assets="perp", profile="busy")
    raw = rawfiles.write(cat, "synthetic", "SYNPERP", "binance-usdm", tmp_path / "raw")
    out = _ql("convert", "--format", "binance-usdm", "--symbol", "SYNPERP", "--tick-size", "0.1", "--lot-size",
              "0.001", "--catalog", str(tmp_path / "back"), *raw["files"])
    kinds = [f["kind"] for f in out["findings"]]
    assert "gap" in kinds and "resynced" in kinds
    for day in ("20240101", "20240102"):
        assert np.array_equal(_rows(_day(cat, "synthetic", day)), _rows(_day(tmp_path / "back", "binance-usdm", day)))
