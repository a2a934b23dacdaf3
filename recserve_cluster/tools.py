"""Pinned control-plane binaries: found on PATH or via env vars, else built from the Go module proxy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ClusterError

# Kubernetes 1.35 is the newest minor whose staging modules build cleanly from the proxy here and that
# current Kopf and kubernetes-client releases are tested against; etcd 3.6 is required by its watch
# progress requests (3.5.12 and older break the apiserver's watch cache).
KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"
GATEWAY_API_VERSION = "v1.6.3"
PROMETHEUS_OPERATOR_VERSION = "v0.85.0"
# CoreDNS serves cluster.local for the real node's pods (newest release; its go.mod has no replaces).
COREDNS_VERSION = "v1.15.0"

# kubelet and kube-proxy run the real node (real-0); they build from the same wrapper module.
KUBE_COMPONENTS = (
    "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet", "kube-proxy",
)


@dataclass(frozen=True)
class Tool:
    """One binary the local cluster needs, with the version it must report."""

    name: str
    version: str
    env_var: str


TOOLS: tuple[Tool, ...] = (
    *(Tool(c, KUBERNETES_VERSION, "RECSERVE_" + c.upper().replace("-", "_")) for c in KUBE_COMPONENTS),
    Tool("etcd", ETCD_VERSION, "RECSERVE_ETCD"),
    Tool("kwok", KWOK_VERSION, "RECSERVE_KWOK"),
    Tool("kwokctl", KWOK_VERSION, "RECSERVE_KWOKCTL"),
    Tool("helm", HELM_VERSION, "RECSERVE_HELM"),
    Tool("coredns", COREDNS_VERSION, "RECSERVE_COREDNS"),
)


def cache_dir() -> Path:
    """Binaries live outside the work tree so clean clones (and CI) reuse them."""
    root = os.environ.get("RECSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "recserve"
    )
    return Path(root)


def _log(msg: str) -> None:
    print(f"[recserve-cluster] {msg}", file=sys.stderr, flush=True)


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if not go:
        raise ClusterError(
            "Go toolchain not found: install Go >= 1.26 to build the control-plane binaries, "
            "or point RECSERVE_KUBE_APISERVER, RECSERVE_ETCD, ... at prebuilt ones."
        )
    return go


def _run_build(cmd: list[str], cwd: Path, what: str, env: dict[str, str] | None = None) -> str:
    """Run a long build, printing a heartbeat so users see progress, and fail with its output tail."""
    full_env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod -buildvcs=false", **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(30):
            _log(f"  still building {what} ({time.monotonic() - start:.0f}s)")

    threading.Thread(target=heartbeat, daemon=True).start()
    out, _ = proc.communicate()
    done.set()
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-25:])
        raise ClusterError(f"building {what} failed (exit {proc.returncode}) in {cwd}:\n{tail}")
    _log(f"  built {what} in {time.monotonic() - start:.0f}s")
    return out


def _ldflags_kube(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.gitVersion={version}", f"-X {pkg}.gitMajor={major}", f"-X {pkg}.gitMinor={minor}"]
        flags += [f"-X {pkg}.gitTreeState=clean"]
    return "-s -w " + " ".join(flags)


def _module_gomod(go: str, module: str, version: str, cwd: Path) -> str:
    out = subprocess.run(
        [go, "mod", "download", "-json", f"{module}@{version}"], cwd=cwd, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise ClusterError(f"cannot download {module}@{version} from the Go module proxy:\n{out.stdout}{out.stderr}")
    return Path(json.loads(out.stdout)["GoMod"]).read_text()


def kubernetes_wrapper_gomod(upstream_gomod: str, version: str) -> str:
    """A wrapper go.mod that builds k8s.io/kubernetes with its staging modules from the proxy.

    k8s.io/kubernetes replaces every k8s.io/* staging module with ./staging/...; those paths do not
    exist in the proxy's zip, so each is replaced by the published v0.X.Y module instead.
    """
    staging_version = "v0." + version.lstrip("v").split(".", 1)[1]
    staged = sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", upstream_gomod, re.M)))
    if not staged:
        raise ClusterError("k8s.io/kubernetes go.mod lists no staging replaces; the build recipe needs updating")
    go_line = re.search(r"^go\s+(\S+)", upstream_gomod, re.M)
    godebug = re.search(r"^godebug\s*(\([^)]*\)|.*)$", upstream_gomod, re.M)
    lines = ["module recserve.local/kubebuild", "", f"go {go_line.group(1) if go_line else '1.25'}", ""]
    if godebug:
        lines += [godebug.group(0), ""]
    lines += [f"require k8s.io/kubernetes {version}", ""]
    lines += ["replace ("] + [f"\t{m} => {m} {staging_version}" for m in staged] + [")", ""]
    return "\n".join(lines)


def _build_kubernetes(dest: Path, version: str) -> None:
    go = _go()
    src = cache_dir() / "src" / f"kubernetes-{version}"
    src.mkdir(parents=True, exist_ok=True)
    _log(f"building Kubernetes {version} components from the Go module proxy (cold: ~15-25 min on 2 cores)")
    upstream = _module_gomod(go, "k8s.io/kubernetes", version, src)
    (src / "go.mod").write_text(kubernetes_wrapper_gomod(upstream, version))
    (src / "go.sum").touch()
    pkgs = [f"k8s.io/kubernetes/cmd/{c}" for c in KUBE_COMPONENTS]
    _run_build([go, "mod", "download", "k8s.io/kubernetes"], src, "module download")
    _run_build([go, "get", f"k8s.io/kubernetes@{version}"], src, "module graph")
    # kubelet and kube-proxy pull packages outside the apiserver's graph: fill go.sum for them too.
    _run_build([go, "get", *(f"{p}@{version}" for p in pkgs)], src, "module graph (commands)")
    dest.mkdir(parents=True, exist_ok=True)
    _run_build(
        [go, "build", "-trimpath", "-ldflags", _ldflags_kube(version), "-o", str(dest) + "/", *pkgs],
        src,
        ", ".join(KUBE_COMPONENTS),
    )


def _build_etcd(dest: Path, version: str) -> None:
    go = _go()
    src = cache_dir() / "src" / f"etcd-{version}"
    src.mkdir(parents=True, exist_ok=True)
    _log(f"building etcd {version} from the Go module proxy")
    # server/v3's go.mod replaces its sibling modules with ../ paths; pin the published ones instead.
    siblings = ("api/v3", "client/pkg/v3", "client/v3", "pkg/v3")
    lines = ["module recserve.local/etcdbuild", "", "go 1.25", "", f"require go.etcd.io/etcd/server/v3 {version}", ""]
    lines += ["replace ("] + [f"\tgo.etcd.io/etcd/{m} => go.etcd.io/etcd/{m} {version}" for m in siblings] + [")", ""]
    (src / "go.mod").write_text("\n".join(lines))
    (src / "go.sum").touch()
    _run_build([go, "get", f"go.etcd.io/etcd/server/v3@{version}"], src, "etcd module graph")
    dest.mkdir(parents=True, exist_ok=True)
    _run_build(
        [go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(dest / "etcd"), "go.etcd.io/etcd/server/v3"],
        src,
        "etcd",
    )


def _go_install(dest: Path, pkgs: list[str], what: str) -> None:
    go = _go()
    dest.mkdir(parents=True, exist_ok=True)
    _log(f"building {what} from the Go module proxy")
    env = {"GOBIN": str(dest), "GOFLAGS": "-buildvcs=false"}
    _run_build([go, "install", "-trimpath", "-ldflags", "-s -w", *pkgs], dest, what, env=env)


def _build_kwok(dest: Path, version: str) -> None:
    pkgs = [f"sigs.k8s.io/kwok/cmd/kwok@{version}", f"sigs.k8s.io/kwok/cmd/kwokctl@{version}"]
    _go_install(dest, pkgs, f"kwok {version}")


def _build_helm(dest: Path, version: str) -> None:
    major = version.lstrip("v").split(".")[0]
    _go_install(dest, [f"helm.sh/helm/v{major}/cmd/helm@{version}"], f"helm {version}")


def _build_coredns(dest: Path, version: str) -> None:
    _go_install(dest, [f"github.com/coredns/coredns@{version}"], f"CoreDNS {version}")


BUILDERS: dict[str, tuple[str, Callable[[Path, str], None]]] = {
    **{c: ("kubernetes", _build_kubernetes) for c in KUBE_COMPONENTS},
    "etcd": ("etcd", _build_etcd),
    "kwok": ("kwok", _build_kwok),
    "kwokctl": ("kwok", _build_kwok),
    "helm": ("helm", _build_helm),
    "coredns": ("coredns", _build_coredns),
}


def _cached_path(tool: Tool) -> Path:
    group, _ = BUILDERS[tool.name]
    return cache_dir() / "bin" / f"{group}-{tool.version}" / tool.name


def _reports_version(path: str, tool: Tool) -> bool:
    args = {"kubectl": ["version", "--client"], "helm": ["version", "--short"], "kwok": ["--version"],
            "kwokctl": ["--version"], "coredns": ["-version"]}.get(tool.name, ["--version"])
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return tool.version.lstrip("v") in (out.stdout + out.stderr)


def resolve(tool: Tool, build: bool = True) -> Path:
    """Env var override, else the cache, else PATH at the pinned version, else a fresh build."""
    override = os.environ.get(tool.env_var)
    if override:
        if not os.access(override, os.X_OK):
            raise ClusterError(f"{tool.env_var}={override} is not an executable file")
        return Path(override)
    cached = _cached_path(tool)
    if cached.exists():
        return cached
    on_path = shutil.which(tool.name)
    if on_path and _reports_version(on_path, tool):
        return Path(on_path)
    if not build:
        raise ClusterError(f"{tool.name} {tool.version} is not provisioned; run `make provision`")
    _, builder = BUILDERS[tool.name]
    builder(cached.parent, tool.version)
    if not cached.exists():
        raise ClusterError(f"build of {tool.name} finished but {cached} is missing")
    return cached


def provision(build: bool = True) -> dict[str, Path]:
    """Resolve every tool, building the missing ones; returns name -> path.

    Building (`make provision`) also builds the add-ons' binaries; a lookup without building only needs TOOLS.
    """
    wanted = (*TOOLS, *ADDON_TOOLS) if build else TOOLS
    return {t.name: resolve(t, build=build) for t in wanted}


def go_module_dir(module: str, version: str) -> Path:
    """Download a Go module (for the CRD YAML files it ships) and return its directory."""
    go = _go()
    tmp = cache_dir() / "src"
    tmp.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [go, "mod", "download", "-json", f"{module}@{version}"], cwd=tmp, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise ClusterError(f"cannot download {module}@{version}: {out.stdout}{out.stderr}")
    return Path(json.loads(out.stdout)["Dir"])


# ---------------------------------------------------------------------------------- in-cluster add-ons
# Built from their Go modules (CGO_ENABLED=0) and run on the real node by recserve_cluster.addons.
# Prometheus Operator v0.85.0 is the only version the proxy lists; prometheus-adapter v0.12.0 and
# metrics-server v0.8.0 are the newest releases (the adapter's version list is refused, the exact one is served).
PROMETHEUS_ADAPTER_VERSION = "v0.12.0"
METRICS_SERVER_VERSION = "v0.8.0"
# The Prometheus server the operator runs: the operator's own default (last in its compatibility list, v3.5.0)
# at its newest patch. Not Debian's 2.42 package: Debian builds it without Kubernetes service discovery
# (`kubernetes_sd_configs` is an unknown field there), and every ServiceMonitor becomes such a scrape config.
PROMETHEUS_VERSION = "v3.5.1"

# Kept out of TOOLS: `provision(build=False)` (cluster.current, down) must not demand them; addons.install
# resolves (and if needed builds) them itself.
ADDON_TOOLS: tuple[Tool, ...] = (
    Tool("prometheus-operator", PROMETHEUS_OPERATOR_VERSION, "RECSERVE_PROMETHEUS_OPERATOR"),
    Tool("prometheus-config-reloader", PROMETHEUS_OPERATOR_VERSION, "RECSERVE_PROMETHEUS_CONFIG_RELOADER"),
    Tool("prometheus-adapter", PROMETHEUS_ADAPTER_VERSION, "RECSERVE_PROMETHEUS_ADAPTER"),
    Tool("metrics-server", METRICS_SERVER_VERSION, "RECSERVE_METRICS_SERVER"),
    Tool("prometheus", PROMETHEUS_VERSION, "RECSERVE_PROMETHEUS"),
)


def _build_in_wrapper(
    dest: Path, module: str, version: str, binaries: dict[str, str], *, what: str, ldflags: str = "-s -w"
) -> None:
    """`go build` named binaries of `module` from a throwaway wrapper module that requires it.

    A wrapper (not `go install pkg@version`) because go install refuses a module with any replace
    directive and because the binaries need names other than their package directory's. The upstream's
    replaces of published modules are kept (they pin what upstream builds with); replaces with ./ paths
    (sub-modules of the same repository) are dropped, so the published sub-modules it requires are used.
    """
    go = _go()
    src = cache_dir() / "src" / f"{module.rsplit('/', 1)[-1]}-{version}"
    src.mkdir(parents=True, exist_ok=True)
    _log(f"building {what} from the Go module proxy")
    upstream = _module_gomod(go, module, version, src)
    go_line = re.search(r"^go\s+(\S+)", upstream, re.M)
    go_version = go_line.group(1) if go_line else "1.24"
    wrapper = [f"module recserve.local/{module.rsplit('/', 1)[-1]}build", "", f"go {go_version}", "",
               f"require {module} {version}", "", *published_replaces(upstream), ""]
    (src / "go.mod").write_text("\n".join(wrapper))
    (src / "go.sum").touch()
    _run_build([go, "get", *(f"{pkg}@{version}" for pkg in binaries.values())], src, f"{what} module graph")
    dest.mkdir(parents=True, exist_ok=True)
    for name, pkg in binaries.items():
        _run_build([go, "build", "-trimpath", "-ldflags", ldflags, "-o", str(dest / name), pkg], src, name)


def published_replaces(gomod: str) -> list[str]:
    """The `replace` lines of a go.mod whose targets are published modules (not ./ or ../ paths)."""
    lines: list[str] = []
    for block in re.findall(r"^replace\s*\(([^)]*)\)", gomod, re.M):
        lines += [ln.strip() for ln in block.splitlines() if "=>" in ln]
    lines += [m.strip() for m in re.findall(r"^replace\s+([^(\n][^\n]*=>[^\n]*)$", gomod, re.M)]
    kept = [ln.split("//")[0].strip() for ln in lines if not ln.split("=>", 1)[1].strip().startswith(".")]
    return [f"replace {ln}" for ln in kept]


def prometheus_module_version(version: str) -> str:
    """Prometheus X.Y.Z is published as the Go module version v0.(100*X+Y).Z from 3.0 on, v0.Y.Z before."""
    major, minor, patch = (int(p) for p in version.lstrip("v").split("."))
    return f"v0.{minor + (100 * major if major >= 3 else 0)}.{patch}"


def _ldflags_prometheus_common(version: str) -> str:
    pkg = "github.com/prometheus/common/version"
    return f"-s -w -X {pkg}.Version={version.lstrip('v')} -X {pkg}.Branch=release -X {pkg}.BuildUser=recserve"


def _build_prometheus_operator(dest: Path, version: str) -> None:
    # Its go.mod replaces pkg/apis/monitoring and pkg/client with ./pkg/...: the wrapper takes the
    # published sub-modules of the same version instead (the main module requires exactly those).
    module = "github.com/prometheus-operator/prometheus-operator"
    binaries = {"prometheus-operator": f"{module}/cmd/operator",
                "prometheus-config-reloader": f"{module}/cmd/prometheus-config-reloader"}
    _build_in_wrapper(dest, module, version, binaries, what=f"Prometheus Operator {version}",
                      ldflags=_ldflags_prometheus_common(version))


def _build_prometheus_adapter(dest: Path, version: str) -> None:
    module = "sigs.k8s.io/prometheus-adapter"
    _build_in_wrapper(dest, module, version, {"prometheus-adapter": f"{module}/cmd/adapter"},
                      what=f"prometheus-adapter {version}")


def _build_metrics_server(dest: Path, version: str) -> None:
    module = "sigs.k8s.io/metrics-server"
    # metrics-server reports client-go's version variables (its Makefile stamps them the same way).
    ldflags = f"-s -w -X k8s.io/client-go/pkg/version.gitVersion={version}"
    _build_in_wrapper(dest, module, version, {"metrics-server": f"{module}/cmd/metrics-server"},
                      what=f"metrics-server {version}", ldflags=ldflags)


def _build_prometheus(dest: Path, version: str) -> None:
    # No `builtinassets` tag: the module ships no built web UI; the HTTP API, which is all anything here uses,
    # is complete without it.
    module = "github.com/prometheus/prometheus"
    _build_in_wrapper(dest, module, prometheus_module_version(version), {"prometheus": f"{module}/cmd/prometheus"},
                      what=f"Prometheus {version}", ldflags=_ldflags_prometheus_common(version))


BUILDERS.update({
    "prometheus-operator": ("prometheus-operator", _build_prometheus_operator),
    "prometheus-config-reloader": ("prometheus-operator", _build_prometheus_operator),
    "prometheus-adapter": ("prometheus-adapter", _build_prometheus_adapter),
    "metrics-server": ("metrics-server", _build_metrics_server),
    "prometheus": ("prometheus", _build_prometheus),
})
