"""Pure tests: ModelConfig construction, validation and round-trips; parity metrics; TensorRT profiles."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from tritonclient.grpc import model_config_pb2 as mc

from model_repo_builder import config as C
from model_repo_builder import parity, tensorrt_build
from model_repo_builder.errors import ConfigError, MissingRuntimeError

SIG = C.ModelSignature(
    inputs=(C.TensorSpec("user", "float32", (16,)), C.TensorSpec("item_ids", "int64", (-1,))),
    outputs=(C.TensorSpec("score", "float32", (1,)),),
)


def gpu_opts(**kw: object) -> C.ServingOptions:
    base = {
        "backend": "onnxruntime", "precision": "fp32", "max_batch_size": 128,
        "dynamic_batching": C.DynamicBatching((32, 64), 500, True, 10_000),
        "instance_kind": "GPU", "instance_count": 2, "gpus": (0, 1),
    }
    base.update(kw)
    return C.ServingOptions(**base)  # type: ignore[arg-type]


def test_full_config_fields_and_pbtxt_round_trip() -> None:
    cfg = C.build_model_config("ranker", gpu_opts(warmup_batch_size=8, version_policy_latest=2), SIG)
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 128
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        ("user", mc.TYPE_FP32, [16]), ("item_ids", mc.TYPE_INT64, [-1])
    ]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("score", [1])]
    db = cfg.dynamic_batching
    assert list(db.preferred_batch_size) == [32, 64] and db.max_queue_delay_microseconds == 500
    assert db.preserve_ordering
    assert db.default_queue_policy.default_timeout_microseconds == 10_000
    assert db.default_queue_policy.timeout_action == mc.ModelQueuePolicy.REJECT
    g = cfg.instance_group[0]
    assert g.kind == mc.ModelInstanceGroup.KIND_GPU and g.count == 2 and list(g.gpus) == [0, 1]
    assert cfg.version_policy.latest.num_versions == 2
    assert [(w.name, w.batch_size) for w in cfg.model_warmup] == [("warmup_batch_1", 1), ("warmup_batch_8", 8)]
    warm = cfg.model_warmup[1]
    assert set(warm.inputs) == {"user", "item_ids"}
    assert list(warm.inputs["item_ids"].dims) == [1] and warm.inputs["item_ids"].zero_data

    text = C.to_pbtxt(cfg)
    parsed = C.parse_pbtxt(text)
    assert parsed == cfg
    assert C.signature_from_config(parsed) == SIG
    assert C.options_from_config(parsed) == gpu_opts(warmup_batch_size=8, version_policy_latest=2)


def test_fp16_uses_tensorrt_accelerator_with_fp16_precision_mode() -> None:
    cfg = C.build_model_config("m", gpu_opts(precision="fp16", graph_optimization_level=1), SIG)
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in acc] == ["tensorrt"] and acc[0].parameters["precision_mode"] == "FP16"
    assert cfg.optimization.graph.level == 1
    assert C.options_from_config(C.parse_pbtxt(C.to_pbtxt(cfg))).precision == "fp16"


def test_fp32_accelerator_and_tensorrt_backend() -> None:
    cfg = C.build_model_config("m", gpu_opts(tensorrt_accelerator=True), SIG)
    assert cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"] == "FP32"
    trt = C.build_model_config("m", gpu_opts(backend="tensorrt", precision="fp16"), SIG)
    assert trt.platform == "tensorrt_plan" and trt.default_model_filename == "model.plan"
    assert not trt.optimization.execution_accelerators.gpu_execution_accelerator
    assert C.options_from_config(trt).backend == "tensorrt"


def test_without_signature_leaves_io_to_autocomplete_and_keeps_warmup_request() -> None:
    opts = gpu_opts(warmup_batch_size=4, dynamic_batching=None)
    cfg = C.build_model_config("m", opts, None)
    assert not cfg.input and not cfg.output
    # The template names the warmup batches; their inputs wait for the signature.
    assert [(w.batch_size, len(w.inputs)) for w in cfg.model_warmup] == [(1, 0), (4, 0)]
    assert not cfg.HasField("dynamic_batching")
    assert C.options_from_config(C.parse_pbtxt(C.to_pbtxt(cfg))) == opts
    merged = C.merge_signature(cfg, "m2", SIG, {"user": "user"})
    assert merged.name == "m2" and C.signature_from_config(merged) == SIG
    assert [w.batch_size for w in merged.model_warmup] == [1, 4]
    assert all(w.inputs["user"].input_data_file == "user" for w in merged.model_warmup)
    assert all(w.inputs["item_ids"].zero_data for w in merged.model_warmup)
    assert C.PARAM_WARMUP_BATCH not in merged.parameters
    assert list(merged.instance_group[0].gpus) == [0, 1]  # operator's placement kept


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (C.ServingOptions(max_batch_size=256, warmup_batch_size=256, instance_kind="CPU"), [1, 256]),
        (C.ServingOptions(max_batch_size=1, warmup_batch_size=1, instance_kind="CPU"), [1]),
        (C.ServingOptions(max_batch_size=64, warmup_batch_size=0, instance_kind="CPU"), []),
    ],
    ids=[
        "a template asking for the max batch warms up a single sample and the full batch",
        "a max batch of one warms up once",
        "a template without warmup gets none",
    ],
)
def test_merged_config_warms_up_batch_one_and_the_largest_batch(
    template: C.ServingOptions, expected: list[int]
) -> None:
    merged = C.merge_signature(C.build_model_config("m", template, None), "m", SIG)
    assert [w.batch_size for w in merged.model_warmup] == expected
    assert all(i.zero_data for w in merged.model_warmup for i in w.inputs.values())


def test_templates_from_older_operators_still_ask_for_warmup_by_parameter() -> None:
    old = C.build_model_config("m", C.ServingOptions(max_batch_size=32, instance_kind="CPU"), None)
    old.parameters[C.PARAM_WARMUP_BATCH].string_value = "32"
    merged = C.merge_signature(old, "m", SIG)
    assert [w.batch_size for w in merged.model_warmup] == [1, 32]
    assert C.PARAM_WARMUP_BATCH not in merged.parameters


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"precision": "bf8"}, "unknown precision"),
        ({"backend": "pytorch"}, "unknown backend"),
        ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({"dynamic_batching": C.DynamicBatching((256,))}, "preferred batch size 256"),
        ({"instance_count": 0}, "instance_count"),
        ({"instance_kind": "TPU"}, "unknown instance kind"),
        ({"backend": "python", "instance_kind": "CPU", "gpus": ()}, None),
        ({"backend": "python", "gpus": ()}, "use instance_kind CPU"),
        ({"precision": "fp16", "instance_kind": "CPU", "gpus": ()}, "fp16"),
        ({"backend": "tensorrt", "instance_kind": "CPU", "gpus": ()}, "GPUs only"),
        ({"warmup_batch_size": 1000}, "warmup_batch_size"),
        ({"gpus": (-1,)}, "gpu ids"),
    ],
)
def test_bad_options_raise_value_errors_with_clear_messages(change: dict[str, object], message: str | None) -> None:
    opts = dataclasses.replace(gpu_opts(), **change)  # type: ignore[arg-type]
    if message is None:
        assert C.build_model_config("m", opts).backend == "python"
        return
    with pytest.raises(ConfigError, match=message) as info:
        C.build_model_config("m", opts)
    assert isinstance(info.value, ValueError)


def test_parse_errors_and_bad_names() -> None:
    with pytest.raises(C.InvalidModelConfig, match="does not parse"):
        C.parse_pbtxt("max_batch_size: 'x' nonsense {")
    with pytest.raises(ValueError, match="invalid model name"):
        C.build_model_config("a/b", gpu_opts())


@settings(max_examples=60, deadline=None)
@given(
    backend=st.sampled_from(["onnxruntime", "python"]),
    precision=st.sampled_from(["fp32", "int8"]),
    mbs=st.integers(1, 512),
    count=st.integers(1, 8),
    delay=st.integers(0, 100_000),
    prefs=st.lists(st.integers(1, 512), max_size=3, unique=True),
    batching=st.booleans(),
    latest=st.integers(1, 3),
)
def test_options_round_trip_property(  # noqa: PLR0917 - hypothesis passes the drawn values positionally
    backend: str, precision: str, mbs: int, count: int, delay: int, prefs: list[int], batching: bool, latest: int
) -> None:
    prefs = [p for p in prefs if p <= mbs]
    kind = "CPU" if backend == "python" else "GPU"
    db = C.DynamicBatching(tuple(prefs), delay) if batching else None
    opts = C.ServingOptions(backend, precision, mbs, db, kind, count, version_policy_latest=latest)
    cfg = C.build_model_config("m", opts, SIG)
    assert C.options_from_config(C.parse_pbtxt(C.to_pbtxt(cfg))) == opts


def test_exact_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(200), 2)  # rounding creates ties
    labels = rng.random(200) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert parity.exact_auc(scores, labels) == pytest.approx(pairwise, abs=1e-12)
    assert parity.exact_auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    with pytest.raises(ValueError, match="both positive and negative"):
        parity.exact_auc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_topk_overlap() -> None:
    a = np.arange(200, dtype=float)
    assert parity.topk_overlap(a, a, 10, 100) == 1.0
    assert parity.topk_overlap(a, -a, 10, 100) == 0.0
    b = a.copy()
    b[99], b[89] = b[89], b[99]  # swap the best item of list 1 with the 11th
    assert parity.topk_overlap(a, b, 10, 100) == pytest.approx((0.9 + 1.0) / 2)


def test_compare_flags_failures() -> None:
    feeds = {"x": np.linspace(-1, 1, 300, dtype=np.float32)[:, None]}
    labels = (feeds["x"][:, 0] > 0).astype(np.float32)

    def src(f: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        return {"y": f["x"] * 2}

    def noisy(f: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        return {"y": -f["x"] * 2}

    ok = parity.compare(src, src, feeds, parity.default_tolerance("fp32"), labels=labels)
    assert ok.passed and ok.max_abs_error == 0 and ok.auc_source == 1.0
    bad = parity.compare(src, noisy, feeds, parity.default_tolerance("int8"), labels=labels)
    assert not bad.passed and bad.auc_drop == pytest.approx(1.0)
    assert any("AUC drop" in f for f in bad.failures) and any("top-10" in f for f in bad.failures)


def test_tensorrt_profile_shapes() -> None:
    shapes = tensorrt_build.profile_shapes(SIG, 128)
    assert shapes["user"] == tensorrt_build.ProfileShape((1, 16), (64, 16), (128, 16))
    assert shapes["item_ids"].max == (128, 1)
    assert tensorrt_build.profile_shapes(SIG, 1)["user"].opt == (1, 16)
    with pytest.raises(ValueError, match="opt batch size"):
        tensorrt_build.profile_shapes(SIG, 8, opt_batch_size=9)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here: the GPU suite covers engine building")
def test_tensorrt_missing_runtime_is_exit_code_5() -> None:
    with pytest.raises(MissingRuntimeError, match="TensorRT") as info:
        tensorrt_build.import_tensorrt()
    assert info.value.exit_code == 5 and "--backend onnxruntime" in info.value.hint


def test_config_module_imports_without_ml_runtimes() -> None:
    """The operator image has no TensorFlow/ONNX/ONNX Runtime: config and errors must import without them."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('tensorflow', 'keras', 'onnx', 'onnxruntime', 'tf2onnx', 'scipy', 'boto3', 'requests'):\n"
        "    sys.modules[m] = None\n"
        "import model_repo_builder.config as c, model_repo_builder.errors\n"
        "o = c.ServingOptions('onnxruntime', 'fp16', 32, c.DynamicBatching((16,), 100), 'GPU', 1)\n"
        "print(c.to_pbtxt(c.build_model_config('m', o)).count('precision_mode'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_profile_grid_candidate_configs_and_choice() -> None:
    from model_repo_builder import profile as P

    grid = P.candidate_grid((1, 2), (0, 500), (32,))
    assert grid[0] == P.Candidate(1, False)  # Triton's default comes first, as the baseline
    assert len(grid) == len(set(grid)) == 1 + 1 + 2 * 2 * 2
    base = C.build_model_config("m", gpu_opts(max_batch_size=16, dynamic_batching=None), SIG)
    cfg = P.apply_candidate(base, P.Candidate(3, True, 700, (8, 32)))
    assert cfg.instance_group[0].count == 3 and list(cfg.instance_group[0].gpus) == [0, 1]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 700
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8]  # sizes above max_batch_size dropped
    assert not P.apply_candidate(base, P.Candidate(1, False)).HasField("dynamic_batching")
    assert C.signature_from_config(cfg) == SIG and base.instance_group[0].count == 2  # base untouched

    def m(label: str, rps: float, p99: float, errors: int = 0) -> P.Measurement:
        return P.Measurement(label, {}, 100, errors, rps, p99 / 2, p99 * 0.8, p99)

    results = [m("a", 100, 10), m("b", 300, 60), m("c", 200, 40), m("d", 900, 5, errors=3)]
    assert P.choose(results, 50).label == "c"  # fastest within the SLO; errors disqualify
    assert [r.slo_met for r in results] == [True, False, True, False]
    assert P.choose(results, 1).label == "d"  # none meets it: lowest p99
    agg = P.aggregate([m("a", 100, 10), m("a", 300, 30), m("a", 200, 20)])
    assert (agg.throughput_rps, agg.p99_ms, agg.requests) == (200, 20, 300)


