"""The shadow phase on real pods: live requests mirrored to a candidate, answers compared, pass or roll back.

The model is a small catalogue ranker (ONNX): for a user vector it scores CATALOGUE items (sigmoid(user ·
item_table)) and answers the top 10 (`scores`, `indices`: TopK inside ONNX Runtime, as the ranking head does).
Version 1 is the stable. Version 2 is the same file: a new revision whose answers equal the stable's. Version 3
has the same item table with its rows shuffled: every score it gives is one the stable gives too, it is as fast
and fails nothing, but to the wrong items, so its top 10 shares almost nothing with the stable's.

A load pod sends steady ranking requests through the builtin router by Service DNS (its users) and records
every answer's status and latency. Version 2 is applied with `spec.rollout.shadow`: the router's nginx mirrors
half of the requests to its comparator sidecar, which asks both revisions, compares, and Prometheus scrapes
it; the shadow analysis passes and the canary's first step starts. Version 3 then supersedes it: its shadow
analysis fails on the top-10 overlap and it is rolled back with the measured values in status and an event,
while its error rate and latency were fine. No user request fails, and the users' p99 with and without
mirroring is reported.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from recserve_cluster import volumes
from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.conftest_operator import recserve
from tests.integration.realpods import (
    MODEL,
    NODE,
    PYTHON_IMAGE,
    apply,
    dashboard_queries,
    get,
    placement,
    platform_fixture,
    prometheus_query,
    recommender_model,
    save_onnx,
)
from tests.integration.test_rollback_realpods import UNSCHEDULABLE_S, _unschedulable

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

EMBED_DIM = 8
CATALOGUE = 300
TOP_K = 10
INTERVAL_S = 15.0
RESOURCES = {"gpu": 1, "cpu": "300m", "memory": "2Gi"}
RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
SHADOW = {"percent": 50, "topK": TOP_K, "minRequests": 100, "duration": "0s", "minTopKOverlap": 0.9,
          "maxP99LatencyMs": 2000, "maxErrorRate": 0.01}  # fmt: skip
# Two threads, one keep-alive connection each, a short pause: ~30 requests/s through the router.
LOAD = """
import http.client, json, os, random, threading, time, urllib.parse
url = urllib.parse.urlsplit(os.environ["URL"])
stop = time.time() + float(os.environ["SECONDS"])
lock = threading.Lock()
state = {"ok": 0, "failed": 0, "retried": 0, "variants": {}, "errors": [], "lat": []}
def send(conn, body):
    conn.request("POST", url.path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp, resp.read()
def worker(seed):
    rng = random.Random(seed)
    conn = None
    while time.time() < stop:
        body = json.dumps({"inputs": [{"name": "user", "shape": [1, 8], "datatype": "FP32",
                                       "data": [rng.gauss(0, 1) for _ in range(8)]}]})
        t0 = time.perf_counter()
        try:
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
            try:
                resp, data = send(conn, body)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A router pod that is replaced closes its idle keep-alive connections; like HTTP clients do, a
                # request that found its reused connection closed is sent again on a new one (counted).
                if not reused:
                    raise
                with lock:
                    state["retried"] += 1
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
                resp, data = send(conn, body)
            ms = (time.perf_counter() - t0) * 1000
            ok = resp.status == 200 and len(json.loads(data)["outputs"]) == 2
            variant = resp.getheader("X-RecServe-Variant") or "?"
            detail = "" if ok else f"{resp.status} {data[:200]!r}"
        except Exception as exc:
            conn, ok, variant, ms, detail = None, False, "?", (time.perf_counter() - t0) * 1000, repr(exc)[:200]
        with lock:
            state["ok" if ok else "failed"] += 1
            state["variants"][variant] = state["variants"].get(variant, 0) + 1
            state["lat"].append([round(time.time(), 3), round(ms, 2)])
            if detail and len(state["errors"]) < 5:
                state["errors"].append(detail)
        time.sleep(0.05)
threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(2)]
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):
    time.sleep(1)
    with lock:
        lat, state["lat"] = state["lat"], []
        print(json.dumps({"t": time.time(), **state, "lat": lat}), flush=True)
