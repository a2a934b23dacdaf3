"""Identity and owner references shared by all builders (names and labels come from recserve_operator.names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recserve_operator import names
from recserve_operator.spec import API_VERSION, KIND

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
        return names.revision_name(self.name, self.revision)

    def at(self, revision: str) -> Ids:
        """The same model's identity for another of its revisions."""
        return Ids(name=self.name, namespace=self.namespace, uid=self.uid, revision=revision)


def instance_labels(ids: Ids) -> dict[str, str]:
    return names.instance_labels(ids.name)


def revision_selector(ids: Ids) -> dict[str, str]:
    return names.revision_selector(ids.name, ids.revision)


def labels(ids: Ids, *, revision: bool = True) -> dict[str, str]:
    base = revision_selector(ids) if revision else instance_labels(ids)
    return {**base, names.MANAGED_BY_LABEL: names.MANAGER}


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
