"""Uncertainty of the numbers advex reports: exact (Clopper–Pearson) confidence intervals of
proportions such as accuracies and success rates.

The interval of k successes in n trials is [B(a/2; k, n-k+1), B(1-a/2; k+1, n-k)], B the Beta
quantile; with integer parameters the Beta CDF is a binomial tail, P(Beta(k, n-k+1) <= p) =
P(Binomial(n, p) >= k), so each bound is the p where a binomial tail equals a/2, found by
bisection on the tail summed in log space. No scipy needed; exact to about 1e-12.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

CONFIDENCE = 0.95
_BISECTIONS = 60  # halves [0, 1] down to ~1e-18


def _solve(k: int, n: int, target: float) -> float:
    """The p in (0, 1) with P(Binomial(n, p) >= k) = target (k >= 1; the tail grows with p)."""
    j = np.arange(k, n + 1, dtype=np.float64)
    lg = np.array([math.lgamma(v + 1) for v in range(n + 1)])
    log_choose = lg[n] - lg[k:] - lg[n - np.arange(k, n + 1)]
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        logs = log_choose + j * math.log(mid) + (n - j) * math.log1p(-mid)
        top = logs.max()
        tail = math.exp(top) * float(np.exp(logs - top).sum())  # P(Binomial(n, mid) >= k)
        if tail < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> Optional[tuple[float, float]]:
    """The exact two-sided interval of a proportion k/n at `confidence`, or None for n == 0
    (a rate over nothing has no interval)."""
    k, n = int(k), int(n)
    if n == 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    lower = 0.0 if k == 0 else _solve(k, n, alpha / 2)
    # upper: P(Binomial(n, p) <= k) = a/2, i.e. P(Binomial(n, p) >= k + 1) = 1 - a/2
    upper = 1.0 if k == n else _solve(k + 1, n, 1.0 - alpha / 2)
    return lower, upper
