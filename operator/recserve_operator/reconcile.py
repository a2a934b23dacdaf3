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

from kubernetes.client.exceptions import ApiException
from kubernetes.utils.quantity import parse_quantity

from recserve_operator import conditions as c
from recserve_operator import telemetry
from recserve_operator.builders.common import Ids
from recserve_operator.builders.configmap import build_configmap
from recserve_operator.builders.deployment import build_deployment
from recserve_operator.builders.hpa import build_hpa
from recserve_operator.builders.job import build_job
from recserve_operator.builders.pdb import build_pdb
from recserve_operator.builders.service import build_revision_service, build_stable_service
from recserve_operator.builders.servicemonitor import (
    REVISION_SERVICE_LABELS,
    build_servicemonitor,
    build_shadow_servicemonitor,
    is_per_model_servicemonitor,
)
from recserve_operator.builders.store import StoreKeysMissing, store_keys_secret
from recserve_operator.kube import RESOURCES, Kube, resource_of
from recserve_operator.lifecycle import RouterObservation, TrafficDecision, router_serves
from recserve_operator.names import (
    ARTIFACT_DIGEST_ANNOTATION,
    ARTIFACT_KEY_ANNOTATION,
    BUILDER,
    COMPONENT_LABEL,
    MANAGED_BY_LABEL,
    MANAGER,
    REVISION_LABEL,
    REVISIONS_SERVICEMONITOR,
    ROLLOUT_ACTION_ANNOTATION,
    is_predictor,
    is_router,
    model_of,
    router_name,
)
from recserve_operator.observe import (
    BuildObservation,
    RevisionObservation,
    observe_build,
    observe_revision,
    with_build,
)
from recserve_operator.rollout.policy import RoutingProvider
from recserve_operator.rollout.policy import Strategy as RolloutStrategy
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import InvalidSpec, RecommenderModelSpec, parse_spec, revision_of
from recserve_operator.status import FOREIGN_KEYS, compute_status, invalid_status
from recserve_operator.strategy import Context, Immediate, Plan, Strategy

if TYPE_CHECKING:
    from recserve_operator.metrics.base import MetricsProvider

logger = logging.getLogger("recserve.reconcile")

# Per-revision objects the spec may stop asking for without a new revision (autoscaling and scale are not hashed).
OPTIONAL_KINDS = ("HorizontalPodAutoscaler", "PodDisruptionBudget")
# Kinds deleted when their revision leaves the decision's keep set (ordered: traffic first, config last).
REVISIONED_KINDS = ("HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Deployment", "Job", "ConfigMap")
# The builtin router's kinds (in the watch caches), deleted when the plan no longer names them.
ROUTER_KINDS = ("Service", "Deployment", "ConfigMap")
SERVICEMONITOR_API = "/apis/monitoring.coreos.com/v1"
INDEXED_KINDS = frozenset(
    ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Job")
)
# A Job's pod template is immutable and one Job is one build: created once, never re-applied.
CREATE_ONLY_KINDS = frozenset(("Job",))
_DISCOVERY_TTL_S = 300.0
_QUANTITY_RE = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")

EventFn = Callable[[str, str, str], None]  # (type "Normal"|"Warning", reason, message)


