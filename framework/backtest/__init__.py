"""Backtests: the engine that runs a strategy, the compiled driver loop over hftbacktest, and PnL."""
