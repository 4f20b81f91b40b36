"""Numba helpers that plugin kernels share, one module per theme (public: third-party plugins use them too).

- :mod:`quotelab.kernels.imbalance`: level imbalance (Qb − Qa)/(Qb + Qa) and the imbalance shapes f(I)
  of an imbalance-adjusted mid, with the params types that select them.
- :mod:`quotelab.kernels.ewma`: one EWMA step, the EWMA slots of per-event flows, and the time-weighted
  EWMA volatility σ of a mid.
- :mod:`quotelab.kernels.trade_flow`: per-side EWMAs of trade intervals and sizes, and the OI, QI, VI
  and arrival rate read from them.
- :mod:`quotelab.kernels.ring`: a fixed-size ring of past values in a part's state.
- :mod:`quotelab.kernels.arrival_fit`: trade arrival depths and the log-linear fit of λ(δ) = A·e^(−kδ),
  offline (``quotelab calibrate``) and online over a window.
- :mod:`quotelab.kernels.quotes`: quotes written into ``out`` from model bid and ask prices, and the
  params, state and reads the model quoters share.

Every function is ``@njit(inline="always")``, so a strategy's fused kernel stays one flat function. The
composer's cache key follows a kernel module's imports, so an edit here recompiles the strategies using it.
"""
