"""Threshold analysis of a candidate's metrics: per-check results and a pass/fail/inconclusive verdict."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from recserve_operator.rollout.policy import AnalysisPolicy
from recserve_operator.rollout.state import format_time

__all__ = ["AnalysisResult", "CheckResult", "Measurements", "Verdict", "evaluate"]

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
