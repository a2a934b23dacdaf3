"""The real node's configuration as pure functions: addresses, runtime/kubelet/proxy/CNI files, guard, CoreDNS.

Everything here is data in, data out (no processes, no files), so each choice is unit-tested and the
side effects in `realnode` stay thin.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .nodes import GPU_TAINT_KEY, NodeSpec, gpu_labels

NODE_NAME = "real-0"
# Simulated GPUs on the real node: one product the kwok nodes do not have, so a product selector
# decides deterministically whether a GPU pod runs for real (NVIDIA-L4) or is only scheduled (H100/A10G).
REAL_NODE = NodeSpec(NODE_NAME, cpu="", memory="", gpus=4, gpu_product="NVIDIA-L4", gpu_memory_mib=23034)


@dataclass(frozen=True)
class Network:
    """The address plan. Every range exists only on this machine; the guard keeps it that way."""

    bridge: str = "rs-br0"
    # The node's own address lives on the bridge (this host has no dummy links): kubelet, kube-proxy and
    # the apiserver's advertised endpoint use it, and pods reach it through their default gateway.
    node_ip: str = "10.245.0.1"
    cluster_cidr: str = "10.244.0.0/16"
    pod_cidr: str = "10.244.0.0/24"
    service_cidr: str = "10.96.0.0/16"
    cluster_domain: str = "cluster.local"

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))

    @property
    def api_service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP: the first address of the Service range."""
        return str(ipaddress.ip_network(self.service_cidr).network_address + 1)

    @property
    def dns_service_ip(self) -> str:
        return str(ipaddress.ip_network(self.service_cidr).network_address + 10)


NETWORK = Network()
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
GUARD_CHAIN = "RECSERVE-GUARD"
GUARD_INPUT_CHAIN = "RECSERVE-GUARD-IN"
GUARD_FORWARD_CHAIN = "RECSERVE-GUARD-FWD"
KUBELET_PORT = 10250


@dataclass(frozen=True)
class NodePaths:
    """Where one node keeps its state: everything under one folder, so `down` can remove all of it."""

    root: Path

    @property
    def containerd_root(self) -> Path:
        # Image content and snapshots: kept across down/up as a cache (no process, mount or link lives here).
        return self.root.parent / "containerd-root"

    @property
    def volumes(self) -> Path:
        # hostPath PersistentVolumes of the tests and the demo (recserve_cluster.volumes): gone with the node.
        return self.root / "volumes"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd-state"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd.toml"

    @property
    def runc_root(self) -> Path:
        return self.root / "runc"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_data_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet.yaml"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def resolv_conf(self) -> Path:
        return self.root / "resolv.conf"

    @property
    def kube_proxy_config(self) -> Path:
        return self.root / "kube-proxy.yaml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"


