"""The assets a YAML's ``data`` section names: their events and instruments, as the backtest and the
research tools (replay, evaluate, train) all read them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from quotelab import layout as L
from quotelab.data import catalog as cat
from quotelab.errors import ConfigError, DataError


class Section(Protocol):
    """What :func:`load_assets` reads of a ``data`` section (:class:`quotelab.strategy.config.DataSection`),
    named here, not imported: the data layer sits below the strategy's config."""

    @property
    def assets(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Asset:
    """One asset's events (hftbacktest event_dtype, one or more consecutive arrays) and its instrument.

    ``events`` is a :class:`~quotelab.data.catalog.EventFiles` (read a part file at a time by whoever
    replays it) or arrays held in memory."""

    name: str
    events: Sequence[np.ndarray]
    tick_size: float
    lot_size: float
    contract_size: float = 1.0
    inverse: bool = False
    funding: np.ndarray | None = field(default=None, compare=False)  # quotelab.data.funding rows of its days, if any
    venue: str = ""
    symbol: str = ""

    @property
    def contract(self) -> str:
        return "inverse" if self.inverse else "linear"

    @property
    def n_events(self) -> int:
        if isinstance(self.events, cat.EventFiles):
            return sum(self.events.rows())
        return int(sum(len(e) for e in self.events))

    def first_ts(self) -> int:
        """Where hftbacktest starts this asset's clock: its first exchange or local event."""
        return cat.first_ts(self.events[0])

    def last_ts(self) -> int:
        return cat.last_ts(self.events[-1])


def initial_view(assets: Sequence[Asset]) -> np.ndarray:
    """The kernels' ``view`` (:mod:`quotelab.layout`) before the first step, in the backtest and in a replay
    alike: each asset's instrument, an empty account, no book yet (NaN)."""
    view = np.full((len(assets), L.VIEW_WIDTH), np.nan)
    for i, a in enumerate(assets):
        view[i, L.TICK] = a.tick_size
        view[i, L.LOT] = a.lot_size
        view[i, L.CONTRACT_SIZE] = a.contract_size
        view[i, L.INVERSE] = 1.0 if a.inverse else 0.0
        view[i, [L.POSITION, L.BALANCE, L.FEE, L.NUM_FILLS, L.N_TRADES]] = 0.0
    return view


def resolve_catalog(base_dir: Path, configured: str | None, catalog: str | Path | None) -> Path | None:
    """``--catalog`` wins; else ``data.catalog`` relative to the YAML's folder."""
    if catalog is not None:
        return Path(catalog)
    if configured is not None:
        return (base_dir / configured).resolve()
    return None


def load_assets(
    data: Section,
    base_dir: Path,
    where: Callable[[tuple], str],
    catalog: Path | None,
    preload: bool = False,
) -> list[Asset]:
    """Every asset of a ``data`` section (catalog days or npz files) with its instrument, in its order.

    The events are :class:`~quotelab.data.catalog.EventFiles`, so memory does not grow with the days;
    ``preload`` loads them all instead (the way to compare, or to replay the same short data many
    times from memory). ``where`` turns a path in the YAML into ``file:line path`` for errors.
    """
    assets = []
    for name, a in data.assets.items():
        at = ("data", "assets", name)
        funding = None
        events: Sequence[np.ndarray]
        if a.files is not None:
            for f in a.files:
                if not (base_dir / f).exists():
                    raise DataError(f"{where(at)}: {base_dir / f}: no such file")
            events = cat.EventFiles([p for f in a.files for p in cat.parts_of((base_dir / f).resolve())])
            meta: dict[str, Any] = {}
            venue, symbol = a.venue or "files", a.symbol or name
        else:
            if catalog is None:
                raise ConfigError(
                    f"{where(at)}: a catalog asset needs a catalog: pass --catalog DIR or set data.catalog"
                )
            meta, events = cat.stream_days(catalog, a.venue, a.symbol, a.dates)
            funding = cat.load_funding(catalog, a.venue, a.symbol, a.dates)
            venue, symbol = a.venue, a.symbol
        contract = meta.get("contract", {})
        tick = a.tick_size if a.tick_size is not None else meta.get("tick_size", 0.0)
        lot = a.lot_size if a.lot_size is not None else meta.get("lot_size", 0.0)
        for key, value in (("tick_size", tick), ("lot_size", lot)):
            if not value or value <= 0:
                raise ConfigError(
                    f"{where(at)}: {key} must be > 0 (hftbacktest hangs on 0); set data.assets.{name}.{key}"
                )
        if a.tick_size is not None:  # the catalog's own tick is checked where it is read, naming meta.json
            first = events[0]  # a sample, as the catalog's check: the first file's first and last rows
            if (bad := cat.off_grid(first, float(tick))) is not None:
                raise ConfigError(
                    f"{where((*at, 'tick_size'))}: tick_size {tick} does not fit {venue}/{symbol}: book price "
                    f"{bad[1]} (row {bad[0]}) is not a multiple of it. Fix: set the venue's tick, or leave "
                    f"tick_size out to use the catalog's.")
            del first
        asset = Asset(
            name=name, events=events, tick_size=float(tick), lot_size=float(lot),
            contract_size=float(a.contract_size or contract.get("size", 1.0)),
            inverse=(a.contract or contract.get("kind", "linear")) == "inverse", funding=funding,
            venue=venue, symbol=symbol,
        )
        if not asset.n_events:
            raise DataError(f"{where(at)}: {venue}/{symbol} has no events")
        if preload:
            asset = dataclasses.replace(asset, events=[cat.load_events(p) for p in events.paths])  # type: ignore[attr-defined]
        assets.append(asset)
    return assets
