"""What a capture file looks like, from its first lines: which ``quotelab convert`` format, and for
a Binance capture which market and symbol. Used to refuse a file given with the wrong ``--format``
with a message that says what the file is, before any converter reads it as something it is not.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import orjson

from quotelab.data.messages import open_binary

_LINES = 64  # the first lines looked at; a Binance capture has a depth message among them
_BINANCE = re.compile(rb"^\d{10,20} \{")
_CRYPTOFEED = re.compile(rb"^(\d{9,11}\.\d*: \{|wss?://)")
_TARDIS = b"exchange,symbol,timestamp,local_timestamp,"


@dataclass(frozen=True)
class Sniffed:
    format: str  # a `quotelab convert --format` name
    what: str  # what the file is, for a message
    line: int  # the line that told
    symbol: str | None = None


def _head(path: Path) -> list[bytes]:
    lines = []
    try:
        with open_binary(path) as fh:
            for raw in fh:
                if raw.strip():
                    lines.append(raw.rstrip(b"\r\n"))
                if len(lines) >= _LINES:
                    break
    except (OSError, EOFError, zlib.error):
        pass  # the converter names damage with its line; this only looks
    return lines


def sniff(path: Path) -> Sniffed | None:
    """The format the first lines of ``path`` are in, or None if they are none quotelab knows."""
    from quotelab.data.binance import MARKET_NAMES, market_of

    lines = _head(path)
    if not lines:
        return None
    first = lines[0]
    if first.startswith(_TARDIS):
        kind = "trades" if b",id," in first else "incremental_book_L2"
        row = lines[1].split(b",") if len(lines) > 1 else []
        of = f" of {row[0].decode(errors='replace')} {row[1].decode(errors='replace')}" if len(row) > 2 else ""
        return Sniffed("tardis", f"a Tardis {kind} CSV{of}", 1)
    if _BINANCE.match(first):
        for n, line in enumerate(lines, 1):
            try:
                msg = orjson.loads(line.split(b" ", 1)[1])
            except orjson.JSONDecodeError:
                continue
            data = msg.get("data") if isinstance(msg, dict) else None
            if not isinstance(data, dict) or data.get("e") != "depthUpdate":
                continue
            venue, why = market_of(data)
            if venue is not None:
                symbol = str(data.get("s", "?"))
                return Sniffed(venue, f"a collector capture of {MARKET_NAMES[venue]} {symbol} ({why})", n,
                               symbol)
        return None
    for n, line in enumerate(lines, 1):
        if _CRYPTOFEED.match(line):
            if b"bybit.com" in line or b'"topic"' in line:
                return Sniffed("bybit", "a cryptofeed capture of Bybit", n)
            if b"okx.com" in line or b"okex.com" in line or b'"arg"' in line:
                return Sniffed("okx", "a cryptofeed capture of OKX", n)
    return None
