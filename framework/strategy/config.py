"""Strategy YAML: safe loading with line numbers, and validation in two phases.

Phase one checks the envelope (sections, keys, types); phase two builds each part's params with
its component's own model. Every error names the file, the line and the path
(``forecast[1].params.levels``), what was expected, and, for an unknown ``kind``, the registered
names nearest first. Nothing compiles before both phases pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, NoReturn, TypeVar, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator

from quotelab.component import Alpha, PartRef, asset_fields
from quotelab.errors import ConfigError
from quotelab.units import DAY, MICROSECOND, Delay, DomainModel, Offset, Price, Qty, Step, seconds_between

if TYPE_CHECKING:
    from quotelab.strategy.registry import Registry

Path_ = tuple[str | int, ...]


class Lines(dict[Path_, int]):
    """The 1-based line of every path of a document, and the paths the command line set (``--set``):
    an error at or under one of those names the ``--set`` instead of a line of the file."""

    def __init__(self) -> None:
        super().__init__()
        self.sets: dict[Path_, str] = {}


# ------------------------------------------------------------------------------------------------
# YAML with line numbers
# ------------------------------------------------------------------------------------------------


class _LineLoader(yaml.SafeLoader):
    """SafeLoader (no object-constructing tags) that remembers where each value sits."""


# libyaml's parser composes the same nodes, marks included, ~10x faster than the pure-Python one;
# PyYAML wheels ship it, source builds without libyaml fall back.
_COMPOSER = getattr(yaml, "CSafeLoader", _LineLoader)


_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Bounds of a document once its aliases are expanded: a config has hundreds of values, so these
# only stop an alias bomb (nested anchors that expand exponentially) or a self-referencing alias
# before they exhaust memory or the stack.
MAX_VALUES = 100_000
MAX_DEPTH = 100
_DATA_ONLY = "(config files are data; only a local plugin file named under plugins: runs code)"


def load_yaml(path: str | Path, text: str | None = None) -> tuple[Any, Lines]:
    """Parse YAML safely; return the data and a map from path tuple to 1-based line.

    The one loader of every YAML quotelab reads (strategies, batches, evaluations, trainings and
    ``--set`` values): safe tags only, a duplicate key is an error naming both lines, ``<<`` merges
    a mapping (keys written beside it win), and aliases expand to at most ``MAX_VALUES`` values."""
    path = Path(path)
    if text is None:
        if not path.exists():
            raise ConfigError(f"{path}: file not found")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        node = yaml.compose(text, Loader=_COMPOSER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    lines = Lines()
    count = 0
    inside: set[int] = set()  # nodes being expanded: meeting one again is an alias of its own ancestor

    def fail(n: yaml.Node, at: Path_, msg: str) -> NoReturn:
        raise ConfigError(f"{path}:{n.start_mark.line + 1}: {fmt_path(at)}: {msg}")

    def walk(n: yaml.Node, at: Path_) -> Any:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            fail(n, at, f"the document expands to more than {MAX_VALUES} values (nested aliases?); "
                        "a config needs far fewer: write the values out or use fewer alias levels")
        if len(at) > MAX_DEPTH:
            fail(n, at, f"nested more than {MAX_DEPTH} levels deep")
        lines.setdefault(at, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode | yaml.SequenceNode):
            if n.tag not in _PLAIN_TAGS:
                fail(n, at, f"tag {n.tag!r} is not allowed {_DATA_ONLY}")
            if id(n) in inside:
                fail(n, at, "an alias refers to a mapping or list that contains it (a recursive alias)")
            inside.add(id(n))
            try:
                return mapping(n, at) if isinstance(n, yaml.MappingNode) else [
                    walk(v, (*at, i)) for i, v in enumerate(n.value)]
            finally:
                inside.discard(id(n))
        try:
            return constructor.construct_object(n, deep=True)
        except Exception as exc:  # a safe tag with a bad value (!!int abc, !!binary ...) as much as an unsafe one
            problem = getattr(exc, "problem", None) or f"{type(exc).__name__}: {exc}"
            fail(n, at, f"{problem} {_DATA_ONLY}" if "tag" in problem else f"invalid value: {problem}")

    def mapping(n: yaml.MappingNode, at: Path_) -> dict:
        out: dict = {}
        first: dict[Any, int] = {}
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        for k, v in n.value:
            if k.tag == _MERGE_TAG:
                merged += [(k, m) for m in (v.value if isinstance(v, yaml.SequenceNode) else [v])]
                continue
            if not isinstance(k, yaml.ScalarNode):
                fail(k, at, "a key must be a plain value (a name or a number), not a mapping or a list")
            key = k.value
            line = k.start_mark.line + 1
            if key in first:
                fail(k, (*at, key), f"duplicate key (first at line {first[key]}); remove one")
            first[key] = line
            lines.setdefault((*at, key), line)
            out[key] = walk(v, (*at, key))
        for k, m in merged:  # keys written in the mapping itself win over merged ones
            if not isinstance(m, yaml.MappingNode):
                fail(k, at, "<< merges a mapping or a list of mappings")
            for key, value in walk(m, at).items():
                out.setdefault(key, value)
        return out

    constructor = _LineLoader("")
    data = walk(node, ()) if node is not None else {}
    return data, lines


def fmt_path(at: Path_) -> str:
    out = ""
    for p in at:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def line_of(lines: dict[Path_, int], at: Path_) -> int:
    for n in range(len(at), -1, -1):
        if tuple(at[:n]) in lines:
            return lines[tuple(at[:n])]
    return 1


def place(file: str | Path, lines: dict[Path_, int], at: Path_) -> str:
    """Where the value at ``at`` came from: ``file:line``, or ``--set 'PATH=VALUE'`` when the command
    line set it or a mapping or list above it (the deepest such path wins)."""
    sets = getattr(lines, "sets", None)
    if sets:
        for n in range(len(at), 0, -1):
            if tuple(at[:n]) in sets:
                return f"--set {sets[tuple(at[:n])]!r}"
    return f"{file}:{line_of(lines, at)}"


def raise_validation(
    exc: ValidationError, file: str | Path, lines: dict[Path_, int], prefix: Path_ = (),
    model: type[BaseModel] | None = None,
) -> NoReturn:
    msgs = []
    for err in exc.errors():
        at = (*prefix, *err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = at[:-1]
            fields = _known_fields(model or _MODEL_BY_TITLE.get(exc.title), err)
            if fields:
                msg += f"; expected one of: {', '.join(fields)}"
            at = (*parent, at[-1])
        elif err["type"] == "missing":
            msg = "required key is missing"
            what = _field_description(model or _MODEL_BY_TITLE.get(exc.title), err["loc"])
            if what:
                msg += f"; {what[0].lower()}{what[1:].rstrip('.')}"
        msgs.append(f"{place(file, lines, at)}: {fmt_path(at)}: {msg}")
    raise ConfigError("\n".join(msgs))


def _model_at(model: type[BaseModel] | None, loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model whose fields sit at ``loc`` inside ``model`` (list indices and mapping keys skipped), if one does."""
    keyed = False  # the part is a key of a mapping of models (data.assets.<name>), not a field
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        f = model.model_fields.get(part)
        ann = getattr(f, "annotation", None) if f else None
        keyed = _is_mapping(ann)
        model = _first_model(ann)
    return model


