"""Bybit, OKX and Tardis converters, end to end through ``quotelab convert`` in a subprocess.

Each stored catalog day is replayed with a plain dict book and checked against the venue's own data:
Bybit against a dict of level ids fed the raw messages, OKX against the checksum in every book
message, Tardis against a dict fed the raw CSV rows.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hftbacktest.types import BUY_EVENT, DEPTH_CLEAR_EVENT, DEPTH_EVENT, DEPTH_SNAPSHOT_EVENT, LOCAL_EVENT
from tardis_reference import convert as reference_convert

from quotelab.data import catalog, tardis
from quotelab.data.events import ConvertJob, DayResult
from quotelab.data.tardis import BOOK_COLUMNS, TRADE_COLUMNS
from quotelab.data.tardis import convert as convert_tardis
from quotelab.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "tardis"
TARDIS_BOOK = FIXTURES / "binance-futures_incremental_book_L2_BTCUSDT.csv"
TARDIS_TRADES = FIXTURES / "binance-futures_trades_BTCUSDT.csv.gz"
QUOTELAB = Path(sys.executable).with_name("quotelab")

def run_convert(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}
    argv = [str(a) for a in args]
    return subprocess.run([str(QUOTELAB), "convert", *argv], capture_output=True, text=True, env=env, timeout=300)


def convert_ok(*args: str | Path) -> subprocess.CompletedProcess[str]:
    r = run_convert(*args)
    assert r.returncode == 0, r.stderr + r.stdout
    return r


def convert_fails(*args: str | Path) -> str:
    r = run_convert(*args)
    assert r.returncode == 2, r.stderr + r.stdout
    assert "Traceback" not in r.stderr
    return " ".join(r.stderr.split())


# ---------------------------------------------------------------------------------------------
# Replaying stored days with a dict book, the way hftbacktest applies the rows.


def replay_states(cat: Path, venue: str, symbol: str) -> list[dict[tuple[int, float], float]]:
    """Book after each message (rows in local order), over all days; consecutive repeats dropped.

    A message is a run of CLEAR/SNAPSHOT rows, or of depth rows with the same (exch_ts, local_ts)."""
    states: list[dict[tuple[int, float], float]] = []
    book: dict[tuple[int, float], float] = {}
    for day in catalog.list_days(cat, venue, symbol):
        ev = catalog.load_day(cat, venue, symbol, day)
        ev = ev[(ev["ev"] & LOCAL_EVENT) != 0]
        key = None
        for row in ev:
            t = int(row["ev"]) & 0xFF
            if t not in (DEPTH_EVENT, DEPTH_CLEAR_EVENT, DEPTH_SNAPSHOT_EVENT):
                continue
            side = 1 if int(row["ev"]) & BUY_EVENT else -1
            k = ("snap",) if t != DEPTH_EVENT else ("depth", int(row["exch_ts"]), int(row["local_ts"]))
            if key is not None and k != key:
                _push(states, book)
            key = k
            px = round(float(row["px"]), 8)
            if t == DEPTH_CLEAR_EVENT:
                # hftbacktest clears a side from its best level through `px`.
                for s, p in list(book):
                    if s == side and (p >= px if side > 0 else p <= px):
                        del book[(s, p)]
            elif row["qty"] == 0:
                book.pop((side, px), None)
            else:
                book[(side, px)] = float(row["qty"])
        _push(states, book)
    return states


def _push(states: list[dict], book: dict) -> None:
    if not states or states[-1] != book:
        states.append(dict(book))


def dedupe(states: list[dict]) -> list[dict]:
    out: list[dict] = []
    for s in states:
        _push(out, s)
    return out


def cryptofeed_messages(path: Path):
    with gzip.open(path, "rt") as fh:
        for line in fh:
            if line[:1].isdigit():
                yield json.loads(line.partition(": ")[2])


# ---------------------------------------------------------------------------------------------
# Bybit


@pytest.fixture(scope="module")
def bybit_cat(shared_data, tmp_path_factory):
    cat = tmp_path_factory.mktemp("bybit")
    # no --tick-size/--lot-size: the built-in spec knows Bybit's BTCUSD (an inverse contract)
    r = convert_ok("--format", "bybit", "--symbol", "BTCUSD", "--catalog", cat,
                   shared_data / "other-venues" / "BYBIT.ws.26.0.gz")
    meta = json.loads((cat / "bybit" / "BTCUSD" / "meta.json").read_text())
    assert (meta["tick_size"], meta["lot_size"], meta["contract"]) == (0.5, 1.0, {"kind": "inverse", "size": 1.0})
    return cat, r.stdout


def test_bybit_book_matches_raw_messages_applied_by_level_id(bybit_cat, shared_data):
    cat, out = bybit_cat
    levels: dict[int, tuple[str, float, float]] = {}
    raw: list[dict] = []
    for m in cryptofeed_messages(shared_data / "other-venues" / "BYBIT.ws.26.0.gz"):
        if m.get("topic") != "orderBookL2_25.BTCUSD":
            continue
        if m["type"] == "snapshot":
            levels = {e["id"]: (e["side"], float(e["price"]), e["size"]) for e in m["data"]}
        else:
            for e in m["data"]["delete"]:
                del levels[e["id"]]
            for e in m["data"]["update"]:
                s, p, _ = levels[e["id"]]
                levels[e["id"]] = (s, p, e["size"])
            for e in m["data"]["insert"]:
                levels[e["id"]] = (e["side"], float(e["price"]), e["size"])
        raw.append({(1 if s == "Buy" else -1, p): float(q) for s, p, q in levels.values()})
    stored = replay_states(cat, "bybit", "BTCUSD")
    assert len(raw) == 507
    assert stored == dedupe(raw)


def test_bybit_day_trades_meta_and_summary(bybit_cat):
    cat, out = bybit_cat
    meta = catalog.read_meta(cat, "bybit", "BTCUSD")
    assert meta["tick_size"] == 0.5 and meta["lot_size"] == 1.0
    assert meta["contract"] == {"kind": "inverse", "size": 1.0}
    assert list(meta["days"]) == ["20210417"]
    ev = catalog.load_day(cat, "bybit", "BTCUSD", "20210417")
    counts = meta["days"]["20210417"]["counts"]
    assert counts["trade_buy"] + counts["trade_sell"] == 131
    assert counts["depth_clear"] == 2 and counts["depth_snapshot"] == 50
    depth = ev[(ev["ev"] & 0xFF) == DEPTH_EVENT]
    assert depth["ival"].min() > 5_938_954_538  # cross_seq of the message
    assert "EOSUSD" not in {p.name for p in (cat / "bybit").iterdir()}
    assert "BTCUSD" in out


BYBIT_SNAP = ('{"topic":"orderBookL2_25.BTCUSD","type":"snapshot","data":[{"price":"100.00","symbol":"BTCUSD",'
              '"id":1000000,"side":"Buy","size":5},{"price":"100.50","symbol":"BTCUSD","id":1005000,"side":"Sell",'
              '"size":7}],"cross_seq":10,"timestamp_e6":1618677785000000}')


def _bybit_delta(seq: int, ts_us: int, price: str = "100.00", size: int = 6) -> str:
    return ('{"topic":"orderBookL2_25.BTCUSD","type":"delta","data":{"delete":[],"update":[{"price":"' + price
            + '","symbol":"BTCUSD","id":1000000,"side":"Buy","size":' + str(size) + '}],"insert":[],'
            '"transactTimeE6":0},"cross_seq":' + str(seq) + ',"timestamp_e6":' + str(ts_us) + '}')


def _write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _bybit_args(tmp_path: Path, f: Path) -> list:
    return ["--format", "bybit", "--symbol", "BTCUSD", "--catalog", tmp_path / "cat", "--tick-size", "0.5",
            "--lot-size", "1", f]


def test_bybit_garbled_json_names_file_and_line(tmp_path):
    f = _write_gz(tmp_path / "b.gz", [f"1618677786.0: {BYBIT_SNAP}", '1618677786.1: {"topic":"orderBookL2_25.BT'])
    err = convert_fails(*_bybit_args(tmp_path, f))
    assert f"{f}:2: garbled line: not valid JSON" in err and "Fix:" in err
    assert not (tmp_path / "cat" / "bybit").exists()


def test_bybit_without_snapshot_is_an_error(tmp_path):
    f = _write_gz(tmp_path / "b.gz", [f"1618677786.1: {_bybit_delta(11, 1618677785100000)}"])
    err = convert_fails(*_bybit_args(tmp_path, f))
    assert "missing snapshot: no orderBookL2_25.BTCUSD snapshot" in err and "Fix:" in err


def test_bybit_delta_before_snapshot_and_backwards_time_are_named(tmp_path):
    f = _write_gz(tmp_path / "b.gz", [
        f"1618677786.0: {_bybit_delta(9, 1618677784900000)}",
        f"1618677786.1: {BYBIT_SNAP}",
        f"1618677786.3: {_bybit_delta(11, 1618677785200000)}",
        f"1618677786.2: {_bybit_delta(12, 1618677785100000, size=8)}",
    ])
    out = " ".join(convert_ok(*_bybit_args(tmp_path, f)).stdout.split())
    assert f"delta_before_snapshot │ 1 │ {f}:1" in out
    assert f"local_ts_backwards │ 1 │ {f}:4" in out
    assert f"exch_ts_backwards │ 1 │ {f}:4" in out
    # Line 4 was written after line 3, so it arrived after it: its local time is set to line 3's, and the
    # local view applies it last, as its sequence number (12 after 11) says the venue did.
    assert replay_states(tmp_path / "cat", "bybit", "BTCUSD")[-1] == {(1, 100.0): 8.0, (-1, 100.5): 7.0}


def test_bybit_price_off_the_tick_is_an_error(tmp_path):
    f = _write_gz(tmp_path / "b.gz", [f"1618677786.1: {BYBIT_SNAP}",
                                      f"1618677786.2: {_bybit_delta(11, 1618677785100000, price='100.25')}"])
    err = convert_fails(*_bybit_args(tmp_path, f))
    assert f"{f}:2: price 100.25 is not a multiple of the tick size 0.5" in err and "--tick-size" in err


# ---------------------------------------------------------------------------------------------
# OKX


def _okx_str(x: float, decimals: int) -> str:
    return f"{x:.{decimals}f}".rstrip("0").rstrip(".")


def _okx_crc(book: dict[tuple[int, float], float]) -> int:
    bids = sorted((p for s, p in book if s > 0), reverse=True)[:25]
    asks = sorted(p for s, p in book if s < 0)[:25]
    parts: list[str] = []
    for i in range(max(len(bids), len(asks))):
        if i < len(bids):
            parts += [_okx_str(bids[i], 1), _okx_str(book[(1, bids[i])], 8)]
        if i < len(asks):
            parts += [_okx_str(asks[i], 1), _okx_str(book[(-1, asks[i])], 8)]
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


OKX_ARGS = ["--format", "okx", "--symbol", "BTC-USDT"]


def test_okx_replayed_book_matches_every_checksum(shared_data, tmp_path):
    src = shared_data / "other-venues" / "OKX.ws.1.0.gz"
    out = convert_ok(*OKX_ARGS, "--catalog", tmp_path, src).stdout
    want = [m["data"][0]["checksum"] for m in cryptofeed_messages(src)
            if m.get("arg") == {"channel": "books", "instId": "BTC-USDT"} and "data" in m]
    stored = replay_states(tmp_path, "okx", "BTC-USDT")
    assert len(want) == 98 and len(stored) == 98
    assert [_okx_crc(b) for b in stored] == want
    meta = catalog.read_meta(tmp_path, "okx", "BTC-USDT")
    assert meta["contract"]["kind"] == "linear" and meta["tick_size"] == 0.1
    ev = catalog.load_day(tmp_path, "okx", "BTC-USDT", "20220513")
    trades = ev[((ev["ev"] & 0xFF) == 2) & ((ev["ev"] & LOCAL_EVENT) != 0)]
    assert trades.shape[0] == 68 and trades["ival"].min() == 338476308  # tradeId; the first came before the book
    assert "trades_before_book" in out


def test_okx_checksum_mismatch_names_the_line(shared_data, tmp_path):
    src = shared_data / "other-venues" / "OKX.ws.1.0.gz"
    with gzip.open(src, "rt") as fh:
        lines = fh.read().split("\n")
    n = next(i for i, ln in enumerate(lines) if '"instId":"BTC-USDT"},"action":"update"' in ln)
    lines[n] = lines[n].replace('["30243.5","1.2112","0","4"]', '["30243.5","1.2113","0","4"]', 1)
    f = _write_gz(tmp_path / "okx.gz", lines)
    err = convert_fails(*OKX_ARGS, "--catalog", tmp_path / "cat", f)
    assert f"{f}:{n + 1}: checksum mismatch" in err and "no later snapshot" in err and "Fix:" in err


# ---------------------------------------------------------------------------------------------
# Tardis


def _tardis_raw_states(path: Path) -> list[dict[tuple[int, float], float]]:
    states: list[dict] = []
    book: dict[tuple[int, float], float] = {}
    prev_snap, key = False, None
    with open(path) as fh:
        for r in csv.DictReader(fh):
            if r["symbol"] != "BTCUSDT":
                continue
            snap = r["is_snapshot"] == "true"
            k = "snap" if snap else (r["timestamp"], r["local_timestamp"])
            if key is not None and k != key:
                states.append(dict(book))
            if snap and not prev_snap:
                book.clear()
            prev_snap, key = snap, k
            lv = (1 if r["side"] == "bid" else -1, float(r["price"]))
            if float(r["amount"]) == 0:
                book.pop(lv, None)
            else:
                book[lv] = float(r["amount"])
    states.append(dict(book))
    return dedupe(states)


TARDIS_ARGS = ["--format", "tardis", "--symbol", "BTCUSDT", "--tick-size", "0.1", "--lot-size", "0.001"]


@pytest.mark.slow
def test_tardis_book_and_trades_across_midnight(tmp_path):
    out = convert_ok(*TARDIS_ARGS, "--catalog", tmp_path, TARDIS_BOOK, TARDIS_TRADES).stdout
    venue = "binance-usdm"  # Tardis's exchange id binance-futures names the venue the days are filed under
    assert replay_states(tmp_path, venue, "BTCUSDT") == _tardis_raw_states(TARDIS_BOOK)
    meta = catalog.read_meta(tmp_path, venue, "BTCUSDT")
    assert list(meta["days"]) == ["20200831", "20200901"]
    ev = catalog.load_day(tmp_path, venue, "BTCUSDT", "20200901")
    assert (ev["ev"][:1] & 0xFF) == DEPTH_CLEAR_EVENT  # each day starts with the book
    trades = [catalog.load_day(tmp_path, venue, "BTCUSDT", d) for d in meta["days"]]
    t = np.concatenate([e[((e["ev"] & 0xFF) == 2) & ((e["ev"] & LOCAL_EVENT) != 0)] for e in trades])
    assert t["ival"].tolist() == [400001 + i for i in range(7)]
    assert ((t["ev"] & BUY_EVENT) != 0).tolist() == [True, True, False, False, True, False, True]
    assert "binance-usdm" in out and "ETHUSDT" in out


def _tardis_file(tmp_path: Path, rows: list[str], header: str = ",".join(
        ["exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side", "price", "amount"])) -> Path:
    f = tmp_path / "book.csv"
    f.write_text(header + "\n" + "\n".join(rows) + "\n")
    return f


def test_tardis_unknown_header_is_an_error(tmp_path):
    f = _tardis_file(tmp_path, ["x"], header="a,b,c")
    err = convert_fails(*TARDIS_ARGS, "--catalog", tmp_path / "cat", f)
    assert f"{f}:1: header 'a,b,c' is neither Tardis incremental_book_L2" in err


def test_tardis_short_row_names_the_line(tmp_path):
    f = _tardis_file(tmp_path, ["deribit,BTCUSDT,1,2,true,bid,100.0,1", "deribit,BTCUSDT,1,2,false,bid"])
    err = convert_fails(*TARDIS_ARGS, "--catalog", tmp_path / "cat", f)
    assert f"{f}:3: 6 columns, expected 8" in err


def test_tardis_delta_before_snapshot_and_backwards_time_are_named(tmp_path):
    f = _tardis_file(tmp_path, [
        "deribit,BTCUSDT,1598918390000000,1598918390001000,false,bid,100.0,1",
        "deribit,BTCUSDT,1598918390100000,1598918390101000,true,bid,100.0,2",
        "deribit,BTCUSDT,1598918390100000,1598918390101000,true,ask,100.5,3",
        "deribit,BTCUSDT,1598918390300000,1598918390301000,false,ask,100.5,0",
        "deribit,BTCUSDT,1598918390200000,1598918390201000,false,ask,100.6,4",
    ])
    out = " ".join(convert_ok(*TARDIS_ARGS, "--catalog", tmp_path / "cat", f).stdout.split())
    assert f"delta_before_snapshot │ 1 │ {f}:2" in out
    assert f"local_ts_backwards │ 1 │ {f}:6" in out
    assert "tardis-deribit" in out
    assert replay_states(tmp_path / "cat", "tardis-deribit", "BTCUSDT")[-1] == {(1, 100.0): 2.0, (-1, 100.6): 4.0}


def test_tardis_without_tick_size_says_what_to_pass(tmp_path):
    f = _tardis_file(tmp_path, ["deribit,BTC-PERPETUAL,1598918390100000,1598918390101000,true,bid,100.0,2"])
    err = convert_fails("--format", "tardis", "--symbol", "BTC-PERPETUAL", "--catalog", tmp_path / "cat", f)
    assert "no built-in instrument spec for tardis-deribit/BTC-PERPETUAL" in err
    assert "--tick-size" in err and "--lot-size" in err


@pytest.mark.slow
def test_tardis_takes_the_spec_of_the_market_its_data_names(tmp_path):
    """Tardis's exchange column picks the venue, and with it the built-in spec: binance-futures BTCUSDT
    needs no --tick-size, and binance-delivery BTCUSD_PERP is stored as the inverse contract it is."""
    convert_ok("--format", "tardis", "--symbol", "BTCUSDT", "--catalog", tmp_path, TARDIS_BOOK, TARDIS_TRADES)
    meta = catalog.read_meta(tmp_path, "binance-usdm", "BTCUSDT")
    assert (meta["tick_size"], meta["lot_size"], meta["origin"]) == (0.1, 0.001, "built-in spec")
    f = tmp_path / "delivery.csv"  # the fixture's quantities are not whole contracts: --lot-size overrides
    f.write_text(TARDIS_BOOK.read_text().replace("binance-futures,", "binance-delivery,").replace(
        ",BTCUSDT,", ",BTCUSD_PERP,"))
    convert_ok("--format", "tardis", "--symbol", "BTCUSD_PERP", "--lot-size", "0.001", "--catalog", tmp_path, f)
    meta = catalog.read_meta(tmp_path, "binance-cm", "BTCUSD_PERP")
    assert meta["contract"] == {"kind": "inverse", "size": 100.0} and meta["tick_size"] == 0.1
    # A market without a spec: the contract is stated on the command line (OKX swaps are 0.01 BTC).
    f = tmp_path / "swap.csv"
    f.write_text(TARDIS_BOOK.read_text().replace("binance-futures,", "okex-swap,").replace(
        ",BTCUSDT,", ",BTC-USDT-SWAP,"))
    args = ("--format", "tardis", "--symbol", "BTC-USDT-SWAP", "--tick-size", "0.1", "--lot-size", "0.001")
    err = convert_fails(*args, "--contract", "quanto", "--catalog", tmp_path, f)
    assert "--contract must be linear or inverse, got 'quanto'" in err
    convert_ok(*args, "--contract-size", "0.01", "--catalog", tmp_path, f)
    meta = catalog.read_meta(tmp_path, "okx", "BTC-USDT-SWAP")
    assert meta["contract"] == {"kind": "linear", "size": 0.01}
    assert meta["origin"] == "overridden on the command line: tick_size, lot_size, contract_size"


def _messy_tardis(tmp_path: Path, seed: int, n: int = 2500) -> tuple[Path, Path]:
    """A seeded Tardis pair with everything a real export can hold: deltas and a trade before the
    first snapshot, snapshots mid-stream, other symbols' rows, blank lines, trades without a side or
    an id, local and exchange time stepping back, and UTC midnight in the middle."""
    rng = np.random.default_rng(seed)
    t = 1598918400_000000 - 4_000_000  # µs, four seconds before midnight
    mid = 11650.0
    book: list[str] = [""]  # a blank first line: polars counts a file's columns on it
    trades: list[str] = []

    def row(ts: int, local: int, snap: bool, side: str, px: float, amount: float, symbol: str = "BTCUSDT") -> None:
        book.append(f"binance-futures,{symbol},{ts},{local},{str(snap).lower()},{side},{px:.1f},{amount:.3f}")

    def snapshot(ts: int) -> None:
        for i in range(30):  # one message, though its rows' times differ
            row(ts + i, ts + 1200, True, "bid", mid - 0.1 * (i + 1), rng.integers(1, 900) * 0.001)
            row(ts + i, ts + 1200, True, "ask", mid + 0.1 * i, rng.integers(1, 900) * 0.001)

    for _ in range(3):
        row(t, t + 1000, False, "bid", mid - 0.5, 1.0)
        t += 1000
    trades.append(f"binance-futures,BTCUSDT,{t},{t + 900},77,buy,{mid:.1f},0.010")
    snapshot(t)
    for i in range(n):
        t += int(rng.integers(0, 6_000))
        mid = round(mid + 0.1 * int(rng.integers(-1, 2)), 1)
        r = rng.random()
        local = t + 1200 + 100 * int(rng.integers(0, 3)) - (5000 if r < 0.01 else 0)
        if r < 0.004:
            snapshot(t)
        elif r < 0.008:
            book.append("")
        elif r < 0.012:
            row(t, local, False, "bid", 400.1, 1.0, symbol="ETHUSDT")
        else:
            exch = t - (3000 if r < 0.02 else 0)
            for _ in range(int(rng.integers(1, 5))):
                bid = bool(rng.integers(0, 2))
                px = mid - 0.1 * (1 + int(rng.integers(0, 25))) if bid else mid + 0.1 * int(rng.integers(0, 25))
                row(exch, local, False, "bid" if bid else "ask", px,
                    0.0 if rng.random() < 0.3 else rng.integers(1, 5000) * 0.001)
        if rng.random() < 0.15:
            side = rng.choice(["buy", "sell", "unknown"], p=[0.45, 0.45, 0.1])
            tid = rng.choice(["", "-7", str(400000 + i)], p=[0.05, 0.05, 0.9])  # only digits make an id
            # local times tie with the book's often: the merge must keep the files' order then
            received = t + 1200 + 100 * int(rng.integers(0, 3))
            trades.append(f"binance-futures,BTCUSDT,{t},{received},{tid},{side},{mid:.1f},"
                          f"{rng.integers(1, 90) * 0.001:.3f}")
    book_path = tmp_path / "binance-futures_incremental_book_L2.csv"
    book_path.write_text(",".join(BOOK_COLUMNS) + "\n" + "\n".join(book) + "\n")
    trades_path = tmp_path / "binance-futures_trades.csv.gz"
    with gzip.open(trades_path, "wt") as fh:
        fh.write(",".join(TRADE_COLUMNS) + "\n" + "\n".join(trades) + "\n")
    return book_path, trades_path


def _check_against_reference(files: list[Path], summary: dict, load_day, loose: tuple[str, ...] = ()) -> None:
    """``loose``: finding kinds whose count must agree but whose first place may not (the reference
    records a finding as its reader gets to the row, a message ahead of the merge on each file)."""
    days: list[DayResult] = []
    instrument = {"tick_size": 0.1, "lot_size": 0.001}
    expected = reference_convert(files, ConvertJob("binance-usdm", "BTCUSDT", instrument, days.append))
    assert [d.day for d in days] == ["20200831", "20200901"]
    for d in days:
        got = load_day(d.day)
        assert got.dtype == d.events.dtype and got.shape == d.events.shape, d.day
        for field in got.dtype.names:
            assert np.array_equal(got[field], d.events[field]), (d.day, field)
        assert summary["days"][d.day]["quality"] == json.loads(json.dumps(d.info["quality"]))
    assert summary["messages"] == expected["messages"]
    others = summary["messages"]["other_symbol_rows"]
    assert summary["other_symbols"] == expected["other_symbols"] == {"ETHUSDT": others} and others > 0
    by_kind = {f["kind"]: f for f in summary["findings"]}
    want = {f["kind"]: f for f in expected["findings"]}
    for kind in loose:
        assert by_kind.pop(kind)["count"] == want.pop(kind)["count"]
    assert by_kind == want
    assert {"delta_before_snapshot", "blank_lines", "trade_side_unknown", "local_ts_backwards",
            "exch_ts_backwards", "other_symbols"} <= {f["kind"] for f in summary["findings"]}
    assert summary["messages"]["snapshots"] >= 3


@pytest.mark.parametrize("seed", [1, 2])
def test_tardis_equals_the_per_message_reference_on_a_messy_pair(tmp_path, seed):
    """The array converter (polars, day blocks) against the slow one that feeds every message on its
    own: the same day files to the bit, the same counts and findings."""
    book, trades = _messy_tardis(tmp_path, seed)
    summary = json.loads(convert_ok(*TARDIS_ARGS, "--json", "--catalog", tmp_path / "cat", book, trades).stdout)
    _check_against_reference([book, trades], summary,
                             lambda day: catalog.load_day(tmp_path / "cat", "binance-usdm", "BTCUSDT", day))


@pytest.mark.parametrize(("chunk", "pieces"), [(4000, 1), (30000, 1), (1 << 20, 3)])
def test_tardis_read_in_small_chunks_equals_the_reference(tmp_path, monkeypatch, chunk, pieces):
    """A file is parsed a chunk at a time and the files are merged as the chunks come: with chunks of a
    few lines, messages (the 60-row snapshots too) are cut everywhere, and the result must not change.
    The book cut into three files, the trades between them, is merged as the reference merges it."""
    book, trades = _messy_tardis(tmp_path, 3)
    files = [book, trades]
    if pieces > 1:
        header, *lines = book.read_text().splitlines(keepends=True)
        cuts = [len(lines) * i // pieces for i in range(pieces + 1)]
        parts = [tmp_path / f"book_{i}.csv" for i in range(pieces)]
        for i, part in enumerate(parts):
            part.write_text(header + "".join(lines[cuts[i]:cuts[i + 1]]))
        files = [parts[0], trades, *parts[1:]]
    monkeypatch.setattr(tardis, "CHUNK_BYTES", chunk)
    days: dict[str, DayResult] = {}
    job = ConvertJob("binance-usdm", "BTCUSDT", {"tick_size": 0.1, "lot_size": 0.001},
                     lambda d: days.__setitem__(d.day, d))
    summary = tardis.convert(files, job)
    summary["days"] = {d: r.info for d, r in days.items()}
    _check_against_reference(files, json.loads(json.dumps(summary)), lambda day: days[day].events,
                             loose=("local_ts_backwards",) if pieces > 1 else ())


def _cut(path: Path, pieces: int, gz: bool, out: Path) -> list[Path]:
    """``path`` cut by lines into ``pieces`` files with its header, alternately gzipped (from the first if ``gz``)
    and plain; ``pieces`` of 0 deals the lines out in turn to two files that both span the whole day."""
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    header, *lines = text.splitlines(keepends=True)
    if pieces:
        cuts = [len(lines) * i // pieces for i in range(pieces + 1)]
        parts = [lines[cuts[i]:cuts[i + 1]] for i in range(pieces)]
    else:
        parts = [lines[0::2], lines[1::2]]
    paths = []
    for i, part in enumerate(parts):
        data = (header + "".join(part)).encode()
        zipped = gz == (i % 2 == 0)
        paths.append(out / f"{path.name.split('.')[0]}_{i}.csv{'.gz' if zipped else ''}")
        paths[-1].write_bytes(gzip.compress(data) if zipped else data)
    return paths


class _Counted:
    """A file object that counts the files open at once (``open``: [now, most])."""

    def __init__(self, fh, opened: list[int]) -> None:
        self.fh, self.opened = fh, opened
        opened[0] += 1
        opened[1] = max(opened)

    def close(self) -> None:
        if not self.fh.closed:
            self.opened[0] -= 1
        self.fh.close()

    def __getattr__(self, name):
        return getattr(self.fh, name)


@pytest.mark.parametrize("order", ["time", "reversed", "shuffled", "overlapping"])
def test_tardis_files_waiting_for_their_turn_equal_the_reference(tmp_path, monkeypatch, order):
    """Of many files given at once, one whose messages come later waits for its turn in the merge with its
    first messages read and the file closed; it is reopened where it was (a gzip stream inflated again up to
    there) when the merge asks for more. Given in time order, reversed, shuffled, or with the trades dealt
    out to two files that span the whole day (both in the merge from the start, with a book piece waiting),
    in gzip and plain text, a piece's first rows earlier than the last of the one before (the file's local
    times step back), read in chunks of a few lines: the same days, counts and findings as the reference,
    which merges with heapq; and never every file open at once, as before (~1.5 MB held by each)."""
    book, trades = _messy_tardis(tmp_path, 5)
    books = _cut(book, 4, True, tmp_path)
    trade_files = _cut(trades, 0 if order == "overlapping" else 2, False, tmp_path)
    files = {"time": [books[0], trade_files[0], books[1], books[2], trade_files[1], books[3]],
             "reversed": [books[3], trade_files[1], books[2], books[1], trade_files[0], books[0]],
             "shuffled": [books[2], trade_files[1], books[0], books[3], trade_files[0], books[1]],
             "overlapping": [trade_files[1], books[2], books[3], trade_files[0], books[0], books[1]]}[order]
    monkeypatch.setattr(tardis, "FIRST_CHUNK_BYTES", 1000)
    monkeypatch.setattr(tardis, "CHUNK_BYTES", 8000)
    real_open = tardis.open_binary
    runs = []
    for suspend in (tardis._Source.suspend, lambda self: None):  # and every file left open, as before
        monkeypatch.setattr(tardis._Source, "suspend", suspend)
        opened = [0, 0]
        monkeypatch.setattr(tardis, "open_binary", lambda path, opened=opened: _Counted(real_open(path), opened))
        days: dict[str, DayResult] = {}
        job = ConvertJob("binance-usdm", "BTCUSDT", {"tick_size": 0.1, "lot_size": 0.001},
                         lambda d, days=days: days.__setitem__(d.day, d))
        summary = tardis.convert(files, job)
        summary["days"] = {d: r.info for d, r in days.items()}
        runs.append((json.loads(json.dumps(summary)), days, opened))
    (summary, days, opened), (kept_open, days_open, opened_before) = runs
    # Which file's trade without a side is found first depends on how far each file is read ahead (the
    # reference reads a message ahead of its merge), so with the trades in two files only its count agrees.
    loose = ("local_ts_backwards", "trade_side_unknown") if order == "overlapping" else ("local_ts_backwards",)
    _check_against_reference(files, summary, lambda day: days[day].events, loose=loose)
    assert summary == kept_open
    assert {d: r.events.tobytes() for d, r in days.items()} == {d: r.events.tobytes() for d, r in days_open.items()}
    assert opened[0] == 0 and opened[1] <= 3 < len(files) == opened_before[1]


def test_tardis_bad_line_of_a_file_reopened_is_named(tmp_path, monkeypatch):
    """A file that waited closed for its turn goes on counting its lines from where it stopped."""
    book, trades = _messy_tardis(tmp_path, 6)
    first, later = _cut(book, 2, False, tmp_path)
    header, *lines = gzip.decompress(later.read_bytes()).decode().splitlines(keepends=True)
    lines[500] = "binance-futures,BTCUSDT,1598918399000000,1598918399001000,false,bid,abc,1\n"
    later.write_bytes(gzip.compress((header + "".join(lines)).encode()))
    monkeypatch.setattr(tardis, "FIRST_CHUNK_BYTES", 1000)
    monkeypatch.setattr(tardis, "CHUNK_BYTES", 8000)
    with pytest.raises(DataError) as err:
        convert_tardis([later, trades, first], ConvertJob("binance-usdm", "BTCUSDT",
                                                          {"tick_size": 0.1, "lot_size": 0.001}, lambda day: None))
    assert str(err.value).startswith(f"{later}:502: not a number") and "Fix:" in str(err.value)


@pytest.mark.parametrize(("line", "message"), [
    ("deribit,BTCUSDT,1598918390200000,1598918390201000,false,bid,abc,1", "not a number"),
    ("deribit,BTCUSDT,1598918390200000,1598918390201000,maybe,bid,100.0,1", "is_snapshot must be true/false"),
    ("deribit,BTCUSDT,1598918390200000,1598918390201000,false,buy,100.0,1", "side bid/ask"),
    (",,,,,,,", "not a number"),
    ("deribit,BTCUSDT,1598918390200000,1598918390201000,false,bid,100.05,1", "not a multiple of the tick size"),
    ("deribit,BTCUSDT,1598918390200000,1598918390201000,false,bid,100.0,0.0005", "not a multiple of the lot size"),
    ("deribit,BTCUSDT,1598918390200000,1598918390201000,false,bid,nan,1", "price nan is not a positive number"),
    ("okex,BTCUSDT,1598918390200000,1598918390201000,false,bid,100.0,1", "exchange 'okex', but the input so far"),
])
def test_tardis_bad_line_is_named(tmp_path, line, message):
    f = _tardis_file(tmp_path, ["deribit,BTCUSDT,1598918390100000,1598918390101000,true,bid,100.0,2",
                                "deribit,BTCUSDT,1598918390100000,1598918390101000,true,ask,100.5,3",
                                "", line, "deribit,BTCUSDT,1598918390300000,1598918390301000,false,ask,100.5,0"])
    with pytest.raises(DataError) as err:
        convert_tardis([f], ConvertJob("tardis-deribit", "BTCUSDT", {"tick_size": 0.1, "lot_size": 0.001},
                                       lambda day: None))
    assert str(err.value).startswith(f"{f}:5: ") and message in str(err.value) and "Fix:" in str(err.value)


def test_tardis_cut_gzip_is_named(tmp_path):
    whole = gzip.compress(TARDIS_BOOK.read_bytes())
    f = tmp_path / "book.csv.gz"
    f.write_bytes(whole[: len(whole) // 2])
    err = convert_fails(*TARDIS_ARGS, "--catalog", tmp_path / "cat", f)
    assert f"{f}: the gzip stream is damaged or cut short" in err and "Fix:" in err


def test_data_without_the_symbol_asked_for_names_the_symbols_it_holds(shared_data, tmp_path):
    err = convert_fails("--format", "tardis", "--symbol", "ETHUSDT", "--catalog", tmp_path / "cat", TARDIS_BOOK,
                        TARDIS_TRADES)
    assert "for ETHUSDT" in err and "check --symbol. The files hold other symbols: BTCUSDT (41)." in err
    bybit = shared_data / "other-venues" / "BYBIT.ws.26.0.gz"
    err = convert_fails("--format", "bybit", "--symbol", "ETHUSD", "--catalog", tmp_path / "cat", bybit)
    assert "The files hold other symbols: BTCUSD (570), EOSUSD (524)." in err


def _respelled(line: str, i: int) -> str:
    """A row with its price and amount written another way a CSV writer may write the same number."""
    *head, px, amount = line.split(",")
    spell = [lambda v: v, lambda v: v + "0", lambda v: f"{float(v):.6e}", lambda v: f"{float(v) * 10:g}E-1"][i % 4]
    return ",".join([*head, spell(px), spell(amount)])


@pytest.mark.parametrize("messy", [False, True])
def test_tardis_clean_blocks_read_by_numba_equal_polars(tmp_path, monkeypatch, messy):
    """A block whose lines are all of one symbol in plain form is parsed by a numba pass instead of polars:
    the days, counts and findings must be the same to the bit, whether every block is clean (numbers spelled
    in several ways: trailing zeros, exponents) or clean blocks alternate with messy ones."""
    book, trades = _messy_tardis(tmp_path, 4)
    if not messy:
        for path in (book, trades):
            text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
            header, *lines = text.splitlines()
            lines = [_respelled(ln, i) for i, ln in enumerate(lines)
                     if ln and ",ETHUSDT," not in ln and ",unknown," not in ln]
            path.write_bytes(gzip.compress("\n".join([header, *lines, ""]).encode()) if path.suffix == ".gz"
                             else "\n".join([header, *lines, ""]).encode())
    monkeypatch.setattr(tardis, "CHUNK_BYTES", 3000)
    monkeypatch.setattr(tardis, "SPLIT_BYTES", 1000)  # blocks scanned as two halves at once, cut anywhere
    clean = tardis.TardisConverter._parse_clean
    taken: list[bool] = []

    def spy(self, *args):
        rows = clean(self, *args)
        taken.append(rows is not None)
        return rows

    results = []
    for parse_clean in (spy, lambda self, *args: None):
        monkeypatch.setattr(tardis.TardisConverter, "_parse_clean", parse_clean)
        days: list[DayResult] = []
        summary = tardis.convert([book, trades], ConvertJob("binance-usdm", "BTCUSDT", {"tick_size": 0.1,
                                                                                        "lot_size": 0.001},
                                                            days.append))
        results.append((json.dumps(summary), [(d.day, d.events.tobytes(), json.dumps(d.info)) for d in days]))
    assert results[0] == results[1] and len(results[0][1]) == 2
    assert all(taken) if not messy else (any(taken) and not all(taken))