"""


def write_catalogue_ranker(path: Path, table: NDArray[Any]) -> Path:
    """user FP32 [batch, 8] -> scores FP32 [batch, 10], indices INT64 [batch, 10]: the top 10 of the catalogue."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["user", "item_table_t"], ["logits"]),  # [batch, CATALOGUE]
         helper.make_node("Sigmoid", ["logits"], ["probs"]),
         helper.make_node("TopK", ["probs", "k"], ["scores", "indices"], axis=1, largest=1, sorted=1)],
        "catalogue_ranker",
        [helper.make_tensor_value_info("user", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", TOP_K]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", TOP_K])],
        [numpy_helper.from_array(np.ascontiguousarray(table.T), "item_table_t"),
         numpy_helper.from_array(np.array([TOP_K], np.int64), "k")],
    )  # fmt: skip
    return save_onnx(graph, path)


def _spec(version: int) -> dict[str, Any]:
    rm = recommender_model(
        f"pvc://models/{MODEL}/{version}/model.onnx", version,
        model={"format": "onnx"},
        serving={"resources": RESOURCES},
        rollout={
            "shadow": SHADOW,
            # A long first step: the test ends each rollout in its shadow phase or as the first step starts.
            "steps": [{"weight": 50, "pause": "10m"}],
            "analysis": {"interval": f"{INTERVAL_S:g}s", "maxErrorRate": 0.05, "minRequests": 5, "failureLimit": 1},
        },
    )  # fmt: skip
    return {**rm, "metadata": {"name": MODEL}}


platform = platform_fixture("t-shadow")


def _canary(cluster: Cluster, ns: str, pending: dict[str, float] | None = None) -> dict[str, Any]:
    """status.canary; with `pending`, fails once the candidate's pod stayed unschedulable for UNSCHEDULABLE_S."""
    canary = ((get(cluster, "recommendermodel", MODEL, "-n", ns) or {}).get("status") or {}).get("canary") or {}
    if pending is not None:
        why = _unschedulable(cluster, ns, canary.get("revision"))
        if not why:
            pending.clear()
        elif time.time() - pending.setdefault("t", time.time()) > UNSCHEDULABLE_S:
            raise AssertionError(f"the candidate's pod cannot be scheduled (other workloads on {NODE}?): {why}")
    return canary


def _load_pod(ns: str, url: str) -> dict[str, Any]:
    container = {
        "name": "load", "image": PYTHON_IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["python3", "-c", LOAD],
        "env": [{"name": "URL", "value": url}, {"name": "SECONDS", "value": "1800"}],
        "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"cpu": "300m", "memory": "128Mi"}},
        "securityContext": RESTRICTED,
    }  # fmt: skip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"load-{secrets.token_hex(3)}", "namespace": ns},
            "spec": {**placement(), "restartPolicy": "Never", "automountServiceAccountToken": False,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [container]}}  # fmt: skip


class Users:
    """The load pod's log: cumulative counts in the last line, every latency across all lines."""

    def __init__(self, cluster: Cluster, ns: str, pod: str) -> None:
        self.cluster, self.ns, self.pod = cluster, ns, pod

    def lines(self) -> list[dict[str, Any]]:
        out = self.cluster.kubectl("logs", self.pod, "-n", self.ns, check=False)
        lines = []
        for text in out.stdout.splitlines() if out.returncode == 0 else []:
            try:
                lines.append(json.loads(text))
            except ValueError:
                continue
        return lines

    def last(self) -> dict[str, Any] | None:
        lines = self.lines()
        return lines[-1] if lines else None

    def latencies(self, start: float, end: float) -> list[float]:
        return [ms for line in self.lines() for t, ms in line["lat"] if start <= t <= end]


def p99(samples: list[float]) -> float:
    return float(np.percentile(np.asarray(samples), 99))


def _shadow_pair(cluster: Cluster, ns: str, candidate: str) -> dict[str, float]:
    """Top-10 overlap and compared count of one (stable, candidate) pair, as Prometheus has them (the comparator
    sidecars are gone once their router pods rolled to the next plan: their last samples)."""
    sel = f'namespace="{ns}",model="{MODEL}",candidate="{candidate}"'
    out = {}
    for key, query in (("count", f"sum(last_over_time(recserve_shadow_topk_overlap_count{{{sel}}}[20m]))"),
                       ("sum", f"sum(last_over_time(recserve_shadow_topk_overlap_sum{{{sel}}}[20m]))")):  # fmt: skip
        result = prometheus_query(cluster, query, refused_ok=True)
        out[key] = float(result[0]["value"][1]) if result else 0.0
    return out


