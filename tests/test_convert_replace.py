"""`quotelab convert` never silently replaces a catalog day with less of it.

A day whose exchange-time span does not contain the catalog day's is refused (exit 2, one line naming the
day file, both spans and event counts, and the fix), with the catalog left byte for byte as it was, unless
``--replace``. The same files again, or a longer capture, replace as before. A stopped convert leaves such
a day out and says so. Real captures (the shared data), truncated copies of them, and real CLI subprocesses.
"""

from __future__ import annotations

import datetime as dt
import gzip
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quotelab.data import catalog as cat
from quotelab.data import events
from quotelab.data.convert import convert_files
from quotelab.errors import Stopped

USDM = ("binance-usdm", "BTCUSDT")
SPOT = ("binance-spot", "BTCUSDT")
DAY1, DAY2 = "20240808", "20240809"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotelab.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def convert(market: tuple[str, str], files: list[Path], catalog: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("convert", "--format", market[0], "--symbol", market[1], "--catalog", catalog, *extra, *files)


def head(src: Path, dst: Path, lines: int) -> Path:
    """The first ``lines`` lines of a gzip capture: the same capture, stopped earlier."""
    with gzip.open(src, "rb") as fh:
        data = b"".join(itertools.islice(fh, lines))
    dst.write_bytes(gzip.compress(data, compresslevel=1))
    return dst


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file and folder under the catalog, with its bytes: staging folders and temporaries included."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in root.rglob("*")}


def meta(root: Path, market: tuple[str, str]) -> dict:
    return json.loads((cat.symbol_dir(root, *market) / "meta.json").read_text())


def utc(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns // 10**9, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.") + f"{ns // 10**6 % 1000:03d}"


@pytest.fixture(scope="module")
def usdm(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The USD-M BTCUSDT capture, a copy cut at 23:57 (its first 40,000 lines), and each converted alone."""
    root = tmp_path_factory.mktemp("replace")
    whole = shared_data / "binance/usdm/btcusdt_20240808.gz"
    short = head(whole, root / "btcusdt_20240808.gz", 40_000)
    out = {"whole": whole, "short": short}
    for name, f in (("whole", whole), ("short", short)):
        r = convert(USDM, [f], root / f"cat_{name}")
        assert r.returncode == 0, r.stderr
        out[f"cat_{name}"] = root / f"cat_{name}"
    return out


def test_a_convert_covering_less_of_a_catalog_day_is_refused_and_writes_nothing(usdm, tmp_path):
    catalog = tmp_path / "catalog"
    shutil.copytree(usdm["cat_whole"], catalog)
    before = snapshot(catalog)
    r = convert(USDM, [usdm["short"]], catalog)
    assert r.returncode == 2, r.stderr
    old, new = meta(usdm["cat_whole"], USDM)["days"][DAY1], meta(usdm["cat_short"], USDM)["days"][DAY1]
    assert old["first_ts"] == new["first_ts"] and new["last_ts"] < old["last_ts"]  # the cut copy ends earlier
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {cat.day_path(catalog, *USDM, DAY1)}: catalog day {DAY1} spans {utc(old['first_ts'])} - "
        f"{utc(old['last_ts'])} UTC with {old['events']:,} events; the new one spans {utc(new['first_ts'])} - "
        f"{utc(new['last_ts'])} UTC with {new['events']:,} events, which does not cover it, so it would replace "
        f"that day with less of it; nothing was written. Fix: pass --replace to replace it anyway, or convert "
        f"files that cover the whole day.")
    assert snapshot(catalog) == before


def test_replace_replaces_the_day_with_less_of_it(usdm, tmp_path):
    catalog = tmp_path / "catalog"
    shutil.copytree(usdm["cat_whole"], catalog)
    day2 = cat.day_path(catalog, *USDM, DAY2).read_bytes()
    r = convert(USDM, [usdm["short"]], catalog, "--replace")
    assert r.returncode == 0, r.stderr
    got, ref = meta(catalog, USDM)["days"], meta(usdm["cat_short"], USDM)["days"]
    assert {k: v for k, v in got[DAY1].items() if k != "file"} == {k: v for k, v in ref[DAY1].items() if k != "file"}
    assert cat.day_path(catalog, *USDM, DAY1).read_bytes() == cat.day_path(usdm["cat_short"], *USDM, DAY1).read_bytes()
    # the day the short copy does not reach is left as it was
    assert DAY2 in got and cat.day_path(catalog, *USDM, DAY2).read_bytes() == day2


@pytest.mark.parametrize("first, then", [("whole", "whole"), ("short", "short"), ("short", "whole")],
                         ids=["same-files", "same-cut-files", "longer-capture"])
def test_the_same_files_or_a_longer_capture_replace_without_replace(usdm, tmp_path, first, then):
    catalog = tmp_path / "catalog"
    shutil.copytree(usdm[f"cat_{first}"], catalog)
    r = convert(USDM, [usdm[then]], catalog)
    assert r.returncode == 0, r.stderr
    got, ref = meta(catalog, USDM)["days"][DAY1], meta(usdm[f"cat_{then}"], USDM)["days"][DAY1]
    assert got["events"] == ref["events"] and (got["first_ts"], got["last_ts"]) == (ref["first_ts"], ref["last_ts"])
    ref_day = cat.day_path(usdm[f"cat_{then}"], *USDM, DAY1)
    assert cat.day_path(catalog, *USDM, DAY1).read_bytes() == ref_day.read_bytes()


def _stop_at_close(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Ctrl-C right after the ``n``-th day is handed over (deterministic: no timing)."""
    close, seen = events.DaySplitter._close, []

    def close_then_stop(self, d):
        close(self, d)
        seen.append(d)
        if len(seen) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(events.DaySplitter, "_close", close_then_stop)


def test_a_stopped_convert_does_not_keep_a_day_that_would_shrink_the_catalogs(usdm, tmp_path, monkeypatch):
    catalog = tmp_path / "catalog"
    shutil.copytree(usdm["cat_whole"], catalog)
    before = snapshot(catalog)
    _stop_at_close(monkeypatch, 1)
    with pytest.raises(Stopped) as stop:
        convert_files(USDM[0], [usdm["short"]], USDM[1], catalog)
    msg = str(stop.value)
    assert msg.startswith(f"stopped by Ctrl-C (SIGINT): convert: nothing was written to {catalog}; did not keep "
                          f"finished day {DAY1}: {cat.day_path(catalog, *USDM, DAY1)}: catalog day {DAY1} spans ")
    assert msg.endswith("which does not cover it (pass --replace to replace it anyway)"), msg
    assert snapshot(catalog) == before


def test_a_stopped_convert_keeps_whole_days_and_leaves_out_one_that_would_shrink(shared_data, tmp_path, monkeypatch):
    # Spot BTCUSDT over midnight: the catalog has both days whole; the second convert's 20240809 file is cut
    # short, and the stop comes once both days are handed over.
    files = [shared_data / f"binance/spot/btcusdt_{d}.gz" for d in (DAY1, DAY2)]
    catalog = tmp_path / "catalog"
    assert convert(SPOT, files, catalog).returncode == 0
    before = snapshot(catalog)
    day1 = meta(catalog, SPOT)["days"][DAY1]
    cut = head(files[1], tmp_path / files[1].name, 20_000)
    _stop_at_close(monkeypatch, 2)
    with pytest.raises(Stopped) as stop:
        convert_files(SPOT[0], [files[0], cut], SPOT[1], catalog)
    msg = str(stop.value)
    assert msg.startswith(f"stopped by Ctrl-C (SIGINT): convert: kept the finished day {DAY1} in {catalog}; did not "
                          f"keep finished day {DAY2}: {cat.day_path(catalog, *SPOT, DAY2)}: catalog day {DAY2} "), msg
    # day 1 committed again, the same bytes; day 2 as it was
    assert snapshot(catalog).keys() == before.keys()
    for name, data in before.items():
        if name.endswith(".npz"):
            assert snapshot(catalog)[name] == data, name
    assert meta(catalog, SPOT)["days"][DAY1] == day1
    assert meta(catalog, SPOT)["days"][DAY2] == json.loads(before[f"{SPOT[0]}/{SPOT[1]}/meta.json"])["days"][DAY2]
