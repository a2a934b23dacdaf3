"""Ranking head vs duplicated features: the example CTR model, one request = one user with N candidates.

(rows)   the model as trained: every request is [N, 51] rows, the user's and the context's 24 columns copied into
         each; Triton returns N scores and the client sorts them.
(ranker) the same model built with `--ranking-request-columns` (the columns train.py writes to feature_spec.json):
         `request [1, 24]` once, `candidates [N, 27]`, `k`; Triton returns the top k from inside ONNX Runtime.

Both are served by the same local Triton (nvidia-pytriton's binary, python backend running ONNX Runtime, one
instance each, no dynamic batching: a request already carries N rows), measured by one closed-loop load generator
in interleaved rounds, with the in-process ONNX Runtime ceiling of each graph on the same requests. Reports
candidates/s, request bytes, p50/p99 per concurrency level (medians over rounds, throughput ranges) and ratios.
Run: python bench/serving/ranking.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import ROOT, aggregate, ensure_model, log, make_requests, run_loadgen, sh, write_spec  # noqa: E402

ROWS, RANKER = "ctr-rows", "ctr-ranker"
K = 10


def build(model: Path, repo: Path, out: Path, name: str, extra: list[str]) -> dict[str, Any]:
    stdout = sh([sys.executable, "-m", "model_repo_builder", "build", "--source", str(model), "--format", "keras",
                 "--name", name, "--version", "1", "--repo", str(repo), "--backend", "python", "--precision", "fp32",
                 "--max-batch-size", "1024", "--instance-kind", "CPU", "--instance-count", "1", "--json", *extra],
                out / "logs" / f"build-{name}.log")  # fmt: skip
    return dict(json.loads(stdout))


def one_instance_no_batching(repo: Path, name: str) -> None:
    """The same serving settings for both: one CPU instance; the row model without dynamic batching (a request
    is already N rows; the ranker has none: no batch dimension)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    path = repo / name / "config.pbtxt"
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    cfg.ClearField("dynamic_batching")
    path.write_text(text_format.MessageToString(cfg))


def v2_body(inputs: list[tuple[str, NDArray[Any], str]], outputs: list[str]) -> tuple[bytes, dict[str, str]]:
    """KServe v2 with Triton's binary tensor extension: a JSON header, then each input's raw bytes in order."""
    raws = [np.ascontiguousarray(a).tobytes() for _, a, _ in inputs]
    header = json.dumps({
        "inputs": [{"name": n, "shape": list(a.shape), "datatype": dt_, "parameters": {"binary_data_size": len(r)}}
                   for (n, a, dt_), r in zip(inputs, raws, strict=True)],
        "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
    }).encode()  # fmt: skip
    return header + b"".join(raws), {"Inference-Header-Content-Length": str(len(header)),
                                     "Content-Type": "application/octet-stream"}  # fmt: skip


def request_bodies(
    spec: dict[str, Any], rows: Any, req_cols: list[int], cand_cols: list[int]
) -> tuple[list[tuple[bytes, dict[str, str]]], list[tuple[bytes, dict[str, str]]]]:
    """Each request twice: as the model's own rows, and as the ranking head's request/candidates/k."""
    k = np.array([K], np.int64)
    row_bodies = [v2_body([(spec["input_name"], r, "FP32")], [spec["output_name"]]) for r in rows]
    rank_bodies = [v2_body([("request", np.ascontiguousarray(r[:1, req_cols]), "FP32"),
                            ("candidates", np.ascontiguousarray(r[:, cand_cols]), "FP32"), ("k", k, "INT64")],
                           ["indices", "scores"]) for r in rows]  # fmt: skip
    return row_bodies, rank_bodies


