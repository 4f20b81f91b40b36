"""``quotelab optimize``: the search finds the optimum an exhaustive ``quotelab batch`` grid finds, a killed
optimisation resumes without losing or repeating a trial, the same seed gives the same trials with one
worker or two, and the report shows the history and in- vs out-of-sample.

Each CLI call starts fresh worker processes, which compile the driver (~5-15 s on this machine), so these
tests take ~1.5 min together: they are the only end-to-end check of the Optuna loop, its SQLite resume
and its executors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import polars as pl
import pytest
import yaml

from quotelab.batch.optimize import Objective, OptimizeError, load_opt, run_overrides, write_best
from quotelab.data import synth

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "optimize"
CLI = [sys.executable, "-m", "quotelab.cli"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("opt_catalog")
    for d, seed in ((1, 11), (2, 12), (3, 13)):
        synth.generate(root, seed=seed, start=f"2024-01-0{d}T12:00:00", duration_s=180, assets="perp")
    return root


def _optimize(opt: Path, catalog: Path, out: Path, workers: int, *extra: str) -> dict:
    proc = subprocess.run([*CLI, "optimize", str(opt), "--catalog", str(catalog), "--out", str(out), "--workers",
                           str(workers), "--json", *extra], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _finished(out: Path, name: str, fold: int = 0) -> list[tuple]:
    study = optuna.load_study(study_name=f"{name}-fold{fold}", storage=f"sqlite:///{out / 'optuna.db'}")
    return [(t.state.name, t.params, t.value) for t in study.get_trials()
            if t.state.name in ("COMPLETE", "PRUNED")]


def _count_finished(out: Path) -> int:
    # Read-only, plain SQL: opening the storage through Optuna would race the optimiser creating its schema.
    db = out / "optuna.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


@pytest.mark.slow
def test_finds_the_optimum_of_an_exhaustive_grid_and_reports_it(catalog, tmp_path):
    grid = tmp_path / "grid"
    subprocess.run([*CLI, "batch", str(FIXTURES / "grid.yaml"), "--catalog", str(catalog), "--out", str(grid),
                    "--workers", "2"], check=True, capture_output=True, text=True, timeout=900)
    truth = (pl.read_parquet(grid / "results.parquet")
             .group_by("p.quoter.params.half_spread", "p.risk[0].params.risk_aversion")
             .agg(pl.col("pnl_usd").sum(), pl.len()).sort("pnl_usd", descending=True))
    assert truth.height == 16 and (truth["len"] == 2).all()
    assert truth["pnl_usd"][0] > truth["pnl_usd"][1] > truth["pnl_usd"].median()  # one best point

    out = tmp_path / "opt"
    res = _optimize(FIXTURES / "opt.yaml", catalog, out, 2)
    (fold,) = res["folds"]
    assert fold["params"] == {"quoter.params.half_spread": int(truth["p.quoter.params.half_spread"][0]),
                              "risk[0].params.risk_aversion": truth["p.risk[0].params.risk_aversion"][0]}
    assert fold["is_value"] == pytest.approx(truth["pnl_usd"][0], rel=1e-12)
    # out of sample: the same parameters on the day after, a number of its own
    grid_day3 = subprocess.run([*CLI, "run", str(Path(res["best_yaml"])), "--set",
                                'data.assets.perp.dates=["20240103"]', "--json"], capture_output=True, text=True)
    assert grid_day3.returncode == 0, grid_day3.stderr
    assert fold["oos_value"] == pytest.approx(json.loads(grid_day3.stdout)["pnl_usd"], rel=1e-9)

    trials = pl.read_parquet(out / "trials.parquet")
    assert trials.height == 12 and set(trials["state"]) == {"COMPLETE"}
    best = yaml.safe_load(Path(res["best_yaml"]).read_text())
    assert best["quoter"]["params"]["half_spread"] == fold["params"]["quoter.params.half_spread"]

    r = subprocess.run([*CLI, "report", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    page = (out / "report" / "index.html").read_text()
    assert "Optimisation" in page and "out-of-sample" in page and "opt_history_fold0.png" in page
    assert "opt_importance_fold0.png" in page and (out / "report" / "opt_history_fold0.png").exists()


@pytest.mark.slow
def test_a_killed_optimisation_resumes_without_losing_or_repeating_a_trial(catalog, tmp_path):
    opt = tmp_path / "opt.yaml"
    doc = yaml.safe_load((FIXTURES / "opt.yaml").read_text())
    doc |= {"name": "resume", "strategy": str(FIXTURES / "base.yaml"), "trials": 10, "pruner": "median",
            "seed": 5, "space": {"quoter.params.half_spread": {"low": 1, "high": 8, "step": 1},
                                 "risk[0].params.risk_aversion": {"low": 0.01, "high": 2.0, "log": True}}}
    opt.write_text(yaml.safe_dump(doc))
    whole = tmp_path / "whole"
    _optimize(opt, catalog, whole, 2)
    reference = _finished(whole, "resume")
    assert len(reference) == 10 and any(s == "PRUNED" for s, _, _ in reference)

    out = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, "optimize", str(opt), "--catalog", str(catalog), "--out", str(out),
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        if _count_finished(out) >= 4:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _finished(out, "resume")
    assert 4 <= len(before) < 10, "the kill must land halfway"
    records_before = {p.parent.name: p.read_bytes() for p in out.glob("runs/*/record.json")}

    res = _optimize(opt, catalog, out, 1)
    after = _finished(out, "resume")
    assert after[:len(before)] == before  # nothing finished was lost or changed
    assert after == reference  # and the rest is what the uninterrupted search (two workers) did
    for rid, data in records_before.items():  # finished runs were not run again
        assert (out / "runs" / rid / "record.json").read_bytes() == data
    runs = {p.parent.name for p in out.glob("runs/*/record.json")}
    assert runs == {p.parent.name for p in whole.glob("runs/*/record.json")}
    assert res["runs_done"] == len(runs) - len(records_before)  # each run executed once over both processes


MARK_AND_WAIT = """\
import os, time, uuid
from pathlib import Path
from quotelab import hookimpl


