"""A failing canary rolled back on real pods: a real model that Triton really fails on ~30% of requests.

The chart's operator serves version 1 of a small two-tower-style CTR scorer (ONNX): score = sigmoid(user ·
item_table[item_id]). Version 2 is the same model retrained on an older catalogue: its item-embedding table
has CANDIDATE_ITEMS rows while the traffic asks for ids up to ITEM_SPACE (items added since). ONNX Runtime's
Gather refuses an index outside the table ("indices element out of data bounds"), Triton answers that
request with an error and counts it in nv_inference_request_failure, the operator's ServiceMonitor brings
the counter to Prometheus, and the analysis sees the candidate's error rate at ~30%. Nothing is injected:
the builder init container builds both versions (its synthesized parity ids, 0..9, are valid ids of both
tables: model_repo_builder.parity.synthesize_inputs), Triton serves them, the builtin router's nginx pods
split the traffic.

An in-cluster client pod sends steady load without a sticky header (nginx splits per request), so about
half of the requests reach the candidate at weight 50. It counts answers per variant (the router's
X-RecServe-Variant header) and per id range, and prints the counts as JSON lines read from its log.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from recserve_operator.names import REVISION_LABEL

from recserve_cluster import volumes
from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.realpods import (
    MODEL,
    NODE,
    PYTHON_IMAGE,
    apply,
    get,
    placement,
    platform_fixture,
    prometheus_query,
    recommender_model,
    save_onnx,
)

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

EMBED_DIM = 8
STABLE_ITEMS = 1000  # rows of version 1's item table: every id the traffic uses
CANDIDATE_ITEMS = 700  # rows of version 2's: ids 700..999 are out of range, 30% of uniform ids
ITEM_SPACE = STABLE_ITEMS
INTERVAL_S = 30.0  # two Prometheus scrapes (every 15 s) per analysis window
# The operator decides on its reconcile cadence (the chart's resyncSeconds 2) and status times have second
# precision: a rollback at the second analysis after the first canary answer may land this much after 2 intervals.
DECISION_MARGIN_S = 5.0
# Small: two Triton pods, three router pods mid-roll, the operator and the add-ons share the node's 2 CPUs.
RESOURCES = {"gpu": 1, "cpu": "300m", "memory": "2Gi"}
RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
# The revisions' CPU requests must fit next to whatever else runs there: say so rather than wait out the build.
UNSCHEDULABLE_S = 120
LOAD_SECONDS = 1800  # longer than the test; the pod is deleted when it ends
# One request per connection (urllib), two threads, a short pause: ~20 requests/s, ~10/s on the candidate.
LOAD = """
import json, os, random, threading, time, urllib.error, urllib.request
url, space, cut = os.environ["URL"], int(os.environ["ITEM_SPACE"]), int(os.environ["CANDIDATE_ITEMS"])
stop = time.time() + float(os.environ["SECONDS"])
counts, samples, first = {}, [], {}
lock = threading.Lock()
def one(rng):
    item = rng.randrange(space)
    body = {"inputs": [
        {"name": "user", "shape": [1, 8], "datatype": "FP32", "data": [rng.gauss(0, 1) for _ in range(8)]},
        {"name": "item_id", "shape": [1, 1], "datatype": "INT64", "data": [item]}]}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return item, resp.headers.get("X-RecServe-Variant") or "?", "ok", ""
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        kind = "model_error" if "out of data bounds" in text else "other_error"
        return item, exc.headers.get("X-RecServe-Variant") or "?", kind, f"{exc.code} {text[:200]}"
    except Exception as exc:
        return item, "?", "other_error", repr(exc)[:200]
def worker(seed):
    rng = random.Random(seed)
    while time.time() < stop:
        item, variant, outcome, detail = one(rng)
        key = ("new_" if item >= cut else "known_") + outcome
        with lock:
            by = counts.setdefault(variant, {})
            by[key] = by.get(key, 0) + 1
            first.setdefault(variant, time.time())
            if outcome == "other_error" and len(samples) < 5:
                samples.append([variant, item, detail])
        time.sleep(0.08)
threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(2)]
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):
    time.sleep(1)
    with lock:
        print(json.dumps({"t": time.time(), "counts": counts, "first": first, "samples": samples}), flush=True)
