"""Pure interpretation of a revision's live Deployment and pods: available, building, build failed, unschedulable."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from recserve_operator.builders.deployment import GPU_RESOURCE, TRITON_CONTAINER
from recserve_operator.names import (
    BUILDER_CONTAINER,
    FETCH_CONTAINER,
    INSTANCE_LABEL,
    REVISION_LABEL,
    TUNER_CONTAINER,
    build_job_name,
)

_MAX_MESSAGE = 1024


@dataclass(frozen=True)
class RevisionObservation:
    revision: str
    exists: bool = False
    desired_replicas: int = 0
    ready_replicas: int = 0
    available: bool = False
    built: bool = False  # at least one pod finished the model build (or is already serving)
    building: bool = False
    build_failed: str | None = None
    fetch_failed: str | None = None  # built once, but its pods' fetch-artifact step fails
    unschedulable: str | None = None
    insufficient_gpu: bool = False
    container_failing: str | None = None
    artifact: tuple[str, str] | None = None  # (key, digest) its build Job published, with a model store
    tuned: str | None = None  # the configuration its build Job's tuning chose (spec.serving.tuning)


def _builder_message(terminated: Mapping[str, Any], container: str = BUILDER_CONTAINER) -> str:
    """The builder's --json report is its last log line; prefer its error text over raw logs."""
    raw = str(terminated.get("message") or "").strip()
    code = terminated.get("exitCode")
    for raw_line in reversed(raw.splitlines()):
        line = raw_line.strip()
        if line.startswith("{"):
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if isinstance(report, dict):
                detail = report.get("error") or report.get("message") or report.get("status")
                if detail:
                    raw = str(detail)
                break
    what = "model-repo-builder" if container == BUILDER_CONTAINER else f"model-repo-builder ({container})"
    text = f"{what} exited with code {code}" + (f": {raw}" if raw else "")
    return text[:_MAX_MESSAGE]


