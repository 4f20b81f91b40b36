"""Generate fused kernels as Python source, and import that source as a disk-cached module.

Three kernels are generated, all with the driver's one signature (:data:`STRATEGY_SIG`):

* a strategy: a :class:`Blend` (weighted fair values + signals times their alpha - risks) into the
  reservation price, then the quoter, if there is one;
* an evaluation bank: probes of the quoted book, then several blends side by side, each into its own
  ``out`` slots;
* a check-plugin twin: a kernel and its Python version on separate state.

Each part's kernel is inlined and reads its own slices of ``state`` and ``params``. Two facts from
DESIGN.md decide the form: inlined kernels run at hand-written speed (a plain call is 17-23x slower),
and only source in a real module file is disk-cached by numba across processes. A strategy's parts are
each compiled in a module of their own (:func:`part_source`), which the strategy calls and LLVM inlines,
so a new strategy compiles only those calls; banks and twins inline the kernels themselves. A module's
name hashes the generated source, the source of every plugin module it imports, and the numba and
quotelab versions, so an edited plugin never gets a stale kernel.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numba
import numpy as np
from numba import njit, types
from numba.core.errors import NumbaError
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

# The bank's out slots: probes of the quoted book, then per estimator j its value and its forecast term.
PROBE_MID = L.QUOTES
PROBE_SPREAD = L.QUOTES + 1
PROBE_IMBALANCE = L.QUOTES + 2
EST_BASE = L.QUOTES + 3  # estimate j at EST_BASE + 2j, its forecast term at EST_BASE + 2j + 1
MAX_ESTIMATORS = (L.COMPONENTS - EST_BASE) // 2


@dataclass(frozen=True)
class Part:
    """One configured use of a component in a generated kernel."""

    component: Component
    params: Params
    where: str  # config path, e.g. "forecast[1]"
    weight: float = 1.0  # fair-value weight
    alpha: Alpha = Alpha()  # signals: the multiplier of the value in the forecast


@dataclass(frozen=True)
class Blend:
    """Weighted fair values, plus each signal's value times its alpha, minus the risks: a strategy's
    reservation price, and each estimator of an evaluation bank (which has no risks)."""

    fair_values: tuple[Part, ...]
    signals: tuple[Part, ...] = ()
    risks: tuple[Part, ...] = ()

    @property
    def parts(self) -> tuple[Part, ...]:
        return (*self.fair_values, *self.signals, *self.risks)

    @property
    def header_size(self) -> int:
        return len(self.fair_values) + HEADER_PER_SIGNAL * len(self.signals)

    def header(self, quoted: int, what: str) -> list[float]:
        """The runtime params read before the parts' own: the fair-value weights normalised, then each
        signal's alpha (read by :meth:`term`). ``what`` names the blend in errors."""
        if not self.fair_values:
            raise ConfigError(f"{what}: at least one source is required")
        total = sum(p.weight for p in self.fair_values)
        if not total > 0:
            raise ConfigError(f"{what}: weights must sum to a positive number")
        out = [p.weight / total for p in self.fair_values]
        for p in self.signals:
            out += [p.alpha.price, p.alpha.bps, p.alpha.spreads, float(quoted)]
        return out

    def term(self, i: int, at: int) -> str:
        """Source adding part ``i``'s value ``v`` to the blend (its header at ``params[at]``).

        A signal's spread term is guarded: a quoted book with one side missing must not turn a price-only
        alpha into NaN."""
        n_fv = len(self.fair_values)
        if i < n_fv:
            return f"    fv += params[{at + i}] * v"
        if i < n_fv + len(self.signals):
            j = at + n_fv + HEADER_PER_SIGNAL * (i - n_fv)
            return (f"    fc += v * (params[{j}] + params[{j + 1}] * fv * 1e-4)\n"
                    f"    if params[{j + 2}] != 0.0:\n"
                    f"        sq = int(params[{j + 3}])\n"
                    f"        fc += v * params[{j + 2}] * (view[sq, {L.BEST_ASK}] - view[sq, {L.BEST_BID}])")
        return "    rk += v"


def pack(parts: Sequence[Part], ctx: PackContext) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each part's packed params and initial state."""
    return ([np.asarray(p.component.pack(p.params, ctx), dtype=np.float64) for p in parts],
            [np.asarray(p.component.state(p.params), dtype=np.float64) for p in parts])