def test_shadow_passes_an_equal_candidate_and_rolls_back_a_shuffled_ranking_on_live_traffic(
    cluster: Cluster, platform: str, tmp_path: Path
) -> None:
    ns = platform
    table = (np.random.default_rng(1).normal(size=(CATALOGUE, EMBED_DIM)) / np.sqrt(EMBED_DIM)).astype(np.float32)
    shuffled = table[np.random.default_rng(2).permutation(CATALOGUE)]
    v1 = write_catalogue_ranker(tmp_path / "1" / "model.onnx", table)
    v3 = write_catalogue_ranker(tmp_path / "3" / "model.onnx", shuffled)
    volumes.upload(cluster, ns, "models", NODE, {f"{MODEL}/1/model.onnx": v1, f"{MODEL}/2/model.onnx": v1,
                                                  f"{MODEL}/3/model.onnx": v3})  # fmt: skip
    load = ""
    try:
        apply(cluster, {**_spec(1), "metadata": {"name": MODEL, "namespace": ns}})

        def ready() -> dict[str, Any] | None:
            st = (get(cluster, "recommendermodel", MODEL, "-n", ns) or {}).get("status") or {}
            bad = [c for c in st.get("conditions", []) if c.get("reason") in ("BuildFailed", "InvalidSpec")]
            assert not bad, f"the model failed: {bad}"
            return st if st.get("phase") == "Ready" else None

        st = wait_for(ready, 600, 3, f"RecommenderModel {ns}/{MODEL} Ready")
        stable = st["stable"]["revision"]
        client = _load_pod(ns, f"{st['endpoints']['http']}/v2/models/{MODEL}/infer")
        load = client["metadata"]["name"]
        apply(cluster, client)
        users = Users(cluster, ns, load)
        wait_for(lambda: (s := users.last()) is not None and s["ok"] >= 300, 180, 2, "steady load on stable")
        off_end = time.time()  # users' latencies so far: no mirroring

        # -- version 2, equal to stable: shadow passes, the first step starts ------------------------------------
        apply(cluster, {**_spec(2), "metadata": {"name": MODEL, "namespace": ns}})
        shadow_seen: dict[str, float] = {}
        pending: dict[str, float] = {}
        plugin: dict[str, str] = {}

        def left_shadow() -> dict[str, Any] | None:
            c = _canary(cluster, ns, pending)
            if c.get("shadowing") and c.get("revision") != stable:
                shadow_seen.setdefault("start", time.time())
                if not plugin:  # what a user sees of the phase (it lasts at least one 15 s interval)
                    shown = recserve(cluster, "get", MODEL, "-n", ns).stdout
                    listed = recserve(cluster, "list", "-n", ns).stdout
                    if f"(in progress, candidate {c['revision']})" in shown and " shadow " in listed:
                        plugin.update(get=shown, list=listed)
            assert c.get("phase") != "RolledBack", c
            return c if shadow_seen and not c.get("shadowing") and c.get("weight") else None

        passed = wait_for(left_shadow, 600, 1, "version 2 to pass its shadow phase")
        on_window = (shadow_seen["start"], time.time())
        equal_rev = passed["revision"]
        assert plugin, "kubectl recserve never showed the shadow phase while status.canary.shadowing was true"
        row = next(ln.split() for ln in plugin["list"].splitlines() if ln.split()[:1] == [MODEL])
        assert row[4:8] == [equal_rev, "mirror", f"{SHADOW['percent']}%", "shadow"], plugin["list"]
        assert f"shadow phase: {SHADOW['percent']}% of live requests mirrored" in plugin["get"], plugin["get"]
        assert re.search(rf"{equal_rev}\s+shadow\s+\S+\s+0%", plugin["get"]), plugin["get"]  # no user traffic
        assert passed["phase"] == "Progressing" and passed["weight"] == 50 and passed["step"] == 0, passed
        shadow = passed["shadow"]
        assert shadow["verdict"] == "pass" and shadow["decision"] == "advance" and shadow["stage"] == "shadow", shadow
        assert shadow["measured"]["compared"] >= SHADOW["minRequests"], shadow
        assert shadow["measured"]["topKOverlap"] >= 0.99, shadow
        events = cluster.kubectl("get", "events", "-n", ns, "--field-selector", "reason=ShadowPassed").stdout
        assert equal_rev in events or "shadow passed" in events, events

        # -- version 3, a shuffled ranking: shadow fails on overlap alone, rolled back --------------------------
        apply(cluster, {**_spec(3), "metadata": {"name": MODEL, "namespace": ns}})

        def rolled_back() -> dict[str, Any] | None:
            c = _canary(cluster, ns, pending)
            return c if c.get("phase") == "RolledBack" and c.get("revision") not in (stable, equal_rev) else None

        failed = wait_for(rolled_back, 600, 1, "version 3 to be rolled back by its shadow analysis")
        shuffled_rev = failed["revision"]
        shadow = failed["shadow"]
        measured = shadow["measured"]
        assert shadow["verdict"] == "fail" and shadow["decision"] == "rollback", shadow
        assert [c["name"] for c in shadow["checks"] if c["passed"] is False] == ["topKOverlap"], shadow
        assert measured["topKOverlap"] < 0.5 and measured["compared"] >= SHADOW["minRequests"], measured
        assert measured["errorRate"] <= SHADOW["maxErrorRate"] and measured["p99Ms"] < SHADOW["maxP99LatencyMs"], (
            measured
        )
        assert "topKOverlap" in failed["message"], failed["message"]
        events = cluster.kubectl("get", "events", "-n", ns, "--field-selector", "reason=RolledBack").stdout
        assert "topKOverlap" in events, events
        # The users: every request answered, by the stable (or version 2 at its first step, an equal answer).
        end = wait_for(lambda: (s := users.last()) is not None and s["t"] > time.time() - 5 and s, 30, 1,
                       "a fresh line of the load pod")  # fmt: skip
        assert end["failed"] == 0, end
        assert set(end["variants"]) <= {"stable", "canary"}, end

        # -- the comparison metrics in Prometheus and on the dashboard ------------------------------------------
        equal = wait_for(lambda: (m := _shadow_pair(cluster, ns, equal_rev))["count"] > 0 and m, 60, 3,
                         "the equal candidate's comparisons in Prometheus")  # fmt: skip
        bad = wait_for(lambda: (m := _shadow_pair(cluster, ns, shuffled_rev))["count"] > 0 and m, 60, 3,
                       "the shuffled candidate's comparisons in Prometheus")  # fmt: skip
        assert equal["sum"] / equal["count"] >= 0.99 and bad["sum"] / bad["count"] < 0.5, (equal, bad)
        shadow_panels = [(title, q) for title, q in dashboard_queries(ns, MODEL, "5m") if "recserve_shadow" in q]
        assert len(shadow_panels) >= 5, shadow_panels
        empty = [title for title, q in shadow_panels
                 if "dropped" not in q and not prometheus_query(cluster, q, refused_ok=True)]  # fmt: skip
        assert not empty, f"dashboard shadow panels without data: {empty}"

        off = users.latencies(0, off_end)
        on = users.latencies(*on_window)
        print(f"\n[shadow on real pods] users: {end['ok']} answered, {end['failed']} failed ({end['retried']} resent "
              f"after a replaced router pod closed their keep-alive connection), variants "
              f"{end['variants']}; p99 without mirroring {p99(off):.1f} ms ({len(off)} requests), with 50% "
              f"mirrored during version 2's shadow {p99(on):.1f} ms ({len(on)} requests): added "
              f"{p99(on) - p99(off):+.1f} ms")  # fmt: skip
        print(f"[shadow on real pods] equal candidate {equal_rev}: {passed['shadow']['measured']}")
        print(f"[shadow on real pods] shuffled candidate {shuffled_rev}: {measured}; {failed['message']}")
    finally:
        if load:
            cluster.kubectl("delete", "pod", load, "-n", ns, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "recommendermodel", MODEL, "-n", ns, "--ignore-not-found", "--wait=true",
                        "--timeout=120s", check=False, timeout=150)  # fmt: skip
        volumes.remove(cluster, ns, "models", NODE)
