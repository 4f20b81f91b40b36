"""A stopped command says so and keeps what it finished: Ctrl-C (SIGINT) and SIGTERM on real subprocesses.

``convert`` keeps the days it finished, byte for byte what an uninterrupted convert writes, funding side
tables included, and discards the day that was open; any other verb says what it kept in one line and exits
with 128 + the signal's number.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from quotelab.data import catalog as cat
from quotelab.data.convert import convert_files
from quotelab.errors import DataError, Stopped

REPO = Path(__file__).resolve().parents[1]
VENUE, SYMBOL = "binance-usdm", "SYNPERP"
SPEC = ("--tick-size", "0.1", "--lot-size", "0.001")
DAY1, DAY2 = "20240101", "20240102"


def _with_mark_prices(path: Path) -> int:
    """Splice a Binance markPriceUpdate line after the first line of each exchange-time second (the
    synthetic raw files have none), so the converted days get funding side tables; returns how many."""
    out, last, n = [], None, 0
    for line in gzip.decompress(path.read_bytes()).splitlines(keepends=True):
        out.append(line)
        m = re.search(rb'"E":(\d+)', line)
        if m is None or b'"stream"' not in line:
            continue
        e = int(m.group(1))
        if last is None or e // 1000 != last:
            last, n = e // 1000, n + 1
            local = int(line.split(b" ", 1)[0])
            out.append(b'%d {"stream":"synperp@markPrice@1s","data":{"e":"markPriceUpdate","E":%d,"s":"SYNPERP",'
                       b'"p":"%.1f","P":"60000.0","i":"60001.5","r":"%.8f","T":1704182400000}}\n'
                       % (local, e, 60000.0 + n / 10, 0.0001 + n * 1e-8))
    path.write_bytes(gzip.compress(b"".join(out), compresslevel=1))
    return n


@pytest.fixture(scope="module")
def raw_days(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Raw Binance USD-M files of the busy synthetic perp: 2 minutes of 2024-01-01, 10 of 2024-01-02 (the
    second day is long enough that a stop sent once the first is written finds it still being converted)."""
    from quotelab.data import rawfiles, synth

    root = tmp_path_factory.mktemp("stop_raw")
    synth.generate(root / "synth", start="2024-01-01T23:58:00", duration_s=720, assets="perp", profile="busy")
    written = rawfiles.write(root / "synth", "synthetic", SYMBOL, "binance-usdm", root / "raw")
    files = [Path(f) for f in written["files"]]
    assert [f.name for f in files] == [f"synperp_{DAY1}.gz", f"synperp_{DAY2}.gz"]
    assert all(_with_mark_prices(f) > 100 for f in files)
    return files


@pytest.fixture(scope="module")
def whole(raw_days: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same files converted without a stop: the reference."""
    root = tmp_path_factory.mktemp("stop_whole")
    convert_files(VENUE, raw_days, SYMBOL, root, tick_size=0.1, lot_size=0.001)
    return root


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _convert_until_day_one(raw_days: list[Path], catalog: Path) -> subprocess.Popen:
    """Start `quotelab convert` and return once its progress says a day was written: the day is then handed
    over (the display counts it after the convert has recorded it), and the second day is being converted."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "quotelab.cli", "convert", "--format", VENUE, "--symbol", SYMBOL, *SPEC,
         "--catalog", str(catalog), *map(str, raw_days)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "QUOTELAB_PROGRESS": "1"})
    seen = b""
    while not re.search(rb"\b1 days", seen):
        ready, _, _ = select.select([proc.stderr], [], [], 5.0)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
        assert proc.poll() is None, f"convert ended before a stop could be sent: {seen[-2000:]!r}"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_convert_keeps_the_finished_day_as_an_uninterrupted_one_writes_it(raw_days, whole, tmp_path, sig):
    catalog = tmp_path / "catalog"
    proc = _convert_until_day_one(raw_days, catalog)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err.decode())  # the progress display's terminal codes
    assert proc.returncode == 128 + sig, err[-2000:]
    how = "Ctrl-C (SIGINT)" if sig == signal.SIGINT else "SIGTERM"
    assert err.splitlines()[-1] == (
        f"error: stopped by {how}: convert: kept the finished day {DAY1} in {catalog} (whole, as an uninterrupted "
        f"convert writes them); discarded {DAY2}, not finished. To finish, convert the files holding {DAY2} and "
        f"later days; if they also hold a kept day's last minutes, that convert is refused (it would replace the "
        f"day with less of it): convert all the files again instead")

    # Day 1 and nothing else: no day 2 part, no staging folder, no temporary file, no pending commit.
    sym = cat.symbol_dir(catalog, VENUE, SYMBOL)
    assert _tree(catalog) == sorted([VENUE, f"{VENUE}/{SYMBOL}", *(f"{VENUE}/{SYMBOL}/{n}" for n in (
        "meta.json", f"{DAY1}.npz", f"{DAY1}.funding.npy"))])
    ref = cat.symbol_dir(whole, VENUE, SYMBOL)
    for name in (f"{DAY1}.npz", f"{DAY1}.funding.npy"):
        assert (sym / name).read_bytes() == (ref / name).read_bytes(), name
    meta, ref_meta = (json.loads((d / "meta.json").read_text()) for d in (sym, ref))
    assert list(meta["days"]) == [DAY1]
    entry, ref_entry = meta["days"][DAY1], ref_meta["days"][DAY1]
    assert entry.pop("file") == str(cat.day_path(catalog, VENUE, SYMBOL, DAY1))
    ref_entry.pop("file")
    assert entry == ref_entry and entry["funding_rows"] > 100
    # ... and it reads back, checked against meta.json
    assert cat.list_days(catalog, VENUE, SYMBOL) == [DAY1]
    assert np.array_equal(cat.load_day(catalog, VENUE, SYMBOL, DAY1), cat.load_day(whole, VENUE, SYMBOL, DAY1))
    assert np.array_equal(cat.load_funding(catalog, VENUE, SYMBOL, [DAY1]),
                          cat.load_funding(whole, VENUE, SYMBOL, [DAY1]))