class _Calls:
    """The calls of ``parts``' kernels, in the order their params and state are packed, each on its own
    slices; a Python signal (:mod:`quotelab.pysignal`) is called back from the kernel through objmode."""

    def __init__(self, parts: Sequence[Part], pack_sizes: Sequence[int], state_sizes: Sequence[int],
                 params_at: int = 0) -> None:
        self.parts, self.pack_sizes, self.state_sizes = parts, pack_sizes, state_sizes
        self.p, self.s, self.k = params_at, 0, 0
        self.imports: list[str] = []
        self.alias: list[str] = []
        seen: dict[tuple[str, str], str] = {}
        for part in parts:
            ref = part.component.kernel_ref
            if ref not in seen:
                seen[ref] = f"k{len(seen)}"
                self.imports.append(f"from {ref[0]} import {ref[1]} as {seen[ref]}")
            self.alias.append(seen[ref])
        self.python = any(getattr(p.component, "func", None) is not None for p in parts)

    def header(self, n: int) -> int:
        """Reserve ``n`` params before the next part's; return where they start."""
        at = self.p
        self.p += n
        return at

    def call(self) -> list[str]:
        """Source setting ``v`` to the next part's value."""
        k = self.k
        state = f"state[{self.s}:{self.s + self.state_sizes[k]}]"
        params = f"params[{self.p}:{self.p + self.pack_sizes[k]}]"
        self.p += self.pack_sizes[k]
        self.s += self.state_sizes[k]
        self.k += 1
        if self.python and getattr(self.parts[k].component, "func", None) is not None:
            return ['    with numba.objmode(v="float64"):',
                    f"        v = _pycall({self.alias[k]}, {self.parts[k].where!r}, view, trades, {state}, {params})"]
        return [f"    v = {self.alias[k]}(view, trades, {state}, {params}, out)"]

    def module(self, generator: str, body: list[str], boundscheck: bool = False) -> str:
        return "\n".join([
            f'"""Generated by {generator}. Do not edit: the file name is a hash of what it fuses."""',
            "import numpy as np",
            "from numba import njit",
            "from quotelab.strategy.codegen import STRATEGY_SIG",
            *(["import numba", "from quotelab.pysignal import call as _pycall"] if self.python else []),
            *self.imports,
            "",
            "",
            f"@njit(STRATEGY_SIG, cache=True{', boundscheck=True' if boundscheck else ''})",
            "def strategy(view, trades, state, params, out):",
            *body,
            "",
        ])


ROLE_STEPS = {"fair_value": "fair_value_nb", "signal": "signal_nb", "risk": "risk_nb", "quoter": "quoter_nb"}


def part_source(part: Part, role: str, boundscheck: bool = False, nrt: bool = False) -> str:
    """A module wrapping ``part``'s kernel in a function with :data:`quotelab.strategy.parts.PART_SIG` that
    runs the kernel on its slices and its ``role``'s step (:mod:`quotelab.strategy.parts`) on the value. It
    holds nothing of a strategy's layout (offsets are arguments), so one compile serves every strategy.

    It is called from compiled code only, so it has no Python or C entry points, and ``forceinline`` makes
    LLVM inline it into the strategy kernel, as numba's ``inline="always"`` would have (LLVM's own cost
    model left most calls in place). Without ``nrt`` it leaves out numba's reference counting, which a
    kernel that only reads and writes the arrays it is given does not need: the increments and decrements
    of every array at every call, which LLVM cannot remove, made the demo strategy's kernel 80 ns a step
    when fused into one function; without them it takes 21 ns. ``boundscheck``: compiled with bounds
    checking, and the part's index stored in the last element of ``state`` before the kernel runs, so the
    one that raised can be named."""
    mod, fn = part.component.kernel_ref
    flags = "".join([", forceinline=True, no_cpython_wrapper=True, no_cfunc_wrapper=True",
                     "" if nrt else ", _nrt=False", ", boundscheck=True" if boundscheck else ""])
    return "\n".join([
        f'"""Generated by quotelab.strategy.codegen (a {role} part). Do not edit: the file name is a hash of '
        'what it wraps."""',
        "from numba import njit",
        f"from quotelab.strategy.parts import PART_SIG, {ROLE_STEPS[role]} as step_nb",
        f"from {mod} import {fn} as kernel_nb",
        "",
        "",
        f"@njit(PART_SIG, cache=True{flags})",
        "def part(view, trades, state, params, out, i, s0, s1, p0, p1, h):",
        *(["    state[len(state) - 1] = i"] if boundscheck else []),
        "    v = kernel_nb(view, trades, state[s0:s1], params[p0:p1], out)",
        "    step_nb(view, params, out, v, i, h)",
        "    return v",
        "",
    ])


