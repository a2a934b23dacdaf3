"""Run the real Triton binary shipped in nvidia-pytriton against a model repository (local serving and tests)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

from model_repo_builder.errors import MissingRuntimeError

_READY_DEADLINE_S = 120.0


class TritonError(RuntimeError):
    """Triton failed to start, died, or a model did not become ready; the message carries the log tail."""


def free_port() -> int:
    """A TCP port that is free on localhost right now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (held open together so the kernel cannot hand out the same one twice)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def pytriton_dist() -> Path:
    """Directory of the Triton distribution inside the installed nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as exc:
        raise MissingRuntimeError(
            "nvidia-pytriton (which ships the Triton binary) is not installed", "pip install nvidia-pytriton"
        ) from exc
    dist = Path(pytriton.__file__).parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").exists():
        raise MissingRuntimeError(f"no tritonserver binary under {dist}", "reinstall nvidia-pytriton")
    return dist


def prepare_backends(cache_dir: Path | None = None) -> Path:
    """A backend directory whose python backend uses the stub built for this interpreter's Python version.

    The wheel ships one stub per Python version; Triton looks for `backends/python/triton_python_backend_stub`,
    so (like pytriton itself) we assemble that layout once per Python version.
    """
    dist = pytriton_dist()
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.exists():
        raise MissingRuntimeError(f"nvidia-pytriton ships no python backend stub for Python {pyver}", "use Python 3.11")
    # Keyed by wheel version and Python version so an upgraded nvidia-pytriton never reuses a stale stub.
    key = f"{importlib.metadata.version('nvidia-pytriton')}-py{pyver}"
    root = (cache_dir or Path(tempfile.gettempdir()) / f"recserve-triton-backends-{os.getuid()}") / key
    python_dir = root / "python"
    marker = python_dir / ".complete"
    if not marker.exists():
        tmp = Path(tempfile.mkdtemp(dir=root.parent if root.parent.exists() else None))
        shutil.copytree(dist / "backends" / "python", tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        (tmp / "python" / ".complete").touch()
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(root)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def triton_env(extra_pythonpath: Iterable[str] = ()) -> dict[str, str]:
    """Environment for tritonserver: bundled libs, libpython for the stub, and this venv's packages for models."""
    import pytriton

    env = os.environ.copy()
    libs = [
        str(Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"),
        str(sysconfig.get_config_var("LIBDIR") or ""),
    ]
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p] + [p for p in [env.get("LD_LIBRARY_PATH", "")] if p])
    # The stub embeds Python; it must see this interpreter's site-packages (numpy, onnxruntime) for model.py.
    paths = [*extra_pythonpath, *sysconfig.get_paths()["purelib"].split(os.pathsep)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The python models run ONNX Runtime on a shared CPU: keep each instance from claiming every core.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def poll_until(check: Callable[[], object], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Call `check()` until it returns truthy or `timeout_s` elapses; returns the last outcome."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


class TritonServer:
    """Context manager running tritonserver on `repo_dir`; waits for readiness and stops it on exit.

    Ports left as None (or 0) are picked free. The server runs in its own process group with its log in
    `log_path` (a temp file by default); startup failures and deaths raise TritonError carrying the log tail.

    Usage::

        with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as t:
            client = tritonclient.http.InferenceServerClient(t.http_url)
    """

    def __init__(
        self,
        repo_dir: str | Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        *,
        model_control_mode: str = "none",
        load_models: Sequence[str] = (),
        log_path: str | Path | None = None,
        ready_timeout_s: float = _READY_DEADLINE_S,
        extra_args: Sequence[str] = (),
        verbose: int = 0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.repo_dir = Path(repo_dir).resolve()
        ports = free_ports(3)
        self.http_port = http_port or ports[0]
        self.grpc_port = grpc_port or ports[1]
        self.metrics_port = metrics_port or ports[2]
        self.model_control_mode = model_control_mode
        self.load_models = tuple(load_models)
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = tuple(extra_args)
        self.verbose = verbose
        self.extra_env = dict(extra_env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        binary = pytriton_dist() / "bin" / "tritonserver"
        cmd = [
            str(binary),
            f"--model-repository={self.repo_dir}",
            f"--backend-directory={prepare_backends()}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--model-control-mode={self.model_control_mode}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=5",  # do not wait long for idle client connections on shutdown
            f"--log-verbose={self.verbose}",
        ]
        cmd += [f"--load-model={m}" for m in self.load_models]
        return cmd + list(self.extra_args)

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def is_ready(self) -> bool:
        return self._http_ok("/v2/health/ready")

    def model_ready(self, name: str, version: str = "") -> bool:
        suffix = f"/versions/{version}" if version else ""
        return self._http_ok(f"/v2/models/{name}{suffix}/ready")

    def _alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> TritonServer:
        if not self.repo_dir.is_dir():
            raise TritonError(f"model repository {self.repo_dir} does not exist")
        self._log_file = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**triton_env(), **self.extra_env},
            start_new_session=True,  # its own process group, so stop() also reaps python backend stubs
        )

        def ready_or_dead() -> bool:
            return not self._alive() or self.is_ready()

        ok = poll_until(ready_or_dead, self.ready_timeout_s, 0.2)
        if not self._alive():
            code = self.process.returncode
            self.stop()
            raise TritonError(f"tritonserver exited with code {code} during startup; log tail:\n{self.log_tail()}")
        if not ok:
            self.stop()
            raise TritonError(
                f"tritonserver not ready within {self.ready_timeout_s:.0f}s; log {self.log_path}, tail:\n"
                f"{self.log_tail()}"
            )
        return self

    def wait_model_ready(self, name: str, timeout_s: float = 60.0, version: str = "") -> None:
        """Block until model `name` is ready (explicit mode loads), raising TritonError with the log otherwise."""
        if not poll_until(lambda: not self._alive() or self.model_ready(name, version), timeout_s, 0.1):
            raise TritonError(f"model {name} not ready within {timeout_s:.0f}s; log tail:\n{self.log_tail()}")
        if not self._alive():
            raise TritonError(f"tritonserver died while loading {name}; log tail:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            # Stubs of the python backend live in the same group; make sure none outlives the server.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
