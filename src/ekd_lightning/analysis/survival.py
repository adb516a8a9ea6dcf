"""Survival analysis of MD trajectories: Kaplan-Meier curves, Greenwood confidence intervals and
the log-rank test (a few lines of numpy; no survival library needed).

A trajectory is one subject: its *time* is the time to failure (fs) when it failed (*event*
True), or the run length when it was still intact at the end (censored, event False).

- :func:`kaplan_meier`: the product-limit estimate S(t) = prod_{t_i <= t} (1 - d_i / n_i) over
  the distinct failure times t_i (d_i failures among the n_i trajectories still running), with a
  pointwise confidence interval from Greenwood's variance on the log(-log S) scale (the
  "exponential Greenwood" interval, lifelines' default): with
  V = sum d_i / (n_i (n_i - d_i)) / (log S)², S^exp(±z sqrt(V)). Where no trajectory has failed
  yet (S = 1) Greenwood's variance is 0; the interval there is the exact (Clopper-Pearson) one
  for no failure among the n trajectories at risk at the start, [(α/2)^(1/n), 1], so that 64 of
  64 intact trajectories read "≥ 94.4%" and not "exactly 100%".
- :func:`logrank`: the log-rank test of equal survival in two groups, optionally stratified (one
  stratum per temperature): chi² = (sum(O - E))² / sum(V) with one degree of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np


def _arrays(times, events) -> tuple[np.ndarray, np.ndarray]:
    times = np.asarray(times, dtype=np.float64)
    events = np.asarray(events, dtype=bool)
    if times.ndim != 1 or times.shape != events.shape or not len(times):
        raise ValueError(f"survival data needs equal, non-empty 1-D times and events, got "
                         f"{times.shape} and {events.shape}")
    return times, events


def kaplan_meier(times, events, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """Kaplan-Meier estimate with a pointwise (1 − alpha) confidence interval.

    Args:
        times: (n,) time to failure or to censoring (any unit, e.g. fs).
        events: (n,) True where the trajectory failed at its time, False where censored.
        alpha: 0.05 for 95% intervals.

    Returns:
        Step-function arrays, one entry per distinct failure time plus t = 0 first: ``time``,
        ``at_risk`` (n_i), ``failures`` (d_i), ``survival`` (S just after the time), ``lower``,
        ``upper`` (the interval) and ``variance`` (Greenwood's, of S).
    """
    times, events = _arrays(times, events)
    z = NormalDist().inv_cdf(1 - alpha / 2)
    event_times = np.unique(times[events])
    at_risk = np.array([(times >= t).sum() for t in event_times], dtype=np.float64)
    failures = np.array([(events & (times == t)).sum() for t in event_times], dtype=np.float64)
    survival = np.cumprod(1.0 - failures / at_risk)
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = np.cumsum(failures / (at_risk * (at_risk - failures)))
        log_s = np.log(survival)
        spread = z * np.sqrt(greenwood) / np.abs(log_s)
        lower = survival ** np.exp(spread)
        upper = survival ** np.exp(-spread)
        lower = np.where(survival > 0, lower, 0.0)
        upper = np.where(survival > 0, upper, 0.0)
        variance = np.where(survival > 0, survival**2 * greenwood, 0.0)
    exact = (alpha / 2) ** (1.0 / len(times))  # no failure yet: Clopper-Pearson, n at risk = all
    return {
        "time": np.concatenate([[0.0], event_times]),
        "at_risk": np.concatenate([[len(times)], at_risk]),
        "failures": np.concatenate([[0.0], failures]),
        "survival": np.concatenate([[1.0], survival]),
        "lower": np.concatenate([[exact], lower]),
        "upper": np.concatenate([[1.0], upper]),
        "variance": np.concatenate([[0.0], variance]),
    }


def survival_at(curve: dict[str, np.ndarray], t: float) -> tuple[float, float, float, float]:
    """(S, lower, upper, Greenwood variance) of a :func:`kaplan_meier` curve at time ``t``."""
    k = int(np.searchsorted(curve["time"], t, side="right")) - 1
    return (float(curve["survival"][k]), float(curve["lower"][k]), float(curve["upper"][k]),
            float(curve["variance"][k]))


def logrank(times_a, events_a, times_b, events_b, strata_a: Sequence | None = None,
            strata_b: Sequence | None = None) -> dict[str, float]:
    """Log-rank test of equal survival of groups a and b (stratified when strata are given).

    Returns:
        ``observed_a`` and ``expected_a`` (failures of a, observed and expected under equal
        hazards), ``chi2`` (1 degree of freedom) and its ``p`` value (NaN when no failure at all).
    """
    ta, ea = _arrays(times_a, events_a)
    tb, eb = _arrays(times_b, events_b)
    sa = np.zeros(len(ta)) if strata_a is None else np.asarray(strata_a)
    sb = np.zeros(len(tb)) if strata_b is None else np.asarray(strata_b)
    observed = expected = variance = 0.0
    for stratum in np.unique(np.concatenate([sa, sb])):
        a_t, a_e = ta[sa == stratum], ea[sa == stratum]
        b_t, b_e = tb[sb == stratum], eb[sb == stratum]
        for t in np.unique(np.concatenate([a_t[a_e], b_t[b_e]])):
            n_a, n_b = (a_t >= t).sum(), (b_t >= t).sum()
            d_a, d = (a_e & (a_t == t)).sum(), (a_e & (a_t == t)).sum() + (b_e & (b_t == t)).sum()
            n = n_a + n_b
            observed += d_a
            expected += d * n_a / n
            if n > 1:
                variance += d * (n_a / n) * (n_b / n) * (n - d) / (n - 1)
    chi2 = (observed - expected) ** 2 / variance if variance > 0 else math.nan
    p = math.erfc(math.sqrt(chi2 / 2)) if math.isfinite(chi2) else math.nan
    return {"observed_a": float(observed), "expected_a": float(expected), "chi2": float(chi2),
            "p": float(p)}


def survival_difference(curve_a: dict, curve_b: dict, t: float, alpha: float = 0.05
                        ) -> tuple[float, float, float]:
    """S_a(t) − S_b(t) with a normal (Greenwood) (1 − alpha) interval: (difference, low, high)."""
    s_a, _, _, v_a = survival_at(curve_a, t)
    s_b, _, _, v_b = survival_at(curve_b, t)
    half = NormalDist().inv_cdf(1 - alpha / 2) * math.sqrt(v_a + v_b)
    return s_a - s_b, s_a - s_b - half, s_a - s_b + half