@hookimpl
def quotelab_run_start(run):
    Path(os.environ["QUOTELAB_TEST_STARTS"], uuid.uuid4().hex).touch()


@hookimpl
def quotelab_run_end(run, result):
    time.sleep(0.5)
"""


@pytest.mark.slow  # an optimisation stopped in its first round, then run again: ~30 s
def test_ctrl_c_keeps_the_runs_of_the_round_it_stops_and_the_same_command_reuses_them(catalog, tmp_path):
    """Seen red: a round's records were stored only once the whole round had run, so Ctrl-C lost the runs
    of the round it stopped (none recorded), and the message was Python's."""
    base = yaml.safe_load((FIXTURES / "base.yaml").read_text()) | {"plugins": ["mark_and_wait.py"]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "mark_and_wait.py").write_text(MARK_AND_WAIT)
    opt = tmp_path / "opt.yaml"
    opt.write_text(yaml.safe_dump({
        "name": "stop", "strategy": "base.yaml", "trials": 4, "parallel_trials": 2, "pruner": "none",
        "days": ["20240101"], "space": {"quoter.params.half_spread": {"low": 1, "high": 8}}}))
    out, starts = tmp_path / "out", tmp_path / "starts"
    starts.mkdir()
    env = {**os.environ, "QUOTELAB_TEST_STARTS": str(starts)}
    cmd = [*CLI, "optimize", str(opt), "--catalog", str(catalog), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(starts.iterdir())) < 2:  # the round's second run started:
        assert proc.poll() is None, proc.communicate()  # its first has finished
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == (f"error: optimize stopped by SIGINT: 1 runs finished and recorded in {out}, 1 "
                                    f"cancelled; run the same command again: it resumes the study and reuses the "
                                    f"finished runs")
    (kept,) = out.glob("runs/*/record.json")
    data = kept.read_bytes()
    assert json.loads(data)["status"] == "done"

    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runs_reused"] >= 1 and kept.read_bytes() == data
    assert len(_finished(out, "stop")) == 4

