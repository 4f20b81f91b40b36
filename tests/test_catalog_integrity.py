"""The catalog describes what it holds and changes as a whole: meta.json records each day and loading
checks it; days and meta.json are committed together, under a lock, by real processes that may be
killed; files follow the umask. Real data (the shared USD-M capture) and real subprocesses."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hftbacktest.types import event_dtype

from quotelab.data import catalog
from quotelab.errors import DataError
from quotelab.timeunits import DAY_NS

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "strategies" / "seed_market_maker.yaml"
SYM = ("binance-usdm", "BTCUSDT")


def cli(*args: str | Path, umask: int = -1, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotelab.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, umask=umask, **kw)


@pytest.fixture()
def cat(real_catalog: Path, tmp_path: Path) -> Path:
    """A private copy of the session's converted catalog (BTCUSDT days 20240808 and 20240809)."""
    shutil.copytree(real_catalog / SYM[0] / SYM[1], tmp_path / "cat" / SYM[0] / SYM[1])
    return tmp_path / "cat"


def meta_path(root: Path) -> Path:
    return catalog.symbol_dir(root, *SYM) / "meta.json"


def edit_meta(root: Path, edit) -> None:
    meta = json.loads(meta_path(root).read_text())
    edit(meta)
    meta_path(root).write_text(json.dumps(meta))


