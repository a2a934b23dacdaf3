"""Scale-out on real pods: replicas N -> N+1 until the new pod is Ready, rebuild-per-pod vs build once (model store).

One run, same model, same node: the chart is installed twice in turn (without `modelStore`, where each pod builds in
its init container, then with it, where a build Job publishes once and pods only fetch), each with its own
SeaweedFS store in the namespace holding the CTR Keras model. Per mode: the model is made Ready at 1 replica, then
scaled 1 -> 2 and back `--rounds` times; each scale-out is timed from the patch to the new pod's Ready condition.
Printed: the model (parameters, .keras and ONNX sizes, the builder's own build time in a pod), medians with ranges,
the ratio, the builder-image references of the scale-out pods, and the build Jobs created by scale-outs (both should
be 0 with a model store). A cluster this run brought up is taken down again.

`--model tiny` (the default) is the real-pod tests' CTR MLP (16-8 units, a few KB); `--model production` a
production-sized CTR model (Embedding tables for user, item, brand and category ids plus dense features into a
512-256-128 MLP: 26.1 M parameters, 105 MB; see bench/builder/models.py), generated here. Its pods ask for 8Gi
(the builder peaks at ~7 GB converting it, in the init container or the build Job), it reaches the store through
a receiver pod (the API server's pod proxy: too large for a ConfigMap), and the store gets room for it.

    python bench/builder/scale_out.py [--model tiny|production] [--rounds 3] [--keep-cluster]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

from bench.builder.models import CHOICES, BenchModel, bench_model, size  # noqa: E402
from recserve_cluster import images  # noqa: E402
from recserve_cluster.cluster import Cluster, get_provider  # noqa: E402
from tests.helpers import wait_for  # noqa: E402
from tests.integration.realpods import (  # noqa: E402
    MODEL,
    apply,
    get,
    installed_platform,
    placement,
    recommender_model,
    wait_model_ready,
)
from tests.integration.s3store import (  # noqa: E402
    BUCKET,
    BUILDER_IMAGE,
    CREDENTIALS,
    KEYS,
    POD_SECURITY,
    RESOURCES,
    RESTRICTED,
    S3_PORT,
    STORE,
    UPLOAD,
    create,
    seaweedfs_objects,
    secret_manifest,
    upload,
    wait_pod,
)

PREDICTORS = "app.kubernetes.io/component=predictor"
BUILDER = "model-repo-builder"  # the builder's container: serving pods' init container, the build Job's container
# The production model's pods: the builder converting it peaks at ~7 GB (tf2onnx), in the serving pod's init
# container (rebuild per pod) or in the build Job, which both take the serving resources.
PRODUCTION_RESOURCES = {**RESOURCES, "memory": "8Gi"}
RECEIVE_PORT = 8080

# Runs in the builder image: receives the model as the body of one POST /model/<size>/<sha256> (from the bench,
# through the API server's pod proxy; chunked or with a length), checks both, then runs the tests' UPLOAD script.
RECEIVE = """
import hashlib, http.server, os, threading
PATH, done = "/model/model.keras", threading.Event()
def body(rfile, headers):
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        while (n := int(rfile.readline().split(b";")[0].strip() or b"0", 16)):
            yield from exactly(rfile, n)
            rfile.readline()
        while rfile.readline() not in (b"\\r\\n", b"\\n", b""):
            pass
    else:
        yield from exactly(rfile, int(headers.get("Content-Length") or 0))
def exactly(rfile, n):
    while n:
        b = rfile.read(min(n, 1 << 20))
        if not b:
            raise EOFError("body ended early")
        n -= len(b)
        yield b
class Receive(http.server.BaseHTTPRequestHandler):
    def reply(self, code, text):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(text.encode())
    def do_GET(self):
        self.reply(200, "ready")
    def do_POST(self):
        size, digest = self.path.rstrip("/").split("/")[-2:]
        h, n = hashlib.sha256(), 0
        with open(PATH + ".part", "wb") as f:
            for b in body(self.rfile, self.headers):
                h.update(b)
                n += len(b)
                f.write(b)
        if n != int(size) or h.hexdigest() != digest:
            return self.reply(400, f"got {n} bytes, sha256 {h.hexdigest()}; expected {size}, {digest}")
        os.rename(PATH + ".part", PATH)
        self.reply(200, f"received {n} bytes")
        done.set()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("", int(os.environ["PORT"])), Receive)