def _level(label: str, conc: int, rps: float, p99: float, *, spread: float = 0.0, errors: int = 0) -> Any:
    from model_repo_builder import profile as P

    return P.Measurement(label, {}, 100, errors, rps, p99 / 2, p99 * 0.8, p99, concurrency=conc,
                         throughput_rps_min=rps * (1 - spread / 2), throughput_rps_max=rps * (1 + spread / 2))


# The measured case: batching with a 5 ms queue delay wins 1.28x at concurrency 16 but is 9x slower at 1.
QUIET_HOURS_LOSER = {
    "default": {1: (1250, 0.8), 4: (2000, 2.0), 16: (2200, 8.0), 64: (2250, 30.0)},
    "delay=5000us": {1: (140, 7.2), 4: (500, 8.5), 16: (2800, 9.0), 64: (3000, 24.0)},
    "inst=2": {1: (1240, 0.8), 4: (2600, 1.6), 16: (2900, 6.0), 64: (3000, 22.0)},
    "inst=4": {1: (1200, 0.9), 4: (2500, 1.7), 16: (3100, 6.5), 64: (3400, 40.0)},
}


def _table(spec: dict[str, dict[int, tuple[float, float]]], spread: float = 0.0) -> dict[str, dict[int, Any]]:
    return {label: {c: _level(label, c, rps, p99, spread=spread) for c, (rps, p99) in levels.items()}
            for label, levels in spec.items()}  # fmt: skip


