"""Threshold analysis of a candidate's metrics: per-check results and a pass/fail/inconclusive verdict."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from recserve_operator.rollout.policy import AnalysisPolicy, ShadowPolicy
from recserve_operator.rollout.state import format_time

__all__ = [
    "AnalysisResult",
    "CheckResult",
    "Measurements",
    "ShadowMeasurements",
    "Verdict",
    "evaluate",
    "evaluate_shadow",
]

ERROR_RATE_CHECK = "errorRate"
P99_CHECK = "p99LatencyMs"


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Measurements:
    """Raw numbers for one analysis interval of the candidate; None means the query returned nothing."""

    requests: float | None
    error_rate: float | None = None
    p99_ms: float | None = None
    p99_is_average: bool = False  # Triton without summaries only gives mean latency; the check then uses it
    custom: Mapping[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckResult:
    name: str
    value: float | None
    min: float | None
    max: float | None
    passed: bool | None  # None: no data, the check cannot pass

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "passed": self.passed}


@dataclass(frozen=True)
class AnalysisResult:
    verdict: Verdict
    reason: str
    requests: float | None = None
    error_rate: float | None = None
    p99_ms: float | None = None
    checks: tuple[CheckResult, ...] = ()
    measured: Mapping[str, float | None] = field(default_factory=dict)  # every measured value (shadow looks)
    stage: str = ""  # "shadow" for a shadow look

    @property
    def failed_checks(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.passed is False)

    def to_status(self, now: datetime, decision: str) -> dict[str, Any]:
        """`status.canary.lastAnalysis`."""
        return {
            "time": format_time(now),
            "errorRate": self.error_rate,
            "p99Ms": self.p99_ms,
            "requests": self.requests,
            "checks": [c.to_dict() for c in self.checks],
            "verdict": self.verdict.value,
            "decision": decision,
            "reason": self.reason,
            **({"stage": self.stage} if self.stage else {}),
            **({"measured": dict(self.measured)} if self.measured else {}),
        }


def _check(name: str, value: float | None, lo: float | None, hi: float | None) -> CheckResult:
    if value is None or math.isnan(value):
        return CheckResult(name, None, lo, hi, None)
    ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    return CheckResult(name, value, lo, hi, ok)


def evaluate(policy: AnalysisPolicy, m: Measurements) -> AnalysisResult:
    """Compare measurements against the policy's thresholds.

    A failed check fails the analysis as soon as there is data for it; a pass needs at least
    `minRequests` requests in the interval and data for every check, otherwise it is inconclusive.
    """
    checks: list[CheckResult] = []
    if policy.max_error_rate is not None:
        checks.append(_check(ERROR_RATE_CHECK, m.error_rate, None, policy.max_error_rate))
    if policy.max_p99_latency_ms is not None:
        checks.append(_check(P99_CHECK, m.p99_ms, None, policy.max_p99_latency_ms))
    for c in policy.checks:
        checks.append(_check(c.name, m.custom.get(c.name), c.min, c.max))
    requests = m.requests
    enough = requests is not None and requests >= policy.min_requests and requests > 0

    def result(verdict: Verdict, reason: str) -> AnalysisResult:
        return AnalysisResult(verdict, reason, requests, m.error_rate, m.p99_ms, tuple(checks))

    failed = [c for c in checks if c.passed is False]
    # A failure with too few requests could be noise (1 error in 3 requests); wait unless it is a custom
    # check, whose query is not tied to the request count.
    builtin = {ERROR_RATE_CHECK, P99_CHECK}
    hard_failed = [c for c in failed if enough or c.name not in builtin]
    if hard_failed:
        names = ", ".join(f"{c.name}={c.value:.4g} ({_bound(c)})" for c in hard_failed)
        return result(Verdict.FAIL, f"failed: {names}")
    if not enough:
        need = policy.min_requests
        got = "no" if requests is None else f"{requests:.0f}"
        return result(Verdict.INCONCLUSIVE, f"inconclusive: waiting for {need} requests per interval, got {got}")
    missing = [c.name for c in checks if c.passed is None]
    if missing:
        return result(Verdict.INCONCLUSIVE, f"inconclusive: no data for {', '.join(missing)}")
    suffix = " (p99 is the mean latency: Triton exports no quantiles)" if m.p99_is_average and m.p99_ms else ""
    return result(Verdict.PASS, f"passed {len(checks)} checks over {requests:.0f} requests{suffix}")


def _bound(c: CheckResult) -> str:
    if c.max is not None and c.value is not None and c.value > c.max:
        return f"max {c.max:g}"
    return f"min {c.min:g}"


# Names of the shadow analysis' checks (status.canary.shadow.checks[].name).
SHADOW_OVERLAP_CHECK = "topKOverlap"
SHADOW_CORRELATION_CHECK = "rankCorrelation"
SHADOW_MEAN_DIFF_CHECK = "meanAbsScoreDiff"
SHADOW_MAX_DIFF_CHECK = "maxAbsScoreDiff"


@dataclass(frozen=True)
class ShadowMeasurements:
    """The comparator's numbers since the shadow phase began; None: the query returned nothing.

    mirrored: requests sent to the candidate (compared or failed); compared: requests both answered and compared.
    """

    mirrored: float | None
    compared: float | None
    dropped: float | None = None
    error_rate: float | None = None
    p99_ms: float | None = None
    top_k_overlap: float | None = None
    rank_correlation: float | None = None
    mean_abs_score_diff: float | None = None
    max_abs_score_diff: float | None = None


def evaluate_shadow(policy: ShadowPolicy, m: ShadowMeasurements) -> AnalysisResult:
    """The shadow phase's verdict: every threshold over at least `min_requests` compared requests.

    Unlike the canary's guardrails, a comparison threshold needs the full sample before it fails too: the first
    few mirrored requests of a good candidate can disagree by chance (a tie broken differently), and a rollback on
    them could not be undone. Error rate and latency are judged on the mirrored requests, compared or not.
    """
    checks = [
        _check(SHADOW_OVERLAP_CHECK, m.top_k_overlap, policy.min_top_k_overlap, None)
        if policy.min_top_k_overlap is not None else None,
        _check(SHADOW_CORRELATION_CHECK, m.rank_correlation, policy.min_rank_correlation, None)
        if policy.min_rank_correlation is not None else None,
        _check(SHADOW_MEAN_DIFF_CHECK, m.mean_abs_score_diff, None, policy.max_mean_abs_score_diff)
        if policy.max_mean_abs_score_diff is not None else None,
        _check(SHADOW_MAX_DIFF_CHECK, m.max_abs_score_diff, None, policy.max_abs_score_diff)
        if policy.max_abs_score_diff is not None else None,
        _check(P99_CHECK, m.p99_ms, None, policy.max_p99_latency_ms)
        if policy.max_p99_latency_ms is not None else None,
        _check(ERROR_RATE_CHECK, m.error_rate, None, policy.max_error_rate)
        if policy.max_error_rate is not None else None,
    ]  # fmt: skip
    present = tuple(c for c in checks if c is not None)
    compared = m.compared

    measured = {
        "mirrored": m.mirrored, "compared": m.compared, "dropped": m.dropped, "errorRate": m.error_rate,
        "p99Ms": m.p99_ms, "topKOverlap": m.top_k_overlap, "rankCorrelation": m.rank_correlation,
        "meanAbsScoreDiff": m.mean_abs_score_diff, "maxAbsScoreDiff": m.max_abs_score_diff,
    }  # fmt: skip

    def result(verdict: Verdict, reason: str) -> AnalysisResult:
        return AnalysisResult(verdict, reason, compared, m.error_rate, m.p99_ms, present, measured, "shadow")

    enough = compared is not None and compared >= policy.min_requests
    failed = [c for c in present if c.passed is False]
    # Errors count among mirrored requests: a candidate that fails every request is never "compared" enough.
    mirrored_enough = m.mirrored is not None and m.mirrored >= policy.min_requests
    hard = [c for c in failed if enough or (c.name == ERROR_RATE_CHECK and mirrored_enough)]
    if hard:
        names = ", ".join(f"{c.name}={c.value:.4g} ({_bound(c)})" for c in hard)
        return result(Verdict.FAIL, f"shadow failed: {names} over {compared or 0:.0f} compared requests")
    if not enough:
        got = "none" if compared is None else f"{compared:.0f}"
        return result(Verdict.INCONCLUSIVE, f"inconclusive: shadow waiting for {policy.min_requests} compared"
                      f" requests, got {got}")  # fmt: skip
    missing = [c.name for c in present if c.passed is None]
    if missing:
        return result(Verdict.INCONCLUSIVE, f"inconclusive: shadow has no data for {', '.join(missing)}")
    return result(Verdict.PASS, f"shadow passed {len(present)} checks over {compared:.0f} compared requests")
