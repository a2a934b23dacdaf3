"""The work queue: deduplication, one worker per key, re-queue after processing, delays, backoff, the pool."""

from __future__ import annotations

import threading

from recserve_operator.workqueue import Workers, WorkQueue

from tests.helpers import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _take(q: WorkQueue[str]) -> str | None:
    item = q.get(timeout=0)
    return item[0] if item else None


def test_a_key_queued_twice_is_taken_once() -> None:
    q: WorkQueue[str] = WorkQueue()
    assert q.add("a") is True
    assert q.add("a") is False
    q.add("b")
    assert [_take(q), _take(q), _take(q)] == ["a", "b", None]


def test_a_key_added_while_processing_is_not_handed_out_again_until_done_then_exactly_once() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    assert _take(q) == "a"
    q.add("a")
    q.add("a")
    assert _take(q) is None, "a key being processed must not go to a second worker"
    q.done("a")
    assert _take(q) == "a"
    q.done("a")
    assert _take(q) is None


def test_urgent_keys_go_first_in_their_own_order_and_an_urgent_add_moves_a_waiting_key_ahead() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("resync-1")
    q.add("new-1", urgent=True)
    q.add("resync-2")
    q.add("new-2", urgent=True)
    q.add("resync-2", urgent=True)  # its model changed meanwhile
    assert [_take(q) for _ in range(5)] == ["new-1", "new-2", "resync-2", "resync-1", None]


def test_an_urgent_add_during_processing_requeues_it_urgently() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    assert _take(q) == "a"
    q.add("b")
    q.add("a", urgent=True)
    q.done("a")
    assert [_take(q), _take(q)] == ["a", "b"]


def test_done_without_a_new_add_does_not_requeue() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    _take(q)
    q.done("a")
    assert _take(q) is None and len(q) == 0


def test_add_after_waits_for_its_time_and_the_earliest_schedule_wins() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("a", 10)
    q.add_after("a", 30)  # later: ignored
    q.add_after("b", 5)
    assert _take(q) is None
    clock.now += 5
    assert _take(q) == "b"
    clock.now += 5
    assert _take(q) == "a"
    clock.now += 30
    assert _take(q) is None, "the superseded later schedule must not fire again"
    assert q.scheduled() == 0


def test_a_scheduled_key_already_waiting_is_not_queued_twice() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add("a")
    q.add_after("a", 1)
    clock.now += 1
    assert [_take(q), _take(q)] == ["a", None]


def test_failures_back_off_exponentially_up_to_the_cap_and_forget_resets() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock, base_delay=1.0, max_delay=5.0)
    assert [q.add_rate_limited("a") for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    q.forget("a")
    assert q.add_rate_limited("a") == 1.0


def test_discard_drops_a_waiting_and_a_scheduled_key() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add("a")
    q.add_after("b", 1)
    q.discard("a")
    q.discard("b")
    clock.now += 2
    assert _take(q) is None


def test_the_wait_is_measured_from_the_first_add() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add("a")
    clock.now += 3
    q.add("a")
    item = q.get(timeout=0)
    assert item == ("a", 3.0)


def test_shutdown_wakes_a_blocked_get() -> None:
    q: WorkQueue[str] = WorkQueue()
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.shutdown()
    t.join(5)
    assert got == [None]


def test_workers_never_run_one_key_concurrently_and_see_the_last_add() -> None:
    q: WorkQueue[str] = WorkQueue()
    running: set[str] = set()
    overlaps: list[str] = []
    handled: list[str] = []
    release = threading.Event()
    lock = threading.Lock()

    def handle(key: str, waited: float) -> None:
        with lock:
            if key in running:
                overlaps.append(key)
            running.add(key)
        if key == "a" and handled.count("a") == 0:
            release.wait(5)  # hold the first reconcile of "a" while it is added again
        with lock:
            running.discard(key)
            handled.append(key)

    workers = Workers(q, handle, 4)
    workers.start()
    try:
        q.add("a")
        wait_for(lambda: "a" in running, 5)
        for _ in range(10):
            q.add("a")
        q.add("b")
        wait_for(lambda: "b" in handled, 5)
        release.set()
        wait_for(lambda: handled.count("a") == 2 and workers.wait_idle(0), 5)
    finally:
        workers.stop(5)
    assert overlaps == []
    assert handled.count("a") == 2, "ten adds during one reconcile are one more reconcile"


def test_a_closed_gate_holds_the_workers_and_keeps_the_keys() -> None:
    q: WorkQueue[str] = WorkQueue()
    gate = threading.Event()
    handled: list[str] = []
    workers = Workers(q, lambda key, waited: handled.append(key), 2, gate=gate)
    workers.start()
    try:
        q.add("a")
        assert len(q) == 1 and handled == [], "a standby takes nothing from the queue"
        gate.set()
        wait_for(lambda: handled == ["a"], 5)
    finally:
        workers.stop(5)
