"""Spec parsing: defaults, cross-field checks the CEL rules mirror, and revision hash stability."""

from __future__ import annotations

import pytest
from operator_samples import example_objects, minimal_spec
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import InvalidSpec, parse_spec, revision_of


def test_minimal_spec_gets_the_crd_defaults() -> None:
    spec = parse_spec(minimal_spec())
    assert spec.optimize.backend == "onnxruntime"
    assert spec.optimize.precision == "fp32"
    assert spec.serving.replicas == 1
    assert spec.serving.instance_kind == "GPU"
    assert spec.serving.resources.gpu == 1
    assert spec.rollout.strategy == "immediate"


@pytest.mark.parametrize("path", sorted(example_objects()))
def test_every_example_parses(path: str) -> None:
    """The whole spec, the rollout policy included, as the operator parses it (with its default Prometheus)."""
    parse_spec(example_objects()[path]["spec"], default_prometheus=OperatorDefaults().prometheus_url)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optimize": {"precision": "int8"}}, "int8 needs calibration"),
        (
            {"optimize": {"backend": "tensorrt"}, "serving": {"instances": {"kind": "CPU"}, "resources": {"gpu": 0}}},
            "tensorrt needs a GPU",
        ),
        ({"serving": {"instances": {"kind": "GPU"}, "resources": {"gpu": 0}}}, "kind GPU needs"),
        (
            {"serving": {"resources": {"gpu": 0}, "instances": {"kind": "CPU"}, "gpuProduct": "NVIDIA-A10G"}},
            "gpuProduct selects GPU nodes",
        ),
        ({"serving": {"maxBatchSize": 8, "dynamicBatching": {"preferredBatchSizes": [16]}}}, "must not exceed"),
        (
            {
                "serving": {
                    "replicas": 9,
                    "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "targetCPUUtilization": 50},
                }
            },
            "within spec.serving.autoscaling",
        ),
        ({"model": {"uri": "ftp://x", "format": "onnx", "version": 1}}, "model.uri must start"),
        ({"model": {"uri": "pvc://x/y", "format": "onnx", "version": 1, "sha256": "abc"}}, "64 lowercase hex"),
        ({"serving": {"resources": {"gpu": 1, "cpu": "two"}}}, "CPU quantity"),
    ],
    ids=[
        "int8-needs-calibration",
        "tensorrt-needs-gpu",
        "gpu-kind-needs-gpus",
        "gpu-product-needs-gpus",
        "preferred-batch-within-max",
        "replicas-within-autoscaling",
        "uri-scheme",
        "sha256-format",
        "cpu-quantity",
    ],
)
def test_invalid_specs_are_refused_with_a_message_naming_the_field(change: dict, message: str) -> None:
    spec = minimal_spec()
    spec.update(change)
    with pytest.raises(InvalidSpec, match=message):
        parse_spec(spec)


def test_revision_is_stable_for_equal_specs_and_for_explicit_defaults() -> None:
    implicit = parse_spec(minimal_spec())
    explicit = parse_spec(
        minimal_spec(
            optimize={"backend": "onnxruntime", "precision": "fp32", "parity": {"maxAbsError": 0.0001, "samples": 512}},
            serving={
                "maxBatchSize": 256,
                "instances": {"kind": "GPU", "count": 1},
                "resources": {"gpu": 1, "cpu": "2", "memory": "4Gi"},
                "gpuProduct": "NVIDIA-A10G",
            },
        )
    )
    assert revision_of(implicit) == revision_of(explicit)
    # A golden value: the hash must not change between operator versions, or every model would roll.
    assert revision_of(implicit) == "2093bb3015"


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"uri": "pvc://models/ctr-dnn/4", "format": "keras", "version": 4}},
        {"optimize": {"precision": "fp16"}},
        {"serving": {"resources": {"gpu": 2}, "gpuProduct": "NVIDIA-A10G"}},
        {"serving": {"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-H100-80GB-HBM3"}},
    ],
    ids=["model-version", "precision", "gpus", "gpu-product"],
)
def test_serving_relevant_changes_make_a_new_revision(change: dict) -> None:
    assert revision_of(parse_spec(minimal_spec(**change))) != revision_of(parse_spec(minimal_spec()))


@pytest.mark.parametrize(
    "change",
    [
        {"rollout": {"strategy": "canary", "steps": [{"weight": 10}]}},
        {"serving": {"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G", "replicas": 5}},
        {
            "serving": {
                "resources": {"gpu": 1},
                "gpuProduct": "NVIDIA-A10G",
                "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetCPUUtilization": 60},
            }
        },
    ],
    ids=["rollout", "replicas", "autoscaling"],
)
def test_rollout_and_scaling_changes_keep_the_revision(change: dict) -> None:
    assert revision_of(parse_spec(minimal_spec(**change))) == revision_of(parse_spec(minimal_spec()))


def test_auto_backend_picks_tensorrt_on_gpu_and_onnxruntime_on_cpu() -> None:
    gpu = parse_spec(minimal_spec(optimize={"backend": "auto"}))
    cpu = parse_spec(
        minimal_spec(optimize={"backend": "auto"}, serving={"instances": {"kind": "CPU"}, "resources": {"gpu": 0}})
    )
    assert (gpu.resolved_backend, cpu.resolved_backend) == ("tensorrt", "onnxruntime")


def _model(uri: str, **extra: object) -> dict:
    return {"uri": uri, "format": "keras", "version": 3, **extra}


