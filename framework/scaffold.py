"""``quotelab new-plugin NAME``: write an installable signal plugin package to start from.

The package holds everything a signal needs and nothing else: a ``pyproject.toml`` with the
``quotelab`` entry point, one module with a frozen params model, the ``@njit(inline="always")``
kernel, the same formula as a plain Python function (registered as ``py:NAME``, for
``quotelab check-plugin``), a reference test of the kernel against a naive numpy re-implementation on
replayed data, and a strategy YAML that uses the signal. The placeholder formula (an EWMA of the
top-of-book imbalance) is there to be replaced; it uses state and a param so each is shown once.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from quotelab.errors import PluginError
from quotelab.pysignal import PREFIX

NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
MAX_NAME = 40


class ScaffoldError(PluginError):
    """``new-plugin`` was given a name or folder it cannot use."""


@dataclass(frozen=True)
class Scaffold:
    name: str
    root: Path
    files: tuple[Path, ...]


def names(name: str) -> dict[str, str]:
    """Everything derived from the signal name: module, distribution, classes and functions."""
    camel = "".join(w.capitalize() for w in name.split("_"))
    return {
        "name": name,
        "module": f"quotelab_{name}",
        "dist": f"quotelab-{name.replace('_', '-')}",
        "params_cls": f"{camel}Params",
        "kernel": f"{name}_nb",
        "pyfunc": f"{name}_py",
    }


def validate_name(name: str, registered: dict[str, str] | None = None) -> None:
    """A signal name must be a snake_case identifier that no loaded plugin already uses."""
    fix = "use lower-case snake_case starting with a letter, e.g. trade_burst"
    if not NAME_RE.fullmatch(name or ""):
        raise ScaffoldError(f"new-plugin {name!r}: not a valid plugin name; {fix}")
    if len(name) > MAX_NAME:
        raise ScaffoldError(f"new-plugin {name!r}: longer than {MAX_NAME} characters; pick a shorter name")
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        raise ScaffoldError(f"new-plugin {name!r}: a Python keyword cannot name a module; {fix}")
    taken = next((n for n in (name, PREFIX + name) if registered and n in registered), None)
    if taken is not None:
        raise ScaffoldError(
            f"new-plugin {name!r}: a component named {taken!r} is already registered by {registered[taken]}; "
            "pick another name (names are global across plugins)"
        )


def _registered() -> dict[str, str]:
    from quotelab.strategy.registry import load_registry

    registry = load_registry()
    return {c.name: f"{c.source} ({c.role})" for c in registry.all()}


def scaffold(name: str, dest: Path | str | None = None, check_registry: bool = True) -> Scaffold:
    """Write the plugin package for signal ``name`` into ``dest`` (default ``./quotelab-<name>``)."""
    validate_name(name, _registered() if check_registry else None)
    n = names(name)
    if importlib.util.find_spec(n["module"]) is not None:
        raise ScaffoldError(
            f"new-plugin {name!r}: a module named {n['module']} is already importable; pick another name or "
            f"uninstall it (pip uninstall {n['dist']})"
        )
    root = (Path(dest) if dest is not None else Path.cwd() / n["dist"]).resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ScaffoldError(f"new-plugin {name!r}: {root} exists and is not an empty folder; pass --dir NEW_FOLDER")
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{n['module']}/__init__.py": MODULE,
        f"tests/test_{name}.py": TEST,
        "strategy.yaml": STRATEGY,
    }
    written = []
    for rel, template in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(n))
        written.append(path)
    return Scaffold(name, root, tuple(written))


# -------------------------------------------------------------------------------------------------
# Templates ($name, $module, $dist, $params_cls, $kernel, $pyfunc)
# -------------------------------------------------------------------------------------------------

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "quotelab signal plugin: $name."
requires-python = ">=3.11"
dependencies = ["quotelab"]

[project.optional-dependencies]
test = ["pytest>=8"]

# quotelab loads every module named in this group; the key is the plugin's name in error messages and in
# QUOTELAB_BLOCK_PLUGINS.
[project.entry-points.quotelab]
$name = "$module"

[tool.setuptools]
packages = ["$module"]
"""

