"""Fuse the kernels a strategy names into one compiled strategy kernel (:mod:`quotelab.strategy.codegen` writes
it)."""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import numpy as np

from quotelab.component import Alpha, PackContext
from quotelab.strategy.codegen import Blend, Part, load_module, pack, strategy_source
from quotelab.strategy.config import ValidatedPart, fmt_path, parse_alpha


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


def part_of(vp: ValidatedPart, tick: float) -> Part:
    """A validated part of a YAML as the codegen's part (a signal's alpha in prices of ``tick``)."""
    alpha = parse_alpha(vp.spec.alpha, tick) if vp.role == "signal" else Alpha()
    return Part(vp.component, vp.params, fmt_path(vp.at), weight=vp.spec.weight, alpha=alpha)


def compose(
    fair_values: list[Part], signals: list[Part], risks: list[Part], quoter: Part | None, ctx: PackContext,
    boundscheck: bool = False,
) -> Composition:
    """Pack params and state, generate (or reuse) the fused module and return its compiled kernel.

    Without a ``quoter`` the kernel stops at the reservation price (feature recording, studies).
    ``boundscheck`` builds the checked variant (see :func:`quotelab.strategy.codegen.strategy_source`); its source
    differs, so it is a module of its own and never served from the unchecked one's cache."""
    blend = Blend(tuple(fair_values), tuple(signals), tuple(risks))
    header = blend.header(ctx.asset_index["quoted"], "fair_value")
    parts = [*blend.parts, *([quoter] if quoter is not None else [])]
    packed, states = pack(parts, ctx)
    params = np.concatenate([np.asarray(header, dtype=np.float64), *packed])
    state = np.concatenate([np.zeros(0), *states, [np.nan] if boundscheck else []])
    source = strategy_source(blend, quoter, [len(x) for x in packed], [len(s) for s in states], boundscheck)
    module = load_module(source, parts, ["quotelab.strategy.parts"])
    names = tuple(f"{p.where} ({p.component.role} {p.component.name!r})" for p in parts)
    return Composition(module.strategy, params, state, names, module.__name__, source, tuple(parts), boundscheck)
