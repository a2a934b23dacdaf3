"""Fetch a model source (path, file://, http(s)://, pvc://, s3://) into a local directory and pin its digest."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from model_repo_builder import archive
from model_repo_builder.errors import BadInputError, MissingRuntimeError, UsageError
from model_repo_builder.progress import progress_bar

DEFAULT_PVC_ROOT = "/mnt/pvc"
# Where pvc://<claim>/<path> sources are mounted (one directory per claim); the operator sets it in the pod.
PVC_ROOT_ENV = "RECSERVE_PVC_ROOT"
DEFAULT_MAX_BYTES = 4 << 30  # refuse downloads above 4 GiB unless raised: ranking models are far smaller
_CHUNK = 1 << 20
# A download must finish within this many seconds: a source that trickles bytes slower than any read timeout
# notices would otherwise hold a build until its Job's deadline, with no reason given.
DEFAULT_DOWNLOAD_TIMEOUT_S = 1800.0
_READ_TIMEOUT_S = 60.0


class Deadline:
    """The time budget of one download: `check(received, total)` raises once it is spent."""

    def __init__(self, uri: str, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.uri, self.seconds, self.clock = uri, seconds, clock
        self.start = clock()

    def check(self, received: int, total: int | None = None) -> None:
        elapsed = self.clock() - self.start
        if elapsed > self.seconds:
            of = f" of {total}" if total else ""
            raise BadInputError(
                f"download of {self.uri} too slow: {received}{of} bytes in {elapsed:.0f} s, over the "
                f"{self.seconds:g}-second limit",
                "serve the model from a faster store, or raise --download-timeout",
            )


@dataclass(frozen=True)
class FetchedSource:
    uri: str
    path: Path  # local file or directory (a SavedModel)
    sha256: str
    size_bytes: int


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a directory as the digest over its sorted relative paths and file contents."""
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(sha256_of(file)))
    return digest.hexdigest()


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def resolve_pvc(uri: str, pvc_root: str | None = None) -> Path:
    """Map pvc://claim/path to <RECSERVE_PVC_ROOT>/claim/path (the claim is mounted there), refusing '..'."""
    parsed = urlparse(uri)
    claim, rel = parsed.netloc, unquote(parsed.path).lstrip("/")
    if not claim or not rel:
        raise UsageError(f"bad PVC URI {uri!r}", "use pvc://<claim>/<path inside the volume>")
    if ".." in Path(rel).parts or claim == "..":
        raise UsageError(f"PVC URI {uri!r} escapes its volume", "remove '..' from the path")
    root = Path(pvc_root or os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))
    return root / claim / rel


def _local(path: Path, uri: str) -> Path:
    if not path.exists():
        raise BadInputError(f"model source {uri!r} does not exist ({path})", "check the path or the volume mount")
    return path


def _maybe_extract(path: Path, workdir: Path, limits: archive.Limits) -> Path:
    if not path.name.lower().endswith(archive.ARCHIVE_SUFFIXES):
        return path
    out = workdir / "extracted"
    archive.extract(path, out, limits)
    entries = list(out.iterdir())
    # An archive holding a single top-level directory (the usual `tar czf m.tgz saved_model/`) is that directory.
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else out


def _fetch_http(uri: str, dest: Path, max_bytes: int, *, show_progress: bool, retries: int, deadline: Deadline) -> Path:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(
        total=retries, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504), allowed_methods=["GET"]
    )
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    name = Path(urlparse(uri).path).name or "model"
    target = dest / name
    try:
        with session.get(uri, stream=True, timeout=(10, _READ_TIMEOUT_S)) as resp:
            if resp.status_code == 404:
                raise BadInputError(f"HTTP 404: {uri} not found", "check the URL (and that the object was uploaded)")
            if resp.status_code >= 400:
                raise BadInputError(f"HTTP {resp.status_code} fetching {uri}", "check the URL and its access rights")
            length = int(resp.headers.get("Content-Length") or 0)
            if length > max_bytes:
                raise BadInputError(
                    f"{uri} is {length} bytes, above the {max_bytes}-byte limit", "raise --max-download-bytes"
                )
            written = 0
            with target.open("wb") as f, progress_bar(length or None, f"download {name}", show_progress) as bar:
                # read1 returns what one socket read brings (iter_content blocks until a whole chunk arrives), so
                # a trickling source meets the deadline within one read timeout.
                while chunk := resp.raw.read1(_CHUNK, decode_content=True):
                    deadline.check(written, length or None)
                    written += len(chunk)
                    if written > max_bytes:
                        raise BadInputError(f"{uri} exceeds the {max_bytes}-byte limit", "raise --max-download-bytes")
                    f.write(chunk)
                    bar.update(len(chunk))
            if length and written != length:
                raise BadInputError(f"download of {uri} truncated ({written}/{length} bytes)", "retry the build")
    except requests.RequestException as exc:
        raise BadInputError(f"cannot download {uri}: {exc}", "check the URL and network access") from exc
    return target


