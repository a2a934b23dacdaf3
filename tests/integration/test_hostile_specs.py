"""Hostile RecommenderModels on the real API server and operator: each is refused naming its field, or reconciled
to Ready or to InvalidSpec naming its field; never an operator exception, never an object left without status.

Generated manifests (hypothesis, derandomized) are a valid kwok model with up to two faults from a catalog that
covers every section; the explicit cases are a name at the CRD's limit (every derived object, the build Job with a
model store), unicode, and a spec at the schema's size limits.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from recserve_operator import names
from recserve_operator.builders.common import Ids, owner_reference
from recserve_operator.builders.configmap import build_configmap
from recserve_operator.builders.deployment import build_deployment
from recserve_operator.builders.hpa import build_hpa
from recserve_operator.builders.job import build_job
from recserve_operator.builders.pdb import build_pdb
from recserve_operator.builders.service import build_revision_service, build_stable_service
from recserve_operator.rollout.policy import ParentRef
from recserve_operator.routers.gateway_api import build_httproute
from recserve_operator.routers.plan import CANARY, STABLE, Backend, TrafficPlan, revision_service_name
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import parse_spec, revision_of

from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.conftest_operator import (
    INSTANCE,
    OperatorProcess,
    condition,
    get_json,
    kwok_model,
    model,
    wait_ready,
)

pytestmark = pytest.mark.integration

FIELD_RE = re.compile(r"\bspec\.(model|optimize|serving|rollout)\b")
MAX_NAME = 52  # the CRD's rule on metadata.name
SECRET, ACCOUNT = "model-keys", "model-reader"
MISSING: Any = object()
STORE = OperatorDefaults(model_store="s3://recserve-models/artifacts", model_store_endpoint="http://store.invalid:8333",
                         model_store_secret="recserve-store")  # fmt: skip
_names = itertools.count()


# -- generated manifests ------------------------------------------------------------------------------------------


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A spec the CRD accepts and kwok can run (one GPU of a kwok product, or the CPU node; replicas 1-2), drawn
    across every section, with unicode and maximum lengths where the schema allows them."""
    gpu = draw(st.booleans())
    resources = {"gpu": 1 if gpu else 0, "cpu": draw(st.sampled_from(["100m", "0.5"])), "memory": "128Mi"}
    serving: dict[str, Any] = {"resources": resources, "replicas": draw(st.integers(1, 2)),
                               "maxBatchSize": draw(st.sampled_from([1, 64, 256, 65536]))}  # fmt: skip
    serving["instances"] = {"kind": "GPU" if gpu else "CPU", "count": draw(st.sampled_from([1, 16]))}
    if gpu:
        serving["gpuProduct"] = draw(st.sampled_from(["NVIDIA-A10G", "NVIDIA-H100-80GB-HBM3"]))
    if draw(st.booleans()):
        serving["dynamicBatching"] = {"preferredBatchSizes": [1], "maxQueueDelayMicroseconds": 10_000_000,
                                      "preserveOrdering": True}  # fmt: skip
    if draw(st.booleans()):
        serving.pop("replicas")
        serving["autoscaling"] = {"minReplicas": 1, "maxReplicas": 2, "targetCPUUtilization": 50}
    ranking = draw(st.booleans())
    if ranking:
        serving["ranking"] = draw(st.sampled_from([{"requestColumns": "0-15,28-31", "maxK": 10000},
                                                   {"requestInputs": ["ユーザー", "contexte-é", "u" * 253]}]))
    elif draw(st.booleans()):
        serving["tuning"] = {"sloP99Milliseconds": 60000, "candidatesPerRequest": 1, "concurrencyLevels": [1, 1024]}
    backend = draw(st.sampled_from(["onnxruntime"] if ranking else ["onnxruntime", "tensorrt", "auto"] if gpu
                                   else ["onnxruntime", "auto"]))  # fmt: skip
    precision = draw(st.sampled_from(["fp32", "fp16", "int8"] if gpu else ["fp32", "int8"]))
    optimize: dict[str, Any] = {"backend": backend, "precision": precision, "parity": {"maxAbsError": 0}}
    if precision == "int8":
        optimize["calibration"] = {"uri": "gs://calibration/ñ.npz", "samples": 1}
    uri = draw(st.sampled_from(["s3://models/ctr/1", "s3://bücket/模型/ランキング.onnx", "s3://b/" + "k" * 2041]))
    model_ref: dict[str, Any] = {"uri": uri, "format": draw(st.sampled_from(["keras", "savedmodel", "onnx"])),
                                 "version": draw(st.sampled_from([1, 2**63 - 1]))}  # fmt: skip
    if draw(st.booleans()):
        model_ref.update(sha256="a" * 64, endpoint="http://minio.storage:9000",
                         credentials={"secretRef": {"name": SECRET}, "serviceAccountName": ACCOUNT})
    strategy = draw(st.sampled_from(["immediate", "canary", "abTest"]))
    rollout: dict[str, Any] = {"strategy": strategy, "steps": [{"weight": 10, "pause": "1h30m"}, {"weight": 100}]}
    if draw(st.booleans()):
        rollout["routing"] = {"provider": "gatewayAPI", "parentRef": {"name": "shop-gw", "namespace": "infra"}}
    rollout["analysis"] = {"interval": "1m", "checks": [{"name": "延迟-p99", "query": 'p99{v="ü"}', "max": 25.5}],
                           "abTest": {"clicks": "clicks_total", "impressions": "impressions_total", "split": 99}}
    return {"model": model_ref, "optimize": optimize, "serving": serving, "rollout": rollout}


