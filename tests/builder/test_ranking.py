"""The ranking head on ONNX graphs: request features once, N candidates, top-k from ONNX Runtime itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from model_repo_builder import convert
from model_repo_builder import ranking as R
from model_repo_builder.config import ModelSignature, TensorSpec
from model_repo_builder.errors import BadInputError, UsageError

pytestmark = pytest.mark.builder

F = 10
REQUEST_COLUMNS = (0, 1, 2, 7)  # not a prefix: the head must put column 7 back between the candidates' columns


def _mlp(path: Path, *, inputs: dict[str, int], output: str = "ctr", seed: int = 0, scale_first: bool = False) -> Path:
    """sigmoid(relu(concat(inputs) @ W1) @ W2): a scoring model whose every column matters. `scale_first`: the
    input goes through a Mul before the MatMul (the head cannot split the first layer; it broadcasts)."""
    rng = np.random.default_rng(seed)
    width = sum(inputs.values())
    # Small weights: the sigmoid does not saturate, so scores are distinct (no ties at 1.0 to reorder).
    w1 = numpy_helper.from_array((0.3 * rng.standard_normal((width, 16))).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((0.3 * rng.standard_normal((16, 1))).astype(np.float32), "w2")
    nodes = []
    x = next(iter(inputs))
    if len(inputs) > 1:
        nodes.append(helper.make_node("Concat", list(inputs), ["x"], axis=1))
        x = "x"
    inits = [w1, w2]
    if scale_first:
        inits.append(numpy_helper.from_array(np.linspace(0.5, 1.5, width, dtype=np.float32), "scale"))
        nodes.append(helper.make_node("Mul", [x, "scale"], ["scaled"]))
        x = "scaled"
    nodes += [helper.make_node("MatMul", [x, "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
              helper.make_node("MatMul", ["a", "w2"], ["logit"]), helper.make_node("Sigmoid", ["logit"], [output])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", d]) for n, d in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", 1])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def _signature(inputs: dict[str, int], output: str = "ctr") -> ModelSignature:
    return ModelSignature(tuple(TensorSpec(n, "float32", (d,)) for n, d in inputs.items()),
                          (TensorSpec(output, "float32", (1,)),))  # fmt: skip


def _head(tmp_path: Path, model: Path, layout: R.RankingLayout) -> Any:
    path = tmp_path / "ranking.onnx"
    onnx.save(R.add_ranking_head(onnx.load(model), layout), path)
    return convert.onnx_predictor(path)


def _reference(source: Any, full: dict[str, NDArray[Any]], k: int) -> tuple[NDArray[Any], NDArray[Any]]:
    scores = np.asarray(next(iter(source(full).values()))).reshape(-1)
    order = np.argsort(-scores, kind="stable")[:k]
    return scores[order], order


def _assert_same_top_k(got: dict[str, Any], source_scores: NDArray[Any], k: int, atol: float = 1e-6) -> None:
    """The source model's top k: each returned index scores as returned, descending, and none is below the source's
    k-th best by more than `atol` (the head's first layer may sum in another order: last-bit ties may swap)."""
    idx, scores = got["indices"], got["scores"]
    assert idx.shape == (min(k, source_scores.size),) and len(set(idx.tolist())) == idx.size
    np.testing.assert_allclose(scores, source_scores[idx], rtol=0, atol=atol)
    assert np.all(np.diff(scores) <= 0)
    kth = np.sort(source_scores)[::-1][idx.size - 1]
    assert np.all(source_scores[idx] >= kth - atol)


@pytest.mark.parametrize("split", [True, False], ids=["first-layer-split", "broadcast-and-gather"])
@pytest.mark.parametrize("n", [1, 5, 200, 5000], ids=["one", "fewer-than-k", "200", "beyond-any-batch-limit"])
def test_column_head_returns_the_source_models_top_k_with_the_request_columns_sent_once(
    tmp_path: Path, n: int, split: bool
) -> None:
    model = _mlp(tmp_path / "m.onnx", inputs={"features": F}, scale_first=not split)
    layout = R.plan_ranking(_signature({"features": F}), R.RankingSpec(request_columns=REQUEST_COLUMNS, max_k=50))
    assert layout.candidate_columns == (3, 4, 5, 6, 8, 9)
    head, source = _head(tmp_path, model, layout), convert.onnx_predictor(model)
    ops = [node.op_type for node in onnx.load(tmp_path / "ranking.onnx").graph.node]
    # A Dense first layer: the request's columns are multiplied once per request, not once per candidate.
    assert ("Expand" not in ops and ops.count("MatMul") == 3) if split else ("Expand" in ops and "Gather" in ops)
    rng = np.random.default_rng(n)
    rows = rng.standard_normal((n, F)).astype(np.float32)
    user = rng.standard_normal((1, len(REQUEST_COLUMNS))).astype(np.float32)
    full = rows.copy()
    full[:, list(REQUEST_COLUMNS)] = user  # what a client sends today: the user's columns copied into every row
    got = head({"request": user, "candidates": rows[:, list(layout.candidate_columns)], "k": np.array([10])})
    _assert_same_top_k(got, np.asarray(source({"features": full})["ctr"]).reshape(-1), 10)
    assert got["indices"].dtype == np.int64 and got["scores"].dtype == np.float32


def test_k_is_capped_by_max_k_and_by_the_candidates_and_never_negative(tmp_path: Path) -> None:
    model = _mlp(tmp_path / "m.onnx", inputs={"features": F})
    layout = R.plan_ranking(_signature({"features": F}), R.RankingSpec(request_columns=(0,), max_k=20))
    head = _head(tmp_path, model, layout)
    cand = np.random.default_rng(1).standard_normal((30, F - 1)).astype(np.float32)
    user = np.zeros((1, 1), np.float32)
    for k, expected in [(5, 5), (1000, 20), (0, 0), (-3, 0)]:
        got = head({"request": user, "candidates": cand, "k": np.array([k])})
        assert got["indices"].shape == (expected,), k
    got = head({"request": user, "candidates": cand[:3], "k": np.array([10])})
    assert sorted(got["indices"].tolist()) == [0, 1, 2]


def test_named_inputs_head_broadcasts_the_per_request_inputs(tmp_path: Path) -> None:
    inputs = {"user": 3, "item": 4, "context": 2}
    model = _mlp(tmp_path / "tt.onnx", inputs=inputs, output="scores")  # the head's own output name: renamed inside
    layout = R.plan_ranking(_signature(inputs, "scores"), R.RankingSpec(request_inputs=("context", "user")))
    assert layout.request_inputs == ("user", "context") and layout.candidate_inputs == ("item",)
    assert [(s.name, s.shape) for s in layout.signature.inputs] == [
        ("user", (1, 3)), ("item", (-1, 4)), ("context", (1, 2)), ("k", (1,))]
    head, source = _head(tmp_path, model, layout), convert.onnx_predictor(model)
    rng = np.random.default_rng(3)
    user, ctx = rng.standard_normal((1, 3)).astype(np.float32), rng.standard_normal((1, 2)).astype(np.float32)
    items = rng.standard_normal((300, 4)).astype(np.float32)
    got = head({"user": user, "item": items, "context": ctx, "k": np.array([25])})
    full = {"user": np.repeat(user, 300, 0), "item": items, "context": np.repeat(ctx, 300, 0)}
    want_scores, want_idx = _reference(source, full, 25)
    np.testing.assert_array_equal(got["indices"], want_idx)  # broadcast: the same rows, the same sums
    np.testing.assert_allclose(got["scores"], want_scores, atol=1e-6)


def test_the_head_parity_check_passes_the_head_and_fails_a_head_that_reorders_columns(tmp_path: Path) -> None:
    model = _mlp(tmp_path / "m.onnx", inputs={"features": F})
    sig = _signature({"features": F})
    layout = R.plan_ranking(sig, R.RankingSpec(request_columns=REQUEST_COLUMNS))
    feeds = {"features": np.random.default_rng(5).standard_normal((256, F)).astype(np.float32)}
    source = convert.onnx_predictor(model)
    good = R.check_head(source, _head(tmp_path, model, layout), layout, feeds, 1e-5, candidates=200, k=10)
    assert good.passed and good.topk_identical >= 0.9 and good.max_abs_error < 1e-6, good
    assert (good.requests, good.candidates, good.k) == (16, 200, 10)
    # A head whose request columns meet the wrong weights: every score is computed from shuffled columns.
    wrong = R.RankingLayout(("features",), "ctr", 100, request_columns=REQUEST_COLUMNS,
                            candidate_columns=layout.candidate_columns, signature=layout.signature)  # fmt: skip
    broken = onnx.load(tmp_path / "ranking.onnx")
    weights = next(i for i in broken.graph.initializer if i.name.endswith("request_weights"))
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights)[::-1].copy(), weights.name))
    onnx.save(broken, tmp_path / "broken.onnx")
    bad = R.check_head(source, convert.onnx_predictor(tmp_path / "broken.onnx"), wrong, feeds, 1e-5)
    assert not bad.passed and "scores differ" in bad.failures[0], bad


