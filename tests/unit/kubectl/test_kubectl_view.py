"""The plugin's pure views: status, pods, Deployments and events -> summary -> kubectl-style text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from recserve_operator.rollout.state import AbStatus, Phase, RolloutState, VariantStats

from recserve_kubectl.view import age, render_list, render_model, summarize

NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)
STABLE, CAND = "aaaa1111", "bbbb2222"


CANARY_ROLLOUT = {
    "strategy": "canary", "steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "5m"}],
    "analysis": {"interval": "30s", "maxErrorRate": 0.01, "minRequests": 100},
}  # fmt: skip


def _model(state: RolloutState, *, rollout: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "ctr", "namespace": "shop", "creationTimestamp": "2026-12-02T11:00:00Z"},
        "spec": {"rollout": rollout or CANARY_ROLLOUT},
        "status": {
            "phase": "Progressing",
            "stable": {"revision": STABLE, "modelVersion": "1", "readyReplicas": 3},
            "conditions": [{"type": "Ready", "status": "True", "reason": "Available", "message": "3/3 ready"}],
            **state.to_status(),
            **status,
        },
    }


def _pod(rev: str, ready: bool, *, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"p-{rev}-{ready}", "labels": {"recserve.dev/revision": rev}}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-02T11:59:00Z"
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": str(ready)}]}}


def _deployment(rev: str, version: str, replicas: int) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"recserve.dev/revision": rev}, "annotations": {"recserve.dev/model-version": version}},
        "spec": {"replicas": replicas},
    }


ANALYSIS = {
    "time": "2026-12-02T11:59:30Z", "verdict": "pass", "requests": 812.0, "errorRate": 0.002, "p99Ms": None,
    "checks": [{"name": "errorRate", "value": 0.002, "min": None, "max": 0.01, "passed": True}],
    "decision": "hold", "reason": "passed 1 checks over 812 requests",
}  # fmt: skip
CANARY = RolloutState(
    phase=Phase.PROGRESSING, stable_revision=STABLE, revision=CAND, weight=10, step=0,
    started_at=NOW - timedelta(minutes=3), analyses=(ANALYSIS,), last_analysis=ANALYSIS,
)  # fmt: skip


def test_a_canary_in_progress_shows_both_revisions_their_weights_pods_and_the_current_step() -> None:
    pods = [_pod(STABLE, True), _pod(STABLE, True), _pod(STABLE, False), _pod(CAND, True),
            _pod(CAND, True, deleting=True)]  # fmt: skip
    deps = [_deployment(STABLE, "1", 3), _deployment(CAND, "2", 1)]
    v = summarize(_model(CANARY), pods, deps)
    rows = {r["revision"]: r for r in v["revisions"]}
    assert rows[STABLE] == {"revision": STABLE, "role": "stable", "modelVersion": "1", "weight": 90,
                                 "replicas": 3, "podsReady": 2, "pods": 3}  # fmt: skip
    assert rows[CAND]["role"] == "candidate" and rows[CAND]["weight"] == 10
    assert (rows[CAND]["podsReady"], rows[CAND]["pods"]) == (1, 1)  # a terminating pod does not count
    assert [s["current"] for s in v["steps"]] == [True, False]
    expected = {"phase": "Progressing", "candidateRevision": CAND, "weight": 10, "step": 0, "steps": 2,
                "verdict": "pass"}  # fmt: skip
    assert {k: v["rollout"][k] for k in expected} == expected

    text = render_model(v, NOW)
    assert "-> 1. weight 10%, pause 1m (current)" in text
    assert "   2. weight 50%, pause 5m" in text
    assert "errorRate=0.002 (max 0.01: ok)" in text and "30s ago" in text
    assert "thresholds: interval 30s, maxErrorRate 0.01, minRequests 100" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(CAND))
    assert line.split()[:5] == [CAND, "candidate", "2", "10%", "1/1"]


def test_list_has_one_row_per_model_and_a_namespace_column_with_all_namespaces() -> None:
    done = RolloutState(phase=Phase.ROLLED_BACK, stable_revision=STABLE, revision=CAND, reason="RolledBack")
    views = [summarize(_model(CANARY)), summarize(_model(done))]
    text = render_list(views, all_namespaces=False, now=NOW).splitlines()
    assert text[0].split() == ["NAME", "PHASE", "ROLLOUT", "STABLE", "CANDIDATE", "WEIGHT", "STEP", "ANALYSIS", "AGE"]
    assert text[1].split() == ["ctr", "Progressing", "Progressing", STABLE, CAND, "10%", "1/2", "pass", "60m"]
    # A finished rollout has no candidate, weight or step; the verdict is its last look's (none here).
    assert text[2].split() == ["ctr", "Progressing", "RolledBack", STABLE, "-", "-", "-", "-", "60m"]
    wide = render_list(views, all_namespaces=True, now=NOW).splitlines()
    assert wide[0].split()[0] == "NAMESPACE" and wide[1].split()[0] == "shop"


def test_a_paused_canary_says_so_in_list_and_get() -> None:
    v = summarize(_model(CANARY.evolve(paused=True, weight=50, step=1)))
    assert "Progressing (paused)" in render_list([v], all_namespaces=False, now=NOW)
    assert "-> 2. weight 50%, pause 5m (paused)" in render_model(v, NOW)


def test_the_ab_table_shows_counts_ctr_intervals_p_values_and_the_verdict() -> None:
    ab = AbStatus(
        variants=(VariantStats("stable", STABLE, 20000, 1000, 0.05, (0.047, 0.053)),
                  VariantStats("canary", CAND, 20000, 1160, 0.058, (0.0548, 0.0613))),
        p_value=0.0004, sequential_p_value=0.03, lift=0.16, lift_ci95=(0.07, 0.25),
    )  # fmt: skip
    spec = {"strategy": "abTest", "analysis": {"abTest": {"clicks": "c", "impressions": "i"}}}
    v = summarize(_model(CANARY.evolve(ab=ab, weight=50, analyses=(), last_analysis=None), rollout=spec))
    assert v["rollout"]["verdict"] == "running p=0.03" and v["steps"] == []
    text = render_model(v, NOW)
    row = next(ln for ln in text.splitlines() if ln.strip().startswith("canary "))
    assert row.split() == ["canary", CAND, "20000", "1160", "0.0580", "[0.0548,", "0.0613]"]
    assert "p-value 0.0004 (sequential 0.03), lift +16.0% [+7.0%, +25.0%], verdict: running (no decision yet)" in text
    decided = summarize(_model(CANARY.evolve(ab=ab.__class__(**{**ab.__dict__, "winner": "canary"})), rollout=spec))
    assert decided["rollout"]["verdict"] == "winner canary"
    assert "verdict: canary wins" in render_model(decided, NOW)


def test_events_are_the_latest_ten_oldest_first() -> None:
    events = [{"lastTimestamp": f"2026-12-02T11:{m:02d}:00Z", "type": "Normal", "reason": f"R{m}", "message": "m"}
              for m in range(30, 45)]  # fmt: skip
    v = summarize(_model(CANARY), events=events)
    assert [e["reason"] for e in v["events"]] == [f"R{m}" for m in range(35, 45)]
    text = render_model(v, NOW)
    assert text.index("R35") < text.index("R44")


def test_a_model_the_operator_has_not_seen_yet_renders_without_status() -> None:
    obj = {"metadata": {"name": "new", "namespace": "shop"}, "spec": {}}
    v = summarize(obj)
    assert v["phase"] == "Pending" and v["ready"] == "Unknown" and v["revisions"] == []
    assert "Revisions:" in render_model(v, NOW)
    assert render_list([v], all_namespaces=False, now=NOW).splitlines()[1].split()[-1] == "<unknown>"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(5, "5s"), (119, "119s"), (130, "2m10s"), (300, "5m"), (1800, "30m"), (3 * 3600 + 60, "3h1m"),
     (9 * 3600, "9h"), (3 * 86400, "3d")],
)  # fmt: skip
def test_ages_read_like_kubectl(seconds: int, shown: str) -> None:
    assert age(NOW - timedelta(seconds=seconds), NOW) == shown


SHADOW_SPEC = {"percent": 50, "topK": 10, "minRequests": 200, "duration": "2m", "minTopKOverlap": 0.9,
               "maxP99LatencyMs": 50}  # fmt: skip
SHADOW_LOOK = {
    "time": "2026-12-02T11:59:30Z", "verdict": "inconclusive", "requests": 120.0, "errorRate": 0.0, "p99Ms": 7.5,
    "checks": [{"name": "topKOverlap", "value": 0.97, "min": 0.9, "max": None, "passed": True},
               {"name": "p99LatencyMs", "value": 7.5, "min": None, "max": 50, "passed": True}],
    "decision": "hold", "reason": "120 of 200 compared", "stage": "shadow",
    "measured": {"mirrored": 131, "compared": 120, "dropped": 2, "topKOverlap": 0.97, "p99Ms": 7.5},
}  # fmt: skip
SHADOWING = RolloutState(
    phase=Phase.PROGRESSING, stable_revision=STABLE, revision=CAND, weight=0, step=0, shadowing=True,
    started_at=NOW - timedelta(minutes=1), analyses=(SHADOW_LOOK,), last_analysis=SHADOW_LOOK, shadow=SHADOW_LOOK,
)  # fmt: skip


def test_the_shadow_phase_shows_mirroring_no_user_weight_no_current_step_and_its_last_look() -> None:
    rollout = {**CANARY_ROLLOUT, "shadow": SHADOW_SPEC}
    deps = [_deployment(STABLE, "1", 3), _deployment(CAND, "2", 1)]
    v = summarize(_model(SHADOWING, rollout=rollout), [_pod(STABLE, True), _pod(CAND, True)], deps)
    expected = {"phase": "Progressing", "candidateRevision": CAND, "weight": 0, "step": None, "shadowing": True,
                "mirrorPercent": 50, "verdict": "inconclusive"}  # fmt: skip
    assert {k: v["rollout"][k] for k in expected} == expected
    rows = {r["revision"]: r for r in v["revisions"]}
    assert (rows[STABLE]["role"], rows[STABLE]["weight"]) == ("stable", 100)
    assert (rows[CAND]["role"], rows[CAND]["weight"]) == ("shadow", 0)
    assert not any(s["current"] for s in v["steps"])  # the first step has not started
    assert v["shadow"]["active"] and v["shadow"]["revision"] == CAND
    assert v["shadow"]["thresholds"] == {"minTopKOverlap": 0.9, "maxP99LatencyMs": 50}

    row = render_list([v], all_namespaces=False, now=NOW).splitlines()[1]
    assert row.split() == ["ctr", "Progressing", "Progressing", STABLE, CAND, "mirror", "50%", "shadow",
                           "inconclusive", "60m"]  # fmt: skip
    text = render_model(v, NOW)
    assert "Rollout:     Progressing, shadow phase: 50% of live requests mirrored, users get the stable's" in text
    assert "mirror 50% of live requests to the candidate, compare the top 10, at least 200 compared, for at least " \
           f"2m (in progress, candidate {CAND})" in text  # fmt: skip
    assert "thresholds: minTopKOverlap 0.9, maxP99LatencyMs 50" in text
    assert "last look 30s ago: inconclusive (hold), mirrored 131, compared 120, dropped 2" in text
    assert "topKOverlap=0.97 (min 0.9: ok); p99LatencyMs=7.5 (max 50: ok)" in text
    assert "inconclusive (shadow)" in text  # the look in the analysis history is marked as a shadow look
    assert text.index("Shadow:") < text.index("Steps:") and "->" not in text.split("Steps:")[1]
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(CAND))
    assert line.split()[:4] == [CAND, "shadow", "2", "0%"]


def test_after_the_shadow_phase_its_last_look_stays_and_the_first_step_is_current() -> None:
    passed = {**SHADOW_LOOK, "verdict": "pass", "decision": "advance", "requests": 240.0,
              "measured": {**SHADOW_LOOK["measured"], "compared": 240, "mirrored": 250}}  # fmt: skip
    state = SHADOWING.evolve(shadowing=False, weight=10, shadow=passed, analyses=(passed,), last_analysis=passed)
    v = summarize(_model(state, rollout={**CANARY_ROLLOUT, "shadow": SHADOW_SPEC}))
    assert v["rollout"]["step"] == 0 and not v["rollout"]["shadowing"] and v["rollout"]["mirrorPercent"] is None
    assert [s["current"] for s in v["steps"]] == [True, False]
    row = render_list([v], all_namespaces=False, now=NOW).splitlines()[1].split()
    assert row[5:7] == ["10%", "1/2"]
    text = render_model(v, NOW)
    assert "(not running)" in text and "last look 30s ago: pass (advance), mirrored 250, compared 240" in text
    assert "-> 1. weight 10%, pause 1m (current)" in text


def test_a_model_without_a_shadow_phase_has_no_shadow_section() -> None:
    v = summarize(_model(CANARY))
    assert v["shadow"] is None and not v["rollout"]["shadowing"]
    assert "Shadow:" not in render_model(v, NOW)
    fresh = summarize(_model(CANARY, rollout={**CANARY_ROLLOUT, "shadow": SHADOW_SPEC}))
    assert "(no shadow look yet)" in render_model(fresh, NOW)  # configured, not reached yet