def _is_mapping(ann: Any) -> bool:
    return get_origin(ann) is dict or any(_is_mapping(a) for a in getattr(ann, "__args__", ()) or ())


def _known_fields(model: type[BaseModel] | None, err: dict) -> list[str]:
    model = _model_at(model, err["loc"][:-1])
    return [] if model is None else list(model.model_fields)


def _field_description(model: type[BaseModel] | None, loc: Sequence[str | int]) -> str | None:
    model = _model_at(model, loc[:-1])
    f = model.model_fields.get(loc[-1]) if model is not None and loc else None
    return f.description if f is not None else None


def _first_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


# ------------------------------------------------------------------------------------------------
# The strategy envelope
# ------------------------------------------------------------------------------------------------


class StrictModel(DomainModel):
    """Base of every config model: unknown keys are errors, a validated value is frozen, numbers are finite
    and bounded (:class:`quotelab.units.DomainModel`)."""


def _parse_day(v: Any) -> str:
    s = str(v).replace("-", "")
    if not re.fullmatch(r"\d{8}", s):
        raise ValueError(f"expected a date as YYYYMMDD or YYYY-MM-DD, got {v!r}")
    datetime.strptime(s, "%Y%m%d")
    return s


def expand_dates(spec: Any) -> list[str]:
    """``20240808``, ``[20240808, 20240809]`` or ``"20240808..20240810"`` → list of YYYYMMDD."""
    if isinstance(spec, list | tuple):
        return [_parse_day(v) for v in spec]
    s = str(spec)
    if ".." in s:
        a, b = (datetime.strptime(_parse_day(x), "%Y%m%d").date() for x in s.split("..", 1))
        if b < a:
            raise ValueError(f"date range {s!r} ends before it starts")
        return [(a + timedelta(days=i)).strftime("%Y%m%d") for i in range((b - a).days + 1)]
    return [_parse_day(s)]


