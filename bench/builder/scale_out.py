"""Scale-out on real pods: replicas N -> N+1 until the new pod is Ready, rebuild-per-pod vs build once (model store).

One run, same model, same node: the chart is installed twice in turn (without `modelStore`, where each pod builds in
its init container, then with it, where a build Job publishes once and pods only fetch), each with its own
SeaweedFS store in the namespace holding the CTR Keras model. Per mode: the model is made Ready at 1 replica, then
scaled 1 -> 2 and back `--rounds` times; each scale-out is timed from the patch to the new pod's Ready condition.
Printed: medians with ranges, the ratio, the builder-image references of the scale-out pods, and the build Jobs
created by scale-outs (both should be 0 with a model store). A cluster this run brought up is taken down again.

    python bench/builder/scale_out.py [--rounds 3] [--keep-cluster]
"""

from __future__ import annotations

import argparse
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

from recserve_cluster import images  # noqa: E402
from recserve_cluster.cluster import Cluster, get_provider  # noqa: E402
from tests.helpers import wait_for  # noqa: E402
from tests.integration.realpods import (  # noqa: E402
    MODEL,
    apply,
    get,
    installed_platform,
    keras_model,
    recommender_model,
    wait_model_ready,
)
from tests.integration.s3store import (  # noqa: E402
    BUCKET,
    CREDENTIALS,
    KEYS,
    RESOURCES,
    S3_PORT,
    STORE,
    create,
    seaweedfs_objects,
    secret_manifest,
    upload,
    wait_pod,
)

PREDICTORS = "app.kubernetes.io/component=predictor"


def _endpoint(ns: str) -> str:
    return f"http://{STORE}.{ns}.svc.cluster.local:{S3_PORT}"


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


def _jobs(cluster: Cluster, ns: str) -> int:
    return len(get(cluster, "jobs", "-n", ns, "-l", f"app.kubernetes.io/instance={MODEL}")["items"])


def measure(cluster: Cluster, tmp: Path, model: Path, *, store: bool, rounds: int) -> dict[str, Any]:
    def values(ns: str) -> dict[str, Any]:
        url = f"s3://{BUCKET}/artifacts" if store else ""
        # The baseline has no store at all (the chart's embedded one off too); build once uses the bench's store.
        return {"modelStore": {"url": url, "endpoint": _endpoint(ns), "secretName": CREDENTIALS,
                               "embedded": {"enabled": False}}}

    chart_tmp = tmp / ("store" if store else "per-pod")
    chart_tmp.mkdir()
    with installed_platform(cluster, chart_tmp, "b-scale-out", values) as ns:
        access, secret = f"recserve{secrets.token_hex(4)}", secrets.token_hex(20)
        create(cluster, *seaweedfs_objects(ns, access, secret),
                secret_manifest(ns, CREDENTIALS, {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}))
        wait_pod(cluster, ns, STORE, "Ready", 180)
        upload(cluster, ns, _endpoint(ns), model)
        rm = recommender_model(f"s3://{BUCKET}/{KEYS[1]}", 1, serving={"resources": RESOURCES},
                               model={"endpoint": _endpoint(ns), "credentials": {"secretRef": {"name": CREDENTIALS}}})
        apply(cluster, {**rm, "metadata": {"name": MODEL, "namespace": ns}})
        t0 = time.monotonic()
        wait_model_ready(cluster, ns, timeout=900)
        first_ready_s = time.monotonic() - t0
        jobs_before = _jobs(cluster, ns)
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
            builder_refs += sum(c["image"] == images.BUILDER for p in new
                                for c in p["spec"]["containers"] + p["spec"].get("initContainers", []))
            _scale(cluster, ns, 1)
            wait_for(lambda: len(get(cluster, "pods", "-n", ns, "-l",
                                     f"app.kubernetes.io/instance={MODEL},{PREDICTORS}")["items"]) == 1, 300, 1,
                     "the scale-in")  # fmt: skip
        return {"mode": "build once (model store)" if store else "rebuild per pod", "first_ready_s": first_ready_s,
                "scale_out_s": times, "pod_timelines_s": timelines, "builder_image_refs": builder_refs,
                "jobs_from_scale_outs": _jobs(cluster, ns) - jobs_before}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="scale-outs per mode")
    parser.add_argument("--keep-cluster", action="store_true", help="leave a cluster this run started running")
    args = parser.parse_args()
    provider = get_provider()
    existed = provider.current() is not None
    cluster = provider.up()
    results = []
    try:
        with ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            model, _, _ = keras_model(tmp)
            for store in (False, True):
                results.append(measure(cluster, tmp, model, store=store, rounds=args.rounds))
                print(json.dumps(results[-1]), flush=True)
    finally:
        if not existed and not args.keep_cluster and provider.name != "existing":
            provider.down()
    print(f"\n{'mode':<26} {'first Ready s':>13} {'scale-out s median [min-max]':>30} {'builder refs':>12} "
          f"{'jobs':>5}")
    for r in results:
        t = r["scale_out_s"]
        print(f"{r['mode']:<26} {r['first_ready_s']:>13.1f} {statistics.median(t):>14.1f} "
              f"[{min(t):.1f}-{max(t):.1f}]{'':>6} {r['builder_image_refs']:>12} {r['jobs_from_scale_outs']:>5}")
    per_pod, once = (statistics.median(r["scale_out_s"]) for r in results)
    print(f"scale-out speed-up with a model store: {per_pod / once:.1f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
