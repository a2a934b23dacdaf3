"""Property tests: any spec the schema accepts yields objects the Kubernetes 1.35 OpenAPI schema accepts."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recserve_operator.builders.common import Ids
from recserve_operator.builders.configmap import build_configmap
from recserve_operator.builders.deployment import GPU_PRODUCT_LABEL, GPU_RESOURCE, build_deployment
from recserve_operator.builders.hpa import build_hpa
from recserve_operator.builders.pdb import build_pdb
from recserve_operator.builders.service import build_revision_service, build_stable_service
from recserve_operator.names import REVISION_LABEL
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import parse_spec, revision_of

K8S_VERSION = "1.35.0"
names = st.from_regex(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?", fullmatch=True)


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    """Spec dicts within the CRD schema and its CEL rules."""
    kind = draw(st.sampled_from(["GPU", "CPU"]))
    gpus = draw(st.integers(1, 8)) if kind == "GPU" else 0
    backend = draw(st.sampled_from(["onnxruntime", "tensorrt", "auto"] if kind == "GPU" else ["onnxruntime", "auto"]))
    precision = draw(st.sampled_from(["fp32", "fp16", "int8"] if kind == "GPU" else ["fp32", "int8"]))
    max_batch = draw(st.integers(1, 4096))
    optimize: dict[str, Any] = {"backend": backend, "precision": precision}
    if precision == "int8":
        optimize["calibration"] = {"uri": "pvc://cal/data", "samples": draw(st.integers(1, 4096))}
    serving: dict[str, Any] = {
        "maxBatchSize": max_batch,
        "instances": {"kind": kind, "count": draw(st.integers(1, 4))},
        "resources": {"gpu": gpus, "cpu": draw(st.sampled_from(["1", "500m", "2.5"])), "memory": "8Gi"},
    }
    if draw(st.booleans()):
        sizes = draw(st.lists(st.integers(1, max_batch), max_size=4, unique=True))
        serving["dynamicBatching"] = {
            "preferredBatchSizes": sizes,
            "maxQueueDelayMicroseconds": draw(st.integers(0, 10**6)),
        }
    if gpus and draw(st.booleans()):
        serving["gpuProduct"] = draw(st.sampled_from(["NVIDIA-A10G", "NVIDIA-H100-80GB-HBM3", "NVIDIA-L4"]))
    if draw(st.booleans()):
        lo = draw(st.integers(1, 5))
        hi = draw(st.integers(lo, 20))
        serving["autoscaling"] = {"minReplicas": lo, "maxReplicas": hi}
        serving["autoscaling"][draw(st.sampled_from(["targetCPUUtilization", "targetQueueTimeMicroseconds"]))] = 50
    else:
        serving["replicas"] = draw(st.integers(0, 10))
    if draw(st.booleans()):
        serving["buildCache"] = {"claimName": "trt-cache"}
    model = {
        "uri": "pvc://models/m/1",
        "format": draw(st.sampled_from(["keras", "savedmodel", "onnx"])),
        "version": draw(st.integers(1, 10**6)),
    }
    if draw(st.booleans()):
        model["sha256"] = "a" * 64
    return {"model": model, "optimize": optimize, "serving": serving}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_dict=specs(), name=names)
def test_accepted_specs_build_schema_valid_objects(spec_dict: dict[str, Any], name: str) -> None:
    spec = parse_spec(spec_dict)
    ids = Ids(name=name, namespace="shop", uid="uid", revision=revision_of(spec))
    deployment = build_deployment(spec, ids, OperatorDefaults())
    objects = [
        build_configmap(spec, ids),
        deployment,
        build_revision_service(spec, ids),
        build_stable_service(spec, ids),
    ]
    objects += [o for o in (build_pdb(spec, ids), build_hpa(spec, ids)) if o is not None]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert len(obj["metadata"]["name"]) <= 63

    template = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert selector[REVISION_LABEL] == ids.revision
    pod = template["spec"]
    for container in pod["containers"] + pod["initContainers"]:
        res = container["resources"]
        assert res["requests"].get(GPU_RESOURCE) == res["limits"].get(GPU_RESOURCE)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert (GPU_PRODUCT_LABEL in pod.get("nodeSelector", {})) == (spec.serving.gpu_product is not None)
    assert ("tolerations" in pod) == (spec.serving.resources.gpu > 0)
    assert ("replicas" in deployment["spec"]) == (spec.serving.autoscaling is None)
