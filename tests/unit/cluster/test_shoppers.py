"""The demo's shopper pod: its request data, its objects and how its counters are read back."""

from __future__ import annotations

import base64
import gzip
import json

import numpy as np

from recserve_cluster import shoppers


def test_the_request_data_holds_a_kserve_body_and_the_true_click_probability_per_candidate() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    data = json.loads(gzip.decompress(shoppers.request_data([(x, np.array([0.1, 0.5, 0.9]))], "features")))
    body = json.loads(data[0]["body"])
    assert body["inputs"][0]["name"] == "features" and body["inputs"][0]["shape"] == [3, 4]
    np.testing.assert_allclose(body["inputs"][0]["data"], x.ravel(), atol=1e-5)
    assert data[0]["true_p"] == [0.1, 0.5, 0.9]


def test_the_shopper_objects_mount_the_data_run_unprivileged_and_are_scraped_by_a_servicemonitor() -> None:
    objs = {o["kind"]: o for o in shoppers.objects("shop", "http://r:8000/v2/models/m/infer", "m", b"xyz", {})}
    assert set(objs) == {"ConfigMap", "Pod", "Service", "ServiceMonitor"}
    assert base64.b64decode(objs["ConfigMap"]["binaryData"][shoppers.DATA_KEY]) == b"xyz"
    container = objs["Pod"]["spec"]["containers"][0]
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert objs["Pod"]["spec"]["automountServiceAccountToken"] is False
    selector = objs["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= objs["Service"]["metadata"]["labels"].items()
    assert objs["Service"]["spec"]["selector"].items() <= objs["Pod"]["metadata"]["labels"].items()
    compile(shoppers.SCRIPT, "shoppers", "exec")  # the pod's program is valid Python


def test_answered_and_failed_requests_are_read_from_the_shoppers_metrics() -> None:
    text = "\n".join([
        "# TYPE recserve_shopper_requests_total counter",
        'recserve_shopper_requests_total{model="m",variant="stable",outcome="ok"} 40',
        'recserve_shopper_requests_total{model="m",variant="canary",outcome="ok"} 9',
        'recserve_shopper_requests_total{model="m",variant="none",outcome="error"} 2',
        'recserve_clicks_total{model="m",variant="stable"} 17',
    ])
    answered, failed = shoppers.parse_requests(text)
    assert answered == {"stable": 40, "canary": 9} and failed == 2
