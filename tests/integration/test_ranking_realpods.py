"""A ranking model on real pods: spec.serving.ranking → built once with the head → top-k through the router.

The CTR DNN (user columns 0-15, item 16-27, context 28-31) is applied with `serving.ranking.requestColumns`
"0-15,28-31". Its build Job adds the ranking head and gates it against Keras; Triton serves it with no batch
dimension; a client pod asks the router (by Service DNS) over KServe v2 HTTP and gRPC for the top 10 of 300
candidates, more than the model's maxBatchSize (64): scored, not refused, and the same top 10 as Keras scoring
every duplicated row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recserve_cluster import images, volumes
from recserve_cluster.cluster import Cluster
from tests.integration.realpods import (
    MODEL,
    NODE,
    apply,
    get,
    platform_fixture,
    recommender_model,
    run_client_pod,
    wait_model_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

platform = platform_fixture("t-ranking")
CLAIM = "models"
N_CANDIDATES = 300
REQUEST_COLUMNS = "0-15,28-31"

# Runs in the operator image (tritonclient): one HTTP and one gRPC ranking request through the router.
CLIENT = """
import json, os, numpy as np
import tritonclient.grpc as grpcclient, tritonclient.http as httpclient
feeds = {k: np.asarray(v, dtype=np.int64 if k == "k" else np.float32)
         for k, v in json.loads(os.environ["FEEDS"]).items()}
out = {}
for proto, mod, url in (("http", httpclient, os.environ["HTTP"]), ("grpc", grpcclient, os.environ["GRPC"])):
    client = mod.InferenceServerClient(url)
    inputs = []
    for name, arr in feeds.items():
        inp = mod.InferInput(name, list(arr.shape), "INT64" if name == "k" else "FP32")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    res = client.infer(os.environ["MODEL"], inputs)
    out[proto] = {"indices": res.as_numpy("indices").tolist(), "scores": res.as_numpy("scores").tolist()}
    if proto == "http":
        out["config"] = client.get_model_config(os.environ["MODEL"])
print(json.dumps(out))
"""


def _request(tmp: Path) -> tuple[Path, dict[str, Any], np.ndarray]:
    """The model file, one ranking request of N_CANDIDATES candidates, and Keras's scores of the same rows."""
    import keras

    from tests.builder.models import ctr_dnn, synthetic_ctr

    path = ctr_dnn(tmp / "model.keras", steps=5, hidden=(16, 8))
    feats, _ = synthetic_ctr(N_CANDIDATES, seed=9)
    user, ctx = feats["user"][:1], feats["context"][:1]
    full = np.concatenate([np.repeat(user, N_CANDIDATES, 0), feats["item"], np.repeat(ctx, N_CANDIDATES, 0)], axis=1)
    expected = np.asarray(keras.models.load_model(path)(full)).reshape(-1)
    feeds = {"request": np.concatenate([user, ctx], axis=1).tolist(), "candidates": feats["item"].tolist(),
             "k": [10]}  # fmt: skip
    return path, feeds, expected


def test_a_ranking_model_answers_the_source_models_top_k_over_http_and_grpc_through_the_router(
    cluster: Cluster, platform: str, tmp_path: Path
) -> None:
    ns = platform
    path, feeds, expected = _request(tmp_path)
    volumes.upload(cluster, ns, CLAIM, NODE, {f"{MODEL}/1/model.keras": path})
    try:
        rm = recommender_model(f"pvc://{CLAIM}/{MODEL}/1/model.keras", 1,
                               serving={"ranking": {"requestColumns": REQUEST_COLUMNS, "maxK": 50}})  # fmt: skip
        apply(cluster, {**rm, "metadata": {"name": MODEL, "namespace": ns}})
        rm = wait_model_ready(cluster, ns)
        revision = rm["status"]["stable"]["revision"]
        (build,) = get(cluster, "pods", "-n", ns, "-l",
                       f"recserve.dev/revision={revision},app.kubernetes.io/component=builder")["items"]  # fmt: skip
        assert "--ranking-request-columns" in build["spec"]["containers"][0]["args"]
        endpoints = rm["status"]["endpoints"]
        out = json.loads(run_client_pod(cluster, ns, CLIENT, image=images.operator_image(), timeout=180, env={
            "FEEDS": json.dumps(feeds), "HTTP": endpoints["http"].removeprefix("http://"), "GRPC": endpoints["grpc"],
            "MODEL": MODEL}).strip().splitlines()[-1])  # fmt: skip
    finally:
        cluster.kubectl("delete", "recommendermodel", MODEL, "-n", ns, "--ignore-not-found", "--wait=true",
                        "--timeout=120s", check=False, timeout=150)
        volumes.remove(cluster, ns, CLAIM, NODE)
    want = np.argsort(-expected, kind="stable")[:10]
    for proto in ("http", "grpc"):
        np.testing.assert_array_equal(out[proto]["indices"], want, err_msg=proto)
        np.testing.assert_allclose(out[proto]["scores"], expected[want], atol=1e-4, err_msg=proto)
    config = out["config"]
    assert config["max_batch_size"] == 0 and [i["name"] for i in config["input"]] == ["request", "candidates", "k"]
    assert recommender_model("x", 1)["spec"]["serving"]["maxBatchSize"] < N_CANDIDATES  # more than a batch: scored
