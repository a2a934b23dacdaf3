"""The scale a rollout gives a revision reaches its Deployment (replicas) or its HorizontalPodAutoscaler (bounds)."""

from __future__ import annotations

from operator_samples import minimal_spec
from recserve_operator.builders.common import Ids
from recserve_operator.builders.deployment import build_deployment
from recserve_operator.builders.hpa import build_hpa
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import parse_spec

IDS = Ids(name="ctr-dnn", namespace="shop", uid="uid-1", revision="abc")
AUTOSCALED = {"resources": {"gpu": 1}, "replicas": 2, "autoscaling": {"minReplicas": 2, "maxReplicas": 8,
                                                                        "targetCPUUtilization": 70}}  # fmt: skip


def test_a_replicas_override_replaces_the_specs_replicas() -> None:
    spec = parse_spec(minimal_spec(serving={"resources": {"gpu": 1}, "replicas": 4}))
    assert build_deployment(spec, IDS, OperatorDefaults())["spec"]["replicas"] == 4
    assert build_deployment(spec, IDS, OperatorDefaults(), replicas=1)["spec"]["replicas"] == 1


def test_with_autoscaling_the_deployment_never_carries_replicas_and_the_bounds_go_to_the_autoscaler() -> None:
    # Applying replicas beside an HPA would fight it; dropping them later would reset the Deployment to 1.
    spec = parse_spec(minimal_spec(serving=AUTOSCALED))
    assert "replicas" not in build_deployment(spec, IDS, OperatorDefaults(), replicas=1)["spec"]
    hpa = build_hpa(spec, IDS, bounds=(3, 3))
    assert hpa is not None and (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 3)
    own = build_hpa(spec, IDS)
    assert own is not None and (own["spec"]["minReplicas"], own["spec"]["maxReplicas"]) == (2, 8)
    assert build_hpa(spec, IDS, bounds=(4, 8)) == {**own, "spec": {**own["spec"], "minReplicas": 4}}
