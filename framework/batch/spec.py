"""The batch YAML (:class:`BatchSpec`) and its expansion into validated runs (:func:`load_batch`).

A batch YAML::

    strategy: seed.yaml            # base strategy: a path (relative to this file) or an inline mapping
    catalog: ../catalog            # optional; --catalog wins
    asset: perp                    # which data.assets entry the matrix assets replace (default: data.quote)
    matrix:
      assets:                      # each entry replaces data.assets.<asset> entirely
        - {venue: binance-usdm, symbol: BTCUSDT, tick_size: 0.1, lot_size: 0.001}
        - {venue: binance-cm, symbol: BTCUSD_PERP, contract: inverse, contract_size: 100,
           set: {quoter.params.size: 1}}     # overrides that only this asset needs (lot sizes differ)
      dates: [20240808]            # crossed with assets that give no dates of their own
      params:
        quoter.params.half_spread: [1, 2, 4]
        risk[0].params.risk_aversion: {start: 0.1, stop: 0.5, step: 0.2}   # stop is inclusive

Every expanded run is validated (both phases of config.load_strategy) before the first starts. A run's
id is the hash of its validated config as canonical JSON, so the same run gets the same id in every
batch, and ``--resume`` skips ids already recorded as done.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator

from quotelab.errors import ConfigError, QuotelabError
from quotelab.strategy.config import (
    AssetData,
    StrictModel,
    apply_override,
    expand_dates,
    load_document,
    load_strategy,
    load_yaml,
    where_in,
)


class BatchError(ConfigError):
    """A batch YAML is invalid, or one of its expanded runs is."""


# ------------------------------------------------------------------------------------------------
# The batch YAML
# ------------------------------------------------------------------------------------------------


def _number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"expected a number, got {v!r}")
    return v


Number = Annotated[int | float, BeforeValidator(_number)]  # an int stays an int: a range of ints gives ints


class Range(StrictModel):
    """``{start, stop, step}``: start, start + step, ... up to and including stop."""

    start: Number
    stop: Number
    step: Number


def axis_values(spec: Any) -> list[Any]:
    """The values of one matrix axis: a list as given, a range expanded, a single value as a list of one."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError("an empty list of values gives no runs")
        return spec
    if not isinstance(spec, dict):
        return [spec]
    if set(spec) != {"start", "stop", "step"}:
        raise ValueError(f"a range is {{start, stop, step}} (stop inclusive), got keys {sorted(spec)}")
    try:
        r = Range.model_validate(spec)
    except ValidationError:
        raise ValueError(f"range start, stop and step must be finite numbers, got {spec}") from None
    if r.step <= 0 or r.stop < r.start:
        raise ValueError(f"a range needs step > 0 and stop >= start, got {spec}")
    n = int(math.floor((r.stop - r.start) / r.step + 1e-9)) + 1
    if n > 10_000:
        raise ValueError(f"the range gives {n} values; at most 10000")
    ints = all(isinstance(v, int) for v in (r.start, r.stop, r.step))
    # start + i*step, rounded, so 0.1 + 2*0.1 is 0.3 and its run id does not depend on float noise.
    return [int(r.start + i * r.step) if ints else round(r.start + i * r.step, 12) for i in range(n)]


Axis = Annotated[list[Any], BeforeValidator(axis_values)]


def shaped(kind: type, expected: str, empty: Any = None) -> BeforeValidator:
    """A section that must be a ``kind`` (a mapping or a list), saying what goes in it when it is not; an
    empty YAML value (``key:`` alone) is ``empty``."""

    def check(v: Any) -> Any:
        if v is None and empty is not None:
            return empty
        if not isinstance(v, kind) or (empty is None and not v):
            raise ValueError(f"expected {expected}")
        return v

    return BeforeValidator(check)


class MatrixAsset(AssetData):
    """One ``matrix.assets`` entry: it replaces the strategy's ``data.assets.<asset>`` entirely."""

    set: Annotated[dict[str, Any], shaped(dict, "a mapping PATH: VALUE", {})] = Field(
        {}, description="Overrides only this asset needs, PATH: VALUE (e.g. quoter.params.size: 1).")