def _fetch_message(terminated: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """A serving pod could not install the revision's built artifact: what failed, and how to rebuild it."""
    job = build_job_name(labels.get(INSTANCE_LABEL, "<model>"), labels.get(REVISION_LABEL, "<revision>"))
    hint = (f" (the model store is unreachable or no longer holds the artifact; to rebuild it, "
            f"kubectl delete job {job})")  # fmt: skip
    text = _builder_message(terminated, FETCH_CONTAINER)
    return (text[: _MAX_MESSAGE - len(hint)] + hint)[:_MAX_MESSAGE]


def _pod_observation(pod: Mapping[str, Any]) -> dict[str, Any]:
    status = pod.get("status") or {}
    out: dict[str, Any] = {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            message = str(cond.get("message") or cond.get("reason") or "Unschedulable")
            out["unschedulable"] = message[:_MAX_MESSAGE]
            out["insufficient_gpu"] = f"Insufficient {GPU_RESOURCE}" in message
        if cond.get("type") == "Ready" and cond.get("status") == "True":
            out["ready"] = True
    labels = (pod.get("metadata") or {}).get("labels") or {}
    for cs in status.get("initContainerStatuses") or []:
        if cs.get("name") not in (BUILDER_CONTAINER, FETCH_CONTAINER):
            continue
        state = cs.get("state") or {}
        last = (cs.get("lastState") or {}).get("terminated")
        terminated = state.get("terminated")
        # Restarting after a failure (CrashLoopBackOff): the last failure is what the user needs to see.
        failure = terminated if terminated and terminated.get("exitCode", 0) != 0 else (
            last if not terminated and last and last.get("exitCode", 0) != 0 else None)  # fmt: skip
        if terminated and terminated.get("exitCode", 0) == 0:
            out["built"] = True
        elif failure is not None and cs["name"] == FETCH_CONTAINER:
            out["fetch_failed"] = _fetch_message(failure, labels)
        elif failure is not None:
            out["build_failed"] = _builder_message(failure, cs["name"])
        elif "running" in state or "waiting" in state:
            out["building"] = True
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") != TRITON_CONTAINER:
            continue
        if cs.get("ready") or "running" in (cs.get("state") or {}):
            out["built"] = True
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerError"):
            last = (cs.get("lastState") or {}).get("terminated") or {}
            detail = last.get("message") or waiting.get("message") or ""
            out["container_failing"] = f"triton container {waiting['reason']}: {detail}".strip(": ")[:_MAX_MESSAGE]
    if out.get("ready"):
        out["built"] = True
    return out


def observe_revision(
    revision: str, deployment: Mapping[str, Any] | None, pods: Iterable[Mapping[str, Any]]
) -> RevisionObservation:
    if deployment is None:
        return RevisionObservation(revision=revision)
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    desired = int(spec.get("replicas", 1))
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    caught_up = int(status.get("observedGeneration") or 0) >= int(
        (deployment.get("metadata") or {}).get("generation") or 0
    )
    available = caught_up and ready >= desired and updated >= desired
    per_pod = [_pod_observation(p) for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    failed = next((o["build_failed"] for o in per_pod if o.get("build_failed")), None)
    fetch_failed = next((o["fetch_failed"] for o in per_pod if o.get("fetch_failed")), None)
    unsched = next((o for o in per_pod if o.get("unschedulable")), None)
    failing = next((o["container_failing"] for o in per_pod if o.get("container_failing")), None)
    return RevisionObservation(
        revision=revision,
        exists=True,
        desired_replicas=desired,
        ready_replicas=ready,
        available=available,
        built=ready > 0 or any(o.get("built") for o in per_pod),
        building=any(o.get("building") for o in per_pod),
        build_failed=failed,
        fetch_failed=fetch_failed,
        unschedulable=unsched["unschedulable"] if unsched else None,
        insufficient_gpu=bool(unsched and unsched.get("insufficient_gpu")),
        container_failing=failing,
    )


@dataclass(frozen=True)
class BuildObservation:
    """A revision's build Job (with a model store): running, published (with the digest it reported), or failed."""

    exists: bool = False
    building: bool = False
    key: str | None = None
    digest: str | None = None  # set once the build published (or reused) its artifact
    failed: str | None = None
    unschedulable: str | None = None
    insufficient_gpu: bool = False
    tuned: str | None = None  # with spec.serving.tuning: the configuration the build chose, and against what


def _outcome(terminated: Mapping[str, Any]) -> dict[str, Any]:
    """A finished build's termination message (model-repo-builder --termination-log): its last line, as JSON."""
    try:
        outcome = json.loads(str(terminated.get("message") or "").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    return outcome if isinstance(outcome, dict) else {}


def _published(outcome: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(key, digest) of the artifact a build published or reused."""
    try:
        artifact = outcome["artifact"]
        return str(artifact["key"]), str(artifact["digest"])
    except (KeyError, TypeError):
        return None, None


def _tuned(outcome: Mapping[str, Any]) -> str | None:
    """'inst=2 delay=1000us pref=- (p99 within 25 ms at concurrency 1-64)', or why not."""
    tuning = outcome.get("tuning")
    if not isinstance(tuning, dict) or not tuning.get("chosen"):
        return None
    levels = tuning.get("concurrency_levels") or []
    span = f"concurrency {min(levels)}-{max(levels)}" if levels else "the load range"
    verdict = "within" if tuning.get("slo_met") else "not within (no configuration met it)"
    slo = tuning.get("slo_p99_ms")
    slo_text = format(slo, "g") if isinstance(slo, (int, float)) else str(slo)
    return f"{tuning['chosen']} (p99 {verdict} {slo_text} ms at {span})"


def _deciding_state(pods: Iterable[Mapping[str, Any]]) -> tuple[str, Mapping[str, Any]] | None:
    """(container, terminated state) that decides a build pod: a builder that failed as the init container (with
    tuning), else the container that publishes (the builder, or the tuner with tuning), once it has ended."""
    for pod in pods:
        status = pod.get("status") or {}
        for cs in status.get("initContainerStatuses") or []:
            t = (cs.get("state") or {}).get("terminated")
            if cs.get("name") == BUILDER_CONTAINER and t and t.get("exitCode", 1) != 0:
                return BUILDER_CONTAINER, t
        for cs in status.get("containerStatuses") or []:
            t = (cs.get("state") or {}).get("terminated")
            if cs.get("name") in (BUILDER_CONTAINER, TUNER_CONTAINER) and t:
                return str(cs["name"]), t
    return None


def observe_build(job: Mapping[str, Any] | None, pods: Iterable[Mapping[str, Any]]) -> BuildObservation:
    if job is None:
        return BuildObservation()
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []
                  if c.get("status") == "True"}  # fmt: skip
    name = (job.get("metadata") or {}).get("name", "")
    log = f"(log: kubectl logs job/{name})"
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    container, terminated = _deciding_state(live) or (BUILDER_CONTAINER, None)
    if "Complete" in conditions or (terminated is not None and terminated.get("exitCode", 1) == 0):
        outcome = _outcome(terminated or {})
        key, digest = _published(outcome)
        if digest is None:
            return BuildObservation(True, failed=f"the build finished without reporting its artifact {log}")
        return BuildObservation(True, key=key, digest=digest, tuned=_tuned(outcome))
    if terminated is not None:
        return BuildObservation(True, failed=f"{_builder_message(terminated, container)} {log}"[:_MAX_MESSAGE])
    if "Failed" in conditions:
        failed = conditions["Failed"]
        reason = f"{failed.get('reason') or 'Failed'}: {failed.get('message') or ''}".strip(": ")
        return BuildObservation(True, failed=f"build Job {name} failed: {reason} {log}"[:_MAX_MESSAGE])
    pod = next((_pod_observation(p) for p in live), {})
    return BuildObservation(True, building=True, unschedulable=pod.get("unschedulable"),
                            insufficient_gpu=bool(pod.get("insufficient_gpu")))  # fmt: skip


def with_build(obs: RevisionObservation | None, revision: str, build: BuildObservation) -> RevisionObservation:
    """The revision as status reports it: its Deployment's pods plus its build Job."""
    base = obs or RevisionObservation(revision=revision)
    if not build.exists:
        return base
    return dataclasses.replace(
        base,
        built=base.built or build.digest is not None,
        building=base.building or build.building,
        build_failed=build.failed or base.build_failed,
        artifact=(build.key, build.digest) if build.key and build.digest else base.artifact,
        tuned=build.tuned or base.tuned,
        unschedulable=base.unschedulable or build.unschedulable,
        insufficient_gpu=base.insufficient_gpu or build.insufficient_gpu,
    )
