"""Published artifacts: a built tree into a model store (a directory, and a real SeaweedFS S3 bucket) and back."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from model_repo_builder import artifact as A
from model_repo_builder.cli import main as cli_main
from model_repo_builder.errors import BadInputError
from tests.builder.conftest import S3Server


def _tree(root: Path) -> Path:
    tree = root / "ctr"
    (tree / "3").mkdir(parents=True)
    (tree / "warmup").mkdir()
    (tree / "config.pbtxt").write_text('name: "ctr"\n')
    (tree / "3" / "model.onnx").write_bytes(b"\x08\x07onnx-bytes" * 1000)
    (tree / "3" / "build.json").write_text('{"name": "ctr"}\n')
    (tree / "warmup" / "dense").write_bytes(b"\x00" * 64)
    return tree


@pytest.fixture(params=["dir", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> A.Store:
    if request.param == "dir":
        return A.open_store(f"file://{tmp_path / 'store'}")
    server: S3Server = request.getfixturevalue("s3_server")
    return A.open_store(f"s3://{server.bucket}/artifacts-{tmp_path.name}", server.endpoint)


def test_a_published_tree_comes_back_byte_for_byte_when_its_digest_matches(tmp_path: Path, store: A.Store) -> None:
    tree = _tree(tmp_path / "build")
    pub = A.publish(tree, store, "shop/ctr/abc", name="ctr", version=3)
    manifest = store.read("shop/ctr/abc/artifact.json")
    assert manifest is not None and hashlib.sha256(manifest).hexdigest() == pub.digest and not pub.reused
    assert {f["path"] for f in json.loads(manifest)["files"]} == {
        "config.pbtxt", "3/model.onnx", "3/build.json", "warmup/dense"
    }

    installed = A.fetch_artifact(store, "shop/ctr/abc", pub.digest, tmp_path / "models")
    assert installed == tmp_path / "models" / "ctr"
    for f in tree.rglob("*"):
        if f.is_file():
            assert (installed / f.relative_to(tree)).read_bytes() == f.read_bytes()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["ctr"]  # no staging left behind

    again = A.publish(tree, store, "shop/ctr/abc", name="ctr", version=3)
    assert again.reused and again.digest == pub.digest


def test_a_wrong_digest_or_a_changed_file_installs_nothing(tmp_path: Path, store: A.Store) -> None:
    pub = A.publish(_tree(tmp_path / "build"), store, "shop/ctr/abc", name="ctr", version=3)
    with pytest.raises(BadInputError, match="expected " + "0" * 64):
        A.fetch_artifact(store, "shop/ctr/abc", "0" * 64, tmp_path / "models")
    store.write("shop/ctr/abc/files/3/model.onnx", b"tampered")
    with pytest.raises(BadInputError, match=r"3/model\.onnx does not match its manifest"):
        A.fetch_artifact(store, "shop/ctr/abc", pub.digest, tmp_path / "models")
    assert not (tmp_path / "models" / "ctr").exists()
    assert not list((tmp_path / "models").iterdir())
    with pytest.raises(BadInputError, match="no artifact at shop/ctr/nope"):
        A.fetch_artifact(store, "shop/ctr/nope", pub.digest, tmp_path / "models")


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", "a//b"])
def test_a_manifest_naming_a_path_outside_the_tree_is_refused(tmp_path: Path, path: str) -> None:
    store = A.open_store(str(tmp_path / "store"))
    forged = {"format": 1, "name": "ctr", "version": 1, "files": [{"path": path, "sha256": "0" * 64, "size": 1}]}
    raw = json.dumps(forged).encode()
    store.write("k/artifact.json", raw)
    with pytest.raises(BadInputError, match="outside the model tree"):
        A.fetch_artifact(store, "k", hashlib.sha256(raw).hexdigest(), tmp_path / "models")
    assert not (tmp_path / "escape").exists()


def test_a_tree_with_a_symlink_is_not_published(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "build")
    (tree / "3" / "link").symlink_to("/etc/passwd")
    with pytest.raises(BadInputError, match="symlink"):
        A.publish(tree, A.open_store(str(tmp_path / "store")), "k", name="ctr", version=3)


def test_collect_keeps_the_named_artifacts_and_removes_the_rest(tmp_path: Path, store: A.Store) -> None:
    tree = _tree(tmp_path / "build")
    for key in ("shop/ctr/a", "shop/ctr/b", "shop/ctr/c", "shop/other/a"):
        A.publish(tree, store, key, name="ctr", version=3)
    assert A.collect(store, "shop/ctr/", {"shop/ctr/b"}) == ["shop/ctr/a", "shop/ctr/c"]
    remaining = {A.artifact_of(k) for k in store.keys("shop/")}
    assert remaining == {"shop/ctr/b", "shop/other/a"}


def test_the_cli_reuses_a_published_key_and_fetches_it_with_its_digest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`build --store --artifact-key --reuse` on a key that exists builds nothing and reports the digest (also in the
    termination log); `fetch-artifact` installs it. A source that does not exist proves nothing was built."""
    store_url = f"file://{tmp_path / 'store'}"
    pub = A.publish(_tree(tmp_path / "build"), A.open_store(store_url), "shop/ctr/abc", name="ctr", version=3)
    log = tmp_path / "termination-log"
    code = cli_main(["build", "--source", str(tmp_path / "missing.onnx"), "--repo", str(tmp_path / "repo"),
                     "--store", store_url, "--artifact-key", "shop/ctr/abc", "--reuse", "--termination-log", str(log),
                     "--json"])  # fmt: skip
    assert code == 0
    brief = json.loads(log.read_text())
    assert brief["artifact"] == {"key": "shop/ctr/abc", "digest": pub.digest, "reused": True}
    capsys.readouterr()
    code = cli_main(["fetch-artifact", "--store", store_url, "--artifact-key", "shop/ctr/abc", "--digest", pub.digest,
                     "--repo", str(tmp_path / "models"), "--json"])  # fmt: skip
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "ok"
    assert (tmp_path / "models" / "ctr" / "3" / "model.onnx").is_file()
    assert cli_main(["fetch-artifact", "--store", store_url, "--artifact-key", "shop/ctr/abc", "--digest", "1" * 64,
                     "--repo", str(tmp_path / "other")]) == 3  # fmt: skip