README = """\
# $dist

A quotelab signal plugin: `$name`. Generated by `quotelab new-plugin $name`; replace the placeholder
formula (an EWMA of the top-of-book imbalance) with yours, in three places that must agree:

1. `$pyfunc` in `$module/__init__.py`: the signal as plain Python. A strategy runs it with
   `kind: py:$name`, step by step (slowly), before the kernel exists.
2. `$kernel`: the numba kernel the composer fuses into the strategy (`kind: $name`).
3. `tests/test_$name.py`: a naive numpy re-implementation, written from the formula, that the kernel
   must equal at every step of replayed data.

```bash
pip install -e .                                    # quotelab finds it through its entry point
quotelab plugins                                    # lists $name and py:$name
python -m pytest tests                              # on a synthetic hour, or QUOTELAB_CATALOG=... for real data
quotelab check-plugin $name --catalog CATALOG       # kernel vs Python function, first differing step
quotelab run strategy.yaml --catalog CATALOG
```

See quotelab's docs/writing-plugins.md.
"""

MODULE = '''\
"""``$name``: EWMA over steps of the top-of-book imbalance (a placeholder: put your formula here).

Registered twice under one name: the kernel as signal ``$name`` and the plain Python function as
``py:$name``. ``quotelab check-plugin $name`` replays data through both and reports the first step
where they differ.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from pydantic import Field

from quotelab import hookimpl
from quotelab.component import Asset, Component, Params, Reads, param_offsets
from quotelab.kernels.ewma import ewma_nb
from quotelab.kernels.imbalance import level_imbalance_nb
from quotelab.layout import ASK_QTY, BID_QTY
from quotelab.pysignal import PythonSignal


class $params_cls(Params):
    asset: Asset = "quoted"
    alpha: float = Field(0.1, gt=0, le=1, description="Weight of each step's imbalance in the EWMA.")


# Where the kernel reads each param: P.asset, P.alpha. Generated from the fields (the asset name packs as
# its index), so adding a field never shifts a read; the default pack puts the values there.
P = param_offsets($params_cls)


def _state(p: $params_cls) -> np.ndarray:
    return np.zeros(1)  # the EWMA, carried from step to step


def _reads(p: $params_cls) -> Reads:
    return Reads(assets=(p.asset,), depth_levels=1, trades=False)


# quotelab.kernels holds the helpers built-in kernels share (imbalances, EWMAs, trade flow, rings, arrival fits,
# quote writing); a helper of your own must be @njit(inline="always") too, to be pasted into the strategy.
@njit(inline="always")
def $kernel(view, trades, state, params, out):
    a = int(params[P.asset])
    imbalance = level_imbalance_nb(view[a, BID_QTY], view[a, ASK_QTY], 0.0)  # 0 on an empty top of book
    state[0] = ewma_nb(state[0], imbalance, params[P.alpha])
    return state[0]


# Written out without the kernel's helpers, so that check-plugin compares two ways of computing it.
def $pyfunc(view, trades, state, params):
    a = int(params[P.asset])
    alpha = params[P.alpha]
    qb, qa = view[a, BID_QTY], view[a, ASK_QTY]
    imbalance = (qb - qa) / (qb + qa) if qb + qa > 0.0 else 0.0
    state[0] = alpha * imbalance + (1.0 - alpha) * state[0]
    return float(state[0])


COMPONENT = Component(
    role="signal", name="$name", params=$params_cls, kernel=$kernel, state=_state, reads=_reads,
    doc="EWMA over steps of the top-of-book imbalance (Qb - Qa) / (Qb + Qa).",
    formula="s <- alpha * (Qb - Qa) / (Qb + Qa) + (1 - alpha) * s, once per step",
)


@hookimpl
def quotelab_register_components(register):
    register(COMPONENT)


@hookimpl
def quotelab_register_python_signals(register):
    register(PythonSignal.twin_of(COMPONENT, $pyfunc))
'''

