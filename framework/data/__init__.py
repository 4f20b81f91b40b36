"""Market data: raw-capture converters, the event catalog and the synthetic market."""
