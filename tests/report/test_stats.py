"""The report's statistics: Student's t quantiles and the power of the paired t-test, against published values."""

import math

import pytest

from fl_rpn.report.stats import detectable_effect, pairs_needed, t95, t_test_power


@pytest.mark.parametrize(
    "df, quantile",
    [(1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (31, 2.040), (60, 2.000), (120, 1.980),
     (1000, 1.962)],
)  # fmt: skip
def test_t_quantiles(df, quantile):
    assert t95(df) == pytest.approx(quantile, abs=5e-4)


def test_t_quantiles_to_more_digits():
    assert t95(1) == pytest.approx(12.7062047, abs=1e-6) and t95(31) == pytest.approx(2.0395134, abs=1e-6)
    assert t95(1000) == pytest.approx(1.9623391, abs=1e-6)
    with pytest.raises(ValueError, match="positive integer"):
        t95(0)


# Power of the paired (one-sample) two-sided t-test at alpha 0.05. The reference values were computed independently
# with statsmodels 0.15 (statsmodels.stats.power.TTestPower, alternative="two-sided"), and agree with Cohen (1988),
# Statistical Power Analysis, table 2.3.5 / 2.4.1 (d = 0.5: n = 34 at 80 % power for the one-sample test):
#   TTestPower().power(effect_size=1.0, nobs=10, alpha=0.05)            -> 0.8030968566
#   TTestPower().power(effect_size=0.5, nobs=33 / 34, alpha=0.05)       -> 0.7953658 / 0.8077775
#   TTestPower().solve_power(effect_size=None, nobs=n, power=0.8)       -> 11.5498898 (n=2), 3.2640436 (3),
#                                                                          1.6819971 (5), 0.9960019 (10)
#   TTestPower().solve_power(effect_size=0.8, power=0.8)                -> 14.30 (so 15 pairs)
@pytest.mark.parametrize("d,n,power", [(1.0, 10, 0.8030968566), (0.5, 33, 0.7953658415), (0.5, 34, 0.8077775013)])
def test_t_test_power_matches_published_values(d, n, power):
    assert t_test_power(d, n) == pytest.approx(power, abs=1e-7)


@pytest.mark.parametrize("n,d", [(2, 11.5498897550), (3, 3.2640435528), (5, 1.6819970833), (10, 0.9960019108)])
def test_detectable_effect_matches_published_values(n, d):
    assert detectable_effect(n) == pytest.approx(d, rel=1e-6)  # statsmodels' root finder stops at ~1e-7 relative


def test_pairs_needed_matches_published_values():
    assert pairs_needed(0.5) == 34 and pairs_needed(0.8) == 15 and pairs_needed(1.0) == 10
    assert pairs_needed(1e-4) == math.inf  # beyond a million pairs


def test_the_sd_of_few_pairs_is_uncertain_by_the_chi_square_range():
    """4 degrees of freedom (5 pairs): chi2(4) quantiles 0.484 and 11.143 give sqrt(4 / 11.143) = 0.599 and
    sqrt(4 / 0.484) = 2.874; the range narrows with more pairs."""
    from fl_rpn.report.stats import sd_ratio_interval

    low, high = sd_ratio_interval(4)
    assert (round(low, 3), round(high, 3)) == (0.599, 2.874)
    wide, narrow = sd_ratio_interval(2), sd_ratio_interval(29)
    assert wide[1] > high > narrow[1] > 1 > narrow[0] > low > wide[0]
