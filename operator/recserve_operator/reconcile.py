"""Level-based reconcile of one RecommenderModel: compare desired objects with the watch caches, apply only drift."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from kubernetes.utils.quantity import parse_quantity

from recserve_operator import conditions as c
from recserve_operator import telemetry
from recserve_operator.builders.common import (
    INSTANCE_LABEL,
    MANAGED_BY_LABEL,
    MANAGER,
    REVISION_LABEL,
    Ids,
    owner_reference,
)
from recserve_operator.builders.configmap import build_configmap
from recserve_operator.builders.deployment import build_deployment
from recserve_operator.builders.hpa import build_hpa
from recserve_operator.builders.pdb import build_pdb
from recserve_operator.builders.service import build_revision_service, build_stable_service
from recserve_operator.builders.servicemonitor import build_servicemonitor
from recserve_operator.kube import Kube, resource_of
from recserve_operator.lifecycle import RouterObservation, TrafficDecision, decide_immediate, router_serves
from recserve_operator.observe import RevisionObservation, observe_revision
from recserve_operator.rollout.controls import ROLLOUT_ACTION_ANNOTATION
from recserve_operator.routers.base import router_name
from recserve_operator.routers.builtin import GRPC_SERVICE_PORT as ROUTER_GRPC_SERVICE_PORT
from recserve_operator.routers.builtin import SERVICE_PORT as ROUTER_HTTP_PORT
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import InvalidSpec, RecommenderModelSpec, parse_spec, revision_of
from recserve_operator.status import FOREIGN_KEYS, RolloutReport, compute_status, invalid_status

if TYPE_CHECKING:
    from recserve_operator.metrics.base import MetricsProvider
    from recserve_operator.strategies import ProgressiveDecision

logger = logging.getLogger("recserve.reconcile")

# Kinds deleted when their revision leaves the decision's keep set (ordered: traffic first, config last).
REVISIONED_KINDS = ("HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Deployment", "ConfigMap")
SERVICEMONITOR_API = "/apis/monitoring.coreos.com/v1"
INDEXED_KINDS = frozenset(("Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"))
_DISCOVERY_TTL_S = 300.0
_QUANTITY_RE = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")

EventFn = Callable[[str, str, str], None]  # (type "Normal"|"Warning", reason, message)


class LiveState(Protocol):
    """Read access to the watch caches of owned objects (Kopf indices in the operator, dicts in tests)."""

    def owned(self, kind: str, namespace: str, instance: str) -> list[dict[str, Any]]: ...


@dataclass
class Reconciler:
    kube: Kube
    defaults: OperatorDefaults
    live: LiveState
    _locks: defaultdict[tuple[str, str], threading.Lock] = field(default_factory=lambda: defaultdict(threading.Lock))
    _guard: threading.Lock = field(default_factory=threading.Lock)
    # Our own writes are newer than the watch caches until their events arrive: remember them.
    _applied: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    _status: dict[str, dict[str, Any]] = field(default_factory=dict)
    _sm_checked: tuple[float, bool] = (0.0, False)
    _providers: dict[str, MetricsProvider] = field(default_factory=dict)
    _verified: dict[tuple[str, str, str], tuple[str, float]] = field(default_factory=dict)

    def lock_for(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks[(namespace, name)]

    def forget(self, namespace: str, name: str, uid: str | None) -> None:
        with self._guard:
            self._locks.pop((namespace, name), None)
            if uid:
                self._status.pop(uid, None)
            for key, obj in list(self._applied.items()):
                if key[1] == namespace and (obj["metadata"].get("labels") or {}).get(INSTANCE_LABEL) == name:
                    self._applied.pop(key, None)
            self._verified.pop(("ServiceMonitor", namespace, name), None)

    def servicemonitor_supported(self) -> bool:
        checked_at, supported = self._sm_checked
        if time.monotonic() - checked_at > _DISCOVERY_TTL_S:
            supported = self.kube.exists(SERVICEMONITOR_API)
            self._sm_checked = (time.monotonic(), supported)
        return supported

    def reconcile(self, body: Mapping[str, Any], post: EventFn, now: datetime | None = None) -> dict[str, int]:
        meta = body.get("metadata") or {}
        namespace, name = str(meta["namespace"]), str(meta["name"])
        with self.lock_for(namespace, name):
            started = time.perf_counter()
            try:
                result = self._reconcile(body, post, now or datetime.now(UTC))
            except Exception:
                telemetry.RECONCILE_ERRORS.inc()
                raise
            finally:
                telemetry.RECONCILES.inc()
                telemetry.RECONCILE_SECONDS.observe(time.perf_counter() - started)
            return result

    # -- internals ---------------------------------------------------------------------------------------------

    def _live(self, kind: str, namespace: str, name: str) -> list[dict[str, Any]]:
        objs = {o["metadata"]["name"]: o for o in self.live.owned(kind, namespace, name)}
        for (k, ns, obj_name), applied in list(self._applied.items()):
            if k != kind or ns != namespace or (applied["metadata"].get("labels") or {}).get(INSTANCE_LABEL) != name:
                continue
            cached = objs.get(obj_name)
            if cached is None or _rv(cached) < _rv(applied):
                objs[obj_name] = applied
            else:
                self._applied.pop((k, ns, obj_name), None)  # the watch caught up
        return list(objs.values())

    def _reconcile(self, body: Mapping[str, Any], post: EventFn, now: datetime) -> dict[str, int]:
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        generation = int(meta.get("generation") or 0)
        now_s = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        old_status = self._status.get(uid) or dict(body.get("status") or {})
        counts = {"applied": 0, "deleted": 0, "status": 0}

        deployments = self._live("Deployment", namespace, name)
        pods = self.live.owned("Pod", namespace, name)
        observations = _observe(deployments, pods)
        stable_rev = (old_status.get("stable") or {}).get("revision")

        progressive: ProgressiveDecision | None = None
        try:
            spec = parse_spec(body.get("spec") or {})
            latest = revision_of(spec)
            ids = Ids(name=name, namespace=namespace, uid=uid, revision=latest)
            if spec.rollout.strategy == "immediate":
                decision = decide_traffic(spec, stable_rev, latest, observations)
            else:
                progressive = self._decide_progressive(spec, ids, body, status=old_status, observations=observations,
                                                       now=now)  # fmt: skip
                decision = progressive.traffic
            desired_latest = self._desired_revision(spec, ids, decision)
        except InvalidSpec as exc:
            status = invalid_status(
                old_status, message=str(exc), generation=generation, now=now_s,
                stable_obs=observations.get(stable_rev) if stable_rev else None,
            )  # fmt: skip
            counts["status"] = self._write_status(namespace, name, uid, old=old_status, new=status, post=post)
            return counts

        # A rolled-back or superseded candidate is not recreated: only revisions the decision keeps are built.
        desired: list[dict[str, Any]] = list(desired_latest) if latest in decision.keep else []
        stable_ids = Ids(name=name, namespace=namespace, uid=uid, revision=decision.stable)
        desired.append(build_stable_service(spec, stable_ids))
        if self.servicemonitor_supported():
            desired.append(build_servicemonitor(spec, ids))
        if progressive is not None:
            desired.extend(progressive.router_objects)

        for obj in desired:
            if self._apply_if_changed(obj):
                counts["applied"] += 1
        counts["applied"] += self._scale_kept(spec, ids, decision)
        # Revisions the decision dropped go only once the router no longer sends them anything (defect: the
        # old revision deleted in the reconcile that moved traffic failed requests at every promotion).
        if self._router_drained(namespace, name, progressive, decision.keep):
            counts["deleted"] = self._delete_outside(namespace, name, decision.keep)

        if progressive is not None:
            for type_, reason, message in progressive.events:
                post(type_, reason, message)
            if progressive.outcome:
                telemetry.ROLLOUTS.labels(outcome=progressive.outcome).inc()
            if progressive.handled_action and (meta.get("annotations") or {}).get(ROLLOUT_ACTION_ANNOTATION):
                self.kube.patch_annotations(namespace, name, {ROLLOUT_ACTION_ANNOTATION: None})
        elif decision.promoted and stable_rev and decision.promoted != stable_rev:
            post("Normal", "Promoted", f"Revision {decision.promoted} replaced {stable_rev}: {decision.reason}")
            telemetry.ROLLOUTS.labels(outcome="promoted").inc()

        if counts["applied"] or counts["deleted"]:
            # Report on what now exists (our writes are in the applied cache), not on the pre-apply snapshot.
            observations = _observe(self._live("Deployment", namespace, name), pods)
        status = compute_status(
            old_status, spec=spec, name=name, namespace=namespace, generation=generation, now=now_s, latest=latest,
            decision=decision, observations=observations, cluster_domain=self.defaults.cluster_domain,
            rollout=progressive.report if progressive is not None else RolloutReport(),
        )  # fmt: skip
        foreign: tuple[str, ...] = FOREIGN_KEYS
        if progressive is not None:
            status.update(progressive.rollout_status)
            foreign = ("kopf",)
            if spec.rollout.provider == "builtin":
                host = f"{name}-router.{namespace}.svc.{self.defaults.cluster_domain}"
                status["endpoints"] = {"http": f"http://{host}:{ROUTER_HTTP_PORT}",
                                       "grpc": f"{host}:{ROUTER_GRPC_SERVICE_PORT}"}
        counts["status"] = self._write_status(
            namespace, name, uid, old=old_status, new=status, post=post, foreign=foreign
        )
        return counts

    def _metrics(self, url: str) -> MetricsProvider:
        from recserve_operator.metrics.base import get_metrics_provider

        with self._guard:
            provider = self._providers.get(url)
            if provider is None:
                provider = self._providers[url] = get_metrics_provider("prometheus", url)
            return provider

    def _decide_progressive(
        self, spec: RecommenderModelSpec, ids: Ids, body: Mapping[str, Any], *, status: Mapping[str, Any],
        observations: Mapping[str, RevisionObservation], now: datetime,
    ) -> ProgressiveDecision:  # fmt: skip
        # Imported on first use: the rollout statistics stack (scipy, statsmodels) costs ~85 MiB of RSS.
        from recserve_operator.strategies import decide_progressive

        return decide_progressive(
            spec, name=ids.name, namespace=ids.namespace, owner_ref=owner_reference(ids), status=status,
            annotations=body["metadata"].get("annotations") or {}, latest=ids.revision, observations=observations,
            now=now, default_prometheus=self.defaults.prometheus_url, router_image=self.defaults.router_image,
            router_placement=self.defaults.router_placement(), metrics=self._metrics,
            router_live=self._router_observation(ids.namespace, ids.name),
        )  # fmt: skip

    def _router_observation(self, namespace: str, name: str) -> RouterObservation:
        """The builtin router before this reconcile applies anything: the evidence of the plan it serves."""
        router = router_name(name)
        live = next(iter(self._live("Deployment", namespace, router)), None)
        return RouterObservation(live, tuple(self.live.owned("Pod", namespace, router)))

    def _desired_revision(
        self, spec: RecommenderModelSpec, ids: Ids, decision: TrafficDecision
    ) -> list[dict[str, Any]]:
        """The spec's revision, at the scale the decision gives it (a rollout's share) or the spec's."""
        objs = [
            build_configmap(spec, ids),
            build_deployment(spec, ids, self.defaults, replicas=decision.replicas.get(ids.revision)),
            build_revision_service(spec, ids),
            build_pdb(spec, ids),
        ]
        hpa = build_hpa(spec, ids, bounds=decision.hpa_bounds.get(ids.revision))
        if hpa is not None:
            objs.append(hpa)
        return objs

    def _scale_kept(self, spec: RecommenderModelSpec, ids: Ids, decision: TrafficDecision) -> int:
        """Scale the kept revisions the spec no longer describes (the stable during a rollout, an old stable while
        a promotion finishes) to the decision's targets: level-based, so between rollouts the stable is back at
        the spec's scale. Their objects are not rebuilt (the spec names another revision): only the Deployment's
        replicas are patched, or, with autoscaling, their HorizontalPodAutoscaler is applied from the spec (no
        part of it is particular to a revision) with the decision's bounds."""
        scaled = 0
        for rev in sorted(decision.keep - {ids.revision}):
            rev_ids = Ids(name=ids.name, namespace=ids.namespace, uid=ids.uid, revision=rev)
            if spec.serving.autoscaling is not None and rev in decision.hpa_bounds:
                hpa = build_hpa(spec, rev_ids, bounds=decision.hpa_bounds[rev])
                changed = hpa is not None and self._apply_if_changed(hpa)
            elif spec.serving.autoscaling is None and rev in decision.replicas:
                changed = self._scale_deployment(rev_ids, decision.replicas[rev])
            else:
                changed = False
            scaled += int(changed)
        return scaled

    def _scale_deployment(self, ids: Ids, replicas: int) -> bool:
        live = next((d for d in self._live("Deployment", ids.namespace, ids.name)
                     if d["metadata"]["name"] == ids.revision_name), None)  # fmt: skip
        if live is None or live["metadata"].get("deletionTimestamp"):
            return False
        before = (live.get("spec") or {}).get("replicas")
        if before == replicas:
            return False
        patched = self.kube.scale_deployment(ids.namespace, ids.revision_name, replicas)
        if patched is None:
            return False
        patched.get("metadata", {}).pop("managedFields", None)
        self._applied[("Deployment", ids.namespace, ids.revision_name)] = patched
        logger.info("Scaled Deployment namespace=%s name=%s revision=%s replicas=%s->%s", ids.namespace,
                    ids.revision_name, ids.revision, before, replicas)  # fmt: skip
        telemetry.APPLIES.labels(kind="Deployment").inc()
        return True

    def _apply_if_changed(self, obj: dict[str, Any]) -> bool:
        kind, meta = obj["kind"], obj["metadata"]
        labels = meta.get("labels") or {}
        instance = labels.get(INSTANCE_LABEL)
        indexed = kind in INDEXED_KINDS and instance is not None and labels.get(MANAGED_BY_LABEL) == MANAGER
        if not indexed or instance is None:
            # Not in the watch caches (ServiceMonitor: its CRD may be absent, so it is not watched). Re-read it
            # only when it changed or the last check is old: drift there is corrected within the TTL.
            key = (kind, meta["namespace"], meta["name"])
            digest = json.dumps(obj, sort_keys=True)
            seen = self._verified.get(key)
            if seen is not None and seen[0] == digest and time.monotonic() - seen[1] < _DISCOVERY_TTL_S:
                return False
            live = self.kube.get(resource_of(obj), meta["namespace"], meta["name"])
            self._verified[key] = (digest, time.monotonic())
        else:
            live = next(
                (o for o in self._live(kind, meta["namespace"], instance) if o["metadata"]["name"] == meta["name"]),
                None,
            )
        if live is not None and is_subset(obj, live):
            return False
        applied = self.kube.apply(obj)
        applied.get("metadata", {}).pop("managedFields", None)
        if indexed:
            self._applied[(kind, meta["namespace"], meta["name"])] = applied
        verb = "Created" if live is None else "Updated"
        logger.info(
            "%s %s namespace=%s name=%s revision=%s", verb, kind, meta["namespace"], meta["name"],
            labels.get(REVISION_LABEL, "-"),
        )  # fmt: skip
        telemetry.APPLIES.labels(kind=kind).inc()
        return True

    def _router_drained(
        self, namespace: str, name: str, progressive: ProgressiveDecision | None, keep: frozenset[str]
    ) -> bool:
        desired = next((o for o in (progressive.router_objects if progressive else ())
                        if o.get("kind") == "Deployment"), None)  # fmt: skip
        if desired is None:
            return True
        router = desired["metadata"]["name"]
        live = next(iter(self._live("Deployment", namespace, router)), None)
        drained = router_serves(desired, live, self.live.owned("Pod", namespace, router))
        dropped = sorted({rev for d in self._live("Deployment", namespace, name)
                          if (rev := (d["metadata"].get("labels") or {}).get(REVISION_LABEL)) and rev not in keep})
        if not drained and dropped:
            logger.info("Keeping revisions until the router serves the new plan namespace=%s name=%s revisions=%s",
                        namespace, name, ",".join(dropped))
        return drained

    def _delete_outside(self, namespace: str, name: str, keep: frozenset[str]) -> int:
        deleted = 0
        for kind in REVISIONED_KINDS:
            for obj in self._live(kind, namespace, name):
                rev = (obj["metadata"].get("labels") or {}).get(REVISION_LABEL)
                if rev is None or rev in keep or obj["metadata"].get("deletionTimestamp"):
                    continue
                if self.kube.delete(kind, namespace, obj["metadata"]["name"], obj["metadata"].get("uid")):
                    deleted += 1
                    logger.info(
                        "Deleted %s namespace=%s name=%s revision=%s", kind, namespace, obj["metadata"]["name"], rev
                    )
                self._applied.pop((kind, namespace, obj["metadata"]["name"]), None)
        return deleted

    def _write_status(
        self, namespace: str, name: str, uid: str, *, old: Mapping[str, Any], new: dict[str, Any], post: EventFn,
        foreign: tuple[str, ...] = FOREIGN_KEYS,
    ) -> int:  # fmt: skip
        # Stored JSON never holds nulls (a merge patch deletes them): compare and remember what the server keeps.
        old_own = _strip_none({k: v for k, v in old.items() if k not in foreign})
        new = _strip_none(new)
        if old_own == new:
            self._status[uid] = {**old, **new}
            return 0
        patch = merge_patch(old_own, new)
        if self.kube.patch_status(namespace, name, patch) is None:
            return 0
        self._status[uid] = {**{k: v for k, v in old.items() if k in foreign}, **new}
        _post_transitions(old_own.get("conditions") or [], new["conditions"], post)
        _log_metrics_transition(namespace, name, old_own.get("conditions") or [], new["conditions"])
        if old_own.get("phase") != new.get("phase"):
            logger.info(
                "Phase changed namespace=%s name=%s from=%s to=%s", namespace, name, old_own.get("phase"), new["phase"]
            )
        return 1


