"""A host that cannot run containers gets one message naming the requirement and the kwok-only fallback."""

from __future__ import annotations

import shutil

import pytest

from recserve_cluster import realnode
from recserve_cluster.errors import ClusterError
from recserve_cluster.realnode import NodeState


@pytest.mark.parametrize(("missing", "named"), [("runc", "runc"), ("containerd", "containerd"),
                                                 ("iptables", "iptables")])
def test_a_missing_runtime_piece_is_named_with_the_fallback(
    monkeypatch: pytest.MonkeyPatch, missing: str, named: str
) -> None:
    real_which = shutil.which
    monkeypatch.setattr(realnode.os, "geteuid", lambda: 0)
    monkeypatch.setattr(realnode.shutil, "which", lambda b: None if b == missing else real_which(b) or f"/bin/{b}")
    with pytest.raises(ClusterError) as err:
        realnode.preflight()
    assert named in str(err.value)
    assert "RECSERVE_REAL_NODE=0" in str(err.value)


def test_not_being_root_is_refused_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(realnode.os, "geteuid", lambda: 1000)
    with pytest.raises(ClusterError, match="root"):
        realnode.preflight()


def test_missing_cgroup_controllers_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setattr(realnode.os, "geteuid", lambda: 0)
    monkeypatch.setattr(realnode.shutil, "which", lambda b: f"/bin/{b}")
    monkeypatch.setattr(realnode, "CGROUP_FS", tmp_path)
    monkeypatch.setattr(realnode.Path, "exists", lambda self: True)
    with pytest.raises(ClusterError, match="cgroup v1 controllers"):
        realnode.preflight()


def test_the_node_state_round_trips_and_ignores_unknown_keys(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "state.json"
    state = NodeState(pids={"kubelet": 42}, sysctls={"/proc/sys/net/ipv4/ip_forward": "0"}, bridge=True,
                      chains=["RECSERVE-GUARD"])
    state.save(path)
    path.write_text(path.read_text().replace('"bridge"', '"future": 1, "bridge"'))
    assert NodeState.load(path) == state
    assert NodeState.load(Path(str(tmp_path)) / "absent.json") == NodeState()


def test_only_a_lease_renewed_since_the_kubelet_started_counts_as_registration() -> None:
    from datetime import UTC, datetime

    from recserve_cluster.realnode import _renewed_since

    started = datetime(2026, 12, 1, 22, 0, 0, 500000, tzinfo=UTC)
    assert _renewed_since("2026-12-01T22:00:01.000001Z", started)
    assert not _renewed_since("2026-12-01T22:00:00.400000Z", started)  # the stopped kubelet's last renewal
    assert not _renewed_since("", started)
    assert not _renewed_since("not-a-time", started)