def run_seed(root: Path, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return cli("run", SEED, "--catalog", root, "--json", *extra)


def test_meta_records_each_day_and_loading_checks_it(cat: Path, real_catalog: Path) -> None:
    meta = catalog.read_meta(cat, *SYM)
    for day in ("20240808", "20240809"):
        rec = meta["days"][day]
        with zipfile.ZipFile(catalog.day_path(cat, *SYM, day)) as zf:
            info = zf.getinfo("data.npy")
        assert (rec["crc32"], rec["bytes"]) == (info.CRC, info.file_size)
        assert rec["events"] == len(catalog.load_day(cat, *SYM, day))
        assert (rec["tick_size"], rec["lot_size"]) == (meta["tick_size"], meta["lot_size"]) == (0.1, 0.001)
    # Another day's file in its place (what a kill between moving days and writing meta.json left before).
    day = catalog.day_path(cat, *SYM, "20240809")
    shutil.copyfile(catalog.day_path(cat, *SYM, "20240808"), day)
    with pytest.raises(DataError, match=rf"^{re.escape(str(day))}: not the day file .*meta.json describes \(events "
                                        r"\d+ in meta.json, 508053 in the file.*Fix: convert the day again"):
        catalog.load_day(cat, *SYM, "20240809")
    # A day file meta.json does not describe at all.
    edit_meta(cat, lambda m: m["days"].pop("20240809"))
    with pytest.raises(DataError, match=r"20240809.npz: day 20240809 is not described by .*meta.json"):
        catalog.load_day(cat, *SYM, "20240809")


def test_a_meta_json_tick_that_disagrees_with_the_days_is_an_error_naming_meta_json(cat: Path) -> None:
    assert json.loads(run_seed(cat).stdout)["num_trades"] == 343
    # A tick the strategy YAML sets is the YAML's to answer for.
    r = run_seed(cat, "--set", "data.assets.perp.tick_size=0.7")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--set 'data.assets.perp.tick_size=0.7': data.assets.perp.tick_size: tick_size 0.7 does not fit" in r.stderr
    edit_meta(cat, lambda m: m.update(tick_size=0.7))
    r = run_seed(cat)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{meta_path(cat)}: tick_size is 0.7, but day 20240808 was converted with tick_size 0.1" in r.stderr
    assert "seed_market_maker.yaml" not in r.stderr
    # Consistent with itself, but not with the prices: the day's own prices give it away.
    edit_meta(cat, lambda m: [d.update(tick_size=0.7) for d in m["days"].values()])
    r = run_seed(cat)
    assert r.returncode == 2 and f"{meta_path(cat)}: tick_size 0.7 does not fit day 20240808: price" in r.stderr
    assert "Fix: set tick_size in meta.json" in r.stderr


def test_a_deleted_day_is_not_listed_as_present(tmp_path: Path) -> None:
    ev = np.zeros(2, event_dtype)
    inst = {"tick_size": 0.1, "lot_size": 1.0, "contract": {"kind": "linear", "size": 1.0}}
    for day in ("20240101", "20240103"):
        catalog.write_day(tmp_path, "synthetic", "X", day, ev)
    catalog.update_meta(tmp_path, "synthetic", "X", inst, {"20240101": {}, "20240103": {}})
    catalog.day_path(tmp_path, "synthetic", "X", "20240103").unlink()
    assert catalog.list_days(tmp_path, "synthetic", "X") == ["20240101"]
    with pytest.raises(DataError, match=r"synthetic/X/20240102 is missing.*; days present: 20240101$"):
        catalog.load_day(tmp_path, "synthetic", "X", "20240102")
    with pytest.raises(DataError, match=r"20240103 is missing.*meta.json lists it, but its file is gone\); days "
                                        r"present: 20240101$"):
        catalog.load_day(tmp_path, "synthetic", "X", "20240103")


def test_funding_rows_are_checked_against_meta_json(tmp_path: Path) -> None:
    """Seen red: a funding file cut to half its rows, or deleted, loaded silently (300 rows, or none: the
    run then settles less funding, or none); a day converted again without funding kept the old table."""
    from quotelab.data import synth

    synth.generate(tmp_path, duration_s=600, assets="perp", funding_interval_s=240)
    args = (tmp_path, "synthetic", "SYNPERP", ["20240101"])
    path = catalog.funding_path(*args[:3], "20240101")
    meta = catalog.symbol_dir(*args[:3]) / "meta.json"
    whole = catalog.load_funding(*args)
    assert len(whole) == json.loads(meta.read_text())["days"]["20240101"]["funding_rows"] == 600
    np.save(path, whole[:300])
    with pytest.raises(DataError, match=rf"^{path}: 300 funding rows, but {meta} counts 600 for day 20240101: the "
                                        r"file was cut short or replaced .* Fix: convert the day again\.$"):
        catalog.load_funding(*args)
    path.unlink()
    with pytest.raises(DataError, match=rf"^{path}: missing, but {meta} counts 600 funding rows for day 20240101 "
                                        r"\(deleted\?\); .* Fix: convert the day again\.$"):
        catalog.load_funding(*args)
    # through a run: one line naming the file, before anything is compiled
    r = cli("run", REPO / "strategies" / "perp_funding_latency.yaml", "--catalog", tmp_path)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {path}: missing, but {meta}"), r.stderr
    # the day written again without funding rows: the earlier conversion's table goes with the commit
    np.save(path, whole)
    events = catalog.load_day(*args[:3], "20240101")
    with catalog.Staging(tmp_path) as stage:
        stage.write_day(*args[1:3], "20240101", events)
        inst = {k: v for k, v in json.loads(meta.read_text()).items() if k in ("tick_size", "lot_size", "contract")}
        stage.commit(*args[1:3], inst, {"20240101": {"events": len(events)}})
    assert not path.exists() and catalog.load_funding(*args) is None


def _head_gz(src: Path, dst: Path, n: int) -> Path:
    with gzip.open(src, "rb") as fh:
        lines = [next(fh) for _ in range(n)]
    with gzip.open(dst, "wb", compresslevel=1) as fh:
        fh.writelines(lines)
    return dst


KILL_AFTER_FIRST_DAY_MOVED = """
import os, signal, sys
from pathlib import Path
real = os.replace
def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if str(dst).endswith(".npz") and not str(src).endswith(".tmp"):  # a day moved into the catalog
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from quotelab.data.convert import convert_files
convert_files("binance-usdm", [Path(sys.argv[1])], "BTCUSDT", sys.argv[2], replace=True)  # a shorter day
"""


def test_a_kill_during_commit_leaves_the_old_state_or_the_new_never_a_mix(cat: Path, shared_data: Path,
                                                                            tmp_path: Path) -> None:
    # The new data: the first 60,000 lines of the capture, so day 20240808 changes and 20240809 is not there.
    part = _head_gz(shared_data / "binance" / "usdm" / "btcusdt_20240808.gz", tmp_path / "part.gz", 60_000)
    fresh = tmp_path / "fresh"
    assert cli("convert", "--format", "binance-usdm", "--symbol", "BTCUSDT", "--catalog", fresh, part).returncode == 0
    want = catalog.read_meta(fresh, *SYM)["days"]["20240808"]
    old = catalog.read_meta(cat, *SYM)["days"]["20240808"]
    assert want["events"] != old["events"]
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_DAY_MOVED, str(part), str(cat)], timeout=600)
    assert r.returncode == -signal.SIGKILL
    # The next reader sees one consistent state: here the new one, since the kill came after the commit point.
    meta = catalog.read_meta(cat, *SYM)
    assert meta["days"]["20240808"]["events"] == len(catalog.load_day(cat, *SYM, "20240808")) == want["events"]
    assert meta["days"]["20240808"]["crc32"] == want["crc32"]
    out = run_seed(cat)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["events"] == want["events"]
    assert not [p.name for p in catalog.symbol_dir(cat, *SYM).iterdir() if p.name.startswith(".")]


