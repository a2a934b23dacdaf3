"""Restarting a control-plane component in place (recserve_cluster.cluster.KwokProvider.stop/start_component):
how it was started is read back from /proc, and it is started again exactly so, its pid file updated."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recserve_cluster.cluster import ComponentProcess, KwokProvider, _process_gone
from recserve_cluster.errors import ClusterError
from tests.helpers import wait_for

# A stand-in component: writes its argv, cwd and one env var to a file, then runs until stopped.
SCRIPT = (
    "import os, sys, time, json\n"
    "open(sys.argv[1], 'a').write(json.dumps([sys.argv[1:], os.getcwd(), os.environ.get('COMPONENT_FLAG')]) + '\\n')\n"
    "while True: time.sleep(0.2)\n"
)


def test_component_process_reads_argv_cwd_and_environment_from_a_proc_tree(tmp_path: Path) -> None:
    base = tmp_path / "proc" / "42"
    base.mkdir(parents=True)
    (base / "cmdline").write_bytes(b"/bin/etcd\0--data-dir=/d\0--listen-client-urls=http://127.0.0.1:1\0")
    (base / "environ").write_bytes(b"PATH=/bin\0A=b=c\0NOEQUALS\0")
    os.symlink(tmp_path, base / "cwd")
    how = ComponentProcess.of(42, tmp_path / "proc")
    assert how == ComponentProcess(("/bin/etcd", "--data-dir=/d", "--listen-client-urls=http://127.0.0.1:1"), tmp_path,
                                   {"PATH": "/bin", "A": "b=c"})  # fmt: skip
    (base / "cmdline").write_bytes(b"")
    with pytest.raises(ClusterError, match="no command line"):
        ComponentProcess.of(42, tmp_path / "proc")
    with pytest.raises(ClusterError, match="cannot read how process 43 was started"):
        ComponentProcess.of(43, tmp_path / "proc")


def test_a_zombie_or_missing_process_is_gone(tmp_path: Path) -> None:
    for pid, state in ((1, "S"), (2, "Z"), (3, "R")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (odd) name) {state} 1 2 3")
    assert [_process_gone(p, tmp_path) for p in (1, 2, 3, 4)] == [False, True, False, True]


def test_stop_and_start_component_restart_the_same_command_and_update_the_pid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KWOK_WORKDIR", str(tmp_path / "kwok"))
    provider = KwokProvider("unit", real_node=False)
    (provider.cluster_dir / "pids").mkdir(parents=True)
    record = tmp_path / "started.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(record), "--port=1234"], cwd=tmp_path,
                            env={**os.environ, "COMPONENT_FLAG": "on"}, start_new_session=True)  # fmt: skip
    new_pid = None
    try:
        (provider.cluster_dir / "pids" / "etcd.pid").write_text(str(proc.pid))
        wait_for(lambda: record.exists() and record.read_text().count("\n") == 1, 30, 0.1, "the first start")
        how = provider.stop_component("etcd", grace=10)
        assert proc.poll() is not None  # stopped (reaped: it is this test's child)
        assert how.argv[1:] == ("-c", SCRIPT, str(record), "--port=1234") and how.cwd == tmp_path
        new_pid = provider.start_component("etcd", how)
        assert new_pid != proc.pid and provider.component_pid("etcd") == new_pid
        wait_for(lambda: record.read_text().count("\n") == 2, 30, 0.1, "the second start")
        first, second = record.read_text().splitlines()
        assert first == second  # same arguments, working directory and environment
        assert "on" in second
        assert (provider.cluster_dir / "logs" / "etcd.log").exists()
    finally:
        for pid in (proc.pid, new_pid):
            if pid is not None and not _process_gone(pid):
                os.kill(pid, 9)
        proc.wait(10)
        if new_pid is not None:
            wait_for(lambda: _process_gone(new_pid), 10, 0.1, "the restarted stand-in to exit")
            with contextlib.suppress(ChildProcessError):
                os.waitpid(new_pid, 0)
    with pytest.raises(ClusterError, match="unknown control-plane component"):
        provider.component_pid("kube-dns")
