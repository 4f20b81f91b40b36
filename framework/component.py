"""What a plugin registers: a component (a pricing part), its params model and its kernel."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin

import numpy as np

from quotelab.errors import ConfigError, PluginError
from quotelab.units import DomainModel

Role = Literal["fair_value", "signal", "risk", "quoter"]
ROLES: tuple[str, ...] = ("fair_value", "signal", "risk", "quoter")


class Alpha(NamedTuple):
    """A signal's multiplier: forecast term = value · (price + bps·1e-4·fair value + spreads·spread of the quoted)."""

    price: float = 0.0
    bps: float = 0.0
    spreads: float = 0.0


class AssetName(str):
    """Marks a params field as naming an asset of the strategy's ``data.assets``."""


class PartRef:
    """Marks a params field whose values refer to other parts of the strategy: by their ``name:``, or by
    their composed index (fair values, then forecasts, then risks, from 0). Loading a strategy or an
    evaluation replaces the names by indices, so the pack and the kernel only ever see indices."""


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
    """The packing of a model laid out by :func:`param_offsets` (see :func:`pack_fields`).

    A model never laid out keeps the original rule: numeric fields in declaration order, asset names as
    indices, bools 0/1, sequences spread at their length (what plugins written before offsets expect).
    """
    if layout_of(type(params)) is not None:
        return pack_fields(params, ctx)
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


# --- Params by name -------------------------------------------------------------------------------
# A kernel reads ``params[P.gamma]`` where ``P = param_offsets(TheParams)``: the offsets come from the
# model's fields, so adding a field cannot shift another plugin's reads, and models that share a base
# (the model quoters) share its offsets. ``P`` is a module-level namedtuple of ints, which numba freezes
# into constants: the compiled kernel is the same as with literal indices (same machine code, measured).


@dataclass(frozen=True)
class Width:
    """Marks a sequence field as packed at a fixed width: a count slot ``n_<field>``, then ``size`` values
    padded with ``pad``. Fixed, so changing the sequence's length in a sweep never recompiles."""

    size: int
    pad: float = 0.0


class Encode:
    """Marks a ``Literal`` field's packed value for each choice; without it a choice packs as its position."""

    def __init__(self, **values: float) -> None:
        self.values: dict[str, float] = dict(values)

    def __repr__(self) -> str:
        return f"Encode({self.values!r})"


@dataclass(frozen=True)
class _Slot:
    name: str
    offset: int
    width: int  # -1: the variable-length tail (a derived slot declared with width None)
    kind: str  # value | asset | choice | seq | assets | derived
    encode: Mapping[Any, float] | None = None
    pad: float = 0.0


@dataclass(frozen=True)
class ParamLayout:
    """Where each packed value of a params model sits; built by :func:`param_offsets`."""

    model: type[Params]
    slots: tuple[_Slot, ...]
    offsets: Any  # the namedtuple handed to the kernel

    @property
    def derived(self) -> tuple[_Slot, ...]:
        return tuple(s for s in self.slots if s.kind == "derived")


_LAYOUTS: dict[type, ParamLayout] = {}


def _numeric(t: Any) -> bool:
    return t in (float, int, bool)


def _field_slot(model: type[Params], name: str, info: Any, offset: int) -> _Slot | None:
    ann, meta = info.annotation, list(info.metadata)
    if get_origin(ann) is Annotated:
        meta += list(get_args(ann)[1:])
        ann = get_args(ann)[0]
    is_asset = AssetName in meta
    width = next((m for m in meta if isinstance(m, Width)), None)
    encode = next((m for m in meta if isinstance(m, Encode)), None)
    origin, args = get_origin(ann), get_args(ann)
    if width is not None:
        if origin is not tuple or len(args) != 2 or args[1] is not Ellipsis:
            raise PluginError(f"{model.__name__}.{name}: Width marks a tuple[float, ...] (or tuple[str, ...] of "
                              f"assets) field, not {ann!r}")
        return _Slot(name, offset, width.size, "assets" if is_asset else "seq", pad=width.pad)
    if is_asset:
        return _Slot(name, offset, 1, "asset")
    if origin is Literal:
        if all(isinstance(a, str) for a in args):
            values = encode.values if encode else {a: float(i) for i, a in enumerate(args)}
            missing = [a for a in args if a not in values]
            if missing:
                raise PluginError(f"{model.__name__}.{name}: Encode gives no value for {missing}")
            return _Slot(name, offset, 1, "choice", encode=values)
        return _Slot(name, offset, 1, "value")
    if _numeric(ann):
        return _Slot(name, offset, 1, "value")
    if origin is tuple and args and all(_numeric(a) for a in args if a is not Ellipsis):
        raise PluginError(f"{model.__name__}.{name}: a sequence needs a fixed packed width: declare it "
                          f"Annotated[{ann!r}, Width(n)] (quotelab.component.Width)")
    return None  # strings, paths, optional lists: read by pack functions, not by the kernel


