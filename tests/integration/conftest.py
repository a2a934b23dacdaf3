"""Fixtures for operator tests: the CRD installed once per module, and a real operator process per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from recserve_cluster.cluster import Cluster
from tests.integration.conftest_operator import OperatorProcess, install_crd


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> Cluster:
    install_crd(cluster)
    return cluster


@pytest.fixture
def operator(crd: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator watching the test's namespace; its log must end without a Traceback."""
    op = OperatorProcess(crd, namespace, tmp_path / "operator.log")
    op.start()
    yield op
    op.stop()
    log = op.log()
    assert "Traceback" not in log, log[-5000:]
