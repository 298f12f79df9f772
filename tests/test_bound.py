"""`llmcache.bound`: the Clopper-Pearson bounds against scipy, and `admit`, the choice of the
neighbourhoods the verified semantic tier may serve, by its contract and by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta

from llmcache import bound

GRID = [(k, n) for n in (1, 2, 3, 5, 10, 37, 100, 400) for k in sorted({0, 1, 2, n // 3, n // 2, n - 1, n}) if k <= n]
ALPHAS = (0.2, 0.05, 0.01, 0.001)


def cp_upper(k: int, n: int, alpha: float) -> float:
    """The exact one-sided Clopper-Pearson upper bound (scipy)."""
    return 1.0 if k >= n else float(beta.ppf(1.0 - alpha, k + 1, n - k))


def cp_lower(k: int, n: int, alpha: float) -> float:
    return 0.0 if k <= 0 else float(beta.ppf(alpha, k, n - k + 1))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_upper_matches_scipy(alpha):
    for k, n in GRID:
        got, want = bound.upper(k, n, alpha), cp_upper(k, n, alpha)
        assert got == pytest.approx(want, abs=1e-9), (k, n)
        assert got >= want - 1e-12, (k, n)  # never below the exact bound: the promise stays conservative
        assert 0.0 <= got <= 1.0


@pytest.mark.parametrize("alpha", ALPHAS)
def test_lower_matches_scipy(alpha):
    for k, n in GRID:
        got, want = bound.lower(k, n, alpha), cp_lower(k, n, alpha)
        assert got == pytest.approx(want, abs=1e-9), (k, n)
        assert got <= bound.upper(k, n, alpha)


def test_edges():
    assert bound.upper(0, 0, 0.05) == 1.0  # nothing measured bounds nothing
    assert bound.lower(0, 0, 0.05) == 0.0
    assert bound.upper(5, 5, 0.05) == 1.0
    assert bound.upper(0, 1, 0.05) == pytest.approx(0.95)
    assert bound.lower(0, 1000, 0.05) == 0.0
    assert bound.lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10))
    # More checks without a failure bound the rate lower; more failures bound it higher.
    ups = [bound.upper(0, n, 0.05) for n in (1, 10, 100, 1000)]
    assert ups == sorted(ups, reverse=True)
    ups = [bound.upper(k, 100, 0.05) for k in range(0, 101, 10)]
    assert ups == sorted(ups)


def test_binomial_cdf_matches_scipy():
    # The private tail both bounds bisect on: checked directly, since an error there would be
    # hidden by the bisection tolerance (no public path exposes it).
    from scipy.stats import binom

    for k, n in GRID:
        for p in (0.001, 0.1, 0.5, 0.93):
            assert bound._binom_cdf(k, n, p) == pytest.approx(float(binom.cdf(k, n, p)), abs=1e-10), (k, n, p)


def fixed_sequence(counts, max_error, alpha):
    """A reference of `admit`: regions "bands 0..b", nearest first, pooled; those with fewer
    checks than could ever pass are skipped, the first one whose Clopper-Pearson bound passes
    max_error ends the sequence. (last band admitted or -1, its bound or 1.0)"""
    least = max(1, math.ceil(math.log(alpha) / math.log1p(-max_error)) - 2)
    while cp_upper(0, least, alpha) > max_error:
        least += 1
    n = k = 0
    last, best = -1, 1.0
    for b, (checked, failed) in enumerate(counts):
        n, k = n + checked, k + failed
        if n < least:
            continue
        if cp_upper(k, n, alpha) > max_error:
            break
        last, best = b, cp_upper(k, n, alpha)
    return last, best


@pytest.mark.parametrize(("max_error", "alpha"), [(0.01, 0.05), (0.05, 0.05), (0.1, 0.1), (0.2, 0.01), (0.5, 0.2)])
def test_needed_is_the_fewest_clean_checks_that_pass(max_error, alpha):
    n = bound.needed(max_error, alpha)
    assert bound.upper(0, n, alpha) <= max_error
    assert bound.upper(0, n - 1, alpha) > max_error


def test_admit_many_clean_checks_is_admitted():
    last, union = bound.admit([(500, 0)], max_error=0.05, alpha=0.05)
    assert last == 0
    assert union == pytest.approx(cp_upper(0, 500, 0.05))
    assert union <= 0.05


def test_admit_high_failure_share_is_not():
    assert bound.admit([(500, 100)], max_error=0.05, alpha=0.05) == (-1, 1.0)


def test_admit_nothing():
    assert bound.admit([], 0.01, 0.05) == (-1, 1.0)
    # Unmeasured bands, too few checks to ever pass, and every check failed: nothing serves.
    assert bound.admit([(0, 0), (0, 0)], 0.5, 0.05) == (-1, 1.0)
    assert bound.admit([(bound.needed(0.01, 0.05) - 1, 0)], 0.01, 0.05) == (-1, 1.0)
    assert bound.admit([(50, 50), (50, 50)], 0.5, 0.05) == (-1, 1.0)


def test_admit_pools_nearest_first_and_stops_at_the_first_failure():
    alpha = 0.05
    # Small bands are pooled with the next ones (skipped while too few to pass, never tested).
    last, union = bound.admit([(0, 0), (5, 0), (500, 0), (500, 300)], 0.05, alpha)
    assert last == 2 and union == pytest.approx(cp_upper(0, 505, alpha))
    # A near band that fails ends the sequence, though the pooled farther region would pass.
    assert cp_upper(100, 5500, alpha) <= 0.05
    assert bound.admit([(500, 100), (5000, 0)], 0.05, alpha) == (-1, 1.0)
    # Failures in a near band count in every farther region.
    assert cp_upper(4, 400, alpha) <= 0.03
    last, union = bound.admit([(400, 4), (400, 0), (400, 0)], 0.03, alpha)
    assert last == 2 and union == pytest.approx(cp_upper(4, 1200, alpha))


def test_admit_matches_the_reference_on_random_counts():
    rng = np.random.default_rng(1234)
    for _ in range(300):
        m = int(rng.integers(1, 8))
        max_error = float(rng.choice([0.01, 0.05, 0.2]))
        alpha = float(rng.choice([0.05, 0.1]))
        counts = []
        for _ in range(m):
            checked = int(rng.choice([0, 1, 20, 100, 300]))
            rate = float(rng.choice([0.0, 0.001, 0.05, 0.5]))
            counts.append((checked, int(rng.binomial(checked, rate)) if checked else 0))
        last, union = bound.admit(counts, max_error, alpha)
        want_last, want_union = fixed_sequence(counts, max_error, alpha)
        assert last == want_last, counts
        assert union == pytest.approx(want_union, abs=1e-9)
        assert -1 <= last < m
        if last >= 0:
            assert union <= max_error
        else:
            assert union == 1.0


def simulate(rates, traffic, hits, max_error, alpha, trials, rng):
    """Per trial: `hits` would-be hits fall in the bands by `traffic` and fail at the band's true
    rate, every one checked (a uniform sample); admit; the region served is bands 0..last and
    its TRUE error the traffic-weighted mix of their rates. Returns (trials serving, trials whose
    region's true error passes max_error)."""
    rates, traffic = np.asarray(rates), np.asarray(traffic) / np.sum(traffic)
    served = broke = 0
    for _ in range(trials):
        checked = rng.multinomial(hits, traffic)
        failed = rng.binomial(checked, rates)
        last, union = bound.admit([(int(n), int(k)) for n, k in zip(checked, failed)], max_error, alpha)
        if last < 0:
            continue
        assert union <= max_error
        served += 1
        region = slice(0, last + 1)
        broke += float((traffic[region] * rates[region]).sum() / traffic[region].sum()) > max_error
    return served, broke


def test_admit_promise_by_simulation():
    """Bands with true error rates growing with distance (as neighbours get farther): the share
    of trials where the region admitted has a TRUE error above max_error stays <= alpha."""
    rng = np.random.default_rng(20240601)
    max_error, alpha, trials = 0.05, 0.1, 1500
    served, broke = simulate([0.0, 0.01, 0.04, 0.06, 0.1, 0.3], [300, 300, 200, 200, 100, 100], 600,
                             max_error, alpha, trials, rng)
    assert served > trials // 2  # not vacuous: most trials serve something
    assert broke / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)


