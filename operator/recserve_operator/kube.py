"""Thin generic Kubernetes REST client: server-side apply, get, delete, status patch, with request counters."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from recserve_operator import telemetry

FIELD_MANAGER = "recserve"
logger = logging.getLogger("recserve.kube")
# Requests that change an object the operator manages (or post an Event): fenced by leader election.
WRITE_VERBS = frozenset(("apply", "delete", "patch-status", "patch", "event"))


class NotLeading(Exception):
    """A write was refused because this replica does not (or no longer) hold the leader lease."""


@dataclass(frozen=True)
class Resource:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None) -> str:
        group_path = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        ns = f"/namespaces/{namespace}" if self.namespaced and namespace else ""
        return f"{group_path}{ns}/{self.plural}" + (f"/{name}" if name else "")


RESOURCES: dict[str, Resource] = {
    r.kind: r
    for r in (
        Resource("v1", "ConfigMap", "configmaps"),
        Resource("v1", "Service", "services"),
        Resource("v1", "Pod", "pods"),
        Resource("v1", "Secret", "secrets"),
        Resource("apps/v1", "Deployment", "deployments"),
        Resource("batch/v1", "Job", "jobs"),
        Resource("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
        Resource("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
        Resource("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors"),
        Resource("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes"),
        Resource("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", namespaced=False),
        Resource("recserve.dev/v1alpha1", "RecommenderModel", "recommendermodels"),
    )
}


def resource_of(obj: dict[str, Any]) -> Resource:
    return RESOURCES[obj["kind"]]


class Kube:
    """Every API request the reconciler makes goes through here, so it can be counted and kept minimal."""

    def __init__(self, api_client: kubernetes.client.ApiClient, *, write_log: Path | None = None,
                 identity: str = "") -> None:  # fmt: skip
        self._api = api_client
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        # The write fence: None (no election) or a callable saying whether this replica may write now.
        self.may_write: Callable[[], bool] | None = None
        # RECSERVE_WRITE_LOG: one JSON line per write (time, verb, path, identity), for the takeover checks.
        self._write_log, self._identity = write_log, identity

    @classmethod
    def from_environment(cls, pool_size: int = 16, identity: str = "") -> Kube:
        """Kubeconfig or in-cluster credentials; `pool_size` connections kept to the API server (every worker
        thread and the lease loop may hold one at once: urllib3 blocks or discards beyond the pool's size)."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        write_log = os.environ.get("RECSERVE_WRITE_LOG")
        return cls(kubernetes.client.ApiClient(configuration), write_log=Path(write_log) if write_log else None,
                   identity=identity)  # fmt: skip

    def _auth_headers(self) -> dict[str, str]:
        # auth_settings() runs the kubeconfig's token refresh hook (exec plugins, projected tokens).
        headers: dict[str, str] = {}
        for setting in self._api.configuration.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                headers[setting["key"]] = setting["value"]
        return headers

    def _request(
        self, verb: str, method: str, path: str, *, body: Any = None, content_type: str | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> Any:  # fmt: skip
        """One HTTP call on the client's urllib3 pool (TLS and auth from the kubeconfig), stable across versions."""
        write = verb in WRITE_VERBS
        if write and self.may_write is not None and not self.may_write():
            raise NotLeading(f"{method} {path}: this replica does not hold the leader lease")
        with self._lock:
            self.requests[verb] += 1
        telemetry.API_REQUESTS.labels(verb=verb).inc()
        headers = {"Accept": "application/json", "User-Agent": "recserve-operator", **self._auth_headers()}
        payload = None
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
            payload = json.dumps(body).encode()
        url = self._api.configuration.host + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        response = self._api.rest_client.pool_manager.request(
            method, url, body=payload, headers=headers, timeout=urllib3.Timeout(total=30), retries=False
        )
        if write and self._write_log is not None:
            self._record_write(verb, path, response.status)
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=f"{method} {path}: {response.data[:500]!r}")
        return json.loads(response.data) if response.data else None

    def _record_write(self, verb: str, path: str, status: int) -> None:
        assert self._write_log is not None
        line = json.dumps({"t": time.time(), "verb": verb, "path": path, "status": status, "by": self._identity})
        with self._lock, self._write_log.open("a") as out:
            out.write(line + "\n")

    def get(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._request("get", "GET", resource.path(namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def list_objects(
        self, resource: Resource, namespace: str, label_selector: str = "", *, field_selector: str = "",
        limit: int = 0,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """The objects of one kind in a namespace (or cluster-wide: "") matching the selectors, at most `limit`
        (0: all) of them (one request: kinds nothing watches, or a fresh answer the caches cannot give)."""
        query = [(k, v) for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector),
                                     ("limit", str(limit) if limit else "")) if v]  # fmt: skip
        try:
            result = self._request("list", "GET", resource.path(namespace), query=query)
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise
        items: list[dict[str, Any]] = (result or {}).get("items") or []
        return items

    def exists(self, path: str) -> bool:
        """Whether an API path (e.g. a group version) is served: optional integrations probe this."""
        try:
            self._request("discovery", "GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply under one field manager; force takes over fields someone else edited (drift)."""
        resource = resource_of(obj)
        meta = obj["metadata"]
        result: dict[str, Any] = self._request(
            "apply", "PATCH", resource.path(meta.get("namespace"), meta["name"]), body=obj,
            content_type="application/apply-patch+yaml",
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
        )  # fmt: skip
        return result

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        resource = RESOURCES[kind]
        # The uid precondition makes a delete based on a stale cache harmless.
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._request(
                "delete", "DELETE", resource.path(namespace, name), body=body, content_type="application/json"
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        resource = RESOURCES["RecommenderModel"]
        try:
            result: dict[str, Any] = self._request(
                "patch-status", "PATCH", resource.path(namespace, name) + "/status", body={"status": status},
                content_type="application/merge-patch+json",
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:  # deleted meanwhile; nothing to report on
                return None
            raise
        return result

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> dict[str, Any] | None:
        """Merge-patch only a Deployment's spec.replicas (a revision whose spec the operator no longer builds, so
        applying a partial object would drop the fields it owns); None when the Deployment is gone."""
        resource = RESOURCES["Deployment"]
        try:
            result: dict[str, Any] = self._request(
                "patch", "PATCH", resource.path(namespace, name), body={"spec": {"replicas": replicas}},
                content_type="application/merge-patch+json", query=[("fieldManager", FIELD_MANAGER)],
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def patch_annotations(self, namespace: str, name: str, annotations: Mapping[str, str | None]) -> None:
        """Merge-patch annotations of a RecommenderModel (None removes one, e.g. a consumed rollout action)."""
        resource = RESOURCES["RecommenderModel"]
        try:
            self._request(
                "patch", "PATCH", resource.path(namespace, name), body={"metadata": {"annotations": dict(annotations)}},
                content_type="application/merge-patch+json",
            )  # fmt: skip
        except ApiException as exc:
            if exc.status != 404:
                raise

    def post_event(
        self, involved: Mapping[str, Any], type_: str, reason: str, message: str, *, now: str, component: str
    ) -> None:
        """A core/v1 Event on `involved`; failures are logged, never fatal (events are best effort)."""
        meta = involved["metadata"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", "recserve.dev/v1alpha1"),
                "kind": involved.get("kind", "RecommenderModel"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._request(
                "event", "POST", f"/api/v1/namespaces/{meta['namespace']}/events", body=event,
                content_type="application/json",
            )  # fmt: skip
        except ApiException as exc:
            logger.warning("Event not posted reason=%s status=%s", reason, exc.status)

    # -- leader election (coordination.k8s.io/v1 Lease): never fenced, never counted as the reconciler's writes --

    def _lease_path(self, namespace: str, name: str | None = None) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases" + (f"/{name}" if name else "")

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._request("lease-get", "GET", self._lease_path(namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def create_lease(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """None when another replica created it first (409)."""
        try:
            result: dict[str, Any] = self._request(
                "lease-create", "POST", self._lease_path(body["metadata"]["namespace"]), body=body
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise
        return result

    def replace_lease(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """An update guarded by the resourceVersion read: None when another replica wrote it meanwhile (409)."""
        meta = body["metadata"]
        try:
            result: dict[str, Any] = self._request(
                "lease-update", "PUT", self._lease_path(meta["namespace"], meta["name"]), body=body
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return None
            raise
        return result