class AssetData(StrictModel):
    venue: str | None = None
    symbol: str | None = None
    dates: list[str] | None = None
    files: list[str] | None = None
    tick_size: Annotated[Price, Field(gt=0)] | None = None
    lot_size: Annotated[Qty, Field(gt=0)] | None = None
    contract: Literal["linear", "inverse"] | None = None
    contract_size: float | None = Field(None, gt=0)

    @field_validator("dates", mode="before")
    @classmethod
    def _dates(cls, v: Any) -> Any:
        return None if v is None else expand_dates(v if isinstance(v, list) else v)


class DataSection(StrictModel):
    catalog: str | None = None
    quote: str = Field(description="Name of the asset the strategy quotes.")
    assets: dict[str, AssetData]


class Latency(StrictModel):
    """Order latency, in seconds (``10ms``): request to exchange (entry), exchange to response."""

    model: Literal["constant", "recorded", "feed"] = Field(
        "constant", description="constant: entry and response; recorded: interpolated from `file` "
                                "(hftbacktest's intp_order_latency); feed: from the asset's own feed latency, "
                                "entry = entry_scale * (local - exchange time) + entry, response likewise.")
    entry: Delay = Field(0.01, description="constant: the entry latency; feed: added after scaling.")
    response: Delay = Field(0.01, description="constant: the response latency; feed: added after scaling.")
    file: str | None = Field(None, description="recorded: npz/npy/parquet/CSV with req_ts, exch_ts, resp_ts (ns); "
                                               "relative to the strategy file.")
    offset: Offset = Field(0.0, description="recorded: added to every entry and response latency (may be < 0, "
                                             "as long as no latency becomes negative).")
    entry_scale: float = Field(1.0, ge=0, description="feed: multiplier of the feed latency for the entry latency.")
    response_scale: float = Field(1.0, ge=0, description="feed: multiplier of the feed latency for the response.")
    sample: Step = Field(1.0, description="feed: one latency row per this much local time.")


class Fees(StrictModel):
    """maker/taker per fill; negative is a rebate."""

    model: Literal["value", "quantity", "flat"] = Field(
        "value", description="value: a fraction of the traded value; quantity: per unit of quantity, in the "
                             "quote currency (coin if inverse); flat: per fill, in the same unit.")
    maker: float = -0.00005
    taker: float = 0.0007

    @field_validator("maker", "taker")
    @classmethod
    def _fraction(cls, v: float, info: ValidationInfo) -> float:
        # 1% of the traded value is far above any venue's fee, and catches a fee given in bps
        if info.data.get("model", "value") == "value" and abs(v) > 0.01:
            raise ValueError(f"a value fee is a fraction of the traded value (0.0002 = 2 bps); {v:g} is over 1%")
        return v


QUEUE_MODELS = ("risk_adverse", "log_prob", "log_prob_model2", "power_prob", "power_prob_model2",
                "power_prob_model3", "power_prob2", "power_prob3")