@pytest.mark.slow
def test_parts_of_the_day_being_placed_when_stopped_never_reach_the_catalog(raw_days, whole, tmp_path, monkeypatch):
    # Days in parts of 100,000 rows; the stop comes while day 2's parts are renamed into place (the last
    # part first, so a later part is already in the staged folder under its final name).
    open_day = cat.Staging.open_day
    monkeypatch.setattr(cat.Staging, "open_day", lambda self, venue, symbol, day, compression="deflate", **_: (
        open_day(self, venue, symbol, day, compression, part_rows=100_000)))
    place = cat._place_parts

    def place_then_stop(path: Path, done: list) -> None:
        if path.name.startswith(DAY2):
            assert len(done) > 2
            os.replace(done[-1].tmp, done[-1].path)
            raise KeyboardInterrupt
        place(path, done)

    monkeypatch.setattr(cat, "_place_parts", place_then_stop)
    catalog = tmp_path / "catalog"
    with pytest.raises(Stopped) as stop:
        convert_files(VENUE, raw_days, SYMBOL, catalog, tick_size=0.1, lot_size=0.001)
    assert stop.value.signum == signal.SIGINT
    assert f"kept the finished day {DAY1}" in str(stop.value) and f"discarded {DAY2}" in str(stop.value)
    names = [p.name for p in cat.symbol_dir(catalog, VENUE, SYMBOL).iterdir()]
    assert not [n for n in names if n.startswith(DAY2)], names
    assert not [p for p in catalog.rglob(".*")], _tree(catalog)
    assert sorted(names) == sorted(["meta.json", f"{DAY1}.funding.npy", f"{DAY1}.npz",
                                    *(f"{DAY1}.{k}.npz" for k in range(1, len(names) - 2))])
    assert np.array_equal(cat.load_day(catalog, VENUE, SYMBOL, DAY1), cat.load_day(whole, VENUE, SYMBOL, DAY1))


@pytest.mark.slow
def test_a_stop_before_any_day_is_finished_writes_nothing(raw_days, tmp_path, monkeypatch):
    from quotelab.data import events

    def stop(self, d):  # the first day's close is where the stop lands
        raise KeyboardInterrupt

    monkeypatch.setattr(events.DaySplitter, "_close", stop)
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    with pytest.raises(Stopped) as exc:
        convert_files(VENUE, raw_days[:1], SYMBOL, catalog, tick_size=0.1, lot_size=0.001)
    assert str(exc.value) == (f"stopped by Ctrl-C (SIGINT): convert: no day was finished, so nothing was written "
                              f"to {catalog} ({DAY1} discarded); convert the files again")
    assert _tree(catalog) == []