class _AppliedObjects:
    """The operator's own writes, newer than the watch caches until their events arrive, shared by the reconcile
    threads (under one lock). Indexed by object, for the watch's "only our own write" check, and by model, so a
    reconcile reads its own model's writes: scanning every model's writes at each read made a reconcile's cost grow
    with the fleet (at 2,000 models the operator spent a core on it, 6.5 CPU-minutes for 1,500 new models)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, namespace, name) -> object
        self._by_model: dict[tuple[str, str | None], set[tuple[str, str, str]]] = {}  # (namespace, model) -> keys

    @staticmethod
    def _model(key: tuple[str, str, str], obj: Mapping[str, Any]) -> tuple[str, str | None]:
        return key[1], model_of((obj.get("metadata") or {}).get("labels") or {})

    def put(self, key: tuple[str, str, str], obj: dict[str, Any]) -> None:
        with self._lock:
            self._unlink(key)
            self._objects[key] = obj
            self._by_model.setdefault(self._model(key, obj), set()).add(key)

    def get(self, key: tuple[str, str, str]) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get(key)

    def pop(self, key: tuple[str, str, str]) -> dict[str, Any] | None:
        with self._lock:
            return self._unlink(key)

    def _unlink(self, key: tuple[str, str, str]) -> dict[str, Any] | None:
        obj = self._objects.pop(key, None)
        if obj is not None:
            owner = self._model(key, obj)
            keys = self._by_model.get(owner)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_model[owner]
        return obj

    def of_model(self, kind: str, namespace: str, model: str) -> list[tuple[tuple[str, str, str], dict[str, Any]]]:
        with self._lock:
            keys = self._by_model.get((namespace, model), ())
            return [(key, self._objects[key]) for key in keys if key[0] == kind]

    def forget_model(self, namespace: str, model: str) -> None:
        with self._lock:
            for key in self._by_model.pop((namespace, model), set()):
                self._objects.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)


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
    _applied: _AppliedObjects = field(default_factory=_AppliedObjects)
    _status: dict[str, dict[str, Any]] = field(default_factory=dict)
    _sm_checked: tuple[float, bool] = (0.0, False)
    _providers: dict[str, MetricsProvider] = field(default_factory=dict)
    _verified: dict[tuple[str, str, str], tuple[str, float]] = field(default_factory=dict)
    _routes_dropped: set[str] = field(default_factory=set)  # models (uid) asked to drop an HTTPRoute this run
    # Namespaces whose ServiceMonitors of earlier operator versions (one per model) this process has looked for.
    _monitors_swept: set[str] = field(default_factory=set)
    _store_source: tuple[float, dict[str, Any] | None] = (-_DISCOVERY_TTL_S, None)  # (read at, source Secret)

    def lock_for(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks[(namespace, name)]

    def forget(self, namespace: str, name: str, uid: str | None) -> None:
        with self._guard:
            self._locks.pop((namespace, name), None)
            if uid:
                self._status.pop(uid, None)
                self._routes_dropped.discard(uid)
            self._applied.forget_model(namespace, name)

    def namespace_emptied(self, namespace: str) -> list[tuple[str, str]]:
        """The namespace's last model is gone: delete its revisions' ServiceMonitor (no model owns it). Returns the
        models the API shows there after the delete: one created meanwhile (not in the caches yet when the
        namespace looked empty) is to be reconciled again at once, and so gets the ServiceMonitor back."""
        if not self.servicemonitor_supported():
            return []
        deleted = self.kube.delete("ServiceMonitor", namespace, REVISIONS_SERVICEMONITOR)
        with self._guard:  # the next reconcile of a model there verifies (and recreates) it
            self._verified.pop(("ServiceMonitor", namespace, REVISIONS_SERVICEMONITOR), None)
        if not deleted:
            return []
        logger.info("Deleted ServiceMonitor namespace=%s name=%s (no model left)", namespace,
                    REVISIONS_SERVICEMONITOR)  # fmt: skip
        return [(namespace, m["metadata"]["name"]) for m in self.kube.list_objects(RESOURCES["RecommenderModel"],
                                                                                   namespace)]  # fmt: skip

    def sweep_orphaned_monitors(self, namespaces: Iterable[str]) -> list[tuple[str, str]]:
        """At start: delete the namespace ServiceMonitors left where no model is (the last one was deleted while no
        operator ran, so `namespace_emptied` never did). Reads the API, not the caches: with no model at all, Kopf
        never reports its caches listed. `namespaces` empty: cluster-wide. Returns the models to reconcile again:
        one created between the look and the delete gets its ServiceMonitor back at once."""
        if not self.servicemonitor_supported():
            return []
        ours, by_name = f"{MANAGED_BY_LABEL}={MANAGER}", f"metadata.name={REVISIONS_SERVICEMONITOR}"
        monitors: list[dict[str, Any]] = []
        for ns in tuple(namespaces) or ("",):
            monitors += self.kube.list_objects(RESOURCES["ServiceMonitor"], ns, ours, field_selector=by_name)
        again: list[tuple[str, str]] = []
        for monitor in monitors:
            ns = monitor["metadata"]["namespace"]
            if self.kube.list_objects(RESOURCES["RecommenderModel"], ns, limit=1):
                continue
            again += self.namespace_emptied(ns)
        return again

    def is_own_write(self, kind: str, namespace: str, name: str, resource_version: str | None) -> bool:
        """Whether a watch event only shows this operator's own last write (the reconcile that made it already
        accounted for it), so it needs no reconcile of its own."""
        applied = self._applied.get((kind, namespace, name))
        version = (applied.get("metadata") or {}).get("resourceVersion") if applied is not None else None
        return version is not None and version == resource_version

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
        for (k, ns, obj_name), applied in self._applied.of_model(kind, namespace, name):
            cached = objs.get(obj_name)
            if cached is None or _rv(cached) < _rv(applied):
                objs[obj_name] = applied
            else:
                self._applied.pop((k, ns, obj_name))  # the watch caught up
        return list(objs.values())

    def _reconcile(self, body: Mapping[str, Any], post: EventFn, now: datetime) -> dict[str, int]:
        """observe -> measure -> decide (the strategy) -> plan -> apply -> announce -> report."""
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        old_status = self._status.get(uid) or dict(body.get("status") or {})
        pods = self.live.owned("Pod", namespace, name)
        observations = self._observe(namespace, name, pods)
        try:
            spec = parse_spec(body.get("spec") or {}, default_prometheus=self.defaults.prometheus_url)
            ctx = Context(
                spec, Ids(name, namespace, uid, revision_of(spec)), old_status, meta.get("annotations") or {},
                observations, self._router_observation(namespace, name, pods), now, self.defaults.cluster_domain,
            )  # fmt: skip
            strategy = self._strategy(spec)
            plan = strategy.decide(ctx, strategy.measure(ctx))
            desired = self._desired(ctx, plan)
        except InvalidSpec as exc:
            written = self._report_invalid(body, exc, old_status=old_status, observations=observations, post=post,
                                           now=now)  # fmt: skip
            return {"applied": 0, "deleted": 0, "status": written}
        counts = self._apply(ctx, plan, desired)
        self._announce(ctx, plan, post)
        if counts["applied"] or counts["deleted"]:
            # Report on what now exists (our writes are in the applied cache), not on the pre-apply snapshot.
            observations = self._observe(namespace, name, pods)
        counts["status"] = self._report(ctx, plan, body, observations, post)
        return counts

    def _strategy(self, spec: RecommenderModelSpec) -> Strategy[Any]:
        if spec.rollout.strategy is RolloutStrategy.IMMEDIATE:
            return Immediate()
        # Imported on first use: the rollout statistics stack (scipy, statsmodels) costs ~85 MiB of RSS.
        from recserve_operator.strategies import Progressive

        return Progressive(self._metrics, self.defaults.router_image, self.defaults.router_placement(),
                           shadow_image=self.defaults.fetcher_image)  # fmt: skip

    def _desired(self, ctx: Context, plan: Plan) -> list[dict[str, Any]]:
        """Every object the plan needs. A rolled-back or superseded candidate is not recreated: only revisions the
        decision keeps are built."""
        spec, ids, decision = ctx.spec, ctx.ids, plan.traffic
        latest = ctx.observations.get(ids.revision)
        desired = self._desired_revision(spec, ids, decision, latest) if ids.revision in decision.keep else []
        desired.append(build_stable_service(spec, ids.at(decision.stable)))
        if self.servicemonitor_supported():
            desired.append(build_servicemonitor(ids.namespace))
            if spec.rollout.shadow is not None and spec.rollout.routing.provider is RoutingProvider.BUILTIN:
                desired.append(build_shadow_servicemonitor(ids))
        return [*desired, *plan.router_objects]

    def _apply(self, ctx: Context, plan: Plan, desired: list[dict[str, Any]]) -> dict[str, int]:
        namespace, name = ctx.ids.namespace, ctx.ids.name
        applied = sum(self._apply_if_changed(obj) for obj in desired)
        deleted = self._delete_optional(ctx, plan.traffic, desired)
        applied += self._scale_kept(ctx.spec, ctx.ids, plan.traffic)
        deleted += self._delete_routers(ctx, plan) + self._sweep_per_model_monitors(namespace)
        # Revisions the decision dropped go only once the router no longer sends them anything (defect: the
        # old revision deleted in the reconcile that moved traffic failed requests at every promotion).
        if self._router_drained(namespace, name, plan):
            deleted += self._delete_outside(namespace, name, plan.traffic.keep)
        return {"applied": applied, "deleted": deleted, "status": 0}

    def _announce(self, ctx: Context, plan: Plan, post: EventFn) -> None:
        for type_, reason, message in plan.events:
            post(type_, reason, message)
        if plan.outcome:
            telemetry.ROLLOUTS.labels(outcome=plan.outcome).inc()
        if plan.handled_action and ctx.annotations.get(ROLLOUT_ACTION_ANNOTATION):
            self.kube.patch_annotations(ctx.ids.namespace, ctx.ids.name, {ROLLOUT_ACTION_ANNOTATION: None})

    def _report(
        self, ctx: Context, plan: Plan, body: Mapping[str, Any], observations: Mapping[str, RevisionObservation],
        post: EventFn,
    ) -> int:  # fmt: skip
        ids = ctx.ids
        status = compute_status(
            ctx.status, spec=ctx.spec, name=ids.name, namespace=ids.namespace, generation=_generation(body),
            now=_timestamp(ctx.now), latest=ids.revision, decision=plan.traffic, observations=observations,
            cluster_domain=self.defaults.cluster_domain, rollout=plan.report,
        )  # fmt: skip
        status.update(plan.status)
        return self._write_status(ids.namespace, ids.name, ids.uid, old=ctx.status, new=status, post=post,
                                  foreign=plan.foreign)  # fmt: skip

    def _report_invalid(
        self, body: Mapping[str, Any], exc: InvalidSpec, *, old_status: Mapping[str, Any],
        observations: Mapping[str, RevisionObservation], post: EventFn, now: datetime,
    ) -> int:  # fmt: skip
        """An invalid spec changes nothing that runs; the condition says which field is wrong."""
        meta = body["metadata"]
        stable = (old_status.get("stable") or {}).get("revision")
        status = invalid_status(
            old_status, message=str(exc), generation=_generation(body), now=_timestamp(now),
            stable_obs=observations.get(stable) if stable else None,
        )  # fmt: skip
        return self._write_status(meta["namespace"], meta["name"], meta["uid"], old=old_status, new=status, post=post)

    def _metrics(self, url: str) -> MetricsProvider:
        """The provider for one analysis look (each look asks once): a Prometheus pinned to this instant, so every
        number of the look is evaluated at the same time."""
        from recserve_operator.metrics.base import get_metrics_provider
        from recserve_operator.metrics.prometheus import PrometheusProvider

        with self._guard:
            provider = self._providers.get(url)
            if provider is None:
                provider = self._providers[url] = get_metrics_provider("prometheus", url)
        return provider.at(time.time()) if isinstance(provider, PrometheusProvider) else provider

    def _router_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The model's builtin router Deployment as the caches show it (one created before the router carried
        names.MODEL_LABEL is indexed under its own instance label)."""
        deployments = self._live("Deployment", namespace, name)
        live = next((d for d in deployments if is_router(d["metadata"].get("labels") or {})), None)
        return live or next(iter(self._live("Deployment", namespace, router_name(name))), None)

    def _router_observation(self, namespace: str, name: str, pods: Iterable[Mapping[str, Any]]) -> RouterObservation:
        """The builtin router before this reconcile applies anything: the evidence of the plan it serves."""
        routers = [p for p in pods if is_router((p.get("metadata") or {}).get("labels") or {})]
        routers += self.live.owned("Pod", namespace, router_name(name))
        return RouterObservation(self._router_deployment(namespace, name), tuple(routers))

    def _observe(self, namespace: str, name: str, pods: list[dict[str, Any]]) -> dict[str, RevisionObservation]:
        """Each revision's Deployment and serving pods, with its build Job where there is one."""
        predictors = [p for p in pods if is_predictor((p.get("metadata") or {}).get("labels") or {})]
        observations = _observe(self._live("Deployment", namespace, name), predictors)
        for rev, build in self._builds(namespace, name, pods).items():
            observations[rev] = with_build(observations.get(rev), rev, build)
        return observations

    def _builds(self, namespace: str, name: str, pods: list[dict[str, Any]]) -> dict[str, BuildObservation]:
        builders: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        for pod in pods:
            labels = (pod.get("metadata") or {}).get("labels") or {}
            if labels.get(COMPONENT_LABEL) == BUILDER and labels.get(REVISION_LABEL):
                builders[labels[REVISION_LABEL]].append(pod)
        return {rev: observe_build(job, builders.get(rev, [])) for job in self._live("Job", namespace, name)
                if (rev := (job["metadata"].get("labels") or {}).get(REVISION_LABEL))}  # fmt: skip

    def _artifact(self, ids: Ids, obs: RevisionObservation | None) -> tuple[str, str] | None:
        """(key, digest) of the revision's published artifact: what its Deployment fetches, else what its build
        Job reported (`obs`, this reconcile's observation); None while it is not built."""
        live = next((d for d in self._live("Deployment", ids.namespace, ids.name)
                     if d["metadata"]["name"] == ids.revision_name), None)  # fmt: skip
        annotations = ((((live or {}).get("spec") or {}).get("template") or {}).get("metadata") or {}).get(
            "annotations") or {}  # fmt: skip
        if annotations.get(ARTIFACT_KEY_ANNOTATION) and annotations.get(ARTIFACT_DIGEST_ANNOTATION):
            return annotations[ARTIFACT_KEY_ANNOTATION], annotations[ARTIFACT_DIGEST_ANNOTATION]
        return obs.artifact if obs is not None else None

    def _artifacts_in_use(self, ids: Ids) -> set[str]:
        """The artifact keys the model's other running revisions fetch (a build must not collect them)."""
        keys = set()
        for dep in self._live("Deployment", ids.namespace, ids.name):
            tpl = ((dep.get("spec") or {}).get("template") or {}).get("metadata") or {}
            key = (tpl.get("annotations") or {}).get(ARTIFACT_KEY_ANNOTATION)
            if key:
                keys.add(key)
        return keys

    def _serving(
        self, spec: RecommenderModelSpec, ids: Ids, decision: TrafficDecision, obs: RevisionObservation | None
    ) -> list[dict[str, Any]]:
        """The revision's Deployment; with a model store, its build Job until the build published (a failed build
        never gets a Deployment, and a scale-out only fetches)."""
        replicas = decision.replicas.get(ids.revision)
        if not self.defaults.builds_once:
            return [build_deployment(spec, ids, self.defaults, replicas=replicas)]
        artifact = self._artifact(ids, obs)
        keys = self._store_keys(ids.namespace)
        if artifact is None:
            return [*keys, build_job(spec, ids, self.defaults, keep=self._artifacts_in_use(ids))]
        return [*keys, build_deployment(spec, ids, self.defaults, replicas=replicas, artifact=artifact)]

    def _store_keys(self, namespace: str) -> list[dict[str, Any]]:
        """The store's keys copied into the model's namespace, when the operator is the one that puts them there
        (cluster mode with the chart's embedded store). The source is re-read at most every few minutes; without
        it nothing is copied and the build's pod says which Secret it misses."""
        source = self.defaults.store_secret_source
        if source is None:
            return []
        read_at, secret = self._store_source
        if time.monotonic() - read_at > _DISCOVERY_TTL_S:
            try:
                secret = self.kube.get(RESOURCES["Secret"], *source)
            except ApiException as exc:
                logger.warning("Cannot read the model store's keys Secret %s/%s: %s %s", *source, exc.status,
                               exc.reason)  # fmt: skip
                secret = None
            if secret is None:
                logger.warning("The model store's keys Secret %s/%s is missing: no copy for namespace %s",
                               *source, namespace)  # fmt: skip
            self._store_source = (time.monotonic(), secret)
        if secret is None:
            return []
        try:
            return [store_keys_secret(namespace, self.defaults.model_store_secret, secret)]
        except StoreKeysMissing as exc:
            logger.warning("%s: no copy for namespace %s", exc, namespace)
            return []

    def _desired_revision(
        self, spec: RecommenderModelSpec, ids: Ids, decision: TrafficDecision, obs: RevisionObservation | None
    ) -> list[dict[str, Any]]:
        """The spec's revision, at the scale the decision gives it (a rollout's share) or the spec's."""
        objs = [
            build_configmap(spec, ids),
            *self._serving(spec, ids, decision, obs),
            build_revision_service(spec, ids),
        ]
        pdb = build_pdb(spec, ids)
        hpa = build_hpa(spec, ids, bounds=decision.hpa_bounds.get(ids.revision))
        return objs + [o for o in (pdb, hpa) if o is not None]

    def _delete_optional(self, ctx: Context, decision: TrafficDecision, desired: list[dict[str, Any]]) -> int:
        """A kept revision's autoscaler or disruption budget the spec no longer asks for (autoscaling removed, or
        scaled in place to one pod: neither is part of the revision): deleted, so an orphaned autoscaler never
        fights the replicas the operator sets. Kept revisions other than the spec's have no budget built from the
        current spec; theirs stays as it was made."""
        wanted = {(o["kind"], o["metadata"]["name"]) for o in desired}
        namespace, name = ctx.ids.namespace, ctx.ids.name
        deleted = 0
        for kind in OPTIONAL_KINDS:
            for obj in self._live(kind, namespace, name):
                rev = (obj["metadata"].get("labels") or {}).get(REVISION_LABEL)
                if rev not in decision.keep or (kind, obj["metadata"]["name"]) in wanted:
                    continue
                unscaled = kind == "HorizontalPodAutoscaler" and ctx.spec.serving.autoscaling is None
                if rev == ctx.ids.revision or unscaled:
                    deleted += self._delete(kind, namespace, obj)
        return deleted

    def _scale_kept(self, spec: RecommenderModelSpec, ids: Ids, decision: TrafficDecision) -> int:
        """Scale the kept revisions the spec no longer describes (the stable during a rollout, an old stable while
        a promotion finishes) to the decision's targets: level-based, so between rollouts the stable is back at
        the spec's scale. Their objects are not rebuilt (the spec names another revision): only the Deployment's
        replicas are patched, or, with autoscaling, their HorizontalPodAutoscaler is applied from the spec (no
        part of it is particular to a revision) with the decision's bounds."""
        scaled = 0
        for rev in sorted(decision.keep - {ids.revision}):
            rev_ids = ids.at(rev)
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
        self._applied.put(("Deployment", ids.namespace, ids.revision_name), patched)
        logger.info("Scaled Deployment namespace=%s name=%s revision=%s replicas=%s->%s", ids.namespace,
                    ids.revision_name, ids.revision, before, replicas)  # fmt: skip
        telemetry.APPLIES.labels(kind="Deployment").inc()
        return True

    def _apply_if_changed(self, obj: dict[str, Any]) -> bool:
        kind, meta = obj["kind"], obj["metadata"]
        labels = meta.get("labels") or {}
        model = model_of(labels)
        indexed = kind in INDEXED_KINDS and model is not None and labels.get(MANAGED_BY_LABEL) == MANAGER
        if not indexed or model is None:
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
                (o for o in self._live(kind, meta["namespace"], model) if o["metadata"]["name"] == meta["name"]),
                None,
            )
        if live is not None and (kind in CREATE_ONLY_KINDS or is_subset(obj, live)):
            return False
        applied = self.kube.apply(obj)
        applied.get("metadata", {}).pop("managedFields", None)
        if indexed:
            self._applied.put((kind, meta["namespace"], meta["name"]), applied)
        verb = "Created" if live is None else "Updated"
        logger.info(
            "%s %s namespace=%s name=%s revision=%s", verb, kind, meta["namespace"], meta["name"],
            labels.get(REVISION_LABEL, "-"),
        )  # fmt: skip
        telemetry.APPLIES.labels(kind=kind).inc()
        return True

    def _router_drained(self, namespace: str, name: str, plan: Plan) -> bool:
        desired = plan.router_deployment
        if desired is None:
            return True
        live = self._router_deployment(namespace, name)
        drained = router_serves(desired, live, self._router_observation(namespace, name,
                                                                        self.live.owned("Pod", namespace, name)).pods)
        dropped = sorted({rev for d in self._live("Deployment", namespace, name)
                          if (rev := (d["metadata"].get("labels") or {}).get(REVISION_LABEL))
                          and rev not in plan.traffic.keep})  # fmt: skip
        if not drained and dropped:
            logger.info("Keeping revisions until the router serves the new plan namespace=%s name=%s revisions=%s",
                        namespace, name, ",".join(dropped))
        return drained

    def _delete_routers(self, ctx: Context, plan: Plan) -> int:
        """Router objects the plan does not name go: a switch back to immediate, or to another routing provider.

        The builtin router's objects are in the watch caches. An HTTPRoute is not watched (its CRD may be absent),
        so a model that ran a progressive rollout (status.canary) is asked to drop it once per operator run."""
        namespace, name, uid = ctx.ids.namespace, ctx.ids.name, ctx.ids.uid
        wanted = {(o["kind"], o["metadata"]["name"]) for o in plan.router_objects}
        deleted = 0
        for kind in ROUTER_KINDS:
            for obj in self._live(kind, namespace, name):
                meta = obj["metadata"]
                if is_router(meta.get("labels") or {}) and (kind, meta["name"]) not in wanted:
                    deleted += self._delete(kind, namespace, obj)
        if ("HTTPRoute", router_name(name)) in wanted:
            self._routes_dropped.discard(uid)
        elif ctx.status.get("canary") and uid not in self._routes_dropped:
            self._routes_dropped.add(uid)
            if self.kube.delete("HTTPRoute", namespace, router_name(name)):
                logger.info("Deleted HTTPRoute namespace=%s name=%s", namespace, router_name(name))
                deleted += 1
        return deleted

    def _sweep_per_model_monitors(self, namespace: str) -> int:
        """Once per namespace and process: delete the per-model ServiceMonitors of earlier versions (the namespace's
        one replaces them; both would scrape every revision twice and double every rate the rollouts compare)."""
        if namespace in self._monitors_swept or not self.servicemonitor_supported():
            return 0
        selector = ",".join(f"{k}={v}" for k, v in REVISION_SERVICE_LABELS.items())
        deleted = 0
        for monitor in self.kube.list_objects(RESOURCES["ServiceMonitor"], namespace, selector):
            if is_per_model_servicemonitor(monitor):
                meta = monitor["metadata"]
                if self.kube.delete("ServiceMonitor", namespace, meta["name"], meta.get("uid")):
                    logger.info("Deleted ServiceMonitor namespace=%s name=%s (per model, replaced by %s)",
                                namespace, meta["name"], REVISIONS_SERVICEMONITOR)  # fmt: skip
                    deleted += 1
        self._monitors_swept.add(namespace)
        return deleted

    def _delete_outside(self, namespace: str, name: str, keep: frozenset[str]) -> int:
        deleted = 0
        for kind in REVISIONED_KINDS:
            for obj in self._live(kind, namespace, name):
                rev = (obj["metadata"].get("labels") or {}).get(REVISION_LABEL)
                if rev is not None and rev not in keep:
                    deleted += self._delete(kind, namespace, obj)
        return deleted

    def _delete(self, kind: str, namespace: str, obj: Mapping[str, Any]) -> int:
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return 0
        deleted = self.kube.delete(kind, namespace, meta["name"], meta.get("uid"))
        if deleted:
            revision = (meta.get("labels") or {}).get(REVISION_LABEL, "-")
            logger.info("Deleted %s namespace=%s name=%s revision=%s", kind, namespace, meta["name"], revision)
        self._applied.pop((kind, namespace, meta["name"]))
        return int(deleted)

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


