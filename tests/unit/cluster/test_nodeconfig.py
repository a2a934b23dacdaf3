"""The real node's pure configuration: address plan, guard verdicts, runtime and kubelet settings, CoreDNS."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from recserve_cluster import nodeconfig as nc

NET = nc.NETWORK
PATHS = nc.NodePaths(Path("/cache/node/recserve"))
RESOLVER = "10.255.255.53"
API_PORT = 34567


@dataclass(frozen=True)
class Packet:
    out_if: str = ""
    in_if: str = ""
    src: str = "192.0.2.2"
    dst: str = "203.0.113.80"
    proto: str = "tcp"
    dport: int = 443
    ctstate: str = "NEW"


def _matches(rule: list[str], p: Packet) -> bool:
    """Evaluate the subset of iptables matches the guard uses."""
    args = iter(rule[: rule.index("-j")])
    for flag in args:
        value = next(args)
        if flag == "-o" and not (p.out_if.startswith(value[:-1]) if value.endswith("+") else p.out_if == value):
            return False
        if flag == "-i" and not (p.in_if.startswith(value[:-1]) if value.endswith("+") else p.in_if == value):
            return False
        if flag == "-d" and ipaddress.ip_address(p.dst) not in ipaddress.ip_network(value):
            return False
        if flag == "-s" and ipaddress.ip_address(p.src) not in ipaddress.ip_network(value):
            return False
        if flag == "-p" and p.proto != value:
            return False
        if flag == "--dport" and p.dport != int(value):
            return False
        if flag == "--ctstate" and p.ctstate not in value.split(","):
            return False
    return True


def verdict(chain: str, p: Packet) -> str:
    for rule in nc.guard_rules(NET, [RESOLVER], API_PORT)[chain]:
        if _matches(rule, p):
            return rule[rule.index("-j") + 1]
    return "RETURN"


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (Packet(out_if="eth0", dst="10.96.0.1"), "DROP"),  # a Service address before kube-proxy's rules
        (Packet(out_if="eth0", dst="10.244.0.7"), "DROP"),
        (Packet(out_if="eth0", dst="172.20.1.1"), "DROP"),
        (Packet(out_if="eth0", dst="192.168.1.1"), "DROP"),
        (Packet(out_if="eth0", dst="100.64.0.1"), "DROP"),
        (Packet(out_if="eth0", dst="10.1.2.3", ctstate="DNAT"), "DROP"),
        (Packet(out_if="eth0", dst=RESOLVER, proto="udp", dport=53), "RETURN"),  # the host's own DNS
        (Packet(out_if="eth0", dst=RESOLVER, proto="tcp", dport=22), "DROP"),
        (Packet(out_if="eth0", dst="203.0.113.80"), "RETURN"),  # the registries, as before
        (Packet(out_if="rs-br0", dst="10.244.0.7"), "RETURN"),
        (Packet(out_if="lo", dst="10.245.0.1"), "RETURN"),
    ],
)
def test_the_host_sends_nothing_to_a_private_range_out_of_an_uplink(packet: Packet, expected: str) -> None:
    assert verdict(nc.GUARD_CHAIN, packet) == expected


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (Packet(in_if="rs-br0", out_if="rs-br0", src="10.244.0.5", dst="10.244.0.9"), "RETURN"),
        (Packet(in_if="rs-br0", out_if="eth0", src="10.244.0.5", dst="203.0.113.80"), "DROP"),
        (Packet(in_if="rs-br0", out_if="eth0", src="10.244.0.5", dst="10.255.255.53", proto="udp", dport=53), "DROP"),
        (Packet(in_if="eth0", out_if="rs-br0", src="192.0.2.9", dst="10.244.0.5"), "DROP"),
        (Packet(in_if="eth0", out_if="eth0", src="192.0.2.9", dst="10.1.1.1"), "DROP"),
    ],
)
def test_the_host_forwards_only_between_pods(packet: Packet, expected: str) -> None:
    assert verdict(nc.GUARD_FORWARD_CHAIN, packet) == expected


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (Packet(in_if="rs-br0", src="10.244.0.5", dst=NET.node_ip, dport=API_PORT), "RETURN"),
        (Packet(src="10.244.0.5", dst=NET.node_ip, dport=nc.KUBELET_PORT), "RETURN"),
        (Packet(src="10.244.0.5", dst=NET.node_ip, dport=22), "DROP"),
        (Packet(src="10.244.0.5", dst="192.0.2.2", dport=8000), "DROP"),
        (Packet(src="10.244.0.5", dst="192.0.2.2", dport=40000, ctstate="ESTABLISHED"), "RETURN"),
        (Packet(in_if="lo", src="127.0.0.1", dst="127.0.0.1", dport=API_PORT), "RETURN"),
        (Packet(in_if="eth0", src="192.0.2.9", dst="192.0.2.2", dport=API_PORT), "DROP"),
        (Packet(in_if="eth0", src="192.0.2.9", dst=NET.node_ip, dport=nc.KUBELET_PORT), "DROP"),
        (Packet(in_if="eth0", src="192.0.2.9", dst="192.0.2.2", dport=22), "RETURN"),
    ],
)
def test_pods_reach_the_host_only_at_the_apiserver_and_the_kubelet(packet: Packet, expected: str) -> None:
    assert verdict(nc.GUARD_INPUT_CHAIN, packet) == expected


def test_every_guard_chain_is_hooked_first_into_its_builtin_chain() -> None:
    assert {chain for _, chain in nc.GUARD_HOOKS} == set(nc.guard_rules(NET, [], API_PORT))


def test_the_address_plan_keeps_node_pod_and_service_ranges_apart() -> None:
    pods, services = ipaddress.ip_network(NET.cluster_cidr), ipaddress.ip_network(NET.service_cidr)
    node = ipaddress.ip_address(NET.node_ip)
    assert not pods.overlaps(services)
    assert node not in pods and node not in services and not node.is_loopback
    assert ipaddress.ip_network(NET.pod_cidr).subnet_of(pods)  # type: ignore[arg-type]
    assert (NET.gateway, NET.api_service_ip, NET.dns_service_ip) == ("10.244.0.1", "10.96.0.1", "10.96.0.10")
    assert len(NET.bridge) <= 15  # IFNAMSIZ


def test_containerd_keeps_all_state_under_the_node_folder_and_never_pulls_from_outside() -> None:
    cfg = tomllib.loads(nc.containerd_config(PATHS))
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["netns_mounts_under_state_dir"] is True
    assert cri["sandbox_image"] == nc.SANDBOX_IMAGE
    assert cri["cni"]["conf_dir"].startswith(str(PATHS.root))
    for path in (cfg["state"], cfg["grpc"]["address"], cri["containerd"]["runtimes"]["runc"]["options"]["Root"]):
        assert path.startswith(str(PATHS.root))
    assert cfg["root"].startswith(str(PATHS.root.parent))
    proxies = nc.containerd_env()
    assert proxies["HTTPS_PROXY"].startswith("http://127.0.0.1:")


def test_the_kubelet_serves_only_on_the_node_address_and_gives_pods_the_cluster_dns() -> None:
    cfg = nc.kubelet_config(NET, PATHS, Path("/ca.crt"))
    assert (cfg["failCgroupV1"], cfg["cgroupDriver"], cfg["failSwapOn"]) == (False, "cgroupfs", False)
    assert cfg["address"] == NET.node_ip and cfg["readOnlyPort"] == 0 and cfg["healthzPort"] == 0
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["clusterDNS"] == [NET.dns_service_ip]
    assert cfg["resolvConf"].startswith(str(PATHS.root))
    assert cfg["registerWithTaints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    args = nc.kubelet_args(NET, PATHS, Path("/kubeconfig"))
    labels = dict(kv.split("=") for kv in next(a for a in args if a.startswith("--node-labels="))
                  .removeprefix("--node-labels=").split(","))
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-L4"
    assert labels["nvidia.com/gpu.count"] == str(nc.REAL_NODE.gpus)


def test_kube_proxy_leaves_host_sysctls_and_localhost_alone() -> None:
    cfg = nc.kube_proxy_config(NET, Path("/kubeconfig"))
    assert cfg["mode"] == "iptables"
    assert cfg["conntrack"]["maxPerCore"] == 0
    assert cfg["iptables"]["localhostNodePorts"] is False
    assert cfg["nodePortAddresses"] == [f"{NET.node_ip}/32"]
    assert cfg["healthzBindAddress"].startswith("127.0.0.1:")


def test_cni_gives_pods_one_bridge_subnet_without_masquerading() -> None:
    conf = nc.cni_conflist(NET, PATHS)
    bridge = conf["plugins"][0]
    assert bridge["bridge"] == NET.bridge and bridge["ipMasq"] is False and bridge["isGateway"] is True
    assert bridge["ipam"]["ranges"] == [[{"subnet": NET.pod_cidr, "gateway": NET.gateway}]]
    assert bridge["ipam"]["dataDir"].startswith(str(PATHS.root))


def test_coredns_answers_cluster_names_only_and_runs_on_the_real_node() -> None:
    objs = {o["kind"]: o for o in nc.coredns_objects(NET)}
    corefile = objs["ConfigMap"]["data"]["Corefile"]
    assert "kubernetes cluster.local in-addr.arpa ip6.arpa" in corefile
    assert "forward" not in corefile
    assert objs["Service"]["spec"]["clusterIP"] == NET.dns_service_ip
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": nc.NODE_NAME}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_resolvers_are_the_ipv4_nameservers_of_resolv_conf() -> None:
    text = "# c\nsearch example\nnameserver 10.255.255.53\nnameserver fd00::53\nnameserver bogus\noptions ndots:5\n"
    assert nc.resolvers(text) == ["10.255.255.53"]
