"""Lay the Triton distribution inside an nvidia-pytriton wheel out as NVIDIA's image does (/opt/tritonserver)."""

# Runs inside the image build (`python install_triton.py WHEEL DEST`); standard library only.

from __future__ import annotations

import sys
import zipfile
from pathlib import Path, PurePosixPath

PYTHON_STUB = f"pytriton/tritonserver/python_backend_stubs/{sys.version_info.major}.{sys.version_info.minor}/"
# wheel prefix -> directory under DEST; the first matching prefix wins.
LAYOUT = (
    ("pytriton/tritonserver/bin/", "bin/"),
    ("pytriton/tritonserver/backends/", "backends/"),
    ("pytriton/tritonserver/caches/", "caches/"),
    (PYTHON_STUB, "backends/python/"),
    ("nvidia_pytriton.libs/", "lib/"),
)
EXECUTABLES = ("bin/tritonserver", "backends/python/triton_python_backend_stub")


def destination(member: str) -> str | None:
    """Where a wheel member goes under DEST, or None when the image does not need it."""
    if "__pycache__" in PurePosixPath(member).parts:
        return None
    if member.endswith("/LICENSE") and member.startswith("nvidia_pytriton-"):
        return "LICENSE.pytriton"
    for prefix, target in LAYOUT:
        if member.startswith(prefix) and not member.endswith("/"):
            return target + member[len(prefix) :]
    return None


def install(wheel: str, dest: str) -> int:
    placed: list[str] = []
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            target = destination(info.filename)
            if target is None:
                continue
            path = Path(dest) / target
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(zf.read(info))
            # Zip members carry no usable modes: executables and shared objects get 0755, the rest 0644.
            executable = target in EXECUTABLES or target.endswith(".so") or ".so." in target
            path.chmod(0o755 if executable else 0o644)
            placed.append(target)
    missing = [e for e in EXECUTABLES if e not in placed]
    if missing:
        print(f"install_triton: the wheel lacks {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"install_triton: placed {len(placed)} files under {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(install(sys.argv[1], sys.argv[2]))
