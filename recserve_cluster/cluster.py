"""Cluster providers: kwok (real control plane as processes), kind, or an existing cluster from KUBECONFIG."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

from . import nodeconfig as nc
from . import tools
from .errors import ClusterError
from .nodes import DEFAULT_NODES, KWOK_NODE_ANNOTATION, build_node
from .realnode import RealNode, preflight
from .waiting import wait_for

CLUSTER_NAME = os.environ.get("RECSERVE_CLUSTER_NAME", "recserve")
PROVIDER_ENV = "RECSERVE_CLUSTER_PROVIDER"
REAL_NODE_ENV = "RECSERVE_REAL_NODE"


def real_node_enabled() -> bool:
    """The kwok provider runs the real node unless RECSERVE_REAL_NODE=0 asks for the kwok-only cluster."""
    return os.environ.get(REAL_NODE_ENV, "1") != "0"


def _log(msg: str) -> None:
    print(f"[recserve-cluster] {msg}", file=sys.stderr, flush=True)


@dataclass
class Cluster:
    """A reachable cluster: where its kubeconfig is and which tools talk to it."""

    provider: str
    kubeconfig: Path
    bins: dict[str, Path] = field(default_factory=dict)

    @property
    def kubectl_path(self) -> str:
        return str(self.bins.get("kubectl") or shutil.which("kubectl") or "kubectl")

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses (operator, helm) that must talk to this cluster."""
        path = os.pathsep.join(sorted({str(p.parent) for p in self.bins.values()}))
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": path + os.pathsep + os.environ["PATH"]}

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.kubectl_path, "--kubeconfig", str(self.kubeconfig), *args]
        try:
            out = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=self.env)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"kubectl {' '.join(args)} timed out after {timeout}s") from exc
        if check and out.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed (exit {out.returncode}): {out.stderr.strip()}")
        return out

    def apply_objects(self, objects: list[dict[str, object]]) -> None:
        doc = yaml.safe_dump_all(objects, sort_keys=False)
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=recserve-cluster", "-f", "-",
                     input=doc)


# One instance of each needs no leader election; with it, an API server or etcd restart longer than the renew
# deadline makes both exit ("leaderelection lost"), and nothing here restarts them as a kubelet restarts static pods
# (tests/integration/test_faults_control_plane.py restarts both). In the config file, not as --extra-args: kwokctl
# 0.8.0 indexes its patches by flag position and panics when a component's flags are not the first ones.
COMPONENT_PATCHES = [
    {"name": name, "extraArgs": [{"key": "leader-elect", "value": "false"}]}
    for name in ("kube-controller-manager", "kube-scheduler")
]
CONTROL_PLANE_COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok-controller")


@dataclass(frozen=True)
class ComponentProcess:
    """How a running process was started (command line, working directory, environment): enough to start it
    again exactly so, on the same ports with the same data directory."""

    argv: tuple[str, ...]
    cwd: Path
    env: dict[str, str]

    @classmethod
    def of(cls, pid: int, proc: Path = Path("/proc")) -> ComponentProcess:
        base = proc / str(pid)
        try:
            raw_argv = (base / "cmdline").read_bytes()
            raw_env = (base / "environ").read_bytes()
            cwd = Path(os.readlink(base / "cwd"))
        except OSError as exc:
            raise ClusterError(f"cannot read how process {pid} was started: {exc}") from exc
        argv = tuple(a.decode() for a in raw_argv.split(b"\0") if a)
        if not argv:
            raise ClusterError(f"process {pid} has no command line (it exited, or is a zombie)")
        pairs = (item.decode().split("=", 1) for item in raw_env.split(b"\0") if b"=" in item)
        return cls(argv, cwd, {k: v for k, v in pairs})


