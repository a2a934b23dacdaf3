"""Kopf registrations: watch caches (indices) and triggers that only enqueue a model's key.

Design (controller-runtime's, on Kopf's watches):

- Kopf indices are the watch caches. Each holds a slim, serialized copy of what the reconciler reads (managedFields,
  the last-applied annotation and pod fields it never looks at are dropped; a value is compact JSON bytes, thawed
  on demand), so memory stays flat with thousands of models.
- Every event only enqueues the model key (namespace, name) into a deduplicating work queue (workqueue.py), and
  only when the event can change a decision: a model's spec, annotations, labels or deletion (not the status the
  operator wrote itself); an owned object that is not merely the echo of the operator's own last write and whose
  relevant content changed (a serving pod: what observe.py reads of it; a Deployment: its spec and replica counts).
- A fixed pool of worker threads reconciles queued keys from the caches; a key is never reconciled twice at once.
- The resync is a per-key schedule, not a loop: after each reconcile its key is queued again after
  `resync_seconds` (a strategy acting on time, or a reconcile that changed something) or `idle_resync_seconds`
  (an `immediate` model at rest: its changes arrive as events).
- The model's own create/update/resume goes through the same queue (Kopf's change handlers would write progress
  and a diff-base annotation to every model: extra writes, extra events, extra reconciles).
- With leader election (leader.py) every replica watches and queues, but only the lease holder's workers run, and
  every write is fenced by the lease (kube.NotLeading).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from recserve_operator import telemetry
from recserve_operator.crd_schema import CRD_NAME, CrdCheck, check_installed
from recserve_operator.kube import RESOURCES, Kube, NotLeading
from recserve_operator.leader import LeaderElector, Timing
from recserve_operator.names import MANAGED_BY_LABEL, MANAGER, is_predictor, model_of
from recserve_operator.observe import _pod_observation
from recserve_operator.reconcile import Reconciler
from recserve_operator.settings import OperatorDefaults, Runtime
from recserve_operator.spec import GROUP, PLURAL, VERSION
from recserve_operator.workqueue import Workers, WorkQueue

logger = logging.getLogger("recserve.handlers")
MODEL = (GROUP, VERSION, PLURAL)
OWNED = {MANAGED_BY_LABEL: MANAGER}
COMPONENT = "recserve-operator"
Key = tuple[str, str]

# Failures of the API round trip (server errors, timeouts, connection resets) heal at a retry; they are logged in
# one line. Anything else is a bug and keeps its traceback.
NETWORK_ERRORS = (urllib3.exceptions.HTTPError, OSError)


def _transient(exc: Exception) -> bool:
    if isinstance(exc, ApiException):
        return exc.status in (409, 429) or (exc.status or 0) >= 500
    return isinstance(exc, NETWORK_ERRORS)


# -- the caches' values ------------------------------------------------------------------------------------------


class Frozen:
    """One cached object as compact JSON bytes (a tenth of the memory of the parsed dicts); `thaw()` parses it."""

    __slots__ = ("raw",)

    def __init__(self, obj: Mapping[str, Any]) -> None:
        self.raw = json.dumps(obj, separators=(",", ":")).encode()

    def thaw(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.raw)
        return value

    def __eq__(self, other: object) -> bool:  # Kopf replaces an index value only when it differs
        return isinstance(other, Frozen) and self.raw == other.raw

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Frozen({len(self.raw)} bytes)"


DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
KEPT_METADATA = ("name", "namespace", "uid", "resourceVersion", "generation", "labels", "annotations",
                 "ownerReferences", "deletionTimestamp", "creationTimestamp")  # fmt: skip


# The values below share structure with the event's body: they are serialized (Frozen) right away, never mutated.


def _meta(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    out = {k: meta[k] for k in KEPT_METADATA if k in meta}
    annotations = out.get("annotations")
    if annotations and any(key in annotations for key in DROPPED_ANNOTATIONS):
        out["annotations"] = {k: v for k, v in annotations.items() if k not in DROPPED_ANNOTATIONS}
    return out


def _plain(body: Mapping[str, Any], keys: tuple[str, ...] = ("spec", "status")) -> dict[str, Any]:
    """What the reconciler reads of an object: identity, its metadata (no managedFields) and `keys`."""
    obj: dict[str, Any] = {k: body[k] for k in ("apiVersion", "kind") if k in body}
    obj["metadata"] = _meta(body)
    obj.update({k: body[k] for k in keys if k in body})
    return obj


POD_STATUS = ("phase", "conditions", "initContainerStatuses", "containerStatuses")


def _slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "deletionTimestamp", "uid") if k in meta},
        "status": {k: status[k] for k in POD_STATUS if k in status},
    }


# Volatile fields no decision reads: they change the cached value but do not trigger a reconcile.
_NOISE_TIMES = ("lastUpdateTime", "lastHeartbeatTime", "lastProbeTime")
_DEPLOYMENT_STATUS = ("observedGeneration", "replicas", "updatedReplicas", "readyReplicas", "availableReplicas")


def _trigger_digest(kind: str, obj: Mapping[str, Any]) -> int:
    """A fingerprint of what can change a decision about an owned object's model."""
    meta = dict(obj.get("metadata") or {})
    meta.pop("resourceVersion", None)
    if kind == "Pod":
        labels = meta.get("labels") or {}
        if is_predictor(labels):  # a serving pod: only what observe.py makes of it
            relevant: Any = [labels, bool(meta.get("deletionTimestamp")), _pod_observation(obj)]
        else:  # router and build pods: their states and termination messages
            relevant = [meta, _without_noise(obj.get("status") or {})]
    elif kind == "Deployment":
        status = obj.get("status") or {}
        relevant = [meta, obj.get("spec"), {k: status.get(k) for k in _DEPLOYMENT_STATUS}]
    elif kind in ("Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        relevant = [meta, obj.get("spec")]  # their status is the cluster's: nothing reads it
    else:
        relevant = [meta, _without_noise({k: v for k, v in obj.items() if k != "metadata"})]
    return hash(json.dumps(relevant, sort_keys=True, separators=(",", ":")))


def _without_noise(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_noise(v) for k, v in value.items() if k not in _NOISE_TIMES}
    if isinstance(value, list):
        return [_without_noise(v) for v in value]
    return value


def _model_signature(body: Mapping[str, Any]) -> int:
    """A model's own event matters when its spec (generation), annotations (rollout actions), labels or deletion
    changed; a status write (ours) does not."""
    meta = body.get("metadata") or {}
    relevant = [meta.get("uid"), meta.get("generation"), meta.get("annotations") or {}, meta.get("labels") or {},
                bool(meta.get("deletionTimestamp"))]  # fmt: skip
    return hash(json.dumps(relevant, sort_keys=True, separators=(",", ":")))


# -- the process: caches, queue, workers, election ---------------------------------------------------------------


class IndexedLive:
    """LiveState over Kopf indices: reconciles read watch caches, never list the API. Within `snapshot()` every
    object is thawed once per reconcile (the reconciler asks for the same kinds many times)."""

    INDEX_BY_KIND = {
        "Deployment": "recserve_deployments",
        "Pod": "recserve_pods",
        "Service": "recserve_services",
        "ConfigMap": "recserve_configmaps",
        "PodDisruptionBudget": "recserve_pdbs",
        "HorizontalPodAutoscaler": "recserve_hpas",
        "Job": "recserve_jobs",
    }

    def __init__(self, kwargs: Mapping[str, Any]) -> None:
        self.indices = {kind: kwargs[name] for kind, name in self.INDEX_BY_KIND.items()}
        self.models: kopf.Index[Key, Frozen] = kwargs["recserve_models"]
        self._local = threading.local()

    @staticmethod
    def _values(index: Any, key: Key) -> list[Any]:
        try:
            return list(index[key])  # one C-level copy: safe against the event loop updating the index
        except KeyError:
            return []

    def owned(self, kind: str, namespace: str, instance: str) -> list[dict[str, Any]]:
        memo: dict[tuple[str, str, str], list[dict[str, Any]]] | None = getattr(self._local, "memo", None)
        if memo is not None and (kind, namespace, instance) in memo:
            return memo[(kind, namespace, instance)]
        objs = [_thaw(v) for v in self._values(self.indices[kind], (namespace, instance))]
        if memo is not None:
            memo[(kind, namespace, instance)] = objs
        return objs

    def model(self, namespace: str, name: str) -> dict[str, Any] | None:
        value = next(iter(self._values(self.models, (namespace, name))), None)
        return _thaw(value) if value is not None else None

    def model_keys(self) -> list[Key]:
        return list(self.models)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        self._local.memo = {}
        try:
            yield
        finally:
            self._local.memo = None


def _thaw(value: Any) -> dict[str, Any]:
    return value.thaw() if isinstance(value, Frozen) else dict(value)


def crd_schema_check(kube: Kube) -> CrdCheck:
    """The installed RecommenderModel CRD against this operator's schema (a list by name: the operator may list
    and watch CRDs, never get them)."""
    items = kube.list_objects(RESOURCES["CustomResourceDefinition"], "", field_selector=f"metadata.name={CRD_NAME}")
    return check_installed(items[0] if items else None)


def watch_crd_schema(kube: Kube, stop: threading.Event, recheck_seconds: float) -> None:
    """Log (once per state) and export whether the installed CRD is current; look again every `recheck_seconds`
    until it is, then stop: one list at start on a current cluster."""
    last = None
    while True:
        try:
            result = crd_schema_check(kube)
        except (ApiException, *NETWORK_ERRORS) as exc:
            logger.warning("Could not check the RecommenderModel CRD, looking again in %.0fs error=%s",
                           recheck_seconds, exc)  # fmt: skip
        else:
            telemetry.CRD_SCHEMA_CURRENT.set(1 if result.current else 0)
            if result.reason != last:
                last = result.reason
                log = logger.info if result.current else logger.error
                log("CRD schema %s: %s", result.reason, result.message)
            if result.current:
                return
        if stop.wait(recheck_seconds):
            return


class _EmptyLive:
    def owned(self, kind: str, namespace: str, instance: str) -> list[dict[str, Any]]:
        return []


class Controller:
    """The operator process: one reconciler, the work queue and its workers, and leadership."""

    def __init__(self, defaults: OperatorDefaults, runtime: Runtime, kube: Kube) -> None:
        self.defaults, self.runtime = defaults, runtime
        self.reconciler = Reconciler(kube, defaults, live=_EmptyLive())
        self.live: IndexedLive | None = None
        self.queue: WorkQueue[Key] = WorkQueue(base_delay=1.0, max_delay=60.0)
        self.indexed = False  # Kopf runs event handlers only once every cache is listed
        self.leading = not runtime.leader_election
        self.gate = threading.Event()  # open while indexed and leading: workers reconcile
        self.workers: Workers[Key] = Workers(self.queue, self._process, runtime.workers, gate=self.gate)
        self.elector: LeaderElector | None = None
        self.seen: dict[str, int] = {}  # owned object uid -> trigger digest
        self.signatures: dict[Key, int] = {}  # model key -> signature
        # Triggers decided by an index handler, queued by the object's event handler: Kopf stores an index value
        # after its handler returns, and a worker must find the new value in the cache (uid -> key, trigger).
        self.pending: dict[str, tuple[Key, str, bool]] = {}
        telemetry.QUEUE_DEPTH.set_function(lambda: len(self.queue))
        if runtime.leader_election:
            timing = Timing(
                lease_duration=runtime.lease_duration_seconds,
                renew_deadline=runtime.renew_deadline_seconds,
                retry_period=runtime.retry_period_seconds,
                renew_interval=max(runtime.retry_period_seconds, runtime.lease_duration_seconds / 3),
            )
            self.elector = LeaderElector(kube, runtime.lease_namespace, runtime.lease_name, runtime.identity,
                                         timing=timing, on_started=self._started_leading,
                                         on_stopped=self._stopped_leading)  # fmt: skip
            kube.may_write = self.elector.is_leading
        telemetry.LEADER.set(0 if runtime.leader_election else 1)

    # -- wiring -----------------------------------------------------------------------------------------------

    def attach(self, kwargs: Mapping[str, Any]) -> IndexedLive:
        if self.live is None:
            self.live = IndexedLive(kwargs)
            self.reconciler.live = self.live
        return self.live

    def mark_indexed(self) -> None:
        if not self.indexed:
            self.indexed = True
            logger.info("Watch caches listed; models queued=%s", len(self.queue))
            self._update_gate()

    def _update_gate(self) -> None:
        if self.indexed and self.leading:
            self.gate.set()
        else:
            self.gate.clear()

    def _started_leading(self) -> None:
        self.leading = True
        telemetry.LEADER.set(1)
        if self.live is not None:
            for key in self.live.model_keys():
                self.enqueue(key, "leader")
        self._update_gate()
        self._sweep_in_background()

    def _sweep_in_background(self) -> None:
        threading.Thread(target=self._sweep_orphans, name="sweep-orphans", daemon=True).start()

    def _sweep_orphans(self) -> None:
        """Once per start (or leadership): what a namespace's deleted last model left while no operator ran."""
        try:
            again = self.reconciler.sweep_orphaned_monitors(self.defaults.watch_namespaces)
        except NotLeading:
            return  # the leader sweeps
        except (ApiException, *NETWORK_ERRORS) as exc:
            logger.warning("Sweep of orphaned ServiceMonitors failed, the next start retries error=%s", exc)
            return
        for key in again:
            self.enqueue(key, "monitor", urgent=True)

    def _stopped_leading(self) -> None:
        self.leading = False
        telemetry.LEADER.set(0)
        self._update_gate()

    # -- triggers ---------------------------------------------------------------------------------------------

    def enqueue(self, key: Key, trigger: str, *, urgent: bool = False) -> None:
        telemetry.QUEUE_ADDS.labels(trigger=trigger).inc()
        self.queue.add(key, urgent=urgent)

    def flush(self, body: Mapping[str, Any]) -> None:
        """Queue what the index handler decided for this object, now that the caches hold its new state."""
        pending = self.pending.pop(str((body.get("metadata") or {}).get("uid") or ""), None)
        if pending is not None:
            key, trigger, urgent = pending
            self.enqueue(key, trigger, urgent=urgent)

    def model_seen(self, body: Mapping[str, Any], namespace: str, name: str) -> None:
        key = (namespace, name)
        signature = _model_signature(body)
        if self.signatures.get(key) != signature:
            self.signatures[key] = signature
            # A new model or a spec edit: before readiness updates.
            self.pending[str(body["metadata"].get("uid") or "")] = (key, "model", True)

    def model_gone(self, namespace: str, name: str, uid: str | None) -> None:
        key = (namespace, name)
        self.signatures.pop(key, None)
        self.pending.pop(uid or "", None)
        self.queue.discard(key)
        # Children go with garbage collection (owner references); only forget our memory of the model. A worker
        # then sees the key without a model and removes what the namespace no longer needs (_process).
        self.reconciler.forget(namespace, name, uid)
        self.enqueue(key, "deleted")

    def owned_seen(self, kind: str, body: Mapping[str, Any], slim: Mapping[str, Any], key: Key | None) -> None:
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        digest = _trigger_digest(kind, slim)
        before = self.seen.get(uid)
        self.seen[uid] = digest
        if key is None or before == digest:
            return
        if before is None and kind == "Pod" and digest == _trigger_digest(kind, _unobserved(slim)):
            return  # a new serving pod nothing is known of yet (pending): its first real state will tell
        if self.reconciler.is_own_write(kind, meta.get("namespace") or "", meta.get("name") or "",
                                        meta.get("resourceVersion")):  # fmt: skip
            return
        self.pending[uid] = (key, kind.lower(), False)

    def owned_gone(self, body: Mapping[str, Any], key: Key | None) -> None:
        uid = str((body.get("metadata") or {}).get("uid") or "")
        self.seen.pop(uid, None)
        self.pending.pop(uid, None)
        if key is not None:
            self.enqueue(key, "deleted")

    # -- work -------------------------------------------------------------------------------------------------

    def _resync_after(self, model: Mapping[str, Any], counts: Mapping[str, int]) -> float:
        strategy = ((model.get("spec") or {}).get("rollout") or {}).get("strategy") or "immediate"
        if strategy == "immediate" and not any(counts.values()):
            return max(self.runtime.idle_resync_seconds, self.defaults.resync_seconds)
        return self.defaults.resync_seconds

    def _process(self, key: Key, waited: float) -> None:
        telemetry.QUEUE_WAIT_SECONDS.observe(waited)
        live = self.live
        if live is None:
            return
        model = live.model(*key)
        if model is None:
            if key in self.signatures:  # seen, not in the cache (yet): look again rather than drop it
                self.queue.add_after(key, 1.0)
            else:  # deleted (model_gone forgot it): nothing to reconcile
                self._model_deleted(live, key)
            return
        if model["metadata"].get("deletionTimestamp"):
            return
        try:
            with live.snapshot():
                counts = run(self.reconciler, model)
        except NotLeading:
            return  # the next leader reconciles it
        except (ApiException, *NETWORK_ERRORS) as exc:
            delay = self.queue.add_rate_limited(key)
            if _transient(exc):
                logger.warning("Reconcile failed, retrying in %.0fs namespace=%s name=%s error=%s", delay, *key, exc)
            else:
                logger.exception("Reconcile failed, retrying in %.0fs namespace=%s name=%s", delay, *key)
            return
        except Exception:  # a bug with one model must not stop the others; it is retried with backoff
            delay = self.queue.add_rate_limited(key)
            logger.exception("Reconcile failed, retrying in %.0fs namespace=%s name=%s", delay, *key)
            return
        self.queue.forget(key)
        self.queue.add_after(key, self._resync_after(model, counts))

    def _model_deleted(self, live: IndexedLive, key: Key) -> None:
        namespace = key[0]
        if any(ns == namespace for ns, _ in live.model_keys()):
            return
        try:
            again = self.reconciler.namespace_emptied(namespace)
        except NotLeading:
            return
        except (ApiException, *NETWORK_ERRORS) as exc:
            delay = self.queue.add_rate_limited(key)
            logger.warning("Cleanup failed, retrying in %.0fs namespace=%s error=%s", delay, namespace, exc)
            return
        self.queue.forget(key)
        for model in again:  # created as the last one went: its ServiceMonitor back now, not at its next resync
            self.enqueue(model, "monitor", urgent=True)

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> asyncio.Task[None] | None:
        self.workers.start()
        if self.elector is None:
            self._update_gate()
            self._sweep_in_background()
            return None
        return asyncio.create_task(self.elector.run())

    async def stop(self) -> None:
        if self.elector is not None:
            # Stop taking keys, let in-flight reconciles finish, then hand the lease over (the standby takes it
            # at its next look instead of after the lease expires).
            await self.elector.release(drain=lambda: self.workers.wait_idle(20))
        self.gate.clear()
        await asyncio.to_thread(self.workers.stop, 20)


def _unobserved(slim: Mapping[str, Any]) -> dict[str, Any]:
    return {"metadata": slim.get("metadata") or {}, "status": {}}


def run(rec: Reconciler, model: dict[str, Any]) -> dict[str, int]:
    """One reconcile of a model as the caches show it; events go to the API as the operator's."""

    def post(type_: str, reason: str, message: str) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        rec.kube.post_event(model, type_, reason, message, now=now, component=COMPONENT)

    return rec.reconcile(model, post)


class NoDiffBase(kopf.DiffBaseStorage):
    """Kopf builds a diff base (a deep copy of the whole body, managedFields included) for every event of every
    watched object, for change handlers. There are none here: skip it."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


_controller: Controller | None = None


def _ctl() -> Controller:
    assert _controller is not None, "startup handler did not run"
    return _controller


def _owned_key(namespace: str | None, labels: Mapping[str, str]) -> Key | None:
    """Owned objects are indexed under their model (names.model_of), the router's objects included."""
    model = model_of(labels)
    return (namespace, model) if namespace and model else None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    global _controller
    defaults = OperatorDefaults.from_env()
    runtime = Runtime.from_env(watch_namespaces=defaults.watch_namespaces)
    # Kopf only watches: no change handlers, so it writes neither progress nor a diff-base to the models, and it
    # posts no events (the reconciler posts its own).
    settings.posting.enabled = False
    settings.persistence.diffbase_storage = NoDiffBase()
    # Owned-object events arrive per pod status change; Kopf's per-handler lines would drown our logs.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.execution.max_workers = 4  # only Kopf's own sync calls (the probes); reconciles use our workers
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    kube = Kube.from_environment(pool_size=runtime.workers + 4, identity=runtime.identity)
    memo["crd_stop"] = stop = threading.Event()
    threading.Thread(target=watch_crd_schema, args=(kube, stop, runtime.crd_recheck_seconds), name="crd-schema",
                     daemon=True).start()  # fmt: skip
    _controller = Controller(defaults, runtime, kube)
    memo["elector"] = await _controller.start()
    telemetry.serve(defaults.metrics_port)
    logger.info(
        "Operator configured env_namespaces=%s metrics_port=%s workers=%s resync_seconds=%s idle_resync_seconds=%s "
        "leader_election=%s identity=%s",
        ",".join(defaults.watch_namespaces) or "*", defaults.metrics_port, runtime.workers, defaults.resync_seconds,
        runtime.idle_resync_seconds, runtime.leader_election, runtime.identity,
    )  # fmt: skip


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    if "crd_stop" in memo:
        memo["crd_stop"].set()
    if _controller is not None:
        await _controller.stop()
    task = memo.get("elector")
    if task is not None:
        task.cancel()


# -- watch caches (and the triggers: an index handler sees every change of its kind) ---------------------------


@kopf.index(*MODEL)
async def recserve_models(body: kopf.Body, namespace: str | None, name: str, **kwargs: Any) -> Any:
    ctl = _ctl()
    ctl.attach(kwargs)
    value = Frozen(_plain(body))
    if namespace:
        ctl.model_seen(body, namespace, name)
    return {(namespace, name): value}


def _index_owned(kind: str, body: kopf.Body, namespace: str | None, labels: kopf.Labels, *,
                 kwargs: Mapping[str, Any], slim: Mapping[str, Any]) -> Any:  # fmt: skip
    ctl = _ctl()
    ctl.attach(kwargs)
    key = _owned_key(namespace, labels)
    ctl.owned_seen(kind, body, slim, key)
    return {key: Frozen(slim)} if key else None


@kopf.index("apps", "v1", "deployments", labels=OWNED)
async def recserve_deployments(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> Any:
    return _index_owned("Deployment", body, namespace, labels, kwargs=kwargs, slim=_plain(body))


@kopf.index("", "v1", "pods", labels=OWNED)
async def recserve_pods(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> Any:
    return _index_owned("Pod", body, namespace, labels, kwargs=kwargs, slim=_slim_pod(body))


@kopf.index("", "v1", "services", labels=OWNED)
async def recserve_services(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> Any:
    return _index_owned("Service", body, namespace, labels, kwargs=kwargs, slim=_plain(body, ("spec",)))


@kopf.index("", "v1", "configmaps", labels=OWNED)
async def recserve_configmaps(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> Any:
    return _index_owned("ConfigMap", body, namespace, labels, kwargs=kwargs, slim=_plain(body, ("data",)))


@kopf.index("policy", "v1", "poddisruptionbudgets", labels=OWNED)
async def recserve_pdbs(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> Any:
    return _index_owned("PodDisruptionBudget", body, namespace, labels, kwargs=kwargs, slim=_plain(body, ("spec",)))


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=OWNED)
async def recserve_hpas(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> Any:
    return _index_owned("HorizontalPodAutoscaler", body, namespace, labels, kwargs=kwargs, slim=_plain(body, ("spec",)))


@kopf.index("batch", "v1", "jobs", labels=OWNED)
async def recserve_jobs(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> Any:
    return _index_owned("Job", body, namespace, labels, kwargs=kwargs, slim=_plain(body))


# -- after indexing: queue the triggers, deletions (index handlers see no DELETED events), "every cache is listed" --


@kopf.on.event(*MODEL)
async def model_event(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **kwargs: Any) -> None:
    ctl = _ctl()
    ctl.attach(kwargs)
    ctl.mark_indexed()
    if event.get("type") == "DELETED" and namespace:
        ctl.model_gone(namespace, name, body["metadata"].get("uid"))
    else:
        ctl.flush(body)


@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
@kopf.on.event("", "v1", "pods", labels=OWNED)
@kopf.on.event("", "v1", "services", labels=OWNED)
@kopf.on.event("", "v1", "configmaps", labels=OWNED)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=OWNED)
@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", labels=OWNED)
@kopf.on.event("batch", "v1", "jobs", labels=OWNED)
async def owned_event(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, labels: kopf.Labels,
                      **kwargs: Any) -> None:  # fmt: skip
    # A change the index handler found relevant, now in the cache; or someone deleted an owned object (or the
    # model's revision went): correct it now, not at the next resync.
    ctl = _ctl()
    ctl.attach(kwargs)
    ctl.mark_indexed()
    if event.get("type") == "DELETED":
        ctl.owned_gone(body, _owned_key(namespace, labels))
    else:
        ctl.flush(body)


@kopf.on.probe(id="reconciles")
def reconciles_probe(**_: Any) -> float:
    return float(telemetry.RECONCILES._value.get())


@kopf.on.probe(id="host")
def host_probe(**_: Any) -> str:
    return socket.gethostname()


@kopf.on.probe(id="leader")
def leader_probe(**_: Any) -> bool:
    return bool(_controller is not None and _controller.leading)