"""


def write_item_scorer(path: Path, n_items: int, seed: int) -> Path:
    """sigmoid(user · item_table[item_id]): user FP32 [batch, 8], item_id INT64 [batch, 1] -> score [batch, 1]."""
    from onnx import TensorProto, helper, numpy_helper

    table = (np.random.default_rng(seed).normal(size=(n_items, EMBED_DIM)) / np.sqrt(EMBED_DIM)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["item_table", "item_id"], ["item_emb3"], axis=0),  # [batch, 1, 8]
         helper.make_node("Flatten", ["item_emb3"], ["item_emb"], axis=1),
         helper.make_node("Mul", ["user", "item_emb"], ["product"]),
         helper.make_node("ReduceSum", ["product", "axes"], ["logit"], keepdims=1),
         helper.make_node("Sigmoid", ["logit"], ["score"])],
        "item_scorer",
        [helper.make_tensor_value_info("user", TensorProto.FLOAT, ["batch", EMBED_DIM]),
         helper.make_tensor_value_info("item_id", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(table, "item_table"), numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )  # fmt: skip
    return save_onnx(graph, path)


def _spec(version: int) -> dict[str, Any]:
    rm = recommender_model(
        f"pvc://models/{MODEL}/{version}/model.onnx", version,
        model={"format": "onnx"},
        serving={"resources": RESOURCES},
        rollout={
            # A long step: only a failed analysis can end this rollout within the test.
            "steps": [{"weight": 50, "pause": "10m"}],
            "analysis": {"interval": f"{INTERVAL_S:g}s", "maxErrorRate": 0.05, "minRequests": 20, "failureLimit": 1},
        },
    )  # fmt: skip
    return rm


platform = platform_fixture("t-rollback")


def _status(cluster: Cluster, ns: str) -> dict[str, Any]:
    return (get(cluster, "recommendermodel", MODEL, "-n", ns) or {}).get("status") or {}


def _unschedulable(cluster: Cluster, ns: str, revision: str | None) -> str:
    """The scheduler's message for a pod of `revision` it cannot place, else ''."""
    if not revision:
        return ""
    pods = (get(cluster, "pods", "-n", ns, "-l", f"{REVISION_LABEL}={revision}") or {}).get("items", [])
    for pod in pods:
        for cond in pod.get("status", {}).get("conditions", []):
            if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return str(cond.get("message", ""))
    return ""


def _epoch(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _load_pod(ns: str, url: str) -> dict[str, Any]:
    container = {
        "name": "load",
        "image": PYTHON_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-c", LOAD],
        "env": [
            {"name": "URL", "value": url},
            {"name": "ITEM_SPACE", "value": str(ITEM_SPACE)},
            {"name": "CANDIDATE_ITEMS", "value": str(CANDIDATE_ITEMS)},
            {"name": "SECONDS", "value": str(LOAD_SECONDS)},
        ],
        "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"cpu": "300m", "memory": "128Mi"}},
        "securityContext": RESTRICTED,
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"load-{secrets.token_hex(3)}", "namespace": ns},
            "spec": {**placement(), "restartPolicy": "Never", "automountServiceAccountToken": False,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [container]}}  # fmt: skip


class LoadLog:
    """The client pod's cumulative counts, from its latest log line."""

    def __init__(self, cluster: Cluster, ns: str, pod: str) -> None:
        self.cluster, self.ns, self.pod = cluster, ns, pod

    def latest(self) -> dict[str, Any] | None:
        out = self.cluster.kubectl("logs", self.pod, "-n", self.ns, "--tail=1", check=False)
        lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
        try:
            return json.loads(lines[-1]) if lines else None
        except ValueError:
            return None

    def after(self, t: float, timeout: float = 30) -> dict[str, Any]:
        """The first line the pod printed after `t` (this machine's clock: the pod runs on it too)."""
        return wait_for(lambda: (s := self.latest()) is not None and s["t"] > t and s, timeout, 0.5,
                        f"a load line after {t:.0f}")  # fmt: skip


def count(line: dict[str, Any], variant: str, *outcomes: str) -> int:
    """Answers of `variant` with one of `outcomes` (ok, model_error, other_error; all when none), any id."""
    by: dict[str, int] = line["counts"].get(variant, {})
    return sum(n for key, n in by.items() if not outcomes or key.split("_", 1)[1] in outcomes)


