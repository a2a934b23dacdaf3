"""The Events a status write announces: one Warning per bad condition, at most one Normal event per write."""

from __future__ import annotations

from typing import Any

from recserve_operator.reconcile import transition_events


def cond(type_: str, status: str, reason: str, message: str = "m") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


DEPLOYING = [
    cond("Ready", "False", "Deploying", "0/1 ready"),
    cond("ModelRepositoryReady", "Unknown", "Pending"),
    cond("Progressing", "True", "Deploying", "revision abc"),
    cond("Degraded", "False", "AsExpected"),
]
READY = [
    cond("Ready", "True", "Available", "1/1 ready"),
    cond("ModelRepositoryReady", "True", "Built", "repository loaded"),
    cond("Progressing", "False", "RolloutComplete", "revision abc serves"),
    cond("Degraded", "False", "AsExpected"),
]


def test_a_new_model_announces_its_rollout_start_once() -> None:
    assert transition_events([], DEPLOYING) == [("Normal", "Deploying", "Progressing=True: revision abc")]


def test_coming_up_is_one_event_led_by_ready_not_one_per_condition() -> None:
    events = transition_events(DEPLOYING, READY)
    assert events == [(
        "Normal", "Available",
        "Ready=True: 1/1 ready; ModelRepositoryReady=True: repository loaded; Progressing=False: revision abc serves",
    )]  # fmt: skip


def test_an_unchanged_status_and_reason_only_changes_of_healthy_states_post_nothing() -> None:
    assert transition_events(READY, READY) == []
    waiting = [cond("Ready", "False", "Pending", "scheduling"), *DEPLOYING[1:]]
    assert transition_events(DEPLOYING, waiting) == []


def test_each_bad_condition_is_its_own_warning_and_healthy_transitions_still_get_one_event() -> None:
    bad = [
        cond("Ready", "False", "InsufficientGPU", "needs 4 GPUs"),
        cond("ModelRepositoryReady", "False", "BuildFailed", "parity 0.3"),
        cond("Progressing", "False", "RolledBack", "error rate"),
        cond("Degraded", "True", "ContainerFailing", "CrashLoopBackOff"),
        cond("MetricsAvailable", "False", "MetricsUnavailable", "connection refused"),
    ]
    events = transition_events(READY, bad)
    warnings = [e for e in events if e[0] == "Warning"]
    assert [e[1] for e in warnings] == ["InsufficientGPU", "BuildFailed", "ContainerFailing", "MetricsUnavailable"]
    assert warnings[0][2] == "Ready=False: needs 4 GPUs"
    # Progressing went True -> False earlier (READY): a reason change at the same status is not announced.
    assert [e for e in events if e[0] == "Normal"] == []


def test_recovery_from_a_bad_state_is_announced() -> None:
    failing = [cond("Ready", "False", "Unschedulable", "no node"), *READY[1:]]
    assert transition_events(failing, READY) == [("Normal", "Available", "Ready=True: 1/1 ready")]
    assert transition_events(READY, failing) == [("Warning", "Unschedulable", "Ready=False: no node")]