# cgroup v1 controllers the kubelet's cgroupfs driver uses; pods live under <controller>/<CGROUP_ROOT>.
CGROUP_ROOT = "recserve"
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"
# Pulls must never leave the machine: containerd sends every registry request to this closed port.
NO_PULL_PROXY = "http://127.0.0.1:9"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _toml(tables: dict[str, dict[str, object]], top: dict[str, object]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, body in tables.items():
        lines += ["", f"[{name}]"] + [f"  {k} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def containerd_config(paths: NodePaths) -> str:
    """containerd 1.6 (CRI v1) for the kubelet, with every path under the node's folder."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return _toml(
        {
            "grpc": {"address": str(paths.containerd_socket)},
            "ttrpc": {"address": str(paths.containerd_socket) + ".ttrpc"},
            "metrics": {"address": ""},
            cri: {
                "sandbox_image": SANDBOX_IMAGE,
                # The host may not raise OOM scores (no CAP_SYS_RESOURCE): without this every sandbox
                # fails with "can't get final child's PID from pipe".
                "restrict_oom_score_adj": True,
                "stream_server_address": "127.0.0.1",
                "stream_server_port": "0",
                "enable_selinux": False,
                # Network namespaces under the state folder, not /var/run/netns: down can find them all.
                "netns_mounts_under_state_dir": True,
            },
            f"{cri}.containerd": {"snapshotter": "overlayfs", "default_runtime_name": "runc"},
            f"{cri}.containerd.runtimes.runc": {"runtime_type": "io.containerd.runc.v2"},
            f"{cri}.containerd.runtimes.runc.options": {"SystemdCgroup": False, "Root": str(paths.runc_root)},
            f"{cri}.cni": {"bin_dir": "/usr/lib/cni", "conf_dir": str(paths.cni_conf_dir), "max_conf_num": 1},
        },
        {
            "version": 2,
            "root": str(paths.containerd_root),
            "state": str(paths.containerd_state),
            "oom_score": 0,
            "disabled_plugins": [
                "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp",
                "io.containerd.internal.v1.tracing",
            ],
        },
    )


def containerd_env() -> dict[str, str]:
    """Registry traffic goes to a closed local port: an image that was not loaded fails fast, offline."""
    return {"HTTP_PROXY": NO_PULL_PROXY, "HTTPS_PROXY": NO_PULL_PROXY, "NO_PROXY": "", "no_proxy": ""}


def cni_conflist(net: Network, paths: NodePaths) -> dict[str, Any]:
    """bridge + host-local (+ portmap for hostPorts); no ipMasq: pods have nowhere outside to go."""
    return {
        "cniVersion": "1.0.0",
        "name": "recserve",
        "plugins": [
            {
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(paths.cni_data_dir),
                    "ranges": [[{"subnet": net.pod_cidr, "gateway": net.gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def kubelet_config(net: Network, paths: NodePaths, client_ca: Path) -> dict[str, Any]:
    """KubeletConfiguration for cgroup v1 + cgroupfs on a shared host, serving only on the node address."""
    socket = f"unix://{paths.containerd_socket}"
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,
        "failSwapOn": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "containerRuntimeEndpoint": socket,
        "imageServiceEndpoint": socket,
        "address": net.node_ip,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(client_ca)},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [net.dns_service_ip],
        "clusterDomain": net.cluster_domain,
        # Pods never see the host's resolver: everything resolves through the cluster's CoreDNS.
        "resolvConf": str(paths.resolv_conf),
        "podLogsDir": str(paths.pod_logs),
        "volumePluginDir": str(paths.root / "volume-plugins"),
        "registerNode": True,
        "registerWithTaints": [{"key": GPU_TAINT_KEY, "value": "present", "effect": "NoSchedule"}],
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%",
                         "nodefs.inodesFree": "2%"},
        "imageGCHighThresholdPercent": 99,
        "imageGCLowThresholdPercent": 98,
        "serializeImagePulls": False,
        "maxPods": 110,
        "nodeStatusReportFrequency": "10s",
        # ConfigMap/Secret volumes (router config, Prometheus config) follow their objects within ~10 s, not ~60 s.
        "syncFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "localStorageCapacityIsolation": True,
    }


def kubelet_args(net: Network, paths: NodePaths, kubeconfig: Path) -> list[str]:
    labels = {**gpu_labels(REAL_NODE), "recserve.dev/node-kind": "real"}
    return [
        f"--config={paths.kubelet_config}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={paths.kubelet_root}",
        f"--cert-dir={paths.kubelet_root / 'pki'}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={net.node_ip}",
        "--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        "--v=1",
    ]


def kube_proxy_config(net: Network, kubeconfig: Path) -> dict[str, Any]:
    """iptables mode; leaves the host's conntrack sysctls and localhost alone, NodePorts only on the node address."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": net.cluster_cidr,
        "hostnameOverride": NODE_NAME,
        "bindAddress": net.node_ip,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "nodePortAddresses": [f"{net.node_ip}/32"],
        "conntrack": {"maxPerCore": 0, "min": 0},
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        "detectLocalMode": "ClusterCIDR",
    }


def guard_rules(net: Network, resolvers: list[str], apiserver_port: int) -> dict[str, list[list[str]]]:
    """iptables rules (filter table) per chain that keep the cluster's traffic on this machine.

    - RECSERVE-GUARD (first in OUTPUT): nothing the host sends to a private range (the Service range before
      kube-proxy has rules for it included) leaves through an uplink, except to the host's own DNS
      resolvers, which the package registries need. Local interfaces (lo, the bridge, its veths) are exempt.
    - RECSERVE-GUARD-FWD (first in FORWARD): the host forwards only between pods on the bridge; nothing is
      forwarded out of, or in from, an uplink (`up` turns ip_forward on for the bridge).
    - RECSERVE-GUARD-IN (first in INPUT): pods reach the host only at the apiserver and the kubelet, and
      neither of those is reachable through an uplink.
    """
    local = [["-o", "lo", "-j", "RETURN"], ["-o", net.bridge, "-j", "RETURN"], ["-o", "veth+", "-j", "RETURN"]]
    out = local + [["-d", f"{r}/32", "-p", proto, "--dport", "53", "-j", "RETURN"]
                   for r in resolvers for proto in ("udp", "tcp")]
    out += [["-m", "conntrack", "--ctstate", "DNAT", "-j", "DROP"]]
    out += [["-d", cidr, "-j", "DROP"] for cidr in (net.service_cidr, net.cluster_cidr, f"{net.node_ip}/32",
                                                     *PRIVATE_RANGES)]
    forward = [["-i", net.bridge, "-o", net.bridge, "-j", "RETURN"], ["-j", "DROP"]]
    inbound = [
        ["-i", "lo", "-j", "RETURN"],
        ["-s", net.cluster_cidr, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"],
        ["-s", net.cluster_cidr, "-d", net.node_ip, "-p", "tcp", "--dport", str(apiserver_port), "-j", "RETURN"],
        ["-s", net.cluster_cidr, "-d", net.node_ip, "-p", "tcp", "--dport", str(KUBELET_PORT), "-j", "RETURN"],
        ["-s", net.cluster_cidr, "-j", "DROP"],
        ["-i", net.bridge, "-j", "RETURN"],
        # The apiserver listens on all IPv4 addresses and the kubelet on the node address: neither is
        # reachable from an uplink.
        ["-p", "tcp", "--dport", str(apiserver_port), "-j", "DROP"],
        ["-p", "tcp", "--dport", str(KUBELET_PORT), "-j", "DROP"],
    ]
    return {GUARD_CHAIN: out, GUARD_FORWARD_CHAIN: forward, GUARD_INPUT_CHAIN: inbound}


GUARD_HOOKS: tuple[tuple[str, str], ...] = (("OUTPUT", GUARD_CHAIN), ("FORWARD", GUARD_FORWARD_CHAIN),
                                            ("INPUT", GUARD_INPUT_CHAIN))


def resolvers(resolv_conf_text: str) -> list[str]:
    """IPv4 nameservers of the host's resolv.conf (the only private addresses the host may still reach)."""
    found = []
    for line in resolv_conf_text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                if ipaddress.ip_address(parts[1]).version == 4:
                    found.append(parts[1])
            except ValueError:
                continue
    return found


COREDNS_IMAGE = "registry.k8s.io/coredns/coredns:v1.15.0"


def corefile(net: Network) -> str:
    """Cluster names and reverse zones only, no upstream: pods need no outside names."""
    return (
        ".:53 {\n    errors\n    health :8080\n    ready :8181\n"
        f"    kubernetes {net.cluster_domain} in-addr.arpa ip6.arpa {{\n"
        "        pods insecure\n        ttl 30\n    }\n"
        "    prometheus :9153\n    cache 30\n    reload\n}\n"
    )


def coredns_objects(net: Network, image: str = COREDNS_IMAGE) -> list[dict[str, Any]]:
    """CoreDNS as the cluster's DNS: RBAC, Corefile, a Deployment on the real node and the kube-dns Service."""
    ns, labels = "kube-system", {"k8s-app": "kube-dns"}
    meta = {"name": "coredns", "namespace": ns, "labels": labels}
    pod_security = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                    # Port 53 without a capability: the namespaced sysctl is on Kubernetes' safe list.
                    "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}]}
    container = {
        "name": "coredns",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["-conf", "/etc/coredns/Corefile"],
        "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                  {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": 9153, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "50m", "memory": "40Mi"}, "limits": {"memory": "170Mi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "initialDelaySeconds": 30},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": ns}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": corefile(net)}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "serviceAccountName": "coredns",
                      "priorityClassName": "system-cluster-critical",
                      "dnsPolicy": "Default",
                      "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
                      "tolerations": [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"},
                                      {"key": "CriticalAddonsOnly", "operator": "Exists"}],
                      "securityContext": pod_security,
                      "containers": [container],
                      "volumes": [{"name": "config", "configMap": {"name": "coredns"}}]}}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": ns, "labels": {**labels, "kubernetes.io/name": "CoreDNS"}},
         "spec": {"selector": labels, "clusterIP": net.dns_service_ip,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                            {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153}]}},
    ]


def real_pod_placement() -> dict[str, Any]:
    """Pod spec fields that put a workload on the real node (it carries the GPU taint)."""
    return {
        "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
        "tolerations": [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    }
