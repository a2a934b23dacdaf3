"""Build once per revision (a model store is configured): a Job builds and publishes; serving pods only fetch."""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_samples import minimal_spec, model_body
from recserve_operator.names import ARTIFACT_DIGEST_ANNOTATION, BUILDER_CONTAINER, FETCH_CONTAINER, build_labels
from recserve_operator.observe import observe_build
from recserve_operator.reconcile import Reconciler
from recserve_operator.settings import OperatorDefaults
from test_operator_reconcile import FakeKube, FakeLive

STORE = OperatorDefaults(model_store="s3://models/artifacts", model_store_endpoint="http://store:8333",
                         model_store_secret="store-keys", fetcher_image="recserve/operator:test")  # fmt: skip
DIGEST = "ab" * 32
SCALED = minimal_spec(serving={"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G", "replicas": 3})


@pytest.fixture
def env() -> tuple[Reconciler, FakeKube, list[tuple[str, str, str]]]:
    kube = FakeKube()
    return Reconciler(kube, STORE, FakeLive(kube)), kube, kube.events  # type: ignore[arg-type]


def _kinds(kube: FakeKube) -> list[str]:
    return sorted(k[0] for k in kube.objects)


def _condition(kube: FakeKube, type_: str) -> dict[str, Any]:
    assert kube.status is not None
    return next(c for c in kube.status["conditions"] if c["type"] == type_)


def _finish_build(kube: FakeKube, *, exit_code: int = 0, message: str | None = None) -> str:
    """The Job's pod ran: the builder exited with `exit_code`, its termination message the outcome."""
    job = next(o for k, o in kube.objects.items() if k[0] == "Job")
    key = _arg(job, "--artifact-key")
    if message is None:
        message = json.dumps({"status": "ok", "artifact": {"key": key, "digest": DIGEST, "reused": False}})
    labels = job["spec"]["template"]["metadata"]["labels"]
    pod = {"kind": "Pod", "metadata": {"name": f"{job['metadata']['name']}-x", "namespace": "shop", "labels": labels},
           "status": {"phase": "Succeeded" if exit_code == 0 else "Failed", "containerStatuses": [
               {"name": BUILDER_CONTAINER, "state": {"terminated": {"exitCode": exit_code, "message": message}}}]}}
    kube.objects[("Pod", "shop", pod["metadata"]["name"])] = pod
    return key


def _arg(job: dict[str, Any], flag: str) -> str:
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    return str(args[args.index(flag) + 1])