def decide_traffic(
    spec: RecommenderModelSpec, stable: str | None, latest: str, observations: Mapping[str, RevisionObservation]
) -> TrafficDecision:
    """The one place a rollout strategy decides which revisions run and which is stable.

    `immediate` is decided here; canary and abTest plug in the rollout engine (recserve_operator.rollout)
    at this seam. Until that engine drives traffic, they fall back to the safe immediate behaviour: the
    old revision serves until the new one is Available.
    """
    return decide_immediate(stable, latest, observations)


def _rv(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _observe(
    deployments: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]
) -> dict[str, RevisionObservation]:
    pods_by_rev: defaultdict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for pod in pods:
        rev = ((pod.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL)
        if rev:
            pods_by_rev[rev].append(pod)
    result: dict[str, RevisionObservation] = {}
    for dep in deployments:
        rev = ((dep.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL)
        if rev and not dep["metadata"].get("deletionTimestamp"):
            result[rev] = observe_revision(rev, dep, pods_by_rev.get(rev, []))
    return result


def is_subset(desired: Any, live: Any) -> bool:
    """Whether every field we set has the same value live; fields the server or others added are ignored."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(k in live and is_subset(v, live[k]) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            return False
        return all(is_subset(d, v) for d, v in zip(desired, live, strict=True))
    if isinstance(desired, bool) or isinstance(live, bool):
        return desired is live
    if isinstance(desired, int | float) and isinstance(live, int | float):
        return float(desired) == float(live)
    if isinstance(desired, str) and isinstance(live, str) and desired != live:
        # The apiserver stores quantities canonically ("2.5" -> "2500m", "1024Mi" -> "1Gi", "2000" -> "2k").
        return _quantity(desired) is not None and _quantity(desired) == _quantity(live)
    return bool(desired == live)


def _quantity(value: str) -> Decimal | None:
    if not _QUANTITY_RE.match(value):
        return None
    try:
        return Decimal(parse_quantity(value))
    except (ValueError, ArithmeticError):
        return None


def _strip_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch turning `old` into `new` (nested keys that disappeared become null)."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before:
            patch[key] = value
    return patch


def _log_metrics_transition(
    namespace: str, name: str, old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]
) -> None:
    """One line when a model's metrics go away and one when they return, rather than an error at every look."""
    before = next((x.get("status") for x in old if x.get("type") == c.METRICS_AVAILABLE), None)
    after = next((x for x in new if x.get("type") == c.METRICS_AVAILABLE), None)
    if after is not None and after["status"] == "False" and before != "False":
        logger.warning("Metrics unavailable namespace=%s name=%s error=%s", namespace, name, after["message"])
    elif after is not None and after["status"] == "True" and before == "False":
        logger.info("Metrics available again namespace=%s name=%s", namespace, name)


def _post_transitions(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]], post: EventFn) -> None:
    before = {x.get("type"): x for x in old}
    for cond in new:
        prev = before.get(cond["type"])
        if prev is not None and prev.get("reason") == cond["reason"] and prev.get("status") == cond["status"]:
            continue
        bad = (cond["type"] == c.DEGRADED and cond["status"] == "True") or (
            cond["type"] == c.METRICS_AVAILABLE and cond["status"] == "False"
        ) or (
            cond["type"] in (c.READY, c.MODEL_REPOSITORY_READY) and cond["status"] == "False"
            and cond["reason"] in (c.BUILD_FAILED, c.INVALID_SPEC, c.INSUFFICIENT_GPU, c.UNSCHEDULABLE)
        )  # fmt: skip
        if not bad and (prev is None or prev.get("status") == cond["status"]) and cond["status"] != "True":
            continue  # "not yet" conditions and reason-only changes of healthy states are noise
        if not bad and prev is not None and prev.get("status") == cond["status"]:
            continue
        post("Warning" if bad else "Normal", cond["reason"], f"{cond['type']}={cond['status']}: {cond['message']}")
