"""spec.serving.tuning: the build Job tunes against its own Triton before it publishes; status names the choice."""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_samples import minimal_spec, model_body
from recserve_operator.builders.common import Ids
from recserve_operator.builders.job import build_job
from recserve_operator.errors import InvalidSpec
from recserve_operator.names import BUILDER_CONTAINER, TUNER_CONTAINER, build_labels
from recserve_operator.observe import observe_build
from recserve_operator.reconcile import Reconciler
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import Tuning, parse_spec, revision_of
from test_build_once import STORE
from test_operator_reconcile import FakeKube, FakeLive

GPU = {"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-L4"}
TUNING = {"sloP99Milliseconds": 25, "concurrencyLevels": [16, 1, 4], "candidatesPerRequest": 100}
TUNED = {**GPU, "maxBatchSize": 128, "tuning": TUNING}


def _job(serving: dict[str, Any], **optimize: Any) -> dict[str, Any]:
    spec = parse_spec(minimal_spec(serving=serving, optimize=optimize or {"backend": "onnxruntime"}))
    return build_job(spec, Ids("ctr", "shop", revision_of(spec), "uid-1"), STORE, keep=["shop/ctr/old"])


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_tuning_is_parsed_with_sorted_levels_and_its_defaults_and_is_part_of_the_revision() -> None:
    spec = parse_spec(minimal_spec(serving=TUNED))
    assert spec.serving.tuning == Tuning(slo_p99_ms=25, concurrency_levels=(1, 4, 16), candidates_per_request=100)
    assert revision_of(spec) != revision_of(parse_spec(minimal_spec(serving={**GPU, "maxBatchSize": 128})))
    assert revision_of(parse_spec(minimal_spec(serving=GPU))) == revision_of(parse_spec(minimal_spec(serving=GPU)))


@pytest.mark.parametrize(
    ("tuning", "serving", "message"),
    [
        ({}, {}, "spec.serving.tuning.sloP99Milliseconds is required"),
        ({"sloP99Milliseconds": 25, "candidatesPerRequest": 300}, {},
         "spec.serving.tuning.candidatesPerRequest must not exceed spec.serving.maxBatchSize (256)"),
        ({"sloP99Milliseconds": 25, "concurrencyLevels": []}, {}, "concurrencyLevels must be a non-empty list"),
        ({"sloP99Milliseconds": 25, "instanceCounts": [1, 1]}, {}, "instanceCounts must not repeat"),
        ({"sloP99Milliseconds": 25, "maxQueueDelaysMicroseconds": [-1]}, {}, "integers in 0..1000000"),
        ({"sloP99Milliseconds": 25}, {"ranking": {"requestColumns": "0-3"}},
         "a ranking model has no batch dimension"),
    ],
)
def test_a_bad_tuning_is_an_invalid_spec_naming_the_field(
    tuning: dict[str, Any], serving: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidSpec, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(minimal_spec(serving={**GPU, **serving, "tuning": tuning}, optimize={"backend": "onnxruntime"}))


def test_a_tuning_build_job_builds_in_its_init_container_then_tunes_beside_triton_and_publishes() -> None:
    pod = _job(TUNED)["spec"]["template"]["spec"]
    builder, triton = pod["initContainers"]
    (tuner,) = pod["containers"]
    assert builder["name"] == BUILDER_CONTAINER and tuner["name"] == TUNER_CONTAINER
    # The builder checks the store (--reuse) and builds, but publishes nothing and reports nothing.
    assert "--defer-publish" in builder["args"] and "--reuse" in builder["args"]
    assert "--termination-log" not in builder["args"] and "--collect-prefix" not in builder["args"]
    # Triton: a native sidecar, started once /models is built, explicit control so the tuner loads each candidate.
    assert triton["restartPolicy"] == "Always" and triton["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--model-control-mode=explicit" in triton["args"]
    assert not any(a.startswith("--load-model") for a in triton["args"])
    # The tuner measures that Triton with the spec's range and publishes what it applied.
    args = tuner["args"]
    assert args[0] == "profile" and _arg(args, "--url") == "127.0.0.1:8001" and "--apply" in args
    assert _arg(args, "--slo-p99-ms") == "25" and _arg(args, "--concurrency-levels") == "1,4,16"
    assert _arg(args, "--candidates") == "100" and _arg(args, "--instance-counts") == "1,2"
    assert _arg(args, "--max-queue-delays-us") == "0,1000,5000" and _arg(args, "--duration-s") == "3"
    assert _arg(args, "--artifact-key") == _arg(builder["args"], "--artifact-key")
    assert _arg(args, "--termination-log") == "/dev/termination-log" and _arg(args, "--keep") == "shop/ctr/old"
    assert {"prefix": "STORE_", "secretRef": {"name": "store-keys"}} in tuner["envFrom"]
    for c in (builder, triton, tuner):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {v["name"] for v in pod["volumes"]} >= {"models", "tmp", "dshm"}


@pytest.mark.parametrize(
    ("optimize", "builder_gpu"),
    [({"backend": "onnxruntime"}, False), ({"backend": "tensorrt", "precision": "fp16"}, True)],
)
def test_the_tuning_sidecar_holds_the_serving_gpu_and_the_job_needs_no_more_than_one(
    optimize: dict[str, Any], builder_gpu: bool
) -> None:
    """The measured engine runs on the GPU it will serve on. A TensorRT builder (an init container) holds it
    first; Kubernetes counts init containers against the containers after them, so the pod asks for one GPU."""
    pod = _job(TUNED, **optimize)["spec"]["template"]["spec"]
    builder, triton = pod["initContainers"]
    (tuner,) = pod["containers"]

    def gpus(c: dict[str, Any]) -> int:
        return int(c["resources"]["requests"].get("nvidia.com/gpu", 0))

    assert gpus(triton) == 1 and gpus(tuner) == 0 and gpus(builder) == int(builder_gpu)
    assert max(gpus(builder), gpus(triton) + gpus(tuner)) == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}


def test_without_tuning_the_job_is_the_single_builder_that_publishes() -> None:
    pod = _job(GPU)["spec"]["template"]["spec"]
    assert "initContainers" not in pod and [c["name"] for c in pod["containers"]] == [BUILDER_CONTAINER]
    assert "--termination-log" in pod["containers"][0]["args"]
    assert "--defer-publish" not in pod["containers"][0]["args"]


def _pod(init: list[dict[str, Any]], main: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"name": "p", "labels": build_labels("m", "r")},
            "status": {"initContainerStatuses": init, "containerStatuses": main}}  # fmt: skip