def test_a_new_symbol_killed_after_the_commit_point_is_listed_and_whole(tmp_path: Path, monkeypatch) -> None:
    """Seen red: list_symbols missed it (its meta.json still in .commit), so the error for a mistyped symbol
    said the catalog held nothing."""
    import os

    ev = np.zeros(2, event_dtype)
    inst = {"tick_size": 0.1, "lot_size": 1.0, "contract": {"kind": "linear", "size": 1.0}}
    days = ("20240101", "20240102")
    real = os.replace

    def die_after_the_first_day(src, dst, *a, **k):  # the disk as a SIGKILL at that instant leaves it
        real(src, dst, *a, **k)
        if str(dst).endswith(".npz") and ".commit" in str(src):
            raise KeyboardInterrupt

    with catalog.Staging(tmp_path) as stage:
        for day in days:
            stage.write_day("synthetic", "NEW", day, ev)
        monkeypatch.setattr(os, "replace", die_after_the_first_day)
        with pytest.raises(KeyboardInterrupt):
            stage.commit("synthetic", "NEW", inst, {d: {"events": 2} for d in days})
        monkeypatch.undo()
    sym = catalog.symbol_dir(tmp_path, "synthetic", "NEW")
    assert (sym / ".commit" / "meta.json").exists() and not (sym / "meta.json").exists()
    assert catalog.list_symbols(tmp_path) == ["synthetic/NEW"]
    with pytest.raises(DataError, match=r"no meta.json for synthetic/OLD .*; the catalog holds: synthetic/NEW\."):
        catalog.read_meta(tmp_path, "synthetic", "OLD")
    assert catalog.list_days(tmp_path, "synthetic", "NEW") == list(days)  # the reader finished the commit
    assert all(len(catalog.load_day(tmp_path, "synthetic", "NEW", d)) == 2 for d in days)
    assert not (sym / ".commit").exists()


def _shift_a_day(lines: list[bytes]) -> list[bytes]:
    """The same messages one day later, on both clocks (local ns; E and T in ms)."""
    out = []
    for ln in lines:
        ts, rest = ln.split(b" ", 1)
        rest = re.sub(rb'"([ET])":(\d+)', lambda m: b'"%s":%d' % (m[1], int(m[2]) + 86_400_000), rest)
        out.append(str(int(ts) + DAY_NS).encode() + b" " + rest)
    return out


