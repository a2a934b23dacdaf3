"""Leader election over a coordination.k8s.io/v1 Lease: one replica reconciles, the others stand by warm.

The decision is a pure function (`decide`: what this replica saw of the lease, when it saw it, the time now and
its identity → create, acquire, renew, hold or stand by, and whether it may write). `LeaderElector` is the thin
async loop around it that reads and writes the Lease and tells the operator when it starts or stops leading.

Timing (client-go's rules): a standby takes an expired lease only `lease_duration` after it *itself* saw the
holder's last renewal (its own monotonic clock, so clock skew between nodes does not matter); the leader stops
writing once its last successful renewal is `renew_deadline` old, which is shorter than `lease_duration`: the old
leader has stopped before anyone may start. After a kill -9 the standby leads within lease_duration +
retry_period (15 + 2 s by default); after a graceful stop the leader releases the lease and the standby takes it
at its next look (retry_period).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

logger = logging.getLogger("recserve.leader")


@dataclass(frozen=True)
class Timing:
    lease_duration: float = 15.0  # how long a standby waits after the holder's last renewal it saw
    renew_deadline: float = 10.0  # the leader stops writing when its last renewal is this old
    retry_period: float = 2.0  # how often a standby looks, and a failed renewal is retried
    renew_interval: float = 5.0  # how often the leader renews (writes) the lease

    def __post_init__(self) -> None:
        if not 0 < self.retry_period <= self.renew_interval < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election timing needs 0 < retry_period <= renew_interval < renew_deadline < lease_duration, "
                f"got {self}"
            )


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease's spec as this replica read it; `version` is the object's resourceVersion (optimistic writes)."""

    holder: str = ""  # "" when released
    duration_s: float = 0.0
    renew_time: str = ""
    acquire_time: str = ""
    transitions: int = 0
    version: str = ""

    @classmethod
    def of(cls, lease: Mapping[str, Any] | None) -> LeaseRecord | None:
        if lease is None:
            return None
        spec = lease.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_s=float(spec.get("leaseDurationSeconds") or 0),
            renew_time=str(spec.get("renewTime") or ""),
            acquire_time=str(spec.get("acquireTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
            version=str((lease.get("metadata") or {}).get("resourceVersion") or ""),
        )

    def same_term(self, other: LeaseRecord | None) -> bool:
        """Whether `other` shows no sign of life since this one (same holder, renewal and transitions)."""
        return other is not None and (self.holder, self.renew_time, self.transitions) == (
            other.holder,
            other.renew_time,
            other.transitions,
        )


class Action(enum.Enum):
    CREATE = "create"  # no Lease yet: create it, holding it
    ACQUIRE = "acquire"  # released or expired: take it over
    RENEW = "renew"  # ours and due for renewal
    HOLD = "hold"  # ours, renewed recently: nothing to write
    STANDBY = "standby"  # someone else holds a live lease


@dataclass(frozen=True)
class Decision:
    action: Action
    leading: bool  # whether this replica may reconcile and write right now
    wait: float  # seconds until the next look
    reason: str


def observed_at(
    previous: LeaseRecord | None, previous_at: float | None, current: LeaseRecord | None, now: float
) -> float:
    """When this replica first saw the lease as it is now: unchanged records keep their time, any sign of life
    (a renewal, a new holder, a release) restarts the clock."""
    if previous is not None and previous_at is not None and current is not None and previous.same_term(current):
        return previous_at
    return now


def decide(
    record: LeaseRecord | None, *, seen_at: float, now: float, identity: str, timing: Timing,
    renewed_at: float | None,
) -> Decision:  # fmt: skip
    """What to do with the lease. `seen_at`: when this replica first saw `record` as it is (observed_at);
    `renewed_at`: when this replica's last successful create/acquire/renew started (None: never)."""
    ours = record is not None and record.holder == identity
    leading = ours and renewed_at is not None and now - renewed_at < timing.renew_deadline
    if record is None:
        return Decision(Action.CREATE, False, timing.retry_period, "no lease yet")
    if ours:
        if renewed_at is None:
            return Decision(Action.RENEW, False, timing.retry_period, "the lease names this replica: renewing")
        since = now - renewed_at
        if since >= timing.renew_interval:
            reason = "renewal due" if leading else "renewal overdue: not writing until it succeeds"
            return Decision(Action.RENEW, leading, timing.retry_period, reason)
        return Decision(Action.HOLD, leading, timing.renew_interval - since, "leading")
    if not record.holder:
        return Decision(Action.ACQUIRE, False, timing.retry_period, "the lease was released")
    duration = record.duration_s or timing.lease_duration
    left = seen_at + duration - now
    if left <= 0:
        return Decision(Action.ACQUIRE, False, timing.retry_period,
                        f"{record.holder} did not renew for {duration:g}s")  # fmt: skip
    return Decision(Action.STANDBY, False, min(timing.retry_period, left), f"{record.holder} leads")


def micro_time(wall: float) -> str:
    """A Lease MicroTime (RFC 3339 with microseconds)."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_body(
    namespace: str, name: str, identity: str, *, action: Action, record: LeaseRecord | None, timing: Timing,
    wall: float,
) -> dict[str, Any]:  # fmt: skip
    """The Lease to write for `action` (create, acquire, renew) or a release (holder "")."""
    now = micro_time(wall)
    taking = action in (Action.CREATE, Action.ACQUIRE)
    spec: dict[str, Any] = {
        "holderIdentity": identity,
        "leaseDurationSeconds": int(timing.lease_duration),
        "renewTime": now,
        "acquireTime": now if taking or record is None else (record.acquire_time or now),
        "leaseTransitions": (record.transitions if record else 0) + (1 if action is Action.ACQUIRE else 0),
    }
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if record is not None and record.version:
        meta["resourceVersion"] = record.version  # optimistic concurrency: two candidates, one wins (409)
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


def release_body(namespace: str, name: str, record: LeaseRecord, timing: Timing, wall: float) -> dict[str, Any]:
    body = lease_body(namespace, name, "", action=Action.RENEW, record=record, timing=timing, wall=wall)
    body["spec"]["leaseDurationSeconds"] = 1
    return body


class LeaseApi(Protocol):
    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create_lease(self, body: dict[str, Any]) -> dict[str, Any] | None: ...

    def replace_lease(self, body: dict[str, Any]) -> dict[str, Any] | None: ...


class LeaderElector:
    """The loop: look at the lease, decide, write when the decision says so, report leadership changes."""

    def __init__(
        self, api: LeaseApi, namespace: str, name: str, identity: str, *, timing: Timing | None = None,
        on_started: Callable[[], None], on_stopped: Callable[[], None], clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.timing = timing or Timing()
        self.on_started, self.on_stopped = on_started, on_stopped
        self.clock = clock
        self.record: LeaseRecord | None = None
        self.seen_at: float | None = None
        self.renewed_at: float | None = None
        self._leading = False
        self._stopping = False

    def is_leading(self) -> bool:
        """Computed at the moment of asking (the write fence): held by us and renewed within the deadline."""
        if self._stopping or self.record is None or self.record.holder != self.identity or self.renewed_at is None:
            return False
        return self.clock() - self.renewed_at < self.timing.renew_deadline

    def step(self) -> Decision:
        """One look: read, decide, write if needed (blocking calls; the loop runs it in a thread)."""
        try:
            record = LeaseRecord.of(self.api.get_lease(self.namespace, self.name))
        except Exception as exc:  # the API is away: decide on what we last saw (the deadline still runs)
            logger.warning("Cannot read the lease %s/%s: %s", self.namespace, self.name, exc)
            record = self.record
        now = self.clock()
        self.seen_at = observed_at(self.record, self.seen_at, record, now)
        self.record = record
        decision = decide(record, seen_at=self.seen_at, now=now, identity=self.identity, timing=self.timing,
                          renewed_at=self.renewed_at)  # fmt: skip
        if decision.action in (Action.CREATE, Action.ACQUIRE, Action.RENEW):
            started = self.clock()
            body = lease_body(self.namespace, self.name, self.identity, action=decision.action, record=record,
                              timing=self.timing, wall=time.time())  # fmt: skip
            try:
                written = self.api.create_lease(body) if record is None else self.api.replace_lease(body)
            except Exception as exc:
                logger.warning("Lease %s failed %s/%s: %s", decision.action.value, self.namespace, self.name, exc)
                written = None
            if written is not None:
                self.record = LeaseRecord.of(written)
                self.seen_at = self.clock()
                self.renewed_at = started
                if decision.action is not Action.RENEW:
                    logger.info("Acquired the lease %s/%s identity=%s (%s)", self.namespace, self.name,
                                self.identity, decision.reason)  # fmt: skip
        return decision

    def _report(self) -> None:
        leading = self.is_leading()
        if leading and not self._leading:
            self._leading = True
            logger.info("Leading as %s: reconciling", self.identity)
            self.on_started()
        elif not leading and self._leading:
            self._leading = False
            logger.warning("Stopped leading as %s: standing by", self.identity)
            self.on_stopped()

    async def run(self) -> None:
        logger.info("Leader election on lease %s/%s identity=%s", self.namespace, self.name, self.identity)
        while not self._stopping:
            decision = await asyncio.to_thread(self.step)
            self._report()
            wait = decision.wait
            if self._leading and self.renewed_at is not None:
                # Wake in time to stop at the renewal deadline even if the API hangs.
                wait = min(wait, max(0.05, self.renewed_at + self.timing.renew_deadline - self.clock()))
            await asyncio.sleep(wait)
            self._report()

    async def release(self, drain: Callable[[], object] | None = None) -> None:
        """Graceful stop: stop leading, let in-flight work finish (`drain`, in a thread), then hand the lease back
        so a standby takes over at its next look."""
        was_leading = self.is_leading()
        self._stopping = True
        self._report()
        if not was_leading or self.record is None:
            return
        if drain is not None:
            await asyncio.to_thread(drain)
        body = release_body(self.namespace, self.name, self.record, self.timing, time.time())
        try:
            await asyncio.to_thread(self.api.replace_lease, body)
            logger.info("Released the lease %s/%s", self.namespace, self.name)
        except Exception as exc:
            logger.warning("Could not release the lease %s/%s: %s", self.namespace, self.name, exc)