class AssetEngine(StrictModel):
    latency: Latency = Latency()
    feed_latency_offset: Offset = Field(0.0, description="Added to the asset's local (receive) times, e.g. for a "
                                                          "venue whose feed is recorded elsewhere; hftbacktest's "
                                                          "latency_offset. A negative feed latency is refused.")
    queue: Literal[QUEUE_MODELS] = "risk_adverse"  # type: ignore[valid-type]
    queue_power: float = Field(2.0, gt=0, description="The exponent n of the power_prob models.")
    partial_fills: bool = False
    fees: Fees = Fees()
    # Allocated per asset up front (32 bytes a trade): the ceiling keeps that under 32 MB.
    last_trades_capacity: int = Field(10000, ge=1, le=1_000_000)

    @field_validator("partial_fills")
    @classmethod
    def _no_partial_fills(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "true is refused: hftbacktest 2.4's partial-fill exchange does not apply a partly filled order's "
                "fills to position and balance (only a completed order's last chunk; hftbacktest issues #299, "
                "#316) and can stop with InvalidOrderStatus (#312); use false (whole-order fills)")
        return v


class EngineSection(StrictModel):
    mode: Literal["step", "event"] = "step"
    step: Step = 0.1
    origin: str | int = "quoted"
    on_nonfinite: Literal["stop", "skip"] = "stop"
    time_in_force: Literal["gtx", "gtc"] = "gtx"
    record_every: seconds_between(MICROSECOND, DAY, zero=True) = Field(
        0.0, description="Record a row at most this often (0: every quoting step, the default: the per-day PnL "
        "split and max |position| come from the records). Memory does not grow with it (the records spill to a "
        "memory-mapped file); disk does, ~120 B a row while running and ~56 B in series.parquet: a month at 100 ms "
        "is 26 M rows, so thin long runs with e.g. 1s.")
    max_scan_ticks: int = Field(2000, ge=1, le=1_000_000)
    funding: Literal["auto", "off"] = Field(
        "auto", description="auto: settle the quoted perpetual's funding at each settlement time its catalog "
                            "funding rows name (nothing without rows); off: never.")
    defaults: AssetEngine = AssetEngine()
    assets: dict[str, AssetEngine] = {}


ALPHA_RE = re.compile(r"\s*([-+0-9.eE]+)\s*(ticks?|bps|spreads?|price)?\s*")


PART_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PartSpec(StrictModel):
    kind: str
    name: str | None = Field(
        None, description="Optional: how other parts refer to this one (e.g. linear_forecast's inputs), instead of "
        "its position in the composed order.")
    params: dict[str, Any] = {}
    weight: float = 1.0
    alpha: float | str | None = Field(
        None,
        description="Signals only: multiplier in price units, '<n> ticks', '<n> bps' (of the fair value) or "
        "'<n> spreads' (of the quoted asset's current spread); 0 = an input only.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not PART_NAME_RE.fullmatch(v):
            raise ValueError(f"a part name is a letter or _ then letters, digits or _ (like imbalance_1), got {v!r}")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, str):
            m = ALPHA_RE.fullmatch(v)
            try:
                number = float(m.group(1)) if m else math.nan
            except ValueError:
                number = math.nan
            if not m or not math.isfinite(number):
                raise ValueError(f"expected a number (price units), '<n> ticks', '<n> bps' or '<n> spreads', got {v!r}")
        return v


class StrategyConfig(StrictModel):
    name: str = "strategy"
    description: str = ""
    plugins: list[str] = []
    data: DataSection
    engine: EngineSection = EngineSection()
    fair_value: list[PartSpec]
    forecast: list[PartSpec] = []
    risk: list[PartSpec] = []
    quoter: PartSpec


_MODEL_BY_TITLE = {m.__name__: m for m in (StrategyConfig,)}


def parse_alpha(alpha: float | str | None, tick: float) -> Alpha:
    """A signal's ``alpha:`` as its three multipliers (price units, bps of the fair value, spreads)."""
    if alpha is None:
        return Alpha()
    if not isinstance(alpha, str):
        return Alpha(price=float(alpha))
    m = ALPHA_RE.fullmatch(alpha)
    assert m is not None
    value, unit = float(m.group(1)), m.group(2) or "price"
    if unit.startswith("tick"):
        return Alpha(price=value * tick)
    if unit == "bps":
        return Alpha(bps=value)
    if unit.startswith("spread"):
        return Alpha(spreads=value)
    return Alpha(price=value)


