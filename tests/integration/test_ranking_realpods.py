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
from numpy.typing import NDArray

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

# Runs in the operator image: one KServe v2 ranking request over HTTP (plain JSON) and one over gRPC
# (tritonclient), both through the router by Service DNS, and the served config.
CLIENT = """
import json, os, urllib.request
import numpy as np
import tritonclient.grpc as grpcclient
feeds = json.loads(os.environ["FEEDS"])
http, model = os.environ["HTTP"], os.environ["MODEL"]
body = {"inputs": [{"name": n, "shape": list(np.shape(v)), "datatype": "INT64" if n == "k" else "FP32",
                    "data": np.ravel(v).tolist()} for n, v in feeds.items()]}
req = urllib.request.Request(f"{http}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
outputs = {o["name"]: o["data"] for o in json.loads(urllib.request.urlopen(req, timeout=30).read())["outputs"]}
out = {"http": {"indices": outputs["indices"], "scores": outputs["scores"]}}
out["config"] = json.loads(urllib.request.urlopen(f"{http}/v2/models/{model}/config", timeout=30).read())
client = grpcclient.InferenceServerClient(os.environ["GRPC"])
inputs = []
for name, value in feeds.items():
    arr = np.asarray(value, dtype=np.int64 if name == "k" else np.float32)
    inp = grpcclient.InferInput(name, list(arr.shape), "INT64" if name == "k" else "FP32")
    inp.set_data_from_numpy(arr)
    inputs.append(inp)
res = client.infer(model, inputs)
out["grpc"] = {"indices": res.as_numpy("indices").tolist(), "scores": res.as_numpy("scores").tolist()}
print(json.dumps(out))
"""


def _request(tmp: Path) -> tuple[Path, dict[str, Any], NDArray[Any]]:
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
            "FEEDS": json.dumps(feeds), "HTTP": endpoints["http"], "GRPC": endpoints["grpc"],
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