class Matrix(StrictModel):
    assets: Annotated[list[MatrixAsset], shaped(list, "a non-empty list of {venue, symbol, dates, ...}")] | None = (
        Field(None, description="Each entry replaces the strategy's data.assets.<asset>: one run per entry."))
    dates: Axis | None = Field(None, description="Crossed with the assets that give no dates of their own.")
    params: Annotated[dict[str, Axis], shaped(dict, "a mapping PATH: [values] or {start, stop, step}", {})] = Field(
        {}, description="PATH: [values] or {start, stop, step} (stop inclusive); every combination is a run.")


class BatchSpec(StrictModel):
    """A batch YAML: a base strategy and the matrix of runs made from it."""

    name: str | None = None
    description: str = ""
    strategy: str | dict[str, Any] = Field(
        description="The base strategy: a path to its YAML (relative to this file) or an inline mapping.")
    catalog: str | None = Field(None, description="Event catalog folder (relative to this file); --catalog wins.")
    asset: str | None = Field(None, description="The data.assets entry the matrix's assets replace (default: "
                                                "data.quote).")
    matrix: Annotated[Matrix, shaped(dict, "a mapping with assets, dates and params", {})] = Matrix()

    @field_validator("strategy", mode="before")
    @classmethod
    def _path_or_mapping(cls, v: Any) -> Any:
        if not isinstance(v, str | dict):
            raise ValueError("expected a path to the base strategy YAML or an inline strategy mapping")
        return v


M = TypeVar("M", bound=BaseModel)


def read_spec(path: Path, model: type[M], shape: str, error: type[ConfigError]) -> tuple[M, Callable[[tuple], str]]:
    """Validate the YAML document at ``path`` against ``model``; return it and its ``where(path)`` for messages.
    Errors (file:line, path, known keys) are raised as ``error``."""
    try:
        spec, _, lines = load_document(path, model, shape)
    except error:
        raise
    except ConfigError as exc:
        raise error(str(exc)) from None
    return spec, where_in(path, lines)


def check_overrides(overrides: Sequence[str], fixed: list[tuple[str, tuple]], where: Callable[[tuple], str],
                    error: type[ConfigError], fix: str) -> None:
    """A ``--set`` on a path the file sets in its runs (``fixed``: path, where the file sets it) would be
    overwritten there: an error naming both, not a silent no-op."""
    for o in overrides:
        target = o.split("=", 1)[0].strip()
        for p, at in fixed:
            if target == p or p.startswith((target + ".", target + "[")) or target.startswith((p + ".", p + "[")):
                raise error(f"--set {o}: {where(at)} sets {p} in the runs, so --set would be overwritten there; "
                            f"{fix}")


# ------------------------------------------------------------------------------------------------
# Expansion
# ------------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One expanded run: the overrides that turn the base strategy into it, and its identity."""

    index: int
    overrides: list[str]
    venue: str
    symbol: str
    dates: list[str]
    params: dict[str, Any]
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        p = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.params.items())
        return f"#{self.index} {self.venue}/{self.symbol} {','.join(self.dates)} {p}".strip()


@dataclass
class Batch:
    file: Path
    strategy_path: Path
    strategy_text: str
    catalog: Path | None
    runs: list[RunSpec]


def _value_literal(v: Any) -> str:
    # JSON is a subset of YAML flow syntax, so apply_override's YAML loader gives back the same type.
    return json.dumps(v)


