"""Report: the PnL split adds up, markouts are signed right, and the HTML report renders from a real batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quotelab.batch.diagnostics import diagnostics

ARTIFACTS = Path(__file__).resolve().parents[1] / "ci-artifacts"  # kept by CI: report.png
REPO = Path(__file__).resolve().parents[1]


def _series(mid, pos, bal, fee, step_ns=100_000_000):
    n = len(mid)
    ts = np.arange(n, dtype=np.int64) * step_ns
    frame = {"mid": np.array(mid, float), "position": np.array(pos, float), "balance": np.array(bal, float),
             "fee": np.array(fee, float), "bid": np.full(n, 99.0), "ask": np.full(n, np.nan)}
    return ts, frame


def test_pnl_split_by_hand_linear() -> None:
    # buy 1 at 99 while the mid is 100 (spread +1), the mid rises to 102 (inventory +2), fee 0.1
    ts, fr = _series([100, 100, 102], [0, 1, 1], [0, -99, -99], [0, 0.1, 0.1])
    summary = {"position": 1.0, "balance": -99.0, "fee": 0.1, "last_mid": 102.0, "equity": 102 - 99 - 0.1}
    d = diagnostics(ts, fr, summary, {"contract": "linear", "contract_size": 1.0, "tick_size": 1.0})
    assert d["pnl_spread"] == pytest.approx(1.0)
    assert d["pnl_inventory"] == pytest.approx(2.0)
    assert d["pnl_fees"] == pytest.approx(-0.1)
    assert d["pnl_total"] == pytest.approx(summary["equity"])
    assert d["fills"] == 1
    assert d["markout_bps_0"] == pytest.approx((100 - 99) / 99 * 1e4)
    assert d["markout_bps_100ms"] == pytest.approx((102 - 99) / 99 * 1e4)
    assert d["quote_uptime"] == 0.0 and d["quote_uptime_any"] == 1.0


def test_pnl_split_sums_for_inverse() -> None:
    rng = np.random.default_rng(1)
    mid = 60000 + np.cumsum(rng.normal(0, 5, 200))
    pos = np.clip(np.cumsum(rng.choice([-1, 0, 1], 200)), -5, 5).astype(float)
    px = mid + rng.normal(0, 1, 200)
    bal = np.cumsum(np.diff(np.concatenate([[0.0], pos])) * 100 / px)  # inverse: balance moves by coins
    fee = np.cumsum(np.abs(np.diff(np.concatenate([[0.0], pos]))) * 1e-6)
    ts, fr = _series(mid, pos, bal, fee)
    summary = {"position": pos[-1], "balance": bal[-1], "fee": fee[-1], "last_mid": mid[-1]}
    equity = -bal[-1] - pos[-1] * 100 / mid[-1] - fee[-1]
    d = diagnostics(ts, fr, summary, {"contract": "inverse", "contract_size": 100.0, "tick_size": 0.1})
    assert d["pnl_spread"] + d["pnl_inventory"] + d["pnl_fees"] == pytest.approx(equity, abs=1e-12)
    assert d["pnl_inventory"] != 0.0 and d["pnl_spread"] != 0.0


@pytest.fixture(scope="module")
def real_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("report")
    cat = tmp_path / "cat"
    subprocess.run([sys.executable, "-m", "quotelab.cli", "synth", "--catalog", str(cat), "--duration", "120s",
                    "--seed", "5"], check=True, cwd=REPO, capture_output=True)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "quotelab.cli", "batch", "strategies/batch_synthetic.yaml",
                        "--catalog", str(cat), "--out", str(out), "--workers", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "batch finished: done 8, failed 0, skipped 0" in r.stdout  # plain lines: not a terminal
    r = subprocess.run([sys.executable, "-m", "quotelab.cli", "report", str(out), "--stat", "equity"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def test_report_from_a_real_batch(real_batch: Path) -> None:
    out = real_batch
    # the decomposition adds up to the recorded PnL of every real run
    for p in out.glob("runs/*/record.json"):
        rec = json.loads(p.read_text())
        d = rec["diagnostics"]
        assert d["pnl_spread"] + d["pnl_inventory"] + d["pnl_fees"] == pytest.approx(
            rec["summary"]["equity"], rel=1e-9, abs=1e-9)
        assert d["fills"] > 0 and d["markout_bps_60s"] is not None
    page = (out / "report" / "index.html").read_text()
    assert page.count("<tr class=\"done\">") >= 8 and "table class=\"sortable\"" in page
    for png in ("heatmap.png", "best_worst.png", "venues.png", "diagnostics.png", "inventory_fills.png"):
        assert f'src="{png}"' in page
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SYNSPOT" in page and "SYNPERP" in page
    # top-down: the summary and charts first, the full table last, columns named for people
    assert page.index("<p class=lead>") < page.index('src="heatmap.png"') < page.index("<h2>All runs")
    assert page.index('src="diagnostics.png"') < page.index("<h2>All runs")
    assert ">inventory PnL<" in page and ">diag.pnl_inventory<" not in page
    assert "<h2>Per UTC day, best run" in page and ">max |position|<" in page


def test_failed_runs_are_one_line_each_with_the_error_on_demand(real_batch: Path, tmp_path: Path) -> None:
    from quotelab.batch.report import build_report

    copy = tmp_path / "b"
    shutil.copytree(real_batch / "runs", copy / "runs")
    rec_path = sorted((copy / "runs").glob("*/record.json"))[0]
    rec = json.loads(rec_path.read_text())
    error = "RunError: " + "a long message " * 40 + "\nTraceback line two"
    rec.update(status="failed", error=error)
    rec_path.write_text(json.dumps(rec))
    page = build_report(copy).read_text()
    assert page.count("<details class=fail>") == 1
    start = page.index("<details class=fail>")
    summary_line = page[start:page.index("</summary>", start)]
    assert "RunError: a long message" in summary_line and "line two" not in summary_line
    assert "Traceback line two</pre>" in page  # the whole message, on demand
    assert page.index("<details class=fail>") < page.index("<h2>All runs")
    assert '<td class="s err" title=' in page  # in the table: one line, the rest on hover


def test_unreadable_run_records_are_listed_not_dropped(real_batch: Path, tmp_path: Path) -> None:
    """Seen red: a corrupt record.json was left out of the report without a word."""
    copy = tmp_path / "b"
    shutil.copytree(real_batch / "runs", copy / "runs")
    records = sorted((copy / "runs").glob("*/record.json"))
    records[0].write_text(records[0].read_text()[:40])  # cut short, as by a full disk or a hand edit
    r = subprocess.run([sys.executable, "-m", "quotelab.cli", "report", str(copy)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    (warning,) = r.stderr.splitlines()
    assert warning.startswith(f"warning: run record left out, cannot be read: {records[0]}: ")
    page = (copy / "report" / "index.html").read_text()
    assert "Unreadable run records (1)" in page and str(records[0]) in page
    rest = page.replace(str(records[0]), "")
    assert records[0].parent.name not in rest  # its run is in no table
    assert all(p.parent.name in rest for p in records[1:])


def test_report_of_one_run(real_catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "quotelab.cli", "run", "strategies/seed_market_maker.yaml", "--catalog",
                    str(real_catalog), "--out", str(out)], cwd=REPO, check=True, capture_output=True, timeout=600)
    r = subprocess.run([sys.executable, "-m", "quotelab.cli", "report", str(out)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    page = (out / "report" / "index.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    for png in ("run.png", "quotes.png"):
        assert f'src="{png}"' in page and (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (day,) = summary["days"]
    assert f"<td>{day['day']}</td>" in page.replace('<td class="s">', "<td>")
    assert f"{day['pnl']:.6g}" in page and f"{summary['pnl']:.6g} USDT" in page
    assert "not reported: the run covers" in page  # the stats say why there is no Sharpe ratio


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def _colourful_share(chromium: str, page: Path, shot: Path, profile: Path) -> float:
    """Screenshot ``page``; the share of saturated pixels (plots, not text or table lines)."""
    import matplotlib.image

    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,2400",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=180, check=True)
    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[:2] == (2400, 1400)
    return float(((img.max(-1) - img.min(-1)) > 0.2).mean())


def test_report_renders_in_headless_chromium(real_batch: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        msg = "chromium not found (Debian: apt-get install chromium; the README's test command does it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    page = real_batch / "report" / "index.html"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'p1'}", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=180, check=True).stdout
    assert dom.count("<tr") >= 9 and dom.count("<img") >= 5
    ARTIFACTS.mkdir(exist_ok=True)
    with_images = _colourful_share(chromium, page, ARTIFACTS / "report.png", tmp_path / "p2")
    # the same page with its images gone: what is left is text and table rules
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(page, bare / "index.html")
    without = _colourful_share(chromium, bare / "index.html", tmp_path / "bare.png", tmp_path / "p3")
    assert with_images > 0.01 and with_images > 5 * without


@pytest.mark.parametrize("contract", ["linear", "inverse"])
def test_best_worst_series_read_in_chunks_keeps_every_bucket_extreme(tmp_path, monkeypatch, contract) -> None:
    """The batch report's PnL and position lines, read 300 rows at a time and thinned to 50 buckets,
    hold each bucket's first, last, lowest and highest values of the whole series computed in memory."""
    import polars as pl

    from quotelab import spool
    from quotelab.backtest import pnl
    from quotelab.batch.diagnostics import equity_series
    from quotelab.batch.report import _series

    rng = np.random.default_rng(3)
    n = 5_003
    mid = 60000 + np.cumsum(rng.normal(0, 5, n))
    mid[:7] = np.nan  # a leading gap takes the first mid
    mid[rng.choice(n, 300)] = np.nan  # one-sided books
    pos = np.clip(np.cumsum(rng.choice([-1, 0, 1], n)), -5, 5).astype(float)
    bal, fee = np.cumsum(rng.normal(0, 10, n)), np.cumsum(np.abs(rng.normal(0, 0.01, n)))
    ts = 1_700_000_000_000_000_000 + np.arange(n, dtype=np.int64) * 100_000_000
    (tmp_path / "runs" / "r").mkdir(parents=True)
    pl.DataFrame({"timestamp": ts, "mid": mid, "position": pos, "balance": bal, "fee": fee,
                  "bid": mid - 1}).write_parquet(tmp_path / "runs" / "r" / "series.parquet")
    inst = {"contract": contract, "contract_size": 100.0 if contract == "inverse" else 1.0}
    want = equity_series({"mid": mid, "position": pos, "balance": bal, "fee": fee}, inst)
    if contract == "inverse":
        want = want * pnl.ffill(mid)

    whole = _series(tmp_path, "r", inst, buckets=2000)  # under 4 x buckets rows: every row, as before
    np.testing.assert_array_equal(whole["timestamp"], ts)
    np.testing.assert_array_equal(whole["position"], pos)
    np.testing.assert_allclose(whole["pnl"], want, rtol=1e-15)
    monkeypatch.setattr(spool, "CHUNK", 300)
    got = _series(tmp_path, "r", inst, buckets=50)
    assert 200 < len(got["timestamp"]) <= 6 * (50 + n // 300 + 1)
    rows = np.searchsorted(ts, got["timestamp"])
    np.testing.assert_array_equal(ts[rows], got["timestamp"])
    np.testing.assert_allclose(got["pnl"], want[rows], rtol=1e-15)
    np.testing.assert_array_equal(got["position"], pos[rows])
    bucket = np.arange(n) * 50 // n
    for b in range(50):
        mine = bucket[rows] == b
        for line, ref in ((got["pnl"], want), (got["position"], pos)):
            assert np.nanmin(line[mine]) == pytest.approx(np.nanmin(ref[bucket == b]), rel=1e-15)
            assert np.nanmax(line[mine]) == pytest.approx(np.nanmax(ref[bucket == b]), rel=1e-15)
    assert rows[0] == 0 and rows[-1] == n - 1


@pytest.fixture(scope="module")
def seed_run(real_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seed_run") / "run"
    subprocess.run([sys.executable, "-m", "quotelab.cli", "run", "strategies/seed_market_maker.yaml", "--catalog",
                    str(real_catalog), "--out", str(out)], cwd=REPO, check=True, capture_output=True, timeout=600)
    return out


@pytest.mark.parametrize("contract", ["linear", "inverse"])
def test_run_report_lines_read_in_chunks_equal_the_whole_series(seed_run, monkeypatch, contract) -> None:
    """The one-run chart's lines, read 500 rows at a time (each chunk carrying the last row before it),
    equal the whole series computed in memory: the PnL parts' running sums, position, quotes in ticks,
    fills and the zoom's window; thinned to 100 buckets they keep each bucket's extremes."""
    import polars as pl

    from quotelab import spool
    from quotelab.backtest import pnl
    from quotelab.batch.report import _busiest_window, _fills, _run_lines

    summary = json.loads((seed_run / "summary.json").read_text())
    summary["instrument"]["contract"] = contract  # the same sums either way; inverse values them in coin
    inst = summary["instrument"]
    s = {c: v.to_numpy() for c, v in pl.read_parquet(seed_run / "series.parquet").to_dict().items()}
    ts, n, tick = s["timestamp"], len(s["timestamp"]), float(inst["tick_size"])
    parts = pnl.parts(ts, s, summary, contract == "inverse", float(inst.get("contract_size", 1.0)))
    want = {k: np.cumsum(parts[k])[:n] for k in ("spread", "inventory", "fees", "funding")}
    want["total"] = np.cumsum(parts["spread"] + parts["inventory"] + parts["fees"] + parts["funding"])[:n]
    mid = pnl.ffill(s["mid"])
    want |= {"position": s["position"], "bid": (s["bid"] - mid) / tick, "ask": (s["ask"] - mid) / tick}
    ft, fpx, fq = _fills(ts, s, inst)
    ticks = (fpx - mid[np.clip(np.searchsorted(ts, ft) - 1, 0, n - 1)]) / tick

    monkeypatch.setattr(spool, "CHUNK", 500)
    got = _run_lines(seed_run / "series.parquet", summary, buckets=n)
    assert n > 6 * 500 and len(ft) > 100
    np.testing.assert_array_equal(got.ts, ts)
    for k, v in want.items():
        np.testing.assert_array_equal(got.lines[k], v, err_msg=k)
    for k, v in (("t", ft), ("px", fpx), ("q", fq), ("ticks", ticks)):
        np.testing.assert_array_equal(got.fills[k], v, err_msg=k)

    span = 60_000_000_000  # the zoom's window, as the whole-series report found it
    while span > 2_000_000_000 and np.bincount((ft - ts[0]) // span).max() > 60:
        span //= 3
    w = int(np.bincount((ft - ts[0]) // span).argmax())
    assert _busiest_window(got.all_fills["t"], int(ts[0])) == (ts[0] + w * span, ts[0] + (w + 1) * span)

    thin = _run_lines(seed_run / "series.parquet", summary, buckets=100)
    rows = np.searchsorted(ts, thin.ts)
    np.testing.assert_array_equal(ts[rows], thin.ts)
    assert len(rows) < n // 2 and rows[0] == 0 and rows[-1] == n - 1
    bucket = np.arange(n) * 100 // n
    for k, v in want.items():
        np.testing.assert_array_equal(thin.lines[k], v[rows], err_msg=k)
        for b in range(100):
            assert np.nanmax(thin.lines[k][bucket[rows] == b]) == np.nanmax(v[bucket == b])
            assert np.nanmin(thin.lines[k][bucket[rows] == b]) == np.nanmin(v[bucket == b])
    import quotelab.batch.report as R

    monkeypatch.setattr(R, "MAX_FILLS", 50)  # past it: per bucket of time and side, the fills furthest either way
    few = _run_lines(seed_run / "series.parquet", summary, buckets=10)
    assert 50 < len(few.fills["t"]) < len(ft) and len(few.all_fills["t"]) == len(ft)
    at = np.searchsorted(ft, few.fills["t"])
    np.testing.assert_array_equal(few.fills["ticks"], ticks[at])
    key = ((ft - ft[0]) / (ft[-1] + 1 - ft[0]) * 10).astype(np.int64) * 2 + (fq > 0)
    for b in np.unique(key):
        mine = few.fills["ticks"][key[at] == b]
        assert np.nanmax(mine) == np.nanmax(ticks[key == b]) and np.nanmin(mine) == np.nanmin(ticks[key == b])
