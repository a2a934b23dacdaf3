"""Built model repositories as content-addressed artifacts in a model store (an S3-compatible bucket or a directory).

A build publishes the `<name>/` tree it wrote (config.pbtxt, `<version>/` with build.json, warmup/) under a key the
operator chooses, with `artifact.json` written last: the list of every file with its sha256 and size. The sha256
of `artifact.json` itself is the artifact's digest. A serving pod fetches by (key, digest): the manifest must hash
to the digest and every file to its manifest entry, or nothing is installed. Publishing a key that already holds
the same files rewrites nothing, so a re-run of a build reuses what is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from model_repo_builder.errors import BadInputError, UsageError

MANIFEST = "artifact.json"
FORMAT = 1
# The model store's Secret reaches a pod with this prefix (STORE_AWS_ACCESS_KEY_ID ...), so it never mixes with the
# model source's own AWS_* keys.
STORE_ENV_PREFIX = "STORE_"
_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_relpath(rel: str) -> PurePosixPath:
    """A manifest path may only name a file inside the tree: no absolute paths, no '..', no empty parts."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise BadInputError(f"artifact manifest names a path outside the model tree: {rel!r}",
                            "the artifact is corrupt or forged: rebuild it")  # fmt: skip
    return path


@dataclass(frozen=True)
class Manifest:
    """What an artifact holds: the model name and version, and each file's (path, sha256, size)."""

    name: str
    version: int
    files: tuple[tuple[str, str, int], ...]

    @classmethod
    def of_tree(cls, tree: Path, name: str, version: int) -> Manifest:
        files = []
        for path in sorted(p for p in tree.rglob("*") if p.is_file() or p.is_symlink()):
            if path.is_symlink():
                raise BadInputError(f"model tree holds a symlink: {path}", "a built repository holds plain files only")
            files.append((path.relative_to(tree).as_posix(), _sha256_file(path), path.stat().st_size))
        return cls(name, version, tuple(files))

    def to_bytes(self) -> bytes:
        data = {"format": FORMAT, "name": self.name, "version": self.version,
                "files": [{"path": p, "sha256": d, "size": s} for p, d, s in self.files]}  # fmt: skip
        return (json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise ValueError(f"unknown artifact format {data.get('format')!r}")
            files = tuple((str(f["path"]), str(f["sha256"]), int(f["size"])) for f in data["files"])
            return cls(str(data["name"]), int(data["version"]), files)
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInputError(f"artifact manifest is not valid: {exc}", "rebuild the artifact") from exc

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


class Store(Protocol):
    def prepare(self) -> None:
        """Make the store writable: create its bucket (or directory) when it does not exist yet."""
        ...

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        ...

    def write(self, key: str, data: bytes) -> None: ...

    def upload(self, key: str, path: Path) -> None: ...

    def download(self, key: str, path: Path) -> None: ...

    def keys(self, prefix: str) -> Iterator[str]: ...

    def modified(self, key: str) -> float:
        """When the object was last written (seconds since the epoch)."""
        ...

    def delete(self, keys: list[str]) -> None: ...


@dataclass(frozen=True)
class DirStore:
    """A directory as a store (a mounted PersistentVolume, or a local folder in development)."""

    root: Path

    def _path(self, key: str) -> Path:
        return self.root / _safe_relpath(key)

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def read(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers see the old object or the new one, never a part

    def upload(self, key: str, path: Path) -> None:
        self.write(key, path.read_bytes())

    def download(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise BadInputError(f"artifact file {key} is missing from the store", "rebuild the artifact")
        shutil.copyfile(source, path)

    def keys(self, prefix: str) -> Iterator[str]:
        """Every object under the folder `prefix` names ("a/b" and "a/b/" alike)."""
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if base.is_dir():
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    yield p.relative_to(self.root).as_posix()

    def modified(self, key: str) -> float:
        return self._path(key).stat().st_mtime

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)


@dataclass(frozen=True)
class S3Store:
    bucket: str
    prefix: str
    endpoint: str | None = None

    def _client(self) -> Any:
        from model_repo_builder.fetch import _s3_client

        return _s3_client(self.endpoint, env_prefix=STORE_ENV_PREFIX)

    def _key(self, key: str) -> str:
        _safe_relpath(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def prepare(self) -> None:
        """A store the chart runs (or a new bucket) starts empty: the first build creates the bucket."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()
        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) not in ("404", "NoSuchBucket", "NotFound"):
                raise _store_error(exc, f"s3://{self.bucket}") from exc
            try:
                client.create_bucket(Bucket=self.bucket)
            except ClientError as create:
                if str(create.response.get("Error", {}).get("Code", "")) not in (
                    "BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # fmt: skip
                    raise _store_error(create, f"s3://{self.bucket}") from create
        except BotoCoreError as exc:
            raise _store_error(exc, f"s3://{self.bucket}") from exc

    def read(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            body: bytes = self._client().get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            # A bucket not created yet (a store the chart just started) holds nothing either.
            if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                return None
            raise _store_error(exc, f"s3://{self.bucket}/{self._key(key)}") from exc
        return body

    def write(self, key: str, data: bytes) -> None:
        self._call("put_object", key, Body=data)

    def upload(self, key: str, path: Path) -> None:
        self._call("upload_file", key, Filename=str(path))

    def download(self, key: str, path: Path) -> None:
        self._call("download_file", key, Filename=str(path))

    def keys(self, prefix: str) -> Iterator[str]:
        """Every object under the folder `prefix` names ("a/b" and "a/b/" alike)."""
        folder = prefix.strip("/")
        full = (self._key(folder) + "/") if folder else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield str(obj["Key"])[strip:]

    def modified(self, key: str) -> float:
        head = self._client().head_object(Bucket=self.bucket, Key=self._key(key))
        return float(head["LastModified"].timestamp())

    def delete(self, keys: list[str]) -> None:
        client = self._client()
        for i in range(0, len(keys), 1000):  # the S3 API's batch limit
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def _call(self, method: str, key: str, **kwargs: Any) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if method in ("upload_file", "download_file"):
                filename = kwargs.pop("Filename")
                args = (filename, self.bucket, self._key(key)) if method == "upload_file" else (
                    self.bucket, self._key(key), filename)  # fmt: skip
                getattr(self._client(), method)(*args)
            else:
                getattr(self._client(), method)(Bucket=self.bucket, Key=self._key(key), **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise _store_error(exc, f"s3://{self.bucket}/{self._key(key)}") from exc


def _store_error(exc: Exception, where: str) -> BadInputError:
    return BadInputError(f"model store error at {where}: {exc}",
                         "check the model store's endpoint and the credentials Secret (AWS_ACCESS_KEY_ID, "
                         "AWS_SECRET_ACCESS_KEY)")  # fmt: skip


def open_store(url: str, endpoint: str | None = None) -> Store:
    """s3://bucket[/prefix] (S3-compatible, `endpoint` for non-AWS stores) or file:///dir / a path."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise UsageError(f"bad model store URL {url!r}", "use s3://<bucket>[/<prefix>]")
        return S3Store(parsed.netloc, unquote(parsed.path).strip("/"), endpoint)
    if parsed.scheme in ("", "file"):
        return DirStore(Path(unquote(parsed.path) if parsed.scheme == "file" else url))
    raise UsageError(f"unsupported model store URL {url!r}", "use s3://<bucket>[/<prefix>] or file:///<directory>")


@dataclass(frozen=True)
class Published:
    key: str
    digest: str
    reused: bool  # the key already held exactly these files


def publish(tree: Path, store: Store, key: str, *, name: str, version: int) -> Published:
    """Upload a built `<name>/` tree under `key`; `artifact.json` goes last, so a reader never sees a part."""
    manifest = Manifest.of_tree(tree, name, version)
    store.prepare()
    existing = store.read(f"{key}/{MANIFEST}")
    if existing is not None and existing == manifest.to_bytes():
        return Published(key, manifest.digest, reused=True)
    for rel, _, _ in manifest.files:
        store.upload(f"{key}/files/{rel}", tree / rel)
    store.write(f"{key}/{MANIFEST}", manifest.to_bytes())
    return Published(key, manifest.digest, reused=False)


def fetch_artifact(store: Store, key: str, digest: str, repo: Path) -> Path:
    """Install the artifact at `key` into `repo/<name>` after checking it against `digest`; returns that path.

    The manifest must hash to `digest` (the operator learnt it from the build), and each file to its entry; files
    land in a staging directory beside the target and are renamed in only when all of them check out."""
    raw = store.read(f"{key}/{MANIFEST}")
    if raw is None:
        raise BadInputError(f"no artifact at {key} in the model store", "the build did not publish it: rebuild")
    actual = hashlib.sha256(raw).hexdigest()
    if actual != digest.lower():
        raise BadInputError(f"artifact {key} has digest {actual}, expected {digest.lower()}",
                            "the store's copy changed since the build: rebuild the revision")  # fmt: skip
    manifest = Manifest.from_bytes(raw)
    target = repo / manifest.name
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=repo, prefix=".fetch-"))
    try:
        for rel, sha, size in manifest.files:
            dest = staging / _safe_relpath(rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            store.download(f"{key}/files/{rel}", dest)
            if dest.stat().st_size != size or _sha256_file(dest) != sha:
                raise BadInputError(f"artifact file {rel} does not match its manifest",
                                    "the store's copy is corrupt: rebuild the revision")  # fmt: skip
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def artifact_of(obj: str) -> str | None:
    """The artifact key a store object belongs to (`<key>/artifact.json`, `<key>/files/...`); None: not ours."""
    if "/files/" in obj:
        return obj.split("/files/", 1)[0]
    if obj.endswith(f"/{MANIFEST}"):
        return obj.removesuffix(f"/{MANIFEST}")
    return None


def collect(store: Store, prefix: str, keep: set[str], *, keep_recent: int = 0) -> list[str]:
    """Delete every artifact under `prefix` whose key is not in `keep`, sparing the `keep_recent` most recently
    published of the others (a quick return to a recent revision then fetches instead of rebuilding); returns the
    keys removed. An artifact without a manifest (a publication cut short) counts as the oldest."""
    by_artifact: dict[str, list[str]] = {}
    for obj in store.keys(prefix):
        key = artifact_of(obj)
        if key is not None:
            by_artifact.setdefault(key, []).append(obj)
    unused = [k for k in by_artifact if k not in keep]

    def published(key: str) -> float:
        return store.modified(f"{key}/{MANIFEST}") if f"{key}/{MANIFEST}" in by_artifact[key] else 0.0

    spared = set(sorted(unused, key=published, reverse=True)[:max(0, keep_recent)])
    gone = sorted(k for k in unused if k not in spared)
    for key in gone:
        # The manifest first: a half-deleted artifact is then one nobody can fetch, never one that fails its check.
        objs = sorted(by_artifact[key], key=lambda o: not o.endswith(MANIFEST))
        store.delete(objs)
    return gone
