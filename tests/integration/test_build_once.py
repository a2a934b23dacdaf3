"""Build once per revision, on real pods: a build Job publishes to the model store, serving pods only fetch.

The chart runs its embedded model store (`modelStore.embedded`: SeaweedFS in the release namespace, admitting
only the keys the chart generated and put, as a Secret, in the watched namespace). The CTR model is uploaded to
that store too, with those keys. A revision is built by one Job on the real node; its pods' init container is the
operator image's `fetch-artifact` (no TensorFlow, no builder image), which checks the artifact against the digest
the build reported.
A scale-out creates no Job; a failed build creates no Deployment and the stable revision keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from recserve_operator import conditions as c
from recserve_operator.names import (
    ARTIFACT_DIGEST_ANNOTATION,
    BUILDER_CONTAINER,
    FETCH_CONTAINER,
    INSTANCE_LABEL,
    TUNER_CONTAINER,
)

from recserve_cluster import images
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
from tests.integration.s3store import BUCKET, CREDENTIALS, KEYS, RESOURCES, Store, input_name, upload

pytestmark = [pytest.mark.integration, pytest.mark.realnode]


def _store_values(ns: str) -> dict[str, Any]:
    embedded = {"enabled": True, "image": images.seaweedfs().ref, "persistence": {"enabled": False, "size": "1Gi"}}
    return {"modelStore": {"embedded": embedded, "secretName": CREDENTIALS}}


platform = platform_fixture("t-build-once", _store_values)


@pytest.fixture(scope="module")
def store(cluster: Cluster, platform: str, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """The chart's store, as the operator was told of it (its defaults ConfigMap); the CTR model uploaded."""
    ns = platform
    defaults = next(c for c in get(cluster, "configmaps", "-n", f"{ns}-system")["items"]
                    if c["metadata"]["name"].endswith("-defaults"))["data"]  # fmt: skip
    endpoint = defaults["RECSERVE_MODEL_STORE_ENDPOINT"]
    assert defaults["RECSERVE_MODEL_STORE"] == "s3://recserve-models/artifacts", defaults
    assert endpoint.startswith("http://") and f".{ns}-system.svc." in endpoint, endpoint
    keys = get(cluster, "secret", CREDENTIALS, "-n", ns)
    assert keys is not None, "the chart put the store's keys in the watched namespace"
    path, x, expected = keras_model(tmp_path_factory.mktemp("model"))
    report = upload(cluster, ns, endpoint, path)
    assert set(report["sizes"]) == set(KEYS.values()), report
    # Only the chart's keys get in: a wrong secret and an unsigned request are refused.
    assert report["wrong_secret"] == "403" and report["anonymous"] == "403", report
    return Store(ns, endpoint, "", "", "", x, expected)


def _model(store: Store, version: int, **model: Any) -> dict[str, Any]:
    rm = recommender_model(f"s3://{BUCKET}/{KEYS[version]}", version,
                           model={"endpoint": store.endpoint, "credentials": {"secretRef": {"name": CREDENTIALS}},
                                  **model},
                           serving={"resources": RESOURCES})  # fmt: skip
    return {**rm, "metadata": {"name": MODEL, "namespace": store.namespace}}