# ------------------------------------------------------------------------------------------------
# Overrides: --set path=value
# ------------------------------------------------------------------------------------------------


def apply_override(raw: dict, assignment: str, lines: Lines | None = None) -> None:
    """Apply ``quoter.params.half_spread=3`` or ``forecast[0].alpha=2ticks`` to the raw YAML dict.

    The value is read by :func:`load_yaml`, so ``[1, 2]`` is a list and ``2ticks`` a string. With
    ``lines``, the paths this creates or replaces are recorded there, for :func:`place`."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected PATH=VALUE, e.g. quoter.params.half_spread=3")
    path, value = assignment.split("=", 1)
    keys: list[str | int] = []
    for part in path.strip().split("."):
        m = re.fullmatch(r"([A-Za-z_][\w]*)((?:\[\d+\])*)", part)
        if not m:
            raise ConfigError(f"--set {assignment!r}: cannot parse path segment {part!r}; a path is names and "
                              "list indices, e.g. quoter.params.half_spread or forecast[0].alpha")
        keys.append(m.group(1))
        keys.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    node: Any = raw
    for i, k in enumerate(keys[:-1]):
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            if isinstance(k, str) and isinstance(node, dict) and not isinstance(keys[i + 1], int):
                node = node.setdefault(k, {})
                if lines is not None:
                    lines.sets.setdefault(tuple(keys[: i + 1]), assignment)
                continue
            raise ConfigError(f"--set {assignment!r}: {fmt_path(tuple(keys[: i + 1]))} does not exist") from None
    try:
        value_of = load_yaml("--set", value)[0] if value.strip() else None
    except ConfigError as exc:  # the value's own line and path say nothing on a command line
        problem = str(exc).split(": ", 1)[-1].removeprefix("(top level): ")
        raise ConfigError(f"--set {assignment!r}: {problem}") from None
    try:
        node[keys[-1]] = value_of
    except IndexError:
        n = f"{len(node)} item" + "s" * (len(node) != 1)
        raise ConfigError(f"--set {assignment!r}: {fmt_path(tuple(keys))} does not exist (the list has {n}; --set "
                          "replaces an item, or give the whole list)") from None
    except TypeError:
        what = "a list: name an item by index, e.g. [0]" if isinstance(node, list) else f"{node!r}, not a mapping"
        raise ConfigError(f"--set {assignment!r}: cannot assign at {fmt_path(tuple(keys))}: "
                          f"{fmt_path(tuple(keys[:-1]))} is {what}") from None
    if lines is not None:
        at = tuple(keys)
        for earlier in [k for k in lines.sets if k[: len(at)] == at]:  # replaced along with the value
            del lines.sets[earlier]
        lines.sets[at] = assignment


def apply_overrides(raw: dict, overrides: Sequence[str], lines: Lines | None = None) -> None:
    """The command line's ``--set PATH=VALUE`` overrides, in order, on a document's raw mapping, before
    it is validated: every verb that reads a YAML applies them here, so they mean the same everywhere."""
    for assignment in overrides:
        apply_override(raw, assignment, lines)


# ------------------------------------------------------------------------------------------------
# Loading a strategy
# ------------------------------------------------------------------------------------------------


class LoadedStrategy:
    """A validated strategy: envelope, each part's params, and where everything came from."""

    def __init__(self, config: StrategyConfig, file: Path, lines: dict[Path_, int], raw: dict) -> None:
        self.config = config
        self.file = file
        self.lines = lines
        self.raw = raw

    def where(self, at: Path_) -> str:
        return where_in(self.file, self.lines)(at)

    def parts(self) -> list[tuple[str, Path_, PartSpec]]:
        c = self.config
        out = [("fair_value", ("fair_value", i), p) for i, p in enumerate(c.fair_value)]
        out += [("signal", ("forecast", i), p) for i, p in enumerate(c.forecast)]
        out += [("risk", ("risk", i), p) for i, p in enumerate(c.risk)]
        out.append(("quoter", ("quoter",), c.quoter))
        return out