@pytest.mark.parametrize(
    ("signature", "spec", "error", "match"),
    [
        (_signature({"features": F}), R.RankingSpec(), UsageError, "columns or the per-request inputs"),
        (_signature({"features": F}), R.RankingSpec(request_columns=(0,), request_inputs=("features",)), UsageError,
         "not both"),
        (_signature({"features": F}), R.RankingSpec(request_columns=(3, 12)), UsageError, r"\[12\] are outside"),
        (_signature({"features": F}), R.RankingSpec(request_columns=tuple(range(F))), UsageError, "nothing is left"),
        (_signature({"features": F}), R.RankingSpec(request_columns=(0,), max_k=0), UsageError, "outside 1.."),
        (_signature({"user": 3, "item": 4}), R.RankingSpec(request_inputs=("usr",)), UsageError, "usr are not"),
        (_signature({"user": 3, "item": 4}), R.RankingSpec(request_columns=(0,)), BadInputError, "one input"),
        (ModelSignature((TensorSpec("x", "float32", (4,)),), (TensorSpec("a", "float32", (1,)),
                                                              TensorSpec("b", "float32", (1,)))),
         R.RankingSpec(request_columns=(0,)), BadInputError, "one score per row"),
        (ModelSignature((TensorSpec("k", "float32", (4,)),), (TensorSpec("ctr", "float32", (1,)),)),
         R.RankingSpec(request_columns=(0,)), BadInputError, "already names a tensor k"),
    ],
    ids=["none", "both", "outside", "all-columns", "k-zero", "unknown-input", "columns-of-two-inputs",
         "two-outputs", "clash"],
)  # fmt: skip
def test_a_ranking_spec_that_does_not_fit_the_model_is_refused_with_the_reason(
    signature: ModelSignature, spec: R.RankingSpec, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        R.plan_ranking(signature, spec)


def test_parse_columns() -> None:
    assert R.parse_columns("0-3, 7,9-10") == (0, 1, 2, 3, 7, 9, 10)
    assert R.parse_columns("5,5,1") == (1, 5)
    for bad in ("", "a", "3-1", "-2", "1-x"):
        with pytest.raises(UsageError):
            R.parse_columns(bad)


# ---------------------------------------------------------------- built into a repository, served by Triton

CTR_REQUEST_COLUMNS = "0-15,28-31"  # tests.builder.models: user 0-15, item 16-27, context 28-31


@pytest.fixture(scope="module")
def ranking_repo(ctr_keras: Path, two_tower_keras: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_repo_builder.builder import BuildRequest, build

    repo = tmp_path_factory.mktemp("ranking_repo")
    build(BuildRequest(source=str(ctr_keras), repo=repo, name="ctr_rank", backend="python", max_batch_size=64,
                       ranking=R.RankingSpec(request_columns=R.parse_columns(CTR_REQUEST_COLUMNS), max_k=50)))
    build(BuildRequest(source=str(two_tower_keras), repo=repo, name="tt_rank", backend="python",
                       ranking=R.RankingSpec(request_inputs=("user",), max_k=20)))
    return repo


def _ctr_request(n: int, seed: int = 21) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """(request [1, 20], candidates [n, 12], the same as rows of the model's own input [n, 32])."""
    from tests.builder.models import synthetic_ctr

    feats, _ = synthetic_ctr(n, seed=seed)
    request = np.concatenate([feats["user"][:1], feats["context"][:1]], axis=1)
    full = np.concatenate([np.repeat(feats["user"][:1], n, 0), feats["item"], np.repeat(feats["context"][:1], n, 0)],
                          axis=1)  # fmt: skip
    return request, feats["item"], full


def test_the_build_writes_a_ranking_model_without_a_batch_dimension_and_gates_its_top_k(ranking_repo: Path) -> None:
    from model_repo_builder import config as C

    cfg = C.parse_pbtxt((ranking_repo / "ctr_rank" / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("request", [1, 20]), ("candidates", [-1, 12]), ("k", [1])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("scores", [-1]), ("indices", [-1])]
    (warm,) = cfg.model_warmup
    assert list(warm.inputs["candidates"].dims) == [200, 12] and warm.inputs["k"].input_data_file == "k"
    report = json.loads((ranking_repo / "ctr_rank" / "1" / "build.json").read_text())
    ranking = report["ranking"]
    assert ranking["request_columns"] == [*range(16), 28, 29, 30, 31]
    assert ranking["candidate_columns"] == list(range(16, 28)) and ranking["max_k"] == 50
    assert ranking["parity"]["passed"] and ranking["parity"]["candidates"] == 200, ranking["parity"]
    assert json.loads(cfg.parameters["recserve_ranking"].string_value)["request_input"] == "request"


def test_triton_ranks_500_candidates_of_one_request_over_http_and_grpc_like_keras(
    ranking_repo: Path, ctr_keras: Path, two_tower_keras: Path, tmp_path: Path
) -> None:
    """500 candidates, more than the model's max batch of 64: one request, scored, never refused."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from model_repo_builder.triton_local import TritonServer
    from tests.builder.models import synthetic_ctr

    request, items, full = _ctr_request(500)
    ctr = convert.load_source(ctr_keras, "keras").predict({"features": full})["ctr"].reshape(-1)
    want = np.argsort(-ctr, kind="stable")[:10]
    feats, _ = synthetic_ctr(300, seed=4)
    tt = convert.load_source(two_tower_keras, "keras").predict(
        {"user": np.repeat(feats["user"][:1], 300, 0), "item": feats["item"]})["score"].reshape(-1)  # fmt: skip
    with TritonServer(ranking_repo, log_path=tmp_path / "triton.log") as triton:
        http = httpclient.InferenceServerClient(triton.http_url)
        try:
            inputs = [httpclient.InferInput("request", [1, 20], "FP32"),
                      httpclient.InferInput("candidates", [500, 12], "FP32"), httpclient.InferInput("k", [1], "INT64")]
            for inp, arr in zip(inputs, (request, items, np.array([10], np.int64)), strict=True):
                inp.set_data_from_numpy(arr)
            res = http.infer("ctr_rank", inputs)
        finally:
            http.close()
        grpc = grpcclient.InferenceServerClient(triton.grpc_url)
        try:
            g_inputs = [grpcclient.InferInput("user", [1, 16], "FP32"),
                        grpcclient.InferInput("item", [300, 12], "FP32"), grpcclient.InferInput("k", [1], "INT64")]
            for inp, arr in zip(g_inputs, (feats["user"][:1], feats["item"], np.array([100], np.int64)), strict=True):
                inp.set_data_from_numpy(arr)
            g_res = grpc.infer("tt_rank", g_inputs)
        finally:
            grpc.close()
    np.testing.assert_array_equal(res.as_numpy("indices"), want)
    np.testing.assert_allclose(res.as_numpy("scores"), ctr[want], atol=1e-5)
    got = g_res.as_numpy("indices")
    assert got.shape == (20,)  # k=100 asked, max_k 20 served
    np.testing.assert_allclose(g_res.as_numpy("scores"), tt[got], atol=1e-5)
    assert set(got.tolist()) == set(np.argsort(-tt, kind="stable")[:20].tolist())


def test_the_cli_adds_a_ranking_head_and_refuses_a_split_that_does_not_fit(
    ctr_keras: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.builder.helpers import run_cli

    r = run_cli(capsys, "build", "--source", ctr_keras, "--repo", tmp_path / "repo", "--name", "ctr",
                "--ranking-request-columns", CTR_REQUEST_COLUMNS, "--ranking-max-k", "20", "--json")
    assert r.code == 0, r.err
    assert r.json["ranking"]["max_k"] == 20 and r.json["ranking"]["parity"]["passed"]
    for args, match in [
        (("--ranking-request-columns", "0-40"), "outside the model's 32 columns"),
        (("--ranking-request-columns", "0-3", "--ranking-request-inputs", "features"), "exclude each other"),
        (("--ranking-request-inputs", "user"), "user are not inputs of the model"),
        (("--ranking-request-columns", "0-3", "--backend", "tensorrt"), "not built into TensorRT plans"),
    ]:
        r = run_cli(capsys, "build", "--source", ctr_keras, "--repo", tmp_path / "bad", *args, "--json")
        assert r.code == 2, (args, r.out, r.err)
        assert match in r.out + r.err, (args, r.out, r.err)
