"""Prometheus HTTP API client and the built-in Triton queries per revision."""

# Series are told apart by a `revision` label that the ServiceMonitor (builders/servicemonitor.py) adds from
# the pod label `recserve.dev/revision` (endpoint relabeling: source
# `__meta_kubernetes_pod_label_recserve_dev_revision`, target `revision`).
# Revision rather than variant:  a promotion re-labels no pods, the candidate simply becomes stable,
# so "stable"/"canary" are roles that move while a revision's series stay continuous.
#
# Latency: Triton's counters only give the mean (`nv_inference_request_duration_us` / `..._success`);
# with `--metrics-config summary_latencies=true` (checked against the Triton binary in nvidia-pytriton)
# it also exports `nv_inference_request_summary_us{quantile="0.99"}`, which is used when present. Those
# quantiles cover Triton's own sliding window, not exactly the analysis interval. Without them the mean is
# used as a stand-in for p99 and the analysis says so.

from __future__ import annotations

import math
from typing import Any

import requests

from recserve_operator.builders.common import SERIES_REVISION_LABEL
from recserve_operator.metrics.base import MetricsError, TritonSeries

__all__ = ["REVISION_LABEL", "VARIANT_LABEL", "PrometheusProvider", "triton_queries"]

REVISION_LABEL = SERIES_REVISION_LABEL
VARIANT_LABEL = "variant"


def triton_queries(revision: str, window_s: float, label: str = REVISION_LABEL) -> dict[str, str]:
    sel = f'{label}="{revision}"'
    w = f"{max(1, round(window_s))}s"
    success = f"sum(increase(nv_inference_request_success{{{sel}}}[{w}]))"
    failure = f"sum(increase(nv_inference_request_failure{{{sel}}}[{w}]))"
    return {
        "success": success,
        "failure": failure,
        "p99_us": f'max(nv_inference_request_summary_us{{{sel},quantile="0.99"}})',
        "avg_us": f"sum(increase(nv_inference_request_duration_us{{{sel}}}[{w}])) / {success}",
    }


class PrometheusProvider:
    """Instant queries against the Prometheus HTTP API (`/api/v1/query`)."""

    def __init__(self, url: str, *, timeout_s: float = 5.0, session: requests.Session | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise MetricsError(f"prometheus URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()

    def query(self, promql: str) -> dict[str, Any]:
        """The `data` object of an instant query; raises MetricsError with Prometheus' own message."""
        try:
            resp = self.session.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout_s)
        except requests.Timeout as exc:
            raise MetricsError(f"prometheus at {self.url} timed out after {self.timeout_s}s: {promql}") from exc
        except requests.RequestException as exc:
            raise MetricsError(f"prometheus at {self.url} unreachable: {exc}") from exc
        try:
            body = resp.json()
        except ValueError:
            raise MetricsError(f"prometheus returned HTTP {resp.status_code} with a non-JSON body") from None
        if resp.status_code != 200 or body.get("status") != "success":
            raise MetricsError(
                f"prometheus query failed ({resp.status_code} {body.get('errorType', '')}: {body.get('error', '')}):"
                f" {promql}"
            )
        data = body.get("data")
        if not isinstance(data, dict):
            raise MetricsError(f"prometheus returned no data object for {promql}")
        return data

    def query_scalar(self, query: str) -> float | None:
        data = self.query(query)
        kind, result = data.get("resultType"), data.get("result")
        if kind == "scalar" and isinstance(result, list):
            value = float(result[1])
        elif kind == "vector" and isinstance(result, list):
            if not result:
                return None
            if len(result) > 1:
                labels = [r.get("metric", {}) for r in result[:3]]
                raise MetricsError(f"expected one series, got {len(result)} (e.g. {labels}); use sum(): {query}")
            value = float(result[0]["value"][1])
        else:
            raise MetricsError(f"expected a scalar or instant vector, got {kind}: {query}")
        return None if math.isnan(value) else value

    def query_vector(self, query: str) -> list[tuple[dict[str, str], float]]:
        data = self.query(query)
        kind, result = data.get("resultType"), data.get("result")
        if kind != "vector" or not isinstance(result, list):
            raise MetricsError(f"expected an instant vector, got {kind}: {query}")
        out = [(dict(r.get("metric", {})), float(r["value"][1])) for r in result]
        return [(labels, v) for labels, v in out if not math.isnan(v)]

    def triton_series(self, revision: str, window_s: float) -> TritonSeries:
        q = triton_queries(revision, window_s)
        success = self.query_scalar(q["success"])
        failure = self.query_scalar(q["failure"])
        if success is None and failure is None:
            return TritonSeries(None, None, None, False)
        total = (success or 0.0) + (failure or 0.0)
        error_rate = (failure or 0.0) / total if total > 0 else None
        p99_us = self.query_scalar(q["p99_us"])
        is_average = p99_us is None
        if p99_us is None:
            p99_us = self.query_scalar(q["avg_us"])
        return TritonSeries(total, error_rate, None if p99_us is None else p99_us / 1000.0, is_average)
