"""Every hook quotelab calls, in one place.

Hooks run at set-up (registration) and around runs; per-step work happens in numba kernels,
never through pluggy. Implement a hook with ``quotelab.hookimpl``::

    from quotelab import hookimpl

    @hookimpl
    def quotelab_register_components(register):
        register(Component(role="signal", name="my_signal", params=MyParams, kernel=my_signal_nb))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quotelab import hookspec

if TYPE_CHECKING:
    from collections.abc import Callable

    from quotelab.component import Component
    from quotelab.pysignal import PythonSignal


# -------------------------------------------------------------------------------------------------
# Registration
# -------------------------------------------------------------------------------------------------


@hookspec
def quotelab_register_components(register: Callable[[Component], None]) -> None:
    """Register pricing components: fair-value sources, signals, risk adjusters and quoters.

    Called once, when the registry loads plugins (before any YAML is validated).

    :param register: Call it with each :class:`quotelab.component.Component` the plugin provides.
        A name already registered by another plugin is an error that names both plugins.
    :return: Nothing; the return value is ignored.
    """


# -------------------------------------------------------------------------------------------------
# Run lifecycle
# -------------------------------------------------------------------------------------------------


@hookspec
def quotelab_run_start(run: dict[str, Any]) -> None:
    """A backtest is about to start: validated and composed, before the replay begins.

    :param run: The run's description: ``name``, ``run_id``, ``assets`` (name → venue/symbol),
        ``out_dir`` (or ``None``) and the validated ``config`` as a plain dict; ``run_id`` hashes that config.
    :return: Nothing. An exception here aborts the run and names the plugin.
    """


@hookspec
def quotelab_run_end(run: dict[str, Any], result: dict[str, Any]) -> None:
    """A backtest finished (also when it stopped on an error it records).

    :param run: The same description passed to :func:`quotelab_run_start`.
    :param result: The run's summary (the object ``quotelab run --json`` prints).
    :return: Nothing. An exception here is reported, naming the plugin; the result is kept.
    """


# -------------------------------------------------------------------------------------------------
# Python-function signals
# -------------------------------------------------------------------------------------------------


@hookspec
def quotelab_register_python_signals(register: Callable[[PythonSignal], None]) -> None:
    """Register signals written as plain Python functions, to try an idea before its kernel exists.

    Called once, after every plugin's :func:`quotelab_register_components`. Each function
    ``f(view, trades, state, params) -> float`` becomes the signal kind ``py:<name>``: the engine
    calls it at every step from inside the fused strategy kernel (through ``numba.objmode``, so
    slowly: a few microseconds per step), with the same arrays a kernel gets. A kernel component
    may share the name; ``quotelab check-plugin <name>`` then compares the two on real data.

    :param register: Call it with each :class:`quotelab.pysignal.PythonSignal` the plugin provides.
        A name already registered as a Python signal is an error that names both plugins.
    :return: Nothing; the return value is ignored.
    """
