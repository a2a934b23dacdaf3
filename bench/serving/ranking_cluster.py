"""Ranking head vs duplicated features through the Service on the real node: the example CTR model, in-cluster load.

The local benchmark (`ranking.py`) runs both models on one local Triton; this one runs them the way the operator
serves them, on the local cluster's real node `real-0`:

(rows)   RecommenderModel `ctr-rows`: the example CTR model as trained; every request is [N, 51] rows, the user's
         and the context's columns copied into each, Triton returns N scores.
(ranker) RecommenderModel `ctr-ranker`: the same model file with `spec.serving.ranking.requestColumns` (the columns
         train.py writes to feature_spec.json, "0-17,42-47"): `request [1, 24]` once, `candidates [N, 27]`, `k`;
         the build Job adds the ranking head, Triton answers the top k.

Both are `immediate` rollouts (builtin router), one Triton pod each with the same settings (one instance, no
dynamic batching, the same CPU request), built once by their build Jobs from the same model file in a PVC. A
closed-loop load generator (`loadgen.py`, unchanged, shipped in a ConfigMap) runs in a pod on real-0 in the
operator image and measures both in interleaved rounds (the order alternating per round). The path measured is
`--via revision` (default): Service DNS of each model's per-revision Service `<model>-<revision>` → kube-proxy
(ClusterIP) → the Triton pod; `--via router` goes through the builtin nginx router's Service instead. Before any
timing the pod checks that the ranker's top k of every request is the top k of the rows model's scores.

Printed per concurrency level: candidates/s and requests/s (medians over rounds, [min-max]), request bytes,
p50/p99 (medians, [min-max]) and the ranker/rows ratios; everything, raw rounds included, goes to
OUT/results.json. The chart is installed into a new namespace that is deleted afterwards; a cluster this run
brought up is taken down again unless --keep-cluster.

    python bench/serving/ranking_cluster.py [--concurrency 1,4,16] [--rounds 3] [--duration-s 5] [--keep-cluster]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "operator")]

from ranking import RANKER, ROWS, K, request_bodies  # noqa: E402
from run import ensure_model, log, make_requests  # noqa: E402

from model_repo_builder.ranking import parse_columns  # noqa: E402
from recserve_cluster import images, volumes  # noqa: E402
from recserve_cluster.cluster import Cluster, get_provider  # noqa: E402
from tests.helpers import wait_for  # noqa: E402
from tests.integration.realpods import (  # noqa: E402
    NODE,
    apply,
    get,
    installed_platform,
    placement,
    recommender_model,
    wait_model_ready,
)

CLAIM = "models"
MODEL_PATH = "ctr-dnn/1/model.keras"
HTTP_PORT = 8000  # Triton's HTTP port on the per-revision Service
LOADGEN_POD = "ranking-loadgen"
CHUNK_BYTES = 700_000  # request bodies per ConfigMap (a ConfigMap holds at most 1 MiB)
# The same serving settings for both: one CPU-request share each (no CPU limit), one instance, no dynamic batching.
RESOURCES = {"gpu": 1, "cpu": "300m", "memory": "3Gi"}

# Runs in the load-generator pod (operator image: Python, numpy, aiohttp). First a correctness check of every
# request body against both models, then `rounds` runs of loadgen.py over both, the order alternating per round.
DRIVER = r'''
import json, subprocess, sys, time, urllib.error, urllib.request
import numpy as np

plan = json.load(open("/bench/code/plan.json"))
DTYPES = {"FP32": np.float32, "INT64": np.int64}


def post(url, body, headers):
    deadline = time.monotonic() + 180  # the Service's endpoints may lag the model's Ready by a few seconds
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=30) as r:
                return r.read(), r.headers
        except (urllib.error.URLError, ConnectionError) as exc:
            if time.monotonic() > deadline:
                raise
            print(f"waiting for {url}: {exc}", file=sys.stderr, flush=True)
            time.sleep(2)


def outputs(data, headers):
    """Triton's binary tensor response: a JSON header, then each binary output's bytes in order."""
    n = int(headers.get("Inference-Header-Content-Length") or len(data))
    head, off, out = json.loads(data[:n]), n, {}
    for o in head["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.asarray(o["data"], DTYPES[o["datatype"]]).reshape(o["shape"])
            continue
        out[o["name"]] = np.frombuffer(data[off:off + size], DTYPES[o["datatype"]]).reshape(o["shape"])
        off += size
    return out


specs = {name: json.load(open(s["spec"])) for name, s in plan["systems"].items()}
rows, ranker = plan["rows"], plan["ranker"]
exact, max_err, bad = 0, 0.0, []
for i, (rb, kb) in enumerate(zip(specs[rows]["bodies"], specs[ranker]["bodies"])):
    scores = outputs(*post(specs[rows]["url"], open(rb, "rb").read(), specs[rows]["headers"]))
    scores = scores[plan["rows_output"]].reshape(-1)
    top = outputs(*post(specs[ranker]["url"], open(kb, "rb").read(), specs[ranker]["headers"]))
    idx, got = top["indices"].reshape(-1), top["scores"].reshape(-1)
    want = np.argsort(-scores, kind="stable")[:plan["k"]]
    exact += int(np.array_equal(idx, want))
    err = float(np.max(np.abs(got - scores[idx]))) if idx.size else 0.0
    max_err = max(max_err, err)
    # Up to ties within the tolerance: k rows whose scores are the top k scores, descending.
    if idx.size != want.size or err > 1e-4 or np.any(np.abs(got - scores[want]) > 1e-4):
        bad.append(i)
print(json.dumps({"check": {"requests": len(specs[rows]["bodies"]), "topk_exact": exact,
                            "max_abs_error": max_err, "mismatched": bad}}), flush=True)
if bad:
    sys.exit(2)

names = list(plan["systems"])
for r in range(plan["rounds"]):
    order = names if r % 2 == 0 else names[::-1]
    cmd = [sys.executable, "/bench/code/loadgen.py", "--concurrency", plan["concurrency"],
           "--duration-s", str(plan["duration_s"]), "--warmup-s", str(plan["warmup_s"])]
    for name in order:
        cmd += ["--spec", f"{name}={plan['systems'][name]['spec']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr, flush=True)
        sys.exit(1)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            print(json.dumps({"round": r, "order": order, **json.loads(line)}), flush=True)
'''


def model_spec(name: str, candidates: int, ranking: dict[str, Any] | None) -> dict[str, Any]:
    """The real-pod tests' RecommenderModel, renamed, served alone (`immediate`) with the bench's settings."""
    serving: dict[str, Any] = {"maxBatchSize": max(256, candidates), "resources": RESOURCES}
    if ranking:
        serving["ranking"] = ranking
    rm = recommender_model(f"pvc://{CLAIM}/{MODEL_PATH}", 1, serving=serving)
    rm["spec"]["rollout"] = {"strategy": "immediate", "routing": {"provider": "builtin"}}
    rm["metadata"]["name"] = name
    return rm


def body_configmaps(ns: str, name: str, bodies: list[bytes]) -> tuple[list[dict[str, Any]], list[str]]:
    """The request bodies in as many ConfigMaps as they need, and each body's path in the pod."""
    chunks: list[dict[str, bytes]] = [{}]
    for i, body in enumerate(bodies):
        if chunks[-1] and sum(map(len, chunks[-1].values())) + len(body) > CHUNK_BYTES:
            chunks.append({})
        chunks[-1][f"{i:03d}.bin"] = body
    cms, paths = [], []
    for j, chunk in enumerate(chunks):
        cms.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"bench-{name}-{j}", "namespace": ns},
                    "binaryData": {k: base64.b64encode(v).decode() for k, v in chunk.items()}})  # fmt: skip
        paths += [f"/bench/{name}-{j}/{k}" for k in chunk]
    return cms, paths