def _process_gone(pid: int, proc: Path = Path("/proc")) -> bool:
    """Exited (a zombie counts: it holds no ports or files any more)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _terminate(pid: int, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once the process is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: _process_gone(pid), grace, 0.1, f"process {pid} to exit")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _process_gone(pid), 30, f"process {pid} to exit after SIGKILL", 0.1)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


class Provider(Protocol):
    """How a test cluster is obtained and released."""

    name: str

    def up(self) -> Cluster: ...

    def down(self) -> None: ...

    def current(self) -> Cluster | None: ...


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _workdir() -> Path:
    return Path(os.environ.get("KWOK_WORKDIR") or tools.cache_dir() / "kwok")


class KwokProvider:
    """kube-apiserver, etcd, controller-manager, scheduler and kwok as local processes (kwokctl binary runtime)."""

    name = "kwok"

    def __init__(self, cluster_name: str = CLUSTER_NAME, real_node: bool | None = None) -> None:
        self.cluster_name = cluster_name
        self.real_node = real_node_enabled() if real_node is None else real_node
        self.node = RealNode(cluster_name)

    @property
    def cluster_dir(self) -> Path:
        return _workdir() / "clusters" / self.cluster_name

    @property
    def kubeconfig(self) -> Path:
        return self.cluster_dir / "kubeconfig.yaml"

    def _env(self, bins: dict[str, Path]) -> dict[str, str]:
        # kwokctl looks up kubectl on PATH and would try to download one otherwise.
        path = os.pathsep.join(sorted({str(p.parent) for p in bins.values()}))
        return {**os.environ, "KWOK_WORKDIR": str(_workdir()), "PATH": path + os.pathsep + os.environ.get("PATH", "")}

    def current(self) -> Cluster | None:
        if not self.kubeconfig.exists():
            return None
        bins = tools.provision(build=False)
        cluster = Cluster(self.name, self.kubeconfig, bins)
        probe = cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
        return cluster if probe.returncode == 0 else None

    def _server(self) -> tuple[str, int]:
        server = yaml.safe_load(self.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        host, port = server.rsplit("//", 1)[1].rsplit(":", 1)
        return host, int(port)

    def _has_node_endpoint(self, cluster: Cluster) -> bool:
        """Whether this control plane was started for the real node (pods can reach its apiserver)."""
        out = cluster.kubectl("get", "endpointslices", "-n", "default", "-l", "kubernetes.io/service-name=kubernetes",
                              "-o", "jsonpath={.items[*].endpoints[*].addresses[*]}", check=False)
        return self.node.net.node_ip in out.stdout.split()

    def up(self) -> Cluster:
        bins = tools.provision()
        if self.real_node and not self.node.claim():
            _log(f"the real node is held by cluster {self.node.owner()!r}; starting {self.cluster_name!r} kwok-only")
            self.real_node = False
        if self.real_node:
            preflight()
        existing = self.current()
        if existing and self.real_node and not self._has_node_endpoint(existing):
            _log(f"cluster {self.cluster_name!r} runs without the real node; recreating it with {nc.NODE_NAME}")
            self._delete(bins)
            existing = None
        if existing:
            _log(f"cluster {self.cluster_name!r} already running (kubeconfig {self.kubeconfig})")
            prepare(existing)
            if self.real_node and not self.node.running():
                self._start_node(existing)
            elif self.real_node:
                self._install_addons(existing)  # idempotent: rebuilds and rewrites nothing when all is there
            return existing
        if self.cluster_dir.exists():
            # A stopped or half-created cluster: remove it so creation starts clean.
            self._delete(bins)
        requested = os.environ.get("RECSERVE_APISERVER_PORT")
        port = int(requested) if requested else _free_port()
        if _port_taken(port):
            raise ClusterError(
                f"port {port} for kube-apiserver is already in use; free it or set RECSERVE_APISERVER_PORT"
            )
        try:
            cluster = self._create(bins, port)
            if self.real_node:
                self._start_node(cluster)
        except BaseException:
            # Nothing is left half-started: a failure anywhere stops what was started so far.
            _log("cluster start failed; stopping what was started")
            self.down()
            raise
        return cluster

    # ------------------------------------------------------------------ fault injection (tests)
    def _pidfile(self, component: str) -> Path:
        if component not in CONTROL_PLANE_COMPONENTS:
            raise ClusterError(f"unknown control-plane component {component!r}; one of {CONTROL_PLANE_COMPONENTS}")
        return self.cluster_dir / "pids" / f"{component}.pid"

    def component_pid(self, component: str) -> int:
        pidfile = self._pidfile(component)
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError) as exc:
            raise ClusterError(f"no pid recorded for {component} in {pidfile}: {exc}") from exc

    def stop_component(self, component: str, grace: float = 30) -> ComponentProcess:
        """Stop one control-plane process (SIGTERM, SIGKILL after `grace` s); returns how to start it again."""
        pid = self.component_pid(component)
        how = ComponentProcess.of(pid)
        _log(f"stopping {component} (pid {pid})")
        _terminate(pid, grace)
        return how

    def start_component(self, component: str, how: ComponentProcess) -> int:
        """Start a component stopped by stop_component as kwokctl did: detached, logging to its log file, its
        pid in its pid file (so `kwokctl delete cluster` stops it)."""
        logs = self.cluster_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{component}.log", "ab") as log:
            proc = subprocess.Popen(list(how.argv), cwd=how.cwd, env=how.env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self._pidfile(component).write_text(str(proc.pid))
        _log(f"started {component} again (pid {proc.pid})")
        return proc.pid

    def restart_component(self, cluster: Cluster, component: str, timeout: float = 120) -> int:
        """Stop and start one control-plane process in place (same command line, ports, data directory), then
        wait until the API server is ready (its /readyz checks etcd too). Returns the new pid."""
        how = self.stop_component(component)
        pid = self.start_component(component, how)
        self.wait_ready(cluster, timeout)
        return pid

    def wait_ready(self, cluster: Cluster, timeout: float = 120) -> None:
        def ready() -> bool:
            return cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=10).stdout.strip() == "ok"

        wait_until(ready, timeout, "the API server to be ready (/readyz)")

    def _start_node(self, cluster: Cluster) -> None:
        try:
            self.node.setup_network(self._server()[1])
            self.node.start(cluster)
        except BaseException:
            # Nothing half-started: the node's processes, containers, links and rules go again.
            _log(f"starting {nc.NODE_NAME} failed; stopping what was started")
            self.node.stop()
            raise
        self._install_addons(cluster)

    def _install_addons(self, cluster: Cluster) -> None:
        """Prometheus Operator + Prometheus, prometheus-adapter and metrics-server, as pods on the real node."""
        from . import addons

        addons.install(cluster, str(self.node.paths.containerd_socket))

    def _create(self, bins: dict[str, Path], port: int) -> Cluster:
        bind = "127.0.0.1"
        extra: list[str] = [
            # kwok simulates only the annotated nodes; the real node belongs to its kubelet.
            "kwok-controller=manage-all-nodes=false",
            f"kwok-controller=manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            "kube-apiserver=advertise-address=127.0.0.1",
        ]
        # disableQPSLimits: kube-controller-manager's and kube-scheduler's clients unthrottled (kube-api-qps 5000)
        # and the API server without in-flight limits or priority-and-fairness queues, kwok's setting for scale
        # tests. With the defaults every controller's client is limited to 20 requests/s: the deployment controller
        # then creates ~5 ReplicaSets/s and 500 Deployments need ~120 s to come up whoever creates them
        # (bench/operator/bench.py --floor), so the operator benchmark would measure those limits instead.
        options: dict[str, object] = {"bindAddress": bind, "kubectlBinary": str(bins["kubectl"]),
                                      "disableQPSLimits": True}  # fmt: skip
        if self.real_node:
            net = self.node.net
            # Pods reach the apiserver through the `kubernetes` Service, whose endpoint is the advertised
            # address: the node address on the bridge (loopback would be each pod's own). kwokctl wires its
            # components together over 127.0.0.1, so only the apiserver listens on all IPv4 addresses;
            # the node's guard drops its port on every interface but loopback and the pods' bridge.
            self.node.setup_network(port)
            pki = self.cluster_dir / "pki"
            extra = [
                *extra[:2],
                "kube-apiserver=bind-address=0.0.0.0",
                f"kube-apiserver=advertise-address={net.node_ip}",
                # kwokctl prefers node host names, which only the cluster's own DNS could resolve.
                "kube-apiserver=kubelet-preferred-address-types=InternalIP,Hostname",
                f"kube-apiserver=kubelet-client-certificate={pki / 'admin.crt'}",
                f"kube-apiserver=kubelet-client-key={pki / 'admin.key'}",
                # Aggregated APIs (prometheus-adapter, metrics-server) verify the front proxy's identity and
                # take the requesting user from its headers instead of trusting every client certificate.
                f"kube-apiserver=requestheader-client-ca-file={pki / 'ca.crt'}",
                "kube-apiserver=requestheader-allowed-names=kwok-admin",
                "kube-apiserver=requestheader-username-headers=X-Remote-User",
                "kube-apiserver=requestheader-group-headers=X-Remote-Group",
                "kube-apiserver=requestheader-extra-headers-prefix=X-Remote-Extra-",
            ]
            options["kubeApiserverCertSANs"] = [net.api_service_ip, net.node_ip]
        config = _workdir() / f"{self.cluster_name}-kwokctl.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            yaml.safe_dump({"apiVersion": "config.kwok.x-k8s.io/v1alpha1", "kind": "KwokctlConfiguration",
                            "options": options, "componentsPatches": COMPONENT_PATCHES})
        )
        _log(f"creating cluster {self.cluster_name!r} (kube-apiserver on {bind}:{port})")
        start = time.monotonic()
        cmd = [
            str(bins["kwokctl"]), "create", "cluster", "--name", self.cluster_name, "--runtime", "binary",
            "--config", str(config), "--kubeconfig", "", "--wait", "3m",
            "--kube-apiserver-port", str(port),
            "--kube-apiserver-binary", str(bins["kube-apiserver"]),
            "--kube-controller-manager-binary", str(bins["kube-controller-manager"]),
            "--kube-scheduler-binary", str(bins["kube-scheduler"]),
            "--etcd-binary", str(bins["etcd"]),
            "--kwok-controller-binary", str(bins["kwok"]),
            # The default /24 runs out at ~250 Services; the operator benchmark creates hundreds.
            "--extra-args", "kube-apiserver=service-cluster-ip-range=10.96.0.0/16",
            "--extra-args", "kube-controller-manager=service-cluster-ip-range=10.96.0.0/16",
        ]
        for arg in extra:
            cmd += ["--extra-args", arg]
        out = subprocess.run(cmd, env=self._env(bins), capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            logs = self.cluster_dir / "logs"
            raise ClusterError(
                f"kwokctl create cluster failed (exit {out.returncode}); component logs in {logs}:\n"
                + "\n".join((out.stdout + out.stderr).strip().splitlines()[-20:])
            )
        cluster = Cluster(self.name, self.kubeconfig, bins)
        _log(f"control plane up in {time.monotonic() - start:.1f}s")
        prepare(cluster)
        return cluster

    def _delete(self, bins: dict[str, Path]) -> None:
        subprocess.run(
            [str(bins["kwokctl"]), "delete", "cluster", "--name", self.cluster_name],
            env=self._env(bins), capture_output=True, text=True, timeout=180,
        )
        shutil.rmtree(self.cluster_dir, ignore_errors=True)

    def down(self) -> None:
        bins = tools.provision(build=False)
        # The node first: its kubelet and kube-proxy would otherwise retry against a vanished apiserver.
        if self.node.owner() in (None, self.cluster_name):
            self.node.stop()
            self.node.release()
        if self.cluster_dir.exists():
            _log(f"deleting cluster {self.cluster_name!r}")
            self._delete(bins)


class _SideKwok:
    """A local kwok controller that manages only annotated fake nodes in someone else's cluster."""

    def __init__(self, kubeconfig: Path) -> None:
        self.pidfile = tools.cache_dir() / "kwok-side" / f"{abs(hash(str(kubeconfig)))}.pid"
        self.kubeconfig = kubeconfig

    def start(self, kwok: Path) -> None:
        self.stop()
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.pidfile.with_suffix(".log"), "w")  # noqa: SIM115 - handed to the child process
        proc = subprocess.Popen(
            [str(kwok), "--kubeconfig", str(self.kubeconfig), "--manage-all-nodes=false",
             f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake", "--server-address=127.0.0.1:0"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pidfile.write_text(str(proc.pid))

    def stop(self) -> None:
        if self.pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.killpg(int(self.pidfile.read_text()), signal.SIGTERM)
            self.pidfile.unlink(missing_ok=True)


class ExistingProvider:
    """Any cluster reachable through KUBECONFIG; fake GPU nodes are added only when RECSERVE_FAKE_GPU_NODES=1."""

    name = "existing"

    def __init__(self) -> None:
        kc = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        self._kubeconfig = Path(kc.split(os.pathsep)[0])

    def current(self) -> Cluster | None:
        if not self._kubeconfig.exists():
            return None
        return Cluster(self.name, self._kubeconfig, _optional_bins())

    def up(self) -> Cluster:
        cluster = self.current()
        if cluster is None:
            raise ClusterError(
                f"provider 'existing' needs a kubeconfig: {self._kubeconfig} does not exist (set KUBECONFIG)"
            )
        probe = cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=15)
        if probe.returncode != 0:
            raise ClusterError(f"cluster in {self._kubeconfig} is not reachable: {probe.stderr.strip()}")
        if os.environ.get("RECSERVE_FAKE_GPU_NODES") == "1":
            _SideKwok(self._kubeconfig).start(tools.resolve(_tool("kwok")))
        prepare(cluster, add_nodes=os.environ.get("RECSERVE_FAKE_GPU_NODES") == "1")
        return cluster

    def down(self) -> None:
        # Never delete a cluster we did not create; only stop our side kwok controller and nodes.
        cluster = self.current()
        if cluster and os.environ.get("RECSERVE_FAKE_GPU_NODES") == "1":
            for node in DEFAULT_NODES:
                cluster.kubectl("delete", "node", node.name, "--ignore-not-found", check=False)
            _SideKwok(self._kubeconfig).stop()


class KindProvider:
    """A kind cluster (needs a container engine) with kwok-managed fake GPU nodes beside the real kind node."""

    name = "kind"

    def __init__(self, cluster_name: str = CLUSTER_NAME) -> None:
        self.cluster_name = cluster_name
        self._kubeconfig = tools.cache_dir() / "kind" / f"{cluster_name}.kubeconfig"

    def _kind(self) -> str:
        kind = shutil.which("kind")
        if not kind:
            raise ClusterError("provider 'kind' needs the kind binary on PATH and a working container engine")
        return kind

    def current(self) -> Cluster | None:
        if not self._kubeconfig.exists():
            return None
        return Cluster(self.name, self._kubeconfig, _optional_bins())

    def up(self) -> Cluster:
        kind = self._kind()
        clusters = subprocess.run([kind, "get", "clusters"], capture_output=True, text=True).stdout.split()
        self._kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        if self.cluster_name not in clusters:
            _log(f"creating kind cluster {self.cluster_name!r}")
            out = subprocess.run([kind, "create", "cluster", "--name", self.cluster_name, "--kubeconfig",
                                  str(self._kubeconfig), "--wait", "3m"], capture_output=True, text=True)
            if out.returncode != 0:
                raise ClusterError(f"kind create cluster failed: {out.stderr.strip()[-2000:]}")
        else:
            kc = subprocess.run([kind, "get", "kubeconfig", "--name", self.cluster_name], capture_output=True,
                                text=True, check=True)
            self._kubeconfig.write_text(kc.stdout)
        _SideKwok(self._kubeconfig).start(tools.resolve(_tool("kwok")))
        cluster = Cluster(self.name, self._kubeconfig, _optional_bins())
        prepare(cluster)
        return cluster

    def down(self) -> None:
        _SideKwok(self._kubeconfig).stop()
        subprocess.run([self._kind(), "delete", "cluster", "--name", self.cluster_name], capture_output=True)
        self._kubeconfig.unlink(missing_ok=True)


def _tool(name: str) -> tools.Tool:
    return next(t for t in tools.TOOLS if t.name == name)


def _optional_bins() -> dict[str, Path]:
    """Pinned kubectl and helm when provisioned; on other providers PATH versions are acceptable."""
    found: dict[str, Path] = {}
    for name in ("kubectl", "helm"):
        try:
            found[name] = tools.resolve(_tool(name), build=False)
        except ClusterError:
            on_path = shutil.which(name)
            if on_path:
                found[name] = Path(on_path)
    return found


PROVIDERS: dict[str, type[KwokProvider] | type[KindProvider] | type[ExistingProvider]] = {
    "kwok": KwokProvider,
    "kind": KindProvider,
    "existing": ExistingProvider,
}


def get_provider(name: str | None = None) -> KwokProvider | KindProvider | ExistingProvider:
    """The provider named by RECSERVE_CLUSTER_PROVIDER (default kwok)."""
    chosen = name or os.environ.get(PROVIDER_ENV, "kwok")
    if chosen not in PROVIDERS:
        raise ClusterError(f"unknown {PROVIDER_ENV}={chosen!r}; choose one of {', '.join(PROVIDERS)}")
    return PROVIDERS[chosen]()


def addon_crd_files() -> list[Path]:
    """Gateway API standard CRDs and Prometheus Operator ServiceMonitor/PodMonitor CRDs, from their Go modules."""
    gw = tools.go_module_dir("sigs.k8s.io/gateway-api", tools.GATEWAY_API_VERSION) / "config/crd/standard"
    po = tools.go_module_dir("github.com/prometheus-operator/prometheus-operator", tools.PROMETHEUS_OPERATOR_VERSION)
    files = sorted(p for p in gw.glob("gateway.networking.k8s.io_*.yaml") if "vap_" not in p.name)
    files += [po / "example/prometheus-operator-crd" / f"monitoring.coreos.com_{k}.yaml"
              for k in ("servicemonitors", "podmonitors")]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ClusterError(f"add-on CRD files missing from the Go modules: {missing}")
    return files


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 1.0) -> None:
    try:
        wait_for(check, timeout, interval, what)
    except TimeoutError as exc:
        raise ClusterError(str(exc)) from None


