"""Batch: expansion and validation, resume after SIGKILL, failure isolation, determinism, Ray vs local."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from quotelab.batch import RECORD, VOLATILE, BatchError, load_batch, run_batch
from quotelab.data import synth

REPO = Path(__file__).resolve().parents[1]
QUOTELAB = [sys.executable, "-m", "quotelab.cli"]

BATCH = """\
strategy:
  name: mm
  data:
    quote: q
    assets:
      q: {{venue: synthetic, symbol: SYNPERP, dates: 20240101}}
  engine:
    step: 100ms
  fair_value:
    - kind: mid
  risk:
    - kind: inventory_skew
      params: {{risk_aversion: 0.5, position_unit: 0.01, volatility: 10}}
  quoter:
    kind: fixed_spread
    params: {{half_spread: 2, size: 0.01, max_position: 0.1}}
matrix:
  assets:
{assets}
  params:
    quoter.params.half_spread: {values}
"""
ASSETS = ("    - {venue: synthetic, symbol: SYNPERP, dates: 20240101}\n"
          "    - {venue: synthetic, symbol: SYNSPOT, dates: 20240101}")


@pytest.fixture(scope="session")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("catalog")
    synth.generate(root, seed=3, start="2024-01-01T00:00:00", duration_s=120)
    return root


def write_batch(path: Path, assets: str = ASSETS, values: str = "[1, 2]") -> Path:
    path.write_text(BATCH.format(assets=assets, values=values))
    return path


def comparable(out: Path) -> list[dict]:
    df = pl.read_parquet(out / "results.parquet").drop([c for c in VOLATILE if c in
                                                        pl.read_parquet_schema(out / "results.parquet")])
    return sorted(df.to_dicts(), key=lambda r: r["run_id"])


def test_expansion_ids_and_ranges(tmp_path: Path, catalog: Path) -> None:
    f = write_batch(tmp_path / "b.yaml", values="{start: 1, stop: 3, step: 1}")
    b = load_batch(f, catalog)
    assert len(b.runs) == 6
    assert sorted({r.params["quoter.params.half_spread"] for r in b.runs}) == [1, 2, 3]  # stop is inclusive
    assert len({r.run_id for r in b.runs}) == 6
    again = load_batch(f, catalog)
    assert [r.run_id for r in again.runs] == [r.run_id for r in b.runs]
    # the id is the validated config's: "2" written as a float gives the same run
    f2 = write_batch(tmp_path / "b2.yaml", values="[2.0]")
    ids2 = {r.run_id for r in load_batch(f2, catalog).runs}
    assert ids2 <= {r.run_id for r in b.runs}


def test_invalid_run_names_batch_file_line_and_run(tmp_path: Path, catalog: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(BATCH.format(assets=ASSETS, values="[1]") + "    quoter.params.no_such_param: [5]\n")
    with pytest.raises(BatchError) as exc:
        load_batch(f, catalog)
    msg = str(exc.value)
    line = next(i for i, x in enumerate(f.read_text().splitlines(), 1) if "no_such_param" in x)
    assert f"{f}:{line}: matrix.params.quoter.params.no_such_param" in msg
    assert "run #0 synthetic/SYNPERP" in msg and "unknown key" in msg
    # the value came from the matrix, not from a --set the user typed
    assert "the run's 'quoter.params.no_such_param=5': quoter.params.no_such_param: unknown key" in msg


def test_yaml_mistakes_name_file_line_path_and_the_fix(tmp_path: Path, catalog: Path) -> None:
    f = tmp_path / "typo.yaml"
    cases = [  # (the batch's text, the line the message must name, what it must say there)
        (BATCH.format(assets=ASSETS.replace("symbol: SYNSPOT", "symbl: SYNSPOT"), values="[1]"), "symbl",
         "matrix.assets[1].symbl: unknown key; expected one of: venue, symbol, dates, files, tick_size"),
        (BATCH.format(assets=ASSETS, values="{start: 1, stop: 3}"), "half_spread: {start",
         "matrix.params.quoter.params.half_spread: a range is {start, stop, step} (stop inclusive)"),
        (BATCH.format(assets=ASSETS, values="[1]").replace("matrix:", "matrx:"), "matrx",
         "matrx: unknown key; expected one of: name, description, strategy, catalog, asset, matrix"),
        (BATCH.format(assets=ASSETS.replace("dates: 20240101}", "dates: 20240101, tick_size: -1}", 1), values="[1]"),
         "tick_size: -1", "matrix.assets[0].tick_size: Input should be greater than 0"),
        ("matrix: {}\n", "matrix", "strategy: required key is missing; the base strategy: a path to its YAML"),
    ]
    for text, marker, expected in cases:
        f.write_text(text)
        line = next(i for i, x in enumerate(text.splitlines(), 1) if marker in x) if marker != "matrix" else 1
        with pytest.raises(BatchError) as exc:
            load_batch(f, catalog)
        assert str(exc.value).startswith(f"{f}:{line}: {expected}"), str(exc.value)


def test_set_changes_the_base_of_every_run_and_cannot_hide_under_the_matrix(tmp_path: Path, catalog: Path) -> None:
    f = write_batch(tmp_path / "b.yaml")
    plain = load_batch(f, catalog)
    sized = load_batch(f, catalog, overrides=["quoter.params.size=0.02"])
    assert len(sized.runs) == len(plain.runs) == 4
    assert all(r.config["quoter"]["params"]["size"] == 0.02 for r in sized.runs)
    assert all(r.config["quoter"]["params"]["size"] == 0.01 for r in plain.runs)
    assert {r.run_id for r in sized.runs}.isdisjoint({r.run_id for r in plain.runs})
    line = next(i for i, x in enumerate(f.read_text().splitlines(), 1) if "quoter.params.half_spread" in x)
    with pytest.raises(BatchError, match=rf"^--set quoter\.params\.half_spread=3: {f}:{line}: matrix\.params\."
                                         r"quoter\.params\.half_spread sets quoter\.params\.half_spread"):
        load_batch(f, catalog, overrides=["quoter.params.half_spread=3"])
    with pytest.raises(BatchError, match=r"^--set data\.assets\.q\.dates=20240102: .*matrix\.assets sets"):
        load_batch(f, catalog, overrides=["data.assets.q.dates=20240102"])
    with pytest.raises(BatchError, match=r"^--set quoter\.params\.sze=1: run #0 .* is invalid:\n.*sze: unknown key"):
        load_batch(f, catalog, overrides=["quoter.params.sze=1"])


@pytest.mark.slow
def test_resume_after_sigkill_and_failure_isolation(tmp_path: Path, catalog: Path) -> None:
    # the third asset has no data for its date: that run fails, is recorded, and the batch goes on
    assets = ASSETS + "\n    - {venue: synthetic, symbol: SYNPERP, dates: 20240105}"
    f = write_batch(tmp_path / "b.yaml", assets=assets, values="[1, 2, 3]")
    # Runs of the two-minute catalog finish within one 50 ms poll, so the kill could land after the
    # last one; a run_end hook that waits keeps the batch running long enough to be killed halfway.
    (tmp_path / "slow_run_end.py").write_text(
        "import time\nfrom quotelab import hookimpl\n\n\n@hookimpl\ndef quotelab_run_end(run, result):\n"
        "    time.sleep(0.3)\n")
    f.write_text(f.read_text().replace("  name: mm\n", "  name: mm\n  plugins: [slow_run_end.py]\n", 1))
    out = tmp_path / "out"
    cmd = [*QUOTELAB, "batch", str(f), "--catalog", str(catalog), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("runs/*/record.json"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.parent.name: p.read_bytes() for p in out.glob("runs/*/record.json")}
    assert 3 <= len(before) < 9, "the kill must land halfway"

    # without --resume the store refuses to mix batches
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr

    r = subprocess.run([*cmd, "--resume", "--json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    done_before = sum(json.loads(b)["status"] == "done" for b in before.values())
    assert counts["total"] == 9 and counts["skipped"] == done_before
    assert counts["done"] + counts["failed"] + counts["skipped"] == 9
    assert counts["failed"] == 3 and r.returncode == 1
    records = {p.parent.name: p.read_bytes() for p in out.glob("runs/*/record.json")}
    assert len(records) == 9
    for rid, data in before.items():  # finished runs were not run again
        if json.loads(data)["status"] == "done":
            assert records[rid] == data
    df = pl.read_parquet(out / "results.parquet")
    assert df.height == 9 and df["run_id"].n_unique() == 9
    failed = df.filter(pl.col("status") == "failed")
    assert failed.height == 3 and all("20240105" in e for e in failed["error"])
    assert set(failed["dates"]) == {"20240105"}
    ok = df.filter(pl.col("status") == "done")
    assert all((out / "runs" / rid / "series.parquet").exists() for rid in ok["run_id"])


@pytest.mark.slow
def test_one_and_two_workers_identical(tmp_path: Path, catalog: Path) -> None:
    f = write_batch(tmp_path / "b.yaml")
    s1 = run_batch(f, tmp_path / "w1", catalog=catalog, workers=1)
    s2 = run_batch(f, tmp_path / "w2", catalog=catalog, workers=2)
    assert s1.done == s2.done == 4 and s1.failed == s2.failed == 0
    assert comparable(tmp_path / "w1") == comparable(tmp_path / "w2")
    # each worker compiled the driver once, however many runs it got
    recs = [json.loads(p.read_text()) for p in (tmp_path / "w2").glob("runs/*/record.json")]
    per_worker: dict[str, int] = {}
    for rec in recs:
        per_worker[rec["worker"]] = per_worker.get(rec["worker"], 0) + rec["driver_compiled"]
    assert set(per_worker.values()) == {1}


@pytest.mark.slow
def test_ray_local_cluster_matches_local_pool(tmp_path: Path, catalog: Path) -> None:
    pytest.importorskip("ray")
    f = write_batch(tmp_path / "b.yaml")
    run_batch(f, tmp_path / "local", catalog=catalog, workers=1)
    s = run_batch(f, tmp_path / "ray", catalog=catalog, workers=2, executor="ray")  # starts and stops its own Ray
    assert s.done == 4
    assert comparable(tmp_path / "ray") == comparable(tmp_path / "local")
    assert all((tmp_path / "ray" / "runs" / r.run_id / "series.parquet").exists()
               for r in load_batch(f, catalog).runs)


def test_batch_over_files_assets_without_catalog_records_runs_done(tmp_path: Path, catalog: Path) -> None:
    day = next((catalog / "synthetic" / "SYNPERP").glob("*.npz"))
    (tmp_path / "b.yaml").write_text(f"""\