@pytest.mark.slow
def test_a_data_error_mid_way_keeps_nothing(raw_days, tmp_path):
    # Bad input stays all or nothing: a day already closed may lack what the error is about (a late event).
    bad = tmp_path / "bad.gz"
    lines = gzip.decompress(raw_days[1].read_bytes()).splitlines(keepends=True)
    bad.write_bytes(gzip.compress(b"".join([*lines[:len(lines) // 2], b"garbled\n", *lines[len(lines) // 2:]])))
    catalog = tmp_path / "catalog"
    with pytest.raises(DataError, match="garbled line"):
        convert_files(VENUE, [raw_days[0], bad], SYMBOL, catalog, tick_size=0.1, lot_size=0.001)
    assert _tree(catalog) == []


# A Python signal that stops its own run as a Ctrl-C would, once the run is under way: a deterministic moment.
SELF_STOP = '''
import os
import signal

from quotelab import hookimpl
from quotelab.component import Reads
from quotelab.plugins.book_imbalance import BookImbalanceParams
from quotelab.pysignal import PythonSignal

CALLS = [0]


def book_imbalance_py(view, trades, state, params):
    CALLS[0] += 1
    if CALLS[0] == 1000:
        os.kill(os.getpid(), signal.SIGINT)
    return 0.0


@hookimpl
def quotelab_register_python_signals(register):
    register(PythonSignal(name="book_imbalance", func=book_imbalance_py, params=BookImbalanceParams,
                          reads=lambda p: Reads(assets=(p.asset,), depth_levels=len(p.weights))))
'''


@pytest.mark.slow
def test_a_run_stopped_by_ctrl_c_says_so_and_exits_130(synthetic_catalog, tmp_path):
    # The signal goes through the plugin's objmode call and its `except Exception` wrapper (pysignal.call)
    # as a KeyboardInterrupt, not as a plugin error.
    plugin = tmp_path / "self_stop.py"
    plugin.write_text(SELF_STOP)
    doc = yaml.safe_load((REPO / "strategies" / "seed_market_maker.yaml").read_text())
    doc["data"] = {"catalog": str(synthetic_catalog), "quote": "perp",
                   "assets": {"perp": {"venue": "synthetic", "symbol": SYMBOL, "dates": [20240101]}}}
    doc["forecast"][0]["kind"] = "py:book_imbalance"
    doc["plugins"] = [str(plugin)]
    strategy = tmp_path / "s.yaml"
    strategy.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "quotelab.cli", "run", str(strategy), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: stopped by Ctrl-C (SIGINT): run: nothing was kept: a run writes --out only once it has finished, "
        "each file whole (a stop while they are written leaves each one as it was or new)"]
    assert not out.exists()


@pytest.mark.slow
def test_a_stopped_tardis_convert_keeps_the_finished_day_with_its_funding_rows(tmp_path, monkeypatch):
    # Tardis reads funding rows from derivative_ticker files, apart from the book: they are read first, so
    # a stop keeps those of the finished days too.
    from quotelab.data import events, rawfiles, synth

    synth.generate(tmp_path / "synth", start="2024-01-01T23:59:00", duration_s=180, assets="perp")
    written = rawfiles.write(tmp_path / "synth", "synthetic", SYMBOL, "tardis", tmp_path / "raw")
    files = [Path(f) for f in written["files"]]
    t0 = 1704153540 * 1_000_000  # 2024-01-01T23:59:00 in µs
    rows = [f"binance-futures,{SYMBOL},{t0 + k * 1_000_000},{t0 + k * 1_000_000 + 500},1704182400000000,"
            f"{0.0001 + k * 1e-8:.8f},,,,60001.5,{60000 + k / 10:.1f}" for k in range(180)]
    deriv = tmp_path / "raw" / "binance-futures_derivative_ticker.csv"
    deriv.write_text("exchange,symbol,timestamp,local_timestamp,funding_timestamp,funding_rate,predicted_funding_rate,"
                     "open_interest,last_price,index_price,mark_price\n" + "\n".join(rows) + "\n")
    convert_files("tardis", [*files, deriv], SYMBOL, tmp_path / "whole", tick_size=0.1, lot_size=0.001)

    close = events.DaySplitter._close

    def stop_at_day_two(self, d):
        if events.day_of(d * events.DAY_NS) == DAY2:
            raise KeyboardInterrupt
        close(self, d)

    monkeypatch.setattr(events.DaySplitter, "_close", stop_at_day_two)
    with pytest.raises(Stopped, match=f"kept the finished day {DAY1} .* discarded {DAY2}"):
        convert_files("tardis", [*files, deriv], SYMBOL, tmp_path / "stopped", tick_size=0.1, lot_size=0.001)
    sym, ref = (cat.symbol_dir(tmp_path / c, VENUE, SYMBOL) for c in ("stopped", "whole"))
    assert sorted(p.name for p in sym.iterdir()) == ["20240101.funding.npy", "20240101.npz", "meta.json"]
    for name in ("20240101.npz", "20240101.funding.npy"):
        assert (sym / name).read_bytes() == (ref / name).read_bytes(), name
    assert len(cat.load_funding(tmp_path / "stopped", VENUE, SYMBOL, [DAY1])) == 60