TEST = '''\
"""$name: the kernel against a naive numpy re-implementation, at every step of replayed data.

Real data: set QUOTELAB_CATALOG (and QUOTELAB_VENUE, QUOTELAB_SYMBOL, QUOTELAB_DATE; default
binance-usdm BTCUSDT, every day the catalog holds). Without it the test generates quotelab's seeded
synthetic market (10 minutes) in a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from quotelab import layout as L
from quotelab.pysignal import catalog_asset, check_signal
from quotelab.research.replay import replay_component
from quotelab.strategy.registry import load_registry

NAME = "$name"


@pytest.fixture(scope="module")
def asset(tmp_path_factory):
    catalog = os.environ.get("QUOTELAB_CATALOG")
    if catalog:
        date = os.environ.get("QUOTELAB_DATE")
        return catalog_asset(Path(catalog), os.environ.get("QUOTELAB_VENUE", "binance-usdm"),
                             os.environ.get("QUOTELAB_SYMBOL", "BTCUSDT"), [date] if date else None)
    from quotelab.data import synth

    root = tmp_path_factory.mktemp("synthetic")
    synth.generate(root, seed=7, duration_s=600.0, assets=["perp"])
    return catalog_asset(root, "synthetic", "SYNPERP")


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def naive(views: np.ndarray, alpha: float) -> np.ndarray:
    """The formula, written from its definition with numpy (not from the kernel)."""
    qb, qa = views[:, 0, L.BID_QTY], views[:, 0, L.ASK_QTY]
    with np.errstate(invalid="ignore", divide="ignore"):
        imbalance = np.where(qb + qa > 0, (qb - qa) / (qb + qa), 0.0)
    out = np.empty_like(imbalance)
    s = 0.0
    for i, x in enumerate(imbalance):
        s = alpha * x + (1.0 - alpha) * s
        out[i] = s
    return out


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_kernel_equals_naive_numpy(registry, asset, alpha):
    res = replay_component(registry.get("signal", NAME), {"alpha": alpha}, [asset], keep_view=True)
    want = naive(res.views, alpha)
    assert len(want) > 1000 and np.std(want) > 0  # a comparison that means something
    np.testing.assert_allclose(res.values, want, rtol=1e-12, atol=1e-15)


def test_python_function_agrees_with_kernel(registry, asset):
    res = check_signal(registry, NAME, [asset], {"alpha": 0.2})
    assert res.steps > 1000
    assert res.first_difference is None, res.first_difference
'''

STRATEGY = """\
# The seed market maker with $name added as a second forecast term. Run it on the shared Binance data:
#   quotelab convert --format binance-usdm --symbol BTCUSDT --catalog catalog btcusdt_20240808.gz
#   quotelab run strategy.yaml --catalog catalog
# kind: py:$name runs the plain Python version instead of the kernel (same fills, slower).
name: ${name}_strategy
data:
  catalog: catalog
  quote: perp
  assets:
    perp: {venue: binance-usdm, symbol: BTCUSDT, dates: [20240808]}
engine:
  step: 100ms
  defaults:
    latency: {entry: 10ms, response: 10ms}
    fees: {maker: -0.00005, taker: 0.0007}
fair_value:
  - kind: mid
forecast:
  - kind: book_imbalance
    alpha: 2ticks
  - kind: $name
    alpha: 2ticks
    params: {alpha: 0.1}
risk:
  - kind: inventory_skew
    params: {risk_aversion: 0.5, position_unit: 0.01, volatility: 10ticks}
quoter:
  kind: fixed_spread
  params: {half_spread: 2ticks, size: 0.01, max_position: 0.1}
"""
