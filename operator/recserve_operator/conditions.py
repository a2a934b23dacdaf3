"""metav1.Condition bookkeeping and the phase derived from the conditions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

READY = "Ready"
MODEL_REPOSITORY_READY = "ModelRepositoryReady"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
CONDITION_TYPES = (READY, MODEL_REPOSITORY_READY, PROGRESSING, DEGRADED)
# Only on models whose canary/abTest analysis queries Prometheus: whether the last look got an answer.
METRICS_AVAILABLE = "MetricsAvailable"

# Reasons: CamelCase, actionable, stable (alerts and docs key on them).
INVALID_SPEC = "InvalidSpec"
BUILD_FAILED = "BuildFailed"
# Built once, but the serving pods cannot install the artifact (the store is down or no longer holds it).
FETCH_FAILED = "FetchFailed"
BUILDING = "Building"
INSUFFICIENT_GPU = "InsufficientGPU"
UNSCHEDULABLE = "Unschedulable"
CONTAINER_FAILING = "ContainerFailing"
DEPLOYING = "Deploying"
AVAILABLE = "Available"
ROLLING_OUT = "RollingOut"
ROLLOUT_COMPLETE = "RolloutComplete"
ROLLED_BACK = "RolledBack"
ABORTED = "Aborted"
PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
METRICS_UNAVAILABLE = "MetricsUnavailable"
NOT_MEASURED = "NotMeasured"
BUILT = "Built"
AS_EXPECTED = "AsExpected"
PENDING = "Pending"

PHASES = ("Pending", "Building", "Deploying", "Progressing", "Ready", "Degraded", "Failed")


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str


def get_condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def set_condition(
    conditions: Sequence[Mapping[str, Any]], new: Condition, now: str, generation: int
) -> list[dict[str, Any]]:
    """Return conditions with `new` set; lastTransitionTime changes only when the status flips."""
    result: list[dict[str, Any]] = []
    found = False
    for existing in conditions:
        if existing.get("type") != new.type:
            result.append(dict(existing))
            continue
        found = True
        same_status = existing.get("status") == new.status
        result.append(
            {
                "type": new.type,
                "status": new.status,
                "reason": new.reason,
                "message": new.message,
                "lastTransitionTime": existing.get("lastTransitionTime", now) if same_status else now,
                "observedGeneration": generation,
            }
        )
    if not found:
        result.append(
            {
                "type": new.type,
                "status": new.status,
                "reason": new.reason,
                "message": new.message,
                "lastTransitionTime": now,
                "observedGeneration": generation,
            }
        )
    return result


def remove_condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [dict(c) for c in conditions if c.get("type") != type_]


def _is(conditions: Sequence[Mapping[str, Any]], type_: str, status: str) -> bool:
    c = get_condition(conditions, type_)
    return c is not None and c.get("status") == status


def _reason(conditions: Sequence[Mapping[str, Any]], type_: str) -> str:
    c = get_condition(conditions, type_)
    return str(c.get("reason", "")) if c is not None else ""


def derive_phase(conditions: Sequence[Mapping[str, Any]]) -> str:
    """One word for printer columns, derived only from the conditions so the two never disagree."""
    ready = _is(conditions, READY, "True")
    degraded = _is(conditions, DEGRADED, "True")
    progressing = _is(conditions, PROGRESSING, "True")
    if ready:
        if degraded:
            return "Degraded"
        return "Progressing" if progressing else "Ready"
    # Nothing serves: failures that need a human first, then how far the first revision got.
    if _reason(conditions, READY) == INVALID_SPEC or _reason(conditions, MODEL_REPOSITORY_READY) in (
            BUILD_FAILED, FETCH_FAILED):
        return "Failed"
    if degraded:
        return "Degraded" if _reason(conditions, DEGRADED) == CONTAINER_FAILING else "Pending"
    if _is(conditions, MODEL_REPOSITORY_READY, "False") and _reason(conditions, MODEL_REPOSITORY_READY) == BUILDING:
        return "Building"
    if _is(conditions, MODEL_REPOSITORY_READY, "True"):
        return "Deploying"
    if _reason(conditions, READY) == DEPLOYING:
        return "Deploying"
    return "Pending"
