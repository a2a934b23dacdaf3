"""The operator's own Prometheus metrics (reconciles, errors, durations, applies, rollouts)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("recserve_reconciles_total", "Reconciles of RecommenderModels.")
RECONCILE_ERRORS = Counter("recserve_reconcile_errors_total", "Reconciles that raised an error.")
RECONCILE_SECONDS = Histogram(
    "recserve_reconcile_duration_seconds",
    "Wall time of one reconcile.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
APPLIES = Counter("recserve_applies_total", "Server-side applies of owned objects (drift or spec changes).", ["kind"])
ROLLOUTS = Counter("recserve_rollouts_total", "Finished rollouts by outcome.", ["outcome"])
API_REQUESTS = Counter("recserve_api_requests_total", "Kubernetes API requests made by the reconciler.", ["verb"])
QUEUE_ADDS = Counter(
    "recserve_workqueue_adds_total", "Model keys queued for a reconcile, by trigger (deduplicated adds included).",
    ["trigger"],
)  # fmt: skip
QUEUE_DEPTH = Gauge("recserve_workqueue_depth", "Model keys waiting for a worker.")
QUEUE_WAIT_SECONDS = Histogram(
    "recserve_workqueue_wait_seconds",
    "Time a model key waited in the work queue before a worker took it.",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
CRD_SCHEMA_CURRENT = Gauge(
    "recserve_crd_schema_current",
    "1 when the installed RecommenderModel CRD has the schema this operator expects; 0 when it is outdated or "
    "missing (the operator log says which and how to fix it).",
)
LEADER = Gauge("recserve_leader", "1 while this replica reconciles (it holds the lease, or runs without election).")


def serve(port: int) -> None:
    """Expose /metrics; port 0 disables it (tests run several operators side by side)."""
    if port:
        start_http_server(port)
