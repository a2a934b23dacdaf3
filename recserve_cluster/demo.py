"""The local demo: cluster, chart, operator, a trained CTR model served by Triton, then a canary to promotion.

Everything runs in the cluster, on real pods on the node real-0: the chart's operator Deployment and its
embedded model store, each revision's build Job (it converts the Keras model it reads from a
PersistentVolumeClaim, checks parity and publishes the artifact once), Triton pods that only fetch it, the
builtin router's nginx pods, and Prometheus (through Prometheus Operator) scraping what the operator's
ServiceMonitor selects. The operator decides every canary step from those series. Shoppers run in a pod
(recserve_cluster.shoppers) and reach the router by Service DNS; their click counters feed the dashboard's
click-through panel. The recommendations printed here come from this machine through `kubectl proxy` (a port
bound to 127.0.0.1) and the API server's Service proxy to the router.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import requests
import yaml

from . import nodeconfig as nc
from .cluster import Cluster, get_provider
from .errors import ClusterError
from .waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("RECSERVE_DEMO_DIR", ROOT / ".recserve" / "demo"))
NAMESPACE = "shop"
MODEL = "ctr-dnn"
RELEASE = "recserve"
SYSTEM_NS = "recserve-system"
PY = sys.executable
CLAIM = "models"
NODE = os.environ.get("RECSERVE_REAL_NODE_NAME", nc.NODE_NAME)
GPU_PRODUCT = nc.REAL_NODE.gpu_product


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def info(msg: str) -> None:
    print(f"    {msg}", flush=True)


def _json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def placement() -> dict[str, Any]:
    """Pods the demo needs running go to the real node (kwok's nodes are simulated and run nothing)."""
    return {"nodeSelector": {"kubernetes.io/hostname": NODE},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}


def chart_values() -> dict[str, Any]:
    from .images import operator_image

    repository, tag = operator_image().rsplit(":", 1)
    return {"image": {"repository": repository, "tag": tag}, "watchNamespaces": [NAMESPACE], **placement(),
            # The operator's own metrics (reconciles, API writes, rollouts) for the dashboard's operator panels.
            "metrics": {"service": {"enabled": True}, "serviceMonitor": {"enabled": True, "interval": "15s"}},
            "defaults": {"resyncSeconds": 2, "routerNodeSelector": placement()["nodeSelector"],
                         "routerTolerations": placement()["tolerations"]},
            # Build once (the chart's default): the embedded store on an emptyDir, this cluster has no provisioner.
            "modelStore": {"embedded": {"persistence": {"enabled": False}}}}


def install_chart(cluster: Cluster) -> None:
    say("Installing the RecServe Helm chart (CRD, RBAC, operator Deployment)")
    # Namespaced mode: the chart's Role/RoleBinding go into the watched namespace, which must exist first.
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace",
                                                                "metadata": {"name": NAMESPACE}}))
    values = WORK / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values()))
    helm = str(cluster.bins["helm"])
    cmd = [helm, "upgrade", "--install", RELEASE, str(ROOT / "charts" / "recserve"), "-n", SYSTEM_NS,
           "--create-namespace", "--values", str(values), "--wait", "--timeout", "4m"]
    out = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True)
    if out.returncode != 0:
        raise ClusterError(f"helm install failed: {out.stderr.strip()}")
    pod = _json(cluster, "get", "pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/name=recserve")["items"][0]
    info("helm release 'recserve' deployed; CRD recommendermodels.recserve.dev registered")
    info(f"operator pod {pod['metadata']['name']} Running on {pod['spec']['nodeName']}")


