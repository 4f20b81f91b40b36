"""The composer's generated strategy kernel: each kind of part compiled once and shared, its values against
references written from the formulas, and a kernel that needs numba's reference counting."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from reference_impls import asset, level_imbalance, mids, multi_level_imbalance

from quotelab import layout as L
from quotelab.research.replay import context, replay_composition
from quotelab.strategy import codegen
from quotelab.strategy.composer import Part, compose
from quotelab.strategy.config import Alpha
from quotelab.strategy.registry import load_registry


def _part(registry, role, name, raw, where, **kw):
    c = registry.get(role, name)
    return Part(c, c.make_params(raw), where, **kw)


def _imports(composition) -> dict[str, object]:
    """The compiled parts a strategy kernel calls, by their alias in its module (k0, k1, ...)."""
    module = sys.modules[composition.module]
    return {name: v for name, v in vars(module).items() if name[0] == "k" and name[1:].isdigit()}


def test_a_second_strategy_calls_the_parts_the_first_compiled_and_matches_the_formulas(markets, registry):
    perp, spot = asset(markets, "synth_perp", "perp"), asset(markets, "synth_spot", "spot")
    tick = perp.tick_size
    seed = compose([_part(registry, "fair_value", "mid", {}, "fair_value[0]")],
                   [_part(registry, "signal", "book_imbalance", {}, "forecast[0]", alpha=Alpha(price=2 * tick))],
                   [_part(registry, "risk", "inventory_skew", {"position_unit": 0.01}, "risk[0]")],
                   _part(registry, "quoter", "fixed_spread", {"size": 0.01}, "quoter"), context([perp]))
    # another layout: two assets, two signals on different depths, other params and offsets
    demo = compose(
        [_part(registry, "fair_value", "mid", {"asset": "perp"}, "fair_value[0]")],
        [_part(registry, "signal", "book_imbalance", {"asset": "perp", "weights": [0.7, 0.2, 0.1]}, "forecast[0]",
               alpha=Alpha(price=2 * tick)),
         _part(registry, "signal", "book_imbalance", {"asset": "spot"}, "forecast[1]", alpha=Alpha(price=tick))],
        [_part(registry, "risk", "inventory_skew", {"position_unit": 0.01}, "risk[0]")],
        _part(registry, "quoter", "fixed_spread", {"half_spread": 3, "size": 0.01, "levels": 2, "level_spacing": 2},
              "quoter"),
        context([perp, spot]))
    assert demo.module != seed.module
    # the same four compiled parts, not compiled again for the second strategy
    assert {id(f) for f in _imports(demo).values()} == {id(f) for f in _imports(seed).values()}
    assert len(_imports(demo)) == 4

    res = replay_composition(demo, [perp, spot], keep_view=True)
    v, out = res.views, res.outs
    assert len(out) > 3000
    fv = mids(v, 0)
    fc = 2 * tick * multi_level_imbalance(v, 0, [0.7, 0.2, 0.1]) + tick * level_imbalance(v, 1, 0)
    risk = 0.5 * (v[:, 0, L.POSITION] / 0.01) * 10 * tick
    np.testing.assert_array_equal(out[:, L.FAIR_VALUE], fv)
    np.testing.assert_allclose(out[:, L.FORECAST], fc, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out[:, L.RISK], risk)
    np.testing.assert_allclose(out[:, L.RESERVATION], fv + fc - risk, rtol=1e-15)
    np.testing.assert_array_equal(res.values, out[:, L.RESERVATION])
    bid = np.minimum(np.round((out[:, L.RESERVATION] - 3 * tick) / tick), v[:, 0, L.BEST_BID_TICK])
    ask = np.maximum(np.round((out[:, L.RESERVATION] + 3 * tick) / tick), v[:, 0, L.BEST_ASK_TICK])
    np.testing.assert_array_equal(out[:, L.Q_BID_TICK:L.Q_BID_TICK + 2], np.stack([bid, bid - 2], axis=1))
    np.testing.assert_array_equal(out[:, L.Q_ASK_TICK:L.Q_ASK_TICK + 2], np.stack([ask, ask + 2], axis=1))
    np.testing.assert_array_equal(out[:, L.COMPONENTS], fv)
    assert np.std(fc) > 0 and (out[:, L.STATUS] == 0).all()


ALLOCATING = '''
import numpy as np
from numba import njit
from quotelab import hookimpl
from quotelab.component import Component, Params
from quotelab.layout import ASK_QTY, BID_QTY


class P(Params):
    pass


@njit(inline="always")
def depth_gap_nb(view, trades, state, params, out):
    buf = np.empty(2)  # an array per step: needs numba's reference counting
    buf[0] = view[0, BID_QTY]
    buf[1] = view[0, ASK_QTY]
    return buf[0] - buf[1]


@hookimpl
def quotelab_register_components(register):
    register(Component(role="signal", name="depth_gap", params=P, kernel=depth_gap_nb, doc="Qb - Qa."))
'''


def test_a_kernel_that_allocates_is_compiled_with_reference_counting(markets, tmp_path, monkeypatch):
    plugin = tmp_path / "depth_gap_plugin.py"
    plugin.write_text(ALLOCATING)
    local = load_registry(local_files=[plugin], entry_points=False)
    perp = asset(markets, "synth_perp", "perp")

    def composed(alpha: float):
        return compose([_part(local, "fair_value", "mid", {}, "fair_value[0]")],
                       [_part(local, "signal", "depth_gap", {}, "forecast[0]", alpha=Alpha(price=alpha))], [], None,
                       context([perp]))

    composed(1.0)
    # the next strategy goes straight to the module with reference counting, without failing a compile first
    tried = []
    load = codegen.load_module
    monkeypatch.setattr(codegen, "load_module", lambda source, *a: tried.append(source) or load(source, *a))
    comp = composed(1e-3)
    assert [("_nrt=False" in s) for s in tried if "depth_gap_nb" in s] == [False]
    sources = [Path(sys.modules[f.py_func.__module__].__file__).read_text() for f in _imports(comp).values()]
    assert [("depth_gap_nb" in s, "_nrt=False" in s) for s in sources] == [(False, True), (True, False)]
    res = replay_composition(comp, [perp], keep_view=True)
    gap = res.views[:, 0, L.BID_QTY] - res.views[:, 0, L.ASK_QTY]
    np.testing.assert_array_equal(res.outs[:, L.COMPONENTS + 1], gap)
    np.testing.assert_allclose(res.values, mids(res.views, 0) + 1e-3 * gap, rtol=1e-15)
    assert np.std(gap) > 0
