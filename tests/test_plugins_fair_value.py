"""Fair-value kernels against references written from their formulas, at every step of real data."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PERP_SPOT, SYMBOLS
from reference_impls import (
    SEED_SHAPES,
    asset,
    imbalance_mid,
    level_imbalance,
    mids,
    multi_level_imbalance,
    time_ewma,
)

from quotelab import layout as L
from quotelab.component import PackContext
from quotelab.research.replay import replay_component


def _run(registry, name, params, assets, **kw):
    comp = registry.get("fair_value", name)
    res = replay_component(comp, params, assets, keep_view=True, **kw)
    assert len(res.values) > 3000
    return res


@pytest.mark.parametrize("key", SYMBOLS)
def test_mid_equals_reference(markets, registry, key):
    res = _run(registry, "mid", {}, [asset(markets, key)])
    np.testing.assert_array_equal(res.values, mids(res.views, 0))
    assert np.std(res.values) > 0


@pytest.mark.parametrize("key", SYMBOLS)
@pytest.mark.parametrize("shape", list(SEED_SHAPES))
def test_weighted_mid_shapes_equal_reference(markets, registry, key, shape):
    res = _run(registry, "weighted_mid", {"shape": shape}, [asset(markets, key)])
    want = imbalance_mid(res.views, 0, SEED_SHAPES[shape])
    np.testing.assert_allclose(res.values, want, rtol=1e-13)
    # The adjustment is not trivially zero: the shape moves the price off the mid at some steps.
    assert np.abs(res.values - mids(res.views, 0)).max() > 0


@pytest.mark.parametrize("key", SYMBOLS)
def test_weighted_mid_polynomial_equals_reference(markets, registry, key):
    c = (0.01, 0.3, 0.0, 0.2)
    res = _run(registry, "weighted_mid", {"shape": "polynomial", "coefficients": c}, [asset(markets, key)])
    want = imbalance_mid(res.views, 0, lambda i: c[0] + c[1] * i + c[2] * i ** 2 + c[3] * i ** 3)
    np.testing.assert_allclose(res.values, want, rtol=1e-13)


def test_weighted_mid_rejects_coefficients_without_polynomial(registry):
    comp = registry.get("fair_value", "weighted_mid")
    with pytest.raises(ValueError, match="polynomial"):
        comp.make_params({"shape": "cubic", "coefficients": [1.0]})


@pytest.mark.parametrize("key", SYMBOLS)
@pytest.mark.parametrize("shape", ["linear", "cubic"])
def test_multi_level_imbalance_mid_equals_reference(markets, registry, key, shape):
    w = (0.7, 0.2, 0.1)
    res = _run(registry, "multi_level_imbalance_mid", {"weights": w, "shape": shape}, [asset(markets, key)])
    v = res.views
    imb = multi_level_imbalance(v, 0, w)
    bid, ask = v[:, 0, L.BEST_BID], v[:, 0, L.BEST_ASK]
    np.testing.assert_allclose(res.values, (bid + ask) / 2 + (ask - bid) * SEED_SHAPES[shape](imb), rtol=1e-13)
    assert not np.allclose(imb, level_imbalance(v, 0, 0))


@pytest.mark.parametrize("keys", [("usdm_btc", "cm_btc", "spot_btc"), ("usdm_eth", "cm_eth", "spot_eth"),
                                  ("synth_perp", "synth_spot")])
def test_multi_venue_mid_equals_reference_with_inverse_contract(markets, registry, keys):
    names = ["perp", "inverse", "spot"] if len(keys) == 3 else ["perp", "spot"]
    assets = [asset(markets, k, n) for k, n in zip(keys, names, strict=True)]
    assert assets[1].inverse == keys[1].startswith("cm_")  # the synthetic market has no inverse contract
    weights = [3.0, 1.0, 2.0][:len(keys)]
    res = _run(registry, "multi_venue_mid", {"assets": names, "weights": weights}, assets)
    want = sum(w * mids(res.views, i) for i, w in enumerate(weights)) / sum(weights)
    np.testing.assert_allclose(res.values, want, rtol=1e-13)
    adjusted = _run(registry, "multi_venue_mid", {"assets": names[:2], "weights": [3.0, 1.0],
                                                  "imbalance_weight": 1.0, "shape": "cubic"}, assets)
    want = (3.0 * imbalance_mid(adjusted.views, 0, SEED_SHAPES["cubic"])
            + imbalance_mid(adjusted.views, 1, SEED_SHAPES["cubic"])) / 4.0
    np.testing.assert_allclose(adjusted.values, want, rtol=1e-13)


@pytest.mark.parametrize(("perp", "spot"), PERP_SPOT)
def test_spot_plus_basis_equals_reference(markets, registry, perp, spot):
    assets = [asset(markets, perp, "perp"), asset(markets, spot, "spot")]
    res = _run(registry, "spot_plus_basis", {"spot": "spot", "half_life": 5.0}, assets)
    spot, perp = mids(res.views, 1), mids(res.views, 0)
    want = spot + time_ewma(perp - spot, res.views[:, 0, L.STEP_SECONDS], 5.0)
    np.testing.assert_allclose(res.values, want, rtol=1e-12)
    assert np.abs(res.values - perp).max() > 0


@pytest.mark.parametrize("key", SYMBOLS)
@pytest.mark.parametrize("shape", ["nonic", "cubic_linear", "shifted"])
def test_multi_level_factor_weights_weight_the_second_factor(markets, registry, key, shape):
    w, fw = (0.7, 0.2, 0.1), (0.6, 0.3, 0.1)
    params = {"weights": w, "factor_weights": fw, "shape": shape}
    res = _run(registry, "multi_level_imbalance_mid", params, [asset(markets, key)])
    v = res.views
    b, b2 = multi_level_imbalance(v, 0, w), multi_level_imbalance(v, 0, fw)
    f = {"nonic": b * (b2 ** 8 + 1) / 4, "cubic_linear": b * (b2 ** 2 + 1) / 4,
         "shifted": (b + 0.3) * (b2 ** 4 + 0.7) / 3.8}[shape]
    bid, ask = v[:, 0, L.BEST_BID], v[:, 0, L.BEST_ASK]
    np.testing.assert_allclose(res.values, (bid + ask) / 2 + (ask - bid) * f, rtol=1e-13)
    same = _run(registry, "multi_level_imbalance_mid", {"weights": w, "shape": shape}, [asset(markets, key)])
    assert not np.array_equal(res.values, same.values)


def test_multi_level_factor_weights_are_checked(registry):
    comp = registry.get("fair_value", "multi_level_imbalance_mid")
    with pytest.raises(ValueError, match="two-factor shapes only"):
        comp.make_params({"shape": "cubic", "factor_weights": [1.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match=r"one weight per level \(3\), got 2"):
        comp.make_params({"shape": "nonic", "factor_weights": [1.0, 0.0]})


@pytest.mark.parametrize("key", ["usdm_btc", "synth_perp"])
@pytest.mark.parametrize("name", ["weighted_mid", "multi_level_imbalance_mid"])
def test_empty_level_is_zero_or_undefined_as_asked(markets, registry, name, key):
    # Recorded views with the best (weighted_mid) or second level emptied on every 7th step.
    res = _run(registry, name, {}, [asset(markets, key)])
    views = res.views[:700].copy()
    level = 0 if name == "weighted_mid" else 1
    views[::7, 0, L.BID_SZ + level] = 0.0
    views[::7, 0, L.ASK_SZ + level] = 0.0
    if level == 0:
        views[::7, 0, L.BID_QTY] = 0.0
        views[::7, 0, L.ASK_QTY] = 0.0
    comp = registry.get("fair_value", name)
    ctx = PackContext.of([asset(markets, key)], 0)
    out = np.zeros(L.OUT_WIDTH)
    got = {}
    for empty in ("zero", "undefined"):
        params = np.array(comp.pack(comp.make_params({"empty_level": empty}), ctx), dtype=np.float64)
        got[empty] = np.array([comp.kernel(v, np.zeros((1, 1, L.TR_WIDTH)), np.zeros(1), params, out)
                               for v in views])
    emptied = np.zeros(len(views), bool)
    emptied[::7] = True
    assert np.isnan(got["undefined"][emptied]).all() and np.isfinite(got["undefined"][~emptied]).all()
    np.testing.assert_array_equal(got["zero"][~emptied], got["undefined"][~emptied])
    assert np.isfinite(got["zero"]).all()
