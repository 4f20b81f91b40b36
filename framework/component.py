"""What a plugin registers: a component (a pricing part), its params model and its kernel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args, get_origin

import numpy as np

from quotelab.errors import ConfigError, PluginError
from quotelab.units import DomainModel

Role = Literal["fair_value", "signal", "risk", "quoter"]
ROLES: tuple[str, ...] = ("fair_value", "signal", "risk", "quoter")


class AssetName(str):
    """Marks a params field as naming an asset of the strategy's ``data.assets``."""


Asset = Annotated[str, AssetName]


class Params(DomainModel):
    """Base of every component's params: frozen, unknown keys rejected, every number finite and bounded."""


@dataclass(frozen=True)
class Reads:
    """What a component reads, so the engine fills only that and checks the data exists."""

    assets: tuple[str, ...] = ()
    depth_levels: int = 1
    trades: bool = False
    # Other components whose outputs it reads, by composed index (fair values, then forecasts,
    # then risks, from 0): each must run before it. With ``component_kinds``, the kind each must be.
    components: tuple[int, ...] = ()
    component_kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class PackContext:
    """What packing needs beyond params: asset indices, each asset's instrument, the grid origin
    (``view[:, TIME]`` counts seconds from it) and the folder relative paths in params start from."""

    asset_index: dict[str, int]
    tick_size: dict[str, float]
    lot_size: dict[str, float]
    quoted: str
    origin_ns: int = 0
    base_dir: str = "."
    funding: dict[str, Any] = field(default_factory=dict)  # asset name -> its catalog funding rows, if any

    @classmethod
    def of(cls, assets: Sequence[Any], quoted: int, origin_ns: int = 0, base_dir: str = ".") -> PackContext:
        """From assets with ``name``, ``tick_size`` and ``lot_size`` (engine feeds or replay assets)."""
        return cls(
            asset_index={a.name: i for i, a in enumerate(assets)} | {"quoted": quoted},
            tick_size={a.name: a.tick_size for a in assets}, lot_size={a.name: a.lot_size for a in assets},
            quoted=assets[quoted].name, origin_ns=int(origin_ns), base_dir=str(base_dir),
            funding={a.name: getattr(a, "funding", None) for a in assets},
        )


def _is_asset_field(annotation: Any) -> bool:
    return get_origin(annotation) is Annotated and AssetName in get_args(annotation)[1:]


def default_pack(params: Params, ctx: PackContext) -> list[float]:
    """Numeric fields in declaration order; asset names become indices; bools 0/1."""
    values: list[float] = []
    for name, info in type(params).model_fields.items():
        value = getattr(params, name)
        if _is_asset_field(info.annotation) or info.metadata and AssetName in info.metadata:
            values.append(float(ctx.asset_index[value]))
        elif isinstance(value, bool | int | float):
            values.append(float(value))
        elif isinstance(value, Sequence) and not isinstance(value, str):
            values.extend(float(v) for v in value)
    return values


def asset_fields(params: Params) -> tuple[str, ...]:
    """The asset names a params instance refers to."""
    out = []
    for name, info in type(params).model_fields.items():
        if _is_asset_field(info.annotation) or info.metadata and AssetName in info.metadata:
            out.append(getattr(params, name))
    return tuple(out)


@dataclass(frozen=True)
class Component:
    """A pricing part.

    ``kernel`` is an ``@njit(inline="always")`` function with the signature in
    :mod:`quotelab.layout`. It must be defined at module level in an importable module, because
    the composer imports it by name into generated, disk-cached source.
    """

    role: Role
    name: str
    params: type[Params]
    kernel: Any
    doc: str = ""
    pack: Callable[[Params, PackContext], Sequence[float]] = default_pack
    state: Callable[[Params], np.ndarray] = field(default=lambda p: np.zeros(0))
    reads: Callable[[Params], Reads] = field(default=lambda p: Reads(assets=asset_fields(p)))
    formula: str = ""
    # filled in by the registry
    source: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise PluginError(f"component {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if not (isinstance(self.params, type) and issubclass(self.params, Params)):
            raise PluginError(f"component {self.name!r}: params must be a subclass of quotelab.component.Params")
        if not self.params.model_config.get("frozen"):
            raise PluginError(f"component {self.name!r}: params model must be frozen")
        py = getattr(self.kernel, "py_func", None)
        if py is None:
            raise PluginError(f"component {self.name!r}: kernel must be a numba @njit function")
        if getattr(self.kernel, "targetoptions", {}).get("inline") != "always":
            raise PluginError(
                f"component {self.name!r}: kernel {py.__qualname__} must be declared @njit(inline='always') "
                f"so the composer can fuse it (a call per step that is not inlined costs 17-23x)"
            )
        if "<locals>" in py.__qualname__:
            raise PluginError(f"component {self.name!r}: kernel must be defined at module level")

    @property
    def kernel_ref(self) -> tuple[str, str]:
        py = self.kernel.py_func
        return py.__module__, py.__name__

    def make_params(self, raw: dict[str, Any]) -> Params:
        try:
            return self.params(**raw)
        except TypeError as exc:  # pragma: no cover - pydantic raises ValidationError for bad input
            raise ConfigError(str(exc)) from exc
