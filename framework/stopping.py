"""Ctrl-C and SIGTERM: how a command is stopped, and how it says what it kept.

The CLI installs :func:`raising` for the whole command: SIGINT and SIGTERM both raise :class:`Interrupted`,
a ``KeyboardInterrupt`` carrying the signal's number. It is a ``BaseException``, so the ``except Exception``
wrappers that turn a plugin's or a run's errors into :class:`~quotelab.errors.PluginError` or
:class:`~quotelab.errors.RunError` let it through, and the ``except BaseException`` / ``finally`` cleanups
(temporary files, writer threads, a day being written) run on the way out. Whoever knows what was
finished turns it into :class:`~quotelab.errors.Stopped` with :func:`stopped`; the CLI prints that one
line and exits with 128 + the signal's number, as a shell does.

Only the first signal raises: a second Ctrl-C while the first is being handled (a stopped ``convert``
committing the days it finished) is ignored, so it cannot cut that commit short. Where nothing may be
interrupted at all, :func:`stop_signals` records the signals instead of raising (``batch``'s executors
stop between two run records that way).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from quotelab.errors import Stopped

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread by :func:`raising`'s handler."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = signum


def signum_of(exc: BaseException) -> int:
    """The signal a ``KeyboardInterrupt`` stands for: :class:`Interrupted`'s, else SIGINT (Python's own)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe(signum: int) -> str:
    """How a stop's message names the signal: ``Ctrl-C (SIGINT)``, ``SIGTERM``."""
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signame(signum)


def stopped(exc: BaseException, kept: str) -> Stopped:
    """The :class:`Stopped` for a ``KeyboardInterrupt`` ``exc``: ``stopped by Ctrl-C (SIGINT): <kept>``."""
    signum = signum_of(exc)
    return Stopped(f"stopped by {describe(signum)}: {kept}", signum)


@contextmanager
def raising() -> Iterator[None]:
    """While in it, the first SIGINT or SIGTERM raises :class:`Interrupted` in the main thread; later ones
    are ignored (the stop they ask for is under way). Handlers set before are put back after."""
    if threading.current_thread() is not threading.main_thread():  # only there may handlers be set
        yield
        return
    fired: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    saved = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While in it, SIGINT and SIGTERM append their number to the yielded list instead of raising, so the
    code inside finishes (a batch's run record stored whole, a convert's commit) and then looks at the list."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    for s in saved:
        signal.signal(s, lambda signum, _frame: got.append(signum))
    try:
        yield got
    finally:
        for s, handler in saved.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