def loadgen_pod(ns: str, configmaps: list[str], deadline_s: int) -> dict[str, Any]:
    mounts = [{"name": cm, "mountPath": "/bench/code" if cm == "bench-code" else f"/bench/{cm[len('bench-'):]}",
               "readOnly": True} for cm in configmaps]  # fmt: skip
    container = {
        "name": "loadgen", "image": images.operator_image(), "imagePullPolicy": "IfNotPresent",
        "command": ["python", "/bench/code/driver.py"], "volumeMounts": mounts,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }  # fmt: skip
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": LOADGEN_POD, "namespace": ns, "labels": {"app": LOADGEN_POD}},
            "spec": {**placement(), "restartPolicy": "Never", "automountServiceAccountToken": False,
                     "activeDeadlineSeconds": deadline_s,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65534,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [container],
                     "volumes": [{"name": cm, "configMap": {"name": cm}} for cm in configmaps]}}  # fmt: skip


def server_side_apply(cluster: Cluster, obj: dict[str, Any]) -> None:
    """Large ConfigMaps: no last-applied annotation (limited to 256 KiB) with server-side apply."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(obj), timeout=120)


def run_load(cluster: Cluster, ns: str, *, urls: dict[str, str], bodies: dict[str, list[bytes]],
             headers: dict[str, dict[str, str]], rows_output: str, a: argparse.Namespace,
             out: Path) -> list[dict[str, Any]]:
    """The load-generator pod on the real node: its check, then every round's results (JSON lines of its log)."""
    configmaps, systems = [], {}
    for name in (ROWS, RANKER):
        cms, paths = body_configmaps(ns, name, bodies[name])
        for cm in cms:
            server_side_apply(cluster, cm)
            configmaps.append(cm["metadata"]["name"])
        systems[name] = {"spec": f"/bench/code/{name}.json", "url": urls[name], "headers": headers[name],
                         "bodies": paths}
    plan = {"systems": {n: {"spec": s["spec"]} for n, s in systems.items()}, "rows": ROWS, "ranker": RANKER,
            "rows_output": rows_output, "k": K, "rounds": a.rounds, "concurrency": a.concurrency,
            "duration_s": a.duration_s, "warmup_s": a.warmup_s}  # fmt: skip
    code = {"driver.py": DRIVER, "loadgen.py": (HERE / "loadgen.py").read_text(), "plan.json": json.dumps(plan),
            **{f"{n}.json": json.dumps({k: s[k] for k in ("url", "headers", "bodies")}) for n, s in systems.items()}}
    server_side_apply(cluster, {"apiVersion": "v1", "kind": "ConfigMap",
                                "metadata": {"name": "bench-code", "namespace": ns}, "data": code})
    levels = len(a.concurrency.split(","))
    budget = int(a.rounds * levels * 2 * (a.duration_s + a.warmup_s) * 2 + 300)  # twice the load, plus the check
    apply(cluster, loadgen_pod(ns, ["bench-code", *configmaps], budget))
    log(f"load generator pod {ns}/{LOADGEN_POD} on {NODE}: {a.rounds} rounds x {levels} levels x 2 models "
        f"x {a.duration_s:g} s (stops itself after {budget} s)")

    def finished() -> str | None:
        phase = (get(cluster, "pod", LOADGEN_POD, "-n", ns) or {}).get("status", {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_for(finished, budget + 120, 2, f"load generator pod {LOADGEN_POD}")
    text = cluster.kubectl("logs", LOADGEN_POD, "-n", ns, check=False).stdout
    (out / "logs" / "loadgen-pod.log").write_text(text)
    if phase != "Succeeded":
        raise RuntimeError(f"the load generator pod ended {phase}: {text[-3000:]}")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _stats(values: list[float]) -> tuple[float, float, float]:
    return float(statistics.median(values)), float(min(values)), float(max(values))


def summarize(runs: list[dict[str, Any]], name: str, candidates: int) -> list[dict[str, Any]]:
    """Per concurrency level: medians over rounds with [min, max] of requests/s, candidates/s, p50, p99."""
    levels: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("system") == name:
            levels.setdefault(r["concurrency"], []).append(r)
    table = []
    for conc, rs in sorted(levels.items()):
        rps = _stats([r["throughput_rps"] for r in rs])
        p50 = _stats([r["p50_ms"] for r in rs if r["p50_ms"] is not None] or [float("nan")])
        p99 = _stats([r["p99_ms"] for r in rs if r["p99_ms"] is not None] or [float("nan")])
        table.append({"concurrency": conc, "rounds": len(rs), "requests": sum(r["requests"] for r in rs),
                      "errors": sum(r["errors"] for r in rs),
                      "requests_per_s": rps[0], "requests_per_s_range": list(rps[1:]),
                      "candidates_per_s": rps[0] * candidates,
                      "candidates_per_s_range": [rps[1] * candidates, rps[2] * candidates],
                      "p50_ms": p50[0], "p50_ms_range": list(p50[1:]), "p99_ms": p99[0], "p99_ms_range": list(p99[1:]),
                      "client_cpu_share_max": max(r["client_cpu_share"] for r in rs)})  # fmt: skip
    return table


def print_table(result: dict[str, Any]) -> None:
    sizes = result["request_bytes"]
    print(f"\nranking head vs duplicated features through the Service on {result['node']}: "
          f"{result['candidates']} candidates per request, top {result['k']}, {result['rounds']} interleaved rounds "
          f"of {result['duration_s']:g} s, medians [min-max]")
    print(f"path: {result['path']}")
    check = result["check"]
    print(f"check: the ranker's top {result['k']} = the rows' top {result['k']} on {check['requests']} of "
          f"{check['requests']} requests ({check['topk_exact']} index-exact), max abs score error "
          f"{check['max_abs_error']:.1e}")
    print(f"request bytes: rows {sizes[ROWS]:,.0f}, ranker {sizes[RANKER]:,.0f} "
          f"({result['request_bytes_ratio']:.2f}x fewer; {result['columns']['request']} of "
          f"{result['columns']['request'] + result['columns']['candidate']} columns are per request)")
    head = (f"{'conc':>4} {'model':<7} {'candidates/s [min-max]':>26} {'req/s':>7} {'req bytes':>9} "
            f"{'p50 ms [min-max]':>21} {'p99 ms [min-max]':>22} {'errors':>6}")
    print(head)
    for level in result["levels"]:
        for name, label in ((ROWS, "rows"), (RANKER, "ranker")):
            t = level[name]
            cand = f"{t['candidates_per_s']:,.0f} [{t['candidates_per_s_range'][0]:,.0f}-" \
                   f"{t['candidates_per_s_range'][1]:,.0f}]"
            p50 = f"{t['p50_ms']:.1f} [{t['p50_ms_range'][0]:.1f}-{t['p50_ms_range'][1]:.1f}]"
            p99 = f"{t['p99_ms']:.1f} [{t['p99_ms_range'][0]:.1f}-{t['p99_ms_range'][1]:.1f}]"
            print(f"{level['concurrency']:>4} {label:<7} {cand:>26} {t['requests_per_s']:>7.1f} "
                  f"{sizes[name]:>9,.0f} {p50:>21} {p99:>22} {t['errors']:>6}")
        r = level["ranker_over_rows"]
        print(f"{'':>4} ranker/rows: {r['candidates_per_s']:.2f}x candidates/s, {r['request_bytes']:.2f}x bytes, "
              f"{r['p50_ms']:.2f}x p50, {r['p99_ms']:.2f}x p99")
    print(f"load generator: at most {result['client_cpu_share_max']:.2f} of a core; load average "
          f"{result['load_average'][0]:.1f} at start, {result['load_average'][1]:.1f} at end")


def measure(cluster: Cluster, tmp: Path, *, model: Path, spec_path: Path, a: argparse.Namespace,
            out: Path) -> dict[str, Any]:
    spec = json.loads(spec_path.read_text())
    req_cols = list(parse_columns(spec["request_columns"]))
    cand_cols = [c for c in range(int(spec["feature_dim"])) if c not in set(req_cols)]
    rows = make_requests(spec_path, a.requests, a.candidates)  # [R, N, F]: each request one user, one context
    assert all(np.all(r[:, req_cols] == r[:1, req_cols]) for r in rows), "request columns differ within a request"
    row_bodies, rank_bodies = request_bodies(spec, rows, req_cols, cand_cols)
    bodies = {ROWS: [b for b, _ in row_bodies], RANKER: [b for b, _ in rank_bodies]}
    # One header set per model: every body of a model has the same shapes, so the same JSON header length.
    headers = {ROWS: row_bodies[0][1], RANKER: rank_bodies[0][1]}
    assert all(h == headers[ROWS] for _, h in row_bodies) and all(h == headers[RANKER] for _, h in rank_bodies)
    sizes = {name: float(np.mean([len(b) for b in bs])) for name, bs in bodies.items()}
    ranking = {"requestColumns": spec["request_columns"], "maxK": 100}
    load_start = os.getloadavg()[0]

    with installed_platform(cluster, tmp, "b-ranking") as ns:
        log(f"chart installed, namespace {ns}; copying the model into PVC {CLAIM} on {NODE}")
        volumes.upload(cluster, ns, CLAIM, NODE, {MODEL_PATH: model})
        try:
            for name, rk in ((ROWS, None), (RANKER, ranking)):
                apply(cluster, {**model_spec(name, a.candidates, rk), "metadata": {"name": name, "namespace": ns}})
            t0 = time.monotonic()
            rms = {name: wait_model_ready(cluster, ns, name, timeout=a.ready_timeout_s) for name in (ROWS, RANKER)}
            log(f"both models Ready after {time.monotonic() - t0:.0f} s")
            revisions = {name: rm["status"]["stable"]["revision"] for name, rm in rms.items()}
            urls, hosts = {}, {}
            for name, rm in rms.items():
                router = rm["status"]["endpoints"]["http"]  # http://<model>-router.<ns>.svc.<domain>:<port>
                domain = router.split(".svc.", 1)[1].rsplit(":", 1)[0]
                base = router if a.via == "router" else \
                    f"http://{name}-{revisions[name]}.{ns}.svc.{domain}:{HTTP_PORT}"
                hosts[name] = base
                urls[name] = f"{base}/v2/models/{name}/infer"
            runs = run_load(cluster, ns, urls=urls, bodies=bodies, headers=headers,
                            rows_output=spec["output_name"], a=a, out=out)
        finally:
            for name in (ROWS, RANKER):
                cluster.kubectl("delete", "recommendermodel", name, "-n", ns, "--ignore-not-found", "--wait=true",
                                "--timeout=120s", check=False, timeout=150)
            volumes.remove(cluster, ns, CLAIM, NODE)

    check = next(r["check"] for r in runs if "check" in r)
    runs = [r for r in runs if "system" in r]
    per = {name: summarize(runs, name, a.candidates) for name in (ROWS, RANKER)}
    levels = []
    for rl, kl in zip(per[ROWS], per[RANKER], strict=True):
        levels.append({"concurrency": rl["concurrency"], ROWS: rl, RANKER: kl, "ranker_over_rows": {
            "candidates_per_s": kl["candidates_per_s"] / rl["candidates_per_s"],
            "request_bytes": sizes[RANKER] / sizes[ROWS],
            "p50_ms": kl["p50_ms"] / rl["p50_ms"], "p99_ms": kl["p99_ms"] / rl["p99_ms"]}})  # fmt: skip
    path = ("load generator pod on {node} -> Service DNS {svc} -> kube-proxy (ClusterIP) -> "
            + ("the builtin nginx router pod -> the revision's Service -> the Triton pod" if a.via == "router"
               else "the Triton pod (per-revision Service)"))  # fmt: skip
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cluster": cluster.provider, "node": NODE,
        "via": a.via, "path": path.format(node=NODE, svc=" / ".join(h.split("//", 1)[1] for h in hosts.values())),
        "urls": urls, "revisions": revisions, "candidates": a.candidates, "k": K, "rounds": a.rounds,
        "duration_s": a.duration_s, "warmup_s": a.warmup_s, "concurrency": a.concurrency,
        "distinct_requests": a.requests, "resources": RESOURCES,
        "request_bytes": sizes, "request_bytes_ratio": sizes[ROWS] / sizes[RANKER],
        "columns": {"request": len(req_cols), "candidate": len(cand_cols), "request_columns": spec["request_columns"]},
        "check": check, "levels": levels, "client_cpu_share_max": max(r["client_cpu_share"] for r in runs),
        "load_average": [load_start, os.getloadavg()[0]], "cpu_count": os.cpu_count(), "runs": runs,
        "notes": ["the load generator, both Triton pods and the rest of the cluster share this machine's CPUs: "
                  "absolute figures are far below a dedicated node, the ratios are the result",
                  "the real node's Triton is the CPU stand-in: ONNX Runtime on CPU in a Python-based onnxruntime "
                  "backend (images/triton), KIND_GPU instance groups served on CPU"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ranking_cluster")
    p.add_argument("--model", help="model.keras with feature_spec.json beside it (default: train the example "
                                   "into OUT/model)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--requests", type=int, default=32, help="distinct request bodies cycled by the client")
    p.add_argument("--via", choices=("revision", "router"), default="revision",
                   help="the per-revision Service straight to Triton (default) or the builtin nginx router")
    p.add_argument("--ready-timeout-s", type=float, default=900, help="per model, build included")
    p.add_argument("--keep-cluster", action="store_true", help="leave a cluster this run started running")
    a = p.parse_args(argv)
    out = a.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    model, spec_path = ensure_model(a, out)
    if model.stat().st_size > 900_000:
        raise SystemExit(f"{model} is {model.stat().st_size:,} bytes: the PVC upload goes through a ConfigMap (1 MiB)")

    provider = get_provider()
    existed = provider.current() is not None
    cluster = provider.up()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(cluster, Path(tmp), model=model, spec_path=spec_path, a=a, out=out)
    finally:
        if not existed and not a.keep_cluster and provider.name != "existing":
            provider.down()
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