def test_admit_promise_at_the_edge():
    """Every band slightly worse than max_error, so admitting anything breaks the promise: it
    happens in at most alpha of the trials, however many bands get their look. The same checks
    at a rate below max_error do serve (the level is not met by never admitting)."""
    max_error, alpha, trials, m, per_band = 0.05, 0.1, 1500, 12, 150
    served, broke = simulate([0.06] * m, [1] * m, m * per_band, max_error, alpha, trials, np.random.default_rng(99))
    assert broke == served  # every admission is a violation here
    assert broke / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
    served, broke = simulate([0.01] * m, [1] * m, m * per_band, max_error, alpha, 200, np.random.default_rng(98))
    assert broke == 0 and served > 150


def test_upper_coverage_by_simulation():
    """One band: the Clopper-Pearson upper bound is below the true rate in at most alpha of the
    trials, at rates where a naive bound would fail."""
    rng = np.random.default_rng(7)
    alpha, trials = 0.1, 3000
    for p, n in ((0.02, 60), (0.1, 40), (0.3, 25)):
        failed = rng.binomial(n, p, size=trials)
        below = sum(bound.upper(int(k), n, alpha) < p for k in failed)
        assert below / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials), (p, n)
        naive = sum(k / n < p for k in failed)
        assert naive / trials > alpha  # the point estimate alone would break the level
