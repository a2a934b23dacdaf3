"""The CRD on a real apiserver: established, self-documenting, accepts every example, refuses each CEL violation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recserve_cluster.cluster import Cluster
from tests.integration.conftest_operator import ROOT

pytestmark = pytest.mark.integration

REJECTS = sorted((ROOT / "tests" / "integration" / "manifests").glob("reject-*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("**/*.yaml"))


def test_kubectl_explain_teaches_the_api(crd: Cluster) -> None:
    out = crd.kubectl("explain", "recommendermodels.spec.serving.gpuProduct").stdout
    assert "nvidia.com/gpu.product" in out
    out = crd.kubectl("explain", "rm.spec.rollout.steps").stdout
    assert "strictly increasing" in out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_examples_are_accepted(crd: Cluster, path: Path) -> None:
    out = crd.kubectl("create", "--dry-run=server", "-n", "default", "-f", str(path), check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("path", REJECTS, ids=lambda p: p.stem)
def test_must_reject_manifest_is_refused_with_the_rules_message(crd: Cluster, path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    assert yaml.safe_load(path.read_text())["kind"] == "RecommenderModel"
    out = crd.kubectl("create", "--dry-run=server", "-n", "default", "-f", str(path), check=False)
    assert out.returncode != 0, f"{path.name} was accepted"
    assert expected in out.stderr, out.stderr
