"""Typed model of `spec.rollout` (strategy, steps, routing, analysis, A/B test, manual control)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from recserve_operator.errors import InvalidSpec

_E = TypeVar("_E", bound=StrEnum)

__all__ = [
    "AbTestPolicy",
    "AnalysisPolicy",
    "CanaryStep",
    "DeadlineAction",
    "ManualAction",
    "MetricCheck",
    "ParentRef",
    "RolloutPolicy",
    "RoutingPolicy",
    "RoutingProvider",
    "ShadowPolicy",
    "Strategy",
    "parse_duration",
]

DEFAULT_STICKY_HEADER = "x-user-id"
DEFAULT_VARIANT_HEADER = "x-recserve-variant"
_HEADER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}\Z")  # \Z: $ would let a trailing newline into nginx.conf
# What the Gateway API CRD admits in an HTTPRoute's parentRef (Namespace, SectionName): checked here, so a bad
# reference is an InvalidSpec condition rather than an HTTPRoute the API server refuses at every reconcile.
_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_SECTION_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PROMQL_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_PROMQL_RANGE_RE = re.compile(r"\[([^\[\]]*)\]")
ELAPSED = "{{elapsed}}"
# Thirty looks at the default 1m interval: room for a low-weight step to gather minRequests, short enough that a
# rollout nobody can judge does not hold part of the traffic overnight.
DEFAULT_PROGRESS_DEADLINE_S = 1800.0  # the CRD's default, 30m
DEFAULT_SURGE = 1  # the CRD's default: one pod beside the stable's, enough for a canary to start


class Strategy(StrEnum):
    CANARY = "canary"
    AB_TEST = "abTest"
    IMMEDIATE = "immediate"


class RoutingProvider(StrEnum):
    BUILTIN = "builtin"
    GATEWAY_API = "gatewayAPI"


class DeadlineAction(StrEnum):
    """What happens when no analysis was conclusive for `progressDeadline`."""

    ROLLBACK = "rollback"  # all traffic back to stable, rollout ends RolledBack (ProgressDeadlineExceeded)
    HOLD = "hold"  # keep the current weight and say so; progress resumes with the next conclusive analysis


class ManualAction(StrEnum):
    NONE = ""
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"


def parse_duration(value: object, field: str = "duration") -> float:
    """Parse "30s", "5m", "1h30m", "250ms" or a bare number of seconds into seconds."""
    if isinstance(value, bool):
        raise InvalidSpec(f"{field}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise InvalidSpec(f"{field}: empty duration")
        pos = 0
        seconds = 0.0
        for match in _DURATION_PART_RE.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(text):
            raise InvalidSpec(f"{field}: invalid duration {value!r} (use e.g. 30s, 5m, 1h30m)")
    else:
        raise InvalidSpec(f"{field}: expected a duration string, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidSpec(f"{field}: duration must be finite and >= 0, got {value!r}")
    return seconds


@dataclass(frozen=True)
class CanaryStep:
    weight: int
    pause_s: float


@dataclass(frozen=True)
class ParentRef:
    name: str
    namespace: str | None = None
    section_name: str | None = None


@dataclass(frozen=True)
class RoutingPolicy:
    provider: RoutingProvider = RoutingProvider.BUILTIN
    parent_ref: ParentRef | None = None
    sticky_header: str = DEFAULT_STICKY_HEADER
    variant_header: str = DEFAULT_VARIANT_HEADER


@dataclass(frozen=True)
class MetricCheck:
    name: str
    query: str
    max: float | None = None
    min: float | None = None


@dataclass(frozen=True)
class AbTestPolicy:
    metric: str = "ctr"
    clicks: str = ""
    impressions: str = ""
    confidence: float = 0.95
    min_impressions: int = 10000
    power: float = 0.8
    min_detectable_effect: float = 0.1
    max_duration_s: float = 86400.0
    split: int = 50

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence


@dataclass(frozen=True)
class AnalysisPolicy:
    interval_s: float = 60.0
    prometheus: str = ""
    max_error_rate: float | None = 0.01
    max_p99_latency_ms: float | None = None
    min_requests: int = 100
    failure_limit: int = 1
    checks: tuple[MetricCheck, ...] = ()
    ab_test: AbTestPolicy | None = None

    @property
    def enabled(self) -> bool:
        """Analysis runs when spec.rollout.analysis is set and a Prometheus endpoint is known."""
        return bool(self.prometheus)


@dataclass(frozen=True)
class ShadowPolicy:
    """`spec.rollout.shadow`: before the first canary step (or the A/B test) `percent` of live requests is mirrored
    to the candidate and its answers are compared with the stable's; users always get the stable's answer.

    The phase passes when at least `min_requests` mirrored requests were compared, `duration_s` has passed and
    every threshold holds over all of them; a threshold that fails (with `min_requests` compared) rolls back.
    """

    percent: int = 10
    top_k: int = 10
    min_requests: int = 200
    duration_s: float = 0.0
    min_top_k_overlap: float | None = 0.9  # mean top-k overlap over the compared requests
    min_rank_correlation: float | None = None  # mean Kendall tau-b of the top-k lists
    max_mean_abs_score_diff: float | None = None  # mean over requests of the mean |score difference|
    max_abs_score_diff: float | None = None  # the largest |score difference| of any compared request
    max_p99_latency_ms: float | None = None  # the candidate's p99 on mirrored requests
    max_error_rate: float | None = 0.01  # the candidate's failed share of mirrored requests


@dataclass(frozen=True)
class RolloutPolicy:
    strategy: Strategy = Strategy.IMMEDIATE  # the CRD's default
    steps: tuple[CanaryStep, ...] = ()
    routing: RoutingPolicy = RoutingPolicy()
    analysis: AnalysisPolicy = AnalysisPolicy()
    action: ManualAction = ManualAction.NONE
    # Longest a canary/abTest step may go without a conclusive analysis (only when analysis is enabled).
    progress_deadline_s: float = DEFAULT_PROGRESS_DEADLINE_S
    on_progress_deadline: DeadlineAction = DeadlineAction.ROLLBACK
    # Pods (GPUs) a rollout may run beyond the stable's scale: the canary's replicas follow its weight within it.
    surge: int = DEFAULT_SURGE
    shadow: ShadowPolicy | None = None  # a shadow phase before the first step (spec.rollout.shadow)

    @classmethod
    def from_spec(cls, d: Mapping[str, Any] | None, default_prometheus: str = "") -> RolloutPolicy:
        """Parse the schema-defaulted `spec.rollout` dict; raise InvalidSpec on invalid input.

        `default_prometheus` (the operator's setting) is used when an `analysis` section (even an empty one) names
        no URL; without an `analysis` section a canary advances on its pauses alone.
        """
        d = _mapping(d or {}, "spec.rollout")
        strategy = _enum(Strategy, d.get("strategy", Strategy.IMMEDIATE.value), "spec.rollout.strategy")
        steps = _parse_steps(d.get("steps") or [])
        routing = _parse_routing(_mapping(d.get("routing") or {}, "spec.rollout.routing"))
        configured = d.get("analysis") is not None
        analysis = _parse_analysis(
            _mapping(d.get("analysis") or {}, "spec.rollout.analysis"), default_prometheus if configured else ""
        )
        control = _mapping(d.get("control") or {}, "spec.rollout.control")
        action = _enum(ManualAction, control.get("action") or "", "spec.rollout.control.action")
        if strategy is Strategy.CANARY and not steps:
            raise InvalidSpec("spec.rollout.steps: a canary needs at least one step")
        if strategy is Strategy.AB_TEST:
            ab = analysis.ab_test
            if ab is None or not ab.clicks or not ab.impressions:
                raise InvalidSpec(
                    "spec.rollout.analysis.abTest: clicks and impressions queries are required for abTest"
                )
            if not analysis.enabled:
                raise InvalidSpec("spec.rollout.analysis.prometheus: required for abTest")
        deadline, on_deadline = _parse_deadline(d, analysis, strategy)
        surge = _integer(d.get("surge", DEFAULT_SURGE), "spec.rollout.surge", 1)
        shadow_raw = d.get("shadow")
        shadow = None
        if shadow_raw is not None:
            shadow = _parse_shadow(_mapping(shadow_raw, "spec.rollout.shadow"), strategy, analysis, routing)
        return cls(
            strategy=strategy, steps=steps, routing=routing, analysis=analysis, action=action,
            progress_deadline_s=deadline, on_progress_deadline=on_deadline, surge=surge, shadow=shadow,
        )  # fmt: skip


def _mapping(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidSpec(f"{field}: expected an object, got {type(value).__name__}")
    return value


def _enum(enum: type[_E], value: object, field: str) -> _E:
    try:
        return enum(str(value)) if isinstance(value, str) else enum(value)  # type: ignore[arg-type]
    except ValueError:
        allowed = " | ".join(repr(m.value) for m in enum)
        raise InvalidSpec(f"{field}: {value!r} is not one of {allowed}") from None


def _number(value: object, field: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidSpec(f"{field}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InvalidSpec(f"{field}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or (lo is not None and number < lo) or (hi is not None and number > hi):
        raise InvalidSpec(f"{field}: {value!r} is outside [{lo}, {hi}]")
    return number


def _integer(value: object, field: str, lo: int | None = None, hi: int | None = None) -> int:
    number = _number(value, field, lo, hi)
    if not number.is_integer():
        raise InvalidSpec(f"{field}: expected an integer, got {value!r}")
    return int(number)


def _optional_number(d: Mapping[str, Any], key: str, field: str, default: float | None) -> float | None:
    value = d.get(key, default)
    return None if value is None else _number(value, field, lo=0.0)


def _header(value: object, field: str) -> str:
    # Header names end up in nginx variable names and config, so only token characters are allowed.
    if not isinstance(value, str) or not _HEADER_RE.match(value):
        raise InvalidSpec(f"{field}: {value!r} is not a valid header name (letters, digits, '-')")
    return value.lower()


def _parse_steps(raw: object) -> tuple[CanaryStep, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise InvalidSpec("spec.rollout.steps: expected a list")
    steps: list[CanaryStep] = []
    for i, item in enumerate(raw):
        step = _mapping(item, f"spec.rollout.steps[{i}]")
        weight = _integer(step.get("weight"), f"spec.rollout.steps[{i}].weight", 1, 100)
        if steps and weight <= steps[-1].weight:
            raise InvalidSpec(f"spec.rollout.steps[{i}].weight: weights must be strictly increasing ({weight})")
        pause = parse_duration(step.get("pause", "0s"), f"spec.rollout.steps[{i}].pause")
        steps.append(CanaryStep(weight=weight, pause_s=pause))
    return tuple(steps)


def _parse_routing(d: Mapping[str, Any]) -> RoutingPolicy:
    provider = _enum(RoutingProvider, d.get("provider", RoutingProvider.BUILTIN.value), "spec.rollout.routing.provider")
    parent_ref: ParentRef | None = None
    if d.get("parentRef"):
        ref = _mapping(d["parentRef"], "spec.rollout.routing.parentRef")
        name = ref.get("name")
        if not isinstance(name, str) or not name or len(name) > 253:
            raise InvalidSpec("spec.rollout.routing.parentRef.name: required, at most 253 characters")
        namespace, section = ref.get("namespace") or None, ref.get("sectionName") or None
        if namespace is not None and (not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace)):
            raise InvalidSpec(f"spec.rollout.routing.parentRef.namespace: {namespace!r} is not a namespace name")
        if section is not None and (not isinstance(section, str) or len(section) > 253
                                    or not _SECTION_RE.match(section)):  # fmt: skip
            raise InvalidSpec(f"spec.rollout.routing.parentRef.sectionName: {section!r} is not a listener name")
        parent_ref = ParentRef(name, namespace=namespace, section_name=section)
    if provider is RoutingProvider.GATEWAY_API and parent_ref is None:
        raise InvalidSpec("spec.rollout.routing.parentRef: required for provider gatewayAPI")
    sticky = _header(d.get("stickyHeader", DEFAULT_STICKY_HEADER), "spec.rollout.routing.stickyHeader")
    variant = _header(d.get("variantHeader", DEFAULT_VARIANT_HEADER), "spec.rollout.routing.variantHeader")
    if sticky == variant:
        raise InvalidSpec("spec.rollout.routing: stickyHeader and variantHeader must differ")
    return RoutingPolicy(provider=provider, parent_ref=parent_ref, sticky_header=sticky, variant_header=variant)


def _parse_checks(raw: object) -> tuple[MetricCheck, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise InvalidSpec("spec.rollout.analysis.checks: expected a list")
    checks: list[MetricCheck] = []
    for i, item in enumerate(raw):
        c = _mapping(item, f"spec.rollout.analysis.checks[{i}]")
        name, query = c.get("name"), c.get("query")
        if not isinstance(name, str) or not name:
            raise InvalidSpec(f"spec.rollout.analysis.checks[{i}].name: required")
        if not isinstance(query, str) or not query:
            raise InvalidSpec(f"spec.rollout.analysis.checks[{i}].query: required")
        hi = None if c.get("max") is None else _number(c["max"], f"spec.rollout.analysis.checks[{i}].max")
        lo = None if c.get("min") is None else _number(c["min"], f"spec.rollout.analysis.checks[{i}].min")
        if hi is None and lo is None:
            raise InvalidSpec(f"spec.rollout.analysis.checks[{i}]: set min and/or max")
        if hi is not None and lo is not None and lo > hi:
            raise InvalidSpec(f"spec.rollout.analysis.checks[{i}]: min {lo} > max {hi}")
        checks.append(MetricCheck(name=name, query=query, max=hi, min=lo))
    if len({c.name for c in checks}) != len(checks):
        raise InvalidSpec("spec.rollout.analysis.checks: names must be unique")
    return tuple(checks)


def _parse_ab(d: Mapping[str, Any]) -> AbTestPolicy:
    f = "spec.rollout.analysis.abTest"
    clicks, impressions = d.get("clicks", ""), d.get("impressions", "")
    if not isinstance(clicks, str) or not isinstance(impressions, str):
        raise InvalidSpec(f"{f}: clicks and impressions must be PromQL strings")
    for key, query in (("clicks", clicks), ("impressions", impressions)):
        _check_cumulative(query, f"{f}.{key}")
    mde = _number(d.get("minDetectableEffect", 0.1), f"{f}.minDetectableEffect", 0.0, 10.0)
    if mde <= 0:
        # A zero effect has no finite sample size and gives the mSPRT mixture no width.
        raise InvalidSpec(f"{f}.minDetectableEffect: must be > 0 (a relative lift such as 0.05)")
    return AbTestPolicy(
        metric=str(d.get("metric", "ctr")),
        clicks=clicks,
        impressions=impressions,
        confidence=_number(d.get("confidence", 0.95), f"{f}.confidence", 0.5, 0.9999),
        min_impressions=_integer(d.get("minImpressions", 10000), f"{f}.minImpressions", 0),
        power=_number(d.get("power", 0.8), f"{f}.power", 0.5, 0.9999),
        min_detectable_effect=mde,
        max_duration_s=parse_duration(d.get("maxDuration", "24h"), f"{f}.maxDuration"),
        split=_integer(d.get("split", 50), f"{f}.split", 1, 99),
    )


def _check_cumulative(query: str, field: str) -> None:
    """A/B counts must cover the whole experiment: a range is `[{{elapsed}}]`, never a fixed window.

    The sequential test's error guarantee holds for evidence that only accumulates; a sliding `[1h]` window
    forgets old impressions, so its p-values are not valid. A query without a range (a raw counter) counts
    from whenever the application started the counter.
    """
    bare = _PROMQL_STRING_RE.sub('""', query)
    for match in _PROMQL_RANGE_RE.finditer(bare):
        window = match.group(1).split(":", 1)[0].strip()
        if window != ELAPSED:
            raise InvalidSpec(
                f"{field}: range [{match.group(1)}] is a sliding window; count since the test started with"
                f" [{ELAPSED}], e.g. sum by (variant) (increase(recserve_clicks_total[{ELAPSED}]))"
            )


def _parse_analysis(d: Mapping[str, Any], default_prometheus: str) -> AnalysisPolicy:
    f = "spec.rollout.analysis"
    prometheus = d.get("prometheus") or default_prometheus
    if not isinstance(prometheus, str):
        raise InvalidSpec(f"{f}.prometheus: expected a URL string")
    interval = parse_duration(d.get("interval", "1m"), f"{f}.interval")
    if interval <= 0:
        raise InvalidSpec(f"{f}.interval: must be > 0")
    ab_raw = d.get("abTest")
    return AnalysisPolicy(
        interval_s=interval,
        prometheus=prometheus.rstrip("/"),
        max_error_rate=_optional_number(d, "maxErrorRate", f"{f}.maxErrorRate", 0.01),
        max_p99_latency_ms=_optional_number(d, "maxP99LatencyMs", f"{f}.maxP99LatencyMs", None),
        min_requests=_integer(d.get("minRequests", 100), f"{f}.minRequests", 0),
        # The CRD allows 0; zero tolerated failures and one are the same rule: the first failure rolls back.
        failure_limit=max(1, _integer(d.get("failureLimit", 1), f"{f}.failureLimit", 0)),
        checks=_parse_checks(d.get("checks") or []),
        ab_test=_parse_ab(_mapping(ab_raw, f"{f}.abTest")) if ab_raw else None,
    )


def _parse_deadline(d: Mapping[str, Any], analysis: AnalysisPolicy, strategy: Strategy) -> tuple[float, DeadlineAction]:
    deadline = parse_duration(d.get("progressDeadline", DEFAULT_PROGRESS_DEADLINE_S), "spec.rollout.progressDeadline")
    if deadline <= 0:
        raise InvalidSpec(
            "spec.rollout.progressDeadline: must be > 0 (use onProgressDeadline: hold to wait indefinitely)"
        )
    if strategy is not Strategy.IMMEDIATE and analysis.enabled and deadline <= analysis.interval_s:
        # Otherwise the deadline could pass before the step's first look at the metrics.
        raise InvalidSpec(
            f"spec.rollout.progressDeadline: {deadline:g}s must be longer than rollout.analysis.interval"
            f" ({analysis.interval_s:g}s)"
        )
    action = d.get("onProgressDeadline", DeadlineAction.ROLLBACK.value)
    return deadline, _enum(DeadlineAction, action, "spec.rollout.onProgressDeadline")


def _parse_shadow(
    d: Mapping[str, Any], strategy: Strategy, analysis: AnalysisPolicy, routing: RoutingPolicy
) -> ShadowPolicy:
    f = "spec.rollout.shadow"
    if strategy is Strategy.IMMEDIATE:
        raise InvalidSpec(f"{f}: a shadow phase comes before a canary's first step or an A/B test;"
                          " strategy immediate has neither")  # fmt: skip
    if not analysis.enabled:
        raise InvalidSpec(f"{f}: the shadow analysis reads Prometheus: set spec.rollout.analysis"
                          " (and its prometheus URL, or the operator's default)")  # fmt: skip

    gateway = routing.provider is RoutingProvider.GATEWAY_API

    def bound(key: str, default: float | None, lo: float, hi: float | None = None) -> float | None:
        value = d.get(key, default)
        return None if value is None else _number(value, f"{f}.{key}", lo, hi)

    policy = ShadowPolicy(
        percent=_integer(d.get("percent", 10), f"{f}.percent", 1, 100),
        top_k=_integer(d.get("topK", 10), f"{f}.topK", 1, 100),
        min_requests=_integer(d.get("minRequests", 200), f"{f}.minRequests", 1),
        duration_s=parse_duration(d.get("duration", "0s"), f"{f}.duration"),
        # Gateway API mirroring compares nothing (below): no default comparison threshold there.
        min_top_k_overlap=bound("minTopKOverlap", None if gateway else 0.9, 0.0, 1.0),
        min_rank_correlation=bound("minRankCorrelation", None, -1.0, 1.0),
        max_mean_abs_score_diff=bound("maxMeanAbsScoreDiff", None, 0.0),
        max_abs_score_diff=bound("maxAbsScoreDiff", None, 0.0),
        max_p99_latency_ms=bound("maxP99LatencyMs", None, 0.0),
        max_error_rate=bound("maxErrorRate", 0.01, 0.0, 1.0),
    )
    if gateway:
        compared = [k for k in ("minTopKOverlap", "minRankCorrelation", "maxMeanAbsScoreDiff", "maxAbsScoreDiff")
                    if getattr(policy, _SHADOW_FIELDS[k]) is not None]  # fmt: skip
        if compared:
            raise InvalidSpec(
                f"{f}: with routing provider gatewayAPI the gateway mirrors requests to the candidate and discards"
                f" its answers, so nothing compares them: set {', '.join(compared)} to null (the candidate's latency"
                " and errors under live load are still analysed) or use the builtin router"
            )
    return policy


_SHADOW_FIELDS = {
    "minTopKOverlap": "min_top_k_overlap",
    "minRankCorrelation": "min_rank_correlation",
    "maxMeanAbsScoreDiff": "max_mean_abs_score_diff",
    "maxAbsScoreDiff": "max_abs_score_diff",
}
