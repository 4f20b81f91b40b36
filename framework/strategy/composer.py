"""Fuse the kernels a strategy names into one compiled strategy kernel.

The composer writes Python source into a real module file under the cache folder and imports it.
Two facts from DESIGN.md decide this: inlined kernels run at hand-written speed (a plain call is
17-23x slower), and only source in a real file is disk-cached by numba across processes. The
module's name hashes the generated source, the source of every plugin module it imports, and the
numba and quotelab versions, so an edited plugin never gets a stale kernel.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import njit, types
from numba.typed import List

from quotelab import __version__
from quotelab import layout as L
from quotelab.component import Alpha, Component, PackContext, Params
from quotelab.errors import ConfigError

STRATEGY_SIG = types.float64(
    types.float64[:, ::1], types.float64[:, :, ::1], types.float64[::1], types.float64[::1], types.float64[::1]
)
STRATEGY_TYPE = types.FunctionType(STRATEGY_SIG)


@njit(types.ListType(STRATEGY_TYPE)(STRATEGY_TYPE), cache=True)
def _kernel_list_nb(kernel):
    fns = List.empty_list(STRATEGY_TYPE)
    fns.append(kernel)
    return fns


def kernel_list(kernel: Any) -> List:
    """``kernel`` (compiled to STRATEGY_SIG if it is not yet) as the one element of a typed list of
    function pointers. A loop that takes this instead of the dispatcher is compiled once for every
    kernel, and can be cached on disk: a dispatcher argument is a new type per kernel and process.

    The list is built by a compiled function whose argument is declared a function pointer, so the
    kernel is converted as it is passed in. ``List.append(kernel)`` from Python compiled the append
    anew for every kernel (0.25-0.9 s a process). The pointer keeps the kernel's own entry point,
    so an exception raised in the kernel still reaches the caller."""
    return _kernel_list_nb(kernel)


HEADER_PER_SIGNAL = 4  # alpha in price units, in bps of the fair value, in spreads; the quoted asset's index


def signal_header(alpha: Alpha, quoted: int) -> list[float]:
    """A signal's runtime header, read by :func:`forecast_term`."""
    return [alpha.price, alpha.bps, alpha.spreads, float(quoted)]


def forecast_term(j: int) -> str:
    """Source adding signal value ``v`` times its alpha (header at ``params[j]``) to ``fc``.

    The spread term is guarded: a quoted book with one side missing must not turn a price-only alpha into NaN."""
    return (f"    fc += v * (params[{j}] + params[{j + 1}] * fv * 1e-4)\n"
            f"    if params[{j + 2}] != 0.0:\n"
            f"        sq = int(params[{j + 3}])\n"
            f"        fc += v * params[{j + 2}] * (view[sq, {L.BEST_ASK}] - view[sq, {L.BEST_BID}])")


@dataclass(frozen=True)
class Part:
    """One configured use of a component in a strategy."""

    component: Component
    params: Params
    where: str  # config path, e.g. "forecast[1]"
    weight: float = 1.0  # fair-value weight
    alpha: Alpha = Alpha()  # signals: the multiplier of the value in the forecast


@dataclass(frozen=True)
class Composition:
    """A compiled strategy and the runtime arrays it reads."""

    kernel: object  # numba dispatcher with STRATEGY_SIG
    params: np.ndarray
    state: np.ndarray
    names: tuple[str, ...]  # component index → "where kind"
    module: str
    source: str
    parts: tuple[Part, ...] = ()
    boundscheck: bool = False

    def failed_part(self, exc: BaseException, state: np.ndarray) -> Part | None:
        """The part whose kernel raised ``exc`` while running on ``state``: in the checked build, the one
        marked running; else the one whose kernel is the deepest frame of the traceback, if any."""
        if self.boundscheck and len(state) and np.isfinite(state[-1]):
            return self.parts[int(state[-1])]
        frames = [(f.filename, f.name) for f in traceback.extract_tb(exc.__traceback__)]
        for filename, name in reversed(frames):
            for part in self.parts:
                code = getattr(getattr(part.component.kernel, "py_func", None), "__code__", None)
                if code is not None and (code.co_filename, code.co_name) == (filename, name):
                    return part
        return None


