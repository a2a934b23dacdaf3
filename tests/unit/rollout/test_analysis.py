"""Threshold analysis: per-check results and the pass/fail/inconclusive verdict."""

from __future__ import annotations

from recserve_operator.rollout.analysis import Measurements, Verdict, evaluate

from .helpers import CANARY_SPEC, policy

CHECKS = [{"name": "scoreDrift", "query": "x", "max": 0.5}, {"name": "coverage", "query": "y", "min": 0.9}]
POLICY = policy(CANARY_SPEC, analysis__checks=CHECKS).analysis


def measure(requests: float | None = 1000, error_rate: float | None = 0.001, p99: float | None = 10.0,
            drift: float | None = 0.1, coverage: float | None = 0.95) -> Measurements:  # fmt: skip
    return Measurements(requests, error_rate, p99, custom={"scoreDrift": drift, "coverage": coverage})


def test_all_checks_within_thresholds_pass() -> None:
    r = evaluate(POLICY, measure())
    assert r.verdict is Verdict.PASS
    assert [c.name for c in r.checks] == ["errorRate", "p99LatencyMs", "scoreDrift", "coverage"]
    assert all(c.passed for c in r.checks)


def test_error_rate_above_max_fails_with_value_and_threshold() -> None:
    r = evaluate(POLICY, measure(error_rate=0.05))
    assert r.verdict is Verdict.FAIL
    (failed,) = r.failed_checks
    assert (failed.name, failed.value, failed.max) == ("errorRate", 0.05, 0.01)
    assert "errorRate=0.05 (max 0.01)" in r.reason


def test_p99_above_max_fails() -> None:
    assert evaluate(POLICY, measure(p99=40.0)).verdict is Verdict.FAIL


def test_user_check_below_min_fails() -> None:
    r = evaluate(POLICY, measure(coverage=0.5))
    assert r.verdict is Verdict.FAIL
    assert "coverage=0.5 (min 0.9)" in r.reason


def test_too_few_requests_is_inconclusive_never_a_pass() -> None:
    r = evaluate(POLICY, measure(requests=50))
    assert r.verdict is Verdict.INCONCLUSIVE
    assert r.reason.startswith("inconclusive: waiting")


def test_too_few_requests_with_errors_is_still_inconclusive() -> None:
    assert evaluate(POLICY, measure(requests=5, error_rate=0.4)).verdict is Verdict.INCONCLUSIVE


def test_no_traffic_at_all_is_inconclusive() -> None:
    assert evaluate(POLICY, measure(requests=None, error_rate=None, p99=None)).verdict is Verdict.INCONCLUSIVE


def test_missing_data_for_a_check_is_inconclusive() -> None:
    r = evaluate(POLICY, measure(drift=None))
    assert r.verdict is Verdict.INCONCLUSIVE
    assert "scoreDrift" in r.reason


def test_a_failing_user_check_fails_even_with_little_traffic() -> None:
    assert evaluate(POLICY, measure(requests=3, drift=0.9)).verdict is Verdict.FAIL


def test_nan_counts_as_no_data() -> None:
    assert evaluate(POLICY, measure(p99=float("nan"))).verdict is Verdict.INCONCLUSIVE


def test_status_shape() -> None:
    from .helpers import T0

    d = evaluate(POLICY, measure()).to_status(T0, "advance")
    assert d["time"] == "2026-11-29T12:00:00Z"
    assert set(d) >= {"time", "errorRate", "p99Ms", "requests", "checks", "decision", "reason"}
