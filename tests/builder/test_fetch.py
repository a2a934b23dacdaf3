"""Fetch tests against real sources: files, pvc:// mounts, a local HTTP server and a real SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from model_repo_builder import fetch as F
from model_repo_builder.errors import BadInputError, UsageError
from tests.builder.conftest import S3Server


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_local_and_file_uri_with_digest(tmp_path: Path) -> None:
    src = _write(tmp_path / "m.onnx", b"x" * 1000)
    digest = hashlib.sha256(b"x" * 1000).hexdigest()
    for uri in (str(src), src.as_uri()):
        got = F.fetch(uri, tmp_path, sha256=digest.upper())
        assert got.path == src and got.sha256 == digest and got.size_bytes == 1000
    with pytest.raises(BadInputError, match="sha256 mismatch") as info:
        F.fetch(str(src), tmp_path, sha256="0" * 64)
    assert info.value.exit_code == 3
    with pytest.raises(BadInputError, match="does not exist"):
        F.fetch(str(tmp_path / "missing.onnx"), tmp_path)


def test_directory_digest_is_content_addressed(tmp_path: Path) -> None:
    a = tmp_path / "a"
    _write(a / "saved_model.pb", b"pb")
    _write(a / "variables" / "v.index", b"idx")
    d1 = F.sha256_of(a)
    _write(a / "variables" / "v.index", b"idx2")
    assert F.sha256_of(a) != d1


def test_pvc_scheme_resolves_under_mount_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSERVE_PVC_ROOT", str(tmp_path / "mnt"))
    src = _write(tmp_path / "mnt" / "models-claim" / "ctr" / "model.onnx", b"onnx")
    got = F.fetch("pvc://models-claim/ctr/model.onnx", tmp_path)
    assert got.path == src
    with pytest.raises(UsageError, match="escapes"):
        F.fetch("pvc://models-claim/../etc/passwd", tmp_path)
    with pytest.raises(UsageError, match="bad PVC URI"):
        F.fetch("pvc://claim-only", tmp_path)


def test_unsupported_scheme(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unsupported source scheme"):
        F.fetch("ftp://bucket/model.onnx", tmp_path)


def test_http_download_archive_and_404(tmp_path: Path, http_dir: tuple[str, Path]) -> None:
    base, root = http_dir
    _write(root / "model.onnx", b"y" * 300_000)
    work = tmp_path / "work"
    work.mkdir()
    got = F.fetch(f"{base}/model.onnx", work, sha256=hashlib.sha256(b"y" * 300_000).hexdigest())
    assert got.path.read_bytes() == b"y" * 300_000 and got.path.parent == work

    sm = tmp_path / "saved" / "sm"
    _write(sm / "saved_model.pb", b"pb")
    with tarfile.open(root / "sm.tar.gz", "w:gz") as tf:
        tf.add(sm, arcname="sm")
    got = F.fetch(f"{base}/sm.tar.gz", work)
    assert (got.path / "saved_model.pb").read_bytes() == b"pb"
    assert got.sha256 == hashlib.sha256((root / "sm.tar.gz").read_bytes()).hexdigest()  # the pin covers the archive

    with pytest.raises(BadInputError, match="HTTP 404"):
        F.fetch(f"{base}/nope.onnx", work)
    with pytest.raises(BadInputError, match="limit"):
        F.fetch(f"{base}/model.onnx", work, max_bytes=1000)


def test_s3_object_prefix_and_missing_key(tmp_path: Path, s3_server: S3Server) -> None:
    client = s3_server.client()
    payload = b"onnx-bytes" * 5000
    client.put_object(Bucket=s3_server.bucket, Key="ctr/1/model.onnx", Body=payload)
    client.put_object(Bucket=s3_server.bucket, Key="sm/saved_model.pb", Body=b"pb")
    client.put_object(Bucket=s3_server.bucket, Key="sm/variables/variables.index", Body=b"ix")

    got = F.fetch(
        f"s3://{s3_server.bucket}/ctr/1/model.onnx",
        tmp_path,
        s3_endpoint=s3_server.endpoint,
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    assert got.path.read_bytes() == payload

    got = F.fetch(f"s3://{s3_server.bucket}/sm/", tmp_path, s3_endpoint=s3_server.endpoint)
    assert (got.path / "variables" / "variables.index").read_bytes() == b"ix"

    with pytest.raises(BadInputError, match="not found"):
        F.fetch(f"s3://{s3_server.bucket}/ctr/9/model.onnx", tmp_path, s3_endpoint=s3_server.endpoint)
    with pytest.raises(BadInputError, match="sha256 mismatch"):
        F.fetch(f"s3://{s3_server.bucket}/ctr/1/model.onnx", tmp_path, s3_endpoint=s3_server.endpoint, sha256="f" * 64)


def test_gs_uses_the_s3_compatible_api_at_the_configured_endpoint(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real GCS answers its XML API at storage.googleapis.com; here the same protocol is served by SeaweedFS.
    assert F.GCS_S3_ENDPOINT == "https://storage.googleapis.com"
    payload = b"gcs-model" * 1000
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="two-tower/7/user_tower.keras", Body=payload)
    monkeypatch.setenv("GCS_ENDPOINT_URL", s3_server.endpoint)
    got = F.fetch(
        f"gs://{s3_server.bucket}/two-tower/7/user_tower.keras", tmp_path, sha256=hashlib.sha256(payload).hexdigest()
    )
    assert got.path.read_bytes() == payload


def test_s3_takes_its_endpoint_from_the_environment_a_credentials_secret_sets(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator puts a RecommenderModel's credentials Secret into the builder's environment (envFrom): keys and,
    # optionally, AWS_ENDPOINT_URL, with no --s3-endpoint argument.
    payload = b"minio-model" * 1000
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="env/3/model.keras", Body=payload)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    got = F.fetch(f"s3://{s3_server.bucket}/env/3/model.keras", tmp_path, sha256=hashlib.sha256(payload).hexdigest())
    assert got.path.read_bytes() == payload


def test_http_retries_transient_errors(tmp_path: Path) -> None:
    import http.server
    import threading

    calls: list[str] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            calls.append(self.path)
            if len(calls) < 3:  # two 503s, then the file
                self.send_error(503)
                return
            body = b"model-bytes"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got = F.fetch(f"http://127.0.0.1:{server.server_address[1]}/m.onnx", tmp_path, retries=3)
        assert got.path.read_bytes() == b"model-bytes" and len(calls) == 3
        calls.clear()
        with pytest.raises(BadInputError, match="cannot download"):
            F.fetch(f"http://127.0.0.1:{server.server_address[1]}/m.onnx", tmp_path, retries=1)
    finally:
        server.shutdown()
        server.server_close()


class _Dribble:
    """An HTTP server sending `size` bytes one at a time with a pause between them (a slow or stalled store), with
    or without a Content-Length; stops writing when the client hangs up or the test ends."""

    def __init__(self, size: int, pause_s: float, *, length: bool) -> None:
        import http.server
        import threading

        self.done = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # no length: the body ends when the connection closes

            def do_GET(self) -> None:
                self.send_response(200)
                if length:
                    self.send_header("Content-Length", str(size))
                self.end_headers()
                try:
                    for _ in range(size):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        if pause_s and outer.done.wait(pause_s):
                            return
                except OSError:
                    return  # the client gave up: what the tests expect

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/model.onnx"

    def __enter__(self) -> _Dribble:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_download_slower_than_its_deadline_is_abandoned_with_the_bytes_it_got(tmp_path: Path) -> None:
    # 1 byte per 20 ms never trips a 60 s read timeout; the deadline ends it and says how far it got.
    too_slow = r"too slow: \d+ of 100000 bytes in \d+ s, over the 0.5-second limit"
    with _Dribble(100_000, 0.02, length=True) as slow, pytest.raises(BadInputError, match=too_slow):
        F.fetch(slow.url, tmp_path, download_timeout_s=0.5)


def test_a_source_without_a_length_is_cut_at_the_byte_limit(tmp_path: Path) -> None:
    with _Dribble(50_000, 0.0, length=False) as huge:
        with pytest.raises(BadInputError, match="exceeds the 1000-byte limit"):
            F.fetch(huge.url, tmp_path, max_bytes=1000)
        ok = tmp_path / "ok"
        ok.mkdir()
        assert F.fetch(huge.url, ok, max_bytes=50_000).size_bytes == 50_000  # at the limit: kept whole


def test_the_deadline_counts_from_its_start_on_the_given_clock() -> None:
    now = [100.0]
    deadline = F.Deadline("s3://b/k", 30, clock=lambda: now[0])
    now[0] = 130.0
    deadline.check(5)  # exactly at the limit: still allowed
    now[0] = 130.5
    with pytest.raises(BadInputError, match=r"s3://b/k too slow: 7 of 9 bytes in 30 s") as err:
        deadline.check(7, 9)
    assert "--download-timeout" in err.value.hint


def test_an_s3_download_past_its_deadline_is_abandoned(tmp_path: Path, s3_server: S3Server) -> None:
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="slow/model.onnx", Body=b"z" * 200_000)
    with pytest.raises(BadInputError, match="too slow"):
        F.fetch(
            f"s3://{s3_server.bucket}/slow/model.onnx",
            tmp_path,
            s3_endpoint=s3_server.endpoint,
            download_timeout_s=1e-6,
        )
