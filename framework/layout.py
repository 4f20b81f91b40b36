"""The arrays a kernel sees. Module-level ints, so numba folds them into constants.

Every component kernel has one signature::

    kernel(view: f8[:, ::1], trades: f8[:, :, ::1], state: f8[::1], params: f8[::1], out: f8[::1]) -> f8

* ``view[asset, FIELD]`` is the market and account state of each asset at this step, filled by the
  engine (or by any other replayer: evaluation and feature recording use the same layout).
* ``trades[asset, k, TR_*]`` for ``k < view[asset, N_TRADES]`` are the market trades since the
  previous step, oldest first. They are filled only when some component of the strategy declares
  ``Reads(trades=True)``; otherwise ``N_TRADES`` stays 0.
* Account columns (position, balance, fee, fills) are filled for the quoted asset only.
* ``state`` is the component's own slice (persisting between steps); ``params`` its packed
  parameters (runtime values, never compile-time constants).
* ``out`` is the step's scratch row: the running pricing terms, each component's output, and the
  quotes the quoter writes for the engine.
"""

from __future__ import annotations

# view columns
TIME = 0  # seconds since the run's grid origin
BEST_BID = 1
BEST_ASK = 2
BID_QTY = 3
ASK_QTY = 4
BEST_BID_TICK = 5
BEST_ASK_TICK = 6
TICK = 7
LOT = 8
POSITION = 9
BALANCE = 10
FEE = 11
NUM_FILLS = 12
N_TRADES = 13
CONTRACT_SIZE = 14
INVERSE = 15  # 1.0 for an inverse contract
STEP_SECONDS = 16  # time since the previous step (0 on the first)
MAX_LEVELS = 20
LEVELS = 20  # levels 0..MAX_LEVELS-1 of each side, by price (empty ticks skipped)
BID_PX = LEVELS
BID_SZ = LEVELS + MAX_LEVELS
ASK_PX = LEVELS + 2 * MAX_LEVELS
ASK_SZ = LEVELS + 3 * MAX_LEVELS
VIEW_WIDTH = LEVELS + 4 * MAX_LEVELS

# trades columns
TR_PX = 0
TR_QTY = 1
TR_SIDE = 2  # +1 buyer-initiated, -1 seller-initiated
TR_TIME = 3  # exchange time, seconds since the grid origin
TR_WIDTH = 4

# out slots
STATUS = 0  # 0 ok, k > 0: component k-1 produced a non-finite value
FAIR_VALUE = 1
FORECAST = 2
RISK = 3
RESERVATION = 4
BID_WIDEN_TICKS = 5  # added by risk adjusters, read by quoters
ASK_WIDEN_TICKS = 6
BID_ENABLED = 7  # 0 disables quoting that side
ASK_ENABLED = 8
MAX_POSITION = 9  # in asset quantity; compared in whole lots by the engine
N_BID = 10
N_ASK = 11
MAX_QUOTES = 16
QUOTES = 16
Q_BID_TICK = QUOTES
Q_BID_QTY = QUOTES + MAX_QUOTES
Q_ASK_TICK = QUOTES + 2 * MAX_QUOTES
Q_ASK_QTY = QUOTES + 3 * MAX_QUOTES
COMPONENTS = QUOTES + 4 * MAX_QUOTES  # out[COMPONENTS + i]: output of the i-th component of the strategy
MAX_COMPONENTS = 64
OUT_WIDTH = COMPONENTS + MAX_COMPONENTS