class ValidatedPart(NamedTuple):
    """One part of a strategy (or an evaluation's bank) after phase two: its role, where it is in the
    YAML (``("forecast", 1)``), the spec as written, the registered component and its validated params."""

    role: str
    at: Path_
    spec: PartSpec
    component: Any  # quotelab.component.Component or quotelab.pysignal.PythonSignal
    params: Any  # an instance of component.params


def validate_part(
    registry: Registry, role: str, at: Path_, spec: PartSpec, path: Path, lines: dict[Path_, int],
    names: set[str], assets: dict[str, AssetData],
) -> ValidatedPart:
    """Phase two for one part: its component exists, its params fit its model, its assets have data."""
    where = where_in(path, lines)

    component = registry.get(role, spec.kind, where=f"{where((*at, 'kind'))}: ")
    try:
        params = component.params.model_validate(spec.params)
    except ValidationError as exc:
        raise_validation(exc, path, lines, prefix=(*at, "params"), model=component.params)
    for asset in asset_fields(params):
        if asset not in names:
            raise ConfigError(
                f"{where((*at, 'params'))}: {role} {spec.kind!r} reads asset {asset!r}, which has no data; "
                f"data.assets has: {', '.join(assets)}"
            )
    if role != "signal" and spec.alpha is not None:
        raise ConfigError(f"{where((*at, 'alpha'))}: alpha applies to forecast signals only")
    if role == "signal" and spec.alpha is None:
        raise ConfigError(
            f"{where(at)}: signal {spec.kind!r} needs an alpha (e.g. alpha: 2ticks, 1.5bps or 0.3; "
            "alpha: 0 makes it an input of another part, such as linear_forecast, only)"
        )
    return ValidatedPart(role, at, spec, component, params)


def resolve_part_names(parts: Sequence[ValidatedPart], where: Callable[[Path_], str], scope: str
                       ) -> list[ValidatedPart]:
    """``parts`` with every name in a :class:`~quotelab.component.PartRef` field (``linear_forecast``'s
    ``inputs``) replaced by that part's composed index; an unknown name, a name used twice, or a part
    that runs later is an error naming the place and the parts that can be read."""
    index: dict[str, int] = {}
    for k, part in enumerate(parts):
        name = part.spec.name
        if name is None:
            continue
        if name in index:
            raise ConfigError(f"{where((*part.at, 'name'))}: name {name!r} is already "
                              f"{fmt_path(parts[index[name]].at)}'s; names must be unique in {scope}")
        index[name] = k
    out = []
    for k, part in enumerate(parts):
        update = {}
        for field, info in type(part.params).model_fields.items():
            values = getattr(part.params, field)
            if PartRef not in info.metadata or not isinstance(values, tuple):
                continue
            resolved = []
            for n, v in enumerate(values):
                if not isinstance(v, str):
                    resolved.append(v)
                    continue
                readable = ", ".join(f"{m!r} ({fmt_path(parts[i].at)})" for m, i in index.items() if i < k) or "none"
                if v not in index:
                    raise ConfigError(f"{where((*part.at, 'params', field, n))}: no part is named {v!r} in {scope}; "
                                      f"named parts that run before this one: {readable}")
                if index[v] >= k:
                    raise ConfigError(
                        f"{where((*part.at, 'params', field, n))}: {v!r} is {fmt_path(parts[index[v]].at)}, which "
                        f"runs after this {part.spec.kind!r} (parts run fair values, forecasts, risks, in order); "
                        f"named parts before it: {readable}")
                resolved.append(index[v])
            update[field] = tuple(resolved)
        out.append(part._replace(params=part.params.model_copy(update=update)) if update else part)
    return out


