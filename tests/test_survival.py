"""Kaplan-Meier, Greenwood intervals and the log-rank test against hand-computed references."""

import math
from statistics import NormalDist

import numpy as np
import pytest

from ekd_lightning.analysis.survival import kaplan_meier, logrank, survival_at, survival_difference

# six trajectories: failures at 1, 2, 3, 5; censored (intact at their end) at 2 and 4
TIMES = [1, 2, 2, 3, 4, 5]
EVENTS = [True, True, False, True, False, True]


def test_kaplan_meier_and_greenwood_interval_by_hand():
    curve = kaplan_meier(TIMES, EVENTS)
    # by hand: at risk 6, 5, 3, 1 at the failure times 1, 2, 3, 5
    s = [1.0, 5 / 6, 5 / 6 * 4 / 5, 5 / 6 * 4 / 5 * 2 / 3, 0.0]
    np.testing.assert_allclose(curve["time"], [0, 1, 2, 3, 5])
    np.testing.assert_allclose(curve["at_risk"], [6, 6, 5, 3, 1])
    np.testing.assert_allclose(curve["survival"], s)
    # Greenwood: sum d / (n (n - d)) = 1/30, 1/30 + 1/20, ... + 1/6
    sums = [1 / 30, 1 / 30 + 1 / 20, 1 / 30 + 1 / 20 + 1 / 6]
    np.testing.assert_allclose(curve["variance"][1:4], [s[k + 1] ** 2 * g for k, g in enumerate(sums)])
    z = NormalDist().inv_cdf(0.975)
    for k, g in enumerate(sums):  # the log(-log S) interval: S ** exp(± z sqrt(V) / |log S|)
        sk = s[k + 1]
        half = z * math.sqrt(g) / abs(math.log(sk))
        assert curve["lower"][k + 1] == pytest.approx(sk ** math.exp(half), rel=1e-12)
        assert curve["upper"][k + 1] == pytest.approx(sk ** math.exp(-half), rel=1e-12)
    assert curve["lower"][1] < s[1] < curve["upper"][1]
    # before any failure: the exact interval for 0 failures among 6, [0.025 ** (1/6), 1]
    assert survival_at(curve, 0.5)[:3] == pytest.approx((1.0, 0.025 ** (1 / 6), 1.0))
    assert survival_at(curve, 4.0)[0] == pytest.approx(4 / 9)  # censored at 4: no step


def test_all_intact_is_an_interval_not_certainty():
    s, low, high, _ = survival_at(kaplan_meier([10.0] * 64, [False] * 64), 10.0)
    assert (s, high) == (1.0, 1.0) and low == pytest.approx(0.025 ** (1 / 64)) and low < 0.95


def test_logrank_by_hand():
    # a fails at 1, 2, 3; b fails at 4, censored at 5 and 6. By hand, per failure time:
    # expected failures of a = 3/6 + 2/5 + 1/4 + 0, variance = .25 + .24 + .1875 + 0
    test = logrank([1, 2, 3], [1, 1, 1], [4, 5, 6], [1, 0, 0])
    expected, variance = 0.5 + 0.4 + 0.25, 0.25 + 0.24 + 0.1875
    assert test["observed_a"] == 3 and test["expected_a"] == pytest.approx(expected)
    chi2 = (3 - expected) ** 2 / variance
    assert test["chi2"] == pytest.approx(chi2)
    assert test["p"] == pytest.approx(2 * (1 - NormalDist().cdf(math.sqrt(chi2))))  # chi² with 1 dof
    # ties: three failures at t = 1 (two of a); variance d (n_a/n) (n_b/n) (n - d) / (n - 1)
    tied = logrank([1, 1, 2], [1, 1, 1], [1, 3, 4], [1, 1, 0])
    expected, variance = 3 * 3 / 6 + 1 / 3, 3 * 0.25 * 3 / 5 + (1 / 3) * (2 / 3)
    assert tied["chi2"] == pytest.approx((3 - expected) ** 2 / variance)
    # symmetric in the groups; identical groups give no evidence
    assert logrank([4, 5, 6], [1, 0, 0], [1, 2, 3], [1, 1, 1])["chi2"] == pytest.approx(chi2)
    assert logrank(TIMES, EVENTS, TIMES, EVENTS)["p"] == pytest.approx(1.0)


def test_stratified_logrank_sums_the_strata():
    a = logrank([1, 2, 3], [1, 1, 1], [4, 5, 6], [1, 0, 0])
    b = logrank([2, 9], [1, 0], [1, 3], [1, 1])
    both = logrank([1, 2, 3, 2, 9], [1, 1, 1, 1, 0], [4, 5, 6, 1, 3], [1, 0, 0, 1, 1],
                   strata_a=[0, 0, 0, 1, 1], strata_b=[0, 0, 0, 1, 1])
    assert both["observed_a"] == a["observed_a"] + b["observed_a"]
    assert both["expected_a"] == pytest.approx(a["expected_a"] + b["expected_a"])


def test_survival_difference_interval():
    a, b = kaplan_meier(TIMES, EVENTS), kaplan_meier([10.0] * 6, [False] * 6)
    diff, low, high = survival_difference(a, b, 3.0)
    half = NormalDist().inv_cdf(0.975) * math.sqrt((4 / 9) ** 2 / 4)
    assert (diff, low, high) == pytest.approx((4 / 9 - 1, 4 / 9 - 1 - half, 4 / 9 - 1 + half))


def test_bad_survival_data_is_refused():
    with pytest.raises(ValueError, match="equal, non-empty"):
        kaplan_meier([1, 2], [True])
