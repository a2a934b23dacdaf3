"""CLI: provision binaries and bring the local test cluster up or down (`python -m recserve_cluster up`)."""

from __future__ import annotations

import argparse
import sys
import time

from . import images, tools
from .cluster import CLUSTER_NAME, get_provider
from .errors import ClusterError
from .realnode import RealNode, leftovers, resident_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recserve-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("provision", help="find or build the pinned control-plane binaries (cached outside the tree)")
    sub.add_parser("up", help="create (or reuse) the cluster chosen by RECSERVE_CLUSTER_PROVIDER (default kwok)")
    sub.add_parser("down", help="delete the cluster and stop every process it started")
    sub.add_parser("kubeconfig", help="print the kubeconfig path of the running cluster")
    sub.add_parser("versions", help="print the pinned versions")
    sub.add_parser("memory", help="resident memory of the running cluster: control plane, node daemons, pods")
    sub.add_parser("leftovers", help="fail if a stopped real node left a process, link, rule, mount or cgroup")
    img = sub.add_parser("images", help="build (or reuse) the real node's container images and export them")
    img.add_argument("--load", metavar="ADDRESS", help="then import them into the containerd at this socket")
    img.add_argument("--force", action="store_true", help="rebuild even the images whose inputs did not change")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        if args.cmd == "provision":
            for name, path in tools.provision().items():
                print(f"{name}\t{path}")
        elif args.cmd == "up":
            cluster = get_provider().up()
            print(cluster.kubeconfig)
        elif args.cmd == "down":
            get_provider().down()
        elif args.cmd == "kubeconfig":
            current = get_provider().current()
            if current is None:
                raise ClusterError("no cluster is running; start one with `make cluster-up`")
            print(current.kubeconfig)
        elif args.cmd == "images":
            print(images.describe(images.build(force=args.force)))
            node = RealNode(CLUSTER_NAME)
            # Into the running node's containerd too, so its pods see the new images without a restart.
            target = args.load or (str(node.paths.containerd_socket) if node.running() else None)
            if target:
                images.load(target)
        elif args.cmd == "memory":
            provider = get_provider()
            pid_dir = getattr(provider, "cluster_dir", None)
            cp = {}
            if pid_dir is not None and (pid_dir / "pids").is_dir():
                cp = {p.stem: int(p.read_text().strip()) for p in (pid_dir / "pids").glob("*.pid")}
            usage = resident_memory(RealNode(CLUSTER_NAME), cp)
            for name, rss in sorted(usage.items(), key=lambda kv: -kv[1]):
                print(f"{name}\t{rss / 2**20:.0f} MiB")
            print(f"total\t{sum(usage.values()) / 2**20:.0f} MiB")
        elif args.cmd == "leftovers":
            found = {k: v for k, v in leftovers(RealNode(CLUSTER_NAME)).items() if v}
            if found:
                raise ClusterError(f"the real node left these behind: {found}")
        elif args.cmd == "versions":
            for t in (*tools.TOOLS, *tools.ADDON_TOOLS):
                print(f"{t.name}\t{t.version}")
            print(f"gateway-api\t{tools.GATEWAY_API_VERSION}\nprometheus-operator-crds\t{tools.PROMETHEUS_OPERATOR_VERSION}")
    except ClusterError as exc:
        print(f"recserve-cluster: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"[recserve-cluster] {args.cmd} done in {time.monotonic() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
