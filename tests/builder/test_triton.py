"""Built repositories served by the real Triton binary (nvidia-pytriton), queried over HTTP and gRPC; profiling."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from numpy.typing import NDArray

from model_repo_builder import config as C
from model_repo_builder import convert
from model_repo_builder.builder import BuildRequest, build
from model_repo_builder.profile import ProfileRequest, run_profile
from model_repo_builder.triton_local import TritonError, TritonServer
from tests.builder.models import synthetic_ctr

pytestmark = [pytest.mark.triton, pytest.mark.builder]


@pytest.fixture(scope="module")
def python_repo(ctr_keras: Path, two_tower_keras: Path, ctr_parity_npz: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("triton_repo")
    # Library use: paths may be Path objects as well as URIs.
    build(BuildRequest(source=str(ctr_keras), repo=repo, name="ctr", backend="python", max_batch_size=128,
                       preferred_batch_sizes=(32, 64), max_queue_delay_us=100, warmup_batch_size=4,
                       parity_data=ctr_parity_npz))
    build(BuildRequest(source=str(two_tower_keras), repo=repo, name="two_tower", backend="python",
                       max_batch_size=64, precision="int8"))
    return repo


@pytest.fixture(scope="module")
def triton(python_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    log = tmp_path_factory.mktemp("triton_log") / "tritonserver.log"
    with TritonServer(python_repo, log_path=log) as server:
        yield server


def _ctr_inputs(n: int) -> dict[str, NDArray[Any]]:
    feats, _ = synthetic_ctr(n, seed=11)
    return {"features": np.concatenate([feats["user"], feats["item"], feats["context"]], axis=1)}


def test_http_predictions_match_keras(triton: TritonServer, ctr_keras: Path) -> None:
    feeds = _ctr_inputs(50)
    expected = convert.load_source(ctr_keras, "keras").predict(feeds)["ctr"]
    client = httpclient.InferenceServerClient(triton.http_url)
    try:
        assert client.is_model_ready("ctr")
        cfg = client.get_model_config("ctr")
        assert cfg["backend"] == "python" and cfg["max_batch_size"] == 128
        inp = httpclient.InferInput("features", [50, 32], "FP32")
        inp.set_data_from_numpy(feeds["features"])
        got = client.infer("ctr", [inp], outputs=[httpclient.InferRequestedOutput("ctr")]).as_numpy("ctr")
    finally:
        client.close()
    assert got.shape == (50, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_grpc_two_input_int8_model_ranks_like_keras(triton: TritonServer, two_tower_keras: Path) -> None:
    feats, _ = synthetic_ctr(64, seed=12)
    feeds = {"user": feats["user"], "item": feats["item"]}
    expected = convert.load_source(two_tower_keras, "keras").predict(feeds)["score"]
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        inputs = []
        for name, arr in feeds.items():
            inp = grpcclient.InferInput(name, list(arr.shape), "FP32")
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        got = client.infer("two_tower", inputs).as_numpy("score")
        meta = client.get_model_metadata("two_tower", as_json=True)
    finally:
        client.close()
    assert {i["name"] for i in meta["inputs"]} == {"user", "item"}
    assert np.abs(got - expected).max() < 0.05  # int8: bounded error...
    top_expected = set(np.argsort(-expected[:, 0])[:10].tolist())
    top_got = set(np.argsort(-got[:, 0])[:10].tolist())
    assert len(top_expected & top_got) >= 8  # ...and the same top candidates


def test_serve_local_cli_check(python_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.builder.helpers import run_cli

    r = run_cli(capsys, "serve-local", "--repo", python_repo, "--http-port", "0", "--grpc-port", "0",
                "--metrics-port", "0", "--check", "--json")
    assert r.code == 0, r.err
    assert r.json["models"] == {"ctr": {"ctr": [4, 1]}, "two_tower": {"score": [4, 1]}}


def test_startup_failure_reports_log(tmp_path: Path) -> None:
    bad = tmp_path / "repo" / "broken"
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\nmax_batch_size: 1\n')
    with pytest.raises(TritonError, match=r"no_such_backend|exited with code"), TritonServer(tmp_path / "repo",
                                                                                            ready_timeout_s=60):
        pass


def test_profile_writes_choice_table_and_plot(python_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile"
    result = run_profile(ProfileRequest(
        repo=python_repo, name="ctr", candidates=32, concurrency=4, slo_p99_ms=1000.0, max_queue_delays_us=(500,),
        instance_counts=(1, 2), duration_s=0.6, warmup_s=0.2, out_dir=out,
    ))
    labels = [r["label"] for r in result["results"]]
    assert labels == ["inst=1 no-batching", "inst=1 delay=500us pref=-", "inst=2 no-batching",
                      "inst=2 delay=500us pref=-"]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in result["results"])
    assert result["slo_met"] and result["chosen"]["throughput_rps"] == max(r["throughput_rps"]
                                                                            for r in result["results"])
    chosen_cfg = C.parse_pbtxt((out / "config.pbtxt").read_text())
    assert chosen_cfg.instance_group[0].count == result["chosen"]["candidate"]["instance_count"]
    assert C.signature_from_config(chosen_cfg) is not None
    assert (out / "throughput_vs_p99.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "results.csv").read_text().splitlines()) == 5
    assert json.loads((out / "results.json").read_text())["chosen"] == result["chosen"]["label"]


def test_profile_over_a_load_range_records_the_choice_and_why_in_build_json(
    python_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every configuration at every level; --apply writes the chosen config and its table into build.json, which
    `inspect` shows."""
    import shutil

    from tests.builder.helpers import run_cli

    repo = tmp_path / "repo"
    shutil.copytree(python_repo, repo)
    r = run_cli(capsys, "profile", "--repo", repo, "--name", "ctr", "--candidates", "32", "--concurrency-levels",
                "1,4", "--slo-p99-ms", "1000", "--max-queue-delays-us", "500", "--instance-counts", "1,2",
                "--duration-s", "0.5", "--out", tmp_path / "profile", "--apply", "--json")  # fmt: skip
    assert r.code == 0, r.err
    result = r.json
    assert result["levels"] == [1, 4] and [t["concurrency"] for t in result["table"]] == [1, 4]
    assert len(result["results"]) == 4 * 2  # every configuration at every level
    assert {m["concurrency"] for m in result["results"]} == {1, 4}
    assert result["reason"] and result["slo_met"]
    tuning = json.loads((repo / "ctr" / "1" / "build.json").read_text())["tuning"]
    assert tuning["chosen"] == result["chosen"]["label"] and tuning["concurrency_levels"] == [1, 4]
    assert tuning["reason"] == result["reason"]
    shown = run_cli(capsys, "inspect", repo / "ctr", "--json")
    assert shown.code == 0 and shown.json["model"]["tuning"]["chosen"] == tuning["chosen"]