@contextlib.contextmanager
def kubectl_proxy(cluster: Cluster) -> Iterator[str]:
    """`kubectl proxy` on 127.0.0.1: the router Service through the API server, as a user on this machine."""
    proc = subprocess.Popen([cluster.kubectl_path, "--kubeconfig", str(cluster.kubeconfig), "proxy", "--port=0",
                             "--address=127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Starting to serve on 127.0.0.1:PORT"
        if "127.0.0.1:" not in line:
            raise ClusterError(f"kubectl proxy did not start: {line.strip()}")
        yield f"http://{line.strip().rsplit(' ', 1)[-1]}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def train(version: int, variant: str) -> Path:
    out = WORK / "models"
    model = out / str(version) / "model.keras"
    if model.exists():
        info(f"model version {version} already trained: {model}")
        return model
    say(f"Training the CTR DNN (variant {variant!r}) on generated e-commerce data -> version {version}")
    subprocess.run([PY, str(ROOT / "examples" / "ctr-dnn" / "train.py"), "--version", str(version), "--variant",
                    variant, "--out", str(out)], check=True)
    return model


def recommender_model(version: int) -> dict[str, Any]:
    return {
        "apiVersion": "recserve.dev/v1alpha1",
        "kind": "RecommenderModel",
        "metadata": {"name": MODEL, "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": f"pvc://{CLAIM}/{MODEL}/{version}/model.keras", "format": "keras", "version": version},
            "optimize": {"backend": "onnxruntime", "precision": "fp32"},
            "serving": {"maxBatchSize": 1024, "replicas": 1,
                        "dynamicBatching": {"preferredBatchSizes": [200], "maxQueueDelayMicroseconds": 1000},
                        "instances": {"kind": "GPU", "count": 1},
                        "resources": {"gpu": 1, "cpu": "400m", "memory": "3Gi"}, "gpuProduct": GPU_PRODUCT},
            "rollout": {
                "strategy": "canary",
                # Prometheus scrapes every 15s: each analysis window holds at least two samples.
                "steps": [{"weight": 20, "pause": "30s"}, {"weight": 50, "pause": "30s"}],
                "routing": {"provider": "builtin", "stickyHeader": "x-user-id"},
                "analysis": {"interval": "30s", "maxErrorRate": 0.01, "maxP99LatencyMs": 2000, "minRequests": 10},
            },
        },
    }


def status(cluster: Cluster) -> dict[str, Any]:
    return _json(cluster, "get", "recommendermodel", MODEL, "-n", NAMESPACE).get("status") or {}


def start_shoppers(cluster: Cluster, data: Any, in_name: str, router_http: str) -> None:
    """Shoppers in a pod on the real node, through the router by Service DNS (see recserve_cluster.shoppers)."""
    from ecommerce_data import click_logit
    from recommend import candidate_items  # examples/ctr-dnn is on sys.path (run() puts it there)

    from . import shoppers

    rows = []
    for user in np.random.default_rng(7).choice(data.config.n_users, size=24, replace=False):
        items = candidate_items(data, int(user), 200)
        x = data.features.candidates(int(user), items, hour=20, device=0)
        same = np.full(items.size, 0)
        logit = click_logit(data.users, data.items, np.full(items.size, user), items, hour=same + 20, device=same)
        rows.append((x, 1.0 / (1.0 + np.exp(-logit))))
    cluster.kubectl("delete", "pod", shoppers.NAME, "-n", NAMESPACE, "--ignore-not-found", "--wait=true", timeout=90)
    objs = shoppers.objects(NAMESPACE, f"{router_http}/v2/models/{MODEL}/infer", MODEL,
                            shoppers.request_data(rows, in_name), placement())  # fmt: skip
    cluster.kubectl("apply", "--server-side", "--field-manager=demo", "-f", "-", input=yaml.safe_dump_all(objs))
    cluster.kubectl("wait", "--for=condition=Ready", f"pod/{shoppers.NAME}", "-n", NAMESPACE, "--timeout=120s",
                    timeout=150)  # fmt: skip
    info(f"shoppers: pod {NAMESPACE}/{shoppers.NAME} on {NODE}, each request scores 200 candidates of one user "
         f"through {router_http}, shows the top {shoppers.PAGE} and clicks with the true click probability")


def stop_shoppers(cluster: Cluster) -> None:
    from . import shoppers

    cluster.kubectl("delete", "pod", shoppers.NAME, "-n", NAMESPACE, "--ignore-not-found", "--wait=false",
                    check=False)  # fmt: skip


def requests_by_variant(cluster: Cluster) -> tuple[dict[str, int], int]:
    from . import shoppers

    answered, failed = shoppers.requests_so_far(cluster, NAMESPACE)
    return dict(answered), failed


def print_recommendations(url: str, data: Any, users: list[int]) -> None:
    from recommend import recommend, triton_scorer

    scorer = triton_scorer(url.removeprefix("http://"), MODEL)
    for user in users:
        recs, baseline = recommend(data, scorer, user, top=5)
        info(f"user {user}: top-5 of 200 candidates (mean true click prob of all candidates {baseline:.3f})")
        for r in recs:
            info(f"    item {r.item:5d}  score {r.score:.3f}  category {r.category:2d}  brand {r.brand:3d}  "
                 f"price {r.price:7.2f}  true click prob {r.true_click_prob:.3f}")


def upload(cluster: Cluster, version: int, model: Path) -> None:
    from . import volumes

    volumes.upload(cluster, NAMESPACE, CLAIM, NODE, {f"{MODEL}/{version}/model.keras": model})
    info(f"model version {version} copied into PersistentVolumeClaim {NAMESPACE}/{CLAIM} on {NODE}")


def _last_json(cluster: Cluster, pod: str, container: str) -> dict[str, Any]:
    logs = cluster.kubectl("logs", pod, "-n", NAMESPACE, "-c", container, check=False).stdout
    with contextlib.suppress(ValueError, IndexError):
        report = json.loads(logs.strip().splitlines()[-1])
        return report if isinstance(report, dict) else {}
    return {}


def describe_revision(cluster: Cluster, revision: str) -> None:
    """What the revision's pods did: its build Job's report (built once, published to the model store) and, for
    each serving pod, the artifact it fetched and where Triton runs."""
    pods = _json(cluster, "get", "pods", "-n", NAMESPACE, "-l", f"recserve.dev/revision={revision}")["items"]
    for pod in sorted(pods, key=lambda p: p["metadata"]["labels"].get("app.kubernetes.io/component") != "builder"):
        name, node = pod["metadata"]["name"], pod["spec"]["nodeName"]
        if pod["metadata"]["labels"].get("app.kubernetes.io/component") == "builder":
            report = _last_json(cluster, name, "model-repo-builder")
            parity, artifact = report.get("parity") or {}, report.get("artifact") or {}
            digest = str(artifact.get("digest", "?"))[:12]
            if artifact.get("reused"):  # a re-run: the store already held this revision's artifact
                info(f"build Job pod {name} on {node}: the model store already holds artifact {digest} of this "
                     "revision, so model-repo-builder converted the model once, before, and reused it")  # fmt: skip
            else:
                info(f"build Job pod {name} on {node}: model-repo-builder converted the model once (parity max "
                     f"abs error {parity.get('max_abs_error', '?')}) and published artifact {digest}")  # fmt: skip
            continue
        init = (pod["spec"].get("initContainers") or [{}])[0].get("name", "?")
        if init == "model-repo-builder":  # no model store: every pod builds
            parity = _last_json(cluster, name, init).get("parity") or {}
            info(f"pod {name} on {node}: init container model-repo-builder converted the model "
                 f"(parity max abs error {parity.get('max_abs_error', '?')}), Triton serving")  # fmt: skip
        else:
            info(f"pod {name} on {node}: init container {init} fetched the artifact and checked its digest "
                 f"(no build, no TensorFlow), Triton serving")  # fmt: skip


def run(keep_serving: bool) -> int:
    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "examples" / "ctr-dnn"))
    sys.path.insert(0, str(ROOT / "examples"))

    say("Starting the local Kubernetes cluster (kube-apiserver, etcd, controllers, kwok GPU nodes, real node real-0)")
    cluster = get_provider().up()
    info(f"kubeconfig: {cluster.kubeconfig}")
    install_chart(cluster)

    v1 = train(1, "baseline")
    from recommend import load_data

    data = load_data(v1.parent / "feature_spec.json")
    in_name = json.loads((v1.parent / "feature_spec.json").read_text())["input_name"]

    with contextlib.ExitStack() as stack:
        # A re-run starts the story from version 1: remove what an earlier run left, children first (foreground
        # deletion returns only once garbage collection has removed every owned object).
        cluster.kubectl("delete", "recommendermodel", MODEL, "-n", NAMESPACE, "--ignore-not-found",
                        "--cascade=foreground", "--wait=true", "--timeout=120s", timeout=150)
        upload(cluster, 1, v1)
        say(f"Applying RecommenderModel {NAMESPACE}/{MODEL} (canary strategy, builtin router)")
        cluster.kubectl("apply", "--server-side", "--field-manager=demo", "-f", "-",
                        input=yaml.safe_dump(recommender_model(1)))
        st = wait_for(lambda: (s := status(cluster)).get("phase") == "Ready" and s, 600, 2, "RecommenderModel Ready")
        stable = st["stable"]["revision"]
        info(f"Ready in {time.monotonic() - started:.0f}s: stable revision {stable} on an {GPU_PRODUCT} node")
        describe_revision(cluster, stable)
        print(cluster.kubectl("get", "recommendermodels", "-n", NAMESPACE).stdout, flush=True)

        proxy = stack.enter_context(kubectl_proxy(cluster))
        url = f"{proxy}/api/v1/namespaces/{NAMESPACE}/services/{MODEL}-router:http/proxy"
        wait_for(lambda: requests.get(f"{url}/v2/models/{MODEL}/ready", timeout=5).status_code == 200, 120, 1,
                 "the router to serve the model")
        info(f"router: {st['endpoints']['http']} (here through kubectl proxy on {proxy})")

        say("Top-5 recommendations through the router, from the stable model")
        print_recommendations(url, data, [3, 42, 977])

        start_shoppers(cluster, data, in_name, st["endpoints"]["http"])
        stack.callback(stop_shoppers, cluster)

        v2 = train(2, "wide")
        upload(cluster, 2, v2)
        say("Applying model version 2 as a canary")
        cluster.kubectl("apply", "--server-side", "--field-manager=demo", "-f", "-",
                        input=yaml.safe_dump(recommender_model(2)))
        canary = wait_for(lambda: ((status(cluster).get("canary") or {}).get("revision") or "").replace(stable, "")
                          or None, 120, 1, "the operator to create the canary revision")
        info(f"canary revision {canary}: its pod builds version 2 in the init container, then Triton loads it")

        say("Canary progressing: the operator moves traffic while Prometheus shows it healthy")
        seen: tuple[Any, ...] = ()
        rollout_started = time.monotonic()
        deadline = rollout_started + 600
        result = ""
        while time.monotonic() < deadline:
            st = status(cluster)
            c = st.get("canary") or {}
            conds = {x["type"]: x for x in st.get("conditions", [])}
            last = c.get("lastAnalysis") or {}
            row = (st.get("phase"), c.get("step"), c.get("weight"), last.get("decision"), c.get("phase"))
            if row != seen:
                seen = row
                info(f"phase={row[0]} step={row[1]} weight={row[2]}% analysis={row[3]} "
                     f"errorRate={last.get('errorRate')} p99Ms={last.get('p99Ms')} | "
                     f"requests by variant so far: {requests_by_variant(cluster)[0]}")
            if (st.get("stable") or {}).get("revision") == canary:
                result = "Promoted"
                break
            if conds.get("RolledBack", {}).get("status") == "True" or c.get("phase") == "RolledBack":
                result = "RolledBack"
                break
            time.sleep(1)
        if not result:
            raise ClusterError("the canary did not finish within 10 minutes; see `kubectl logs -n "
                               f"{SYSTEM_NS} deploy/{RELEASE}`")
        # The old revision drains once the router pods serve the final plan: keep the load on through it.
        old = stable if result == "Promoted" else canary
        wait_for(lambda: not _json(cluster, "get", "deployments", "-n", NAMESPACE, "-l",
                                   f"recserve.dev/revision={old}")["items"], 180, 2, f"revision {old} to drain")
        answered, failed = wait_for(lambda: (r := requests_by_variant(cluster))[0] and r, 30, 1,
                                    "the shoppers' counters")  # fmt: skip
        say(f"Canary {result} in {time.monotonic() - rollout_started:.0f}s: stable revision is now "
            f"{status(cluster)['stable']['revision']}")
        print(cluster.kubectl("get", "recommendermodels", "-n", NAMESPACE).stdout, flush=True)
        events = cluster.kubectl("get", "events", "-n", NAMESPACE, "--field-selector",
                                 f"involvedObject.name={MODEL}", "--sort-by=.lastTimestamp").stdout
        print("\n".join(events.splitlines()[-8:]), flush=True)
        say("Top-5 recommendations from the promoted model")
        print_recommendations(url, data, [3, 42])
        info(f"requests served during the rollout: {answered}, errors: {failed}")
        say(f"Demo finished in {time.monotonic() - started:.0f}s. `make demo-down` removes everything.")
        if keep_serving:
            info(f"serving on {url} until Ctrl-C")
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        return 0 if result == "Promoted" and failed == 0 else 1


def clean(cluster: Cluster) -> None:
    """Remove what the demo created in a cluster it shares (tests): model, release, volume, namespace."""
    from . import volumes

    cluster.kubectl("delete", "recommendermodel", MODEL, "-n", NAMESPACE, "--ignore-not-found", "--wait=true",
                    "--timeout=120s", check=False, timeout=150)
    subprocess.run([str(cluster.bins["helm"]), "uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--timeout", "2m"],
                   env=cluster.env, capture_output=True, text=True, timeout=180)
    volumes.remove(cluster, NAMESPACE, CLAIM, NODE)
    for ns in (NAMESPACE, SYSTEM_NS):
        cluster.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false", check=False)


def down() -> int:
    get_provider().down()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recserve_cluster.demo", description=__doc__)
    parser.add_argument("cmd", choices=["up", "down"], nargs="?", default="up")
    parser.add_argument("--keep-serving", action="store_true", help="keep the router reachable after the story")
    args = parser.parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so kubectl proxy and the load thread stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args.keep_serving) if args.cmd == "up" else down()
    except (ClusterError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