def test_a_revision_is_built_once_by_a_job_and_its_pods_only_fetch_the_published_artifact(env: Any) -> None:
    rec, kube, events = env
    rec.reconcile(model_body(minimal_spec()), lambda *e: events.append(e))
    assert "Deployment" not in _kinds(kube) and _kinds(kube).count("Job") == 1
    job = next(o for k, o in kube.objects.items() if k[0] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == BUILDER_CONTAINER and "--parity-max-abs-error" in container["args"]
    assert _arg(job, "--store") == "s3://models/artifacts" and "--reuse" in container["args"]
    assert _arg(job, "--collect-prefix") == "shop/ctr-dnn/" and _arg(job, "--keep-recent") == "2"
    assert {"prefix": "STORE_", "secretRef": {"name": "store-keys"}} in container["envFrom"]
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    assert job["spec"]["backoffLimit"] == 0
    assert _condition(kube, "ModelRepositoryReady")["reason"] == "Building"

    key = _finish_build(kube)
    rec.reconcile(model_body(minimal_spec()), lambda *e: events.append(e))
    dep = next(o for k, o in kube.objects.items() if k[0] == "Deployment")
    pod = dep["spec"]["template"]
    (init,) = pod["spec"]["initContainers"]
    assert init["name"] == FETCH_CONTAINER and init["image"] == "recserve/operator:test"
    assert init["args"][init["args"].index("--digest") + 1] == DIGEST
    assert init["args"][init["args"].index("--artifact-key") + 1] == key
    assert pod["metadata"]["annotations"][ARTIFACT_DIGEST_ANNOTATION] == DIGEST
    assert not any(v.get("configMap") or v.get("persistentVolumeClaim") for v in pod["spec"]["volumes"])
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert _condition(kube, "ModelRepositoryReady")["reason"] == "Built"

    # A scale-out (and every later reconcile) builds nothing: same single Job, the Deployment only grows.
    applies = kube.requests["apply"]
    rec.reconcile(model_body(SCALED, generation=2), lambda *e: events.append(e))
    assert _kinds(kube).count("Job") == 1
    assert next(o for k, o in kube.objects.items() if k[0] == "Deployment")["spec"]["replicas"] == 3
    rec.reconcile(model_body(SCALED, generation=2), lambda *e: events.append(e))
    # The Deployment's scale and, now that it runs several pods, its disruption budget; the Job is never re-applied.
    assert kube.requests["apply"] == applies + 2
    assert _kinds(kube).count("PodDisruptionBudget") == 1


def test_a_failed_build_never_creates_the_deployment_and_the_stable_keeps_serving(env: Any) -> None:
    rec, kube, events = env
    rec.reconcile(model_body(minimal_spec()), lambda *e: events.append(e))
    _finish_build(kube)
    rec.reconcile(model_body(minimal_spec()), lambda *e: events.append(e))
    stable = kube.status["stable"]["revision"]
    kube.make_available(stable)

    v4 = minimal_spec(model={"uri": "pvc://models/ctr-dnn/4", "format": "keras", "version": 4})
    rec.reconcile(model_body(v4, generation=2), lambda *e: events.append(e))
    failure = json.dumps({"status": "failed", "error": "parity gate failed for ctr-dnn (fp32): max abs error 0.3"})
    for (kind, _, name), obj in list(kube.objects.items()):
        if kind == "Job" and stable not in name:
            labels = obj["spec"]["template"]["metadata"]["labels"]
            kube.objects[("Pod", "shop", f"{name}-y")] = {
                "kind": "Pod", "metadata": {"name": f"{name}-y", "namespace": "shop", "labels": labels},
                "status": {"containerStatuses": [{"name": BUILDER_CONTAINER, "state": {
                    "terminated": {"exitCode": 4, "message": failure}}}]}}
    rec.reconcile(model_body(v4, generation=2), lambda *e: events.append(e))
    deployments = [k[2] for k in kube.objects if k[0] == "Deployment"]
    assert deployments == [f"ctr-dnn-{stable}"]
    repo = _condition(kube, "ModelRepositoryReady")
    assert repo["reason"] == "BuildFailed" and "parity gate failed" in repo["message"]
    assert "kubectl logs job/ctr-dnn-" in repo["message"]
    assert _condition(kube, "Ready")["status"] == "True" and kube.status["stable"]["revision"] == stable


@pytest.mark.parametrize(
    ("status", "pods", "expected"),
    [
        ("no pod yet", [], {"building": True}),
        ("finished without an outcome (a simulated node)", [{"exitCode": 0, "message": ""}],
         {"failed": "the build finished without reporting its artifact"}),
        ("published", [{"exitCode": 0, "message": json.dumps({"artifact": {"key": "k", "digest": DIGEST}})}],
         {"digest": DIGEST, "key": "k"}),
        ("failed", [{"exitCode": 3, "message": json.dumps({"error": "S3 object not found"})}],
         {"failed": "model-repo-builder exited with code 3: S3 object not found"}),
    ],
)
def test_observe_build(status: str, pods: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    job = {"metadata": {"name": "m-r-build"}, "status": {}}
    pod_objs = [{"metadata": {"name": "p", "labels": build_labels("m", "r")}, "status": {"containerStatuses": [
        {"name": BUILDER_CONTAINER, "state": {"terminated": t}}]}} for t in pods]
    seen = observe_build(job, pod_objs)
    for field, value in expected.items():
        got = getattr(seen, field)
        assert (value in got) if isinstance(value, str) and field == "failed" else got == value, (status, seen)


def test_only_a_tensorrt_build_holds_a_gpu_and_every_build_runs_on_the_target_product(env: Any) -> None:
    """An ONNX Runtime build (conversion, parity gate on the CPU provider) must not wait for a GPU that serving
    pods hold; a TensorRT engine is built on the GPU it will run on."""
    rec, kube, events = env
    rec.reconcile(model_body(minimal_spec()), lambda *e: events.append(e))
    job = next(o for k, o in kube.objects.items() if k[0] == "Job")
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}

    trt = minimal_spec(optimize={"backend": "tensorrt", "precision": "fp16"},
                       serving={"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G", "instances": {"kind": "GPU"}})
    rec.reconcile(model_body(trt, name="ctr-trt"), lambda *e: events.append(e))
    job = next(o for k, o in kube.objects.items() if k[0] == "Job" and k[2].startswith("ctr-trt-"))
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"


SOURCE = {"kind": "Secret", "metadata": {"name": "recserve-model-store", "namespace": "recserve-system"},
          "data": {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0", "s3.json": "e30="}}  # fmt: skip
MIRRORING = OperatorDefaults(model_store="s3://recserve-models/artifacts", model_store_secret="recserve-model-store",
                             model_store_secret_source="recserve-system/recserve-model-store")  # fmt: skip


def test_in_cluster_mode_the_store_keys_are_copied_into_the_models_namespace_before_its_build() -> None:
    kube = FakeKube()
    kube.objects[("Secret", "recserve-system", "recserve-model-store")] = SOURCE
    rec = Reconciler(kube, MIRRORING, FakeLive(kube))  # type: ignore[arg-type]
    rec.reconcile(model_body(minimal_spec()), lambda *e: None)
    copy = kube.objects[("Secret", "shop", "recserve-model-store")]
    assert copy["data"] == {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}  # not the identities
    assert copy["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "recserve"
    assert "ownerReferences" not in copy["metadata"]  # shared by the namespace's models
    job = next(o for k, o in kube.objects.items() if k[0] == "Job")
    envs = job["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {"prefix": "STORE_", "secretRef": {"name": "recserve-model-store"}} in envs
    # Applied before the Job (the pod would otherwise start without its keys), and not re-applied every loop:
    # the source and the copy are re-read at most every few minutes.
    order = [k for k in kube.objects if k[0] in ("Secret", "Job") and k[1] == "shop"]
    assert order[0][0] == "Secret"
    gets, applies = kube.requests["get"], kube.requests["apply"]
    for _ in range(3):
        rec.reconcile(model_body(minimal_spec()), lambda *e: None)
    assert kube.requests["get"] == gets and kube.requests["apply"] == applies


@pytest.mark.parametrize("source", [None, {"metadata": {"name": "s", "namespace": "n"}, "data": {}}],
                         ids=["missing", "without keys"])  # fmt: skip
def test_without_a_usable_source_secret_nothing_is_copied_and_the_build_still_starts(
    source: dict[str, Any] | None, caplog: pytest.LogCaptureFixture
) -> None:
    kube = FakeKube()
    if source is not None:
        kube.objects[("Secret", "recserve-system", "recserve-model-store")] = source
    rec = Reconciler(kube, MIRRORING, FakeLive(kube))  # type: ignore[arg-type]
    rec.reconcile(model_body(minimal_spec()), lambda *e: None)
    assert ("Secret", "shop", "recserve-model-store") not in kube.objects
    assert any(k[0] == "Job" for k in kube.objects)  # its pod reports the missing Secret
    assert "model store's keys" in caplog.text or "has no AWS_ACCESS_KEY_ID" in caplog.text


@pytest.mark.parametrize("source", ["recserve-model-store", "a/b/c", "/name", "ns/"])
def test_a_secret_source_must_be_namespace_slash_name(source: str) -> None:
    with pytest.raises(ValueError, match="namespace/name"):
        OperatorDefaults(model_store="s3://b", model_store_secret="keys", model_store_secret_source=source)
    with pytest.raises(ValueError, match="namespace/name"):
        OperatorDefaults(model_store="s3://b", model_store_secret_source="ns/name")  # no copy name


def test_a_pod_that_cannot_fetch_the_built_artifact_says_so_and_how_to_rebuild(env: Any) -> None:
    """Not a BuildFailed: the build succeeded; the store is down or no longer holds the artifact."""
    rec, kube, events = env
    rec.reconcile(model_body(minimal_spec()), lambda *e: events.append(e))
    _finish_build(kube)
    rec.reconcile(model_body(minimal_spec()), lambda *e: events.append(e))
    dep = next(o for k, o in kube.objects.items() if k[0] == "Deployment")
    revision = dep["metadata"]["labels"]["recserve.dev/revision"]
    error = json.dumps({"status": "failed", "error": "no artifact at shop/ctr-dnn/x in the model store"})
    kube.objects[("Pod", "shop", "serving-1")] = {
        "kind": "Pod", "metadata": {"name": "serving-1", "namespace": "shop",
                                    "labels": dep["spec"]["template"]["metadata"]["labels"]},
        "status": {"phase": "Pending", "initContainerStatuses": [{
            "name": FETCH_CONTAINER, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 3, "message": error}}}]}}  # fmt: skip
    rec.reconcile(model_body(minimal_spec()), lambda *e: events.append(e))
    repo = _condition(kube, "ModelRepositoryReady")
    assert repo["status"] == "False" and repo["reason"] == "FetchFailed", repo
    assert "no artifact at shop/ctr-dnn/x" in repo["message"]
    assert f"kubectl delete job ctr-dnn-{revision}-build" in repo["message"]
    assert kube.status["phase"] == "Failed"
    assert any(e[0] == "Warning" and e[1] == "FetchFailed" for e in events)
