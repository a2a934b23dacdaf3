#!/usr/bin/python3 -S
"""`tritonserver` of the CPU stand-in: the real binary, with KIND_GPU instance groups served on CPU if no GPU exists."""

# Triton refuses a model whose instance group says KIND_GPU when CUDA finds no device ("has kind KIND_GPU but
# no GPUs are available"), and no server flag changes that. The test cluster's GPUs are simulated, so this
# wrapper mirrors each --model-repository under TMPDIR with those groups rewritten to KIND_CPU (and their
# `gpus` lists dropped); model files are symlinked, not copied. It changes nothing when an NVIDIA device is
# present or RECSERVE_TRITON_GPU_FALLBACK=0, and it cannot help a TensorRT plan (there is no TensorRT here).

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

REAL = "/opt/tritonserver/bin/tritonserver.bin"
GPU_KIND = re.compile(r"\bkind\s*:\s*KIND_GPU\b")
GPU_IDS = re.compile(r"\bgpus\s*:\s*(\[[^\]]*\]|\d+)")
REPO_FLAGS = ("--model-repository", "--model-store")


def has_gpu() -> bool:
    return Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def cpu_config(text: str) -> str:
    return GPU_IDS.sub("", GPU_KIND.sub("kind: KIND_CPU", text))


def mirror(repo: Path, out: Path) -> list[str]:
    """Link every model of `repo` into `out`, rewriting the configs that ask for GPUs; returns those models."""
    rewritten = []
    for model in sorted(repo.iterdir()):
        config = model / "config.pbtxt"
        text = config.read_text() if model.is_dir() and config.is_file() else ""
        if not GPU_KIND.search(text):
            (out / model.name).symlink_to(model)
            continue
        (out / model.name).mkdir()
        for entry in model.iterdir():
            if entry.name != "config.pbtxt":
                (out / model.name / entry.name).symlink_to(entry)
        (out / model.name / "config.pbtxt").write_text(cpu_config(text))
        rewritten.append(model.name)
    return rewritten


def rewrite_args(args: list[str], scratch: Path) -> tuple[list[str], list[str]]:
    """The arguments with each model repository replaced by its CPU mirror, and the models rewritten."""
    out: list[str] = []
    rewritten: list[str] = []
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        width = 1
        if flag in REPO_FLAGS and not eq and i + 1 < len(args):
            value, width = args[i + 1], 2
        if flag in REPO_FLAGS and Path(value).is_dir():
            target = Path(tempfile.mkdtemp(prefix="repository-", dir=scratch))
            rewritten += mirror(Path(value), target)
            out.append(f"{flag}={target}")
        else:
            out += args[i : i + width]
        i += width
    return out, rewritten


def main() -> None:
    args = sys.argv[1:]
    if os.environ.get("RECSERVE_TRITON_GPU_FALLBACK", "1") != "0" and not has_gpu():
        try:
            scratch = Path(tempfile.mkdtemp(prefix="recserve-cpu-models-"))
            args, rewritten = rewrite_args(args, scratch)
        except OSError as exc:  # e.g. no writable TMPDIR: run as configured, KIND_GPU models will fail
            print(f"recserve CPU stand-in: cannot mirror the model repository ({exc})", file=sys.stderr)
            rewritten = []
        if rewritten:
            models = ", ".join(rewritten)
            print(f"recserve CPU stand-in: no GPU here; KIND_GPU instance groups of {models} run as KIND_CPU "
                  "(TensorRT plans still cannot load; RECSERVE_TRITON_GPU_FALLBACK=0 refuses KIND_GPU instead)",
                  file=sys.stderr, flush=True)  # fmt: skip
    os.execv(REAL, [REAL, *args])


if __name__ == "__main__":
    main()