threading.Thread(target=server.serve_forever, daemon=True).start()
done.wait()
server.shutdown()
"""


def _endpoint(ns: str) -> str:
    return f"http://{STORE}.{ns}.svc.cluster.local:{S3_PORT}"


def _store_objects(ns: str, access: str, secret: str, large: bool) -> list[dict[str, Any]]:
    """The tests' SeaweedFS store; for a large model, with room for it and its artifact (16 volumes of 64 MB on a
    2Gi emptyDir instead of 4 on 1Gi: SeaweedFS refuses writes once its volumes are full)."""
    objs = seaweedfs_objects(ns, access, secret)
    if large:
        pod = next(o for o in objs if o["kind"] == "Pod")
        container = pod["spec"]["containers"][0]
        container["args"] = ["-volume.max=16" if a.startswith("-volume.max=") else a for a in container["args"]]
        next(v for v in pod["spec"]["volumes"] if v["name"] == "data")["emptyDir"]["sizeLimit"] = "2Gi"
    return objs


def upload_large(cluster: Cluster, ns: str, endpoint: str, model: Path, keys: list[str]) -> dict[str, Any]:
    """Upload `model` under `keys` for models beyond a ConfigMap's 1 MiB: a receiver pod (builder image, the
    credentials Secret) takes the file as the body of one POST through the API server's pod proxy (what reaches
    pods from this machine: the API server listens on 127.0.0.1, pods cannot read the host's files), checks its
    size and sha256, then uploads it with the tests' UPLOAD script; its JSON report."""
    name = f"upload-{secrets.token_hex(3)}"
    container = {
        "name": "upload", "image": BUILDER_IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-c", RECEIVE + "\n" + UPLOAD], "envFrom": [{"secretRef": {"name": CREDENTIALS}}],
        "env": [{"name": "AWS_ENDPOINT_URL", "value": endpoint}, {"name": "BUCKET", "value": BUCKET},
                {"name": "KEYS", "value": ",".join(keys)}, {"name": "PORT", "value": str(RECEIVE_PORT)}],
        "ports": [{"name": "receive", "containerPort": RECEIVE_PORT}],
        "readinessProbe": {"httpGet": {"path": "/", "port": RECEIVE_PORT}, "periodSeconds": 1},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": RESTRICTED,
        "volumeMounts": [{"name": "model", "mountPath": "/model"}],
    }  # fmt: skip
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
           "spec": {**placement(), "restartPolicy": "Never", "automountServiceAccountToken": False,
                    "enableServiceLinks": False, "securityContext": POD_SECURITY, "containers": [container],
                    "volumes": [{"name": "model", "emptyDir": {"sizeLimit": "2Gi"}}]}}  # fmt: skip
    digest = hashlib.sha256()
    with model.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    create(cluster, pod)
    try:
        wait_pod(cluster, ns, name, "Ready", 240)
        length = model.stat().st_size
        path = f"/api/v1/namespaces/{ns}/pods/{name}:{RECEIVE_PORT}/proxy/model/{length}/{digest.hexdigest()}"
        cluster.kubectl("create", "--raw", path, "-f", str(model), timeout=600)
        wait_pod(cluster, ns, name, "Succeeded", 300)
        report: dict[str, Any] = json.loads(cluster.kubectl("logs", name, "-n", ns).stdout.strip().splitlines()[-1])
        return report
    finally:
        cluster.kubectl("delete", "pod", name, "-n", ns, "--ignore-not-found", "--wait=false", check=False)


def _builder_report(cluster: Cluster, ns: str, *target: str) -> dict[str, Any]:
    """The builder's JSON report (its last log line) from a pod's init container or the build Job: the ONNX size,
    the builder's own build and conversion time, the parity error; {} when it cannot be read."""
    out = cluster.kubectl("logs", *target, "-n", ns, "-c", BUILDER, "--tail=5", check=False)
    for line in reversed(out.stdout.strip().splitlines()):
        try:
            report = json.loads(line)
        except ValueError:
            continue
        artifact = report.get("artifact") or {}
        return {"onnx_bytes": artifact.get("size_bytes"), "build_s": report.get("build_seconds"),
                "convert_s": report.get("convert_seconds"),
                "parity_max_abs_error": (report.get("parity") or {}).get("max_abs_error")}  # fmt: skip
    return {}


