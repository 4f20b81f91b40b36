"""Params by name: the offsets a kernel reads are generated from its params model, and the pack puts
each value there (quotelab.component.param_offsets / pack_fields)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import pytest
from numba import njit
from pydantic import Field

from quotelab.component import (
    Asset,
    AssetName,
    Component,
    Encode,
    PackContext,
    Params,
    Width,
    default_pack,
    layout_of,
    pack_fields,
    param_choices,
    param_offsets,
)
from quotelab.errors import PluginError
from quotelab.kernels.quotes import ModelQuoterParams
from quotelab.plugins.avellaneda_stoikov import P as AS
from quotelab.plugins.glft import P as GLFT
from quotelab.strategy.registry import load_registry

CTX = PackContext(asset_index={"perp": 0, "spot": 1, "quoted": 0}, tick_size={}, lot_size={}, quoted="perp")


class Example(Params):
    asset: Asset = "quoted"
    path: str = "unpacked.csv"
    mode: Annotated[Literal["up", "down"], Encode(up=1.0, down=-1.0)] = "down"
    shape: Literal["a", "b", "c"] = "c"
    lag: Literal[0, 1] = 1
    on: bool = True
    weights: Annotated[tuple[float, ...], Width(4, pad=9.0)] = (0.5, 0.25)
    venues: Annotated[tuple[str, ...], AssetName, Width(3)] = ("spot", "perp")
    scale: float = 2.5


def test_each_value_is_read_back_at_its_named_offset():
    P = param_offsets(Example, table=3, tail=None)
    p = Example()
    packed = pack_fields(p, CTX, table=[7.0, 8.0], tail=np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert packed[P.asset] == 0 and packed[P.mode] == -1.0 and packed[P.shape] == 2 and packed[P.lag] == 1
    assert packed[P.on] == 1.0 and packed[P.scale] == 2.5
    assert packed[P.n_weights] == 2 and packed[P.weights:P.weights + 4] == [0.5, 0.25, 9.0, 9.0]
    assert packed[P.n_venues] == 2 and packed[P.venues:P.venues + 3] == [1.0, 0.0, 0.0]
    assert packed[P.table:P.table + 3] == [7.0, 8.0, 0.0]
    assert packed[P.tail:] == [1.0, 2.0, 3.0, 4.0]
    assert "path" not in P._fields
    assert param_choices(Example, "mode") == (1, -1) and param_choices(Example, "shape")._asdict() == {
        "a": 0, "b": 1, "c": 2}


def test_a_field_added_to_a_shared_base_moves_every_user_alike():
    # The model quoters share ModelQuoterParams: the same field is at the same offset in both.
    base = param_offsets(ModelQuoterParams)
    for name, offset in base._asdict().items():
        assert getattr(AS, name) == getattr(GLFT, name) == offset, name
    assert AS.horizon >= len(base) and GLFT.arrival_rate >= len(base)

    class Base(Params):
        asset: Asset = "quoted"
        gamma: float = 0.1

    class Grown(Base):
        k: float = 0.5  # a field added to the base moves a subclass's own fields, never the shared ones

    class Sub(Base):
        horizon: float = 10.0

    class SubOfGrown(Grown):
        horizon: float = 10.0

    before, after = param_offsets(Sub), param_offsets(SubOfGrown)
    assert before.gamma == after.gamma and after.horizon == before.horizon + 1
    # ... and the pack follows the offsets, so the kernel reads the same value by the same name.
    for P, model in ((before, Sub), (after, SubOfGrown)):
        packed = default_pack(model(gamma=0.3, horizon=4.0), CTX)
        assert packed[P.gamma] == 0.3 and packed[P.horizon] == 4.0


def test_every_builtin_kernel_reads_params_by_name():
    registry = load_registry()
    builtins = [c for c in registry.all() if c.source.startswith("quotelab") and hasattr(c, "kernel")]
    assert len(builtins) >= 20
    missing = [c.name for c in builtins if layout_of(c.params) is None]
    assert not missing, f"built-ins without param_offsets: {missing}"


def test_a_sequence_without_a_width_or_a_missing_derived_value_is_refused():
    class Bad(Params):
        weights: tuple[float, ...] = (1.0,)

    with pytest.raises(PluginError, match=r"Bad\.weights: a sequence needs a fixed packed width"):
        param_offsets(Bad)

    class Derived(Params):
        x: float = 1.0

    param_offsets(Derived, table=2)
    with pytest.raises(PluginError, match=r"exactly the derived values \['table'\]"):
        pack_fields(Derived(), CTX)
    with pytest.raises(PluginError, match="3 values, at most 2 fit"):
        pack_fields(Derived(), CTX, table=[1.0, 2.0, 3.0])
    with pytest.raises(PluginError, match="declare derived values"):
        Component(role="signal", name="derived_default_pack", params=Derived, kernel=_kernel_nb)


class OldStyle(Params):
    # A model never laid out keeps the original packing, which plugins written with params[i] expect.
    mode: Literal["a", "b"] = "b"
    alpha: float = 0.1
    levels: tuple[float, ...] = (1.0, 2.0, 3.0)


@njit(inline="always")
def _kernel_nb(view, trades, state, params, out):
    return params[0]


def test_plugins_written_before_offsets_pack_as_before():
    assert layout_of(OldStyle) is None
    assert default_pack(OldStyle(), CTX) == [0.1, 1.0, 2.0, 3.0]
    c = Component(role="signal", name="old_style", params=OldStyle, kernel=_kernel_nb,
                  pack=lambda p, ctx: [p.alpha, float(len(p.levels))])
    assert c.pack(OldStyle(), CTX) == [0.1, 3.0]


def test_encoded_nan_and_literal_numbers_pack_as_numbers():
    class Warm(Params):
        warmup: Annotated[Literal["zero", "undefined"], Encode(zero=0.0, undefined=float("nan"))] = "undefined"
        scale: float = Field(1.0)

    P = param_offsets(Warm)
    assert math.isnan(pack_fields(Warm(), CTX)[P.warmup])