def _values(*values: Any) -> st.SearchStrategy[Any]:
    """A field's faults, plus ones that fit any field (a wrong type, unicode, a long string, an unknown key)."""
    generic = [True, "ünïcödé-模型", "x" * 3000, [1], {"unknown": 1}, -1, 2**63]
    return st.one_of(st.sampled_from(list(values)), st.sampled_from(list(values)), st.sampled_from(generic))


# (path under spec, faulty values): every section, its boundaries, wrong types, and cross-field violations.
FAULTS: list[tuple[str, st.SearchStrategy[Any]]] = [
    ("model.uri", _values("ftp://m", "", "pvc://Models/x", "pvc://c/../x", "s3://b/" + "k" * 2042, MISSING)),
    ("model.format", _values("tflite", "ONNX", MISSING)),
    ("model.version", _values(0, "3", 1.5, MISSING)),
    ("model.sha256", _values("abc", "A" * 64, "a" * 64 + "\n")),
    ("model.endpoint", _values("minio:9000", "http://h/ x", "http://h:9000\n")),
    ("model.credentials", _values({}, {"secretRef": {}}, {"secretRef": {"name": "Keys"}}, {"serviceAccountName": "ü"})),
    ("model.allowUnsafeDeserialization", _values("yes", 1)),
    ("model.extra", _values("field")),
    ("optimize.backend", _values("trt", "TensorRT")),
    ("optimize.precision", _values("fp64", "int8", "fp16")),
    ("optimize.parity.maxAbsError", _values(-1, "1e-3")),
    ("optimize.parity.samples", _values(0, 100001, "512")),
    ("optimize.calibration", _values({"samples": 5}, {"uri": "x"}, "s3://c")),
    ("serving.maxBatchSize", _values(0, 65537, "256", 2.5)),
    ("serving.dynamicBatching.preferredBatchSizes", _values([0], [1, 1], [70000], list(range(1, 18)), "8")),
    ("serving.dynamicBatching.maxQueueDelayMicroseconds", _values(10_000_001)),
    ("serving.instances.kind", _values("TPU", "gpu", "CPU", "GPU")),
    ("serving.instances.count", _values(0, 17)),
    ("serving.replicas", _values(1001, "2", 3)),  # 3 GPUs at most: a kwok A10G node has 4
    ("serving.autoscaling", _values({"minReplicas": 2, "maxReplicas": 1, "targetCPUUtilization": 50},
                                    {"minReplicas": 1, "maxReplicas": 2},
                                    {"minReplicas": 1, "maxReplicas": 2, "targetCPUUtilization": 101})),
    ("serving.resources.gpu", _values(17, "1", 0)),
    ("serving.resources.cpu", _values("two", "1.5.1", "100m\n")),
    ("serving.resources.memory", _values("4GB", "lots", "1Gi\n")),
    ("serving.gpuProduct", _values("NVIDIA-A10G\n", "NVIDIA A10G", "Ñvidia-A10G", "A" * 64, "-x")),
    ("serving.tritonImage", _values("nvcr.io/t:1\n", " t", "t" * 513, "ü/t")),
    ("serving.builderImage", _values("b:1\n", "b b")),
    ("serving.warmup", _values("true", 0)),
    ("serving.ranking", _values({}, {"requestColumns": "0-3", "requestInputs": ["u"]}, {"requestColumns": "a-b"},
                                {"requestInputs": []}, {"requestInputs": ["u", "u"]},
                                {"requestColumns": "0", "maxK": 0})),
    ("serving.tuning", _values({}, {"sloP99Milliseconds": 0}, {"sloP99Milliseconds": 5, "concurrencyLevels": [1, 1]},
                               {"sloP99Milliseconds": 5, "instanceCounts": []}, {"sloP99Milliseconds": 5, "rounds": 6},
                               {"sloP99Milliseconds": 5, "candidatesPerRequest": 65536})),
    ("serving.buildCache", _values({}, {"claimName": ""}, {"claimName": "Trt_Cache"}, {"claimName": "cache\n"})),
    ("serving.extra", _values("field")),
    ("rollout.strategy", _values("blueGreen", "canary", "abTest")),
    ("rollout.steps", _values([], [{"weight": 0}], [{"weight": 50}, {"weight": 10}], [{"weight": 10, "pause": "5 min"}],
                              [{"weight": w} for w in range(1, 23)], [{"pause": "1m"}])),
    ("rollout.routing.provider", _values("istio", "gatewayAPI")),
    ("rollout.routing.parentRef", _values({}, {"name": ""}, {"name": "gw", "namespace": "Ïnfra"},
                                          {"name": "gw", "sectionName": "HTTPS"}, {"name": "g" * 254})),
    ("rollout.routing.stickyHeader", _values("x user", "x-user-id\n", "ü", "x-recserve-variant", "h" * 64)),
    ("rollout.analysis.interval", _values("1 minute", "0s", 60)),
    ("rollout.analysis.maxErrorRate", _values(1.5, "1%")),
    ("rollout.analysis.checks", _values([{"name": "c", "query": "q"}], [{"name": "", "query": "q", "max": 1}],
                                        [{"name": "c", "query": "q", "min": 2, "max": 1}],
                                        [{"name": "c", "query": "q", "max": 1}] * 2,
                                        [{"name": f"c{i}", "query": "q", "max": 1} for i in range(21)])),
    ("rollout.analysis.abTest", _values({}, {"clicks": "c"}, {"clicks": "sum(increase(c[1h]))", "impressions": "i"},
                                        {"clicks": "c", "impressions": "i", "confidence": 0.3},
                                        {"clicks": "c", "impressions": "i", "minDetectableEffect": 0},
                                        {"clicks": "c", "impressions": "i", "split": 100})),
    ("rollout.progressDeadline", _values("0s", "soon", "30s")),
    ("rollout.onProgressDeadline", _values("wait")),
    ("rollout.surge", _values(0, "1")),
    ("rollout.control.action", _values("restart", "Promote")),
    ("rollout.extra", _values("field")),
]  # fmt: skip


