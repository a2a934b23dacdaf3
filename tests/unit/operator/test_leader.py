"""Leader election: the pure decision over a Lease, and the elector loop against an in-memory Lease API."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from recserve_operator.leader import (
    Action,
    LeaderElector,
    LeaseRecord,
    Timing,
    decide,
    lease_body,
    observed_at,
)

T = Timing(lease_duration=15, renew_deadline=10, retry_period=2, renew_interval=5)


def _rec(holder: str, renew: str = "t1", transitions: int = 0) -> LeaseRecord:
    return LeaseRecord(holder=holder, duration_s=15, renew_time=renew, transitions=transitions, version="1")


def test_no_lease_creates_one() -> None:
    d = decide(None, seen_at=0, now=0, identity="a", timing=T, renewed_at=None)
    assert d.action is Action.CREATE and not d.leading


def test_a_live_lease_of_another_keeps_this_replica_standing_by() -> None:
    d = decide(_rec("b"), seen_at=100, now=114.9, identity="a", timing=T, renewed_at=None)
    assert d.action is Action.STANDBY and not d.leading
    assert 0 < d.wait <= T.retry_period


def test_an_expired_lease_is_taken_measured_on_this_replicas_clock() -> None:
    # The holder's renewTime is never compared with our clock: only how long we saw no change.
    d = decide(_rec("b", renew="2000-01-01T00:00:00.000000Z"), seen_at=100, now=115, identity="a", timing=T,
               renewed_at=None)  # fmt: skip
    assert d.action is Action.ACQUIRE and not d.leading


def test_a_released_lease_is_taken_at_once() -> None:
    d = decide(_rec(""), seen_at=100, now=100, identity="a", timing=T, renewed_at=None)
    assert d.action is Action.ACQUIRE


def test_the_holder_leads_holds_then_renews_when_due() -> None:
    held = decide(_rec("a"), seen_at=100, now=101, identity="a", timing=T, renewed_at=100)
    assert held.action is Action.HOLD and held.leading and held.wait == pytest.approx(4)
    due = decide(_rec("a"), seen_at=100, now=105, identity="a", timing=T, renewed_at=100)
    assert due.action is Action.RENEW and due.leading


def test_the_leader_stops_writing_at_the_renew_deadline_before_anyone_may_take_over() -> None:
    late = decide(_rec("a"), seen_at=100, now=110, identity="a", timing=T, renewed_at=100)
    assert late.action is Action.RENEW and not late.leading
    # A standby that saw that same renewal may take the lease only lease_duration after it: later than the deadline.
    other = decide(_rec("a"), seen_at=100, now=110, identity="b", timing=T, renewed_at=None)
    assert other.action is Action.STANDBY


@pytest.mark.parametrize("now", [100.0, 104.0, 109.9, 114.9, 115.0, 130.0])
def test_two_replicas_never_both_lead_on_the_same_record(now: float) -> None:
    record = _rec("a")
    a = decide(record, seen_at=100, now=now, identity="a", timing=T, renewed_at=100)
    b = decide(record, seen_at=100, now=now, identity="b", timing=T, renewed_at=None)
    assert not (a.leading and b.leading)
    assert not (a.leading and b.action is Action.ACQUIRE), "b may only take over once a has stopped writing"


def test_a_lease_naming_this_replica_after_a_restart_is_renewed_before_leading() -> None:
    d = decide(_rec("a"), seen_at=100, now=100, identity="a", timing=T, renewed_at=None)
    assert d.action is Action.RENEW and not d.leading


def test_any_sign_of_life_restarts_the_observation_clock() -> None:
    first = _rec("b", renew="t1")
    assert observed_at(None, None, first, 5) == 5
    assert observed_at(first, 5, _rec("b", renew="t1"), 9) == 5
    assert observed_at(first, 5, _rec("b", renew="t2"), 9) == 9
    assert observed_at(first, 5, _rec("c", renew="t1"), 9) == 9


def test_timing_must_leave_the_leader_time_to_stop_before_a_takeover() -> None:
    with pytest.raises(ValueError, match="renew_deadline < lease_duration"):
        Timing(lease_duration=10, renew_deadline=10)


def test_an_acquisition_counts_a_transition_and_carries_the_read_version() -> None:
    body = lease_body("ns", "l", "a", action=Action.ACQUIRE, record=_rec("b", transitions=3), timing=T, wall=0)
    assert body["spec"]["holderIdentity"] == "a" and body["spec"]["leaseTransitions"] == 4
    assert body["metadata"]["resourceVersion"] == "1"
    assert body["spec"]["leaseDurationSeconds"] == 15


class FakeLeases:
    """A Lease API with the server's optimistic concurrency: a write with a stale resourceVersion gets 409."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.writes = 0

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.lease)

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.writes += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)

    def create_lease(self, body: dict[str, Any]) -> dict[str, Any] | None:
        return None if self.lease is not None else self._store(body)

    def replace_lease(self, body: dict[str, Any]) -> dict[str, Any] | None:
        if self.lease is None or body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            return None
        return self._store(body)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _elector(api: FakeLeases, identity: str, clock: Clock, log: list[str]) -> LeaderElector:
    return LeaderElector(
        api, "ns", "lease", identity, timing=T, clock=clock,
        on_started=lambda: log.append(f"{identity}+"), on_stopped=lambda: log.append(f"{identity}-"),
    )  # fmt: skip


def test_the_second_replica_stands_by_and_takes_over_after_the_leader_stops_renewing() -> None:
    api, clock, log = FakeLeases(), Clock(), []
    a, b = _elector(api, "a", clock, log), _elector(api, "b", clock, log)
    a.step()
    a._report()
    b.step()
    b._report()
    assert a.is_leading() and not b.is_leading() and log == ["a+"]
    # a dies (no more steps); b keeps looking every retry period.
    takeover = None
    for i in range(1, 20):
        clock.now += T.retry_period
        b.step()
        b._report()
        assert not (a.is_leading() and b.is_leading()), "never two leaders"
        if b.is_leading():
            takeover = i * T.retry_period
            break
    assert takeover is not None and T.lease_duration <= takeover <= T.lease_duration + T.retry_period
    assert log == ["a+", "b+"]  # a, dead, reports nothing more
    assert not a.is_leading(), "a's own fence closed at its renew deadline"


def test_a_graceful_release_lets_the_standby_take_over_at_its_next_look() -> None:
    import asyncio

    api, clock, log = FakeLeases(), Clock(), []
    a, b = _elector(api, "a", clock, log), _elector(api, "b", clock, log)
    a.step()
    a._report()
    b.step()
    asyncio.run(a.release())
    assert not a.is_leading() and api.lease is not None and api.lease["spec"]["holderIdentity"] == ""
    clock.now += T.retry_period
    b.step()
    b._report()
    assert b.is_leading() and log == ["a+", "a-", "b+"]


def test_a_lost_race_for_the_lease_is_not_leadership() -> None:
    api, clock, log = FakeLeases(), Clock(), []
    a, b = _elector(api, "a", clock, log), _elector(api, "b", clock, log)
    b.step()  # b reads "no lease" ... then a creates it first
    api.lease = None
    a.step()
    b.record = None
    b.step()  # b's create gets 409
    assert a.is_leading() and not b.is_leading()