@pytest.mark.slow  # a Ray optimisation (starts a cluster; each actor compiles the driver): ~40 s
def test_a_ray_actor_that_dies_fails_its_run_and_the_optimisation_goes_on(catalog, tmp_path):
    """Seen red: ray.get raised the actor's death out of the round ("unexpected ActorDiedError", exit 1)."""
    pytest.importorskip("ray")
    (tmp_path / "dies.py").write_text(
        "import os\nfrom quotelab import hookimpl\n\n\n@hookimpl\ndef quotelab_run_start(run):\n"
        "    if '20240102' in str(run['config']['data']['assets']['perp']['dates']):\n        os._exit(3)\n")
    base = yaml.safe_load((FIXTURES / "base.yaml").read_text()) | {"plugins": ["dies.py"]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    opt = tmp_path / "opt.yaml"
    opt.write_text(yaml.safe_dump({
        "name": "dies", "strategy": "base.yaml", "trials": 2, "parallel_trials": 2, "pruner": "none",
        "walk_forward": {"days": [20240101, 20240102], "train": 1, "test": 1},
        "space": {"quoter.params.half_spread": {"low": 1, "high": 8}}}))
    r = subprocess.run([*CLI, "optimize", str(opt), "--catalog", str(catalog), "--out", str(tmp_path / "out"),
                        "--workers", "2", "--executor", "ray", "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    # the whole of stdout: Ray's driver prints its own note of the death to stdout, which --json moves to stderr
    (fold,) = json.loads(r.stdout)["folds"]
    assert fold["is_value"] is not None and fold["oos_value"] is None  # the test day's run died
    (died,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("runs/*/record.json")
               if json.loads(p.read_text())["dates"] == ["20240102"]]
    assert died["status"] == "failed"
    assert re.match(r"WorkerDied: the worker process \d+ \(a Ray actor on \S+\) running this run ended before "
                    r"sending the run's record, and Ray tells neither the signal nor the exit code \(Ray: exit type "
                    r"SYSTEM_ERROR, .*\): a plugin calling exit or os\._exit", died["error"]), died["error"]
    assert died["error"].endswith(f"every finished run's record is kept in {tmp_path / 'out' / 'runs'}")
    # the failed run, named with its cause on stderr: the one word of it under --json
    assert f"failed {died['run_id']} {died['label']}: {died['error']}" in r.stderr.splitlines(), r.stderr

def test_config_errors_name_the_place(tmp_path, catalog):
    shutil.copy(FIXTURES / "base.yaml", tmp_path / "base.yaml")
    text = (FIXTURES / "opt.yaml").read_text().replace("risk[0].params.risk_aversion: {choices: [0.01, 1.0]}",
                                                       "quoter.params.half_sprad: {low: 1, high: 2}")
    (tmp_path / "opt.yaml").write_text(text)
    line = next(i for i, x in enumerate(text.splitlines(), 1) if "half_sprad" in x)
    with pytest.raises(OptimizeError, match=rf"opt\.yaml:{line}: space\.quoter\.params\.half_sprad: value 1 makes "
                                            r"the strategy invalid:\n  the trial's 'quoter\.params\.half_sprad=1'"):
        load_opt(tmp_path / "opt.yaml", catalog)
    (tmp_path / "opt.yaml").write_text(text.replace("quoter.params.half_sprad: {low: 1, high: 2}",
                                                    "quoter.params.size: {low: 0.0, high: 1, log: true}"))
    with pytest.raises(OptimizeError, match=r"log only with low > 0"):
        load_opt(tmp_path / "opt.yaml", catalog)


def test_space_typos_and_set_overrides(tmp_path, catalog):
    shutil.copy(FIXTURES / "base.yaml", tmp_path / "base.yaml")
    text = (FIXTURES / "opt.yaml").read_text()
    (tmp_path / "opt.yaml").write_text(text.replace("{low: 1, high: 8, step: 1}", "{low: 1, hihg: 8}"))
    line = next(i for i, x in enumerate(text.splitlines(), 1) if "half_spread" in x)
    with pytest.raises(OptimizeError, match=rf"opt\.yaml:{line}: space\.quoter\.params\.half_spread\.hihg: unknown "
                                            r"key; expected one of: low, high, step, log, choices"):
        load_opt(tmp_path / "opt.yaml", catalog)
    (tmp_path / "opt.yaml").write_text(text)
    cfg = load_opt(tmp_path / "opt.yaml", catalog, overrides=["quoter.params.size=0.02"])
    assert run_overrides(cfg, {"quoter.params.half_spread": 2}, "20240102") == [
        "quoter.params.size=0.02", 'data.assets.perp.dates=["20240102"]', "quoter.params.half_spread=2"]
    best = yaml.safe_load(write_best(cfg, {"quoter.params.half_spread": 2}, tmp_path).read_text())
    assert best["quoter"]["params"] == {"half_spread": 2, "size": 0.02, "max_position": 0.1}
    with pytest.raises(OptimizeError, match=r"^--set quoter\.params\.half_spread=2: .*opt\.yaml:8: "
                                            r"space\.quoter\.params\.half_spread sets"):
        load_opt(tmp_path / "opt.yaml", catalog, overrides=["quoter.params.half_spread=2"])
    with pytest.raises(OptimizeError, match=r"the base strategy with --set quoter\.params\.sze=1 is invalid:\n  "
                                            r"--set 'quoter\.params\.sze=1': quoter\.params\.sze: unknown key"):
        load_opt(tmp_path / "opt.yaml", catalog, overrides=["quoter.params.sze=1"])


WRITE_BEST_ON_A_FULL_DISK = """\
import resource, signal, sys
from pathlib import Path
from quotelab.batch.optimize import load_opt, write_best

cfg = load_opt(sys.argv[1], sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG) as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
try:
    write_best(cfg, {"quoter.params.half_spread": 2}, Path(sys.argv[3]))
except OSError as exc:
    print("OSError", exc.strerror)
"""


def test_best_yaml_is_whole_or_not_written(tmp_path, catalog):
    """Seen red: a write that failed after 64 bytes left best.yaml as those 64 bytes of the new file."""
    shutil.copy(FIXTURES / "base.yaml", tmp_path / "base.yaml")
    shutil.copy(FIXTURES / "opt.yaml", tmp_path / "opt.yaml")
    out = tmp_path / "out"
    out.mkdir()
    (out / "best.yaml").write_text("# the previous best\n" * 8)
    script = tmp_path / "write_best.py"
    script.write_text(WRITE_BEST_ON_A_FULL_DISK)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "opt.yaml"), str(catalog), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OSError File too large"
    assert (out / "best.yaml").read_text() == "# the previous best\n" * 8
    assert [p.name for p in out.iterdir()] == ["best.yaml"]  # no temporary file left either

def test_objectives_from_day_records():
    recs = [{"summary": {"pnl_usd": p, "traded_notional_usd": n}, "diagnostics": {"inventory_mean_abs": q}}
            for p, n, q in ((10.0, 1e5, 0.2), (-4.0, 3e5, 0.4), (6.0, 2e5, 0.0))]
    assert Objective(metric="pnl_usd").value(recs) == pytest.approx(12.0)
    assert Objective(metric="pnl_per_notional").value(recs) == pytest.approx(12.0 / 6e5 * 1e4)
    assert Objective(metric="sharpe_daily").value(recs) == pytest.approx(4.0 / ((36 + 64 + 4) / 2) ** 0.5)
    assert Objective(metric="pnl_usd", inventory_penalty=10.0).value(recs) == pytest.approx(12.0 - 10.0 * 0.2)
    sharpe = Objective(metric="sharpe_daily")
    assert sharpe.value(recs[:1]) != sharpe.value(recs[:1])  # NaN: 1 day


@pytest.mark.slow
def test_ray_actors_run_the_same_trials_as_the_local_pool(catalog, tmp_path):
    runs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        proc = subprocess.run([*CLI, "optimize", str(FIXTURES / "opt.yaml"), "--catalog", str(catalog), "--out",
                               str(out), "--workers", "2", "--executor", executor, "--trials", "4", "--json"],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        runs[executor] = _finished(out, "opt_planted")
        records = [json.loads(p.read_text()) for p in out.glob("runs/*/record.json")]
        assert len(records) >= 5 and all(r["status"] == "done" for r in records)  # repeated params reuse a run
    assert len(runs["ray"]) == 4 and runs["ray"] == runs["local"]


class InProcessPool:  # the runs, in this process: no worker to start and compile
    def __init__(self, workers):
        pass

    def stream(self, tasks):
        from quotelab.batch.executors import execute_run

        return enumerate(map(execute_run, tasks))

    def close(self):
        pass


def test_trials_whose_runs_always_fail_end_the_search_naming_the_first_error(catalog, tmp_path, monkeypatch):
    """Seen red: a failed trial does not count toward `trials`, so a plugin raising in every run had the
    search ask for new trials forever (2,783 failed trials in 10 minutes)."""
    from quotelab.batch import optimize as O

    monkeypatch.setattr(O, "LocalPool", InProcessPool)
    (tmp_path / "raises.py").write_text("from quotelab import hookimpl\n\n\n@hookimpl\ndef quotelab_run_start(run):\n"
                                        "    raise ValueError('no luck')\n")
    base = yaml.safe_load((FIXTURES / "base.yaml").read_text()) | {"plugins": ["raises.py"]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    opt = tmp_path / "opt.yaml"
    opt.write_text(yaml.safe_dump({
        "name": "fails", "strategy": "base.yaml", "trials": 3, "parallel_trials": 2, "pruner": "none",
        "days": ["20240101"], "space": {"quoter.params.half_spread": {"low": 1, "high": 8}}}))
    out = tmp_path / "out"
    with pytest.raises(OptimizeError, match=rf"^{opt}: fold 0: 4 trials failed \(trials: 3\), the first: trial 0 on "
                                            rf"20240101: PluginError: .*raises\.py.*no luck; fix that \(each run's "
                                            rf"record is in {out}/runs\), then run the same command again$"):
        O.optimize(opt, out, catalog=catalog, progress=lambda m: None)


@pytest.mark.slow  # two optimisations of two runs each, in this process: ~15 s with the catalog
def test_an_optimisation_whose_out_fails_at_the_end_keeps_its_results(catalog, tmp_path, monkeypatch):
    """Seen red: a folder at trials.parquet ended the optimisation with an OSError after every trial had
    run; best.yaml and optimize.json were never written anywhere."""
    import tempfile

    from quotelab.batch import optimize as O
    from quotelab.errors import RunError

    monkeypatch.setattr(O, "LocalPool", InProcessPool)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    opt = tmp_path / "opt.yaml"
    opt.write_text(yaml.safe_dump({
        "name": "rescue", "strategy": str(FIXTURES / "base.yaml"), "trials": 2, "parallel_trials": 2,
        "pruner": "none", "days": ["20240101"], "space": {"quoter.params.half_spread": {"low": 1, "high": 3}}}))
    out = tmp_path / "out"
    (out / "trials.parquet").mkdir(parents=True)
    with pytest.raises(RunError, match=rf"^could not write the results \(results.parquet, trials.parquet, best.yaml, "
                                       rf"optimize.json\) to {out} \(Is a directory\); saved to (\S+) instead\. "
                                       r".*run the same command again") as info:
        O.optimize(opt, out, catalog=catalog, progress=lambda m: None)
    rescue = Path(re.search(r"saved to (\S+) instead", str(info.value)).group(1))
    saved = json.loads((rescue / "optimize.json").read_text())
    (fold,) = saved["folds"]
    assert saved["runs_done"] == 2 and set(fold["params"]) == {"quoter.params.half_spread"}
    assert pl.read_parquet(rescue / "trials.parquet").height == 2
    assert pl.read_parquet(rescue / "results.parquet").height == 2
    best = yaml.safe_load((rescue / "best.yaml").read_text())
    assert best["quoter"]["params"]["half_spread"] == fold["params"]["quoter.params.half_spread"]

    (out / "trials.parquet").rmdir()  # fixed: the same command again reuses everything
    again = O.optimize(opt, out, catalog=catalog, progress=lambda m: None)
    assert again.runs_done == 0 and again.folds == saved["folds"]
    assert pl.read_parquet(out / "trials.parquet").height == 2