def _jobs(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    return list(get(cluster, "jobs", "-n", ns, "-l", f"{INSTANCE_LABEL}={MODEL}")["items"])


def _pods(cluster: Cluster, ns: str, selector: str) -> list[dict[str, Any]]:
    return list(get(cluster, "pods", "-n", ns, "-l", selector)["items"])


def _seconds(state: dict[str, Any]) -> float:
    t = state["terminated"]
    started, finished = (datetime.fromisoformat(t[k].replace("Z", "+00:00")) for k in ("startedAt", "finishedAt"))
    return (finished - started).total_seconds()


@pytest.fixture(scope="module")
def served(cluster: Cluster, store: Store) -> Iterator[dict[str, Any]]:
    apply(cluster, _model(store, 1))
    try:
        yield wait_model_ready(cluster, store.namespace)
    finally:
        cluster.kubectl("delete", "recommendermodel", MODEL, "-n", store.namespace, "--ignore-not-found",
                        "--wait=true", "--timeout=120s", check=False, timeout=150)  # fmt: skip


def test_a_revision_is_built_once_by_a_job_and_a_scale_out_only_fetches_the_artifact(
    cluster: Cluster, store: Store, served: dict[str, Any]
) -> None:
    ns, revision = store.namespace, served["status"]["stable"]["revision"]
    (job,) = _jobs(cluster, ns)
    assert job["metadata"]["name"] == f"{MODEL}-{revision}-build"
    assert any(x["type"] == "Complete" and x["status"] == "True" for x in job["status"]["conditions"]), job["status"]
    (build_pod,) = _pods(cluster, ns, f"job-name={job['metadata']['name']}")
    (build,) = build_pod["status"]["containerStatuses"]
    outcome = json.loads(build["state"]["terminated"]["message"])
    digest = outcome["artifact"]["digest"]
    assert build["name"] == BUILDER_CONTAINER and len(digest) == 64, outcome

    def serving_pods() -> list[dict[str, Any]]:
        return [p for p in _pods(cluster, ns, f"recserve.dev/revision={revision},app.kubernetes.io/component=predictor")
                if not p["metadata"].get("deletionTimestamp")]  # fmt: skip

    (pod,) = serving_pods()
    (init,) = pod["spec"]["initContainers"]
    assert init["name"] == FETCH_CONTAINER and init["image"] == images.operator_image(), init
    assert init["args"][init["args"].index("--digest") + 1] == digest
    assert pod["metadata"]["annotations"][ARTIFACT_DIGEST_ANNOTATION] == digest
    assert all(ct["image"] != images.BUILDER for ct in pod["spec"]["containers"] + pod["spec"]["initContainers"])
    repo = {x["type"]: x for x in served["status"]["conditions"]}[c.MODEL_REPOSITORY_READY]
    assert (repo["status"], repo["reason"]) == ("True", c.BUILT), repo

    endpoint = served["status"]["endpoints"]["http"]
    got = infer_in_cluster(cluster, ns, f"{endpoint}/v2/models/{MODEL}/infer", store.x,
                           input_name(cluster, ns, pod["metadata"]["name"]))  # fmt: skip
    assert abs(got - store.expected.reshape(got.shape)).max() < 1e-4

    # Scale out: a new pod fetches; nothing builds.
    cluster.kubectl("patch", "recommendermodel", MODEL, "-n", ns, "--type=merge",
                    "-p", json.dumps({"spec": {"serving": {"replicas": 2}}}))  # fmt: skip
    pods = wait_for(lambda: (ps := serving_pods()) and len(ps) == 2 and all(
        any(x["type"] == "Ready" and x["status"] == "True" for x in p["status"].get("conditions") or [])
        for p in ps) and ps, 300, 2, "the second replica to be Ready")  # fmt: skip
    assert len(_jobs(cluster, ns)) == 1, "a scale-out created a build Job"
    new = next(p for p in pods if p["metadata"]["name"] != pod["metadata"]["name"])
    (fetch,) = new["status"]["initContainerStatuses"]
    assert fetch["name"] == FETCH_CONTAINER and fetch["state"]["terminated"]["exitCode"] == 0, fetch
    build_s, fetch_s = _seconds(build["state"]), _seconds(fetch["state"])
    print(f"\nbuild once: the build Job's builder ran {build_s:.1f} s; a scale-out pod's fetch ran {fetch_s:.1f} s "
          f"({build_s / max(fetch_s, 1.0):.1f}x less than a rebuild per pod)")  # fmt: skip
    assert fetch_s < build_s


def test_a_failed_build_creates_no_deployment_and_the_stable_revision_keeps_serving(
    cluster: Cluster, store: Store, served: dict[str, Any]
) -> None:
    ns, stable = store.namespace, served["status"]["stable"]["revision"]
    apply(cluster, _model(store, 2, sha256="0" * 64))

    def failed() -> dict[str, Any] | None:
        st = (get(cluster, "recommendermodel", MODEL, "-n", ns) or {}).get("status") or {}
        repo = {x["type"]: x for x in st.get("conditions") or []}.get(c.MODEL_REPOSITORY_READY) or {}
        return st if repo.get("reason") == c.BUILD_FAILED else None

    st = wait_for(failed, 300, 3, "the pinned-to-a-wrong-digest version to report BuildFailed")
    conds = {x["type"]: x for x in st["conditions"]}
    message = conds[c.MODEL_REPOSITORY_READY]["message"]
    assert "sha256 mismatch" in message and "kubectl logs job/" in message, message
    assert (conds[c.READY]["status"], conds[c.READY]["reason"]) == ("True", c.AVAILABLE), conds[c.READY]
    assert st["stable"]["revision"] == stable
    deployments = [d["metadata"]["name"] for d in get(cluster, "deployments", "-n", ns, "-l",
                                                      f"{INSTANCE_LABEL}={MODEL}")["items"]]  # fmt: skip
    assert deployments == [f"{MODEL}-{stable}"], deployments
    assert len(_jobs(cluster, ns)) == 2  # the stable's and the failed one (its log stays readable)


TUNED = "ctr-tuned"


def test_a_tuned_revision_serves_the_configuration_its_build_job_measured_on_the_node(
    cluster: Cluster, store: Store
) -> None:
    """spec.serving.tuning: the build Job builds in its init container, a Triton sidecar (the serving image, on the
    GPU product) serves the result, the tuner measures every configuration at every level and publishes the
    choice. The serving pod's Triton runs exactly that configuration, and the condition names it."""
    ns = store.namespace
    rm = _model(store, 1)
    rm["metadata"]["name"] = TUNED
    rm["spec"]["serving"]["tuning"] = {"sloP99Milliseconds": 5000, "concurrencyLevels": [1, 4],
                                       "candidatesPerRequest": 32, "instanceCounts": [1, 2],
                                       "maxQueueDelaysMicroseconds": [500], "durationSeconds": 1}  # fmt: skip
    apply(cluster, rm)
    try:
        served = wait_model_ready(cluster, ns, TUNED, timeout=900)
        revision = served["status"]["stable"]["revision"]
        (build_pod,) = _pods(cluster, ns, f"job-name={TUNED}-{revision}-build")
        inits = {s["name"]: s for s in build_pod["status"]["initContainerStatuses"]}
        assert inits[BUILDER_CONTAINER]["state"]["terminated"]["exitCode"] == 0, inits
        assert "triton" in inits, inits  # the sidecar ran beside the tuner (stopped once it was done)
        (tuner,) = build_pod["status"]["containerStatuses"]
        assert tuner["name"] == TUNER_CONTAINER and tuner["state"]["terminated"]["exitCode"] == 0, tuner
        outcome = json.loads(tuner["state"]["terminated"]["message"])
        chosen = outcome["tuning"]["chosen"]
        assert outcome["tuning"]["concurrency_levels"] == [1, 4] and len(outcome["artifact"]["digest"]) == 64
        repo = {x["type"]: x for x in served["status"]["conditions"]}[c.MODEL_REPOSITORY_READY]
        assert f"tuned: {chosen}" in repo["message"], repo

        (pod,) = [p for p in _pods(cluster, ns, f"recserve.dev/revision={revision},"
                                                "app.kubernetes.io/component=predictor")
                  if not p["metadata"].get("deletionTimestamp")]  # fmt: skip
        raw = cluster.kubectl("get", "--raw",
                              f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}:8000/proxy/v2/models/{TUNED}/config")
        config = json.loads(raw.stdout)
        count = config["instance_group"][0]["count"]
        batching = "dynamic_batching" in config
        assert chosen.startswith(f"inst={count} ") and (("no-batching" not in chosen) == batching), (chosen, config)
        if batching:
            assert config["dynamic_batching"].get("max_queue_delay_microseconds", 0) in (500, "500"), config

        endpoint = served["status"]["endpoints"]["http"]
        got = infer_in_cluster(cluster, ns, f"{endpoint}/v2/models/{TUNED}/infer", store.x, config["input"][0]["name"])
        assert abs(got - store.expected.reshape(got.shape)).max() < 1e-4
        print(f"\ntuned in the build Job: {repo['message']}")
    finally:
        cluster.kubectl("delete", "recommendermodel", TUNED, "-n", ns, "--ignore-not-found", "--wait=true",
                        "--timeout=120s", check=False, timeout=150)  # fmt: skip
