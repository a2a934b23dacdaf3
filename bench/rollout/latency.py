"""Latency measurement shared by the rollout benchmarks: a keep-alive KServe v2 client and p50/p99."""

from __future__ import annotations

import http.client
import json
import time

import numpy as np

from tests.dataplane.harness import MODEL, infer_body


class Client:
    """One keep-alive HTTP/1.1 connection; `call` returns the request's latency in milliseconds. With `sticky`,
    each request carries the user's id in the router's sticky header (as shoppers' requests do)."""

    def __init__(self, port: int, *, sticky: bool = False) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.path = f"/v2/models/{MODEL}/infer"
        self.sticky = sticky

    def call(self, user: int) -> float:
        body = json.dumps(infer_body(user))
        headers = {"Content-Type": "application/json"}
        if self.sticky:
            headers["x-user-id"] = f"user-{user}"
        t0 = time.perf_counter()
        self.conn.request("POST", self.path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        elapsed = (time.perf_counter() - t0) * 1000.0
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return elapsed


def percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))
