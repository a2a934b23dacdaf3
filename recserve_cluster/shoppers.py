"""Simulated shoppers in a pod: requests through the router, clicks from the generator's truth, counters for Prometheus.

Each request asks the router to score one user's 200 candidate items (sticky by x-user-id); the shopper shows
the top 5, clicks each with the item's true click probability (the data generator's ground truth), and counts
impressions and clicks under the variant the router answered with (X-RecServe-Variant), the way
examples/ctr-dnn/ab_metrics.py tells applications to. A ServiceMonitor lets the in-cluster Prometheus scrape
the counters, so the dashboard's click-through panel shows live data. The only simulated part is the user.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy.typing as npt

from .cluster import Cluster
from .images import PYTHON_BASE

NAME = "shoppers"
PORT = 9100
PAGE = 5  # recommendations shown per request
IMAGE = PYTHON_BASE  # the Debian Python image every real-node image builds on
DATA_KEY = "requests.json.gz"

SCRIPT = r"""
import gzip, json, os, random, threading, time, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

URL, MODEL, PAGE = os.environ["URL"], os.environ["MODEL"], int(os.environ["PAGE"])
REQUESTS = [(r["body"].encode(), r["true_p"]) for r in json.loads(gzip.open("/data/" + os.environ["DATA"]).read())]
lock = threading.Lock()
shown, clicked, answered = {}, {}, {}

def add(table, key, n=1):
    with lock:
        table[key] = table.get(key, 0) + n

class Metrics(BaseHTTPRequestHandler):
    def do_GET(self):
        with lock:
            lines = ["# TYPE recserve_impressions_total counter"]
            lines += [f'recserve_impressions_total{{model="{MODEL}",variant="{v}"}} {n}' for v, n in shown.items()]
            lines.append("# TYPE recserve_clicks_total counter")
            lines += [f'recserve_clicks_total{{model="{MODEL}",variant="{v}"}} {n}' for v, n in clicked.items()]
            lines.append("# TYPE recserve_shopper_requests_total counter")
            lines += [f'recserve_shopper_requests_total{{model="{MODEL}",variant="{v}",outcome="{o}"}} {n}'
                      for (v, o), n in answered.items()]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

def shop():
    rng = random.Random(7)
    while True:
        body, true_p = rng.choice(REQUESTS)
        user = f"user-{rng.randrange(100_000)}"
        req = urllib.request.Request(URL, data=body, headers={"Content-Type": "application/json", "x-user-id": user})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                variant = r.headers.get("X-RecServe-Variant", "stable")
                scores = json.loads(r.read())["outputs"][0]["data"]
        except Exception:
            add(answered, ("none", "error"))
            time.sleep(0.2)
            continue
        add(answered, (variant, "ok"))
        top = sorted(range(len(scores)), key=lambda i: -scores[i])[:PAGE]
        if variant not in shown:
            add(shown, variant, 0)
            add(clicked, variant, 0)
        add(shown, variant, len(top))
        add(clicked, variant, sum(rng.random() < true_p[i] for i in top))
        time.sleep(0.05)

threading.Thread(target=ThreadingHTTPServer(("", int(os.environ["PORT"])), Metrics).serve_forever, daemon=True).start()
shop()
"""


def request_data(rows: Sequence[tuple[npt.NDArray[Any], npt.NDArray[Any]]], input_name: str) -> bytes:
    """gzip'd JSON of the shoppers' requests: per user, the KServe v2 body of its candidates' features and each
    candidate's true click probability."""
    out = []
    for x, true_p in rows:
        body = {"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                            "data": [round(float(v), 5) for v in x.ravel()]}]}
        out.append({"body": json.dumps(body, separators=(",", ":")), "true_p": [round(float(p), 4) for p in true_p]})
    return gzip.compress(json.dumps(out).encode(), mtime=0)


def objects(namespace: str, url: str, model: str, data: bytes, placement: Mapping[str, Any]) -> list[dict[str, Any]]:
    """ConfigMap (the requests), Pod, Service and ServiceMonitor of the shoppers."""
    labels = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": "recserve-demo"}
    meta = {"name": NAME, "namespace": namespace, "labels": labels}
    container = {
        "name": "shop", "image": IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["python", "-u", "-c", SCRIPT],
        "env": [{"name": "URL", "value": url}, {"name": "MODEL", "value": model}, {"name": "PAGE", "value": str(PAGE)},
                {"name": "DATA", "value": DATA_KEY}, {"name": "PORT", "value": str(PORT)}],
        "ports": [{"name": "metrics", "containerPort": PORT}],
        "readinessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 2},
        "resources": {"requests": {"cpu": "100m", "memory": "96Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
    }  # fmt: skip
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
         "binaryData": {DATA_KEY: base64.b64encode(data).decode()}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
         "spec": {**placement, "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 2,
                  "containers": [container], "volumes": [{"name": "data", "configMap": {"name": NAME}}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta,
         "spec": {"selector": labels, "ports": [{"name": "metrics", "port": PORT, "targetPort": "metrics"}]}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": meta,
         "spec": {"selector": {"matchLabels": labels}, "endpoints": [{"port": "metrics", "interval": "10s"}]}},
    ]  # fmt: skip


_SAMPLE = re.compile(r'^recserve_shopper_requests_total\{model="[^"]*",variant="([^"]*)",outcome="([^"]*)"\} (\S+)$')


def parse_requests(metrics_text: str) -> tuple[Counter[str], int]:
    """(answered requests by variant, failed requests) from the shoppers' /metrics."""
    answered: Counter[str] = Counter()
    failed = 0
    for line in metrics_text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        variant, outcome, value = m.group(1), m.group(2), int(float(m.group(3)))
        if outcome == "ok":
            answered[variant] += value
        else:
            failed += value
    return answered, failed


def requests_so_far(cluster: Cluster, namespace: str) -> tuple[Counter[str], int]:
    """The shoppers' counters, read through the API server's pod proxy (from this machine)."""
    out = cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{namespace}/pods/{NAME}:{PORT}/proxy/metrics",
                          check=False)  # fmt: skip
    return parse_requests(out.stdout) if out.returncode == 0 else (Counter(), 0)