def ceiling(onnx_path: Path, feeds: list[dict[str, NDArray[Any]]], duration_s: float) -> dict[str, float]:
    """In-process ONNX Runtime on the same requests, one after another: requests/s and p50/p99."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    sess.run(None, feeds[0])
    lat: list[float] = []
    end = time.perf_counter() + duration_s
    i = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        sess.run(None, feeds[i % len(feeds)])
        lat.append(time.perf_counter() - t0)
        i += 1
    ms = np.asarray(lat) * 1e3
    return {"requests_per_s": len(lat) / float(np.sum(lat)), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ranking")
    p.add_argument("--model", help="model.keras (default: train the example into OUT/model)")
    p.add_argument("--quick", action="store_true", help="shorter windows, two rounds")
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=32, help="distinct request bodies cycled by the client")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration-s", type=float)
    a = p.parse_args(argv)
    a.rounds = a.rounds or (2 if a.quick else 3)
    a.duration_s = a.duration_s or (2.0 if a.quick else 4.0)
    a.warmup_s = 0.5 if a.quick else 1.0
    out = a.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    model, spec_path = ensure_model(a, out)
    spec = json.loads(spec_path.read_text())
    repo = out / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    log("building both models with RecServe's builder")
    build(model, repo, out, ROWS, [])
    report = build(model, repo, out, RANKER, ["--ranking-request-columns", spec["request_columns"]])
    one_instance_no_batching(repo, ROWS)
    layout = report["ranking"]
    req_cols, cand_cols = layout["request_columns"], layout["candidate_columns"]

    rows = make_requests(spec_path, a.requests, a.candidates)  # [R, N, F]: each request one user, one context
    assert all(np.all(r[:, req_cols] == r[:1, req_cols]) for r in rows), "request columns differ within a request"
    k = np.array([K], np.int64)
    row_bodies, rank_bodies = request_bodies(spec, rows, req_cols, cand_cols)
    sizes = {ROWS: float(np.mean([len(b) for b, _ in row_bodies])),
             RANKER: float(np.mean([len(b) for b, _ in rank_bodies]))}

    # Same answer before any timing: the ranker's top k is the top k of the rows' scores.
    import onnxruntime as ort

    rows_sess = ort.InferenceSession(str(repo / ROWS / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rank_sess = ort.InferenceSession(str(repo / RANKER / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rank_feeds = [{"request": r[:1, req_cols], "candidates": r[:, cand_cols], "k": k} for r in rows]
    row_feeds = [{spec["input_name"]: r} for r in rows]
    for rf, kf in zip(row_feeds, rank_feeds, strict=True):
        scores = rows_sess.run(None, rf)[0].reshape(-1)
        top = rank_sess.run(["indices"], kf)[0]
        assert np.array_equal(top, np.argsort(-scores, kind="stable")[:K]), "the ranker's top k differs"

    from model_repo_builder.triton_local import TritonServer

    runs: list[dict[str, Any]] = []
    with TritonServer(repo, log_path=out / "logs" / "triton.log") as server:
        for name in (ROWS, RANKER):
            server.wait_model_ready(name, timeout_s=120)
        url = f"http://{server.http_url}"
        specs = {ROWS: write_spec(out, ROWS, f"{url}/v2/models/{ROWS}/infer", [b for b, _ in row_bodies],
                                  row_bodies[0][1]),
                 RANKER: write_spec(out, RANKER, f"{url}/v2/models/{RANKER}/infer", [b for b, _ in rank_bodies],
                                    rank_bodies[0][1])}  # fmt: skip
        for r in range(a.rounds):
            log(f"round {r + 1}/{a.rounds}: concurrency {a.concurrency}")
            runs += run_loadgen(specs, a, out / "logs" / f"loadgen-{r}.log")
    ceilings = {ROWS: ceiling(repo / ROWS / "1" / "model.onnx", row_feeds, a.duration_s),
                RANKER: ceiling(repo / RANKER / "1" / "model.onnx", rank_feeds, a.duration_s)}  # fmt: skip
    levels = {name: aggregate(runs, name) for name in (ROWS, RANKER)}
    table = []
    for row_level, rank_level in zip(levels[ROWS], levels[RANKER], strict=True):
        c = a.candidates
        table.append({
            "concurrency": row_level["concurrency"],
            "rows_candidates_per_s": row_level["throughput_rps"] * c,
            "rows_range": [row_level["throughput_rps_min"] * c, row_level["throughput_rps_max"] * c],
            "ranker_candidates_per_s": rank_level["throughput_rps"] * c,
            "ranker_range": [rank_level["throughput_rps_min"] * c, rank_level["throughput_rps_max"] * c],
            "ratio": rank_level["throughput_rps"] / row_level["throughput_rps"],
            "rows_p50_ms": row_level["p50_ms"], "rows_p99_ms": row_level["p99_ms"],
            "ranker_p50_ms": rank_level["p50_ms"], "ranker_p99_ms": rank_level["p99_ms"],
            "errors": row_level["errors"] + rank_level["errors"],
        })  # fmt: skip
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
        "candidates": a.candidates, "k": K, "rounds": a.rounds, "duration_s": a.duration_s,
        "request_bytes": sizes, "request_bytes_ratio": sizes[ROWS] / sizes[RANKER],
        "columns": {"request": len(req_cols), "candidate": len(cand_cols)},
        "levels": table, "in_process_ceiling": ceilings,
        "load_average_end": os.getloadavg()[0],
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"ranking head vs duplicated features: {a.candidates} candidates per request, top {K}, "
          f"{a.rounds} interleaved rounds of {a.duration_s:.0f} s, medians [min-max]")
    print(f"request bytes: rows {sizes[ROWS]:,.0f}, ranker {sizes[RANKER]:,.0f} "
          f"({result['request_bytes_ratio']:.2f}x fewer; {len(req_cols)} of {len(req_cols) + len(cand_cols)} "
          "columns are per request)")
    print(f"{'conc':>4} {'rows cand/s':>22} {'ranker cand/s':>22} {'ratio':>6} {'rows p50/p99 ms':>16} "
          f"{'ranker p50/p99 ms':>18}")
    for t in table:
        print(f"{t['concurrency']:>4} {t['rows_candidates_per_s']:>10,.0f} [{t['rows_range'][0]:,.0f}-"
              f"{t['rows_range'][1]:,.0f}] {t['ranker_candidates_per_s']:>10,.0f} [{t['ranker_range'][0]:,.0f}-"
              f"{t['ranker_range'][1]:,.0f}] {t['ratio']:>5.2f}x {t['rows_p50_ms']:>7.2f}/{t['rows_p99_ms']:<7.2f} "
              f"{t['ranker_p50_ms']:>8.2f}/{t['ranker_p99_ms']:<8.2f}")  # fmt: skip
    for name, ceil in ceilings.items():
        print(f"in-process ONNX Runtime ceiling, {name}: {ceil['requests_per_s'] * a.candidates:,.0f} candidates/s "
              f"(p50 {ceil['p50_ms']:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
