"""Known instrument specs (tick, lot, contract) for the venues' symbols, with explicit overrides.

The values below were checked against the shared captures: every price there is a multiple of the
tick and every trade quantity of the lot (the converter refuses data where that is not so; book
quantities on spot can be finer than the lot, which it reports).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quotelab.errors import DataError


@dataclass(frozen=True)
class Instrument:
    tick_size: float
    lot_size: float
    kind: str = "linear"  # "linear" or "inverse"
    contract_size: float = 1.0  # inverse: quote currency (USD) per contract

    def as_meta(self) -> dict[str, Any]:
        return {"tick_size": self.tick_size, "lot_size": self.lot_size,
                "contract": {"kind": self.kind, "size": self.contract_size}}


INSTRUMENTS: dict[tuple[str, str], Instrument] = {
    ("binance-usdm", "BTCUSDT"): Instrument(0.1, 0.001),
    ("binance-usdm", "ETHUSDT"): Instrument(0.01, 0.001),
    ("binance-cm", "BTCUSD_PERP"): Instrument(0.1, 1.0, "inverse", 100.0),
    ("binance-cm", "ETHUSD_PERP"): Instrument(0.01, 1.0, "inverse", 10.0),
    ("binance-spot", "BTCUSDT"): Instrument(0.01, 0.00001),
    ("binance-spot", "ETHUSDT"): Instrument(0.01, 0.0001),
    # The capture's trades have quantities like 12.34, so the step is 0.01, not the 0.1 once listed.
    ("binance-spot", "NEXOUSDT"): Instrument(0.001, 0.01),
    # Bybit's legacy v2 inverse perpetuals: 1 USD contracts, whole-contract quantities.
    ("bybit", "BTCUSD"): Instrument(0.5, 1.0, "inverse", 1.0),
    ("bybit", "ETHUSD"): Instrument(0.05, 1.0, "inverse", 1.0),
    ("bybit", "EOSUSD"): Instrument(0.001, 1.0, "inverse", 1.0),
    ("bybit", "XRPUSD"): Instrument(0.0001, 1.0, "inverse", 1.0),
    ("okx", "BTC-USDT"): Instrument(0.1, 1e-8),
}


def _default_contract(venue: str, symbol: str) -> tuple[str, float]:
    if venue == "bybit" and symbol.endswith("USD"):
        return "inverse", 1.0
    if venue == "binance-cm":
        # Binance COIN-M: BTC contracts are 100 USD, every other coin's are 10 USD.
        return "inverse", 100.0 if symbol.startswith("BTC") else 10.0
    return "linear", 1.0


def resolve(venue: str, symbol: str, tick_size: float | None = None, lot_size: float | None = None,
            contract: str | None = None, contract_size: float | None = None) -> dict[str, Any]:
    """The instrument fields for meta.json; overrides win and are recorded as such in ``origin``."""
    known = INSTRUMENTS.get((venue, symbol))
    if known is None and (tick_size is None or lot_size is None):
        missing = " and ".join(f for f, v in (("--tick-size", tick_size), ("--lot-size", lot_size)) if v is None)
        have = ", ".join(s for v, s in INSTRUMENTS if v == venue) or "none"
        raise DataError(
            f"no built-in instrument spec for {venue}/{symbol} (known for {venue}: {have}); pass {missing} "
            f"(from the venue's exchangeInfo: PRICE_FILTER tickSize and LOT_SIZE stepSize)."
        )
    for name, v in (("--tick-size", tick_size), ("--lot-size", lot_size), ("--contract-size", contract_size)):
        if v is not None and not v > 0:
            raise DataError(f"{name} must be > 0, got {v}")
    if contract not in (None, "linear", "inverse"):
        raise DataError(f"--contract must be linear or inverse, got {contract!r}")
    kind, size = (known.kind, known.contract_size) if known else _default_contract(venue, symbol)
    inst = Instrument(
        tick_size if tick_size is not None else known.tick_size,  # type: ignore[union-attr]
        lot_size if lot_size is not None else known.lot_size,  # type: ignore[union-attr]
        contract or kind, contract_size if contract_size is not None else size,
    )
    meta = inst.as_meta()
    overridden = [f for f, v in (("tick_size", tick_size), ("lot_size", lot_size), ("contract", contract),
                                 ("contract_size", contract_size)) if v is not None]
    meta["origin"] = f"overridden on the command line: {', '.join(overridden)}" if overridden else "built-in spec"
    return meta
