"""The plugin's only door to the API server: the user's kubeconfig and context, JSON in and out, and errors that
name what was refused (verb, resource, namespace) instead of a traceback."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "recserve.dev", "v1alpha1", "recommendermodels"
RESOURCE = f"{PLURAL}.{GROUP}"
DEFAULT_NAMESPACE = "default"


class CliError(Exception):
    """A failure to report as one `error: ...` line with exit code 1."""


class NotFound(CliError):
    pass


class Forbidden(CliError):
    pass


@dataclass(frozen=True)
class Target:
    """What a request was for, so an error can say so."""

    verb: str
    resource: str
    namespace: str | None
    name: str | None = None

    def describe(self) -> str:
        what = f'{self.resource} "{self.name}"' if self.name else self.resource
        where = f' in namespace "{self.namespace}"' if self.namespace else " in any namespace"
        return f"{what}{where}"


def _server_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


def translate(exc: ApiException, target: Target) -> CliError:
    if exc.status == 404:
        return NotFound(f"{target.describe()} not found")
    if exc.status == 403:
        return Forbidden(f"forbidden: cannot {target.verb} {target.describe()}: {_server_message(exc)}")
    if exc.status == 401:
        return CliError(f"unauthorized: the credentials of this kubeconfig were refused ({_server_message(exc)})")
    return CliError(f"cannot {target.verb} {target.describe()}: HTTP {exc.status}: {_server_message(exc)}")


class Api:
    """Typed Kubernetes clients behind a handful of calls; every ApiException becomes a CliError."""

    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._apps = kubernetes.client.AppsV1Api(api_client)

    @classmethod
    def connect(cls, kubeconfig: str | None, context: str | None, namespace: str | None) -> Api:
        """Load the kubeconfig (KUBECONFIG, ~/.kube/config or the file given) the way kubectl does."""
        try:
            contexts, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = next((c for c in contexts if c["name"] == context), None) if context else active
            if chosen is None:
                raise CliError(f'context "{context}" does not exist in the kubeconfig')
            client = kubernetes.config.new_client_from_config(config_file=kubeconfig, context=chosen["name"])
        except kubernetes.config.ConfigException as exc:
            raise CliError(f"cannot load the kubeconfig: {exc}") from None
        ns = namespace or (chosen.get("context") or {}).get("namespace") or DEFAULT_NAMESPACE
        return cls(client, ns)

    def _call(self, target: Target, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            response = fn(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            raise translate(exc, target) from None
        except kubernetes.client.exceptions.OpenApiException as exc:  # pragma: no cover - client-side checks
            raise CliError(f"cannot {target.verb} {target.describe()}: {exc}") from None
        except OSError as exc:  # urllib3's connection errors are OSErrors: the API server is unreachable
            raise CliError(f"cannot reach the API server: {exc}") from None
        return json.loads(response.data) if response.data else None

    def get_model(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        ns = namespace or self.namespace
        return dict(self._call(Target("get", RESOURCE, ns, name), self._custom.get_namespaced_custom_object,
                               GROUP, VERSION, ns, PLURAL, name))  # fmt: skip

    def list_models(self, all_namespaces: bool) -> list[dict[str, Any]]:
        if all_namespaces:
            result = self._call(Target("list", RESOURCE, None), self._custom.list_cluster_custom_object,
                                GROUP, VERSION, PLURAL)  # fmt: skip
        else:
            result = self._call(Target("list", RESOURCE, self.namespace), self._custom.list_namespaced_custom_object,
                                GROUP, VERSION, self.namespace, PLURAL)  # fmt: skip
        return list(result.get("items") or [])

    def annotate_model(self, name: str, annotations: Mapping[str, str | None]) -> dict[str, Any]:
        body = {"metadata": {"annotations": dict(annotations)}}
        target = Target("patch", RESOURCE, self.namespace, name)
        return dict(self._call(target, self._custom.patch_namespaced_custom_object,
                               GROUP, VERSION, self.namespace, PLURAL, name, body))  # fmt: skip

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        result = self._call(Target("list", "pods", namespace), self._core.list_namespaced_pod, namespace,
                            label_selector=selector)  # fmt: skip
        return list(result.get("items") or [])

    def list_deployments(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        result = self._call(Target("list", "deployments.apps", namespace), self._apps.list_namespaced_deployment,
                            namespace, label_selector=selector)  # fmt: skip
        return list(result.get("items") or [])

    def list_events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        selector = f"involvedObject.kind=RecommenderModel,involvedObject.name={name}"
        result = self._call(Target("list", "events", namespace), self._core.list_namespaced_event, namespace,
                            field_selector=selector)  # fmt: skip
        return list(result.get("items") or [])

    def pod_log(self, namespace: str, pod: str, container: str, *, previous: bool = False) -> str:
        target = Target("get", "pods/log", namespace, pod)
        try:
            response = self._core.read_namespaced_pod_log(
                pod, namespace, container=container, previous=previous, _preload_content=False
            )
        except ApiException as exc:
            raise translate(exc, target) from None
        except OSError as exc:
            raise CliError(f"cannot reach the API server: {exc}") from None
        return str(response.data.decode(errors="replace"))