_RECORDING_MODEL = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.log = params["recserve_test_log"]["string_value"]

    def execute(self, requests):
        # One line per execution: the rows it scored (Triton hands a warmup batch over as one execution of
        # batch_size one-row requests) and the sum of their absolute values.
        xs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        with open(self.log, "a") as f:
            f.write(f"{sum(x.shape[0] for x in xs)} {float(sum(np.abs(x).sum() for x in xs))}\\n")
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", x.sum(axis=1, keepdims=True))]) for x in xs]
'''


def _summary_series(metrics: str, model: str) -> dict[str, float]:
    prefix = "nv_inference_request_summary_us"
    out = {}
    for line in metrics.splitlines():
        if line.startswith(prefix) and f'model="{model}"' in line:
            name, value = line.rsplit(" ", 1)
            quantile = name.split('quantile="')[1].split('"')[0] if "quantile=" in name else None
            key = f"quantile={quantile}" if quantile else name.split("{")[0].removeprefix(prefix) or "value"
            out[key] = float(value)
    return out


def test_triton_warms_the_model_up_before_ready_and_exports_latency_summaries(tmp_path: Path) -> None:
    # What the operator's pod runs: its Triton flags, and a config whose model_warmup the builder merged from the
    # operator's template. The CPU stand-in image runs this same binary (images/triton), so this is its behaviour.
    from recserve_operator.builders.common import Ids
    from recserve_operator.builders.deployment import triton_args

    repo, log = tmp_path / "repo", tmp_path / "executions.log"
    (repo / "rec" / "1").mkdir(parents=True)
    (repo / "rec" / "1" / "model.py").write_text(_RECORDING_MODEL)
    sig = C.ModelSignature(inputs=(C.TensorSpec("x", "float32", (4,)),), outputs=(C.TensorSpec("y", "float32", (1,)),))
    options = C.ServingOptions(backend="python", instance_kind="CPU", max_batch_size=8, warmup_batch_size=8)
    cfg = C.merge_signature(C.build_model_config("rec", options, None), "rec", sig)
    cfg.parameters["recserve_test_log"].string_value = str(log)
    (repo / "rec" / "config.pbtxt").write_text(C.to_pbtxt(cfg))
    flags = [a for a in triton_args(Ids("rec", "shop", "u", "r")) if a.startswith("--metrics-config=")]
    assert flags, "the operator turns the summaries on"

    with TritonServer(repo, extra_args=flags, ready_timeout_s=90) as server:
        # Ready means warmed up: both warmup batches (zeros) ran before any client request.
        assert server.model_ready("rec")
        assert log.read_text().splitlines() == ["1 0.0", "8 0.0"]
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            for _ in range(5):
                inp = httpclient.InferInput("x", [2, 4], "FP32")
                inp.set_data_from_numpy(np.ones((2, 4), dtype=np.float32))
                client.infer("rec", [inp])
        finally:
            client.close()
        import urllib.request

        with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
            series = _summary_series(resp.read().decode(), "rec")
    assert {"quantile=0.5", "quantile=0.9", "quantile=0.99"} <= set(series), series
    # This Triton counts the nine warmup requests in the summary too; the five client requests are in it either way.
    assert series["_count"] >= 5 and series["_sum"] > 0


def test_the_build_jobs_tuning_flow_defers_publishing_then_tunes_against_a_running_triton_and_publishes(
    python_repo: Path, ctr_keras: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a build Job with spec.serving.tuning runs: `build --defer-publish` (checks --reuse, publishes nothing),
    then `profile --url --apply --store` against the Job's Triton (explicit model control, started beside it):
    the tuned tree is published, its digest and the choice go to the termination log, and the fetched artifact
    serves the chosen configuration. A second Job for the same key reuses it without building or tuning."""
    import shutil

    from model_repo_builder import artifact as A
    from tests.builder.helpers import run_cli

    store_url, key = f"file://{tmp_path / 'store'}", "shop/ctr/r1-abc"
    built = run_cli(capsys, "build", "--source", ctr_keras, "--repo", tmp_path / "scratch", "--name", "ctr",
                    "--backend", "python", "--max-batch-size", "64", "--store", store_url, "--artifact-key", key,
                    "--reuse", "--defer-publish", "--json")  # fmt: skip
    assert built.code == 0, built.err
    assert "key" not in built.json["artifact"] and A.open_store(store_url).read(f"{key}/{A.MANIFEST}") is None

    repo = tmp_path / "models"
    shutil.copytree(python_repo, repo)
    log = tmp_path / "termination-log"
    with TritonServer(repo, model_control_mode="explicit", log_path=tmp_path / "triton.log") as server:
        tuned = run_cli(capsys, "profile", "--repo", repo, "--name", "ctr", "--url", server.grpc_url,
                        "--wait-for-server-s", "30", "--candidates", "32", "--concurrency-levels", "1,4",
                        "--slo-p99-ms", "1000", "--max-queue-delays-us", "500", "--instance-counts", "1,2",
                        "--duration-s", "0.5", "--out", tmp_path / "profile", "--apply", "--store", store_url,
                        "--artifact-key", key, "--reuse", "--termination-log", log, "--json")  # fmt: skip
    assert tuned.code == 0, tuned.err
    brief = json.loads(log.read_text())
    assert brief["artifact"]["key"] == key and not brief["artifact"]["reused"]
    assert brief["tuning"]["chosen"] == tuned.json["chosen"]["label"]
    assert brief["tuning"]["concurrency_levels"] == [1, 4]
    assert brief["name"] == "ctr" and brief["version"] == 1

    installed = A.fetch_artifact(A.open_store(store_url), key, brief["artifact"]["digest"], tmp_path / "pod")
    cfg = C.parse_pbtxt((installed / "config.pbtxt").read_text())
    chosen = tuned.json["chosen"]["candidate"]
    assert cfg.instance_group[0].count == chosen["instance_count"]
    assert cfg.HasField("dynamic_batching") == chosen["dynamic_batching"]
    assert json.loads((installed / "1" / "build.json").read_text())["tuning"]["chosen"] == brief["tuning"]["chosen"]

    again = run_cli(capsys, "profile", "--repo", tmp_path / "empty", "--name", "ctr", "--url", "127.0.0.1:9",
                    "--apply", "--store", store_url, "--artifact-key", key, "--reuse", "--json")  # fmt: skip
    assert again.code == 0 and again.json["artifact"] == {**brief["artifact"], "reused": True}
    rebuilt = run_cli(capsys, "build", "--source", tmp_path / "missing.keras", "--repo", tmp_path / "scratch2",
                      "--store", store_url, "--artifact-key", key, "--reuse", "--defer-publish", "--json")  # fmt: skip
    assert rebuilt.code == 0 and rebuilt.json["artifact"]["reused"]


def test_profile_publishing_needs_apply_and_a_server_that_answers(tmp_path: Path, python_repo: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tests.builder.helpers import run_cli

    store = ["--store", f"file://{tmp_path / 'store'}", "--artifact-key", "k"]
    r = run_cli(capsys, "profile", "--repo", python_repo, "--name", "ctr", "--url", "127.0.0.1:9", *store)
    assert r.code == 2 and "--apply" in r.err
    r = run_cli(capsys, "profile", "--repo", python_repo, "--name", "ctr", "--url", "127.0.0.1:9",
                "--wait-for-server-s", "1", "--apply", *store)  # fmt: skip
    assert r.code != 0 and "no Triton answered at 127.0.0.1:9" in r.err
