"""Per-asset exchange models: fees by value, quantity or fill; latency constant, recorded or from the
feed; queue models; partial fills refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from hftbacktest.types import EXCH_EVENT, LOCAL_EVENT

from quotelab.backtest.engine import order_latency, run_strategy
from quotelab.data import catalog as cat
from quotelab.data.assets import Asset
from quotelab.errors import ConfigError
from quotelab.strategy.config import AssetEngine

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "strategies" / "seed_market_maker.yaml"
BOTH = EXCH_EVENT | LOCAL_EVENT
FINAL = ("num_trades", "position", "fee", "trading_volume", "trading_value")


def _run(real_catalog: Path, tmp_path: Path, name: str, **engine):
    doc = yaml.safe_load(SEED.read_text())
    doc["data"]["catalog"] = str(real_catalog)
    doc["engine"]["defaults"].update(engine)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return run_strategy(path).summary


def test_fee_models_by_hand(real_catalog, tmp_path):
    # The seed's orders are post-only (GTX), so every fill is a maker fill.
    value = _run(real_catalog, tmp_path, "value")
    assert value["fee"] == pytest.approx(-0.00005 * value["trading_value"], rel=1e-12)
    qty = _run(real_catalog, tmp_path, "qty", fees={"model": "quantity", "maker": -0.25, "taker": 9.0})
    flat = _run(real_catalog, tmp_path, "flat", fees={"model": "flat", "maker": 0.125, "taker": 9.0})
    for s in (qty, flat):
        assert {k: s[k] for k in FINAL if k != "fee"} == {k: value[k] for k in FINAL if k != "fee"}
    assert qty["fee"] == pytest.approx(-0.25 * value["trading_volume"], rel=1e-12)
    assert flat["fee"] == pytest.approx(0.125 * value["num_trades"], rel=1e-12)
    assert flat["equity"] - value["equity"] == pytest.approx(value["fee"] - flat["fee"], abs=1e-6)


def test_recorded_latency_equal_to_the_constant_gives_the_same_fills(real_catalog, tmp_path):
    day = cat.load_day(real_catalog, "binance-usdm", "BTCUSDT", "20240808")
    req = np.arange(day["local_ts"].min() - 10**9, day["local_ts"].max() + 10**9, 10**8, dtype=np.int64)
    rows = np.zeros(len(req), [("req_ts", "i8"), ("exch_ts", "i8"), ("resp_ts", "i8")])
    rows["req_ts"], rows["exch_ts"], rows["resp_ts"] = req, req + 6_000_000, req + 6_000_000 + 14_000_000
    np.save(tmp_path / "lat.npy", rows)
    constant = _run(real_catalog, tmp_path, "const", latency={"entry": "6ms", "response": "14ms"})
    recorded = _run(real_catalog, tmp_path, "rec", latency={"model": "recorded", "file": "lat.npy"})
    assert {k: recorded[k] for k in FINAL} == {k: constant[k] for k in FINAL}
    # the offset moves both latencies: +4 ms each is the constant 10/18 ms
    shifted = _run(real_catalog, tmp_path, "shift", latency={"model": "recorded", "file": "lat.npy", "offset": "4ms"})
    wider = _run(real_catalog, tmp_path, "wider", latency={"entry": "10ms", "response": "18ms"})
    assert {k: shifted[k] for k in FINAL} == {k: wider[k] for k in FINAL}
    rows["exch_ts"][5] = rows["req_ts"][5] - 1
    np.save(tmp_path / "bad.npy", rows)
    with pytest.raises(ConfigError, match="order latency is negative at row 5"):
        _run(real_catalog, tmp_path, "bad", latency={"model": "recorded", "file": "bad.npy"})


def test_feed_latency_rows_against_a_loop(real_catalog):
    day = cat.load_day(real_catalog, "binance-usdm", "BTCUSDT", "20240808")
    eng = AssetEngine(latency={"model": "feed", "entry_scale": 2.0, "entry": "1ms", "response_scale": 0.5,
                               "response": "3ms", "sample": "250ms"}, feed_latency_offset="2ms")
    feed = Asset("perp", [day], 0.1, 0.001, venue="binance-usdm", symbol="BTCUSDT")
    rows = order_latency(feed, eng, str, ("engine", "defaults"), Path("."))
    want, last_bucket = [], None
    for r in day:
        if int(r["ev"]) & BOTH != BOTH:
            continue
        local = int(r["local_ts"]) + 2_000_000
        if local // 250_000_000 == last_bucket:
            continue
        last_bucket = local // 250_000_000
        fl = local - int(r["exch_ts"])
        ex = local + round(2.0 * fl + 1_000_000)
        want.append((local, ex, ex + round(0.5 * fl + 3_000_000)))
    assert [tuple(map(int, (r["req_ts"], r["exch_ts"], r["resp_ts"]))) for r in rows] == want
    assert len(want) > 1000


def test_feed_latency_runs_and_negative_offsets_are_refused(real_catalog, tmp_path):
    feed = _run(real_catalog, tmp_path, "feed", latency={"model": "feed", "entry": "0ms", "response": "0ms"})
    assert feed["num_trades"] > 100
    with pytest.raises(ConfigError, match=r"engine.defaults.feed_latency_offset: perp's feed latency .* reaches"):
        _run(real_catalog, tmp_path, "neg", feed_latency_offset="-5ms")
    with pytest.raises(ConfigError, match=r"latency\.entry: expected between 0 s and 1 h, got -0\.001 s"):
        _run(real_catalog, tmp_path, "negc", latency={"entry": "-1ms"})


@pytest.mark.parametrize("queue", ["log_prob", "log_prob_model2", "power_prob", "power_prob_model2",
                                   "power_prob_model3"])
def test_every_queue_model_runs(real_catalog, tmp_path, queue):
    s = _run(real_catalog, tmp_path, queue, queue=queue, queue_power=3.0)
    assert s["num_trades"] > 100 and np.isfinite(s["equity"])


def test_power_prob_exponent_reaches_hftbacktest(real_catalog, tmp_path):
    alias = _run(real_catalog, tmp_path, "alias", queue="power_prob3")
    same = _run(real_catalog, tmp_path, "same", queue="power_prob", queue_power=3.0)
    assert {k: same[k] for k in FINAL} == {k: alias[k] for k in FINAL}
    other = [_run(real_catalog, tmp_path, f"n{n}", queue="power_prob", queue_power=n) for n in (0.5, 8.0)]
    assert len({tuple(s[k] for k in FINAL) for s in [same, *other]}) > 1


def test_partial_fills_are_refused_with_the_reason(real_catalog, tmp_path):
    with pytest.raises(ConfigError, match=r"partial_fills: true is refused: hftbacktest 2.4.*#299, #316"):
        _run(real_catalog, tmp_path, "pf", partial_fills=True)
