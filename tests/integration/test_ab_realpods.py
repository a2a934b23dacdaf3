"""The operator's A/B path end to end on real pods: real counters → Prometheus → sequential test → verdict.

Shoppers run in a pod: each request through the builtin router's nginx pods (sticky by x-user-id) shows a
page of recommendations, the router's X-RecServe-Variant header says which revision answered, and the
shopper clicks each shown item with that variant's true click-through rate. The pod exports the counters
the way examples/ctr-dnn/ab_metrics.py does (recserve_impressions_total / recserve_clicks_total by model
and variant); Prometheus (through Prometheus Operator) scrapes them via a ServiceMonitor, and the operator
pod queries their increase since the split went live ({{elapsed}}). The only simulated part is the user.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from recserve_cluster import nodeconfig as nc
from recserve_cluster import volumes
from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.realpods import (
    MODEL,
    NODE,
    PYTHON_IMAGE,
    apply,
    get,
    keras_model,
    placement,
    platform_fixture,
    wait_model_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

PAGE = 50  # items shown per request: impressions accumulate fast enough for a test
SHOPPER = '''
import json, os, random, threading, time, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

URL, MODEL, BODY = os.environ["URL"], os.environ["MODEL"], os.environ["BODY"].encode()
CTR, PAGE = json.loads(os.environ["CTR"]), int(os.environ["PAGE"])
lock = threading.Lock()
counts = {(kind, v): 0 for kind in ("impressions", "clicks") for v in CTR}
failed = [0]

class Metrics(BaseHTTPRequestHandler):
    def do_GET(self):
        with lock:
            lines = []
            for kind in ("impressions", "clicks"):
                lines.append(f"# TYPE recserve_{kind}_total counter")
                lines += [f'recserve_{kind}_total{{model="{MODEL}",variant="{v}"}} {counts[(kind, v)]}' for v in CTR]
        body = ("\\n".join(lines) + "\\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

def shop(worker):
    rng = random.Random(worker)
    while True:
        user = f"user-{rng.randrange(1_000_000)}"
        req = urllib.request.Request(URL, data=BODY, headers={"Content-Type": "application/json", "x-user-id": user})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
                variant = r.headers.get("X-RecServe-Variant", "unknown")
        except Exception:
            with lock:
                failed[0] += 1
            time.sleep(0.2)
            continue
        if variant not in CTR:
            with lock:
                failed[0] += 1
            continue
        clicks = sum(rng.random() < CTR[variant] for _ in range(PAGE))
        with lock:
            counts[("impressions", variant)] += PAGE
            counts[("clicks", variant)] += clicks

threading.Thread(target=ThreadingHTTPServer(("", 9100), Metrics).serve_forever, daemon=True).start()
for w in range(4):
    threading.Thread(target=shop, args=(w,), daemon=True).start()
while True:
    time.sleep(10)
    with lock:
        print(json.dumps({"impressions": {v: counts[("impressions", v)] for v in CTR},
                          "clicks": {v: counts[("clicks", v)] for v in CTR}, "failed": failed[0]}), flush=True)
'''


def shopper_objects(ns: str, url: str, body: str, ctr: dict[str, float]) -> list[dict[str, Any]]:
    labels = {"app": "shopper"}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "shopper", "namespace": ns, "labels": labels},
           "spec": {**placement(), "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "shopper", "image": PYTHON_IMAGE, "imagePullPolicy": "IfNotPresent",
                                    "command": ["python", "-u", "-c", SHOPPER],
                                    "env": [{"name": "URL", "value": url}, {"name": "MODEL", "value": MODEL},
                                            {"name": "BODY", "value": body}, {"name": "CTR", "value": json.dumps(ctr)},
                                            {"name": "PAGE", "value": str(PAGE)}],
                                    "ports": [{"name": "metrics", "containerPort": 9100}],
                                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                                  "limits": {"cpu": "300m", "memory": "256Mi"}}}]}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shopper", "namespace": ns,
                                                                   "labels": labels},
               "spec": {"selector": labels, "ports": [{"name": "metrics", "port": 9100}]}}
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": "shopper", "namespace": ns},
               "spec": {"selector": {"matchLabels": labels}, "endpoints": [{"port": "metrics", "interval": "5s"}]}}
    return [pod, service, monitor]


def start_shopper(cluster: Cluster, ns: str, url: str, body: str, ctr: dict[str, float]) -> None:
    cluster.kubectl("delete", "pod", "shopper", "-n", ns, "--ignore-not-found", "--wait=true", timeout=90)
    apply(cluster, *shopper_objects(ns, url, body, ctr))
    cluster.kubectl("wait", "--for=condition=Ready", "pod/shopper", "-n", ns, "--timeout=120s", timeout=150)


def shopper_counts(cluster: Cluster, ns: str) -> dict[str, Any]:
    lines = cluster.kubectl("logs", "shopper", "-n", ns, check=False).stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def ab_model(ns: str, version: int, max_duration: str, confidence: float = 0.95) -> dict[str, Any]:
    def query(kind: str) -> str:
        # Counts since the split went live: the operator fills {{elapsed}} in.
        return f'sum by (variant) (increase(recserve_{kind}_total{{model="{MODEL}"}}[' + "{{elapsed}}]))"

    return {
        "apiVersion": "recserve.dev/v1alpha1", "kind": "RecommenderModel",
        "metadata": {"name": MODEL, "namespace": ns},
        "spec": {
            "model": {"uri": f"pvc://models/ctr/{version}/model.keras", "format": "keras", "version": version},
            "optimize": {"backend": "onnxruntime", "precision": "fp32"},
            "serving": {"replicas": 1, "maxBatchSize": 64, "instances": {"kind": "GPU", "count": 1},
                        "resources": {"gpu": 1, "cpu": "300m", "memory": "3Gi"},
                        "gpuProduct": nc.REAL_NODE.gpu_product},
            "rollout": {
                "strategy": "abTest",
                "routing": {"provider": "builtin", "stickyHeader": "x-user-id"},
                "analysis": {"interval": "15s", "abTest": {
                    "metric": "ctr", "clicks": query("clicks"),
                    "impressions": query("impressions"), "confidence": confidence,
                    "minImpressions": 5000, "power": 0.8, "minDetectableEffect": 0.2,
                    "maxDuration": max_duration, "split": 50}},
            },
        },
    }  # fmt: skip


platform = platform_fixture("t-ab")


def test_the_operator_names_the_better_variant_from_real_counters_and_an_aa_run_names_none(
    cluster: Cluster, platform: str, tmp_path: Path
) -> None:
    ns = platform
    path, x, _ = keras_model(tmp_path, rows=4, seed=11)
    # Three versions of the same network: the users' click-through rate, not the scores, decides here.
    volumes.upload(cluster, ns, "models", NODE, {f"ctr/{v}/model.keras": path for v in (1, 2, 3)})
    try:
        apply(cluster, ab_model(ns, 1, "10m"))
        rm = wait_model_ready(cluster, ns)
        v1 = rm["status"]["stable"]["revision"]
        url = f"{rm['status']['endpoints']['http']}/v2/models/{MODEL}/infer"
        serving = f"recserve.dev/revision={v1},app.kubernetes.io/component=predictor"  # not its build Job's pod
        pod = get(cluster, "pods", "-n", ns, "-l", serving)["items"][0]["metadata"]["name"]
        meta = json.loads(cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{ns}/pods/{pod}:8000/proxy/v2/models/"
                                          f"{MODEL}").stdout)
        body = json.dumps({"inputs": [{"name": meta["inputs"][0]["name"], "shape": list(x.shape),
                                       "datatype": "FP32", "data": x.ravel().tolist()}]})

        # A/B: the candidate's users click 8% of shown items, stable's 5%.
        start_shopper(cluster, ns, url, body, {"stable": 0.05, "canary": 0.08})
        started = time.monotonic()
        apply(cluster, ab_model(ns, 2, "10m"))

        def decided() -> dict[str, Any] | None:
            st = (get(cluster, "recommendermodel", MODEL, "-n", ns) or {}).get("status") or {}
            return st if (st.get("abTest") or {}).get("winner") else None

        st = wait_for(decided, 600, 3, "the A/B test to decide")
        ab = st["abTest"]
        seconds = time.monotonic() - started
        print(f"A/B decided in {seconds:.0f}s: winner={ab['winner']} lift={ab.get('lift')} "
              f"p={ab.get('sequentialPValue')} variants={ab.get('variants')}")
        assert ab["winner"] == "canary", ab
        assert ab["sequentialPValue"] <= 0.05 and ab["lift"] > 0
        assert min(v["impressions"] for v in ab["variants"]) >= 5000
        v2 = wait_for(lambda: ((s := (get(cluster, "recommendermodel", MODEL, "-n", ns) or {}).get("status") or {})
                               .get("stable") or {}).get("revision") not in (None, v1) and s["stable"]["revision"],
                      180, 2, "the winner to become stable")
        counts = shopper_counts(cluster, ns)
        print(f"shopper during the A/B test and the promotion: {counts}")
        assert counts["failed"] == 0, counts  # no request failed, also while the router switched plans

        # A/A: both variants' users click 5%; after maxDuration no winner is named and stable stays. The sequential
        # test names a false winner with probability at most 1 - confidence over all its looks: at the A/B half's
        # 0.95 this check would fail one run in twenty by design (a CI run saw sequential p = 0.044), so the A/A
        # half asks for 0.999, a false-winner rate of at most 1 in 1,000.
        start_shopper(cluster, ns, url, body, {"stable": 0.05, "canary": 0.05})
        apply(cluster, ab_model(ns, 3, "2m", confidence=0.999))

        def ended() -> dict[str, Any] | None:
            st = (get(cluster, "recommendermodel", MODEL, "-n", ns) or {}).get("status") or {}
            canary = st.get("canary") or {}
            return st if canary.get("phase") in ("RolledBack", "Promoted") and canary.get("revision") != v2 else None

        st = wait_for(ended, 480, 3, "the A/A test to end")
        print(f"A/A ended: {st['canary'].get('message')} abTest={st.get('abTest')}")
        assert st["canary"]["phase"] == "RolledBack", st["canary"]
        assert (st.get("abTest") or {}).get("winner") == "none", st.get("abTest")
        assert st["stable"]["revision"] == v2
    finally:
        cluster.kubectl("delete", "recommendermodel", MODEL, "-n", ns, "--ignore-not-found", "--wait=true",
                        "--timeout=120s", check=False, timeout=150)
        cluster.kubectl("delete", "pod", "shopper", "-n", ns, "--ignore-not-found", "--wait=false", check=False)
        volumes.remove(cluster, ns, "models", NODE)
