"""The real node `real-0`: containerd + runc + CNI + kubelet + kube-proxy + CoreDNS beside the kwok control plane.

Every process is started here in its own process group with its PID recorded, every host change
(bridge, route, sysctls, iptables chains) is recorded in the node's state file, and `stop` undoes
exactly those: nothing that this module did not start or create is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import nodeconfig as nc
from . import tools
from .errors import ClusterError

if TYPE_CHECKING:
    from .cluster import Cluster

FALLBACK = "Set RECSERVE_REAL_NODE=0 to run the kwok-only cluster (control plane and simulated nodes, no containers)."
CGROUP_FS = Path("/sys/fs/cgroup")
# The programs the node runs on the host (everything else it starts lives in its cgroups).
NODE_BINARIES = frozenset({"containerd", "kubelet", "kube-proxy", "containerd-shim-runc-v2", "containerd-shim"})


def _log(msg: str) -> None:
    print(f"[recserve-cluster] {msg}", file=sys.stderr, flush=True)


def _run(*cmd: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if check:
            raise ClusterError(f"{' '.join(cmd)} failed: {exc}") from exc
        return ""
    if check and out.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()}")
    return out.stdout


@dataclass
class NodeState:
    """What `start` did to the host, so `stop` undoes exactly that (persisted as JSON)."""

    pids: dict[str, int] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    bridge: bool = False
    route: bool = False
    chains: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> NodeState:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__, indent=1, sort_keys=True))


def preflight() -> None:
    """Fail with one message naming the first missing requirement for running containers."""
    checks: list[tuple[bool, str]] = [
        (os.geteuid() == 0, "root (the kubelet, containerd and the CNI plugins need it)"),
        (shutil.which("containerd") is not None and shutil.which("ctr") is not None,
         "containerd and ctr (apt-get install containerd)"),
        (shutil.which("runc") is not None, "runc (apt-get install runc)"),
        (Path("/usr/lib/cni/bridge").exists() and Path("/usr/lib/cni/host-local").exists(),
         "CNI plugins in /usr/lib/cni (apt-get install containernetworking-plugins)"),
        (shutil.which("iptables") is not None, "iptables (apt-get install iptables)"),
        (shutil.which("ip") is not None, "ip from iproute2"),
        (all((CGROUP_FS / c).is_dir() for c in ("cpu", "memory", "pids", "cpuset", "devices", "freezer")),
         "cgroup v1 controllers cpu, memory, pids, cpuset, devices, freezer mounted under /sys/fs/cgroup"),
        ("overlay" in Path("/proc/filesystems").read_text(), "overlayfs in the kernel (containerd's snapshotter)"),
        (Path("/proc/sys/net/bridge").exists() or _can_load_bridge(), "Linux bridge support (br_netfilter)"),
    ]
    for ok, requirement in checks:
        if not ok:
            raise ClusterError(f"this host cannot run the real node: it needs {requirement}. {FALLBACK}")
    probe = subprocess.run(["unshare", "--mount", "--pid", "--net", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise ClusterError(
            f"this host cannot create mount/pid/network namespaces ({probe.stderr.strip()}). {FALLBACK}"
        )


def _can_load_bridge() -> bool:
    return subprocess.run(["modprobe", "br_netfilter"], capture_output=True).returncode == 0


class RealNode:
    """One kubelet node on this host, registered with the local control plane as `real-0`."""

    def __init__(self, cluster_name: str, net: nc.Network = nc.NETWORK) -> None:
        self.net = net
        self.paths = nc.NodePaths(tools.cache_dir() / "node" / cluster_name)
        self.state = NodeState.load(self.paths.state_file)

    # ----------------------------------------------------------------------------------- ownership
    # The bridge, the addresses, the guard and the kubelet's port are machine-wide: one cluster at a time
    # runs the real node, and a second cluster on the same machine starts kwok-only.
    @property
    def _owner_file(self) -> Path:
        return self.paths.root.parent / "owner"

    def owner(self) -> str | None:
        """The cluster whose node is running on this machine (a stale claim with no live process is none)."""
        if not self._owner_file.exists():
            return None
        name = self._owner_file.read_text().strip()
        if name == self.paths.root.name:
            return name
        other = RealNode(name, self.net)
        return name if any(other._alive(n) for n in other.state.pids) else None

    def claim(self) -> bool:
        """Take the machine's real node for this cluster, unless another live cluster holds it."""
        held = self.owner()
        if held not in (None, self.paths.root.name):
            return False
        self._owner_file.parent.mkdir(parents=True, exist_ok=True)
        self._owner_file.write_text(self.paths.root.name)
        return True

    def release(self) -> None:
        if self._owner_file.exists() and self._owner_file.read_text().strip() == self.paths.root.name:
            self._owner_file.unlink()

    # ----------------------------------------------------------------------------------- host network
    def _reload(self) -> None:
        """Another RealNode object (another process, or a test) may have started or stopped the node since."""
        self.state = NodeState.load(self.paths.state_file)

    def setup_network(self, apiserver_port: int) -> None:
        """Bridge with the gateway and node addresses, the Service-range route, sysctls and the guard."""
        self._reload()
        br, net = self.net.bridge, self.net
        if not Path(f"/sys/class/net/{br}").exists():
            _run("ip", "link", "add", br, "type", "bridge")
            self.state.bridge = True
            self._save()
        addrs = _run("ip", "-o", "-4", "addr", "show", "dev", br)
        for cidr in (f"{net.gateway}/{net.pod_cidr.split('/')[1]}", f"{net.node_ip}/32"):
            if f" {cidr} " not in addrs:
                _run("ip", "addr", "add", cidr, "dev", br)
        _run("ip", "link", "set", br, "up")
        # A Service address without kube-proxy rules goes to the bridge (where nothing answers), never
        # along the default route out of the machine; kube-proxy's DNAT re-routes the packets it rewrites.
        if net.service_cidr not in _run("ip", "-4", "route", "show", net.service_cidr):
            _run("ip", "route", "add", net.service_cidr, "dev", br)
            self.state.route = True
            self._save()
        self._install_guard(apiserver_port)
        bridge_nf = "/proc/sys/net/bridge/bridge-nf-call-iptables"
        if not Path(bridge_nf).exists():
            _run("modprobe", "br_netfilter", check=False)
        for key in ("/proc/sys/net/ipv4/ip_forward", bridge_nf):
            self._sysctl(key, "1")

    def _sysctl(self, key: str, value: str) -> None:
        p = Path(key)
        if not p.exists():
            return
        old = p.read_text().strip()
        if old != value:
            self.state.sysctls.setdefault(key, old)
            self._save()
            p.write_text(value)

    def _install_guard(self, apiserver_port: int) -> None:
        host_dns = nc.resolvers(Path("/etc/resolv.conf").read_text() if Path("/etc/resolv.conf").exists() else "")
        rules = nc.guard_rules(self.net, host_dns, apiserver_port)
        for chain, chain_rules in rules.items():
            if chain not in self.state.chains:
                self.state.chains.append(chain)
                self._save()
            if subprocess.run(["iptables", "-w", "-N", chain], capture_output=True).returncode != 0:
                _run("iptables", "-w", "-F", chain)
            for rule in chain_rules:
                _run("iptables", "-w", "-A", chain, *rule)
        for hook, chain in nc.GUARD_HOOKS:
            if subprocess.run(["iptables", "-w", "-C", hook, "-j", chain], capture_output=True).returncode != 0:
                _run("iptables", "-w", "-I", hook, "1", "-j", chain)

    def _remove_guard(self) -> None:
        for hook, chain in nc.GUARD_HOOKS:
            while subprocess.run(["iptables", "-w", "-D", hook, "-j", chain], capture_output=True).returncode == 0:
                pass
        for chain in list(self.state.chains):
            subprocess.run(["iptables", "-w", "-F", chain], capture_output=True)
            subprocess.run(["iptables", "-w", "-X", chain], capture_output=True)
            self.state.chains.remove(chain)

    # ----------------------------------------------------------------------------------- processes
    def _save(self) -> None:
        self.state.save(self.paths.state_file)

    def _alive(self, name: str) -> bool:
        pid = self.state.pids.get(name)
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.paths.logs / f"{name}.log", "a")  # noqa: SIM115 - handed to the child process
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        self.state.pids[name] = proc.pid
        self._save()

    def _stop_process(self, name: str, grace: float = 10) -> None:
        pid = self.state.pids.get(name)
        if not pid:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._alive(name) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        self.state.pids.pop(name, None)
        self._save()

    def _fail(self, what: str, log: str) -> ClusterError:
        tail = ""
        path = self.paths.logs / f"{log}.log"
        if path.exists():
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-15:])
        return ClusterError(f"{what}; log {path}:\n{tail}")

    # ----------------------------------------------------------------------------------- components
    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return _run("ctr", "--address", str(self.paths.containerd_socket), "-n", "k8s.io", *args, check=check,
                    timeout=timeout)

    def _start_containerd(self) -> None:
        if self._alive("containerd"):
            return
        p = self.paths
        for d in (p.containerd_root, p.containerd_state, p.cni_conf_dir, p.cni_data_dir, p.runc_root):
            d.mkdir(parents=True, exist_ok=True)
        p.containerd_config.write_text(nc.containerd_config(p))
        (p.cni_conf_dir / "10-recserve.conflist").write_text(json.dumps(nc.cni_conflist(self.net, p), indent=2))
        p.containerd_socket.unlink(missing_ok=True)
        self._spawn("containerd", ["containerd", "--config", str(p.containerd_config)], env=nc.containerd_env())

        def ready() -> bool:
            if not self._alive("containerd"):
                raise self._fail("containerd exited during start", "containerd")
            return p.containerd_socket.exists() and bool(self.ctr("version", check=False, timeout=10))

        self._wait(ready, 60, "containerd to answer", "containerd")

    def _wait(self, check: Any, timeout: float, what: str, log: str) -> None:
        """Poll `check` until true; a ClusterError from it (a component exited) ends the wait at once."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except ClusterError:
                raise
            except Exception:
                pass
            if time.monotonic() >= deadline:
                raise self._fail(f"timed out after {timeout}s waiting for {what}", log)
            time.sleep(0.5)

    def load_images(self) -> None:
        """Import the locally built images (recserve_cluster.images) into the node's containerd."""
        from . import images

        if not images.archives():
            _log("warning: no images are built yet (`make images`); pods on the real node will not start")
            return
        images.load(str(self.paths.containerd_socket))

    def _start_kubelet(self, cluster: Cluster) -> None:
        if self._alive("kubelet"):
            return
        p, net = self.paths, self.net
        pki = cluster.kubeconfig.parent / "pki"
        for d in (p.kubelet_root, p.pod_logs):
            d.mkdir(parents=True, exist_ok=True)
        for ctrl in self._cgroup_controllers():
            (CGROUP_FS / ctrl / nc.CGROUP_ROOT).mkdir(exist_ok=True)
        p.resolv_conf.write_text(f"nameserver {net.dns_service_ip}\n")
        p.kubelet_config.write_text(yaml.safe_dump(nc.kubelet_config(net, p, pki / "ca.crt"), sort_keys=False))
        kubelet = str(tools.resolve(_tool("kubelet")))
        spawned = datetime.now(UTC)
        self._spawn("kubelet", [kubelet, *nc.kubelet_args(net, p, cluster.kubeconfig)])

        def registered() -> bool:
            # The Node object outlives a stopped kubelet (and stays Ready for the grace period), so only a
            # lease renewed by this kubelet since it started proves it registered.
            if not self._alive("kubelet"):
                raise self._fail("kubelet exited during start", "kubelet")
            out = cluster.kubectl("get", "lease", nc.NODE_NAME, "-n", "kube-node-lease", "-o",
                                  "jsonpath={.spec.renewTime}", check=False, timeout=10)
            return out.returncode == 0 and _renewed_since(out.stdout.strip(), spawned)

        self._wait(registered, 90, f"node {nc.NODE_NAME} to register", "kubelet")

    def _advertise_gpus(self, cluster: Cluster) -> None:
        """Simulated nvidia.com/gpu capacity (no device plugin): the scheduler and kubelet admit GPU pods."""
        path = "/status/capacity/nvidia.com~1gpu"
        patch = [{"op": "add", "path": path, "value": str(nc.REAL_NODE.gpus)}]
        cluster.kubectl("patch", "node", nc.NODE_NAME, "--subresource=status", "--type=json", "-p", json.dumps(patch))

        def ready() -> bool:
            if not self._alive("kubelet"):
                raise self._fail("kubelet exited during start", "kubelet")
            node = json.loads(cluster.kubectl("get", "node", nc.NODE_NAME, "-o", "json").stdout)
            alloc = node["status"].get("allocatable", {}).get("nvidia.com/gpu")
            conds = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
            return alloc == str(nc.REAL_NODE.gpus) and conds.get("Ready") == "True"

        self._wait(ready, 120, f"node {nc.NODE_NAME} Ready with {nc.REAL_NODE.gpus} simulated GPUs", "kubelet")

    def _start_kube_proxy(self, cluster: Cluster) -> None:
        if self._alive("kube-proxy"):
            return
        self.paths.kube_proxy_config.write_text(
            yaml.safe_dump(nc.kube_proxy_config(self.net, cluster.kubeconfig), sort_keys=False)
        )
        proxy = str(tools.resolve(_tool("kube-proxy")))
        self._spawn("kube-proxy", [proxy, f"--config={self.paths.kube_proxy_config}", "--v=1"])

        def synced() -> bool:
            if not self._alive("kube-proxy"):
                raise self._fail("kube-proxy exited during start", "kube-proxy")
            rules = _run("iptables", "-w", "-t", "nat", "-S", "KUBE-SERVICES", check=False)
            return self.net.api_service_ip in rules

        self._wait(synced, 60, "kube-proxy to program the kubernetes Service", "kube-proxy")

    def _start_coredns(self, cluster: Cluster) -> None:
        from . import images

        # CoreDNS is built from its Go module (tools), alone in a scratch image; unchanged inputs rebuild nothing.
        binary = tools.resolve(_tool("coredns"))
        image = images.scratch_image(nc.COREDNS_IMAGE, {binary: "/coredns"}, ["/coredns"], name="coredns")
        images.build([image])
        images.load(str(self.paths.containerd_socket), [image.name])
        cluster.apply_objects(nc.coredns_objects(self.net))
        cluster.kubectl("rollout", "status", "deployment/coredns", "-n", "kube-system", "--timeout=120s", timeout=150)

    def start(self, cluster: Cluster) -> None:
        """containerd → images → kubelet → simulated GPUs → kube-proxy → CoreDNS, each waited for."""
        started = time.monotonic()
        self._reload()
        self._start_containerd()
        self.load_images()
        self._start_kubelet(cluster)
        self._advertise_gpus(cluster)
        self._start_kube_proxy(cluster)
        self._start_coredns(cluster)
        _log(f"real node {nc.NODE_NAME} Ready with CoreDNS in {time.monotonic() - started:.1f}s "
             f"(pods {self.net.pod_cidr}, Services {self.net.service_cidr}, logs {self.paths.logs})")

    def running(self) -> bool:
        self._reload()
        return all(self._alive(n) for n in ("containerd", "kubelet", "kube-proxy"))

    # ----------------------------------------------------------------------------------- fault injection
    def remove(self, cluster: Cluster, timeout: float = 60) -> None:
        """Take the node out of the cluster as a failed machine leaves it: its kubelet stops (containers keep
        running, unmanaged, until it returns) and its Node object is deleted, so the control plane deletes the
        pods bound to it and their controllers create new ones, which wait for a node that fits."""
        self._reload()
        self._stop_process("kubelet")
        cluster.kubectl("delete", "node", nc.NODE_NAME, "--ignore-not-found", f"--timeout={int(timeout)}s",
                        timeout=timeout + 10)  # fmt: skip

    def readd(self, cluster: Cluster) -> None:
        """Bring a removed node back: the kubelet registers the Node again (labels from its flags), its simulated
        GPUs are advertised, and it removes the containers of pods that no longer exist."""
        self._reload()
        self._start_kubelet(cluster)
        self._advertise_gpus(cluster)

    # ----------------------------------------------------------------------------------- teardown
    def stop(self) -> None:
        """Stop every process, container, mount, link and rule this node created; restore the sysctls."""
        self._reload()
        if not self.paths.root.exists() and not self.state.pids and not self._our_pids():
            return
        _log(f"stopping real node {nc.NODE_NAME}")
        self._stop_process("kube-proxy")
        self._stop_process("kubelet")
        if self._alive("containerd"):
            self._remove_containers()
        self._stop_process("containerd")
        self._kill_leftovers()
        self._unmount_all()
        self._cleanup_iptables()
        self._remove_links()
        for key, old in list(self.state.sysctls.items()):
            with contextlib.suppress(OSError):
                Path(key).write_text(old)
            self.state.sysctls.pop(key)
        self._remove_guard()
        self._remove_pod_log_links()
        self._remove_cgroups()
        shutil.rmtree(self.paths.root, ignore_errors=True)

    def _remove_containers(self) -> None:
        for line in self.ctr("tasks", "ls", check=False).splitlines()[1:]:
            task = line.split()[0] if line.split() else ""
            if task:
                self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False, timeout=20)
        for line in self.ctr("tasks", "ls", check=False).splitlines()[1:]:
            if line.split():
                self.ctr("tasks", "delete", "--force", line.split()[0], check=False, timeout=20)
        containers = [ln.split()[0] for ln in self.ctr("containers", "ls", "-q", check=False).splitlines() if ln]
        for cid in containers:
            self.ctr("containers", "delete", cid, check=False, timeout=20)

    def _our_pids(self) -> set[int]:
        """Every process whose command line names the node's folder (containerd, kubelet, kube-proxy, shims)
        and every process in the node's cgroups: found from the host, not from a state file that may be stale."""
        sock = str(self.paths.root).encode() + b"/"
        found: set[int] = set()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    argv = (proc / "cmdline").read_bytes().split(b"\0")
                    if Path(argv[0].decode()).name in NODE_BINARIES and any(sock in a for a in argv):
                        found.add(int(proc.name))
        for ctrl in self._cgroup_controllers():
            base = CGROUP_FS / ctrl / nc.CGROUP_ROOT
            if base.is_dir():
                for procs in base.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError, ValueError):
                        found.update(int(x) for x in procs.read_text().split())
        found.discard(os.getpid())
        return found

    def _kill_leftovers(self) -> None:
        for _ in range(20):
            pids = self._our_pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.25)
        _log(f"warning: processes still in the node's cgroups: {sorted(self._our_pids())}")

    def _mounts_under(self, roots: tuple[Path, ...]) -> list[str]:
        prefixes = tuple(str(r) for r in roots)
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefixes):
                points.append(point)
        return points

    def _unmount_all(self) -> None:
        roots = (self.paths.root, self.paths.containerd_root)
        for _ in range(5):
            points = self._mounts_under(roots)
            if not points:
                return
            for point in sorted(points, key=len, reverse=True):
                if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "--lazy", point], capture_output=True)
        left = self._mounts_under(roots)
        if left:
            _log(f"warning: mounts left under the node folder: {left[:5]}")

    def _cleanup_iptables(self) -> None:
        with contextlib.suppress(ClusterError):
            proxy = str(tools.resolve(_tool("kube-proxy"), build=False))
            subprocess.run([proxy, "--cleanup"], capture_output=True, timeout=60)
        # The kubelet's canary chains and the portmap plugin's chains (created only by this node).
        for binary in ("iptables", "ip6tables"):
            if not shutil.which(binary):
                continue
            for table in ("filter", "nat", "mangle"):
                listing = subprocess.run([binary, "-w", "-t", table, "-S"], capture_output=True, text=True).stdout
                chains = [ln.split()[1] for ln in listing.splitlines() if ln.startswith("-N ")]
                ours = [c for c in chains if c.startswith(("KUBE-", "CNI-HOSTPORT-"))]
                for rule in listing.splitlines():
                    if rule.startswith("-A ") and any(f"-j {c}" in rule for c in ours):
                        subprocess.run([binary, "-w", "-t", table, *rule.replace("-A ", "-D ", 1).split()],
                                       capture_output=True)
                for chain in ours:
                    subprocess.run([binary, "-w", "-t", table, "-F", chain], capture_output=True)
                for chain in ours:
                    subprocess.run([binary, "-w", "-t", table, "-X", chain], capture_output=True)

    def _remove_links(self) -> None:
        br = self.net.bridge
        if Path(f"/sys/class/net/{br}").exists():
            for port in (Path(f"/sys/class/net/{br}/brif").iterdir() if Path(f"/sys/class/net/{br}/brif").exists()
                         else []):
                subprocess.run(["ip", "link", "delete", port.name], capture_output=True)
            if self.state.bridge or self.state.route:
                subprocess.run(["ip", "link", "delete", br], capture_output=True)
        self.state.bridge = self.state.route = False
        self._save()

    def _remove_pod_log_links(self) -> None:
        links = Path("/var/log/containers")
        if not links.is_dir():
            return
        for link in links.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(str(self.paths.pod_logs)):
                    link.unlink()

    @staticmethod
    def _cgroup_controllers() -> list[str]:
        return sorted(p.name for p in CGROUP_FS.iterdir() if p.is_dir()) if CGROUP_FS.is_dir() else []

    def _remove_cgroups(self) -> None:
        for ctrl in self._cgroup_controllers():
            base = CGROUP_FS / ctrl / nc.CGROUP_ROOT
            if not base.is_dir():
                continue
            dirs = sorted((d for d in base.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True)
            for d in [*dirs, base]:
                with contextlib.suppress(OSError):
                    d.rmdir()


def leftovers(node: RealNode) -> dict[str, list[str]]:
    """What a stopped node would have left behind (for tests and `down`): processes, links, rules, mounts."""
    rules = []
    for binary in ("iptables", "ip6tables"):
        if shutil.which(binary):
            for table in ("filter", "nat", "mangle"):
                out = subprocess.run([binary, "-w", "-t", table, "-S"], capture_output=True, text=True).stdout
                rules += [f"{binary} {table}: {ln}" for ln in out.splitlines()
                          if "KUBE-" in ln or "CNI-" in ln or "RECSERVE-" in ln]
    links = [ln.split(":")[1].strip().split("@")[0] for ln in _run("ip", "-o", "link", "show", check=False).splitlines()
             if node.net.bridge in ln or "veth" in ln]
    cgroups = [str(CGROUP_FS / c / nc.CGROUP_ROOT) for c in node._cgroup_controllers()
               if (CGROUP_FS / c / nc.CGROUP_ROOT).exists()]
    return {
        "processes": [str(p) for p in sorted(node._our_pids())] + [
            f"{n}={p}" for n, p in node.state.pids.items() if node._alive(n)],
        "links": links,
        "rules": rules,
        "mounts": node._mounts_under((node.paths.root, node.paths.containerd_root)),
        "cgroups": cgroups,
        "routes": [r for r in _run("ip", "-4", "route", "show", check=False).splitlines() if node.net.bridge in r],
    }


def _renewed_since(renew_time: str, since: datetime) -> bool:
    """Whether a Lease's spec.renewTime (RFC 3339, microseconds) is at or after `since`."""
    if not renew_time:
        return False
    try:
        renewed = datetime.fromisoformat(renew_time.replace("Z", "+00:00"))
    except ValueError:
        return False
    return renewed >= since


def _tool(name: str) -> tools.Tool:
    return next(t for t in tools.TOOLS if t.name == name)


def _rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def resident_memory(node: RealNode, control_plane_pids: dict[str, int]) -> dict[str, int]:
    """Resident bytes per component: control-plane processes, the node's daemons, shims, and pods (by cgroup)."""
    usage = {name: _rss_bytes(pid) for name, pid in control_plane_pids.items()}
    usage.update({name: _rss_bytes(pid) for name, pid in node.state.pids.items()})
    sock = str(node.paths.containerd_socket).encode()
    shims = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if sock in (proc / "cmdline").read_bytes() and int(proc.name) not in node.state.pids.values():
                    shims += _rss_bytes(int(proc.name))
    usage["containerd-shims"] = shims
    pods = CGROUP_FS / "memory" / nc.CGROUP_ROOT
    pod_pids: set[int] = set()
    if pods.is_dir():
        for procs in pods.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pod_pids.update(int(x) for x in procs.read_text().split())
    usage["pods"] = sum(_rss_bytes(p) for p in pod_pids)
    return usage
