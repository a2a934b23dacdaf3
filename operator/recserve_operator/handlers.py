"""Kopf registrations only: watch caches (indices), and every trigger funnels into one reconcile()."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from recserve_operator import telemetry
from recserve_operator.kube import Kube
from recserve_operator.names import MANAGED_BY_LABEL, MANAGER, model_of
from recserve_operator.reconcile import Reconciler
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import GROUP, PLURAL, VERSION

logger = logging.getLogger("recserve.handlers")
MODEL = (GROUP, VERSION, PLURAL)
OWNED = {MANAGED_BY_LABEL: MANAGER}
COMPONENT = "recserve-operator"

# The operator process has one reconciler; Kopf's indices are attached on the first handler call.
_reconciler: Reconciler | None = None
_indices: IndexedLive | None = None


class IndexedLive:
    """LiveState over Kopf indices: reconciles read watch caches, never list the API."""

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
        self.models: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["recserve_models"]

    def owned(self, kind: str, namespace: str, instance: str) -> list[dict[str, Any]]:
        index = self.indices[kind]
        key = (namespace, instance)
        return list(index[key]) if key in index else []

    def model(self, namespace: str, name: str) -> dict[str, Any] | None:
        key = (namespace, name)
        return next(iter(self.models[key]), None) if key in self.models else None


def _plain(
    body: Mapping[str, Any], *, keys: tuple[str, ...] = ("apiVersion", "kind", "metadata", "spec", "status")
) -> dict[str, Any]:
    obj = {k: copy.deepcopy(body[k]) for k in keys if k in body}
    if "metadata" in obj:
        # managedFields are large and never read: keep the caches small (memory with hundreds of models).
        obj["metadata"].pop("managedFields", None)
        obj["metadata"].get("annotations", {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return obj


def _owned_key(namespace: str | None, labels: Mapping[str, str]) -> tuple[str, str] | None:
    """Owned objects are indexed under their model (names.model_of), the router's objects included."""
    model = model_of(labels)
    return (namespace, model) if namespace and model else None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _reconciler
    defaults = OperatorDefaults.from_env()
    # Progress in status (not annotations) and our own diffbase key: nothing is written at steady state.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(
        field="status.kopf.progress", touch_field="status.kopf.dummy"
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="recserve.dev", key="last-handled-configuration"
    )
    # Events are posted by the reconciler itself (it also runs outside Kopf's handler contexts).
    settings.posting.level = logging.WARNING
    # Owned-object events arrive per pod status change; Kopf's per-handler success lines would drown our logs.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.peering.name = os.environ.get("RECSERVE_PEERING_NAME", "recserve")
    settings.peering.mandatory = False
    settings.execution.max_workers = int(os.environ.get("RECSERVE_WORKERS", "8"))
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    _reconciler = Reconciler(Kube.from_environment(), defaults, live=_EmptyLive())
    telemetry.serve(defaults.metrics_port)
    logger.info(
        "Operator configured env_namespaces=%s metrics_port=%s resync_seconds=%s",
        ",".join(defaults.watch_namespaces) or "*", defaults.metrics_port, defaults.resync_seconds,
    )  # fmt: skip


class _EmptyLive:
    def owned(self, kind: str, namespace: str, instance: str) -> list[dict[str, Any]]:
        return []


def _attach(kwargs: Mapping[str, Any]) -> Reconciler:
    global _indices
    assert _reconciler is not None, "startup handler did not run"
    if _indices is None:
        _indices = IndexedLive(kwargs)
        _reconciler.live = _indices
    return _reconciler


# Failures of the API round trip (server errors, timeouts, connection resets) heal at the next trigger or resync;
# they are logged in one line. Anything else is a bug and keeps its traceback.
NETWORK_ERRORS = (urllib3.exceptions.HTTPError, OSError)


def _transient(exc: Exception) -> bool:
    if isinstance(exc, ApiException):
        return exc.status in (409, 429) or (exc.status or 0) >= 500
    return isinstance(exc, NETWORK_ERRORS)


def _run(body: Mapping[str, Any]) -> dict[str, int]:
    assert _reconciler is not None
    rec = _reconciler
    model = _plain(body)

    def post(type_: str, reason: str, message: str) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        rec.kube.post_event(model, type_, reason, message, now=now, component=COMPONENT)

    return rec.reconcile(model, post)


# -- watch caches ------------------------------------------------------------------------------------------------


