"""The Binance read pipeline: blocks travel in a fixed pool of reused buffers (binance_json.iter_blocks).

A buffer reused while something still refers to it would change what that sees, silently: these tests run
the real captures through tiny blocks and a pool of two, so that every buffer is reused hundreds of times,
and check what comes out against the file parsed whole, in one block of fresh arrays (``parse_lines``), or
the converter's output against the same blocks in fresh buffers (where blocks end changes the converter's
output: it hands each block's depth rows to the day before its trades, so both runs cut at the same places).
"""

from __future__ import annotations

import gzip
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quotelab.data import binance, binance_json
from quotelab.data.binance_json import I_LV0, I_LV1, Damaged, iter_blocks, parse_lines
from quotelab.data.convert import convert_files

SMALL = 1 << 15  # 32 KiB slots: the captures' REST snapshots (up to 64 KB a line) do not fit one


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of ~20-40 KB: a chunk is what 2 KiB of gzip inflate to, a block is cut at the first chunk end
    past 16 KiB."""
    monkeypatch.setattr(binance_json, "_READ", 1 << 11)
    monkeypatch.setattr(binance_json, "_BLOCK", 1 << 14)


@pytest.fixture(scope="module")
def eth_text(shared_data: Path) -> bytes:
    with gzip.open(shared_data / "binance" / "usdm" / "ethusdt_20240808.gz", "rb") as fh:
        return fh.read()


def _whole(text: bytes) -> dict[str, Any]:
    """The reference: the text parsed in one block of fresh arrays."""
    p = parse_lines(text)
    assert p.bad < 0
    return {"kinds": p.kinds, "ints": p.ints, "flts": p.flts, "flags": p.flags, "lv_px": p.lv_px,
            "lv_qty": p.lv_qty, "lv_side": p.lv_side, "lines": text.split(b"\n")}


def _joined(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """Blocks' outputs as one: level indexes made file-wide by adding the levels of the blocks before."""
    ints, base = [], 0
    for b in blocks:
        i = b["ints"].copy()
        i[:, I_LV0] += base
        i[:, I_LV1] += base
        ints.append(i)
        base += b["lv_px"].shape[0]
    out = {k: np.concatenate([b[k] for b in blocks]) for k in ("kinds", "flts", "flags", "lv_px", "lv_qty", "lv_side")}
    out["ints"] = np.concatenate(ints)
    return out


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    for k in ("kinds", "ints", "flts", "flags", "lv_px", "lv_qty", "lv_side"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _copy(p: binance_json.Parsed) -> dict[str, Any]:
    return {"kinds": p.kinds.copy(), "ints": p.ints.copy(), "flts": p.flts.copy(), "flags": p.flags.copy(),
            "lv_px": p.lv_px.copy(), "lv_qty": p.lv_qty.copy(), "lv_side": p.lv_side.copy()}


def test_small_blocks_through_two_slots_parse_as_the_whole_file(shared_data: Path, eth_text: bytes,
                                                                small_blocks: None) -> None:
    stats: dict[str, int] = {}
    blocks, lines = [], []
    for p in iter_blocks(shared_data / "binance" / "usdm" / "ethusdt_20240808.gz", slot=SMALL, pool=2, stats=stats):
        blocks.append(_copy(p))
        lines += [p.line(k) for k in range(p.kinds.shape[0])]
    _assert_same(_joined(blocks), _whole(eth_text))
    assert lines == eth_text.split(b"\n")[:-1]
    # Every slot came back unreferenced and was reused; lines longer than a block took one-off buffers.
    assert stats["replaced"] == 0 and stats["slots"] == 2 and stats["oversize"] > 0
    assert stats["blocks"] == len(blocks) > 500


def test_views_kept_by_the_caller_are_never_overwritten(shared_data: Path, eth_text: bytes, small_blocks: None) -> None:
    """A caller that keeps views instead of copies: the pool sees them and allocates afresh instead of
    reusing their buffers, so they keep the values of their block; the block's own handles are emptied."""
    stats: dict[str, int] = {}
    kept, handed = [], []
    for p in iter_blocks(shared_data / "binance" / "usdm" / "ethusdt_20240808.gz", slot=SMALL, pool=2, stats=stats):
        kept.append({"kinds": p.kinds, "ints": p.ints, "flts": p.flts, "flags": p.flags, "lv_px": p.lv_px,
                     "lv_qty": p.lv_qty, "lv_side": p.lv_side})
        handed.append(p)
    _assert_same(_joined(kept), _whole(eth_text))
    assert stats["replaced"] == stats["blocks"] - stats["oversize"] > 500
    assert all(p.ints is None and p.text is None for p in handed[:-1])


def _blocks_of(path: Path, **kw: Any) -> list[dict[str, Any]]:
    return [_copy(p) for p in iter_blocks(path, **kw)]


@pytest.mark.parametrize("form", ["plain", "gzip", "gzip members"])
def test_long_lines_and_many_short_ones(eth_text: bytes, tmp_path: Path, form: str, small_blocks: None) -> None:
    """A line several blocks long (one-off buffers, grown until it fits), and blank lines by the thousand
    (more lines than a slot's arrays hold: exact arrays for that block)."""
    lines = eth_text.split(b"\n")
    snap = next(ln for ln in lines if b"lastUpdateId" in ln)
    assert len(snap) > 2 * 4096
    text = b"\n".join(lines[:300] + [snap] + [b""] * 5000 + lines[300:600] + [snap] * 3 + lines[600:900]) + b"\n"
    f = tmp_path / "f"
    if form == "plain":
        f.write_bytes(text)
    elif form == "gzip":
        f.write_bytes(gzip.compress(text))
    else:
        f.write_bytes(b"".join(gzip.compress(text[i:i + 7000]) for i in range(0, len(text), 7000)))
    stats: dict[str, int] = {}
    got = _joined(_blocks_of(f, slot=4096, pool=2, stats=stats))
    _assert_same(got, _whole(text))
    assert stats["oversize"] > 0 and stats["replaced"] == 0


def test_truncated_gzip_hands_over_every_complete_line_then_says_so(eth_text: bytes, tmp_path: Path,
                                                                    small_blocks: None) -> None:
    whole = gzip.compress(eth_text)
    f = tmp_path / "cut.gz"
    f.write_bytes(whole[:len(whole) // 3])
    inflated = zlib.decompressobj(31).decompress(whole[:len(whole) // 3])
    complete = inflated[:inflated.rfind(b"\n") + 1]
    blocks = []
    with pytest.raises(Damaged) as exc:
        for p in iter_blocks(f, slot=SMALL, pool=2):
            blocks.append(_copy(p))
    assert isinstance(exc.value.args[0], EOFError)
    _assert_same(_joined(blocks), _whole(complete))


def test_corrupt_gzip_is_damaged(eth_text: bytes, tmp_path: Path) -> None:
    data = bytearray(gzip.compress(eth_text))
    data[10_000:10_064] = bytes(64)
    f = tmp_path / "bad.gz"
    f.write_bytes(bytes(data))
    with pytest.raises(Damaged):
        for _ in iter_blocks(f, slot=SMALL, pool=2):
            pass


def _ours() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("binance-") and t.is_alive()]


def test_a_caller_stopping_early_stops_the_threads(shared_data: Path, small_blocks: None) -> None:
    """The reader waits for a slot the caller will never give back: closing the iteration must end it."""
    assert not _ours()
    blocks = iter_blocks(shared_data / "binance" / "usdm" / "ethusdt_20240808.gz", slot=SMALL, pool=2)
    first = next(blocks)
    assert first.kinds.shape[0] > 0
    blocks.close()
    assert not _ours()


def test_a_pool_of_one_is_refused(shared_data: Path) -> None:
    with pytest.raises(ValueError, match="2 slots at least"):
        next(iter_blocks(shared_data / "binance" / "usdm" / "ethusdt_20240808.gz", pool=1))


def _catalog(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("venue", "name", "symbol"), [("binance-usdm", "usdm/ethusdt_20240808.gz", "ETHUSDT"),
                                                       ("binance-cm", "cm/btcusd_perp_20240808.gz", "BTCUSD_PERP")])
def test_convert_through_two_reused_slots_is_byte_identical_to_fresh_buffers(
        shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_blocks: None, venue: str, name: str,
        symbol: str) -> None:
    """The converter keeps nothing of a block past it: had it kept a view, the pool would have replaced the
    slot (``replaced``), and had a slot been reused under it, the catalog would differ from the one made
    with fresh buffers for every block (pool 0, the way blocks were read before the pool)."""
    f = shared_data / "binance" / name
    cat = tmp_path / "cat"
    seen: list[dict[str, int]] = []
    monkeypatch.setattr(binance, "iter_blocks", lambda path: iter_blocks(path, slot=SMALL, pool=0))
    convert_files(venue, [f], symbol, cat)
    want = _catalog(cat)
    for p in cat.rglob("*"):
        if p.is_file():
            p.unlink()

    def reused(path: Path) -> Any:
        seen.append({})
        return iter_blocks(path, slot=SMALL, pool=2, stats=seen[-1])

    monkeypatch.setattr(binance, "iter_blocks", reused)
    convert_files(venue, [f], symbol, cat)
    assert _catalog(cat) == want
    assert len(seen) == 1 and seen[0]["replaced"] == 0 and seen[0]["slots"] == 2 and seen[0]["blocks"] > 500
