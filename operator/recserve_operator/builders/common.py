"""Identity, names, labels and owner references shared by all builders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recserve_operator.spec import API_VERSION, KIND

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
REVISION_LABEL = "recserve.dev/revision"
# The label the ServiceMonitor gives every scraped series for the pod's REVISION_LABEL; rollout queries,
# the Grafana dashboard and the adapter rule select by it.
SERIES_REVISION_LABEL = "revision"
APP_NAME = "recserve-triton"
MANAGER = "recserve"
CONFIG_CHECKSUM_ANNOTATION = "recserve.dev/config-checksum"
MODEL_VERSION_ANNOTATION = "recserve.dev/model-version"
# The init container that builds a revision's model repository (its log is `kubectl recserve build-log`).
BUILDER_CONTAINER = "model-repo-builder"

HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002


@dataclass(frozen=True)
class Ids:
    """Who owns the objects and which revision they belong to."""

    name: str
    namespace: str
    uid: str
    revision: str

    @property
    def revision_name(self) -> str:
        """Name of the per-revision Deployment, Service, ConfigMap, PDB and HPA."""
        return f"{self.name}-{self.revision}"


def instance_labels(ids: Ids) -> dict[str, str]:
    """The small stable label set selecting every pod of one RecommenderModel (never user labels)."""
    return {NAME_LABEL: APP_NAME, INSTANCE_LABEL: ids.name, COMPONENT_LABEL: "predictor"}


def revision_selector(ids: Ids) -> dict[str, str]:
    return {**instance_labels(ids), REVISION_LABEL: ids.revision}


def labels(ids: Ids, *, revision: bool = True) -> dict[str, str]:
    base = revision_selector(ids) if revision else instance_labels(ids)
    return {**base, MANAGED_BY_LABEL: MANAGER}


def owner_reference(ids: Ids) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ids.name,
        "uid": ids.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(ids: Ids, name: str, *, revision: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ids.namespace,
        "labels": labels(ids, revision=revision),
        "ownerReferences": [owner_reference(ids)],
    }
