"""``microprice``: the estimator against a reference written from Stoikov (2018), known answers, the
kernel against a slow lookup at every step of real data, the CLI, and the shipped strategy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from quotelab import layout as L
from quotelab.backtest import driver as D
from quotelab.backtest.engine import run_strategy
from quotelab.component import PackContext, pack_fields
from quotelab.data import catalog as cat
from quotelab.data.assets import Asset
from quotelab.errors import ConfigError, DataError
from quotelab.plugins.microprice import MicropriceParams, microprice_nb, pack_table
from quotelab.research.microprice import MAX_BUCKETS, MicropriceTable, estimate, fit_book, fit_catalog, top_of_book
from quotelab.research.replay import replay_component
from quotelab.strategy.registry import load_registry

REPO = Path(__file__).resolve().parents[1]
STEP_NS = 100_000_000
SYMBOLS = {"BTCUSDT": (0.1, 0.001), "ETHUSDT": (0.01, 0.001)}


def _asset(real_catalog: Path, symbol: str) -> Asset:
    tick, lot = SYMBOLS[symbol]
    return Asset(symbol, [cat.load_day(real_catalog, "binance-usdm", symbol, "20240808")], tick, lot)


# ------------------------------------------------------------------------------------------------
# The reference: Stoikov's method in pandas, from the paper (state = (imbalance bucket, spread bucket))
# ------------------------------------------------------------------------------------------------


def reference_transitions(views: np.ndarray, ts: np.ndarray, tick: float, edges: np.ndarray, m: int,
                          horizon: int = 1) -> pd.DataFrame:
    """One row per pair of grid steps ``horizon`` x 100 ms apart: buckets now and then, mid change in ticks."""
    bid, ask = views[:, 0, L.BEST_BID], views[:, 0, L.BEST_ASK]
    qb, qa = views[:, 0, L.BID_QTY], views[:, 0, L.ASK_QTY]
    df = pd.DataFrame({"ts": ts, "mid": (bid + ask) / 2, "I": (qb - qa) / (qb + qa),
                       "S": np.round((ask - bid) / tick).astype(int)})
    # pd.cut with right=False: [e_b, e_{b+1}); the top edge 1.0 belongs to the last bucket
    df["i"] = pd.cut(df["I"], bins=[*edges[:-1], np.inf], right=False, labels=False).astype(int)
    df["s"] = df["S"].clip(1, m) - 1
    later = df[["ts", "mid", "i", "s"]].rename(columns={"mid": "mid2", "i": "i2", "s": "s2"})
    later["ts"] -= horizon * STEP_NS
    df = df.merge(later, on="ts", how="inner")
    df["dM"] = np.round((df["mid2"] - df["mid"]) / tick * 2) / 2
    return df


def reference_g(df: pd.DataFrame, n: int, m: int, tol: float = 1e-10) -> np.ndarray:
    """g*(i, s) in ticks: symmetrise, count, Q/T/R, G1 = (1-Q)^-1 R K, B = (1-Q)^-1 T, g = sum B^k G1."""
    mirror = df.assign(i=n - 1 - df["i"], i2=n - 1 - df["i2"], dM=-df["dM"])
    d = pd.concat([df, mirror], ignore_index=True)
    d["x"] = d["s"] * n + d["i"]  # state (s, i), spread-major as in the paper's block matrices
    d["y"] = d["s2"] * n + d["i2"]
    states = list(range(n * m))
    rows = d.groupby("x").size().reindex(states, fill_value=0).to_numpy().astype(float)
    rows[rows == 0] = 1.0
    still, moved = d[d["dM"] == 0], d[d["dM"] != 0]

    def table(a: pd.DataFrame, col: str, columns: list) -> np.ndarray:
        counts = pd.crosstab(a["x"], a[col]).reindex(index=states, columns=columns, fill_value=0)
        return counts.to_numpy() / rows[:, None]

    Q, T = table(still, "y", states), table(moved, "y", states)
    K = np.sort(moved["dM"].unique())
    R = table(moved, "dM", list(K))
    inv = np.linalg.inv(np.eye(len(states)) - Q)
    G = inv @ R @ K
    B = inv @ T
    g = G.copy()
    while np.abs(G).max() > tol:
        G = B @ G
        g += G
    return g.reshape(m, n).T


# ------------------------------------------------------------------------------------------------
# Known answers
# ------------------------------------------------------------------------------------------------


def test_two_state_chain_has_the_closed_form_answer():
    # From "+" (bucket 1): 2x no move (stay +), 1x up 1 tick to +, 3x up 1 tick to -; the mirror gives "-".
    # G1(+) = (1 - 1/3)^-1 * 4/6 * 1 = 1 tick; after a move the chain is at + w.p. c = 1/4, so
    # B = [[c, 1-c], [1-c, c]], B G1 = (2c - 1) G1 and g*(+) = 1 / (1 - (2c - 1)) = 2/3 tick.
    imb = np.array([1, 1, 1, 1, 1, 1])
    nxt = np.array([1, 1, 1, 0, 0, 0])
    dmh = np.array([0, 0, 2, 2, 2, 2])
    zero = np.zeros(6, dtype=int)
    est = estimate(imb, zero, dmh, nxt, zero, n=2, m=1)
    np.testing.assert_allclose(est.g_ticks[:, 0], [-2 / 3, 2 / 3], rtol=1e-9)
    np.testing.assert_allclose(est.G1, [-1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(est.B, [[0.25, 0.75], [0.75, 0.25]], rtol=1e-12)
    # and the same sum in closed form: the fundamental matrix (1 - B + Pi)^-1, Pi G1 = 0
    pi = np.full((2, 2), 0.5)
    np.testing.assert_allclose(np.linalg.solve(np.eye(2) - est.B + pi, est.G1), est.g_ticks[:, 0], rtol=1e-9)


@pytest.mark.parametrize("n", [4, 5])
def test_symmetrised_estimate_is_odd_in_imbalance_and_zero_at_the_centre(n):
    rng = np.random.default_rng(n)
    k = 4000
    imb = rng.integers(0, n, k)
    # drift up from high buckets, so unsymmetrised data would give an asymmetric table
    dmh = np.where(rng.random(k) < 0.3, np.where(rng.random(k) < (imb + 1) / (n + 1), 1, -1) * rng.integers(1, 3, k), 0)
    spread, spread2, imb2 = rng.integers(0, 2, k), rng.integers(0, 2, k), rng.integers(0, n, k)
    g = estimate(imb, spread, dmh, imb2, spread2, n=n, m=2).g_ticks
    np.testing.assert_allclose(g, -g[::-1], atol=1e-12)
    if n % 2:
        np.testing.assert_allclose(g[n // 2], 0.0, atol=1e-12)
    assert (np.diff(g[:, 0]) > 0).all()  # more bid queue, higher expected mid
    # unsymmetrised, the sample's drift never averages out: B^k G1 tends to a non-zero constant
    with pytest.raises(DataError, match="did not converge in 2000 iterations"):
        estimate(imb, spread, dmh, imb2, spread2, n=n, m=2, symmetrise=False, max_iter=2000)


def test_state_that_never_moves_is_named():
    # bucket 1 only ever goes to itself without a mid change: g* is undefined there
    with pytest.raises(DataError, match=r"states \[\(1, 0\)\] .* never lead to a mid change in the sample of 3 tr"):
        estimate(np.array([1, 1, 0]), np.zeros(3, int), np.array([0, 0, 2]), np.array([1, 1, 0]), np.zeros(3, int),
                 n=3, m=1, symmetrise=False)


# ------------------------------------------------------------------------------------------------
# Real data: the estimator equals the reference; the kernel equals a slow lookup at every step
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(real_catalog, tmp_path_factory):
    out = {}
    folder = tmp_path_factory.mktemp("microprice")
    for symbol in SYMBOLS:
        table = fit_catalog(real_catalog, "binance-usdm", symbol, ["20240808"], n_buckets=10, n_spreads=2)
        out[symbol] = (table, table.save(folder / f"{symbol}.json"))
    return out


def test_kernel_equals_slow_lookup_on_the_synthetic_market(synthetic_catalog, tmp_path):
    table = fit_catalog(synthetic_catalog, "synthetic", "SYNPERP", ["20240101"], n_buckets=10, n_spreads=2)
    asset = Asset("SYNPERP", [cat.load_day(synthetic_catalog, "synthetic", "SYNPERP", "20240101")], 0.1, 0.001)
    _check_kernel_against_slow_lookup(table.save(tmp_path / "SYNPERP.json"), asset, 0.1)


@pytest.mark.parametrize("symbol", list(SYMBOLS))
def test_kernel_equals_slow_lookup_at_every_step(real_catalog, fitted, symbol):
    _check_kernel_against_slow_lookup(fitted[symbol][1], _asset(real_catalog, symbol), SYMBOLS[symbol][0])


def _check_kernel_against_slow_lookup(path: Path, asset: Asset, tick: float) -> None:
    comp = load_registry(entry_points=False).get("fair_value", "microprice")
    res = replay_component(comp, {"table": str(path)}, [asset], keep_view=True)
    assert len(res.values) > 3000
    v = res.views[:, 0]
    want = []
    g = np.asarray(json.loads(path.read_text())["g_ticks"])
    edges = np.asarray(json.loads(path.read_text())["imbalance_edges"])
    for row in v:  # the slow way: one step at a time, from the table file
        bid, ask, qb, qa = row[L.BEST_BID], row[L.BEST_ASK], row[L.BID_QTY], row[L.ASK_QTY]
        imb = (qb - qa) / (qb + qa)
        b = max(k for k in range(len(edges) - 1) if edges[k] <= imb or k == 0)
        s = min(max(round((ask - bid) / tick), 1), g.shape[1]) - 1
        want.append((bid + ask) / 2 + g[b, s] * tick)
    np.testing.assert_allclose(res.values, want, rtol=1e-14)
    mid = (v[:, L.BEST_BID] + v[:, L.BEST_ASK]) / 2
    assert np.abs(res.values - mid).max() > tick  # the table moves the price, by more than a tick somewhere


@pytest.mark.parametrize("symbol", list(SYMBOLS))
@pytest.mark.parametrize(("max_move", "horizon"), [(None, 1), (1.0, 1), (None, 5)])
def test_estimator_equals_reference_from_the_paper_on_real_data(real_catalog, symbol, max_move, horizon):
    table = fit_catalog(real_catalog, "binance-usdm", symbol, ["20240808"], n_buckets=10, n_spreads=2,
                        max_move_ticks=max_move, horizon=horizon)
    # the reference sees the book through the replayed views a strategy sees, not through the estimator
    comp = load_registry(entry_points=False).get("fair_value", "mid")
    res = replay_component(comp, {}, [_asset(real_catalog, symbol)], keep_view=True)
    df = reference_transitions(res.views, res.timestamps, SYMBOLS[symbol][0], table.imbalance_edges, 2, horizon)
    if max_move is not None:
        df = df[df["dM"].abs() <= max_move]
    assert len(df) == table.training["transitions"] > 2500
    want = reference_g(df, 10, 2)
    np.testing.assert_allclose(table.g_ticks, want, rtol=1e-7, atol=1e-9)
    assert np.abs(table.g_ticks[:, 0]).max() > 0.05
    np.testing.assert_allclose(table.g_ticks, -table.g_ticks[::-1], atol=1e-9)


def test_quantile_edges_are_symmetric_and_split_the_sample(real_catalog):
    book = top_of_book([_asset(real_catalog, "BTCUSDT")])
    table = fit_book(book["ts"], book["bid"], book["ask"], book["bid_qty"], book["ask_qty"], tick=0.1,
                     step_ns=STEP_NS, n_buckets=6, n_spreads=1, edges="quantile")
    e = table.imbalance_edges
    np.testing.assert_allclose(e, -e[::-1], atol=1e-15)
    imb = (book["bid_qty"] - book["ask_qty"]) / (book["bid_qty"] + book["ask_qty"])
    shares = np.histogram(np.concatenate([imb, -imb]), bins=e)[0] / (2 * len(imb))
    np.testing.assert_allclose(shares, 1 / 6, atol=0.01)
    np.testing.assert_allclose(table.g_ticks, -table.g_ticks[::-1], atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Kernel details, table files, errors
# ------------------------------------------------------------------------------------------------


def _table(n: int, m: int) -> MicropriceTable:
    g = np.arange(n * m, dtype=float).reshape(n, m) + 1.0
    return MicropriceTable(np.linspace(-1, 1, n + 1), g, 0.5, np.ones((n, m)), np.array([-1.0, 1.0]), 3, 0.0)


def test_spread_beyond_the_last_bucket_uses_the_last_and_packing_has_a_fixed_size():
    t = _table(4, 2)
    ctx = PackContext(asset_index={"quoted": 0}, tick_size={}, lot_size={}, quoted="quoted")

    def pack(table):
        return np.array(pack_fields(MicropriceParams(table="unused"), ctx, **pack_table(table)))

    params = pack(t)
    assert len(params) == len(pack(_table(MAX_BUCKETS, 1))) == len(pack(_table(3, 8)))
    view = np.zeros((1, L.VIEW_WIDTH))
    view[0, L.TICK] = 0.5
    cases = [  # (bid, ask, qb, qa) -> g row, column
        ((100.0, 100.5, 1.0, 9.0), (0, 0)),  # I = -0.8, 1 tick
        ((100.0, 101.0, 1.0, 1.0), (2, 1)),  # I = 0 (edge: the upper bucket), 2 ticks
        ((100.0, 103.0, 9.0, 1.0), (3, 1)),  # I = 0.8, 6 ticks: the last spread bucket
        ((100.0, 100.5, 1.0, 0.0), (3, 0)),  # I = 1 belongs to the last bucket
    ]
    for (bid, ask, qb, qa), (b, j) in cases:
        view[0, [L.BEST_BID, L.BEST_ASK, L.BID_QTY, L.ASK_QTY]] = bid, ask, qb, qa
        got = microprice_nb(view, np.zeros((1, 1, L.TR_WIDTH)), np.zeros(0), params, np.zeros(L.OUT_WIDTH))
        assert got == (bid + ask) / 2 + t.g_ticks[b, j] * 0.5
        assert t.lookup_ticks(np.array([(qb - qa) / (qb + qa)]), np.array([(ask - bid) / 0.5]))[0] == t.g_ticks[b, j]


def test_npz_and_json_tables_round_trip(tmp_path):
    t = _table(3, 2)
    for name in ("t.json", "t.npz"):
        back = MicropriceTable.load(t.save(tmp_path / name))
        np.testing.assert_array_equal(back.g_ticks, t.g_ticks)
        np.testing.assert_array_equal(back.imbalance_edges, t.imbalance_edges)
        assert back.tick_size == t.tick_size


def test_bad_tables_name_the_file_and_the_fix(real_catalog, tmp_path):
    comp = load_registry(entry_points=False).get("fair_value", "microprice")
    btc = [_asset(real_catalog, "BTCUSDT")]
    with pytest.raises(ConfigError, match=r"nope\.json: file not found; write one with `quotelab microprice fit"):
        replay_component(comp, {"table": str(tmp_path / "nope.json")}, btc)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match=r"bad\.json: not a micro-price table"):
        replay_component(comp, {"table": str(tmp_path / "bad.json")}, btc)
    other_tick = _table(3, 2).save(tmp_path / "eth.json")  # tick 0.5
    with pytest.raises(ConfigError, match=r"fitted with tick 0\.5 but BTCUSDT has tick 0\.1; .*check_tick: false"):
        replay_component(comp, {"table": str(other_tick)}, btc)
    res = replay_component(comp, {"table": str(other_tick), "check_tick": False}, btc)
    assert len(res.values) > 3000
    with pytest.raises(ConfigError, match=r"40 imbalance buckets x 2 spread buckets; the limits are 1\.\.32"):
        fit_catalog(real_catalog, "binance-usdm", "BTCUSDT", ["20240808"], n_buckets=40)
    with pytest.raises(ConfigError, match=r"edges must be uniform or quantile, got 'log'"):
        fit_catalog(real_catalog, "binance-usdm", "BTCUSDT", ["20240808"], edges="log")
    with pytest.raises(ConfigError, match=r"horizon is a number of grid steps >= 1, got 0"):
        fit_catalog(real_catalog, "binance-usdm", "BTCUSDT", ["20240808"], horizon=0)


# ------------------------------------------------------------------------------------------------
# CLI and the shipped strategy
# ------------------------------------------------------------------------------------------------


def test_cli_fit_writes_the_table_fit_catalog_computes(real_catalog, fitted, tmp_path):
    out = tmp_path / "out" / "microprice" / "BTCUSDT.json"
    cmd = [sys.executable, "-m", "quotelab.cli", "microprice", "fit", "--catalog", str(real_catalog), "--venue",
           "binance-usdm", "--symbol", "BTCUSDT", "--dates", "20240808", "--buckets", "10", "--spreads", "2",
           "--step", "100ms", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "spread 2+" in proc.stdout and f"wrote {out}" in proc.stdout.replace("\n", "")
    got = MicropriceTable.load(out)
    np.testing.assert_array_equal(got.g_ticks, fitted["BTCUSDT"][0].g_ticks)
    assert got.training["dates"] == ["20240808"] and got.training["step_s"] == 0.1
    bad = subprocess.run([*cmd[:-2], "--step", "5ticks", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--step '5ticks': unit mismatch" in bad.stderr
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "t.txt")], capture_output=True, text=True)
    assert bad.returncode == 2 and "t.txt: the table file's name must end in .json or .npz" in bad.stderr


def test_shipped_strategy_trades_within_its_limits(real_catalog, tmp_path):
    doc = yaml.safe_load((REPO / "strategies" / "microprice.yaml").read_text())
    strategy = tmp_path / "strategies" / "microprice.yaml"
    strategy.parent.mkdir()
    strategy.write_text((REPO / "strategies" / "microprice.yaml").read_text())
    # the table where the YAML's relative path points, as the comment in it says to fit it
    table_path = (strategy.parent / doc["fair_value"][0]["params"]["table"]).resolve()
    assert table_path.is_relative_to(tmp_path)
    fit_catalog(real_catalog, "binance-usdm", "BTCUSDT", ["20240808"]).save(table_path)
    result = run_strategy(strategy, catalog=real_catalog)
    s = result.summary
    assert s["num_trades"] > 50 and s["quoting_steps"] > 3000
    q = doc["quoter"]["params"]
    assert np.abs(result.records[:, D.R_POSITION]).max() <= q["max_position"] + q["size"] + 1e-9
    assert np.std(result.records[:, D.R_FAIR_VALUE] - result.records[:, D.R_MID]) > 0