def _ready_pods(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    pods = get(cluster, "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={MODEL},{PREDICTORS}")["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions") or [])]


def _scale(cluster: Cluster, ns: str, replicas: int) -> None:
    cluster.kubectl("patch", "recommendermodel", MODEL, "-n", ns, "--type=merge",
                    "-p", json.dumps({"spec": {"serving": {"replicas": replicas}}}))  # fmt: skip


def _stamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _timeline(pod: dict[str, Any]) -> dict[str, float]:
    """Seconds from the pod's creation to its init step's end, its containers' start and its Ready condition."""
    created = _stamp(pod["metadata"]["creationTimestamp"])
    status = pod["status"]
    init = (status.get("initContainerStatuses") or [{}])[0].get("state", {}).get("terminated") or {}
    main = ((status.get("containerStatuses") or [{}])[0].get("state") or {}).get("running") or {}
    ready = next(c["lastTransitionTime"] for c in status["conditions"] if c["type"] == "Ready")
    out = {"ready": _stamp(ready) - created}
    if init:
        out["init_s"] = _stamp(init["finishedAt"]) - _stamp(init["startedAt"])
        out["init_done"] = _stamp(init["finishedAt"]) - created
    if main.get("startedAt"):
        out["main_started"] = _stamp(main["startedAt"]) - created
    return out


def _job_names(cluster: Cluster, ns: str) -> list[str]:
    items = get(cluster, "jobs", "-n", ns, "-l", f"app.kubernetes.io/instance={MODEL}")["items"]
    return [j["metadata"]["name"] for j in items]


def _jobs(cluster: Cluster, ns: str) -> int:
    return len(_job_names(cluster, ns))


