"""Shared builders for rollout unit tests."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from recserve_operator.rollout.analysis import AnalysisResult, Verdict
from recserve_operator.rollout.policy import RolloutPolicy

T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)

CANARY_SPEC: dict[str, Any] = {
    "strategy": "canary",
    "steps": [{"weight": 10, "pause": "5m"}, {"weight": 50, "pause": "10m"}],
    "routing": {"provider": "builtin", "stickyHeader": "x-user-id", "variantHeader": "x-recserve-variant"},
    "analysis": {
        "interval": "1m",
        "prometheus": "http://prometheus.monitoring:9090",
        "maxErrorRate": 0.01,
        "maxP99LatencyMs": 25,
        "minRequests": 100,
        "failureLimit": 1,
    },
    "control": {"action": ""},
}

AB_SPEC: dict[str, Any] = {
    "strategy": "abTest",
    "routing": {"provider": "builtin"},
    "analysis": {
        "interval": "1m",
        "prometheus": "http://prometheus.monitoring:9090",
        "abTest": {
            "metric": "ctr",
            "clicks": 'sum(clicks_total{variant="{{variant}}"})',
            "impressions": 'sum(impressions_total{variant="{{variant}}"})',
            "confidence": 0.95,
            "minImpressions": 10000,
            "power": 0.8,
            "minDetectableEffect": 0.1,
            "maxDuration": "24h",
            "split": 50,
        },
    },
}


def spec(base: dict[str, Any], **patch: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for dotted, value in patch.items():
        node = out
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def policy(base: dict[str, Any] = CANARY_SPEC, **patch: Any) -> RolloutPolicy:
    return RolloutPolicy.from_spec(spec(base, **patch))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def analysis(verdict: Verdict, requests: float = 1000.0, error_rate: float = 0.0) -> AnalysisResult:
    return AnalysisResult(verdict, f"{verdict.value} (test)", requests, error_rate, 5.0, ())


PASS = analysis(Verdict.PASS)
FAIL = analysis(Verdict.FAIL, error_rate=0.2)
INCONCLUSIVE = analysis(Verdict.INCONCLUSIVE, requests=3)
# What strategies.py makes of a MetricsError: an inconclusive look.
UNAVAILABLE = AnalysisResult(Verdict.INCONCLUSIVE, "inconclusive: metrics unavailable: prometheus unreachable (test)")
