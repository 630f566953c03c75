"""The statistics of the report, pure functions of numbers: Student's t quantiles and probabilities, mean and sd,
paired differences with their t-interval, and the power of the paired t-test (the minimal detectable difference,
the pairs needed for an effect)."""

import math
import statistics
from functools import lru_cache


def t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer ``df``, exactly (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    total, term = 0.0, 1.0
    for k in range(df // 2 if df % 2 == 0 else (df - 1) // 2):
        total += term
        term *= (2 * k + 1) / (2 * k + 2) * c2 if df % 2 == 0 else (2 * k + 2) / (2 * k + 3) * c2
        if term < 1e-17 * total:
            break
    if df % 2 == 0:
        return math.sin(theta) * total
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


@lru_cache
def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t: P(|T| <= q) = level, by bisection on the exact CDF."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    lo, hi = 0.0, 1.0
    while t_central_probability(hi, df) < level:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central_probability(mid, df) < level else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def t95(df: int) -> float:
    """The 95 % two-sided quantile of Student's t with ``df`` degrees of freedom."""
    return t_quantile(df, 0.95)


def mean_sd_n(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (nan for one value) and count."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def paired_interval(diffs: list[float]) -> tuple[float, float, float, int]:
    """Mean of paired differences with its 95 % Student-t interval: (mean, low, high, n)."""
    mean, sd, n = mean_sd_n(diffs)
    half = t95(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return mean, mean - half, mean + half, n


POWER, ALPHA = 0.8, 0.05  # the power analysis: 80 % power, 5 % two-sided


def t_test_power(d: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired (one-sample) t-test with ``n`` pairs at standardised effect ``d`` = mean / sd.

    Exact under normal differences: the statistic is noncentral t with ``n - 1`` degrees of freedom and
    noncentrality ``d sqrt(n)``; power = P(T' > t_crit) + P(T' < -t_crit), t_crit the 1 - alpha/2 quantile of t.
    """
    from scipy import stats

    df, nc = n - 1, d * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    upper, lower = stats.nct.sf(crit, df, abs(nc)), stats.nct.cdf(-crit, df, abs(nc))
    if math.isnan(lower):  # scipy returns NaN for this far tail at few degrees of freedom; it is below 1e-10 there
        lower = 0.0
    return float(upper + lower)


def detectable_effect(n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """The standardised effect ``d`` that the paired t-test with ``n`` pairs detects with ``power`` (n >= 2)."""
    from scipy.optimize import brentq

    if n < 2:
        return math.nan
    hi = 1.0
    while t_test_power(hi, n, alpha) < power:
        hi *= 2
    return float(brentq(lambda d: t_test_power(d, n, alpha) - power, 0.0, hi, xtol=1e-10))


def pairs_needed(d: float, power: float = POWER, alpha: float = ALPHA, limit: int = 10**6) -> float:
    """The smallest number of pairs (>= 2) with which the paired t-test detects ``d`` with ``power``; inf above
    ``limit`` (or for d = 0)."""
    d = abs(d)
    if d == 0 or t_test_power(d, limit, alpha) < power:
        return math.inf
    lo, hi = 1, 2  # power(lo) < power <= power(hi), power increasing in n
    while t_test_power(d, hi, alpha) < power:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if t_test_power(d, mid, alpha) < power else (lo, mid)
    return hi


def paired_power(diffs: list[float], effect: float) -> tuple[float, float, float]:
    """``(sd, mdd, n_needed)`` of paired differences: their sample sd, the minimal detectable difference
    ``detectable_effect(n) x sd`` for their number n, and the pairs needed to detect ``effect`` (same units)
    at that sd. The sd is the observed one, so both figures are estimates; nan for fewer than 2 pairs."""
    _, sd, n = mean_sd_n(diffs)
    if n < 2:
        return math.nan, math.nan, math.nan
    if sd == 0:
        return 0.0, 0.0, 2
    return sd, detectable_effect(n) * sd, pairs_needed(effect / sd)


def sd_ratio_interval(df: int, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` confidence range of (true sd) / (sample sd) for a sample sd with ``df`` degrees of freedom, from
    ``df s^2 / sigma^2 ~ chi^2(df)``: ``(sqrt(df / chi2_upper), sqrt(df / chi2_lower))``; 4 df give 0.60-2.87."""
    from scipy import stats

    tail = (1 - level) / 2
    return math.sqrt(df / stats.chi2.ppf(1 - tail, df)), math.sqrt(df / stats.chi2.ppf(tail, df))
