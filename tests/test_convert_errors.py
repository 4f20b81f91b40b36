"""Bad inputs, built in tmp_path from slices of the real captures, and what the user sees.

Each data problem is either a DataError naming the file, the line and a fix (exit code 2 from the
CLI), or a named finding in the summary, never absorbed in silence.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hftbacktest.data.validation import validate_event_order
from hftbacktest.types import BUY_EVENT, DEPTH_CLEAR_EVENT
from test_convert_binance import SimpleBook, convert_json, raw_messages, replay_against_bookticker, run_cli

from quotelab.data.convert import convert_files
from quotelab.errors import DataError


def read_lines(path: Path, n: int | None = None) -> list[bytes]:
    with gzip.open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines[:n] if n else lines


def write_gz(path: Path, lines: list[bytes]) -> Path:
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    return path


def msg(line: bytes) -> dict:
    return json.loads(line.split(b" ", 1)[1])


def is_depth(line: bytes) -> bool:
    return b"@depth" in line[:80]


@pytest.fixture(scope="module")
def eth(shared_data: Path) -> list[bytes]:
    """First 12,000 lines of USD-M ETHUSDT: REST snapshot at line 41, ~1,000 depth diffs."""
    return read_lines(shared_data / "binance" / "usdm" / "ethusdt_20240808.gz", 12_000)


def convert_args(fmt: str, symbol: str, catalog: Path, *files: Path) -> list[str | Path]:
    return ["convert", "--format", fmt, "--symbol", symbol, "--catalog", catalog, *files]


def fails(*args: str | Path) -> str:
    r = run_cli(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr


def depth_lines(lines: list[bytes]) -> list[int]:
    return [i for i, ln in enumerate(lines) if is_depth(ln)]


def test_gap_without_later_snapshot_stops_naming_file_line_and_ids(eth: list[bytes], tmp_path: Path) -> None:
    d = depth_lines(eth)
    drop = d[200]
    lines = eth[:drop] + eth[drop + 1:]
    f = write_gz(tmp_path / "gap.gz", lines)
    before, after = msg(eth[d[199]])["data"], msg(eth[d[201]])["data"]
    err = fails(*convert_args("binance-usdm", "ETHUSDT", tmp_path / "cat", f))
    # The next depth message after the hole is reported where it now is (one line up, 1-based).
    assert f"{f}:{d[201]}: gap in depth update ids" in err
    assert f"previous message ended at u={before['u']}, this one has pu={after['pu']}" in err
    assert "no later REST snapshot" in err and "Fix:" in err
    assert not (tmp_path / "cat" / "binance-usdm").exists()


def test_gap_resyncs_from_a_later_snapshot(eth: list[bytes], tmp_path: Path) -> None:
    d = depth_lines(eth)
    # The true book at a later message m, from a clean conversion, becomes a REST snapshot line.
    clean = write_gz(tmp_path / "clean.gz", eth)
    s = convert_files("binance-usdm", [clean], "ETHUSDT", tmp_path / "clean_cat")
    ev = np.load(s["days"]["20240808"]["file"])["data"]
    m = msg(eth[d[600]])["data"]
    book = SimpleBook()
    rows = np.flatnonzero(ev["ev"] & (1 << 31))
    for r in rows.tolist():
        kind = int(ev["ev"][r] & 0xFF)
        if kind not in (1, 3, 4) or ev["ival"][r] > m["u"]:
            continue
        side = 1 if ev["ev"][r] & BUY_EVENT else -1
        if kind == DEPTH_CLEAR_EVENT:
            book.clear(side)
        else:
            book.set(side, round(float(ev["px"][r]), 2), float(ev["qty"][r]))
    snap = {"lastUpdateId": m["u"], "E": m["E"], "T": m["T"],
            "bids": [[f"{p:.2f}", f"{q:.3f}"] for p, q in sorted(book.side[1].items(), reverse=True)],
            "asks": [[f"{p:.2f}", f"{q:.3f}"] for p, q in sorted(book.side[-1].items())]}
    local = eth[d[600]].split(b" ", 1)[0]
    snap_line = local + b" " + json.dumps(snap, separators=(",", ":")).encode()
    drop = d[300]
    lines = eth[:drop] + eth[drop + 1:d[600] + 1] + [snap_line] + eth[d[600] + 1:]
    f = write_gz(tmp_path / "gap_then_snapshot.gz", lines)

    summary = convert_json("binance-usdm", "ETHUSDT", [f], tmp_path / "cat")
    kinds = {x["kind"]: x for x in summary["findings"]}
    assert kinds["gap"]["line"] == d[301] and str(f) == kinds["gap"]["file"]
    assert "resynced" in kinds and f"{f}:{d[600] + 1} (lastUpdateId={m['u']})" in kinds["resynced"]["message"]
    day = summary["days"]["20240808"]
    ev = np.load(day["file"])["data"]
    validate_event_order(ev)
    clears = np.flatnonzero((ev["ev"] & 0xFF) == DEPTH_CLEAR_EVENT)
    assert len(clears) == 4, "a snapshot at the day start and one at the resync"
    bts, _, _ = raw_messages([clean])
    groups, compared, agreed = replay_against_bookticker(ev, bts, 0.01)
    assert agreed / compared >= 0.999
    assert day["quality"]["agreement"]["rate"] >= 0.999


def test_missing_snapshot_is_an_error(shared_data: Path, tmp_path: Path) -> None:
    f = write_gz(tmp_path / "day2_only.gz", read_lines(shared_data / "binance" / "cm" / "btcusd_perp_20240809.gz",
                                                       3_000))
    err = fails(*convert_args("binance-cm", "BTCUSD_PERP", tmp_path / "cat", f))
    assert "missing snapshot" in err and str(f) in err and "Fix:" in err
    assert not (tmp_path / "cat" / "binance-cm").exists()


def test_garbled_line_names_file_and_line(eth: list[bytes], tmp_path: Path) -> None:
    lines = list(eth)
    lines[499] = lines[499][: len(lines[499]) // 2]
    f = write_gz(tmp_path / "garbled.gz", lines)
    err = fails(*convert_args("binance-usdm", "ETHUSDT", tmp_path / "cat", f))
    assert f"{f}:500: garbled line: not valid JSON" in err and "Fix:" in err


def test_line_without_timestamp_is_garbled(eth: list[bytes], tmp_path: Path) -> None:
    lines = list(eth)
    lines[9] = lines[9].split(b" ", 1)[1]
    f = write_gz(tmp_path / "nots.gz", lines)
    err = fails(*convert_args("binance-usdm", "ETHUSDT", tmp_path / "cat", f))
    assert f"{f}:10: garbled line: does not start with '<local timestamp> '" in err


def test_truncated_gzip_names_file_and_line(eth: list[bytes], tmp_path: Path) -> None:
    whole = gzip.compress(b"\n".join(eth) + b"\n")
    f = tmp_path / "truncated.gz"
    f.write_bytes(whole[: len(whole) * 6 // 10])
    err = fails(*convert_args("binance-usdm", "ETHUSDT", tmp_path / "cat", f))
    assert "truncated gzip" in err and f"{f}:" in err and "Fix:" in err
    line = int(err.split(f"{f}:")[1].split(":")[0])
    assert 1_000 < line < len(eth)
    assert not (tmp_path / "cat" / "binance-usdm").exists()


def test_local_timestamps_going_backwards_are_reported_and_reordered(eth: list[bytes], tmp_path: Path) -> None:
    lines = list(eth)
    ts, rest = lines[2999].split(b" ", 1)
    lines[2999] = str(int(lines[2998].split(b" ", 1)[0]) - 5_000_000).encode() + b" " + rest
    f = write_gz(tmp_path / "backwards.gz", lines)
    s = convert_json("binance-usdm", "ETHUSDT", [f], tmp_path / "cat")
    back = [x for x in s["findings"] if x["kind"] == "local_ts_backwards"]
    assert back and back[0]["line"] == 3000 and back[0]["file"] == str(f) and "5.000 ms" in back[0]["message"]
    validate_event_order(np.load(s["days"]["20240808"]["file"])["data"])


def test_clock_running_behind_is_estimated_and_corrected_visibly(eth: list[bytes], tmp_path: Path) -> None:
    f = write_gz(tmp_path / "eth.gz", eth)
    s = convert_json("binance-usdm", "ETHUSDT", [f], tmp_path / "cat")
    q = s["days"]["20240808"]["quality"]
    assert q["raw_latency"]["p50_ms"] < -1200, "raw local − exch: the capture clock is behind"
    assert q["latency"]["min_ms"] == 0 and q["latency"]["p99_ms"] > q["latency"]["p50_ms"] > 0
    assert 1.26e9 < q["clock_offset_ns"] < 1.28e9
    assert any(x["kind"] == "clock_behind" and "shifted by +12" in x["message"] for x in q["findings"])
    ev = np.load(s["days"]["20240808"]["file"])["data"]
    assert (ev["local_ts"] >= ev["exch_ts"]).all()


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_failure_on_day_two_leaves_catalog_as_it_was(shared_data: Path, tmp_path: Path) -> None:
    day1 = shared_data / "binance" / "cm" / "btcusd_perp_20240808.gz"
    day2 = read_lines(shared_data / "binance" / "cm" / "btcusd_perp_20240809.gz")
    bad = list(day2)
    bad[-100] = b"1723161903531356026 {\"stream\":\"btcusd_perp@depth@0ms\",\"data\":{"
    bad2 = write_gz(tmp_path / "btcusd_perp_20240809_bad.gz", bad)
    cat = tmp_path / "cat"
    # Into an empty catalog: day 1 was complete before day 2 failed, yet nothing is left behind.
    err = fails(*convert_args("binance-cm", "BTCUSD_PERP", cat, day1, bad2))
    assert f"{bad2}:{len(bad) - 99}: garbled line" in err
    assert _tree(cat) == {}
    # Into a catalog holding a good conversion: files and meta.json unchanged, no staging left.
    good2 = write_gz(tmp_path / "btcusd_perp_20240809.gz", day2)
    convert_json("binance-cm", "BTCUSD_PERP", [day1, good2], cat)
    before = _tree(cat)
    assert {"binance-cm/BTCUSD_PERP/meta.json", "binance-cm/BTCUSD_PERP/20240809.npz"} <= set(before)
    fails(*convert_args("binance-cm", "BTCUSD_PERP", cat, day1, bad2))
    assert _tree(cat) == before
    assert not [p for p in cat.rglob(".*")]


def test_snapshot_not_covered_by_any_later_diff(eth: list[bytes], tmp_path: Path) -> None:
    snap_at = next(i for i, ln in enumerate(eth) if b"lastUpdateId" in ln)
    last_id = msg(eth[snap_at])["lastUpdateId"]
    # Only diffs that end before the snapshot: nothing can bridge it.
    lines = [ln for ln in eth[:snap_at + 1] if not is_depth(ln) or msg(ln)["data"]["u"] < last_id]
    snap_line = len(lines)
    lines += [ln for ln in eth[snap_at + 1:] if not is_depth(ln)]
    f = write_gz(tmp_path / "nocover.gz", lines)
    with pytest.raises(DataError, match=rf"{f}:{snap_line}: the REST snapshot .* is never covered"):
        convert_files("binance-usdm", [f], "ETHUSDT", tmp_path / "cat")


def test_files_out_of_time_order_are_refused(shared_data: Path, tmp_path: Path) -> None:
    d1 = write_gz(tmp_path / "a.gz", read_lines(shared_data / "binance" / "cm" / "btcusd_perp_20240808.gz", 2_000))
    d2 = write_gz(tmp_path / "b.gz", read_lines(shared_data / "binance" / "cm" / "btcusd_perp_20240809.gz", 2_000))
    err = fails(*convert_args("binance-cm", "BTCUSD_PERP", tmp_path / "cat", d2, d1))
    assert f"{d1}:1: this file starts at local time" in err and "in time order" in err


def test_corrupt_gzip_is_an_error_naming_the_file(eth: list[bytes], tmp_path: Path) -> None:
    data = bytearray(gzip.compress(b"\n".join(eth) + b"\n"))
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)  # a run of zeros inside the deflate stream
    f = tmp_path / "corrupt.gz"
    f.write_bytes(bytes(data))
    err = fails(*convert_args("binance-usdm", "ETHUSDT", tmp_path / "cat", f))
    # Depending on where the damage lands, inflate fails or yields a line that cannot be parsed.
    assert f"{f}:" in err and ("corrupt gzip" in err or "garbled line" in err or "truncated gzip" in err)
    assert not (tmp_path / "cat" / "binance-usdm").exists()


def test_plain_zlib_fallback_reads_and_detects_truncation(eth: list[bytes], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """isal is optional: with the standard zlib the same files convert and the same damage is found."""
    import zlib

    from quotelab.data import binance_json

    monkeypatch.setattr(binance_json, "_zlib", zlib)
    whole = gzip.compress(b"\n".join(eth) + b"\n")
    good = tmp_path / "good.gz"
    good.write_bytes(whole + gzip.compress(b""))  # a second, empty gzip member is still one stream
    s = convert_files("binance-usdm", [good], "ETHUSDT", tmp_path / "cat")
    assert s["messages"]["lines"] == len(eth)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=rf"{cut}:\d+: truncated gzip"):
        convert_files("binance-usdm", [cut], "ETHUSDT", tmp_path / "cat2")


def test_trade_arriving_after_its_day_was_closed(shared_data: Path, tmp_path: Path) -> None:
    day1 = read_lines(shared_data / "binance" / "cm" / "btcusd_perp_20240808.gz")
    day2 = read_lines(shared_data / "binance" / "cm" / "btcusd_perp_20240809.gz")
    # A day-1 trade (exchange time 23:5x) logged again five minutes into day 2, long after day 1 was
    # closed (a day closes once the stream is 60 s past it; closing is checked per block of lines).
    late = next(ln for ln in day1[len(day1) // 2:] if b"@trade" in ln[:80])
    assert msg(late)["data"]["T"] < 1723161600000
    i = len(day2) - 10
    f2 = write_gz(tmp_path / "d2.gz", day2[:i] + [day2[i].split(b" ", 1)[0] + b" " + late.split(b" ", 1)[1]]
                  + day2[i:])
    f1 = write_gz(tmp_path / "d1.gz", day1)
    err = fails(*convert_args("binance-cm", "BTCUSD_PERP", tmp_path / "cat", f1, f2))
    assert f"{f2}:{i + 1}: an event of UTC day 20240808 arrived after that day was closed" in err


# --- the data against the command --------------------------------------------------------------


def test_data_of_another_market_or_symbol_is_refused_naming_file_line_and_fix(shared_data: Path, eth: list[bytes],
                                                                               tmp_path: Path) -> None:
    cat = tmp_path / "cat"
    coin = shared_data / "binance" / "cm" / "btcusd_perp_20240808.gz"
    err = fails(*convert_args("binance-usdm", "BTCUSDT", cat, coin))
    assert f"{coin}:1: " in err and "COIN-M" in err and "BTCUSD_PERP" in err
    assert "Fix: convert it with --format binance-cm --symbol BTCUSD_PERP" in err
    spot = shared_data / "binance" / "spot" / "btcusdt_20240808.gz"
    err = fails(*convert_args("binance-usdm", "BTCUSDT", cat, spot))
    assert f"{spot}:1: " in err and "Binance spot BTCUSDT" in err and "--format binance-spot" in err
    # The file starts right; one line further on is another symbol's: the converter names that line.
    other = read_lines(shared_data / "binance" / "usdm" / "btcusdt_20240808.gz", 40)
    btc_depth = next(ln for ln in other if b"btcusdt@depth" in ln)
    lines = list(eth)
    lines.insert(5000, btc_depth)
    f = write_gz(tmp_path / "eth_with_btc.gz", lines)
    err = fails(*convert_args("binance-usdm", "ETHUSDT", cat, f))
    assert f"{f}:5001: this line is Binance USD-M futures BTCUSDT" in err and "--symbol ETHUSDT" in err
    assert _tree(cat) == {}


def test_a_file_of_another_format_says_what_it_is(shared_data: Path, tmp_path: Path) -> None:
    usdm = shared_data / "binance" / "usdm" / "btcusdt_20240808.gz"
    err = fails(*convert_args("tardis", "BTCUSDT", tmp_path / "cat", usdm))
    assert f"{usdm}:1: this file is a collector capture of Binance USD-M futures BTCUSDT" in err
    assert "Fix: convert it with --format binance-usdm --symbol BTCUSDT" in err and '{"stream"' not in err
    tardis = Path(__file__).parent / "fixtures" / "tardis" / "binance-futures_trades_BTCUSDT.csv.gz"
    err = fails(*convert_args("binance-usdm", "BTCUSDT", tmp_path / "cat", tardis))
    assert "this file is a Tardis trades CSV of binance-futures BTCUSDT" in err and "--format tardis" in err
    bybit = shared_data / "other-venues" / "BYBIT.ws.26.0.gz"
    assert "cryptofeed capture of Bybit" in fails(*convert_args("okx", "BTC-USDT", tmp_path / "cat", bybit))


def _with_local(lines: list[bytes], at: range, local: Callable[[int], int]) -> list[bytes]:
    out = list(lines)
    for i in at:
        ts, rest = out[i].split(b" ", 1)
        out[i] = str(local(int(ts))).encode() + b" " + rest
    return out


def test_a_clock_stepping_back_on_a_few_lines_is_a_finding_about_them_not_a_shift_of_the_day(
        eth: list[bytes], tmp_path: Path) -> None:
    steps = range(6000, 6011)  # eleven lines whose local clock is 600 s behind
    stepped = write_gz(tmp_path / "stepped.gz", _with_local(eth, steps, lambda ts: ts - 600 * 10**9))
    # The reference, by hand: each of those lines takes the local time of the line before them.
    before = int(eth[steps[0] - 1].split(b" ", 1)[0])
    fixed = write_gz(tmp_path / "fixed.gz", _with_local(eth, steps, lambda ts: before))
    got = convert_json("binance-usdm", "ETHUSDT", [stepped], tmp_path / "a")
    ref = convert_json("binance-usdm", "ETHUSDT", [fixed], tmp_path / "b")
    q, q_ref = got["days"]["20240808"]["quality"], ref["days"]["20240808"]["quality"]
    assert q["clock_offset_ns"] == q_ref["clock_offset_ns"] < 2 * 10**9
    assert q["latency"] == q_ref["latency"]
    (back,) = [x for x in got["findings"] if x["kind"] == "local_ts_backwards"]
    assert (back["count"], back["file"], back["line"], back["last_line"]) == (11, str(stepped), 6001, 6011)
    assert 599_990 < back["max_ms"] <= 600_000 and "the rest of the day keeps its clock" in back["message"]
    assert not [x for x in ref["findings"] if x["kind"] == "local_ts_backwards"]
    np.testing.assert_array_equal(np.load(got["days"]["20240808"]["file"])["data"],
                                  np.load(ref["days"]["20240808"]["file"])["data"])


@pytest.mark.parametrize(("option", "value"), [("--tick-size", "0"), ("--lot-size", "-0.001"),
                                               ("--tick-size", "nan"), ("--contract-size", "inf"),
                                               ("--lot-size", "1e308")])
def test_instrument_options_outside_their_domain_are_one_line_errors(shared_data: Path, tmp_path: Path,
                                                                     option: str, value: str) -> None:
    src = shared_data / "binance" / "usdm" / "ethusdt_20240808.gz"
    err = fails(*convert_args("binance-usdm", "ETHUSDT", tmp_path / "cat", src), option, value)
    assert f"{option} must be a finite number above 0" in err and f"got {float(value)!r}" in err
    assert not (tmp_path / "cat" / "binance-usdm").exists()