def objmode_call(alias: str, where: str, state: str, params: str, indent: str = "    ") -> list[str]:
    """Source lines that set ``v`` to the Python signal ``alias``'s value from inside a kernel (see
    :func:`quotelab.pysignal.call`)."""
    return [
        f'{indent}with numba.objmode(v="float64"):',
        f"{indent}    v = _pycall({alias}, {where!r}, view, trades, {state}, {params})",
    ]


OBJMODE_IMPORTS = ["import numba", "from quotelab.pysignal import call as _pycall"]


def cache_dir() -> Path:
    return Path(os.environ.get("QUOTELAB_CACHE", Path.home() / ".cache" / "quotelab"))


def _module_source(modname: str) -> str:
    mod = importlib.import_module(modname)
    try:
        return inspect.getsource(mod)
    except (OSError, TypeError):
        return modname


def kernel_imports(parts: list[Part]) -> tuple[list[str], dict[int, str]]:
    """The import lines of the parts' kernels, and for each part the alias its kernel is called by."""
    lines, alias = [], {}
    seen: dict[tuple[str, str], str] = {}
    for i, part in enumerate(parts):
        ref = part.component.kernel_ref
        if ref not in seen:
            seen[ref] = f"k{len(seen)}"
            lines.append(f"from {ref[0]} import {ref[1]} as {seen[ref]}")
        alias[i] = seen[ref]
    return lines, alias


def generate_source(
    fair_values: list[Part], signals: list[Part], risks: list[Part], quoter: Part, pack_sizes: list[int],
    state_sizes: list[int], boundscheck: bool = False,
) -> str:
    """The strategy kernel's source. Offsets are structural constants; every value is a runtime param.

    ``boundscheck``: compiled with numba's bounds checking (an index outside an array raises IndexError
    instead of reading other memory), and each component's index is stored in the last element of
    ``state`` before it runs, so the one that raised can be named."""
    parts = [*fair_values, *signals, *risks, quoter]
    if len(parts) > L.MAX_COMPONENTS:
        raise ConfigError(f"a strategy may use at most {L.MAX_COMPONENTS} components, got {len(parts)}")
    imports, alias = kernel_imports(parts)
    n_fv, n_sig = len(fair_values), len(signals)
    header = n_fv + HEADER_PER_SIGNAL * n_sig
    p_off, s_off = header, 0
    body = [
        "    out[0] = 0.0",
        f"    out[{L.BID_WIDEN_TICKS}] = 0.0",
        f"    out[{L.ASK_WIDEN_TICKS}] = 0.0",
        f"    out[{L.BID_ENABLED}] = 1.0",
        f"    out[{L.ASK_ENABLED}] = 1.0",
        f"    out[{L.N_BID}] = 0.0",
        f"    out[{L.N_ASK}] = 0.0",
        "    fv = 0.0",
        "    fc = 0.0",
        "    rk = 0.0",
    ]
    python_parts = False
    marker = sum(state_sizes)
    for i in range(len(parts)):
        if boundscheck:
            body.append(f"    state[{marker}] = {i}.0")
        call = (
            f"{alias[i]}(view, trades, state[{s_off}:{s_off + state_sizes[i]}], "
            f"params[{p_off}:{p_off + pack_sizes[i]}], out)"
        )
        if getattr(parts[i].component, "func", None) is not None:
            # A Python signal (quotelab.pysignal): called back from the one fused kernel, not a second loop.
            python_parts = True
            body += objmode_call(alias[i], parts[i].where, f"state[{s_off}:{s_off + state_sizes[i]}]",
                                 f"params[{p_off}:{p_off + pack_sizes[i]}]")
        else:
            body.append(f"    v = {call}")
        p_off += pack_sizes[i]
        s_off += state_sizes[i]
        body.append(f"    if not np.isfinite(v):\n        out[0] = {i + 1}.0\n        return v")
        body.append(f"    out[{L.COMPONENTS + i}] = v")
        if i < n_fv:
            body.append(f"    fv += params[{i}] * v")
            if i == n_fv - 1:
                body.append(f"    out[{L.FAIR_VALUE}] = fv")
        elif i < n_fv + n_sig:
            j = n_fv + HEADER_PER_SIGNAL * (i - n_fv)
            body.append(forecast_term(j))
        elif i < len(parts) - 1:
            body.append("    rk += v")
        if i == len(parts) - 2:
            body.append(f"    out[{L.FORECAST}] = fc")
            body.append(f"    out[{L.RISK}] = rk")
            body.append(f"    out[{L.RESERVATION}] = fv + fc - rk")
    body.append(f"    return out[{L.RESERVATION}]")
    return "\n".join(
        [
            '"""Generated by quotelab.strategy.composer. Do not edit: the file name is a hash of what it fuses."""',
            "import numpy as np",
            "from numba import njit",
            "from quotelab.strategy.composer import STRATEGY_SIG",
            *(OBJMODE_IMPORTS if python_parts else []),
            *imports,
            "",
            "",
            f"@njit(STRATEGY_SIG, cache=True{', boundscheck=True' if boundscheck else ''})",
            "def strategy(view, trades, state, params, out):",
            *body,
            "",
        ]
    )