def measure(cluster: Cluster, tmp: Path, model: BenchModel, *, store: bool, rounds: int) -> dict[str, Any]:
    def values(ns: str) -> dict[str, Any]:
        url = f"s3://{BUCKET}/artifacts" if store else ""
        # The baseline has no store at all (the chart's embedded one off too); build once uses the bench's store.
        return {"modelStore": {"url": url, "endpoint": _endpoint(ns), "secretName": CREDENTIALS,
                               "embedded": {"enabled": False}}}

    chart_tmp = tmp / ("store" if store else "per-pod")
    chart_tmp.mkdir()
    with installed_platform(cluster, chart_tmp, "b-scale-out", values) as ns:
        access, secret = f"recserve{secrets.token_hex(4)}", secrets.token_hex(20)
        large = model.kind != "tiny"
        create(cluster, *_store_objects(ns, access, secret, large),
                secret_manifest(ns, CREDENTIALS, {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}))
        wait_pod(cluster, ns, STORE, "Ready", 180)
        if large:
            upload_large(cluster, ns, _endpoint(ns), model.path, [KEYS[1]])
        else:
            upload(cluster, ns, _endpoint(ns), model.path)
        resources = PRODUCTION_RESOURCES if large else RESOURCES
        rm = recommender_model(f"s3://{BUCKET}/{KEYS[1]}", 1, serving={"resources": resources},
                               model={"endpoint": _endpoint(ns), "credentials": {"secretRef": {"name": CREDENTIALS}}})
        apply(cluster, {**rm, "metadata": {"name": MODEL, "namespace": ns}})
        t0 = time.monotonic()
        wait_model_ready(cluster, ns, timeout=900)
        first_ready_s = time.monotonic() - t0
        job_names = _job_names(cluster, ns)
        jobs_before = len(job_names)
        # The builds' reports: the build Job's (build once), else the first pod's init container's, then each
        # scale-out pod's (rebuild per pod).
        first = ([f"job/{job_names[0]}"] if store and job_names
                 else [p["metadata"]["name"] for p in _ready_pods(cluster, ns)])  # fmt: skip
        reports = [r for t in first if (r := _builder_report(cluster, ns, t))]
        times: list[float] = []
        timelines: list[dict[str, float]] = []
        builder_refs = 0
        for _ in range(rounds):
            before = {p["metadata"]["name"] for p in _ready_pods(cluster, ns)}
            start = time.monotonic()
            _scale(cluster, ns, 2)
            pods = wait_for(lambda: (ps := _ready_pods(cluster, ns)) and len(ps) == 2 and ps, 900, 1,
                            "the new replica to be Ready")  # fmt: skip
            times.append(time.monotonic() - start)
            new = [p for p in pods if p["metadata"]["name"] not in before]
            timelines += [_timeline(p) for p in new]
            if not store:
                reports += [r for p in new if (r := _builder_report(cluster, ns, p["metadata"]["name"]))]
            builder_refs += sum(c["image"] == images.BUILDER for p in new
                                for c in p["spec"]["containers"] + p["spec"].get("initContainers", []))
            _scale(cluster, ns, 1)
            wait_for(lambda: len(get(cluster, "pods", "-n", ns, "-l",
                                     f"app.kubernetes.io/instance={MODEL},{PREDICTORS}")["items"]) == 1, 300, 1,
                     "the scale-in")  # fmt: skip
        return {"mode": "build once (model store)" if store else "rebuild per pod", "first_ready_s": first_ready_s,
                "scale_out_s": times, "pod_timelines_s": timelines, "builder_image_refs": builder_refs,
                "jobs_from_scale_outs": _jobs(cluster, ns) - jobs_before, "builder_reports": reports,
                "resources": resources}  # fmt: skip


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=CHOICES, default="tiny",
                        help="tiny: the tests' CTR MLP; production: a 105 MB embedding + MLP CTR model")
    parser.add_argument("--rounds", type=int, default=3, help="scale-outs per mode")
    parser.add_argument("--keep-cluster", action="store_true", help="leave a cluster this run started running")
    args = parser.parse_args()
    provider = get_provider()
    existed = provider.current() is not None
    cluster = provider.up()
    results: list[dict[str, Any]] = []
    try:
        with ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            model = bench_model(args.model, tmp)
            print(model.describe(), flush=True)
            for store in (False, True):
                results.append(measure(cluster, tmp, model, store=store, rounds=args.rounds))
                print(json.dumps(results[-1]), flush=True)
    finally:
        if not existed and not args.keep_cluster and provider.name != "existing":
            provider.down()
    summary(model, results)


def summary(model: BenchModel, results: list[dict[str, Any]]) -> None:
    """The table: the model, then per mode first Ready, the scale-outs, the pods' init step and Triton's start."""
    print(f"\nmodel: {model.describe()}")
    onnx = next((r["onnx_bytes"] for res in results for r in res["builder_reports"] if r.get("onnx_bytes")), None)
    builds = [r["build_s"] for res in results for r in res["builder_reports"] if r.get("build_s") is not None]
    print(f"ONNX model: {size(onnx)}" if onnx else "ONNX model: size not reported",
          f"; the builder's own build time in a pod: {statistics.median(builds):.1f} s median "
          f"[{min(builds):.1f}-{max(builds):.1f}] of {len(builds)}" if builds else "", sep="")
    print(f"serving resources: {results[0]['resources']}")
    print(f"{'mode':<26} {'first Ready s':>13} {'scale-out s median [min-max]':>30} {'init step s':>11} "
          f"{'init->Ready s':>13} {'builder refs':>12} {'jobs':>5}")
    for r in results:
        t = r["scale_out_s"]
        init = [p["init_s"] for p in r["pod_timelines_s"] if "init_s" in p]
        after = [p["ready"] - p["init_done"] for p in r["pod_timelines_s"] if "init_done" in p]
        print(f"{r['mode']:<26} {r['first_ready_s']:>13.1f} {statistics.median(t):>14.1f} "
              f"{f'[{min(t):.1f}-{max(t):.1f}]':<15} {_median(init):>11} {_median(after):>13} "
              f"{r['builder_image_refs']:>12} {r['jobs_from_scale_outs']:>5}")
    per_pod, once = (statistics.median(r["scale_out_s"]) for r in results)
    print(f"scale-out speed-up with a model store: {per_pod / once:.1f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
