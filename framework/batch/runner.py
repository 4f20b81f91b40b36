"""Running a batch: validate it, run what is not done yet, store each record as it comes, report progress."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quotelab.batch.executors import local_executor, make_task, ray_executor
from quotelab.batch.spec import BatchError, load_batch
from quotelab.batch.store import RECORD, Store, read_records
from quotelab.data import catalog as cat
from quotelab.errors import Stopped


@dataclass
class BatchSummary:
    out: Path
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    wall_seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    rescue: Path | None = None  # where the files that could not be written to ``out`` went

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "total": self.total, "done": self.done, "failed": self.failed,
                "skipped": self.skipped, "wall_seconds": round(self.wall_seconds, 3)}


def run_batch(
    batch_file: str | Path,
    out: str | Path,
    catalog: str | Path | None = None,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    resume: bool = False,
    progress: Callable[[str, dict[str, Any] | None, BatchSummary], None] | None = None,
    overrides: Sequence[str] = (),
) -> BatchSummary:
    """Validate and run a batch; records persist as each run finishes. ``overrides`` (``--set``): see load_batch."""
    if executor not in ("local", "ray"):
        raise BatchError(f"--executor must be local or ray, got {executor!r}")
    if workers < 1:
        raise BatchError(f"--workers must be >= 1, got {workers}")
    batch = load_batch(batch_file, catalog, overrides)
    out = Path(out).resolve()
    done_ids = {r["run_id"] for r in read_records(out) if r.get("status") == "done"}
    any_ids = {p.parent.name for p in out.glob(f"runs/*/{RECORD}")}
    ours = {r.run_id for r in batch.runs}
    if not resume and any_ids & ours:
        raise BatchError(f"{batch.file}: {out} already holds {len(any_ids & ours)} of this batch's runs; "
                         f"pass --resume to skip finished runs, or choose another --out")
    summary = BatchSummary(out, len(batch.runs))
    t0 = time.perf_counter()
    try:
        out.mkdir(parents=True, exist_ok=True)
        cat.atomic_write_json(out / "batch.json", {
            "batch": str(batch.file), "strategy": str(batch.strategy_path),
            "catalog": str(batch.catalog) if batch.catalog else None,
            "runs": [{"run_id": r.run_id, "label": r.label, "overrides": r.overrides} for r in batch.runs]})
    except OSError as exc:  # nothing has run yet: say so and stop
        raise BatchError(f"--out {out}: cannot write {out / 'batch.json'} ({exc.strerror or exc}); "
                         f"give a folder you can write to") from exc
    tasks = []
    for r in batch.runs:
        if r.run_id in done_ids:
            summary.skipped += 1
            if progress:
                progress("skipped", {"run_id": r.run_id, "label": r.label}, summary)
            continue
        tasks.append(make_task(r.run_id, r.label, r.params, r.overrides, r.dates, batch.strategy_path,
                               batch.strategy_text, batch.catalog, out, r.index, r.venue, r.symbol))
    if progress:
        progress("start", None, summary)
    stream = ray_executor(tasks, workers, address) if executor == "ray" else local_executor(tasks, workers)
    store = Store(out)
    last_table = 0.0
    stopped = None
    # closing: an error out of this loop (nowhere to write) ends the workers now, not once every run is done
    with contextlib.closing(stream):
        try:
            for rec in stream:
                rec["executor"] = executor
                store.record(rec)
                summary.records.append(rec)
                if rec["status"] == "done":
                    summary.done += 1
                else:
                    summary.failed += 1
                # The JSON records are what persists; the table is a view of them, so rebuilding it at most
                # every few seconds keeps a large batch from spending its time rewriting parquet.
                if time.perf_counter() - last_table > 5.0:
                    store.table(final=False)
                    last_table = time.perf_counter()
                if progress:
                    progress("run", rec, summary)
        except Stopped as exc:
            stopped = exc
    store.table()
    summary.wall_seconds = time.perf_counter() - t0
    summary.rescue = store.rescue
    resume = f"rerun with --resume: it skips the finished runs and rebuilds {out / 'results.parquet'}"
    if stopped is not None:
        if progress:
            progress("stopped", None, summary)
        raise Stopped(f"batch {stopped}: {summary.done + summary.failed} runs finished and recorded in {out} "
                      f"({summary.failed} failed), {stopped.cancelled} cancelled; rerun it with --resume to run the "
                      f"rest (runs done are skipped)" + (f"; and {store.note(resume)}" if store.rescue else ""),
                      stopped.signum, stopped.cancelled) from None
    if progress:
        progress("end", None, summary)
    store.close(resume)
    return summary


def _end_line(s: BatchSummary) -> str:
    where = f"{s.out} (some files in {s.rescue}: see the error below)" if s.rescue else s.out / "results.parquet"
    return f"batch finished: done {s.done}, failed {s.failed}, skipped {s.skipped} in {s.wall_seconds:.1f}s -> {where}"


def plain_progress(event: str, rec: dict[str, Any] | None, s: BatchSummary) -> None:
    """Progress as plain lines, for logs and pipes."""
    if event == "start":
        print(f"batch: {s.total} runs, {s.skipped} already done, {s.total - s.skipped} to run -> {s.out}",
              flush=True)
    elif event == "run" and rec is not None:
        n = s.done + s.failed + s.skipped
        if rec["status"] == "done":
            eq = (rec.get("summary") or {}).get("equity")
            what = f"equity={eq:.6g}" if isinstance(eq, int | float) else ""
        else:
            what = f"FAILED: {str(rec.get('error')).splitlines()[0]}"
        print(f"[{n}/{s.total}] {rec['status']} {rec['run_id']} {rec['label']} {what} "
              f"({rec.get('wall_seconds') or 0:.2f}s)", flush=True)
    elif event == "end":
        print(_end_line(s), flush=True)


def failures_progress(event: str, rec: dict[str, Any] | None, s: BatchSummary) -> None:
    """Only the failed runs, on stderr: the progress of ``--json``, whose stdout is the counts alone."""
    if event == "run" and rec is not None and rec["status"] != "done":
        print(f"failed {rec['run_id']} {rec['label']}: {str(rec.get('error')).splitlines()[0]}", file=sys.stderr,
              flush=True)


class RichProgress:
    """A progress bar with done/failed counts and ETA, for a terminal."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from quotelab.progress import console

        self.bar = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("done {task.fields[done]} failed {task.fields[failed]} "
                                       "skipped {task.fields[skipped]} left {task.fields[left]}"),
                            TimeRemainingColumn(), console=console())
        self.task: Any = None

    def __call__(self, event: str, rec: dict[str, Any] | None, s: BatchSummary) -> None:
        if event == "start":
            self.bar.start()
            self.task = self.bar.add_task("batch", total=s.total, completed=s.skipped, done=0, failed=0,
                                          skipped=s.skipped, left=s.total - s.skipped)
        elif event == "run" and rec is not None:
            self.bar.update(self.task, advance=1, done=s.done, failed=s.failed,
                            left=s.total - s.skipped - s.done - s.failed)
            if rec["status"] != "done":
                self.bar.console.print(f"[red]failed[/red] {rec['label']}: {str(rec.get('error')).splitlines()[0]}")
        elif event == "stopped":
            self.bar.stop()
        elif event == "end":
            self.bar.stop()
            print(_end_line(s), flush=True)


def default_progress() -> Callable[[str, dict[str, Any] | None, BatchSummary], None]:
    from quotelab.progress import wanted

    return RichProgress() if wanted() else plain_progress

