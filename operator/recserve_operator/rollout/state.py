"""Rollout state persisted in `status.canary` / `status.abTest`, with lossless dict round-trips."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from recserve_operator.rollout.policy import ManualAction

__all__ = ["AbStatus", "ControlRecord", "Phase", "RolloutState", "VariantStats", "format_time", "parse_time"]


class Phase(StrEnum):
    IDLE = "Idle"  # stable serves everything, no candidate
    PROGRESSING = "Progressing"  # a candidate is being rolled out (possibly paused)
    PROMOTED = "Promoted"  # the last candidate became stable
    ROLLED_BACK = "RolledBack"  # the last candidate failed analysis or lost the A/B test
    ABORTED = "Aborted"  # the last candidate was aborted manually


ANALYSIS_HISTORY = 5

TERMINAL_PHASES = frozenset({Phase.IDLE, Phase.PROMOTED, Phase.ROLLED_BACK, Phase.ABORTED})


def format_time(t: datetime | None) -> str | None:
    """RFC3339 in UTC with a Z suffix, second precision (what kubectl shows)."""
    if t is None:
        return None
    return t.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _opt_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _pair(value: object) -> tuple[float, float] | None:
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return (float(value[0]), float(value[1]))
    return None


def _conclusive_time(last_analysis: object) -> datetime | None:
    """Status written before lastConclusiveAt existed: its last analysis, if that one passed or failed."""
    if not isinstance(last_analysis, Mapping) or last_analysis.get("verdict") not in ("pass", "fail"):
        return None
    return parse_time(last_analysis.get("time"))


@dataclass(frozen=True)
class VariantStats:
    name: str
    revision: str
    impressions: int = 0
    clicks: int = 0
    ctr: float | None = None
    ci95: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "revision": self.revision, "impressions": self.impressions}
        d["clicks"] = self.clicks
        d["ctr"] = self.ctr
        d["ci95"] = list(self.ci95) if self.ci95 else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VariantStats:
        return cls(
            name=str(d.get("name", "")),
            revision=str(d.get("revision", "")),
            impressions=int(d.get("impressions") or 0),
            clicks=int(d.get("clicks") or 0),
            ctr=_opt_float(d.get("ctr")),
            ci95=_pair(d.get("ci95")),
        )


@dataclass(frozen=True)
class AbStatus:
    variants: tuple[VariantStats, ...] = ()
    p_value: float | None = None  # fixed-horizon z-test p-value (informational)
    sequential_p_value: float | None = None  # always-valid mSPRT p-value: running minimum across looks
    lift: float | None = None  # relative CTR lift of the candidate over stable
    lift_ci95: tuple[float, float] | None = None
    winner: str | None = None  # "stable" | "canary" | "none" once decided
    decided_at: datetime | None = None
    mixing_variance: float | None = None  # mSPRT tau^2, fixed once; kept so later looks use the same mixture

    def to_dict(self) -> dict[str, Any]:
        return {
            "variants": [v.to_dict() for v in self.variants],
            "pValue": self.p_value,
            "sequentialPValue": self.sequential_p_value,
            "lift": self.lift,
            "liftCi95": list(self.lift_ci95) if self.lift_ci95 else None,
            "winner": self.winner,
            "decidedAt": format_time(self.decided_at),
            "mixingVariance": self.mixing_variance,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AbStatus:
        return cls(
            variants=tuple(VariantStats.from_dict(v) for v in d.get("variants") or []),
            p_value=_opt_float(d.get("pValue")),
            sequential_p_value=_opt_float(d.get("sequentialPValue")),
            lift=_opt_float(d.get("lift")),
            lift_ci95=_pair(d.get("liftCi95")),
            winner=d.get("winner") or None,
            decided_at=parse_time(d.get("decidedAt")),
            mixing_variance=_opt_float(d.get("mixingVariance")),
        )


@dataclass(frozen=True)
class ControlRecord:
    """`status.canary.control`: the spec's `rollout.control.action`, the revision it was given for, and whether
    a rollout already acted on it. An action left in the spec then applies once, and never to a later revision."""

    action: ManualAction
    revision: str | None
    handled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action.value, "revision": self.revision, "handled": self.handled}

    @classmethod
    def from_dict(cls, d: object) -> ControlRecord | None:
        if not isinstance(d, Mapping):
            return None
        try:
            action = ManualAction(str(d.get("action") or ""))
        except ValueError:
            return None
        if action is ManualAction.NONE:
            return None
        return cls(action, d.get("revision") or None, bool(d.get("handled", False)))


@dataclass(frozen=True)
class RolloutState:
    """Everything the state machine needs to resume after an operator restart."""

    phase: Phase = Phase.IDLE
    stable_revision: str | None = None
    revision: str | None = None  # candidate revision (kept after rollback so it is not retried)
    weight: int = 0  # percent of traffic currently sent to the candidate
    step: int = 0
    step_started_at: datetime | None = None
    started_at: datetime | None = None
    # When traffic was first split to the candidate in this rollout: A/B counts run from here (the sequential
    # test needs counts since the experiment began, not a sliding window).
    split_started_at: datetime | None = None
    paused: bool = False
    failed_checks: int = 0
    last_analysis: Mapping[str, Any] | None = None
    # The last ANALYSIS_HISTORY looks of this rollout, newest first (what `kubectl recserve get` shows).
    analyses: tuple[Mapping[str, Any], ...] = ()
    # When a look was last conclusive (machine._note_evidence): the progressDeadline clock runs from this or the
    # step's start, whichever is later.
    last_conclusive_at: datetime | None = None
    ab: AbStatus | None = None
    message: str = ""
    # CamelCase condition reason: why the rollout ended (RolledBack, Aborted, ProgressDeadlineExceeded), or
    # ProgressDeadlineExceeded while a step is held past its deadline.
    reason: str = ""
    control: ControlRecord | None = None
    # Capacity (rollout.capacity), kept across reconciles: the candidate weight the router pods are known to serve
    # (the builtin router's pods all run the plan; an applied HTTPRoute), and the stable's scale N when the rollout
    # started (spec.serving.replicas, or what the autoscaler ran then).
    served_weight: int = 0
    base_replicas: int = 0
    # The stable a promotion replaces, until the promoted revision carries all traffic at N Ready replicas: it
    # keeps its share of the split (strategies._finishing_promotion).
    retiring_revision: str | None = None
    # The shadow phase (spec.rollout.shadow): the candidate gets mirrored requests only, before its first step.
    shadowing: bool = False
    # The shadow analysis' last look (measured values, verdict), kept after the phase ends.
    shadow: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # unknown status.canary keys, preserved verbatim

    @property
    def active(self) -> bool:
        return self.phase is Phase.PROGRESSING

    def evolve(self, **changes: Any) -> RolloutState:
        return replace(self, **changes)

    def with_analysis(self, record: Mapping[str, Any]) -> RolloutState:
        """Record one look: the last analysis, and the bounded history of looks."""
        return replace(self, last_analysis=record, analyses=(record, *self.analyses)[:ANALYSIS_HISTORY])

    def ab_elapsed_s(self, now: datetime) -> float | None:
        """Seconds of A/B evidence at `now`: since the split first went live; None before it did."""
        if self.split_started_at is None:
            return None
        return max(0.0, (now - self.split_started_at).total_seconds())

    def to_status(self) -> dict[str, Any]:
        """The `status.canary` (and `status.abTest` when an A/B test ran) patch."""
        canary: dict[str, Any] = dict(self.extra)
        canary.update(
            {
                "phase": self.phase.value,
                "stableRevision": self.stable_revision,
                "revision": self.revision,
                "weight": self.weight,
                "step": self.step,
                "stepStartedAt": format_time(self.step_started_at),
                "startedAt": format_time(self.started_at),
                "splitStartedAt": format_time(self.split_started_at),
                "paused": self.paused,
                "failedChecks": self.failed_checks,
                "lastAnalysis": dict(self.last_analysis) if self.last_analysis is not None else None,
                "analyses": [dict(a) for a in self.analyses],
                "lastConclusiveAt": format_time(self.last_conclusive_at),
                "message": self.message,
                "reason": self.reason or None,
                "control": self.control.to_dict() if self.control is not None else None,
                "servedWeight": self.served_weight,
                "baseReplicas": self.base_replicas,
                "retiringRevision": self.retiring_revision,
                "shadowing": self.shadowing,
                "shadow": dict(self.shadow) if self.shadow is not None else None,
            }
        )
        status: dict[str, Any] = {"canary": canary}
        if self.ab is not None:
            status["abTest"] = self.ab.to_dict()
        return status

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> RolloutState:
        status = status or {}
        c: Mapping[str, Any] = status.get("canary") or {}
        known = {
            "phase", "stableRevision", "revision", "weight", "step", "stepStartedAt", "startedAt",
            "paused", "failedChecks", "lastAnalysis", "message", "splitStartedAt", "control", "lastConclusiveAt",
            "reason", "servedWeight", "baseReplicas", "retiringRevision", "analyses", "shadowing", "shadow",
        }  # fmt: skip
        try:
            phase = Phase(c.get("phase") or Phase.IDLE.value)
        except ValueError:
            phase = Phase.IDLE
        ab_raw = status.get("abTest")
        return cls(
            phase=phase,
            stable_revision=c.get("stableRevision") or None,
            revision=c.get("revision") or None,
            weight=int(c.get("weight") or 0),
            step=int(c.get("step") or 0),
            step_started_at=parse_time(c.get("stepStartedAt")),
            started_at=parse_time(c.get("startedAt")),
            split_started_at=parse_time(c.get("splitStartedAt")),
            paused=bool(c.get("paused", False)),
            failed_checks=int(c.get("failedChecks") or 0),
            last_analysis=c.get("lastAnalysis"),
            analyses=tuple(a for a in c.get("analyses") or [] if isinstance(a, Mapping))[:ANALYSIS_HISTORY],
            last_conclusive_at=parse_time(c.get("lastConclusiveAt")) or _conclusive_time(c.get("lastAnalysis")),
            ab=AbStatus.from_dict(ab_raw) if isinstance(ab_raw, Mapping) else None,
            message=str(c.get("message") or ""),
            reason=str(c.get("reason") or ""),
            control=ControlRecord.from_dict(c.get("control")),
            served_weight=int(c.get("servedWeight") or 0),
            base_replicas=int(c.get("baseReplicas") or 0),
            retiring_revision=c.get("retiringRevision") or None,
            shadowing=bool(c.get("shadowing", False)),
            shadow=c.get("shadow") if isinstance(c.get("shadow"), Mapping) else None,
            extra={k: v for k, v in c.items() if k not in known},
        )