def load_batch(path: str | Path, catalog: str | Path | None = None, overrides: Sequence[str] = ()) -> Batch:
    """Parse a batch YAML, expand its matrix and validate every run; raise BatchError naming file, line and run.

    ``overrides`` (``--set PATH=VALUE``) change the base strategy of every run, before the matrix."""
    path = Path(path).resolve()
    spec, where = read_spec(path, BatchSpec, "a batch is a mapping with keys strategy and matrix", BatchError)
    base_overrides = list(overrides)

    if isinstance(spec.strategy, str):
        strategy_path = (path.parent / spec.strategy).resolve()
        if not strategy_path.is_file():
            raise BatchError(f"{where(('strategy',))}: base strategy {strategy_path} not found")
        strategy_text = strategy_path.read_text()
    else:
        # Inline base: validation errors then point into the batch file itself, at the right lines.
        strategy_path = path
        strategy_text = _inline_text(path)

    base_raw, _ = load_yaml(strategy_path, strategy_text)
    if isinstance(base_raw, dict):
        for o in base_overrides:
            apply_override(base_raw, o)
    try:
        quote = base_raw["data"]["quote"]
        base_assets = base_raw["data"]["assets"]
    except (KeyError, TypeError):
        quote, base_assets = None, {}
    if not isinstance(base_assets, dict):
        base_assets = {}
    matrix = spec.matrix
    asset = spec.asset if spec.asset is not None else quote
    if matrix.assets is not None and asset not in base_assets:
        raise BatchError(f"{where(('asset',))}: asset {asset!r} is not in the base strategy's data.assets "
                         f"(have: {', '.join(base_assets)})")

    # Paths the matrix sets in some run; a --set on one of them would be overwritten there.
    matrix_paths = [(p, ("matrix", "params", p)) for p in matrix.params]
    if matrix.assets is not None:
        matrix_paths.append((f"data.assets.{asset}", ("matrix", "assets")))
        matrix_paths += [(k, ("matrix", "assets", i, "set", k)) for i, a in enumerate(matrix.assets) for k in a.set]
    elif matrix.dates is not None:
        matrix_paths.append((f"data.assets.{asset}.dates", ("matrix", "dates")))
    check_overrides(base_overrides, matrix_paths, where, BatchError, "change it in the batch file instead")

    # (overrides, venue, symbol, dates, line-path) per asset choice
    asset_choices: list[tuple[list[str], str, str, list[str], tuple]] = []
    date_values: list[Any] = [None] if matrix.dates is None else matrix.dates
    if matrix.assets is None:
        a = base_assets.get(asset, {})
        a = a if isinstance(a, dict) else {}
        for d in date_values:
            ovr = [] if d is None else [f"data.assets.{asset}.dates={_value_literal(d)}"]
            asset_choices.append((ovr, str(a.get("venue", "files")), str(a.get("symbol", asset)),
                                  _dates_of(d if d is not None else a.get("dates")),
                                  ("strategy",) if d is None else ("matrix", "dates")))
    else:
        for i, entry in enumerate(matrix.assets):
            at = ("matrix", "assets", i)
            fields = entry.model_dump(mode="json", exclude_unset=True, exclude={"set"})
            per_dates = [fields["dates"]] if "dates" in fields else date_values
            for d in per_dates:
                if d is None and "files" not in fields:
                    raise BatchError(f"{where(at)}: no dates: give dates here or under matrix.dates")
                f = fields | ({} if d is None else {"dates": d})
                ovr = [f"data.assets.{asset}={_value_literal(f)}"]
                ovr += [f"{k}={_value_literal(v)}" for k, v in entry.set.items()]
                asset_choices.append((ovr, str(f.get("venue", "files")), str(f.get("symbol", asset)),
                                      _dates_of(f.get("dates")), at))

    axes = list(matrix.params.items())
    runs: list[RunSpec] = []
    for choice in asset_choices:
        for combo in itertools.product(*[vals for _, vals in axes]):
            p = {k: v for (k, _), v in zip(axes, combo, strict=True)}
            ovr = base_overrides + list(choice[0]) + [f"{k}={_value_literal(v)}" for k, v in p.items()]
            runs.append(RunSpec(len(runs), ovr, choice[1], choice[2], choice[3], p, config={"_at": choice[4]}))

    cat_path = Path(catalog) if catalog is not None else (
        (path.parent / spec.catalog).resolve() if spec.catalog else None)
    registry = None
    seen: dict[str, RunSpec] = {}
    for run in runs:
        at = run.config.pop("_at")
        try:
            loaded, registry, parts = load_strategy(strategy_path, run.overrides, registry=registry,
                                                     text=strategy_text)
        except QuotelabError as exc:
            raise BatchError(_blame(exc, run, at, base_overrides, axes, where, strategy_path, strategy_text,
                                    registry)) from exc
        cfg = loaded.config.model_dump(mode="json")
        for part in parts:
            node: Any = cfg
            for k in part.at:
                node = node[k]
            # Each plugin's validated params (units parsed, defaults filled): 2 and 2.0 are the same run.
            node["params"] = part.params.model_dump(mode="json")
        if cat_path is None and loaded.config.data.catalog is not None:
            cat_path = (strategy_path.parent / loaded.config.data.catalog).resolve()
        cfg["data"]["catalog"] = None  # where the data lives is not what the run is
        run.config = cfg
        run.run_id = run_hash(cfg)
        if run.run_id in seen:
            raise BatchError(f"{where(at)}: run {run.label} is the same run as {seen[run.run_id].label} "
                             f"(identical expanded config); remove the duplicate")
        seen[run.run_id] = run
    # Runs over the same data go out together so each worker's page cache and loaded plugins stay warm.
    runs.sort(key=lambda r: (r.venue, r.symbol, r.dates, r.index))
    return Batch(path, strategy_path, strategy_text, cat_path, runs)


