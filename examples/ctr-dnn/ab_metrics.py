"""Client side of the A/B test in abtest.yaml: count impressions and clicks per variant with prometheus_client.

The router answers every request with the variant it picked (header X-RecServe-Variant: stable or canary).
Count an impression for each recommendation shown, remember the variant with it, and count a click under the
same variant. The operator queries `sum by (variant) (increase(recserve_clicks_total{model=...}[{{elapsed}}]))`,
so the counters carry exactly the labels `model` (the RecommenderModel's name) and `variant`; Prometheus must
scrape this process (a ServiceMonitor or PodMonitor on its metrics port).

    python examples/ctr-dnn/ab_metrics.py   # serves /metrics on :9100 and simulates traffic
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping

from prometheus_client import Counter, start_http_server

MODEL = "ctr-dnn-ab"  # metadata.name of the RecommenderModel in abtest.yaml
VARIANT_HEADER = "X-RecServe-Variant"
VARIANTS = ("stable", "canary")
LABELS = ("model", "variant")  # the labels the operator's A/B queries and the Grafana CTR panel select

# prometheus_client appends `_total`: these are recserve_impressions_total and recserve_clicks_total.
IMPRESSIONS = Counter("recserve_impressions", "Recommendations shown to users.", LABELS)
CLICKS = Counter("recserve_clicks", "Shown recommendations the user clicked.", LABELS)


def start(port: int = 9100, model: str = MODEL) -> None:
    """Serve /metrics with every series present at 0, so increase() also counts each series' first events."""
    for variant in VARIANTS:
        IMPRESSIONS.labels(model=model, variant=variant)
        CLICKS.labels(model=model, variant=variant)
    start_http_server(port)


def variant_of(response_headers: Mapping[str, str]) -> str:
    """The variant that served a response (requests' headers are case-insensitive; a plain dict needs this)."""
    for key, value in response_headers.items():
        if key.lower() == VARIANT_HEADER.lower() and value in VARIANTS:
            return value
    return "stable"


def shown(variant: str, count: int = 1, model: str = MODEL) -> None:
    IMPRESSIONS.labels(model=model, variant=variant).inc(count)


def clicked(variant: str, model: str = MODEL) -> None:
    CLICKS.labels(model=model, variant=variant).inc()


def main() -> None:
    start()
    ctr = {"stable": 0.10, "canary": 0.12}
    while True:
        # In an application: response = requests.post(router_url, ..., headers={"x-user-id": user}).
        variant = variant_of({VARIANT_HEADER: random.choice(VARIANTS)})
        shown(variant)
        if random.random() < ctr[variant]:
            clicked(variant)
        time.sleep(0.01)


if __name__ == "__main__":
    main()