def part_module(part: Part, role: str, boundscheck: bool = False) -> str:
    """The name of ``part``'s compiled module (:func:`part_source`), compiled or loaded from the disk cache.

    A kernel that needs reference counting (it allocates an array, ...) fails to compile without it, and
    is compiled with it; that module's file then tells later calls and processes to go straight to it. A
    kernel that does not compile at all raises its error from there."""
    imports = [part], ["quotelab.strategy.parts"]
    counted = part_source(part, role, boundscheck, nrt=True)
    if not (cache_dir() / "kernels" / f"{module_name(counted, *imports)}.py").exists():
        try:
            return load_module(part_source(part, role, boundscheck), *imports).__name__
        except NumbaError:
            pass
    return load_module(counted, *imports).__name__


def strategy_source(blend: Blend, quoter: Part | None, pack_sizes: Sequence[int], state_sizes: Sequence[int],
                    boundscheck: bool = False) -> str:
    """The strategy kernel: ``blend`` into ``out``'s reservation, then ``quoter``; it returns the reservation.
    A part's non-finite value stops the step, with its index + 1 in ``out[0]``, and is returned. Params: the
    blend's header, then each part's packed params. Offsets are structural constants; every value is a
    runtime param.

    Each kernel part is a call of its own compiled module (:func:`part_module`: compiled, or loaded from the
    disk cache, here), which LLVM inlines. Compiling a new strategy then types and lowers only these calls
    (~0.2 s of CPU, where typing and lowering one function with every kernel inlined by numba took ~1.1 s),
    and a kind of part is compiled once per process and cache, whatever strategies use it. A Python signal
    is called through objmode here, with its role's step.

    ``boundscheck``: every part compiled with numba's bounds checking (an index outside an array raises
    IndexError instead of reading other memory), and each part's index is stored in the last element of
    ``state`` before it runs, so the one that raised can be named."""
    parts = [*blend.parts, *([quoter] if quoter is not None else [])]
    if len(parts) > L.MAX_COMPONENTS:
        raise ConfigError(f"a strategy may use at most {L.MAX_COMPONENTS} components, got {len(parts)}")
    n_fv, n_sig = len(blend.fair_values), len(blend.signals)
    imports: dict[str, str] = {}  # import line -> alias
    python = any(getattr(part.component, "func", None) is not None for part in parts)
    body = ["    begin_nb(out)"]
    p, s = blend.header_size, 0
    for i, part in enumerate(parts):
        if i == len(blend.parts):
            body.append("    reservation_nb(out)")
        role = ("fair_value" if i < n_fv else "signal" if i < n_fv + n_sig else "risk" if i < len(blend.parts)
                else "quoter")
        h = i if i < n_fv else n_fv + HEADER_PER_SIGNAL * (i - n_fv) if i < n_fv + n_sig else 0
        s1, p1 = s + state_sizes[i], p + pack_sizes[i]
        if getattr(part.component, "func", None) is not None:
            mod, fn = part.component.kernel_ref
            alias = imports.setdefault(f"from {mod} import {fn} as {{}}", f"f{len(imports)}")
            imports.setdefault(f"from quotelab.strategy.parts import {ROLE_STEPS[role]}", "")
            body += [*([f"    state[{sum(state_sizes)}] = {i}.0"] if boundscheck else []),
                     '    with numba.objmode(v="float64"):',
                     f"        v = _pycall({alias}, {part.where!r}, view, trades, state[{s}:{s1}], params[{p}:{p1}])",
                     f"    {ROLE_STEPS[role]}(view, params, out, v, {i}, {h})"]
        else:
            alias = imports.setdefault(f"from {part_module(part, role, boundscheck)} import part as {{}}",
                                       f"k{len(imports)}")
            body.append(f"    v = {alias}(view, trades, state, params, out, {i}, {s}, {s1}, {p}, {p1}, {h})")
        body.append("    if out[0] != 0.0:\n        return v")
        s, p = s1, p1
    if quoter is None:
        body.append("    reservation_nb(out)")
    body.append(f"    return out[{L.RESERVATION}]")
    # objmode needs numba's reference counting; the parts' calls do not (see part_source)
    flags = "".join(["" if python else ", _nrt=False", ", boundscheck=True" if boundscheck else ""])
    return "\n".join([
        '"""Generated by quotelab.strategy.codegen (a strategy). Do not edit: the file name is a hash of what it '
        'fuses."""',
        "from numba import njit",
        "from quotelab.strategy.codegen import STRATEGY_SIG",
        "from quotelab.strategy.parts import begin_nb, reservation_nb",
        *(["import numba", "from quotelab.pysignal import call as _pycall"] if python else []),
        *(line.format(alias) for line, alias in imports.items()),
        "",
        "",
        f"@njit(STRATEGY_SIG, cache=True{flags})",
        "def strategy(view, trades, state, params, out):",
        *body,
        "",
    ])