def _ended(name: str, code: int, message: str) -> dict[str, Any]:
    return {"name": name, "state": {"terminated": {"exitCode": code, "message": message}}}


DIGEST = "cd" * 32
OUTCOME = {"artifact": {"key": "k", "digest": DIGEST, "reused": False},
           "tuning": {"chosen": "inst=2 delay=1000us pref=-", "slo_met": True, "slo_p99_ms": 25,
                      "concurrency_levels": [1, 4, 16]}}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "pod", "expected"),
    [
        ("tuned and published",
         _pod([_ended(BUILDER_CONTAINER, 0, "")], [_ended(TUNER_CONTAINER, 0, json.dumps(OUTCOME))]),
         {"digest": DIGEST, "tuned": "inst=2 delay=1000us pref=- (p99 within 25 ms at concurrency 1-16)"}),
        ("no configuration met the SLO",
         _pod([], [_ended(TUNER_CONTAINER, 0, json.dumps(
             {**OUTCOME, "tuning": {**OUTCOME["tuning"], "chosen": "inst=1 no-batching", "slo_met": False}}))]),
         {"tuned": "inst=1 no-batching (p99 not within (no configuration met it) 25 ms at concurrency 1-16)"}),
        ("reused: nothing tuned this time",
         _pod([], [_ended(TUNER_CONTAINER, 0, json.dumps({"artifact": {**OUTCOME["artifact"], "reused": True}}))]),
         {"digest": DIGEST, "tuned": None}),
        ("the build failed in the init container",
         _pod([_ended(BUILDER_CONTAINER, 4, json.dumps({"error": "parity gate failed"}))], []),
         {"failed": "model-repo-builder exited with code 4: parity gate failed"}),
        ("the tuner failed",
         _pod([_ended(BUILDER_CONTAINER, 0, "")], [_ended(TUNER_CONTAINER, 3, json.dumps(
             {"error": "no Triton answered at 127.0.0.1:8001 within 600s"}))]),
         {"failed": "model-repo-builder (tune) exited with code 3: no Triton answered"}),
        ("still tuning", _pod([_ended(BUILDER_CONTAINER, 0, "")], []), {"building": True}),
    ],
)
def test_observe_a_tuning_build(case: str, pod: dict[str, Any], expected: dict[str, Any]) -> None:
    seen = observe_build({"metadata": {"name": "m-r-build"}, "status": {}}, [pod])
    for field, value in expected.items():
        got = getattr(seen, field)
        assert (value in got) if field == "failed" else got == value, (case, seen)


def _condition(kube: FakeKube, type_: str) -> dict[str, Any]:
    assert kube.status is not None
    return next(c for c in kube.status["conditions"] if c["type"] == type_)


def test_the_repository_condition_names_the_tuned_configuration() -> None:
    kube = FakeKube()
    rec = Reconciler(kube, STORE, FakeLive(kube))  # type: ignore[arg-type]
    body = model_body(minimal_spec(serving=TUNED, optimize={"backend": "onnxruntime"}))
    rec.reconcile(body, lambda *e: None)
    job = next(o for k, o in kube.objects.items() if k[0] == "Job")
    labels = job["spec"]["template"]["metadata"]["labels"]
    tuner = job["spec"]["template"]["spec"]["containers"][0]
    key = _arg(tuner["args"], "--artifact-key")
    outcome = {**OUTCOME, "artifact": {**OUTCOME["artifact"], "key": key}}
    kube.objects[("Pod", "shop", "build-pod")] = {
        "kind": "Pod", "metadata": {"name": "build-pod", "namespace": "shop", "labels": labels},
        "status": _pod([_ended(BUILDER_CONTAINER, 0, "")],
                       [_ended(TUNER_CONTAINER, 0, json.dumps(outcome))])["status"]}  # fmt: skip
    rec.reconcile(body, lambda *e: None)
    repo = _condition(kube, "ModelRepositoryReady")
    assert repo["reason"] == "Built" and "tuned: inst=2 delay=1000us pref=- (p99 within 25 ms" in repo["message"]


def test_without_a_model_store_the_condition_says_tuning_is_not_applied() -> None:
    kube = FakeKube()
    rec = Reconciler(kube, OperatorDefaults(), FakeLive(kube))  # type: ignore[arg-type]
    body = model_body(minimal_spec(serving=TUNED, optimize={"backend": "onnxruntime"}))
    rec.reconcile(body, lambda *e: None)
    assert not any(k[0] == "Job" for k in kube.objects)
    kube.make_available(kube.status["stable"]["revision"])
    rec.reconcile(body, lambda *e: None)
    repo = _condition(kube, "ModelRepositoryReady")
    assert repo["reason"] == "Built" and "spec.serving.tuning not applied" in repo["message"]
