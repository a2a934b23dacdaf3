"""The names, labels and annotations of every object RecServe owns: one definition each, no re-spelling.

An owned object belongs to its RecommenderModel through `model_of(labels)`: the watch caches are keyed by it, so a
reconcile sees (and an edit or a deletion triggers) every object of its model, the router's included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
REVISION_LABEL = "recserve.dev/revision"
# The model an object serves where its instance label names something else (the router's objects, whose selector
# was fixed with instance=<model>-router and cannot change on a live Deployment).
MODEL_LABEL = "recserve.dev/model"
# The label the ServiceMonitor gives every scraped series for the pod's REVISION_LABEL; rollout queries,
# the Grafana dashboard and the adapter rule select by it.
SERIES_REVISION_LABEL = "revision"
# The one ServiceMonitor per namespace that scrapes every revision Service of every model there. No model owns it
# (no owner reference, no instance label); the operator deletes it with the namespace's last model.
REVISIONS_SERVICEMONITOR = "recserve-revisions"

LABEL_VALUE_MAX = 63  # Kubernetes label values, and the names that become one

APP_NAME = "recserve-triton"
ROUTER_APP_NAME = "recserve-router"
PREDICTOR = "predictor"
ROUTER = "router"
BUILDER = "builder"  # a revision's build Job and its pod
MANAGER = "recserve"

CONFIG_CHECKSUM_ANNOTATION = "recserve.dev/config-checksum"
MODEL_VERSION_ANNOTATION = "recserve.dev/model-version"
ROUTER_CONFIG_HASH_ANNOTATION = "recserve.dev/router-config-hash"
STICKY_HEADER_ANNOTATION = "recserve.dev/sticky-header"
# Manual rollout control (promote | abort | pause | resume), written by users and `kubectl recserve`.
ROLLOUT_ACTION_ANNOTATION = "recserve.dev/rollout-action"

# The container that builds a revision's model repository: the init container of every serving pod, or, with a
# model store, the one container of the revision's build Job (its log is `kubectl recserve build-log`).
BUILDER_CONTAINER = "model-repo-builder"
# With spec.serving.tuning, the build Job's builder is its init container; then a Triton sidecar serves the built
# engine and this container measures it, writes the chosen configuration and publishes the artifact.
TUNER_CONTAINER = "tune"
# With a model store: the serving pods' init container that fetches and verifies the built artifact.
FETCH_CONTAINER = "fetch-artifact"
# On a serving pod template: the artifact it fetches (its digest is what the build reported).
ARTIFACT_KEY_ANNOTATION = "recserve.dev/artifact-key"
ARTIFACT_DIGEST_ANNOTATION = "recserve.dev/artifact-digest"


def revision_name(model: str, revision: str) -> str:
    """Name of a revision's Deployment, Service, ConfigMap, PodDisruptionBudget and HorizontalPodAutoscaler."""
    return f"{model}-{revision}"


def build_job_name(model: str, revision: str) -> str:
    """The revision's build Job: one per revision (the revision includes the GPU product), so two builds of one
    revision cannot run at once. The Job controller labels its pods job-name=<name>, so the name is a label value
    (63 characters at most): model names over 46 are cut, and a digest of the whole name keeps them distinct."""
    name = f"{revision_name(model, revision)}-build"
    if len(name) <= LABEL_VALUE_MAX:
        return name
    suffix = f"-{hashlib.sha256(model.encode()).hexdigest()[:6]}-{revision}-build"
    return f"{model[: LABEL_VALUE_MAX - len(suffix)]}{suffix}"


def router_name(model: str) -> str:
    """Name of a model's router objects (HTTPRoute, or the builtin nginx ConfigMap, Deployment and Service)."""
    return f"{model}-router"


def instance_labels(model: str) -> dict[str, str]:
    """The small stable label set selecting every predictor pod of one RecommenderModel (never user labels)."""
    return {NAME_LABEL: APP_NAME, INSTANCE_LABEL: model, COMPONENT_LABEL: PREDICTOR}


def revision_selector(model: str, revision: str) -> dict[str, str]:
    return {**instance_labels(model), REVISION_LABEL: revision}


def build_labels(model: str, revision: str) -> dict[str, str]:
    """A build Job and its pod: the revision's labels with component builder (the Deployment never selects it)."""
    return {NAME_LABEL: APP_NAME, INSTANCE_LABEL: model, COMPONENT_LABEL: BUILDER, REVISION_LABEL: revision,
            MANAGED_BY_LABEL: MANAGER}  # fmt: skip


def is_predictor(labels: Mapping[str, str]) -> bool:
    """A serving pod (component predictor; pods created before components were told apart carry none)."""
    return labels.get(COMPONENT_LABEL, PREDICTOR) == PREDICTOR


def router_selector(model: str) -> dict[str, str]:
    """The builtin router's pod selector (immutable on a live Deployment: it never changes)."""
    return {NAME_LABEL: ROUTER_APP_NAME, INSTANCE_LABEL: router_name(model), COMPONENT_LABEL: ROUTER}


def router_labels(model: str) -> dict[str, str]:
    return {**router_selector(model), MANAGED_BY_LABEL: MANAGER, MODEL_LABEL: model}


def model_of(labels: Mapping[str, str]) -> str | None:
    """The RecommenderModel an owned object belongs to (None: not one of ours)."""
    return labels.get(MODEL_LABEL) or labels.get(INSTANCE_LABEL)


def is_router(labels: Mapping[str, str]) -> bool:
    return labels.get(COMPONENT_LABEL) == ROUTER
