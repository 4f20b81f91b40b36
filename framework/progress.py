"""Progress of long verbs on stderr: rich's display when stderr is a terminal, nothing otherwise.

``QUOTELAB_PROGRESS=1`` forces it on (and onto a non-terminal stderr), ``0`` off; ``--json``
always turns it off, so machine-read output stays clean.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import Any

from quotelab.timeunits import DAY_NS

ENV = "QUOTELAB_PROGRESS"


_ON = False  # set by a CLI verb: replays deep inside evaluate and train show progress then


def enable(on: bool) -> None:
    global _ON
    _ON = on


def enabled() -> bool:
    return _ON


def wanted(json_out: bool = False) -> bool:
    if json_out:
        return False
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def console() -> Any:
    from rich.console import Console

    return Console(stderr=True, force_terminal=True if os.environ.get(ENV, "").strip() == "1" else None)


class Replay:
    """Days and events done, events/s and ETA of a replay of ``events`` events over ``[first_ns, last_ns]``.

    Callers report the replay's clock (:meth:`at`); the events done are that clock's share of the
    span, which the display says (``~``), since hftbacktest counts none.
    """

    def __init__(self, label: str, first_ns: int, last_ns: int, events: int, enabled: bool) -> None:
        self.label, self.first, self.last, self.events = label, first_ns, max(last_ns, first_ns + 1), events
        self.days = int(self.last // DAY_NS - first_ns // DAY_NS) + 1
        self.enabled = enabled
        self.bar: Any = None

    def __enter__(self) -> Replay:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("day {task.fields[day]}/{task.fields[days]}  ~{task.fields[done]:,}/{task.total:,} events"
                           "  {task.fields[rate]:,.0f} ev/s"),
                TextColumn("ETA"), TimeRemainingColumn(), console=console(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.events, day=1, days=self.days, done=0, rate=0.0)
            self.t0 = time.perf_counter()
        return self

    def at(self, now_ns: int) -> None:
        if self.bar is None:
            return
        share = min(1.0, max(0.0, (now_ns - self.first) / (self.last - self.first)))
        done = int(share * self.events)
        day = min(self.days, int(now_ns // DAY_NS - self.first // DAY_NS) + 1)
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, completed=done, done=done, day=day, rate=rate)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
                 ) -> None:
        if self.bar is not None:
            self.bar.stop()


class Days:
    """Days and events written and events/s of a job whose total is known only at its end (a conversion)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled = label, enabled
        self.bar: Any = None
        self.days = self.events = 0

    def __enter__(self) -> Days:
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                                TextColumn("{task.fields[days]} days, {task.fields[events]:,} events written, "
                                           "{task.fields[rate]:,.0f} ev/s"), TimeElapsedColumn(),
                                console=console())
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=None, days=0, events=0, rate=0.0)
            self.t0 = time.perf_counter()
        return self

    def add(self, events: int) -> None:
        self.days += 1
        self.events += events
        if self.bar is not None:
            rate = self.events / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, days=self.days, events=self.events, rate=rate)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
                 ) -> None:
        if self.bar is not None:
            self.bar.stop()
