"""Confidence intervals over a few runs or draws: Student's t, in closed form (standard
library only, so any layer may use it)."""

from __future__ import annotations

import math


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom, in closed form
    (Abramowitz & Stegun 26.7.3 and 26.7.4, integer ``df``)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd
        if df == 1:
            return 2 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``p`` > 0.5) of Student's t with ``df`` >= 1 degrees of
    freedom, by bisection on its distribution function (to 1e-10)."""
    if df < 1 or not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < p < 1, got df={df}, p={p}")
    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while _t_two_sided(hi, df) < target:
        hi *= 2
    while hi - lo > 1e-10 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def mean_t_ci95(values: list[float]) -> tuple[float, float]:
    """Mean of ``values`` (one per seed) and the half-width of its 95% confidence
    interval, ``t(0.975, n-1) * s / sqrt(n)`` with the sample standard deviation ``s``;
    NaN for the half-width of a single value."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    s = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    return mean, t_quantile(0.975, n - 1) * s / math.sqrt(n)