def _calibration(uri: str) -> dict:
    return {
        "optimize": {"precision": "int8", "calibration": {"uri": uri}},
        "serving": {"instances": {"kind": "CPU"}, "resources": {"gpu": 0}},
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": _model("pvc://models")}, r"spec.model.uri pvc:// URIs must be pvc://<claim>/<path>"),
        ({"model": _model("pvc://models/")}, r"spec.model.uri pvc:// URIs must be"),
        ({"model": _model("pvc://models/../other/model.keras")}, r"without '\.\.'"),
        ({"model": _model("pvc://Models/ctr/3")}, r"lowercase DNS subdomain"),
        (_calibration("/data/calibration.npz"), r"spec.optimize.calibration.uri must start with pvc://"),
        (_calibration("pvc://calib/../x.npz"), r"spec.optimize.calibration.uri pvc:// URIs must be"),
        ({"model": _model("s3://b/k", credentials={})}, r"credentials needs secretRef.name or serviceAccountName"),
        ({"model": _model("s3://b/k", credentials={"secretRef": {}})}, r"secretRef.name is required"),
        ({"model": _model("s3://b/k", credentials={"secretRef": {"name": "Keys_1"}})}, r"Kubernetes object name"),
        ({"model": _model("s3://b/k", credentials={"serviceAccountName": "a b"})}, r"serviceAccountName must be"),
        ({"model": _model("s3://b/k", endpoint="minio:9000")}, r"endpoint must be an http:// or https:// URL"),
        ({"serving": {"resources": {"gpu": 1}, "warmup": "yes"}}, r"spec.serving.warmup must be a boolean"),
    ],
    ids=[
        "a pvc uri without a path is refused",
        "a pvc uri with an empty path is refused",
        "a pvc uri that climbs out of its volume is refused",
        "a pvc uri whose claim is no object name is refused",
        "a calibration uri without a scheme is refused",
        "a pvc calibration uri that climbs out of its volume is refused",
        "an empty credentials block is refused",
        "a secret reference without a name is refused",
        "a secret name that is no object name is refused",
        "a service account name that is no object name is refused",
        "an endpoint without a scheme is refused",
        "a warmup switch that is no boolean is refused",
    ],
)
def test_malformed_sources_and_credentials_are_refused_with_a_clear_message(change: dict, message: str) -> None:
    spec = minimal_spec()
    spec.update(change)
    with pytest.raises(InvalidSpec, match=message):
        parse_spec(spec)


@pytest.mark.parametrize(
    ("change", "same_revision"),
    [
        ({"model": _model("pvc://models/ctr-dnn/3", credentials={"secretRef": {"name": "keys"}})}, True),
        ({"model": _model("pvc://models/ctr-dnn/3", credentials={"serviceAccountName": "reader"})}, True),
        ({"serving": {"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G", "warmup": True}}, True),
        ({"serving": {"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G", "warmup": False}}, False),
        ({"model": _model("pvc://models/ctr-dnn/3", endpoint="http://minio:9000")}, False),
    ],
    ids=[
        "a credentials secret keeps the revision (rotating keys fetches the same model)",
        "a workload identity keeps the revision",
        "warmup left on, as it was before the field existed, keeps the revision",
        "turning warmup off makes a new revision",
        "another store endpoint makes a new revision",
    ],
)
def test_new_fields_change_the_revision_only_when_they_change_what_is_served(change: dict, same_revision: bool) -> None:
    assert (revision_of(parse_spec(minimal_spec(**change))) == revision_of(parse_spec(minimal_spec()))) is same_revision


RANKED = {"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G"}


@pytest.mark.parametrize(
    ("ranking", "message"),
    [
        ({}, "needs requestColumns .* or requestInputs"),
        ({"requestColumns": "0-3", "requestInputs": ["user"]}, "not both"),
        ({"requestColumns": "0-3;5"}, "like \"0-15,28-31\""),
        ({"requestInputs": ["user", "user"]}, "must not repeat"),
        ({"requestColumns": "0-3", "maxK": 0}, "maxK"),
    ],
    ids=["neither", "both", "bad-columns", "repeated-inputs", "k-zero"],
)
def test_a_ranking_spec_is_checked_and_names_the_field(ranking: dict, message: str) -> None:
    with pytest.raises(InvalidSpec, match=f"spec.serving.ranking.*{message}"):
        parse_spec(minimal_spec(serving={**RANKED, "ranking": ranking}))


def test_a_ranking_model_is_served_by_onnx_runtime_and_its_head_is_part_of_the_revision() -> None:
    from recserve_operator.builders.common import Ids
    from recserve_operator.builders.deployment import builder_args

    for optimize in ({"backend": "tensorrt"}, {"backend": "auto"}):
        with pytest.raises(InvalidSpec, match=r"spec\.serving\.ranking is served by ONNX Runtime"):
            parse_spec(minimal_spec(optimize=optimize, serving={**RANKED, "ranking": {"requestColumns": "0-3"}}))
    columns = parse_spec(minimal_spec(serving={**RANKED, "ranking": {"requestColumns": "0-15,28-31", "maxK": 20}}))
    inputs = parse_spec(minimal_spec(serving={**RANKED, "ranking": {"requestInputs": ["user", "context"]}}))
    plain = parse_spec(minimal_spec(serving=RANKED))
    assert len({revision_of(columns), revision_of(inputs), revision_of(plain)}) == 3
    args = builder_args(columns, Ids("m", "ns", "u", revision_of(columns)))
    assert args[args.index("--ranking-request-columns") + 1] == "0-15,28-31"
    assert args[args.index("--ranking-max-k") + 1] == "20" and "--ranking-request-inputs" not in args
    args = builder_args(inputs, Ids("m", "ns", "u", revision_of(inputs)))
    assert args[args.index("--ranking-request-inputs") + 1] == "user,context"
    assert args[args.index("--ranking-max-k") + 1] == "100"
    assert "--ranking-max-k" not in builder_args(plain, Ids("m", "ns", "u", revision_of(plain)))
