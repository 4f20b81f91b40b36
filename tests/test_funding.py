"""Funding settlement: the payment, the schedule, and a backtest on the shared data checked by hand."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from quotelab.backtest import driver as D
from quotelab.backtest.engine import run_strategy
from quotelab.data import catalog as cat
from quotelab.data.funding import payment_nb, rows, schedule

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "strategies" / "seed_market_maker.yaml"
S = 1_000_000_000


@pytest.mark.parametrize(("position", "inverse", "expected"), [
    (0.5, False, -0.5 * 60_000.0 * 0.0001),  # long pays a positive rate: -3 USDT
    (-0.5, False, 3.0),  # short receives it
    (2.0, True, -2 * 100 / 60_000.0 * 0.0001),  # inverse: 2 contracts of 100 USD, paid in coin
    (-2.0, True, 2 * 100 / 60_000.0 * 0.0001),
])
def test_payment_by_hand(position, inverse, expected):
    size = 100.0 if inverse else 1.0
    assert payment_nb(position, size, 60_000.0, 0.0001, inverse) == pytest.approx(expected, rel=1e-15)
    assert payment_nb(position, size, 60_000.0, -0.0001, inverse) == pytest.approx(-expected, rel=1e-15)


def test_schedule_uses_what_is_known_at_the_settlement():
    T1, T2 = 100 * S, 200 * S
    table = rows(
        exch_ts=[10 * S, 90 * S, 100 * S, 101 * S, 150 * S, 199 * S, 205 * S],
        local_ts=[0] * 7,
        mark=[50.0, 51.0, 52.0, 53.0, 54.0, 55.0, 56.0],
        index=[np.nan] * 7,
        rate=[0.1, 0.2, 0.3, 0.9, 0.4, 0.5, 0.8],
        next_ts=[T1, T1, T1, T1, T2, T2, T2],  # the rows at 101 s and 205 s announce a settlement already past
    )
    ts, rate, mark = schedule(table, 0, 300 * S)
    assert ts.tolist() == [T1, T2]
    assert rate.tolist() == [0.3, 0.5]  # the last rate announced at or before T, never a later one
    assert mark.tolist() == [52.0, 55.0]
    assert schedule(table, T1, 300 * S)[0].tolist() == [T2]  # only settlements after the start
    assert schedule(table, 0, T2 - 1)[0].tolist() == [T1]  # and up to the end of data


def _funding_catalog(real_catalog: Path, tmp_path: Path, times: list[int], rates: list[float]) -> Path:
    """A copy of the BTCUSDT catalog with a funding table settling at ``times``: each settlement is
    announced by a row before it (the rate that counts), a late row after it with another rate, and
    rows for the next one."""
    root = tmp_path / "catalog"
    src = cat.symbol_dir(real_catalog, "binance-usdm", "BTCUSDT")
    shutil.copytree(src, cat.symbol_dir(root, "binance-usdm", "BTCUSDT"))
    ex, mk, rt, nx = [], [], [], []
    for k, (t, r) in enumerate(zip(times, rates, strict=True)):
        ex += [t - 2 * S, t - S, t + S]
        mk += [61_000.0 + k, 61_500.0 + k, 99_999.0]
        rt += [r * 7, r, r * -50]  # only the middle one, the last before t, may count
        nx += [t, t, t]
    cat.write_funding(root, "binance-usdm", "BTCUSDT", "20240808",
                      rows(ex, ex, mk, [np.nan] * len(ex), rt, nx))
    return root


def _run(doc: dict, tmp_path: Path, name: str, **kw):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return run_strategy(path, **kw)


@pytest.mark.parametrize("contract", ["linear", "inverse"])
def test_settlement_on_shared_data_matches_a_hand_computation(real_catalog, tmp_path, contract):
    doc = yaml.safe_load(SEED.read_text())
    doc["data"]["catalog"] = str(real_catalog)
    if contract == "inverse":  # the same book and fills, booked as 100-USD inverse contracts
        doc["data"]["assets"]["perp"].update(contract="inverse", contract_size=100.0)
    base = _run(doc, tmp_path, "base")
    assert base.summary["funding"] == 0.0 and base.summary["settlements"] == []
    ts, pos = base.record_ts, base.records[:, D.R_POSITION]
    # settle on grid points where the position differs from the steps either side, long and short,
    # so a settlement a step early or late, or with the wrong sign, changes the total
    moved = np.flatnonzero((pos[1:-1] != pos[:-2]) & (pos[1:-1] != pos[2:]) & (pos[1:-1] != 0)) + 1
    longs = [i for i in moved if pos[i] > 0 and ts[i] > ts[0] + 5 * S]
    shorts = [i for i in moved if pos[i] < 0 and ts[i] > ts[0] + 5 * S]
    picks = sorted([longs[0], shorts[0], longs[-1], shorts[-1]])
    assert len({ts[i] for i in picks}) == 4 and all(np.diff([ts[i] for i in picks]) > 3 * S)
    times = [int(ts[i]) for i in picks]
    rates = [0.0001, -0.0002, 0.0003, 0.00005]
    doc["data"]["catalog"] = str(_funding_catalog(real_catalog, tmp_path, times, rates))
    got = _run(doc, tmp_path, "funded", out_dir=tmp_path / "out")

    size = 100.0 if contract == "inverse" else 1.0
    by_hand = []
    for k, i in enumerate(picks):
        mark = 61_500.0 + k
        if contract == "inverse":
            by_hand.append(-pos[i] * size / mark * rates[k])
        else:
            by_hand.append(-pos[i] * size * mark * rates[k])
    assert [s["ts"] for s in got.summary["settlements"]] == times
    assert [s["position"] for s in got.summary["settlements"]] == [pos[i] for i in picks]
    assert [s["amount"] for s in got.summary["settlements"]] == pytest.approx(by_hand, rel=1e-12)
    assert got.summary["funding"] == pytest.approx(sum(by_hand), rel=1e-12)
    assert any(a > 0 for a in by_hand) and any(a < 0 for a in by_hand)
    # funding is accounting only: the fills are the seed's, and equity and balance move by the funding
    for key in ("num_trades", "position", "fee", "trading_volume", "trading_value"):
        assert got.summary[key] == base.summary[key]
    assert got.summary["equity"] - base.summary["equity"] == pytest.approx(sum(by_hand), abs=1e-9)
    sign = -1.0 if contract == "inverse" else 1.0
    assert got.summary["balance"] - base.summary["balance"] == pytest.approx(sign * sum(by_hand), abs=1e-9)
    # the series: the running total steps at each settlement time, included in the balance
    f = got.records[:, D.R_FUNDING]
    for k, t in enumerate(times):
        at = int(np.searchsorted(got.record_ts, t))
        assert f[at] == pytest.approx(sum(by_hand[:k + 1]), rel=1e-12)
        assert f[at - 1] == pytest.approx(sum(by_hand[:k]), rel=1e-12, abs=1e-15)
    assert np.allclose(got.records[:, D.R_BALANCE] - base.records[:, D.R_BALANCE], sign * f, atol=1e-9)

    off = _run({**doc, "engine": {**doc["engine"], "funding": "off"}}, tmp_path, "off")
    assert off.summary["funding"] == 0.0 and off.summary["equity"] == base.summary["equity"]
    ev = _run({**doc, "engine": {**doc["engine"], "mode": "event"}}, tmp_path, "event")
    assert [s["ts"] for s in ev.summary["settlements"]] == times  # per event, settlements are not skipped
    for s, k in zip(ev.summary["settlements"], range(4), strict=True):
        mark = 61_500.0 + k
        pay = -s["position"] * size / mark * rates[k] if contract == "inverse" else -s["position"] * mark * rates[k]
        assert s["amount"] == pytest.approx(pay, rel=1e-12)


def test_binance_mark_price_lines_become_catalog_funding_rows(shared_data, tmp_path):
    # The shared captures hold no markPrice stream; splice Binance-shaped markPriceUpdate lines into one.
    src = shared_data / "binance" / "usdm" / "btcusdt_20240808.gz"
    lines = gzip.decompress(src.read_bytes()).splitlines(keepends=True)
    out, expected = [], []
    for n, line in enumerate(lines):
        out.append(line)
        if n % 5000 == 4999 and b'"E":' in line:
            local = int(line.split(b" ", 1)[0])
            e = int(re.search(rb'"E":(\d+)', line).group(1))
            rate, mark = f"{0.0001 * (1 + n / 1e5):.8f}", f"{61000 + n / 1000:.2f}"
            out.append(b'%d {"stream":"btcusdt@markPrice@1s","data":{"e":"markPriceUpdate","E":%d,"s":"BTCUSDT",'
                       b'"p":"%s","P":"61000.1","i":"60990.5","r":"%s","T":1723161600000}}\n'
                       % (local, e, mark.encode(), rate.encode()))
            expected.append((e * 1_000_000, float(mark), float(rate)))
    raw = tmp_path / "btcusdt_20240808.gz"
    raw.write_bytes(gzip.compress(b"".join(out), compresslevel=1))
    proc = subprocess.run([sys.executable, "-m", "quotelab.cli", "convert", "--format", "binance-usdm", "--symbol",
                           "BTCUSDT", "--catalog", str(tmp_path / "c"), str(raw)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    table = cat.load_funding(tmp_path / "c", "binance-usdm", "BTCUSDT", ["20240808"])
    assert len(expected) >= 10
    assert table["exch_ts"].tolist() == [e[0] for e in expected]
    assert table["mark"].tolist() == [e[1] for e in expected]
    assert table["rate"].tolist() == [e[2] for e in expected]
    assert set(table["index"].tolist()) == {60990.5}
    assert set(table["next_ts"].tolist()) == {1723161600000 * 1_000_000}
    meta = cat.read_meta(tmp_path / "c", "binance-usdm", "BTCUSDT")
    assert meta["days"]["20240808"]["funding_rows"] == len(expected)
    # the events are those of the capture without the markPrice lines
    plain = tmp_path / "plain"
    subprocess.run([sys.executable, "-m", "quotelab.cli", "convert", "--format", "binance-usdm", "--symbol",
                    "BTCUSDT", "--catalog", str(plain), str(src)], check=True, capture_output=True, timeout=600)
    assert np.array_equal(cat.load_day(tmp_path / "c", "binance-usdm", "BTCUSDT", "20240808"),
                          cat.load_day(plain, "binance-usdm", "BTCUSDT", "20240808"))


def test_synthetic_perp_funding_and_the_signal_read_from_the_catalog(tmp_path):
    from quotelab.data import synth

    synth.generate(tmp_path, duration_s=600, assets="perp", funding_interval_s=240)
    table = cat.load_funding(tmp_path, "synthetic", "SYNPERP", ["20240101"])
    assert len(table) == 600 and np.all(np.diff(table["exch_ts"]) == S)
    assert sorted(set(table["next_ts"].tolist())) == [1704067200 * S + k * 240 * S for k in (1, 2, 3)]
    assert np.isfinite(table["rate"]).all() and table["rate"].std() > 0
    doc = {
        "name": "syn", "data": {"catalog": str(tmp_path), "quote": "perp",
                                "assets": {"perp": {"venue": "synthetic", "symbol": "SYNPERP", "dates": [20240101]}}},
        "fair_value": [{"kind": "mid"}],
        "forecast": [{"kind": "funding_rate", "alpha": "-1bps"}],
        "quoter": {"kind": "fixed_spread", "params": {"half_spread": "3ticks", "size": 0.01, "max_position": 0.1}},
    }
    res = _run(doc, tmp_path, "syn")
    assert len(res.summary["settlements"]) == 2  # 240 s and 480 s; 720 s is after the data
    fc = res.records[:, D.R_FORECAST]
    assert np.isfinite(fc).all() and np.unique(fc).size > 10


def test_the_funding_and_latency_example_runs(tmp_path):
    from quotelab.data import synth

    synth.generate(tmp_path, duration_s=900, assets="perp", funding_interval_s=300)
    s = run_strategy(REPO / "strategies" / "perp_funding_latency.yaml", catalog=tmp_path).summary
    assert s["num_trades"] > 50 and len(s["settlements"]) == 2  # 5 and 10 min; 15 is the end of the data
    assert s["funding"] == pytest.approx(sum(x["amount"] for x in s["settlements"]))
    assert any(x["position"] != 0 for x in s["settlements"])


def test_tardis_derivative_ticker_becomes_funding_rows_across_midnight(tmp_path):
    fixtures = Path(__file__).parent / "fixtures" / "tardis"
    book = fixtures / "binance-futures_incremental_book_L2_BTCUSDT.csv"
    trades = fixtures / "binance-futures_trades_BTCUSDT.csv.gz"
    # 2020-08-31 23:59:55 .. 2020-09-01 00:00:05 (µs); an ETHUSDT row to skip, a row without a mark
    lines = ["exchange,symbol,timestamp,local_timestamp,funding_timestamp,funding_rate,predicted_funding_rate,"
             "open_interest,last_price,index_price,mark_price",
             "binance-futures,BTCUSDT,1598918395000000,1598918395004000,1598918400000000,0.0001,0.0002,5,11650,"
             "11649.5,11650.25",
             "binance-futures,ETHUSDT,1598918396000000,1598918396004000,1598918400000000,0.0009,0.0002,5,400,400,400",
             "binance-futures,BTCUSDT,1598918399000000,1598918399004000,1598918400000000,0.00012,,5,11651,11650.5,",
             "binance-futures,BTCUSDT,1598918405000000,1598918405004000,1598947200000000,0.00003,,5,11652,11651.5,"
             "11652.0"]
    deriv = tmp_path / "binance-futures_derivative_ticker_BTCUSDT.csv.gz"
    deriv.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    args = [sys.executable, "-m", "quotelab.cli", "convert", "--format", "tardis", "--symbol", "BTCUSDT",
            "--tick-size", "0.1", "--lot-size", "0.001", "--catalog"]
    proc = subprocess.run([*args, str(tmp_path / "c"), str(book), str(trades), str(deriv)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    subprocess.run([*args, str(tmp_path / "plain"), str(book), str(trades)], check=True, capture_output=True,
                   timeout=600)
    first = cat.load_funding(tmp_path / "c", "binance-usdm", "BTCUSDT", ["20200831"])
    second = cat.load_funding(tmp_path / "c", "binance-usdm", "BTCUSDT", ["20200901"])
    assert first["exch_ts"].tolist() == [1598918395000000000, 1598918399000000000]
    assert first["local_ts"].tolist() == [1598918395004000000, 1598918399004000000]
    assert first["rate"].tolist() == [0.0001, 0.00012]
    assert first["mark"].tolist() == [11650.25, 11650.25]  # the second row had no mark: the last one holds
    assert first["index"].tolist() == [11649.5, 11650.5]
    assert set(first["next_ts"].tolist()) == {1598918400000000000}
    assert second["rate"].tolist() == [0.00003] and second["next_ts"].tolist() == [1598947200000000000]
    ts, rate, mark = schedule(np.concatenate([first, second]), 0, 1598918500000000000)
    assert ts.tolist() == [1598918400000000000] and rate.tolist() == [0.00012] and mark.tolist() == [11650.25]
    for day in ("20200831", "20200901"):
        assert np.array_equal(cat.load_day(tmp_path / "c", "binance-usdm", "BTCUSDT", day),
                              cat.load_day(tmp_path / "plain", "binance-usdm", "BTCUSDT", day))


def test_funding_rate_from_the_catalog_equals_the_same_rows_from_a_file(tmp_path):
    import polars as pl

    from quotelab.data import synth
    from quotelab.data.assets import Asset
    from quotelab.research.replay import replay_component
    from quotelab.strategy.registry import load_registry

    synth.generate(tmp_path, duration_s=300, assets="perp", funding_interval_s=120)
    table = cat.load_funding(tmp_path, "synthetic", "SYNPERP", ["20240101"])
    day = cat.load_day(tmp_path, "synthetic", "SYNPERP", "20240101")
    pl.DataFrame({"ts": table["exch_ts"], "rate": table["rate"], "next_funding_ts": table["next_ts"]}).write_csv(
        tmp_path / "f.csv")
    comp = load_registry(entry_points=False).get("signal", "funding_rate")
    asset = Asset("perp", [day], 0.1, 0.001, funding=table)
    params = {"mode": "rate_x_time_to_funding", "interval": "2m", "latency": "5ms"}
    from_catalog = replay_component(comp, params, [asset])
    from_file = replay_component(comp, {**params, "file": str(tmp_path / "f.csv")}, [asset])
    assert np.array_equal(from_catalog.values, from_file.values)
    assert np.unique(from_catalog.values).size > 100
    bare = Asset("perp", [day], 0.1, 0.001)
    with pytest.raises(Exception, match="has no funding rows in the catalog"):
        replay_component(comp, params, [bare])
