"""A/B statistics checked by simulation: A/A false positives under repeated looks, power at the computed size."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from recserve_operator.rollout.policy import AbTestPolicy
from recserve_operator.rollout.state import AbStatus
from recserve_operator.rollout.statistics import (
    AbDecision,
    Counts,
    ab_verdict,
    fixed_horizon_sample_size,
    msprt_log_lr,
    msprt_tau2,
    sequential_sample_size,
)
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize

ALPHA = 0.05
BASE = 0.05
LIFT = 0.12  # 5.0% -> 5.6%
POLICY = AbTestPolicy(clicks="c", impressions="i", min_impressions=1000, min_detectable_effect=LIFT, power=0.8)


def simulate_looks(p_a: float, p_b: float, *, n_max: int, looks: int, sims: int, seed: int) -> npt.NDArray[np.bool_]:
    """Reject flags per simulated experiment, looking `looks` times at equally spaced sample sizes."""
    rng = np.random.default_rng(seed)
    step = n_max // looks
    ca = rng.binomial(step, p_a, size=(sims, looks)).cumsum(axis=1)
    cb = rng.binomial(step, p_b, size=(sims, looks)).cumsum(axis=1)
    n = step * np.arange(1, looks + 1)
    llr = msprt_log_lr(ca, n, cb, n, msprt_tau2(BASE, LIFT))
    flags: npt.NDArray[np.bool_] = (llr >= np.log(1 / ALPHA)).any(axis=1)
    return flags


def test_fixed_horizon_size_matches_statsmodels_power_analysis() -> None:
    n = fixed_horizon_sample_size(BASE, LIFT, ALPHA, 0.8)
    h = proportion_effectsize(BASE * (1 + LIFT), BASE)
    assert NormalIndPower().power(h, nobs1=n, alpha=ALPHA) >= 0.8
    assert 20000 < n < 24000  # the textbook ~22k per arm for 5.0% vs 5.6%


def test_sequential_size_is_larger_than_fixed_but_bounded() -> None:
    fixed = fixed_horizon_sample_size(BASE, LIFT, ALPHA, 0.8)
    seq = sequential_sample_size(BASE, LIFT, ALPHA, 0.8)
    assert fixed < seq < 3 * fixed


def test_aa_false_positive_rate_stays_below_alpha_with_100_looks() -> None:
    rejects = simulate_looks(BASE, BASE, n_max=200_000, looks=100, sims=2000, seed=7)
    # Peeking 100 times at a fixed-horizon z-test would reject ~30% of A/A tests.
    assert rejects.mean() <= ALPHA


def test_true_lift_is_detected_with_configured_power_at_the_computed_size() -> None:
    n = sequential_sample_size(BASE, LIFT, ALPHA, 0.8)
    rejects = simulate_looks(BASE, BASE * (1 + LIFT), n_max=n, looks=50, sims=2000, seed=11)
    assert rejects.mean() >= 0.8 - 0.02  # 2000 sims: standard error ~0.009


def test_peeking_at_a_plain_z_test_would_inflate_false_positives() -> None:
    """Guard the guard: the same simulation with the fixed-horizon boundary does blow through alpha."""
    rng = np.random.default_rng(3)
    sims, looks, step = 2000, 100, 2000
    ca = rng.binomial(step, BASE, size=(sims, looks)).cumsum(axis=1)
    cb = rng.binomial(step, BASE, size=(sims, looks)).cumsum(axis=1)
    n = step * np.arange(1, looks + 1)
    pooled = (ca + cb) / (2 * n)
    z = (cb - ca) / n / np.sqrt(pooled * (1 - pooled) * 2 / n)
    assert (np.abs(z) >= 1.96).any(axis=1).mean() > 2 * ALPHA


def test_verdict_waits_for_min_impressions() -> None:
    v = ab_verdict(Counts(10, 200), Counts(30, 200), POLICY)
    assert v.decision is AbDecision.CONTINUE
    assert "waiting" in v.reason


def test_verdict_picks_the_candidate_on_a_clear_lift() -> None:
    v = ab_verdict(Counts(2500, 50_000), Counts(3200, 50_000), POLICY)
    assert v.decision is AbDecision.CANDIDATE_WINS
    assert v.lift == pytest.approx(0.28)
    assert v.lift_ci95 is not None and v.lift_ci95[0] > 0
    assert v.abs_lift_ci95 is not None and v.abs_lift_ci95[0] > 0
    assert v.p_value is not None and v.p_value < 1e-6
    assert v.stable_ci95 is not None and v.stable_ci95[0] < 0.05 < v.stable_ci95[1]


def test_verdict_picks_stable_when_the_candidate_is_worse() -> None:
    v = ab_verdict(Counts(3200, 50_000), Counts(2500, 50_000), POLICY)
    assert v.decision is AbDecision.STABLE_WINS


def test_verdict_keeps_running_when_the_difference_is_not_significant() -> None:
    v = ab_verdict(Counts(500, 10_000), Counts(520, 10_000), POLICY)
    assert v.decision is AbDecision.CONTINUE
    assert v.sequential_p_value is not None and v.sequential_p_value > ALPHA


def test_sequential_p_value_is_a_running_minimum() -> None:
    v = ab_verdict(Counts(500, 10_000), Counts(520, 10_000), POLICY, AbStatus(sequential_p_value=0.2))
    assert v.sequential_p_value == 0.2


def test_mixing_variance_is_fixed_at_the_first_counted_look() -> None:
    first = ab_verdict(Counts(500, 10_000), Counts(520, 10_000), POLICY)
    assert first.mixing_variance == pytest.approx(msprt_tau2(0.05, LIFT))
    later = ab_verdict(Counts(1200, 20_000), Counts(1250, 20_000), POLICY, AbStatus(mixing_variance=1e-5))
    assert later.mixing_variance == 1e-5


def test_looks_before_min_impressions_do_not_count() -> None:
    v = ab_verdict(Counts(10, 500), Counts(60, 500), POLICY)
    assert v.sequential_p_value is None and v.mixing_variance is None


def test_no_clicks_at_all_is_not_a_decision() -> None:
    v = ab_verdict(Counts(0, 20_000), Counts(0, 20_000), POLICY)
    assert v.decision is AbDecision.CONTINUE
