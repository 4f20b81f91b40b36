"""Errors a user sees. Each carries the place (file, line, path) and, where there is one, the fix."""

from __future__ import annotations


class QuotelabError(Exception):
    """Base class: the CLI prints these without a traceback."""


class DataError(QuotelabError):
    """A raw capture or catalog file is missing, corrupt, gappy or inconsistent."""


class ConfigError(QuotelabError):
    """A strategy, batch or evaluation YAML is invalid."""


class PluginError(QuotelabError):
    """A plugin failed to load or register, or its kernel misbehaved."""


class RunError(QuotelabError):
    """A backtest stopped on a condition the strategy asked to stop on (e.g. a non-finite kernel output).

    ``result`` keeps what was computed up to the stop, so nothing already computed is lost.
    """

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class Stopped(QuotelabError):
    """The command was asked to stop (Ctrl-C, SIGTERM) and did, keeping what it had finished.

    ``cancelled`` counts the runs it had not finished; the CLI exits with 128 + ``signum``, as a shell does.
    """

    def __init__(self, message: str, signum: int = 2, cancelled: int = 0) -> None:
        super().__init__(message)
        self.signum = signum
        self.cancelled = cancelled