def compose(
    fair_values: list[Part], signals: list[Part], risks: list[Part], quoter: Part, ctx: PackContext,
    boundscheck: bool = False,
) -> Composition:
    """Pack params and state, generate (or reuse) the fused module and return its compiled kernel.

    ``boundscheck`` builds the checked variant (see :func:`generate_source`); its source differs, so it
    is a module of its own and never served from the unchecked one's cache."""
    if not fair_values:
        raise ConfigError("fair_value: at least one source is required")
    parts = [*fair_values, *signals, *risks, quoter]
    packed = [np.asarray(p.component.pack(p.params, ctx), dtype=np.float64) for p in parts]
    states = [np.asarray(p.component.state(p.params), dtype=np.float64) for p in parts]
    total_w = sum(p.weight for p in fair_values)
    if not total_w > 0:
        raise ConfigError("fair_value: weights must sum to a positive number")
    header = [p.weight / total_w for p in fair_values]
    for p in signals:
        header += signal_header(p.alpha, ctx.asset_index["quoted"])
    params = np.concatenate([np.asarray(header, dtype=np.float64), *packed]) if parts else np.zeros(0)
    state = np.concatenate([np.zeros(0), *states, [np.nan] if boundscheck else []])
    source = generate_source(fair_values, signals, risks, quoter, [len(x) for x in packed], [len(s) for s in states],
                             boundscheck)
    module = load_module(source, sorted({p.component.kernel_ref[0] for p in parts}))
    names = tuple(f"{p.where} ({p.component.role} {p.component.name!r})" for p in parts)
    return Composition(module.strategy, params, state, names, module.__name__, source, tuple(parts), boundscheck)


def kernel_modules(modules: list[str]) -> list[str]:
    """``modules`` and, recursively, every module whose numba functions or constants they import.

    numba's disk cache does not notice an edit in another file, so the key must cover all of them
    (a helper kernel in ``quotelab.kernels``, the layout constants, ...)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or name not in sys.modules and importlib.util.find_spec(name) is None:
            continue
        seen.add(name)
        mod = importlib.import_module(name)
        for value in vars(mod).values():
            owner = getattr(getattr(value, "py_func", None), "__module__", None)
            if owner is None and inspect.ismodule(value):
                owner = value.__name__
            if owner and owner not in seen and _is_project_module(owner):
                todo.append(owner)
    return sorted(seen)


def _is_project_module(name: str) -> bool:
    # numba, numpy and the standard library change only with their versions, which the key holds.
    top = name.split(".")[0]
    return top not in {"numba", "numpy", "llvmlite", "builtins", "math", "cmath", "hftbacktest"} and \
        top not in sys.stdlib_module_names


def load_module(source: str, plugin_modules: list[str]):
    """Import generated kernel ``source`` as a real module file, so numba's disk cache can hit across processes.

    The file name hashes the source with every plugin kernel module it inlines and the versions that
    change code generation, since numba checks a cached function only against its own file.
    """
    h = hashlib.sha256()
    h.update(source.encode())
    for m in kernel_modules(plugin_modules):
        h.update(m.encode())
        h.update(_module_source(m).encode())
        # Params offsets (quotelab.component.param_offsets) are computed, not written in the source: a
        # field added to a shared base model moves them without editing this module.
        for value in vars(sys.modules[m]).values():
            if isinstance(value, tuple) and hasattr(value, "_fields"):
                h.update(repr(value).encode())
    h.update(f"numba={numba.__version__} quotelab={__version__} layout={_module_source('quotelab.layout')}".encode())
    name = f"k_{h.hexdigest()[:20]}"
    if name in sys.modules:
        return sys.modules[name]
    folder = cache_dir() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    return importlib.import_module(name)