def _inline_text(path: Path) -> str:
    """The inline ``strategy:`` block as a document of its own, on the same lines as in the batch file.

    Blank lines stand in for everything else and the block is dedented, so the strategy validator's
    ``file:line`` messages point into the batch file exactly.
    """
    text = path.read_text()
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    for k, v in root.value:
        if k.value == "strategy":
            if v.flow_style:  # `strategy: {...}` on one line: no block to cut out, lines are approximate
                return "\n" * v.start_mark.line + yaml.safe_dump(load_yaml(path)[0]["strategy"])
            start, end = v.start_mark.line, v.end_mark.line + (1 if v.end_mark.column else 0)
            break
    lines = text.splitlines()
    block = lines[start:end]
    indent = min((len(x) - len(x.lstrip()) for x in block if x.strip() and not x.lstrip().startswith("#")),
                 default=0)
    body = [x[indent:] if x[:indent].strip() == "" else x for x in block]
    return "\n" * start + "\n".join(body) + "\n"


def _dates_of(spec: Any) -> list[str]:
    if spec is None:
        return []
    try:
        return expand_dates(spec)
    except ValueError:
        return [str(spec)]


def _blame(exc: Exception, run: RunSpec, at: tuple, base: list[str], axes: list, where: Callable[[tuple], str],
           strategy_path: Path, strategy_text: str, registry: Any) -> str:
    """Find what makes a run invalid: the base, then --set, then its asset, then each matrix param in turn."""
    n_asset = len(run.overrides) - len(axes)
    steps = [(0, where(("strategy",)))]
    steps += [(i + 1, f"--set {o}") for i, o in enumerate(base)]
    steps += [(n_asset, where(at))]
    steps += [(n_asset + j + 1, where(("matrix", "params", k))) for j, (k, _) in enumerate(axes)]
    culprit = steps[0][1]
    for upto, blame in steps:
        try:
            load_strategy(strategy_path, run.overrides[:upto], registry=registry, text=strategy_text)
        except QuotelabError:
            culprit = blame
            break
    why = made_by(str(exc), run.overrides[len(base):], "the run's")
    return f"{culprit}: run {run.label} is invalid:\n  {why.replace(chr(10), chr(10) + '  ')}"


def made_by(message: str, overrides: Sequence[str], who: str) -> str:
    """A strategy error about a value the file's runs set, not the command line: the strategy loader names
    such a value's place ``--set 'PATH=VALUE'``, which the user did not type; it is ``who`` 'PATH=VALUE'."""
    for o in overrides:
        message = message.replace(f"--set {o!r}", f"{who} {o!r}")
    return message


def run_hash(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