def failed(line: dict[str, Any], variant: str) -> int:
    return count(line, variant, "model_error", "other_error")


def diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for variant, by in after["counts"].items():
        prev = before["counts"].get(variant, {})
        out[variant] = {k: v - prev.get(k, 0) for k, v in by.items() if v - prev.get(k, 0)}
    return out


def test_a_candidate_failing_30_percent_of_requests_is_rolled_back_with_zero_stable_failures(
    cluster: Cluster, platform: str, tmp_path: Path
) -> None:
    ns = platform
    v1_path = write_item_scorer(tmp_path / "1" / "model.onnx", STABLE_ITEMS, seed=1)
    v2_path = write_item_scorer(tmp_path / "2" / "model.onnx", CANDIDATE_ITEMS, seed=2)
    volumes.upload(cluster, ns, "models", NODE,
                   {f"{MODEL}/1/model.onnx": v1_path, f"{MODEL}/2/model.onnx": v2_path})  # fmt: skip
    load = ""
    try:
        started = time.time()
        apply(cluster, {**_spec(1), "metadata": {"name": MODEL, "namespace": ns}})

        def ready() -> dict[str, Any] | None:
            st = _status(cluster, ns)
            bad = [c for c in st.get("conditions", []) if c.get("reason") in ("BuildFailed", "InvalidSpec")]
            assert not bad, f"the model failed: {bad}"
            return st if st.get("phase") == "Ready" else None

        st = wait_for(ready, 600, 3, f"RecommenderModel {ns}/{MODEL} Ready")
        ready_s = time.time() - started
        stable_rev = st["stable"]["revision"]
        url = f"{st['endpoints']['http']}/v2/models/{MODEL}/infer"

        client = _load_pod(ns, url)
        load = client["metadata"]["name"]
        apply(cluster, client)
        log = LoadLog(cluster, ns, load)
        wait_for(lambda: (s := log.latest()) is not None and count(s, "stable") >= 40, 180, 2,
                 "steady load answered by stable through the router")  # fmt: skip
        # Prometheus scrapes the stable revision through the operator's ServiceMonitor before the canary starts:
        # the candidate's pod is then found by the same ServiceMonitor within one scrape.
        wait_for(lambda: prometheus_query(cluster, f'nv_inference_request_success{{namespace="{ns}",'
                                                   f'revision="{stable_rev}"}}'), 240, 5,
                 "Prometheus to scrape the stable revision")  # fmt: skip

        applied = time.time()
        apply(cluster, {**_spec(2), "metadata": {"name": MODEL, "namespace": ns}})

        # The candidate builds in its init container, becomes Available, and the operator routes 50% to it.
        pending_since: dict[str, float] = {}

        def split() -> dict[str, Any] | None:
            canary = _status(cluster, ns).get("canary") or {}
            why = _unschedulable(cluster, ns, canary.get("revision"))
            if not why:
                pending_since.clear()
            elif time.time() - pending_since.setdefault("t", time.time()) > UNSCHEDULABLE_S:
                raise AssertionError(f"the candidate's pod cannot be scheduled (other workloads on {NODE}?): {why}")
            if canary.get("phase") == "RolledBack":
                return canary
            return canary if canary.get("revision") not in (None, stable_rev) and canary.get("weight") else None

        canary = wait_for(split, 600, 1, "the operator to route traffic to the candidate")
        canary_rev = canary["revision"]
        candidate_ready_s = time.time() - applied

        def rolled_back() -> dict[str, Any] | None:
            c = _status(cluster, ns).get("canary") or {}
            return c if c.get("phase") == "RolledBack" else None

        canary = wait_for(rolled_back, 4 * INTERVAL_S + 60, 1, "the operator to roll the candidate back")
        observed_rollback = time.time()
        at_rollback = log.after(observed_rollback)
        decided_at = _epoch(canary["lastAnalysis"]["time"])
        first_canary = at_rollback["first"].get("canary")
        assert first_canary is not None, f"the candidate never answered: {at_rollback}"
        from_first_answer = decided_at - first_canary
        from_split = decided_at - _epoch(canary["splitStartedAt"])

        # The switch: the router pods roll to the stable-only plan, then the candidate's revision drains.
        name = f"{MODEL}-{canary_rev}"
        wait_for(lambda: get(cluster, "deployment", name, "-n", ns) is None, 180, 1,
                 f"the rolled-back candidate's Deployment {ns}/{name} to be deleted after the drain")  # fmt: skip
        drained = time.time()
        at_drain = log.after(drained)
        # Stable alone answers afterwards: no canary answer, no failure, for another 40 stable answers.
        goal = count(at_drain, "stable") + 40
        after = wait_for(lambda: (s := log.latest()) is not None and count(s, "stable") >= goal and s, 60, 1,
                         "stable traffic after the drain")  # fmt: skip

        switch = diff(at_drain, at_rollback)
        settled = diff(after, at_drain)
        total = after["counts"]
        stable_rm = _status(cluster, ns)
        print(
            f"\n[rollback on real pods] time to Ready (v1 applied -> Ready): {ready_s:.0f}s; candidate built and "
            f"routed {candidate_ready_s:.0f}s after v2 was applied"
        )
        print(
            f"[rollback on real pods] time to rollback: {from_first_answer:.1f}s after the candidate's first answer, "
            f"{from_split:.1f}s after the operator split the traffic (analysis interval {INTERVAL_S:g}s, "
            f"limit {2 * INTERVAL_S + DECISION_MARGIN_S:g}s); lastAnalysis {canary['lastAnalysis']}"
        )
        print(
            f"[rollback on real pods] the switch (rollback -> candidate Deployment gone, "
            f"{drained - observed_rollback:.0f}s): {switch}; failed requests on stable during it: "
            f"{failed(at_drain, 'stable') - failed(at_rollback, 'stable')}"
        )
        print(f"[rollback on real pods] after the drain: {settled}; totals: {total}; other errors: {after['samples']}")

        # Rolled back by the analysis, on the candidate's measured error rate.
        assert canary["revision"] == canary_rev and canary_rev != stable_rev
        assert "errorRate" in canary["message"], canary["message"]
        assert canary["lastAnalysis"]["decision"] == "rollback" and canary["lastAnalysis"]["errorRate"] > 0.05
        # Stable keeps serving (Ready=True); the model reports Degraded because its latest revision is not serving.
        conds = {c["type"]: (c["status"], c["reason"]) for c in stable_rm["conditions"]}
        assert stable_rm["stable"]["revision"] == stable_rev and conds["Ready"][0] == "True", stable_rm
        assert stable_rm["phase"] == "Degraded" and conds["Degraded"] == ("True", "RolledBack"), stable_rm
        events = cluster.kubectl("get", "events", "-n", ns, "--field-selector", "reason=RolledBack").stdout
        assert "errorRate" in events, events
        assert from_first_answer <= 2 * INTERVAL_S + DECISION_MARGIN_S, from_first_answer

        # The candidate really served: exactly its lookups of ids beyond its table failed, nothing else did.
        cand = total["canary"]
        assert cand.get("known_ok", 0) > 0 and cand.get("new_model_error", 0) > 0, cand
        assert set(cand) <= {"known_ok", "new_model_error"}, cand
        share = cand["new_model_error"] / (cand["new_model_error"] + cand["known_ok"])
        assert 0.15 < share < 0.45, share  # ~30%, uniform ids
        # Stable never failed, before, during or after the switch; every request got an answer from a variant.
        assert set(total["stable"]) <= {"known_ok", "new_ok"}, total["stable"]
        assert set(total) == {"stable", "canary"}, (total, after["samples"])
        assert failed(at_drain, "stable") - failed(at_rollback, "stable") == 0, switch
        assert {k for k, v in settled.items() if v} == {"stable"}, settled  # after the drain only stable answers
        assert set(settled["stable"]) <= {"known_ok", "new_ok"}, settled
        # Gone: the candidate's pods too, once the drain finished.
        wait_for(lambda: not (get(cluster, "pods", "-n", ns, "-l", f"{REVISION_LABEL}={canary_rev}") or {})
                 .get("items"), 60, 1, "the candidate's pods to be gone")  # fmt: skip
    finally:
        if load:
            cluster.kubectl("delete", "pod", load, "-n", ns, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl(
            "delete",
            "recommendermodel",
            MODEL,
            "-n",
            ns,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
            check=False,
            timeout=150,
        )
        volumes.remove(cluster, ns, "models", NODE)