def test_a_real_build_publishes_to_s3_and_the_fetched_tree_equals_the_built_one(
    tmp_path: Path, ctr_keras: Path, s3_server: S3Server
) -> None:
    """Keras -> ONNX -> parity gate -> published to SeaweedFS; the fetched tree holds the same files as the build's
    own repository, and the build's report names the digest it published."""
    store = f"s3://{s3_server.bucket}/real-{tmp_path.name}"
    log = tmp_path / "termination-log"
    code = cli_main(["build", "--source", str(ctr_keras), "--name", "ctr", "--version", "1", "--repo",
                     str(tmp_path / "repo"), "--store", store, "--store-endpoint", s3_server.endpoint,
                     "--artifact-key", "shop/ctr/r1", "--termination-log", str(log), "--json"])  # fmt: skip
    assert code == 0
    digest = json.loads(log.read_text())["artifact"]["digest"]
    fetched = A.fetch_artifact(A.open_store(store, s3_server.endpoint), "shop/ctr/r1", digest, tmp_path / "models")
    built = tmp_path / "repo" / "ctr"
    files = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file())
    assert all((fetched / f).read_bytes() == (built / f).read_bytes() for f in files)
    assert "1/model.onnx" in files and "1/build.json" in files


def test_collect_spares_the_most_recently_published_unused_artifacts(tmp_path: Path) -> None:
    store = A.open_store(str(tmp_path / "store"))
    tree = _tree(tmp_path / "build")
    for i, key in enumerate(("m/a", "m/b", "m/c", "m/d")):
        A.publish(tree, store, key, name="ctr", version=3)
        manifest = tmp_path / "store" / key / "artifact.json"
        os.utime(manifest, (1_000_000 + i, 1_000_000 + i))  # published in this order
    assert A.collect(store, "m/", {"m/a"}, keep_recent=2) == ["m/b"]
    assert {A.artifact_of(k) for k in store.keys("m")} == {"m/a", "m/c", "m/d"}


def test_the_first_publication_creates_the_bucket(tmp_path: Path, s3_server: S3Server) -> None:
    """A store the chart just started is empty: publishing creates its bucket, a second publication reuses it."""
    bucket = f"fresh-{tmp_path.name.lower().replace('_', '-')}"[:60]
    store = A.open_store(f"s3://{bucket}/artifacts", s3_server.endpoint)
    assert store.read("shop/ctr/a/artifact.json") is None  # what `build --reuse` asks first
    pub = A.publish(_tree(tmp_path / "build"), store, "shop/ctr/a", name="ctr", version=3)
    assert A.publish(_tree(tmp_path / "again"), store, "shop/ctr/a", name="ctr", version=3).reused
    assert A.fetch_artifact(store, "shop/ctr/a", pub.digest, tmp_path / "models").is_dir()
