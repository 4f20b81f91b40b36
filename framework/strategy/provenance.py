"""What a trained model was fitted on, and the checks that keep its own training days from passing as
out-of-sample.

``quotelab train`` writes a provenance block into ``model.json`` and into the exported
``linear_forecast`` params: the assets (venue, symbol, days), the grid step, the horizon and a hash of
the training samples. ``run``, ``evaluate`` and ``train`` (applying ``model: {file}``) then refuse a
different grid step, and label every result computed on one of the model's training days as in-sample
(``in_sample`` in the summary, a warning on stderr), or refuse it with ``--strict``.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from quotelab import spool
from quotelab.errors import ConfigError


def training_provenance(assets: dict[str, Any], step_s: float, horizon_s: float, X: np.ndarray,
                        y: np.ndarray) -> dict[str, Any]:
    """The block written next to a fitted model; ``assets`` maps names to AssetData."""
    h = hashlib.sha256()
    for a in (X, y):  # a chunk of rows at a time: the digest of the whole bytes, not a copy of them
        for lo, hi in spool.chunks(len(a)):
            h.update(np.ascontiguousarray(a[lo:hi], dtype=np.float64).tobytes())
    return {
        "assets": {name: {"venue": a.venue, "symbol": a.symbol, "dates": list(a.dates or [])}
                   for name, a in assets.items()},
        "step_s": float(step_s), "horizon_s": float(horizon_s), "samples": int(len(y)),
        "data_sha256": h.hexdigest()[:16],
    }


def overlap(prov: dict[str, Any], assets: dict[str, Any]) -> list[str]:
    """The (venue, symbol, day)s of ``assets`` (name → AssetData) that the model was trained on."""
    trained = {(a.get("venue"), a.get("symbol"), d) for a in (prov.get("assets") or {}).values()
               for d in a.get("dates") or []}
    found = []
    for name, a in assets.items():
        for d in a.dates or []:
            if (a.venue, a.symbol, d) in trained:
                found.append(f"{name} {a.venue}/{a.symbol} {d}")
    return found


def check(prov: dict[str, Any] | None, step_s: float, assets: dict[str, Any], where: str, what: str,
          strict: bool) -> list[str]:
    """Refuse a different step; return the in-sample days (refused with ``strict``)."""
    if not prov:
        return []
    trained_step = prov.get("step_s")
    if trained_step is not None and abs(float(trained_step) - step_s) > 1e-12:
        raise ConfigError(f"{where}: {what} was trained on a {trained_step:g} s grid, this run steps {step_s:g} s; "
                          f"fix: set the step to {trained_step:g} s or retrain on this grid")
    days = overlap(prov, assets)
    if days and strict:
        raise ConfigError(f"{where}: {what} was trained on {', '.join(days)}: results there are in-sample "
                          f"(--strict refuses them); fix: run on other days or retrain without them")
    return days


def warn(days: Iterable[str], what: str) -> None:
    days = list(days)
    if days:
        print(f"warning: in-sample: {what} was trained on {', '.join(days)}; its results there are in-sample, "
              "not out-of-sample", file=sys.stderr)


def strategy_in_sample(loaded: Any, parts: list, strict: bool) -> list[str]:
    """Check every part of a validated strategy that carries a ``provenance`` param."""
    cfg = loaded.config
    found: list[str] = []
    for part in parts:
        prov = getattr(part.params, "provenance", None)
        if prov:
            where = f"{loaded.file}: {'.'.join(map(str, part.at))}.params.provenance"
            days = check(prov, cfg.engine.step, cfg.data.assets, where, "the model", strict)
            found += [d for d in days if d not in found]
    warn(found, "the model of this strategy")
    return found