strategy:
  name: from_files
  data:
    quote: q
    assets:
      q: {{files: ["{day}"], tick_size: 0.1, lot_size: 0.001}}
  engine:
    step: 100ms
  fair_value:
    - kind: mid
  quoter:
    kind: fixed_spread
    params: {{half_spread: 2, size: 0.01, max_position: 0.1}}
matrix:
  params:
    quoter.params.half_spread: [1, 2]
""")
    s = run_batch(tmp_path / "b.yaml", tmp_path / "out", workers=1)
    recs = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("runs/*/record.json")]
    assert [r["error"] for r in recs] == [None, None]
    assert s.done == 2 and s.failed == 0
    assert all(r["instrument"]["tick_size"] == 0.1 for r in recs)
    assert all(r["summary"]["num_trades"] > 0 for r in recs)


RAY_THEN_CONVERT = """\
import builtins, gzip, signal, sys
from pathlib import Path
from quotelab.batch import run_batch

def state():
    return (builtins.print, sys.excepthook, signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

before = state()
s = run_batch(sys.argv[1], sys.argv[2], catalog=sys.argv[3], workers=1, executor="ray")
assert s.done == 4, s
changed = [name for name, a, b in zip(("print", "excepthook", "SIGINT", "SIGTERM"), before, state()) if a is not b]
assert not changed, f"left replaced after the Ray batch: {changed}"

# hftbacktest's converter compiles njit helpers that call print: fresh NUMBA_CACHE_DIR, so it compiles here
from hftbacktest.data.utils import binancefutures
small = Path(sys.argv[2]) / "small.gz"
with gzip.open(sys.argv[4], "rt") as src, gzip.open(small, "wt") as dst:
    for _, line in zip(range(5000), src):
        dst.write(line)
rows = binancefutures.convert(str(small), buffer_size=100_000)
assert len(rows) > 1000
print("converted", len(rows))
"""


@pytest.mark.slow
def test_ray_batch_leaves_the_interpreter_as_found_and_a_convert_compiles_after(
        tmp_path: Path, catalog: Path, shared_data: Path) -> None:
    """In one process: a Ray batch, then hftbacktest's Binance converter, compiled fresh by numba."""
    pytest.importorskip("ray")
    script = tmp_path / "ray_then_convert.py"
    script.write_text(RAY_THEN_CONVERT)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    r = subprocess.run([sys.executable, str(script), str(write_batch(tmp_path / "b.yaml")), str(tmp_path / "out"),
                        str(catalog), str(shared_data / "binance" / "usdm" / "btcusdt_20240808.gz")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "converted" in r.stdout


# ------------------------------------------------------------------------------------------------
# Writing fails after runs are computed: nothing computed is lost
# ------------------------------------------------------------------------------------------------

def _rescue_of(message: str) -> Path:
    return Path(re.search(r"saved to (\S+) instead", message).group(1))


def test_store_writes_what_it_cannot_write_to_out_into_one_rescue_folder(tmp_path: Path, monkeypatch) -> None:
    """Seen red: the first failed write raised an OSError out of the batch (its finished runs' records lost)."""
    import tempfile

    from quotelab.batch.store import Store
    from quotelab.errors import RunError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where rescue folders go
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "b").write_text("")  # a file where run b's folder goes
    (out / "results.parquet").mkdir()  # a folder where the table goes
    recs = [{"run_id": r, "index": i, "status": "done", "summary": {"equity": float(i)}} for i, r in enumerate("ab")]
    store = Store(out)
    for rec in recs:
        store.record(rec)
    store.table(final=False)  # before the end, a table that cannot be written waits for the end
    assert store.rescue is None or not (store.rescue / "results.parquet").exists()
    store.table()
    with pytest.raises(RunError) as info:
        store.close("rerun with --resume")
    msg = str(info.value)
    rescue = _rescue_of(msg)
    assert rescue == store.rescue and rescue.parent == tmp_path
    assert msg.startswith(f"could not write 2 files to {out} (first runs/b/record.json: ")
    assert msg.endswith(f"saved to {rescue} instead. Once {out} can be written, copy them back "
                        f"(cp -r {rescue}/. {out}/) and rerun with --resume")
    assert json.loads((out / "runs" / "a" / "record.json").read_text())["run_id"] == "a"
    assert json.loads((rescue / "runs" / "b" / "record.json").read_text()) == recs[1]
    table = pl.read_parquet(rescue / "results.parquet")  # every record, wherever it went
    assert table["run_id"].to_list() == ["a", "b"] and table["equity"].to_list() == [0.0, 1.0]
    Store(tmp_path / "fine").close("unused")  # nothing rescued: no error


def test_ray_artifacts_that_cannot_be_written_are_rescued_and_the_run_failed(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from quotelab.batch.executors import _write_artifacts

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").write_text("")
    record = {"status": "done", "error": None}
    _write_artifacts({"artifacts": str(tmp_path / "runs" / "r")}, {"summary.json": b"{}"}, record)
    assert record["status"] == "failed"
    assert record["error"].startswith(f"RunError: could not write the results to {tmp_path / 'runs' / 'r'} (")
    assert (_rescue_of(record["error"]) / "summary.json").read_bytes() == b"{}"


@pytest.mark.slow  # two batch subprocesses (each compiles the driver in its workers): ~25 s
def test_a_batch_whose_out_fails_after_the_runs_keeps_every_result(tmp_path: Path, catalog: Path) -> None:
    """Seen red: a folder at results.parquet ended the batch after its first run ("unexpected
    IsADirectoryError", exit 1) and the three other runs, computed meanwhile, had no record."""
    f = write_batch(tmp_path / "b.yaml")
    ids = [r.run_id for r in load_batch(f, catalog).runs]
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / ids[0]).write_text("")  # a file where the first run's folder goes
    (out / "results.parquet").mkdir()
    cmd = [*QUOTELAB, "batch", str(f), "--catalog", str(catalog), "--out", str(out), "--workers", "2"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where the rescue folders go
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.splitlines()
    rescue = _rescue_of(line)
    assert rescue.parent == tmp_path
    assert line.startswith(f"error: could not write 2 files to {out} (first ")
    assert sorted(p.parent.name for p in out.glob("runs/*/record.json")) == sorted(ids[1:])
    lost = json.loads((rescue / "runs" / ids[0] / RECORD).read_text())
    # the run's own files could not go to its folder either: they went to a folder its error names
    assert lost["status"] == "failed" and "could not write the results to" in lost["error"]
    assert json.loads((_rescue_of(lost["error"]) / "summary.json").read_text())["num_trades"] > 0
    assert sorted(pl.read_parquet(rescue / "results.parquet")["run_id"]) == sorted(ids)

    # what the error says to do, once the folder is fixed
    (out / "runs" / ids[0]).unlink()
    (out / "results.parquet").rmdir()
    subprocess.run(["cp", "-r", f"{rescue}/.", f"{out}/"], check=True)
    r = subprocess.run([*cmd, "--resume", "--json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert (counts["skipped"], counts["done"], counts["failed"]) == (3, 1, 0)
    df = pl.read_parquet(out / "results.parquet")
    assert sorted(df["run_id"]) == sorted(ids) and set(df["status"]) == {"done"}


# ------------------------------------------------------------------------------------------------
# The batch is stopped, or a run's worker process dies: what finished is kept, the rest is named
# ------------------------------------------------------------------------------------------------

MARK_AND_WAIT = """\
import os, time
from pathlib import Path
from quotelab import hookimpl


@hookimpl
def quotelab_run_start(run):
    c = run["config"]
    name = f"{c['data']['assets']['q']['symbol']}-{float(c['quoter']['params']['half_spread']):g}"
    Path(os.environ["QUOTELAB_TEST_STARTS"], name).touch()


@hookimpl
def quotelab_run_end(run, result):
    time.sleep(0.5)
"""


@pytest.mark.slow  # a batch subprocess stopped after two runs (local: and resumed; ray: starts a cluster): ~30 s
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_ctrl_c_stops_at_once_keeps_every_finished_run_and_resume_runs_the_rest(
        tmp_path: Path, catalog: Path, executor: str) -> None:
    """Seen red: Ctrl-C left the pool running every queued run (all 10 started, 2 recorded) and ended
    without a word."""
    if executor == "ray":
        pytest.importorskip("ray")
    (tmp_path / "mark_and_wait.py").write_text(MARK_AND_WAIT)
    f = write_batch(tmp_path / "b.yaml", values="[1, 2, 3, 4, 5]")
    f.write_text(f.read_text().replace("  name: mm\n", "  name: mm\n  plugins: [mark_and_wait.py]\n", 1))
    runs = load_batch(f, catalog).runs
    name = {r.run_id: f"{r.symbol}-{float(r.params['quoter.params.half_spread']):g}" for r in runs}
    out, starts = tmp_path / "out", tmp_path / "starts"
    starts.mkdir()
    env = {**os.environ, "QUOTELAB_TEST_STARTS": str(starts)}
    cmd = [*QUOTELAB, "batch", str(f), "--catalog", str(catalog), "--out", str(out), "--workers", "2",
           "--executor", executor]
    # its own session, so the signal goes to its process group as a terminal's Ctrl-C does (workers too)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob(f"runs/*/{RECORD}"))) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    recorded = {name[p.parent.name] for p in out.glob(f"runs/*/{RECORD}")}
    n = len(recorded)
    assert proc.returncode == 130, err
    assert re.search(rf"^error: batch stopped by SIGINT: {n} runs finished and recorded in {out} \(0 failed\), "
                     rf"{10 - n} cancelled; rerun it with --resume to run the rest", err, re.M), err
    assert 2 <= n < 10
    # stopped at once: beyond the finished runs, only those the two workers held had started
    started = {p.name for p in starts.iterdir()}
    assert recorded <= started and len(started) <= n + 2, (n, len(started))
    assert {name[rid] for rid in pl.read_parquet(out / "results.parquet")["run_id"]} == recorded
    if executor == "ray":
        return

    before = {p: p.read_bytes() for p in out.glob(f"runs/*/{RECORD}")}
    for p in starts.iterdir():
        p.unlink()
    r = subprocess.run([*cmd, "--resume", "--json"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert (counts["skipped"], counts["done"], counts["failed"]) == (n, 10 - n, 0)
    assert {p.name for p in starts.iterdir()} == set(name.values()) - recorded  # only the rest ran
    assert all(p.read_bytes() == data for p, data in before.items())
    assert set(pl.read_parquet(out / "results.parquet")["run_id"]) == set(name)


DIES = """\
import ctypes, os
from quotelab import hookimpl


@hookimpl
def quotelab_run_start(run):
    half_spread = run["config"]["quoter"]["params"]["half_spread"]
    if half_spread == 2:
        ctypes.string_at(0)  # a segfault, as native code reading outside its memory does
    if half_spread == 3:
        os._exit(7)
"""


@pytest.mark.slow  # a batch subprocess of 6 runs whose workers die 4 times (each new one compiles): ~25 s
def test_a_run_whose_worker_process_dies_fails_alone_naming_how_and_the_batch_goes_on(
        tmp_path: Path, catalog: Path) -> None:
    """Seen red: the error was 'the worker process died during this run (crash or killed)', without how,
    and every run queued behind it was rerun alone in a new pool."""
    (tmp_path / "dies.py").write_text(DIES)
    f = write_batch(tmp_path / "b.yaml", values="[1, 2, 3]")
    f.write_text(f.read_text().replace("  name: mm\n", "  name: mm\n  plugins: [dies.py]\n", 1))
    out = tmp_path / "out"
    r = subprocess.run([*QUOTELAB, "batch", str(f), "--catalog", str(catalog), "--out", str(out), "--workers", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    assert re.search(r"^batch finished: done 2, failed 4, skipped 0 in ", r.stdout, re.M), r.stdout
    records: dict[int, list[dict]] = {}
    for p in out.glob(f"runs/*/{RECORD}"):
        rec = json.loads(p.read_text())
        records.setdefault(rec["params"]["quoter.params.half_spread"], []).append(rec)
    assert sorted(records) == [1, 2, 3] and all(len(v) == 2 for v in records.values())
    how = {2: r"crashed \(SIGSEGV\): native code failed.*quotelab run --check", 3: r"exited with code 7 "}
    for half_spread, recs in records.items():
        for rec in recs:
            if half_spread == 1:
                assert rec["status"] == "done" and (out / "runs" / rec["run_id"] / "series.parquet").exists()
                continue
            assert rec["status"] == "failed"
            assert re.match(rf"WorkerDied: the worker process \d+ running this run {how[half_spread]}", rec["error"])
            assert rec["error"].endswith(f"; only this run ({rec['run_id']}, {rec['label']}) failed: the other runs "
                                         f"go on in a new worker, and every finished run's record is kept in "
                                         f"{out / 'runs'}")
            # the progress line names the run and the cause
            assert re.search(rf"failed {rec['run_id']} .* FAILED: WorkerDied: .*{how[half_spread]}", r.stdout)
    assert pl.read_parquet(out / "results.parquet").height == 6


@pytest.mark.slow  # two batch subprocesses whose workers die, local (each new worker compiles) and Ray: ~20 s
def test_under_json_stdout_is_the_counts_alone_and_a_dead_worker_is_told_on_stderr_with_its_cause(
        tmp_path: Path, catalog: Path) -> None:
    """Seen red: with --executor ray, Ray's driver printed "(raylet) A worker died or was killed ..." to stdout
    ahead of the counts (json.loads failed), and the run's error was Ray's ActorDiedError text, without the
    signal; a local worker's print went to stdout too."""
    pytest.importorskip("ray")
    (tmp_path / "dies.py").write_text(DIES.replace("    half_spread = ", "    print('a plugin prints')\n"
                                                   "    half_spread = ", 1))
    f = write_batch(tmp_path / "b.yaml", assets="    - {venue: synthetic, symbol: SYNPERP, dates: 20240101}",
                    values="[1, 2, 3]")
    f.write_text(f.read_text().replace("  name: mm\n", "  name: mm\n  plugins: [dies.py]\n", 1))
    how = {2: r"crashed \(SIGSEGV\): native code failed.*quotelab run --check",
           3: {"local": r"exited with code 7 ",
               "ray": r"ended before sending the run's record, and Ray tells neither the signal nor the exit code "
                      r"\(Ray: exit type SYSTEM_ERROR, .*\): a plugin calling exit or os\._exit"}}
    done = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        r = subprocess.run([*QUOTELAB, "batch", str(f), "--catalog", str(catalog), "--out", str(out), "--workers",
                            "2", "--executor", executor, "--json"], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 1, r.stderr
        counts = json.loads(r.stdout)  # the whole of stdout
        assert {k: counts[k] for k in ("total", "done", "failed", "skipped")} == {
            "total": 3, "done": 1, "failed": 2, "skipped": 0}, r.stdout
        worker = r"\d+" if executor == "local" else r"\d+ \(a Ray actor on \S+\)"
        for p in out.glob(f"runs/*/{RECORD}"):
            rec = json.loads(p.read_text())
            half_spread = rec["params"]["quoter.params.half_spread"]
            if half_spread == 1:  # the other worker's run, and the run after a death on a new one, are whole
                assert rec["status"] == "done" and (p.parent / "series.parquet").exists()
                done[executor] = rec
                continue
            cause = how[half_spread] if half_spread == 2 else how[3][executor]
            assert rec["status"] == "failed"
            assert re.match(rf"WorkerDied: the worker process {worker} running this run {cause}", rec["error"])
            assert f"only this run ({rec['run_id']}, {rec['label']}) failed" in rec["error"]
            assert rec["error"].endswith(f"every finished run's record is kept in {out / 'runs'}")
            # stderr names the run and the cause: the one word of a worker's death under --json
            assert f"failed {rec['run_id']} {rec['label']}: {rec['error']}" in r.stderr.splitlines(), r.stderr
        if executor == "local":  # a Ray actor's print goes to its log (log_to_driver=False)
            assert "a plugin prints" in r.stderr
    assert done["ray"]["run_id"] == done["local"]["run_id"]
    ray_rows, local_rows = ([r for r in comparable(tmp_path / e) if r["status"] == "done"] for e in ("ray", "local"))
    assert len(ray_rows) == 1 and ray_rows == local_rows


def test_a_ray_actors_death_reads_the_signal_from_its_log_on_this_node_else_says_what_ray_tells(
        tmp_path: Path) -> None:
    """Ray's errors as Ray 2.60 words them (ActorDiedError from its context), with no cluster: the signal
    comes from the worker's log when the actor ran on this node, else the message gives Ray's account."""
    ray = pytest.importorskip("ray")
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError

    from quotelab.batch.executors import _ray_death

    def died(ip: str, detail: str) -> ActorDiedError:
        return ActorDiedError(ActorDiedErrorContext(
            class_name="RayWorker", actor_id=b"\x01" * 16, pid=4242, node_ip_address=ip,
            error_message=f"The actor is dead because its worker process has died. {detail}"))

    eof = ("Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error "
           "code 2. End of file. Some common causes include: ...")
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "worker-ab12-01000000-4242.err"
    log.write_text("[2026-12-02 14:51:12,125 E 4242 4242] logging.cc:474: *** SIGBUS received at time=1 on cpu 0 ***\n"
                   "Fatal Python error: Bus error\n")
    task = {"run_id": "r1", "label": "#0 x", "artifacts": str(tmp_path / "out" / "runs" / "r1")}
    tail = f"; only this run (r1, #0 x) failed: the other runs go on in a new worker, and every finished run's " \
           f"record is kept in {tmp_path / 'out' / 'runs'}"
    here = _ray_death(ray, died("10.0.0.5", eof), task, (logs, "10.0.0.5"))
    assert here == (f"WorkerDied: the worker process 4242 (a Ray actor on 10.0.0.5) running this run crashed (SIGBUS): "
                    f"native code failed, e.g. a plugin kernel indexing outside its arrays; rerun this run with "
                    f"`quotelab run --check` (its --set values are the record's overrides), which names such a "
                    f"kernel (its log: {log})" + tail)
    # the same pid on another node is another process: its log is not here
    there = _ray_death(ray, died("10.0.0.9", eof), task, (logs, "10.0.0.5"))
    assert there == ("WorkerDied: the worker process 4242 (a Ray actor on 10.0.0.9) running this run ended before "
                     "sending the run's record, and Ray tells neither the signal nor the exit code (Ray: exit type "
                     "SYSTEM_ERROR, Worker unexpectedly exits with a connection error code 2.): a plugin calling exit "
                     "or os._exit, or a kill, e.g. SIGKILL by the out-of-memory killer (see `dmesg` on 10.0.0.9); its "
                     "log: worker-*-4242.err in the Ray session's logs folder on 10.0.0.9" + tail)
    oom = _ray_death(ray, died("10.0.0.9", "Worker exit type: NODE_OUT_OF_MEMORY Worker exit detail: Task was "
                                           "killed due to the node running low on memory. Memory on the node ..."),
                     task, None)
    assert oom.startswith("WorkerDied: the worker process 4242 (a Ray actor on 10.0.0.9) running this run was killed "
                          "by Ray, its node short of memory: give it more memory or fewer --workers (Ray: exit type "
                          "NODE_OUT_OF_MEMORY, Task was killed due to the node running low on memory.)")
