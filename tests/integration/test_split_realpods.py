"""The builtin router's split on real pods: 10,000 requests through its nginx pods at the operator's weight.

The operator holds a canary at 30% (a long step pause); a client pod sends 4 requests for each of 2,500 users
(sticky header), 2,000 without it, and a few with the forced-variant header. Each user sees one variant, the
share matches the weight, nginx's choice per user is exactly the one the operator's Python replica of
nginx's hash predicts, and the forced-variant header wins both ways.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from recserve_operator.routers.builtin import assign_variant

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
from tests.integration.test_ab_realpods import ab_model

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

WEIGHT = 30
USERS = 2500
CLIENT = '''
import json, os, threading, urllib.request
from concurrent.futures import ThreadPoolExecutor

URL, BODY, USERS = os.environ["URL"], os.environ["BODY"].encode(), int(os.environ["USERS"])
local = threading.local()

def one(headers):
    req = urllib.request.Request(URL, data=BODY, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.headers.get("X-RecServe-Variant", "?")
    except Exception as exc:
        return f"error: {exc}"

jobs = [f"user-{u}" for _ in range(4) for u in range(USERS)]
with ThreadPoolExecutor(4) as pool:
    sticky = list(pool.map(lambda u: (u, one({"x-user-id": u})), jobs))
    anonymous = list(pool.map(lambda _: one({}), range(2000)))
by_user = {}
for user, variant in sticky:
    by_user.setdefault(user, set()).add(variant)
forced = {user: {want: one({"x-user-id": user, "x-recserve-variant": want}) for want in ("stable", "canary")}
          for user in ("user-0", "user-1", "user-2", "user-3")}
print(json.dumps({"by_user": {u: sorted(v) for u, v in by_user.items()}, "anonymous": anonymous,
                  "forced": forced}))
'''


def canary_at(ns: str, version: int) -> dict[str, Any]:
    """The A/B test's model shape with a canary held at WEIGHT% (a step pause longer than the test)."""
    rm = ab_model(ns, version, "10m")
    rm["spec"]["rollout"] = {"strategy": "canary", "routing": {"provider": "builtin", "stickyHeader": "x-user-id"},
                             "steps": [{"weight": WEIGHT, "pause": "30m"}],
                             "analysis": {"interval": "30s", "maxErrorRate": 0.05, "minRequests": 5}}
    return rm


platform = platform_fixture("t-split")


def test_the_router_pods_split_10000_requests_by_weight_sticky_per_user_as_predicted(
    cluster: Cluster, platform: str, tmp_path: Path
) -> None:
    ns = platform
    path, x, _ = keras_model(tmp_path, rows=4, seed=11)
    volumes.upload(cluster, ns, "models", NODE, {f"ctr/{v}/model.keras": path for v in (1, 2)})
    try:
        apply(cluster, canary_at(ns, 1))
        rm = wait_model_ready(cluster, ns)
        stable = rm["status"]["stable"]["revision"]
        serving = f"recserve.dev/revision={stable},app.kubernetes.io/component=predictor"  # not its build Job's pod
        pod = get(cluster, "pods", "-n", ns, "-l", serving)["items"][0]["metadata"]["name"]
        meta = json.loads(cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{ns}/pods/{pod}:8000/proxy/v2/models/"
                                          f"{MODEL}").stdout)
        body = json.dumps({"inputs": [{"name": meta["inputs"][0]["name"], "shape": list(x.shape),
                                       "datatype": "FP32", "data": x.ravel().tolist()}]})
        apply(cluster, canary_at(ns, 2))

        def at_weight() -> dict[str, Any] | None:
            st = (get(cluster, "recommendermodel", MODEL, "-n", ns) or {}).get("status") or {}
            canary = st.get("canary") or {}
            return canary if canary.get("weight") == WEIGHT and canary.get("revision") != stable else None

        canary = wait_for(at_weight, 600, 2, f"the canary at {WEIGHT}%")
        # The weight is in status once applied; the router pods serve it once their rollout finished.
        cluster.kubectl("rollout", "status", f"deployment/{MODEL}-router", "-n", ns, "--timeout=180s", timeout=200)
        wait_for(lambda: not [p for p in get(cluster, "pods", "-n", ns, "-l", "app.kubernetes.io/component=router")
                              ["items"] if p["metadata"].get("deletionTimestamp")], 60, 1, "old router pods gone")

        url = f"{rm['status']['endpoints']['http']}/v2/models/{MODEL}/infer"
        env = [{"name": "URL", "value": url}, {"name": "BODY", "value": body}, {"name": "USERS", "value": str(USERS)}]
        apply(cluster, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "split-client", "namespace": ns},
                         "spec": {**placement(), "restartPolicy": "Never", "automountServiceAccountToken": False,
                                  "containers": [{"name": "client", "image": PYTHON_IMAGE,
                                                  "imagePullPolicy": "IfNotPresent",
                                                  "command": ["python", "-c", CLIENT], "env": env}]}})

        def finished() -> str | None:
            phase = (get(cluster, "pod", "split-client", "-n", ns) or {}).get("status", {}).get("phase")
            assert phase != "Failed", cluster.kubectl("logs", "split-client", "-n", ns, check=False).stdout[-2000:]
            return phase if phase == "Succeeded" else None

        wait_for(finished, 600, 2, "the client's 12,000 requests")
        out = json.loads(cluster.kubectl("logs", "split-client", "-n", ns).stdout.strip().splitlines()[-1])
    finally:
        cluster.kubectl("delete", "pod", "split-client", "-n", ns, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "recommendermodel", MODEL, "-n", ns, "--ignore-not-found", "--wait=true",
                        "--timeout=120s", check=False, timeout=150)
        volumes.remove(cluster, ns, "models", NODE)

    by_user: dict[str, list[str]] = out["by_user"]
    assert len(by_user) == USERS
    errors = [v for vs in by_user.values() for v in vs if v not in ("stable", "canary")]
    assert not errors, errors[:5]
    assert all(len(v) == 1 for v in by_user.values()), "a user was served by both variants"
    share = sum(v == ["canary"] for v in by_user.values()) / USERS
    print(f"split on real pods: canary share {share:.3f} of {USERS} sticky users at {WEIGHT}%")
    assert abs(share - WEIGHT / 100) <= 0.03, share
    # nginx's choice is exactly the one the operator's replica of its hash predicts (salt: the candidate).
    mismatches = [u for u, v in by_user.items() if v[0] != assign_variant(u, WEIGHT, canary["revision"])]
    assert not mismatches, mismatches[:5]
    anon = Counter(out["anonymous"])
    assert set(anon) <= {"stable", "canary"}, anon
    assert abs(anon["canary"] / 2000 - WEIGHT / 100) <= 0.04, anon
    # The forced-variant header wins over the user's assignment both ways.
    assert all(got == {"stable": "stable", "canary": "canary"} for got in out["forced"].values()), out["forced"]