def param_offsets(model: type[Params], **derived: int | None) -> Any:
    """The offsets a kernel reads ``model``'s packed values at, as a namedtuple of ints (``P.gamma``).

    Every numeric, bool, asset and ``Literal`` field gets a slot, in declaration order (a subclass's
    fields after its base's, so a shared base has the same offsets in every plugin that extends it). A
    ``Width``-marked sequence gets ``n_<field>`` (its length) and then its values. ``derived`` names
    values a pack function computes (a table from a file, ...) with their widths, placed after the
    fields; the last may be ``None``: a tail of any length. Pack them with :func:`pack_fields`.
    """
    slots: list[_Slot] = []
    offset = 0
    for name, info in model.model_fields.items():
        slot = _field_slot(model, name, info, offset)
        if slot is None:
            continue
        if slot.kind in ("seq", "assets"):
            slots.append(_Slot("n_" + name, offset, 1, "count"))
            slot = _Slot(name, offset + 1, slot.width, slot.kind, pad=slot.pad)
            offset += 1
        slots.append(slot)
        offset += slot.width
    items = list(derived.items())
    for i, (name, width) in enumerate(items):
        if width is None and i != len(items) - 1:
            raise PluginError(f"{model.__name__}: only the last derived value may have no width ({name!r} has none)")
        slots.append(_Slot(name, offset, -1 if width is None else int(width), "derived"))
        offset += 0 if width is None else int(width)
    names = [s.name for s in slots]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise PluginError(f"{model.__name__}: slot name(s) {sorted(dup)} used twice (a derived value named like a "
                          "field, or a field named n_<sequence>)")
    offsets = namedtuple(f"{model.__name__}Offsets", names)(*(s.offset for s in slots))
    _LAYOUTS[model] = ParamLayout(model, tuple(slots), offsets)
    return offsets


def param_choices(model: type[Params], name: str) -> Any:
    """The packed value of each choice of ``model``'s ``Literal`` field ``name``, as a namedtuple, so a
    kernel compares ``mode == MODE.volume_rate`` rather than ``mode == 4``."""
    slot = _field_slot(model, name, model.model_fields[name], 0)
    if slot is None or slot.kind != "choice" or slot.encode is None:
        raise PluginError(f"{model.__name__}.{name} is not a Literal of strings")
    vals = [int(v) if float(v).is_integer() else v for v in slot.encode.values()]
    return namedtuple(f"{model.__name__}_{name}", list(slot.encode))(*vals)


def layout_of(model: type) -> ParamLayout | None:
    """The layout of ``model``, or of a subclass of a laid-out model (laid out the same way); None if neither."""
    if model in _LAYOUTS:
        return _LAYOUTS[model]
    if any(base in _LAYOUTS for base in model.__mro__[1:]):
        param_offsets(model)
        return _LAYOUTS[model]
    return None


def pack_fields(params: Params, ctx: PackContext, **derived: float | Sequence[float] | np.ndarray) -> list[float]:
    """``params`` packed at the offsets of :func:`param_offsets`, with the derived values it declared."""
    layout = layout_of(type(params))
    if layout is None:
        raise PluginError(f"{type(params).__name__} has no layout: call quotelab.component.param_offsets on it")
    declared = {s.name for s in layout.derived}
    if set(derived) != declared:
        raise PluginError(f"{type(params).__name__}: pack_fields needs exactly the derived values {sorted(declared)}, "
                          f"got {sorted(derived)}")
    out: list[float] = []
    for s in layout.slots:
        if s.kind == "count":
            continue
        value = derived[s.name] if s.kind == "derived" else getattr(params, s.name)
        if s.kind == "asset":
            vals = [float(ctx.asset_index[value])]
        elif s.kind == "choice":
            vals = [float(s.encode[value])]  # type: ignore[index]
        elif s.kind in ("seq", "assets", "derived"):
            seq = [value] if np.ndim(value) == 0 else list(np.ravel(value))
            if any(isinstance(v, str) for v in seq) and s.kind != "assets":
                raise PluginError(f"{type(params).__name__}.{s.name}: {seq!r} holds names that were not resolved; "
                                  "parts are resolved by name when a strategy or evaluation is loaded")
            if s.kind == "assets":
                seq = [ctx.asset_index[v] for v in seq]
            if s.width >= 0 and len(seq) > s.width:
                raise PluginError(f"{type(params).__name__}.{s.name}: {len(seq)} values, at most {s.width} fit")
            pad = [] if s.width < 0 else [s.pad] * (s.width - len(seq))
            vals = ([float(len(seq))] if s.kind != "derived" else []) + [float(v) for v in seq] + pad
        else:
            vals = [float(value)]
        out.extend(vals)
    return out


def asset_fields(params: Params) -> tuple[str, ...]:
    """The asset names a params instance refers to."""
    out: list[str] = []
    for name, info in type(params).model_fields.items():
        if _is_asset_field(info.annotation) or info.metadata and AssetName in info.metadata:
            value = getattr(params, name)
            out.extend(value if isinstance(value, tuple) else (value,))
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
        layout = layout_of(self.params)
        if self.pack is default_pack and layout is not None and layout.derived:
            raise PluginError(
                f"component {self.name!r}: its params declare derived values "
                f"{[s.name for s in layout.derived]}; give a pack function that supplies them through pack_fields"
            )

    @property
    def kernel_ref(self) -> tuple[str, str]:
        py = self.kernel.py_func
        return py.__module__, py.__name__

    def make_params(self, raw: dict[str, Any]) -> Params:
        try:
            return self.params(**raw)
        except TypeError as exc:  # pragma: no cover - pydantic raises ValidationError for bad input
            raise ConfigError(str(exc)) from exc