@st.composite
def faulty_specs(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A valid spec with zero to two faults, and the fields each fault touched."""
    spec = draw(valid_specs())
    count = draw(st.sampled_from([0, 1, 1, 1, 2]))
    picked = draw(st.lists(st.sampled_from(range(len(FAULTS))), min_size=count, max_size=count, unique=True))
    for i in picked:
        path, values = FAULTS[i]
        _set(spec, path, draw(values))
    return spec, [FAULTS[i][0] for i in picked]


def _set(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if value is MISSING:
        node.pop(leaf, None)
    else:
        node[leaf] = copy.deepcopy(value)


def _manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "recserve.dev/v1alpha1", "kind": "RecommenderModel", "metadata": {"name": name},
            "spec": spec}  # fmt: skip


# -- outcomes -----------------------------------------------------------------------------------------------------


def _apply(cluster: Cluster, ns: str, doc: dict[str, Any], *, server_side: bool = False) -> tuple[bool, str]:
    """(accepted, kubectl's stderr); server-side apply for specs over the 256 KiB last-applied annotation."""
    args = ["apply", "-n", ns, "-f", "-"] + (["--server-side"] if server_side else [])
    out = cluster.kubectl(*args, input=yaml.safe_dump(doc, allow_unicode=True), check=False, timeout=120)
    return out.returncode == 0, out.stderr


def _settled(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    """The model once its status describes its generation: Ready, or InvalidSpec (for wait_for predicates)."""
    obj = model(cluster, ns, name)
    status = (obj or {}).get("status") or {}
    if obj is None or status.get("observedGeneration") != obj["metadata"]["generation"]:
        return None
    ready = condition(obj, "Ready") or {}
    if (ready.get("status") == "True" and status.get("phase") == "Ready") or ready.get("reason") == "InvalidSpec":
        return obj
    return None


def _wait_settled(cluster: Cluster, ns: str, name: str, timeout: float = 90) -> dict[str, Any]:
    def show() -> str:
        obj = model(cluster, ns, name) or {}
        return f"RecommenderModel {ns}/{name} never Ready nor InvalidSpec: {obj.get('status')}"

    try:
        return wait_for(lambda: _settled(cluster, ns, name), timeout)
    except AssertionError:
        raise AssertionError(show()) from None


def _invalid_message(obj: dict[str, Any]) -> str | None:
    ready = condition(obj, "Ready") or {}
    return str(ready["message"]) if ready.get("reason") == "InvalidSpec" else None


def _delete(cluster: Cluster, ns: str, name: str) -> None:
    """Delete the model and wait for its pods to go, so the next one finds the kwok GPUs free."""
    cluster.kubectl("delete", "rm", name, "-n", ns, "--wait=true", "--timeout=60s", check=False, timeout=90)
    selector = f"{INSTANCE} in ({name},{names.router_name(name)})"

    def gone() -> bool:
        pods = get_json(cluster, "pods", "-n", ns, "-l", selector)
        return pods is not None and not pods["items"]

    wait_for(gone, 60, message=f"pods of {name} were not removed")


@pytest.fixture
def credentials(operator: OperatorProcess, namespace: str) -> Iterator[None]:
    """The Secret and ServiceAccount the generated credentials name (pod admission needs the account)."""
    cluster = operator.cluster
    cluster.kubectl("create", "secret", "generic", SECRET, "-n", namespace, "--from-literal=AWS_ACCESS_KEY_ID=k")
    cluster.kubectl("create", "serviceaccount", ACCOUNT, "-n", namespace)
    yield


@settings(max_examples=30, derandomize=True, database=None, deadline=None, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])  # fmt: skip
@given(case=faulty_specs())
def test_a_generated_spec_is_refused_naming_its_field_or_reconciled(
    operator: OperatorProcess, namespace: str, credentials: None, case: tuple[dict[str, Any], list[str]]
) -> None:
    spec, faults = case
    cluster, name = operator.cluster, f"hostile-{next(_names)}"
    leaves = [path.rsplit(".", 1)[-1] for path in faults]
    accepted, stderr = _apply(cluster, namespace, _manifest(name, spec))
    if not accepted:
        event("refused by the API server")
        assert faults, f"a valid spec was refused: {stderr}"
        assert any(leaf in stderr for leaf in leaves), f"the refusal names none of {faults}: {stderr}"
        return
    try:
        obj = _wait_settled(cluster, namespace, name)
        message = _invalid_message(obj)
        event("Ready" if message is None else "InvalidSpec")
        if message is not None:
            assert faults, f"a valid spec was reported invalid: {message}"
            assert FIELD_RE.search(message), f"InvalidSpec names no spec field: {message}"
        log = operator.log()
        assert "Traceback" not in log, f"faults {faults}: {log[-5000:]}"
    finally:
        _delete(cluster, namespace, name)


# -- the CRD's name limit -----------------------------------------------------------------------------------------


LONGEST = ("ranking-model-for-the-front-page-of-the-shop-" + "v" * MAX_NAME)[:MAX_NAME - 1] + "9"


def _revision_ids(cluster: Cluster, ns: str, name: str) -> tuple[Any, Ids]:
    """The model's spec as stored (CRD defaults applied), parsed, and its identity (the revision it runs)."""
    obj = model(cluster, ns, name)
    assert obj is not None
    spec = parse_spec(obj["spec"])
    ids = Ids(name, ns, obj["metadata"]["uid"], revision_of(spec))
    assert ids.revision == obj["status"]["latestRevision"]
    return spec, ids


def _dry_run(cluster: Cluster, objects: list[dict[str, Any]]) -> None:
    """Server-side apply, dry run: the API server validates and defaults each object (a Job's job-name label) and
    writes nothing."""
    objects_list = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})  # JSON: as the operator sends
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts",
                          "--field-manager=hostile-specs-test", "-f", "-", input=objects_list, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_a_name_at_the_crd_limit_reaches_ready_with_every_derived_object(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    assert len(LONGEST) == MAX_NAME
    accepted, stderr = _apply(cluster, namespace, kwok_model(LONGEST + "x", 1))
    assert not accepted and "metadata.name must be at most 52 characters" in stderr, stderr

    canary = {"strategy": "canary", "steps": [{"weight": 50}]}
    serving = {"autoscaling": {"minReplicas": 1, "maxReplicas": 2, "targetCPUUtilization": 50}}
    accepted, stderr = _apply(cluster, namespace, kwok_model(LONGEST, 1, serving=serving, rollout=canary))
    assert accepted, stderr
    obj = wait_ready(cluster, namespace, LONGEST)
    rev = obj["status"]["stable"]["revision"]
    revision = names.revision_name(LONGEST, rev)
    router = names.router_name(LONGEST)
    assert len(revision) == 63
    for kind, name in [("deployment", revision), ("service", revision), ("configmap", revision), ("pdb", revision),
                       ("hpa", revision), ("service", LONGEST), ("deployment", router), ("service", router),
                       ("configmap", router)]:  # fmt: skip
        assert get_json(cluster, kind, name, "-n", namespace) is not None, f"{kind}/{name} missing"

    # What this operator (no model store) does not create, the API server still takes: the build Job, the
    # Deployment that fetches, a rollout's HTTPRoute and the objects of a second revision beside this one.
    spec, ids = _revision_ids(cluster, namespace, LONGEST)
    other = ids.at("0123456789")
    plan = TrafficPlan((Backend(STABLE, rev, revision_service_name(LONGEST, rev), 90),
                        Backend(CANARY, other.revision, revision_service_name(LONGEST, other.revision), 10)),
                       "x-user-id", "x-recserve-variant")  # fmt: skip
    _dry_run(cluster, [
        build_job(spec, ids, STORE),
        build_deployment(spec, ids, STORE, artifact=(f"{namespace}/{LONGEST}/{rev}-0", "f" * 64)),
        build_httproute(plan, LONGEST, namespace, ParentRef("shop-gw"), owner_ref=owner_reference(ids)),
        build_configmap(spec, other), build_deployment(spec, other, OperatorDefaults()),
        build_revision_service(spec, other), build_stable_service(spec, other),
        *[o for o in (build_pdb(spec, other), build_hpa(spec, other)) if o is not None],
    ])  # fmt: skip


def test_a_name_at_the_crd_limit_gets_its_build_job_with_a_model_store(
    crd: Cluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: `<name>-<revision>-build` was 69 characters for a 52-character name, and the API server refused
    the Job (its name is its pods' job-name label) at every reconcile."""
    monkeypatch.setenv("RECSERVE_MODEL_STORE", STORE.model_store)
    monkeypatch.setenv("RECSERVE_MODEL_STORE_ENDPOINT", STORE.model_store_endpoint)
    monkeypatch.setenv("RECSERVE_MODEL_STORE_SECRET", STORE.model_store_secret)
    op = OperatorProcess(crd, namespace, tmp_path / "operator.log")
    op.start()
    try:
        accepted, stderr = _apply(crd, namespace, kwok_model(LONGEST, 1))
        assert accepted, stderr

        def reported() -> dict[str, Any] | None:
            obj = model(crd, namespace, LONGEST)
            status = (obj or {}).get("status") or {}
            return obj if obj and status.get("observedGeneration") == obj["metadata"]["generation"] else None

        obj = wait_for(reported, 90, message="the model has no status")
        job = names.build_job_name(LONGEST, obj["status"]["latestRevision"])
        assert len(job) <= 63
        wait_for(lambda: get_json(crd, "job", job, "-n", namespace), 60, message=f"Job {job} was not created")
        pods = wait_for(lambda: (get_json(crd, "pods", "-n", namespace, "-l", f"job-name={job}") or {})
                        .get("items"), 60, message=f"Job {job} created no pod")  # fmt: skip
        assert pods[0]["metadata"]["labels"][names.COMPONENT_LABEL] == names.BUILDER
    finally:
        op.stop()
    log = op.log()
    assert "Traceback" not in log, log[-5000:]


# -- unicode ------------------------------------------------------------------------------------------------------


def test_unicode_in_free_strings_is_served(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    doc = kwok_model("unicode", 1, serving={"ranking": {"requestInputs": ["ユーザー", "contexte-é"]}},
                     rollout={"strategy": "canary", "steps": [{"weight": 20}],
                              "analysis": {"checks": [{"name": "延迟-p99", "query": 'p99{région="é"}', "max": 25}]}})
    doc["spec"]["model"]["uri"] = "s3://bücket/模型/ランキング.onnx"  # fmt: skip
    accepted, stderr = _apply(cluster, namespace, doc)
    assert accepted, stderr
    rev = wait_ready(cluster, namespace, "unicode")["status"]["stable"]["revision"]
    configmap = get_json(cluster, "configmap", names.revision_name("unicode", rev), "-n", namespace)
    assert json.loads(configmap["data"]["build-spec.json"])["source"] == "s3://bücket/模型/ランキング.onnx"
    deployment = get_json(cluster, "deployment", names.revision_name("unicode", rev), "-n", namespace)
    args = deployment["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert "s3://bücket/模型/ランキング.onnx" in args and "ユーザー,contexte-é" in args


# Accepted by the CRD (no pattern there) and, before the fix, by the parser too: then the API server refused the
# Deployment or HTTPRoute at every reconcile (an operator exception, no status) or nginx.conf took a newline.
@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        pytest.param("serving.gpuProduct", "Ñvidia-A10G", "spec.serving.gpuProduct", id="gpu-product-unicode"),
        pytest.param("serving.gpuProduct", "NVIDIA-A10G\n", "spec.serving.gpuProduct", id="gpu-product-newline"),
        pytest.param("serving.tritonImage", "nvcr.io/nvidia/tritonserver:25.10-py3\n", "spec.serving.tritonImage",
                     id="triton-image-newline"),
        pytest.param("serving.buildCache", {"claimName": "Trt-Cache"}, "spec.serving.buildCache.claimName",
                     id="cache-claim-upper-case"),
        pytest.param("rollout.routing", {"stickyHeader": "x-user-id\n"}, "spec.rollout.routing.stickyHeader",
                     id="sticky-header-newline"),
        pytest.param("rollout.routing", {"provider": "gatewayAPI", "parentRef": {"name": "gw", "namespace": "Ïnfra"}},
                     "spec.rollout.routing.parentRef.namespace", id="gateway-namespace-unicode"),
    ],
)  # fmt: skip
def test_a_value_only_the_operator_refuses_is_reported_invalid_naming_it(
    operator: OperatorProcess, namespace: str, path: str, value: Any, field: str
) -> None:
    cluster = operator.cluster
    doc = kwok_model("refused", 1, rollout={"strategy": "canary", "steps": [{"weight": 20}]})
    _set(doc["spec"], path, value)
    accepted, stderr = _apply(cluster, namespace, doc)
    assert accepted, stderr
    message = _invalid_message(_wait_settled(cluster, namespace, "refused", timeout=60))
    assert message is not None and field in message, message
    assert get_json(cluster, "deployments", "-n", namespace, "-l", f"{INSTANCE}=refused")["items"] == []


# -- size ---------------------------------------------------------------------------------------------------------


def _largest(query_chars: int) -> dict[str, Any]:
    """Every list at its maxItems and every bounded string at its maxLength; check queries (unbounded) this long."""
    doc = kwok_model("largest", 1, serving={
        "tritonImage": "t" * 512, "builderImage": "b" * 512,
        "ranking": {"requestInputs": [f"{i:02d}" + "i" * 251 for i in range(64)], "maxK": 10000},
        "dynamicBatching": {"preferredBatchSizes": list(range(1, 17))},
    }, rollout={
        "strategy": "canary", "steps": [{"weight": 5 * i, "pause": "1h"} for i in range(1, 21)],
        "analysis": {"checks": [{"name": f"check-{i}", "query": "q" * query_chars, "max": 1} for i in range(20)]},
    })  # fmt: skip
    doc["spec"]["model"].update(uri="s3://b/" + "k" * 2041, endpoint="http://minio:9000/" + "e" * 2030)
    assert len(doc["spec"]["model"]["uri"]) == 2048 and len(doc["spec"]["model"]["endpoint"]) == 2048
    return doc


def test_a_spec_at_the_schema_limits_is_reconciled(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    accepted, stderr = _apply(cluster, namespace, _largest(8000), server_side=True)  # ~200 KB
    assert accepted, stderr
    obj = wait_ready(cluster, namespace, "largest")
    assert len(obj["spec"]["rollout"]["steps"]) == 20 and len(obj["spec"]["rollout"]["analysis"]["checks"]) == 20


def test_a_spec_over_the_request_limit_is_refused_by_size(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    accepted, stderr = _apply(cluster, namespace, _largest(200_000), server_side=True)  # ~4 MB
    assert not accepted
    assert "too large" in stderr.lower(), stderr
    assert model(cluster, namespace, "largest") is None