def _s3_client(endpoint: str | None, env_prefix: str = "") -> Any:
    """An S3 client; with `env_prefix` its keys come from `<prefix>AWS_ACCESS_KEY_ID` etc. when those are set (the
    model store's Secret, beside the model source's own AWS_* keys), else from boto3's usual chain."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise MissingRuntimeError("boto3 is not installed", "pip install 'recserve[builder]'") from exc
    endpoint = endpoint or os.environ.get(f"{env_prefix}AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
    # Path-style addressing: S3-compatible stores (MinIO, SeaweedFS, Ceph) rarely do virtual-host buckets.
    cfg = Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"})
    keys: dict[str, Any] = {}
    if env_prefix and os.environ.get(f"{env_prefix}AWS_ACCESS_KEY_ID"):
        keys = {
            "aws_access_key_id": os.environ[f"{env_prefix}AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": os.environ.get(f"{env_prefix}AWS_SECRET_ACCESS_KEY"),
            "aws_session_token": os.environ.get(f"{env_prefix}AWS_SESSION_TOKEN"),
            "region_name": os.environ.get(f"{env_prefix}AWS_DEFAULT_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1",
        }
    return boto3.client("s3", endpoint_url=endpoint, config=cfg, **keys)


def _fetch_s3(
    uri: str, dest: Path, endpoint: str | None, max_bytes: int, *, show_progress: bool, deadline: Deadline
) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, unquote(parsed.path).lstrip("/")
    if not bucket or not key:
        raise UsageError(f"bad S3 URI {uri!r}", "use s3://<bucket>/<key> (a key ending in '/' fetches a prefix)")
    client = _s3_client(endpoint)
    try:
        if key.endswith("/"):
            # A prefix: a SavedModel directory uploaded object by object.
            out = dest / Path(key.rstrip("/")).name
            keys = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                keys += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
            if not keys:
                raise BadInputError(f"no objects under {uri}", "check the bucket and prefix")
            if sum(s for _, s in keys) > max_bytes:
                raise BadInputError(f"{uri} exceeds the {max_bytes}-byte limit", "raise --max-download-bytes")
            received = 0
            for obj_key, obj_size in keys:
                deadline.check(received, sum(s for _, s in keys))
                received += obj_size
                rel = obj_key[len(key) :]
                if not rel or ".." in Path(rel).parts:
                    continue
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj_key, str(out / rel))
            return out
        head = client.head_object(Bucket=bucket, Key=key)
        size = int(head["ContentLength"])
        if size > max_bytes:
            raise BadInputError(
                f"{uri} is {size} bytes, above the {max_bytes}-byte limit", "raise --max-download-bytes"
            )
        target = dest / Path(key).name
        got = [0]

        def progress(n: int) -> None:  # s3transfer fails the transfer with what a callback raises
            got[0] += n
            bar.update(n)
            deadline.check(got[0], size)

        with progress_bar(size, f"download {target.name}", show_progress) as bar:
            client.download_file(bucket, key, str(target), Callback=progress)
        return target
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise BadInputError(f"S3 object {uri} not found", "check the bucket, the key and the endpoint") from exc
        raise BadInputError(f"S3 error fetching {uri}: {exc}", "check credentials and the endpoint") from exc
    except BotoCoreError as exc:
        raise BadInputError(
            f"S3 client error for {uri}: {exc}",
            "check --s3-endpoint / AWS_ENDPOINT_URL and the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
        ) from exc


GCS_S3_ENDPOINT = "https://storage.googleapis.com"


def fetch(
    uri: str | Path,
    workdir: Path,
    *,
    sha256: str | None = None,
    s3_endpoint: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_extracted_bytes: int | None = None,
    download_timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
    show_progress: bool = False,
    retries: int = 3,
) -> FetchedSource:
    """Make `uri` available locally (remote sources are downloaded into `workdir`) and verify the sha256 pin.

    An archive is extracted into `workdir` within `max_extracted_bytes` (default: archive.EXTRACT_FACTOR times
    `max_bytes`); a directory source must not link outside itself. A download taking longer than
    `download_timeout_s` is abandoned."""
    uri = str(uri)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower() if len(parsed.scheme) > 1 else ""  # "C:" style drive letters are paths
    if scheme in ("", "file"):
        raw = _local(Path(unquote(parsed.path) if scheme == "file" else uri).expanduser(), uri)
    elif scheme == "pvc":
        raw = _local(resolve_pvc(uri), uri)
    elif scheme in ("http", "https"):
        deadline = Deadline(uri, download_timeout_s)
        raw = _fetch_http(uri, workdir, max_bytes, show_progress=show_progress, retries=retries, deadline=deadline)
    elif scheme == "s3":
        deadline = Deadline(uri, download_timeout_s)
        raw = _fetch_s3(uri, workdir, s3_endpoint, max_bytes, show_progress=show_progress, deadline=deadline)
    elif scheme == "gs":
        # Google Cloud Storage through its S3-compatible XML API (HMAC keys in AWS_ACCESS_KEY_ID/SECRET), so one
        # well-kept client (boto3) serves both clouds.
        endpoint = s3_endpoint or os.environ.get("GCS_ENDPOINT_URL") or GCS_S3_ENDPOINT
        deadline = Deadline(uri, download_timeout_s)
        raw = _fetch_s3(uri, workdir, endpoint, max_bytes, show_progress=show_progress, deadline=deadline)
    else:
        raise UsageError(
            f"unsupported source scheme {scheme!r} in {uri!r}",
            "use a path, file://, https://, pvc://, s3:// or gs://",
        )
    # The pin covers what was published (the archive itself when the source is one).
    digest = sha256_of(raw)
    if sha256 and digest != sha256.lower().strip():
        raise BadInputError(
            f"sha256 mismatch for {uri}: expected {sha256.lower().strip()}, got {digest}",
            "the source changed or the pin is wrong; re-check the artifact before building",
        )
    if raw.is_dir():
        archive.check_links(raw, uri)
        path = raw
    else:
        limits = archive.Limits(max_extracted_bytes or archive.EXTRACT_FACTOR * max_bytes)
        path = _maybe_extract(raw, workdir, limits)
    return FetchedSource(uri=uri, path=path, sha256=digest, size_bytes=_size_of(raw))