def prepare(cluster: Cluster, add_nodes: bool = True) -> None:
    """Idempotently add the simulated nodes and the add-on CRDs, then wait for them to be usable."""
    if add_nodes:
        cluster.apply_objects([build_node(n) for n in DEFAULT_NODES])
    # Large CRDs (HTTPRoute, ServiceMonitor) exceed the client-side apply annotation limit: server-side.
    crds: list[str] = []
    for f in addon_crd_files():
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=recserve-cluster", "-f", str(f),
                        timeout=120)
        crds.append(f"crd/{yaml.safe_load(f.read_text())['metadata']['name']}")
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=120s", *crds, timeout=150)
    if add_nodes:
        names = [n.name for n in DEFAULT_NODES]

        def nodes_ready() -> bool:
            out = cluster.kubectl("get", "nodes", *names, "-o", "json", check=False)
            if out.returncode != 0:
                return False
            items = json.loads(out.stdout)["items"]
            return len(items) == len(names) and all(
                any(c["type"] == "Ready" and c["status"] == "True" for c in i["status"].get("conditions", []))
                for i in items
            )

        wait_until(nodes_ready, 120, "simulated nodes to become Ready")
    # The default ServiceAccount must exist before pods can be created in a namespace.
    wait_until(lambda: cluster.kubectl("get", "sa", "default", "-n", "default", check=False).returncode == 0, 60,
               "the default ServiceAccount")