def check_component_inputs(parts: Sequence[ValidatedPart], where: Callable[[Path_], str], scope: str
                           ) -> list[ValidatedPart]:
    """Every part that reads other components' outputs (``Reads.components``, e.g. a pasted
    ``linear_forecast``) reads ones that run before it in ``parts`` (the composed order), of the kinds
    it names. A later index would read the previous step's value, or in an evaluation another
    estimator's, and a block pasted after a different list of parts would combine the wrong ones;
    neither fails on its own. Returns ``parts`` with part names resolved to indices."""
    parts = resolve_part_names(parts, where, scope)
    for k, part in enumerate(parts):
        at, spec = part.at, part.spec
        reads = part.component.reads(part.params)
        if not reads.components:
            continue
        before = "; ".join(f"{i}: {fmt_path(parts[i].at)} ({parts[i].spec.kind})" for i in range(k)) or "none"
        for n, idx in enumerate(reads.components):
            if idx >= k:
                raise ConfigError(
                    f"{where((*at, 'params', 'inputs', n))}: input {idx} is not a component that runs before this "
                    f"{spec.kind!r} (component {k} of {scope}); it can read {before}"
                )
            if reads.component_kinds and parts[idx].spec.kind != reads.component_kinds[n]:
                raise ConfigError(
                    f"{where((*at, 'params', 'inputs', n))}: input {idx} is {fmt_path(parts[idx].at)} "
                    f"({parts[idx].spec.kind}), but features[{n}] is {reads.component_kinds[n]!r}: the block was made "
                    f"for another order of parts; {scope} has {before}. Fix: paste it after the same fair values "
                    "and forecasts it was trained with, or renumber inputs"
                )
    return parts


def check_data_section(data: DataSection, where: Callable[[Path_], str]) -> None:
    """Structural checks of a data section that pydantic's types can't express."""
    if data.quote not in data.assets:
        raise ConfigError(
            f"{where(('data', 'quote'))}: asset {data.quote!r} is not in data.assets (have: {', '.join(data.assets)})"
        )
    for name, a in data.assets.items():
        at = ("data", "assets", name)
        if (a.files is None) == (a.venue is None):
            raise ConfigError(f"{where(at)}: give either venue+symbol+dates (catalog) or files (npz paths)")
        if a.venue is not None and (a.symbol is None or a.dates is None):
            raise ConfigError(f"{where(at)}: a catalog asset needs venue, symbol and dates")
        if a.files is not None and (a.tick_size is None or a.lot_size is None):
            raise ConfigError(f"{where(at)}: an asset from files needs tick_size and lot_size")


M = TypeVar("M", bound=BaseModel)


def load_document(path: Path, model: type[M], shape: str, text: str | None = None,
                  overrides: Sequence[str] = ()) -> tuple[M, dict, Lines]:
    """Read a YAML document, apply the ``--set`` overrides and validate it against ``model`` (errors
    name the file, line and path, or the ``--set`` that put the value there).

    ``shape`` says what the top level must be, for a file that is not a mapping. Returns the model,
    the raw mapping and the line of every path."""
    raw, lines = load_yaml(path, text)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: {shape}")
    apply_overrides(raw, overrides, lines)
    try:
        return model.model_validate(raw), raw, lines
    except ValidationError as exc:
        raise_validation(exc, path, lines, model=model)


def where_in(path: Path, lines: dict[Path_, int]) -> Callable[[Path_], str]:
    """``where(at)``: "file:line: path" for error messages about the document at ``path``."""
    return lambda at: f"{place(path, lines, at)}: {fmt_path(at)}"


def load_strategy(
    path: str | Path, overrides: list[str] = (), registry: Registry | None = None, text: str | None = None
) -> tuple[LoadedStrategy, Registry, list[ValidatedPart]]:
    """Validate a strategy YAML fully (both phases) and return it with its registry and parts."""
    from quotelab.strategy.registry import load_registry

    path = Path(path)
    config, raw, lines = load_document(path, StrategyConfig, "a strategy is a mapping with sections data, "
                                       "fair_value, quoter, ...", text, overrides)
    loaded = LoadedStrategy(config, path, lines, raw)
    if registry is None:
        local = [(path.parent / p).resolve() for p in config.plugins]
        registry = load_registry(local_files=local)
    check_data_section(config.data, loaded.where)
    for name in config.engine.assets:
        if name not in config.data.assets:
            raise ConfigError(
                f"{loaded.where(('engine', 'assets', name))}: no such asset; data.assets has "
                f"{', '.join(config.data.assets)}"
            )
    names = set(config.data.assets) | {"quoted"}
    parts = [validate_part(registry, role, at, spec, path, lines, names, config.data.assets)
             for role, at, spec in loaded.parts()]
    parts = check_component_inputs(parts, loaded.where, "the strategy")
    return loaded, registry, parts


