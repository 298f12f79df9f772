"""Error bounds of the verified semantic tier: Clopper-Pearson and the admission of neighbourhoods.

Pure Python (no scipy): the exact binomial tail, solved by bisection. Used online
(`verified.SemanticTier`) and offline (`calibrate`), so both keep the same promise.
"""

from __future__ import annotations

import functools
import math


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    upper_tail = k >= n / 2  # sum the shorter tail
    span = range(k + 1, n + 1) if upper_tail else range(k + 1)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in span]
    if not terms:
        return 1.0
    top = max(terms)
    tail = min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))
    return 1.0 - tail if upper_tail else tail


@functools.lru_cache(maxsize=1 << 14)
def upper(failures: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound on an error rate: the p with P(X <= failures) =
    alpha, X ~ Binomial(n, p). With n = 0: 1.0 (nothing measured bounds nothing)."""
    if n <= 0:
        return 1.0
    if failures >= n:
        return 1.0
    if failures == 0:
        return 1.0 - alpha ** (1.0 / n)
    lo, hi = failures / n, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if _binom_cdf(failures, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def lower(failures: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound: the p with P(X >= failures) = alpha (0 if none failed)."""
    if n <= 0 or failures <= 0:
        return 0.0
    return 1.0 - upper(n - failures, n, alpha)


def needed(max_error: float, alpha: float) -> int:
    """The fewest checks that can bound an error rate by max_error (all of them passing)."""
    return math.ceil(math.log(alpha) / math.log1p(-max_error))


def admit(counts: list[tuple[int, int]], max_error: float, alpha: float) -> tuple[int, float]:
    """How far the semantic tier may serve, and the error bound of what it serves.

    counts: per band of distance, nearest first, (checked, failed) of a uniform sample of the
    would-be hits (every band sampled at the same rate at any time). The served region "distance
    <= band b" holds the bands 0..b; its error rate is bounded by the Clopper-Pearson upper
    bound of the pooled counts. Regions are tested nearest first (Learn-then-Test's fixed
    sequence: each at the full alpha, stopping at the first that fails), skipping regions with
    fewer than `needed` checks (which could not pass: the order depends on sample sizes only,
    never on outcomes). With probability >= 1 - alpha the error rate of the region admitted is
    <= its bound <= max_error. Returns (the last band admitted, -1: none; that bound, 1.0: none).
    """
    least = needed(max_error, alpha)
    checked = failed = 0
    last, best = -1, 1.0
    for b, (n, k) in enumerate(counts):
        checked += n
        failed += k
        if checked < least:
            continue
        u = upper(failed, checked, alpha)
        if u > max_error:
            break
        last, best = b, u
    return last, best
