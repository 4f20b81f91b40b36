"""What each built-in part costs per step: a strategy using it against a minimal one, same synthetic hour.

Every strategy is the minimal one (``mid`` + ``fixed_spread``) with one part added or swapped in;
parts that read the spot book are compared with the minimal strategy that also loads the spot.
The engine column is a strategy's median run time minus its baseline's; it also moves with how
many orders the strategy sends and with whatever else runs on the machine, so it is shown, not
judged. The seed strategy is
listed for reference. Medians of --repeat runs, after one warm-up run of each (compiles excluded).

Engine run times include order handling, which differs between strategies, so the same fused
kernels are also replayed without hftbacktest (quotelab.research.replay: book rebuild + kernel only); the
"kernel ns/step" column is that replay time (fastest of the repeats) minus the minimal
strategy's, per step. That is the part's cost: it is flagged when, over the hour's steps, it is
more than 20% of hftbacktest's bare ``elapse(100ms)`` loop over the perp.

    python bench/plugins.py [--catalog DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
from compose import bare_elapse  # noqa: E402  (the same anchor loop as bench/compose.py)

FLAG_SHARE = 0.20
QUOTER = {"kind": "fixed_spread", "params": {"half_spread": 2, "size": 0.01, "max_position": 0.1}}
SEED = {
    "fair_value": [{"kind": "mid"}],
    "forecast": [{"kind": "book_imbalance", "alpha": "2ticks"}],
    "risk": [{"kind": "inventory_skew", "params": {"risk_aversion": 0.5, "position_unit": 0.01, "volatility": 10}}],
    "quoter": QUOTER,
}

# name → (family, needs spot, the strategy's sections beyond the minimal one)
CASES: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "weighted_mid": ("fair_value", False, {"fair_value": [{"kind": "weighted_mid", "params": {"shape": "cubic"}}]}),
    "multi_level_imbalance_mid": ("fair_value", False, {"fair_value": [{"kind": "multi_level_imbalance_mid"}]}),
    "multi_venue_mid": ("fair_value", True, {"fair_value": [
        {"kind": "multi_venue_mid", "params": {"assets": ["perp", "spot"], "weights": [2, 1]}}]}),
    "spot_plus_basis": ("fair_value", True, {"fair_value": [
        {"kind": "spot_plus_basis", "params": {"spot": "spot", "half_life": 30}}]}),
    "book_imbalance": ("signal", False, {"forecast": [{"kind": "book_imbalance", "alpha": "2ticks"}]}),
    "trade_flow_imbalance": ("signal", False, {"forecast": [
        {"kind": "trade_flow_imbalance", "alpha": "2ticks", "params": {"lag": 1}}]}),
    "composite_imbalance": ("signal", False, {"forecast": [{"kind": "composite_imbalance", "alpha": "2ticks"}]}),
    "order_flow_imbalance": ("signal", False, {"forecast": [
        {"kind": "order_flow_imbalance", "alpha": "1tick", "params": {"weights": [1, 0.5, 0.25], "window": 20,
                                                                      "depth_scaled": True}}]}),
    "returns": ("signal", True, {"forecast": [
        {"kind": "returns", "alpha": "0.3bps", "params": {"asset": "spot", "horizon": 10}}]}),
    "basis_change": ("signal", True, {"forecast": [
        {"kind": "basis_change", "alpha": "0.3bps", "params": {"spot": "spot", "horizon": 10}}]}),
    "linear_forecast": ("signal", False, {"forecast": [
        {"kind": "book_imbalance", "alpha": "1tick"},
        {"kind": "linear_forecast", "alpha": "1tick", "params": {"inputs": [1], "coefficients": [0.5]}}]}),
    "inventory_skew (EWMA vol)": ("risk", False, {"risk": [{"kind": "inventory_skew", "params": {
        "risk_aversion": 0.5, "position_unit": 0.01, "volatility": 10, "volatility_half_life": 60}}]}),
    "position_limits": ("risk", False, {"risk": [{"kind": "position_limits", "params": {
        "max_position": 0.08, "soft_position": 0.04}}]}),
    "volatility_spread": ("quoter", False, {"quoter": {"kind": "volatility_spread", "params": {
        "volatility_half_life": 60, "size": 0.01, "max_position": 0.1}}}),
    "avellaneda_stoikov": ("quoter", False, {"quoter": {"kind": "avellaneda_stoikov", "params": {
        "volatility_half_life": 60, "position_unit": 0.01, "size": 0.01, "max_position": 0.1}}}),
    "glft": ("quoter", False, {"quoter": {"kind": "glft", "params": {
        "volatility_half_life": 60, "position_unit": 0.01, "size": 0.01, "max_position": 0.1}}}),
    "glft (A, k fitted, 600 steps)": ("quoter", False, {"quoter": {"kind": "glft", "params": {
        "volatility_half_life": 60, "position_unit": 0.01, "size": 0.01, "max_position": 0.1, "fit_window": 600}}}),
}


def strategy_doc(name: str, catalog: Path, spot: bool, sections: dict[str, Any]) -> dict[str, Any]:
    assets = {"perp": {"venue": "synthetic", "symbol": "SYNPERP", "dates": [20240101]}}
    if spot:
        assets["spot"] = {"venue": "synthetic", "symbol": "SYNSPOT", "dates": [20240101]}
    return {
        "name": name,
        "data": {"catalog": str(catalog), "quote": "perp", "assets": assets},
        "engine": {"step": "100ms", "defaults": {"latency": {"entry": "10ms", "response": "10ms"}}},
        "fair_value": [{"kind": "mid"}],
        "quoter": QUOTER,
        **sections,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalog", type=Path, default=None, help="catalog with synthetic 20240101 (made if absent)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from quotelab.backtest.engine import run_strategy
    from quotelab.data import catalog as cat
    from quotelab.data.synth import generate

    scratch = Path(tempfile.mkdtemp(prefix="qlbench_"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    catalog = args.catalog or scratch / "catalog"
    if not (catalog / "synthetic" / "SYNSPOT" / "20240101.npz").exists():
        generate(catalog, seed=7, start="2024-01-01T00:00:00", duration_s=3600.0, assets=("perp", "spot"))
    data = [cat.load_day(catalog, "synthetic", "SYNPERP", "20240101")]
    folder = scratch / "strategies"
    folder.mkdir()

    docs = {
        "minimal": ("baseline", False, strategy_doc("minimal", catalog, False, {})),
        "minimal + spot": ("baseline", True, strategy_doc("minimal_spot", catalog, True, {})),
        "seed": ("reference", False, strategy_doc("seed", catalog, False, SEED)),
    }
    for name, (family, spot, sections) in CASES.items():
        docs[name] = (family, spot, strategy_doc(name, catalog, spot, sections))
    paths = {}
    for i, (name, (_, _, doc)) in enumerate(docs.items()):
        paths[name] = folder / f"s{i}.yaml"
        paths[name].write_text(yaml.safe_dump(doc, sort_keys=False))

    from quotelab.data.assets import Asset
    from quotelab.research.replay import prepare, replay

    def replay_assets(spot: bool) -> list[Asset]:
        out = []
        for name, symbol in (("perp", "SYNPERP"), ("spot", "SYNSPOT"))[: 2 if spot else 1]:
            meta = cat.read_meta(catalog, "synthetic", symbol)
            out.append(Asset(name, [cat.load_day(catalog, "synthetic", symbol, "20240101")],
                                   meta["tick_size"], meta["lot_size"]))
        return out

    assets = {False: prepare(replay_assets(False)), True: prepare(replay_assets(True))}
    bare_elapse(data)
    compositions = {name: run_strategy(path).composition for name, path in paths.items()}

    def replay_seconds(name: str) -> float:
        comp = compositions[name]
        t = time.perf_counter()
        res = replay(assets[docs[name][1]], comp.kernel, comp.params, comp.state.copy(), n_levels=3)
        replay_seconds.steps = res.grid_steps
        return time.perf_counter() - t

    for name in paths:
        replay_seconds(name)
    kernel_times: dict[str, list[float]] = {name: [] for name in paths}
    times: dict[str, list[float]] = {name: [] for name in paths}
    bare = []
    for _ in range(args.repeat):
        bare.append(bare_elapse(data))
        for name, path in paths.items():
            times[name].append(run_strategy(path).summary["run_seconds"])
            kernel_times[name].append(replay_seconds(name))
    # Minimum, not median: the replay has no order handling to vary, so the fastest run is the
    # kernel's cost with the least interference from whatever else shares the machine.
    kmed = {name: min(t) for name, t in kernel_times.items()}
    steps = replay_seconds.steps
    med = {name: statistics.median(t) for name, t in times.items()}
    b = statistics.median(bare)
    print(f"synthetic hour: {sum(len(d) for d in data):,} perp events; medians of {args.repeat}")
    print(f"bare elapse loop (perp)          {b:.3f} s; flag: part cost > {FLAG_SHARE:.0%} of it = "
          f"{FLAG_SHARE * b * 1e3:.1f} ms")
    print(f"{'strategy':32s} {'family':10s} {'run s':>8s} {'engine Δms':>10s} {'% bare':>7s} {'kernel ns/step':>15s}")
    for name, (family, spot, _) in docs.items():
        base = "minimal + spot" if spot else "minimal"
        cost = med[name] - med[base]
        kernel_ns = (kmed[name] - kmed[base]) / steps * 1e9
        flag = "  FLAG" if family != "baseline" and kernel_ns * steps * 1e-9 > FLAG_SHARE * b else ""
        print(f"{name:32s} {family:10s} {med[name]:8.3f} {cost * 1e3:10.1f} {100 * cost / b:6.1f}% "
              f"{kernel_ns:15.0f}{flag}")


if __name__ == "__main__":
    main()
