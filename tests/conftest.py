"""Shared pytest fixtures: the session cluster, a namespace per test, and failure dumps."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator

import pytest

from recserve_cluster.cluster import Cluster, get_provider
from recserve_cluster.errors import ClusterError


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The cluster named by RECSERVE_CLUSTER_PROVIDER (kwok by default), created once per session."""
    provider = get_provider()
    existed = provider.current() is not None
    try:
        c = provider.up()
    except ClusterError as exc:
        pytest.fail(f"test cluster could not be started: {exc}", pytrace=False)
    yield c
    if not existed and os.environ.get("RECSERVE_KEEP_CLUSTER") != "1" and provider.name != "existing":
        provider.down()


def _dump_namespace(cluster: Cluster, ns: str) -> str:
    kinds = "all,configmaps,events,poddisruptionbudgets,horizontalpodautoscalers,httproutes,recommendermodels"
    parts = []
    for args in (("get", kinds, "-n", ns, "-o", "wide"), ("get", kinds, "-n", ns, "-o", "yaml")):
        out = cluster.kubectl(*args, check=False, timeout=30)
        parts.append(out.stdout + out.stderr)
    return "\n".join(parts)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test; its objects and events are dumped into the report when the test fails."""
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    ns = f"t-{base}-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("label", "namespace", ns, "recserve.dev/test=true")
    yield ns
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        request.node.add_report_section("call", f"objects in {ns}", _dump_namespace(cluster, ns))
    cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