def bank_source(blends: Sequence[Blend], pack_sizes: Sequence[int], state_sizes: Sequence[int]) -> str:
    """The evaluation bank: probes of the quoted book (``params[0]``), then each blend into
    ``out[EST_BASE + 2j]`` (its value) and ``out[EST_BASE + 2j + 1]`` (its forecast term), NaN where one
    of its parts is not finite. Params: the quoted index, then per blend its header and its parts'."""
    if any(b.risks for b in blends):
        raise ValueError("an estimator blends fair values and signals only")
    if len(blends) > MAX_ESTIMATORS:
        raise ConfigError(f"at most {MAX_ESTIMATORS} estimators, got {len(blends)}")
    calls = _Calls([p for b in blends for p in b.parts], pack_sizes, state_sizes, params_at=1)
    body = [
        "    q = int(params[0])",
        f"    bb = view[q, {L.BEST_BID}]",
        f"    ba = view[q, {L.BEST_ASK}]",
        f"    out[{PROBE_MID}] = (bb + ba) / 2.0",
        f"    out[{PROBE_SPREAD}] = ba - bb",
        f"    qb = view[q, {L.BID_QTY}]",
        f"    qa = view[q, {L.ASK_QTY}]",
        f"    out[{PROBE_IMBALANCE}] = (qb - qa) / (qb + qa) if qb + qa > 0.0 else 0.0",
    ]
    for j, blend in enumerate(blends):
        at = calls.header(blend.header_size)
        body += ["    fv = 0.0", "    fc = 0.0", "    ok = True"]
        for i in range(len(blend.parts)):
            body += calls.call()
            body.append("    if not np.isfinite(v):\n        ok = False")
            body.append(f"    out[{L.COMPONENTS + i}] = v")
            body.append(blend.term(i, at))
        body.append(f"    out[{EST_BASE + 2 * j}] = fv + fc if ok else np.nan")
        body.append(f"    out[{EST_BASE + 2 * j + 1}] = fc if ok else np.nan")
    body.append("    return 0.0")
    return calls.module("quotelab.strategy.codegen (an estimator bank)", body)


def twin_source(kernel: Part, python: Part, pack_sizes: Sequence[int], state_sizes: Sequence[int]) -> str:
    """A kernel component and its Python twin on separate state, their values in ``out[COMPONENTS]`` and
    ``out[COMPONENTS + 1]``. Bounds checked: a kernel indexing past its state or params raises here
    instead of reading the twin's, which would look like a difference between the two."""
    calls = _Calls([kernel, python], pack_sizes, state_sizes)
    body = [*calls.call(), f"    out[{L.COMPONENTS}] = v", *calls.call(), f"    out[{L.COMPONENTS + 1}] = v",
            "    return v"]
    return calls.module("quotelab.strategy.codegen (a check-plugin twin)", body, boundscheck=True)


# --------------------------------------------------------------------------------------------------
# Generated source as a module numba caches on disk
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("QUOTELAB_CACHE", Path.home() / ".cache" / "quotelab"))


def _module_source(modname: str) -> str:
    mod = importlib.import_module(modname)
    try:
        return inspect.getsource(mod)
    except (OSError, TypeError):
        return modname


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


def load_module(source: str, parts: Sequence[Part], modules: Sequence[str] = ()) -> ModuleType:
    """Import generated kernel ``source`` as a real module file, so numba's disk cache can hit across processes.

    The file name hashes the source with every plugin kernel module of ``parts`` and what those import,
    and the versions that change code generation, since numba checks a cached function only against its
    own file. ``modules``: other modules of numba functions that ``source`` imports.
    """
    name = module_name(source, parts, modules)
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


def module_name(source: str, parts: Sequence[Part], modules: Sequence[str] = ()) -> str:
    """The name :func:`load_module` gives ``source``'s module (see there)."""
    h = hashlib.sha256()
    h.update(source.encode())
    for m in kernel_modules(sorted({p.component.kernel_ref[0] for p in parts} | set(modules))):
        h.update(m.encode())
        h.update(_module_source(m).encode())
        # Params offsets (quotelab.component.param_offsets) are computed, not written in the source: a
        # field added to a shared base model moves them without editing this module.
        for value in vars(sys.modules[m]).values():
            if isinstance(value, tuple) and hasattr(value, "_fields"):
                h.update(repr(value).encode())
    h.update(f"numba={numba.__version__} quotelab={__version__} layout={_module_source('quotelab.layout')}".encode())
    return f"k_{h.hexdigest()[:20]}"
