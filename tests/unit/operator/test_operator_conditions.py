"""Condition bookkeeping, phase derivation, and what pods and Deployments tell about a revision."""

from __future__ import annotations

import json

import pytest
from recserve_operator import conditions as c
from recserve_operator.lifecycle import decide_immediate
from recserve_operator.observe import RevisionObservation, observe_revision

T0, T1 = "2026-11-29T10:00:00Z", "2026-11-29T10:05:00Z"


def test_set_condition_adds_a_new_condition_with_the_current_time() -> None:
    conds = c.set_condition([], c.Condition("Ready", "False", "Deploying", "starting"), T0, 1)
    assert conds == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "Deploying",
            "message": "starting",
            "lastTransitionTime": T0,
            "observedGeneration": 1,
        }
    ]


def test_set_condition_keeps_the_transition_time_when_only_reason_or_message_change() -> None:
    conds = c.set_condition([], c.Condition("Ready", "False", "Deploying", "starting"), T0, 1)
    conds = c.set_condition(conds, c.Condition("Ready", "False", "InsufficientGPU", "no GPUs"), T1, 2)
    assert conds[0]["lastTransitionTime"] == T0
    assert (conds[0]["reason"], conds[0]["observedGeneration"]) == ("InsufficientGPU", 2)


def test_set_condition_moves_the_transition_time_when_the_status_flips() -> None:
    conds = c.set_condition([], c.Condition("Ready", "False", "Deploying", "starting"), T0, 1)
    conds = c.set_condition(conds, c.Condition("Ready", "True", "Available", "1/1"), T1, 1)
    assert conds[0]["lastTransitionTime"] == T1


def test_set_condition_leaves_other_conditions_untouched() -> None:
    conds = c.set_condition([], c.Condition("Degraded", "False", "AsExpected", ""), T0, 1)
    conds = c.set_condition(conds, c.Condition("Ready", "True", "Available", ""), T1, 1)
    assert [x["type"] for x in conds] == ["Degraded", "Ready"]
    assert conds[0]["lastTransitionTime"] == T0


def _conds(**statuses: tuple[str, str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for type_, (status, reason) in statuses.items():
        out = c.set_condition(out, c.Condition(type_, status, reason, ""), T0, 1)
    return out


@pytest.mark.parametrize(
    ("conds", "phase"),
    [
        ({}, "Pending"),
        (
            {
                "Ready": ("True", "Available"),
                "Progressing": ("False", "RolloutComplete"),
                "Degraded": ("False", "AsExpected"),
            },
            "Ready",
        ),
        ({"Ready": ("True", "Available"), "Progressing": ("True", "RollingOut")}, "Progressing"),
        ({"Ready": ("True", "Available"), "Degraded": ("True", "BuildFailed")}, "Degraded"),
        ({"Ready": ("False", "InvalidSpec"), "Degraded": ("True", "InvalidSpec")}, "Failed"),
        ({"Ready": ("False", "BuildFailed"), "ModelRepositoryReady": ("False", "BuildFailed")}, "Failed"),
        ({"Ready": ("False", "InsufficientGPU"), "Degraded": ("True", "InsufficientGPU")}, "Pending"),
        ({"Ready": ("False", "Deploying"), "ModelRepositoryReady": ("False", "Building")}, "Building"),
        ({"Ready": ("False", "Deploying"), "ModelRepositoryReady": ("True", "Built")}, "Deploying"),
    ],
    ids=[
        "nothing-yet",
        "ready",
        "rolling-out",
        "serving-but-new-build-failed",
        "invalid-spec",
        "first-build-failed",
        "no-gpu-capacity",
        "building",
        "deploying",
    ],
)
def test_phase_is_derived_from_conditions(conds: dict[str, tuple[str, str]], phase: str) -> None:
    assert c.derive_phase(_conds(**conds)) == phase


def _deployment(replicas: int = 2, ready: int = 2, generation: int = 1, observed: int = 1) -> dict:
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": observed, "readyReplicas": ready, "updatedReplicas": ready},
    }


def test_a_deployment_with_all_replicas_ready_and_observed_is_available() -> None:
    obs = observe_revision("r1", _deployment(), [])
    assert obs.available and obs.built and obs.ready_replicas == 2


def test_a_deployment_the_controller_has_not_observed_yet_is_not_available() -> None:
    assert not observe_revision("r1", _deployment(generation=2, observed=1), []).available


def test_pods_unschedulable_for_gpus_report_insufficient_gpu() -> None:
    pod = {
        "metadata": {},
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 2 Insufficient nvidia.com/gpu, 1 node(s) had a taint",
                }
            ]
        },
    }
    obs = observe_revision("r1", _deployment(ready=0), [pod])
    assert obs.insufficient_gpu
    assert "Insufficient nvidia.com/gpu" in (obs.unschedulable or "")


def test_a_failed_init_container_reports_the_builders_json_error() -> None:
    report = json.dumps({"status": "failed", "error": "parity check failed: max abs error 0.3 > 0.0001"})
    pod = {
        "metadata": {},
        "status": {
            "initContainerStatuses": [
                {
                    "name": "model-repo-builder",
                    "state": {"terminated": {"exitCode": 4, "message": "converting...\n" + report}},
                }
            ]
        },
    }
    obs = observe_revision("r1", _deployment(ready=0), [pod])
    assert obs.build_failed == "model-repo-builder exited with code 4: parity check failed: max abs error 0.3 > 0.0001"


def test_a_restarting_builder_reports_its_last_failure() -> None:
    pod = {
        "metadata": {},
        "status": {
            "initContainerStatuses": [
                {
                    "name": "model-repo-builder",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 3, "message": "sha256 mismatch"}},
                }
            ]
        },
    }
    assert observe_revision("r1", _deployment(ready=0), [pod]).build_failed == (
        "model-repo-builder exited with code 3: sha256 mismatch"
    )


def test_a_running_builder_means_building() -> None:
    pod = {
        "metadata": {},
        "status": {"initContainerStatuses": [{"name": "model-repo-builder", "state": {"running": {}}}]},
    }
    obs = observe_revision("r1", _deployment(ready=0), [pod])
    assert obs.building and not obs.built


def test_immediate_first_revision_goes_straight_to_stable() -> None:
    d = decide_immediate(None, "new", {})
    assert (d.stable, d.keep) == ("new", frozenset({"new"}))


def test_immediate_keeps_the_old_revision_serving_until_the_new_one_is_available() -> None:
    obs = {
        "old": RevisionObservation("old", exists=True, available=True, ready_replicas=1),
        "new": RevisionObservation("new", exists=True, ready_replicas=0),
    }
    d = decide_immediate("old", "new", obs)
    assert (d.stable, d.keep, d.promoted) == ("old", frozenset({"old", "new"}), None)


def test_immediate_promotes_an_available_new_revision_and_drops_the_old() -> None:
    obs = {
        "old": RevisionObservation("old", exists=True, available=True),
        "new": RevisionObservation("new", exists=True, available=True),
    }
    d = decide_immediate("old", "new", obs)
    assert (d.stable, d.keep, d.promoted) == ("new", frozenset({"new"}), "new")


def test_immediate_promotes_at_once_when_the_old_revision_is_gone() -> None:
    d = decide_immediate("old", "new", {"new": RevisionObservation("new", exists=True)})
    assert d.stable == "new"