TWO_WRITERS = """
import sys, time
from pathlib import Path
from quotelab.data import catalog
from quotelab.data.convert import convert_files
me, other = Path(sys.argv[3]), Path(sys.argv[4])
write_day, write_json = catalog.write_day, catalog.atomic_write_json
def day_then_wait(*a, **k):
    path = write_day(*a, **k)
    me.touch()  # both writers reach their commit together
    deadline = time.monotonic() + 120
    while not other.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return path
def slow_meta(path, obj):
    if Path(path).name == "meta.json":
        time.sleep(1.0)  # widen the read-modify-write window of meta.json
    write_json(path, obj)
catalog.write_day, catalog.atomic_write_json = day_then_wait, slow_meta
convert_files("binance-usdm", [Path(sys.argv[1])], "ETHUSDT", sys.argv[2])
"""


def test_two_writers_to_one_symbol_lose_no_day(shared_data: Path, tmp_path: Path) -> None:
    with gzip.open(shared_data / "binance" / "usdm" / "ethusdt_20240808.gz", "rb") as fh:
        lines = [next(fh).rstrip(b"\n") for _ in range(6_000)]
    files = [tmp_path / "d8.gz", tmp_path / "d9.gz"]
    for f, ls in zip(files, (lines, _shift_a_day(lines)), strict=True):
        with gzip.open(f, "wb", compresslevel=1) as fh:
            fh.write(b"\n".join(ls) + b"\n")
    root = tmp_path / "cat"
    flags = [tmp_path / "a.ready", tmp_path / "b.ready"]
    procs = [subprocess.Popen([sys.executable, "-c", TWO_WRITERS, str(f), str(root), str(flags[i]), str(flags[1 - i])])
             for i, f in enumerate(files)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    assert catalog.list_days(root, "binance-usdm", "ETHUSDT") == ["20240808", "20240809"]
    a, b = (catalog.load_day(root, "binance-usdm", "ETHUSDT", d) for d in ("20240808", "20240809"))
    np.testing.assert_array_equal(a["px"], b["px"])
    np.testing.assert_array_equal(a["exch_ts"] + DAY_NS, b["exch_ts"])


def test_staging_left_by_a_killed_writer_is_cleaned_by_the_next(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "cat"
    usdm = shared_data / "binance" / "usdm"
    proc = subprocess.Popen([sys.executable, "-m", "quotelab.cli", "convert", "--format", "binance-usdm", "--symbol",
                             "BTCUSDT", "--catalog", str(root), str(usdm / "btcusdt_20240808.gz")])
    deadline = time.monotonic() + 120
    while not (root.is_dir() and [p for p in root.iterdir() if p.name.startswith(".")]):
        assert proc.poll() is None and time.monotonic() < deadline, "the writer never staged anything"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert [p for p in root.iterdir() if p.name.startswith(".")], "the killed writer's staging is there"
    r = cli("convert", "--format", "binance-usdm", "--symbol", "ETHUSDT", "--catalog", root,
            usdm / "ethusdt_20240808.gz")
    assert r.returncode == 0, r.stderr
    assert not [p.name for p in root.rglob(".*")]
    assert catalog.list_symbols(root) == ["binance-usdm/ETHUSDT"]


def test_catalog_and_result_files_follow_the_umask(cat: Path, shared_data: Path, tmp_path: Path) -> None:
    root, out, umask = tmp_path / "new", tmp_path / "out", 0o027  # not 0600 (mkstemp), nor always 0644
    r = cli("convert", "--format", "binance-usdm", "--symbol", "ETHUSDT", "--catalog", root,
            shared_data / "binance" / "usdm" / "ethusdt_20240808.gz", umask=umask)
    assert r.returncode == 0, r.stderr
    assert cli("run", SEED, "--catalog", cat, "--out", out, umask=umask).returncode == 0
    files = [p for p in [*root.rglob("*"), *out.rglob("*")] if p.is_file()]
    assert {p.name for p in files} >= {"meta.json", "20240808.npz", "summary.json", "series.parquet"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(0o666 & ~umask)
                                                                               for p in files}