def test_the_range_choice_never_takes_a_config_that_makes_quiet_hours_slower() -> None:
    from model_repo_builder import profile as P

    choice = P.choose_for_range(_table(QUIET_HOURS_LOSER), "default", 25.0)
    # delay=5000us wins at 16 but is 9x slower at 1; inst=4 is fastest at 64 but misses the SLO there.
    assert choice.label == "inst=2" and choice.slo_met, choice
    assert "delay=5000us (8.93x slower at concurrency 1; 4.00x slower at concurrency 4)" in choice.reason
    assert "inst=4 (p99 40.0 ms at concurrency 64)" in choice.reason
    assert [t["concurrency"] for t in choice.table] == [1, 4, 16, 64]
    assert choice.table[-1]["ratio"] == pytest.approx(3000 / 2250)
    assert choice.table[0]["ratio"] == pytest.approx(1240 / 1250)  # 0.8% slower at 1: noise, not a loss


def test_the_range_choice_keeps_the_default_when_nothing_qualifies_and_says_why() -> None:
    from model_repo_builder import profile as P

    spec = {"default": {1: (1000, 1.0), 64: (2000, 30.0)}, "batching": {1: (100, 9.0), 64: (4000, 20.0)}}
    choice = P.choose_for_range(_table(spec), "default", 25.0)
    assert choice.label == "default" and not choice.slo_met
    assert "no configuration met the p99 SLO of 25 ms at every level of concurrency 1-64" in choice.reason
    assert "p99 30.0 ms at concurrency 64" in choice.reason


def test_a_difference_within_the_measured_spread_is_not_a_loss() -> None:
    from model_repo_builder import profile as P

    spec = {"default": {1: (1000, 1.0), 8: (2000, 3.0)}, "inst=2": {1: (850, 1.1), 8: (3000, 2.5)}}
    assert P.choose_for_range(_table(spec), "default", 25.0).label == "default"  # 15% slower at 1: a loss
    noisy = P.choose_for_range(_table(spec, spread=0.1), "default", 25.0)  # 10% spread on each side: noise
    assert noisy.label == "inst=2", noisy.reason
