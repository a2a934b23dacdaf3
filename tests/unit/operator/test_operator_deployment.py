"""The revision pod: sources mounted from claims, store credentials for the builder only, Triton's flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from operator_samples import minimal_spec
from recserve_operator.builders.common import Ids
from recserve_operator.builders.configmap import CONFIG_KEY, build_configmap
from recserve_operator.builders.deployment import TRITON_CONTAINER, build_deployment
from recserve_operator.names import BUILDER_CONTAINER
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import parse_spec, revision_of

from model_repo_builder.cli import build_parser
from model_repo_builder.config import parse_pbtxt
from model_repo_builder.fetch import PVC_ROOT_ENV, resolve_pvc

DEFAULTS = OperatorDefaults(triton_image="nvcr.io/nvidia/tritonserver:25.10-py3", builder_image="recserve/builder:test")
CPU = {"instances": {"kind": "CPU"}, "resources": {"gpu": 0}}


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_spec(spec)
    ids = Ids(name="ctr-dnn", namespace="shop", uid="uid-1", revision=revision_of(parsed))
    pod: dict[str, Any] = build_deployment(parsed, ids, DEFAULTS)["spec"]["template"]["spec"]
    return pod


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod["initContainers"] + pod["containers"]
    return next(c for c in containers if c["name"] == name)


def _model(uri: str, **extra: Any) -> dict[str, Any]:
    return {"uri": uri, "format": "keras", "version": 3, **extra}


def _int8(model_uri: str, calibration_uri: str) -> dict[str, Any]:
    return minimal_spec(
        model=_model(model_uri),
        optimize={"precision": "int8", "calibration": {"uri": calibration_uri}},
        serving=CPU,
    )


@pytest.mark.parametrize(
    ("spec", "claims"),
    [
        (minimal_spec(), ["models"]),
        (minimal_spec(model=_model("s3://bucket/ctr-dnn/3/model.keras")), []),
        (_int8("https://models.example.com/ctr.keras", "pvc://calib/ctr/calibration.npz"), ["calib"]),
        (_int8("pvc://models/ctr/3/model.keras", "pvc://models/ctr/calibration.npz"), ["models"]),
        (_int8("pvc://models/ctr/3/model.keras", "pvc://calib.data/ctr/calibration.npz"), ["calib.data", "models"]),
    ],
    ids=[
        "a pvc model source mounts its claim",
        "an s3 model source mounts no claim",
        "a pvc calibration source mounts its claim beside an https model",
        "model and calibration on one claim mount it once",
        "model and calibration on two claims mount both in name order",
    ],
)
def test_pvc_sources_are_mounted_read_only_into_the_builder_only(spec: dict[str, Any], claims: list[str]) -> None:
    pod = _pod(spec)
    sources = [v for v in pod["volumes"] if v["name"].startswith("source-")]
    assert [v["persistentVolumeClaim"] for v in sources] == [{"claimName": c, "readOnly": True} for c in claims]
    builder, triton = _container(pod, BUILDER_CONTAINER), _container(pod, TRITON_CONTAINER)
    mounts = {m["name"]: m for m in builder["volumeMounts"]}
    assert [mounts[v["name"]]["mountPath"] for v in sources] == [f"/sources/{c}" for c in claims]
    assert all(mounts[v["name"]]["readOnly"] for v in sources)
    assert not [m for m in triton["volumeMounts"] if m["name"].startswith("source-")]
    env = {e["name"]: e["value"] for e in builder["env"]}
    assert env.get(PVC_ROOT_ENV) == ("/sources" if claims else None)


@pytest.mark.parametrize(
    "spec",
    [minimal_spec(), _int8("pvc://models/ctr/3/model.keras", "pvc://calib/ctr/calibration.npz")],
    ids=["the model", "the model and its calibration data"],
)
def test_the_builder_resolves_each_pvc_uri_it_is_given_inside_a_mounted_claim(spec: dict[str, Any]) -> None:
    builder = _container(_pod(spec), BUILDER_CONTAINER)
    root = {e["name"]: e["value"] for e in builder["env"]}[PVC_ROOT_ENV]
    mounts = [Path(m["mountPath"]) for m in builder["volumeMounts"] if m["name"].startswith("source-")]
    uris = [a for a in builder["args"] if a.startswith("pvc://")]
    assert uris
    for uri in uris:
        # model_repo_builder.fetch maps the URI exactly as the init container will, with the pod's environment.
        assert any(mount in resolve_pvc(uri, root).parents for mount in mounts), uri


SECRET = {"secretRef": {"name": "minio-keys"}}


@pytest.mark.parametrize(
    ("model", "env_from", "account", "endpoint"),
    [
        (_model("s3://models/ctr/3/model.keras"), None, None, None),
        (_model("s3://models/ctr/3/model.keras", credentials=SECRET), "minio-keys", None, None),
        (
            _model("s3://models/ctr/3/model.keras", endpoint="http://minio.storage:9000", credentials=SECRET),
            "minio-keys",
            None,
            "http://minio.storage:9000",
        ),
        (
            _model("gs://models/ctr/3/model.keras", credentials={"secretRef": {"name": "gcs-hmac"}}),
            "gcs-hmac",
            None,
            None,
        ),
        (
            _model("s3://models/ctr/3/model.keras", credentials={"serviceAccountName": "ctr-reader"}),
            None,
            "ctr-reader",
            None,
        ),
    ],
    ids=[
        "a source without credentials gets no secret, no identity and no token",
        "a secret's keys reach the builder's environment",
        "an explicit endpoint for an S3-compatible store is a builder argument",
        "a gs source takes its HMAC keys from a secret the same way",
        "a service account for workload identity runs the pod with its token",
    ],
)
def test_store_credentials_reach_only_the_builder_and_never_its_arguments(
    model: dict[str, Any], env_from: str | None, account: str | None, endpoint: str | None
) -> None:
    pod = _pod(minimal_spec(model=model))
    builder, triton = _container(pod, BUILDER_CONTAINER), _container(pod, TRITON_CONTAINER)
    assert builder.get("envFrom") == ([{"secretRef": {"name": env_from}}] if env_from else None)
    assert "envFrom" not in triton
    assert not [e for e in builder["env"] + triton["env"] if "valueFrom" in e or e["name"].startswith("AWS_")]
    assert env_from is None or env_from not in " ".join(builder["args"] + triton["args"])
    assert pod.get("serviceAccountName") == account
    assert pod["automountServiceAccountToken"] is (account is not None)
    args = builder["args"]
    assert (args[args.index("--s3-endpoint") + 1] if "--s3-endpoint" in args else None) == endpoint


def test_triton_exports_latency_summaries_with_the_quantiles_the_rollout_reads() -> None:
    args = _container(_pod(minimal_spec()), TRITON_CONTAINER)["args"]
    assert "--metrics-config=summary_latencies=true" in args
    quantiles = next(a for a in args if a.startswith("--metrics-config=summary_quantiles="))
    assert {q.split(":")[0] for q in quantiles.split("=", 2)[2].split(",")} >= {"0.5", "0.9", "0.99"}


@pytest.mark.parametrize(
    ("serving", "batches"),
    [
        ({"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G"}, [1, 256]),
        ({"resources": {"gpu": 1}, "maxBatchSize": 1024}, [1, 1024]),
        ({"resources": {"gpu": 1}, "maxBatchSize": 1}, [1]),
        ({"resources": {"gpu": 1}, "warmup": False}, []),
    ],
    ids=[
        "warmup is on by default with a single sample and the max batch",
        "the warmup batch follows maxBatchSize",
        "a max batch of one warms up once",
        "warmup can be turned off",
    ],
)
def test_the_config_template_asks_triton_to_warm_up_before_ready(serving: dict[str, Any], batches: list[int]) -> None:
    parsed = parse_spec(minimal_spec(serving=serving))
    ids = Ids(name="ctr-dnn", namespace="shop", uid="uid-1", revision=revision_of(parsed))
    cfg = parse_pbtxt(build_configmap(parsed, ids)["data"][CONFIG_KEY])
    assert [w.batch_size for w in cfg.model_warmup] == batches
    probe = _container(_pod(minimal_spec(serving=serving)), TRITON_CONTAINER)["readinessProbe"]
    assert probe["httpGet"]["path"] == "/v2/models/ctr-dnn/ready"  # Triton says ready only after the warmup


@pytest.mark.parametrize(
    "spec",
    [
        minimal_spec(),
        minimal_spec(model=_model("s3://models/ctr/3/model.keras", endpoint="http://minio:9000", credentials=SECRET)),
        _int8("pvc://models/ctr/3/model.keras", "pvc://calib/ctr/calibration.npz"),
    ],
    ids=["a pvc model", "an s3 model behind an endpoint", "an int8 model with calibration data"],
)
def test_the_builder_command_line_parses_what_the_operator_passes(spec: dict[str, Any]) -> None:
    builder = _container(_pod(spec), BUILDER_CONTAINER)
    args = build_parser().parse_args(builder["args"])
    parsed = parse_spec(spec)
    assert (args.command, args.source, args.s3_endpoint) == ("build", parsed.model.uri, parsed.model.endpoint)
    assert args.calibration == (parsed.optimize.calibration.uri if parsed.optimize.calibration else None)
