"""The engine's clock in integers: timestamps are nanoseconds since the epoch (UTC).

No imports, so any module may use this (a numba kernel reads it as a constant) without pulling
anything into the start-up of a light command such as ``quotelab report``.
"""

DAY_NS = 86_400 * 1_000_000_000  # one UTC day; ``ts // DAY_NS`` is the day number of a timestamp