@kopf.index(*MODEL)
def recserve_models(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> Any:
    return {(namespace, name): _plain(body)}


@kopf.index("apps", "v1", "deployments", labels=OWNED)
def recserve_deployments(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> Any:
    key = _owned_key(namespace, labels)
    return {key: _plain(body)} if key else None


@kopf.index("", "v1", "pods", labels=OWNED)
def recserve_pods(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> Any:
    key = _owned_key(namespace, labels)
    if key is None:
        return None
    status = body.get("status") or {}
    slim = {
        "metadata": {k: copy.deepcopy(body["metadata"].get(k)) for k in ("name", "labels", "deletionTimestamp")},
        "status": {
            k: copy.deepcopy(status.get(k))
            for k in ("phase", "conditions", "initContainerStatuses", "containerStatuses")
        },
    }
    return {key: slim}


@kopf.index("", "v1", "services", labels=OWNED)
def recserve_services(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> Any:
    key = _owned_key(namespace, labels)
    return {key: _plain(body)} if key else None


@kopf.index("", "v1", "configmaps", labels=OWNED)
def recserve_configmaps(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> Any:
    key = _owned_key(namespace, labels)
    return {key: _plain(body, keys=("apiVersion", "kind", "metadata", "data"))} if key else None


@kopf.index("policy", "v1", "poddisruptionbudgets", labels=OWNED)
def recserve_pdbs(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> Any:
    key = _owned_key(namespace, labels)
    return {key: _plain(body)} if key else None


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=OWNED)
def recserve_hpas(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> Any:
    key = _owned_key(namespace, labels)
    return {key: _plain(body)} if key else None


@kopf.index("batch", "v1", "jobs", labels=OWNED)
def recserve_jobs(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> Any:
    key = _owned_key(namespace, labels)
    return {key: _plain(body)} if key else None


# -- triggers -----------------------------------------------------------------------------------------------------


@kopf.on.resume(*MODEL)
@kopf.on.create(*MODEL)
@kopf.on.update(*MODEL)
def reconcile_model(body: kopf.Body, **kwargs: Any) -> None:
    _attach(kwargs)
    try:
        _run(body)
    except (ApiException, *NETWORK_ERRORS) as exc:
        if not _transient(exc):
            raise
        raise kopf.TemporaryError(f"API request failed, retrying: {exc}", delay=5) from exc


@kopf.on.event(*MODEL)
def model_event(event: kopf.RawEvent, body: kopf.Body, **kwargs: Any) -> None:
    rec = _attach(kwargs)
    if event.get("type") == "DELETED":
        # Children go with garbage collection (owner references); only forget our memory of the model.
        rec.forget(body["metadata"]["namespace"], body["metadata"]["name"], body["metadata"].get("uid"))


def _owner_changed(event: kopf.RawEvent, namespace: str | None, labels: kopf.Labels, kwargs: Mapping[str, Any]) -> None:
    _attach(kwargs)
    assert _indices is not None
    key = _owned_key(namespace, labels)
    if key is None:
        return
    # A router pod that finished rolling is its model's event too: the model may now drain the revisions the old
    # plan named.
    model = _indices.model(*key)
    if model is not None and not model["metadata"].get("deletionTimestamp"):
        try:
            _run(model)
        except (ApiException, *NETWORK_ERRORS) as exc:
            if not _transient(exc):
                raise
            logger.warning("Reconcile failed, retrying at resync namespace=%s name=%s error=%s", *key, exc)


@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
def deployment_event(event: kopf.RawEvent, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    # Deployment status drives readiness and promotion; react now rather than at the next resync.
    if event.get("type") is not None:
        _owner_changed(event, namespace, labels, kwargs)


@kopf.on.event("", "v1", "pods", labels=OWNED)
def pod_event(event: kopf.RawEvent, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    # Pods carry what Deployments hide: PodScheduled=False (InsufficientGPU) and init container failures.
    if event.get("type") is not None:
        _owner_changed(event, namespace, labels, kwargs)


@kopf.on.event("batch", "v1", "jobs", labels=OWNED)
def job_event(event: kopf.RawEvent, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    # A build finished (or failed): create the revision's Deployment, or report why not, now.
    if event.get("type") is not None:
        _owner_changed(event, namespace, labels, kwargs)


@kopf.on.event("", "v1", "services", labels=OWNED)
@kopf.on.event("", "v1", "configmaps", labels=OWNED)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=OWNED)
@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", labels=OWNED)
def owned_event(event: kopf.RawEvent, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    # Someone deleted or edited an owned object: correct the drift now.
    if event.get("type") in ("DELETED", "MODIFIED"):
        _owner_changed(event, namespace, labels, kwargs)


@kopf.on.startup()
async def start_resync(memo: kopf.Memo, **_: Any) -> None:
    memo["resync"] = asyncio.create_task(_resync_loop())


@kopf.on.cleanup()
async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("resync")
    if task is not None:
        task.cancel()


async def _resync_loop() -> None:
    """Periodic level-based pass over every model (no finalizer, unlike Kopf timers): drift, readiness, rollouts."""
    assert _reconciler is not None
    interval = _reconciler.defaults.resync_seconds
    while True:
        await asyncio.sleep(interval)
        if _indices is None:
            continue
        for key in list(_indices.models):
            model = _indices.model(*key)
            if model is None or model["metadata"].get("deletionTimestamp"):
                continue
            try:
                await asyncio.to_thread(_run, model)
            except (ApiException, *NETWORK_ERRORS) as exc:
                if _transient(exc):
                    logger.warning("Resync failed namespace=%s name=%s error=%s", *key, exc)
                else:
                    logger.exception("Resync failed namespace=%s name=%s", *key)
            except Exception:  # one broken model must not stop the others' resync
                logger.exception("Resync failed namespace=%s name=%s", *key)


@kopf.on.probe(id="reconciles")
def reconciles_probe(**_: Any) -> float:
    return float(telemetry.RECONCILES._value.get())


@kopf.on.probe(id="host")
def host_probe(**_: Any) -> str:
    return socket.gethostname()