def _generation(body: Mapping[str, Any]) -> int:
    return int((body.get("metadata") or {}).get("generation") or 0)


def _timestamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


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
    for type_, reason, message in transition_events(old, new):
        post(type_, reason, message)


def transition_events(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """The Events a status write announces: a Warning for each condition that turned bad (a failed build, an
    invalid spec, no GPU, Degraded, metrics gone: each is something to act on), and at most one Normal event for
    the healthy transitions of the same write (a model coming up turns Ready, ModelRepositoryReady and Progressing
    at once: one Event, led by Ready's reason, instead of one per condition — Events are API writes, and at fleet
    scale they were a third of the operator's). "Not yet" conditions and reason-only changes of healthy states are
    noise and post nothing."""
    before = {x.get("type"): x for x in old}
    warnings: list[tuple[str, str, str]] = []
    healthy: list[Mapping[str, Any]] = []
    for cond in new:
        prev = before.get(cond["type"])
        if prev is not None and prev.get("reason") == cond["reason"] and prev.get("status") == cond["status"]:
            continue
        bad = (cond["type"] == c.DEGRADED and cond["status"] == "True") or (
            cond["type"] == c.METRICS_AVAILABLE and cond["status"] == "False"
        ) or (
            cond["type"] in (c.READY, c.MODEL_REPOSITORY_READY) and cond["status"] == "False"
            and cond["reason"] in (c.BUILD_FAILED, c.FETCH_FAILED, c.INVALID_SPEC, c.INSUFFICIENT_GPU, c.UNSCHEDULABLE)
        )  # fmt: skip
        if bad:
            warnings.append(("Warning", cond["reason"], f"{cond['type']}={cond['status']}: {cond['message']}"))
        elif cond["status"] == "True" if prev is None else prev.get("status") != cond["status"]:
            healthy.append(cond)
    if not healthy:
        return warnings
    lead = next((x for x in healthy if x["type"] == c.READY), healthy[0])
    ordered = [lead, *(x for x in healthy if x is not lead)]
    message = "; ".join(f"{x['type']}={x['status']}: {x['message']}" for x in ordered)
    return [*warnings, ("Normal", lead["reason"], message)]
