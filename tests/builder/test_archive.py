"""Hostile model archives, made here: bombs, paths that climb out, links and devices are refused naming the member,
and nothing is written outside the extraction directory."""

from __future__ import annotations

import io
import stat
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from model_repo_builder import archive
from model_repo_builder import fetch as F
from model_repo_builder.errors import BadInputError
from tests.builder.helpers import run_cli, snapshot

MiB = 1 << 20
LIMITS = archive.Limits(max_bytes=8 * MiB, max_members=20)


def _zip(path: Path, *members: tuple[zipfile.ZipInfo | str, bytes]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": one case writes a member twice on purpose
        for info, data in members:
            zf.writestr(info, data)
    return path


def _zip_entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: the mode below is read from the top bits of external_attr
    info.external_attr = mode << 16
    return info


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w:gz", format=fmt) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _tar_entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


ZEROS = bytes(64 * MiB)  # deflates to ~64 KiB: a bomb against the 8 MiB limit

# name -> (writes the archive under the given directory, what the error says)
CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "a zip member with '..' climbs out": (
        lambda d: _zip(d / "m.zip", ("sm/saved_model.pb", b"pb"), ("../../evil.txt", b"x")),
        r"'\.\./\.\./evil\.txt' is an absolute path or climbs out",
    ),
    "a zip member with an absolute path": (
        lambda d: _zip(d / "m.zip", ("/tmp/evil.txt", b"x")), r"'/tmp/evil\.txt' is an absolute path",
    ),
    "a zip member with windows separators and '..'": (
        lambda d: _zip(d / "m.zip", ("..\\..\\evil.txt", b"x")), r"climbs out with '\.\.'",
    ),
    "a zip symlink entry (S_IFLNK in external_attr)": (
        lambda d: _zip(d / "m.zip", (_zip_entry("sm/link", stat.S_IFLNK | 0o777), b"/etc/passwd")),
        r"'sm/link' is a symbolic link",
    ),
    "a zip device entry": (
        lambda d: _zip(d / "m.zip", (_zip_entry("sm/dev", stat.S_IFCHR | 0o600), b"")),
        r"'sm/dev' is a device, FIFO or socket",
    ),
    "a zip bomb": (
        lambda d: _zip(d / "m.zip", ("sm/variables.data", ZEROS)),
        r"'sm/variables\.data' declares 67108864 bytes, taking the extracted size past the 8388608-byte limit",
    ),
    "zip members that add up past the limit": (
        lambda d: _zip(d / "m.zip", *[(f"sm/part{i}", bytes(3 * MiB)) for i in range(3)]),
        r"'sm/part2' declares 3145728 bytes, taking the extracted size past the 8388608-byte limit",
    ),
    "a zip with more members than allowed": (
        lambda d: _zip(d / "m.zip", *[(f"sm/f{i}", b"x") for i in range(21)]),
        r"has 21 members, above the limit of 20",
    ),
    "a zip member twice": (
        lambda d: _zip(d / "m.zip", ("sm/a", b"1"), ("sm/a", b"2")), r"'sm/a' is in the archive twice",
    ),
    "a tar member with '..' climbs out": (
        lambda d: _tar(d / "m.tgz", (_tar_entry("../../evil.txt"), b"x")), r"'\.\./\.\./evil\.txt' is an absolute",
    ),
    "a tar member with an absolute path": (
        lambda d: _tar(d / "m.tgz", (_tar_entry("/tmp/evil.txt"), b"x")), r"'/tmp/evil\.txt' is an absolute path",
    ),
    "a tar symlink out of the tree": (
        lambda d: _tar(d / "m.tgz", (_tar_entry("sm/vars", tarfile.SYMTYPE, "/etc"), None),
                       (_tar_entry("sm/vars/passwd"), b"x")),
        r"'sm/vars' is a symbolic link \(to '/etc'\)",
    ),
    "a tar symlink even within the tree": (
        lambda d: _tar(d / "m.tgz", (_tar_entry("sm/a"), b"x"), (_tar_entry("sm/b", tarfile.SYMTYPE, "a"), None)),
        r"'sm/b' is a symbolic link \(to 'a'\)",
    ),
    "a tar hard link out of the tree": (
        lambda d: _tar(d / "m.tgz", (_tar_entry("sm/passwd", tarfile.LNKTYPE, "/etc/passwd"), None)),
        r"'sm/passwd' is a hard link \(to '/etc/passwd'\)",
    ),
    "a tar character device": (
        lambda d: _tar(d / "m.tgz", (_tar_entry("sm/null", tarfile.CHRTYPE), None)), r"'sm/null' is a device file",
    ),
    "a tar FIFO": (
        lambda d: _tar(d / "m.tgz", (_tar_entry("sm/pipe", tarfile.FIFOTYPE), None)), r"'sm/pipe' is a FIFO",
    ),
    "a tar.gz bomb": (
        lambda d: _tar(d / "m.tgz", (_tar_entry("sm/variables.data"), ZEROS)),
        r"'sm/variables\.data' declares 67108864 bytes, taking the extracted size past the 8388608-byte limit",
    ),
    "a tar with more members than allowed": (
        lambda d: _tar(d / "m.tgz", *[(_tar_entry(f"sm/f{i}"), b"x") for i in range(21)]),
        r"more members \(at 'sm/f20'\), above the limit of 20",
    ),
    "a tar pax header of megabytes (read into memory whole)": (
        lambda d: _tar(d / "m.tgz", (_with_pax(_tar_entry("sm/a"), {"comment": "x" * (2 * MiB)}), b"x")),
        r"carries a \d+-byte metadata header \(at most 1048576 bytes are read\)",
    ),
    "a tar GNU long name of megabytes": (
        lambda d: _tar(d / "m.tgz", (_tar_entry("sm/" + "a" * (2 * MiB)), b"x"), fmt=tarfile.GNU_FORMAT),
        r"carries a \d+-byte metadata header",
    ),
    "a corrupt archive": (
        lambda d: _write(d / "m.tgz", b"\x1f\x8b\x08\x00" + bytes(100)), r"cannot extract archive m\.tgz",
    ),
}


def _with_pax(info: tarfile.TarInfo, headers: dict[str, str]) -> tarfile.TarInfo:
    info.pax_headers = headers
    return info


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_hostile_archive_is_refused_naming_the_member_and_nothing_is_written_outside(
    case: str, tmp_path: Path
) -> None:
    make, message = CASES[case]
    src, work = tmp_path / "src", tmp_path / "work"
    src.mkdir()
    work.mkdir()
    path = make(src)
    before = snapshot(tmp_path)
    with pytest.raises(BadInputError, match=message) as info:
        archive.extract(path, work / "extracted", LIMITS)
    assert info.value.exit_code == 3 and info.value.hint
    # The refusal leaves no partial extraction behind and nothing appeared anywhere else under the test's tree.
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "make",
    [
        lambda d: _zip(d / "m.zip", ("../evil.txt", b"x")),
        lambda d: _tar(d / "m.tgz", (_tar_entry("sm/vars", tarfile.SYMTYPE, "/etc"), None)),
        lambda d: _zip(d / "m.zip", ("sm/variables.data", ZEROS)),
    ],
    ids=["a path that climbs out", "a symlink", "a bomb above twice the download limit"],
)
def test_fetch_refuses_hostile_archives_with_the_default_limits_and_leaves_the_workdir_as_it_was(
    make: Callable[[Path], Path], tmp_path: Path
) -> None:
    src, work = tmp_path / "src", tmp_path / "work"
    src.mkdir()
    work.mkdir()
    path = make(src)
    before = snapshot(tmp_path)
    # The extraction limit follows the download limit: twice 16 MiB is below the bomb's 64 MiB.
    with pytest.raises(BadInputError, match=r"archive m\.(zip|tgz)"):
        F.fetch(str(path), work, max_bytes=16 * MiB)
    assert snapshot(tmp_path) == before


def test_a_well_formed_archive_extracts_within_the_limits(tmp_path: Path) -> None:
    tree = {"sm/saved_model.pb": b"pb", "sm/variables/variables.index": b"idx", "sm/assets/vocab.txt": b"a\nb\n"}
    for path in (
        _zip(tmp_path / "m.zip", ("sm/", b""), *tree.items()),
        _tar(tmp_path / "m.tgz", (_dir_entry("sm"), None), *[(_tar_entry(k), v) for k, v in tree.items()]),
    ):
        work = tmp_path / f"work-{path.suffix}"
        work.mkdir()
        got = F.fetch(str(path), work, max_extracted_bytes=sum(map(len, tree.values())))
        assert got.path == work / "extracted" / "sm"
        assert {p.relative_to(work / "extracted").as_posix(): p.read_bytes() for p in got.path.rglob("*")
                if p.is_file()} == tree  # fmt: skip


def _dir_entry(name: str) -> tarfile.TarInfo:
    info = _tar_entry(name, tarfile.DIRTYPE)
    info.mode = 0o755
    return info


def test_bytes_are_counted_as_written_not_as_the_header_declares(tmp_path: Path) -> None:
    budget = archive._Budget("m.zip", archive.Limits(max_bytes=3 * MiB))
    budget.declare("sm/w", 10)  # the header claims 10 bytes ...
    with pytest.raises(BadInputError, match=r"'sm/w' extracts to more bytes than its header says"):
        archive._copy(io.BytesIO(bytes(4 * MiB)), tmp_path / "w", "sm/w", budget)  # ... the stream holds 4 MiB
    assert (tmp_path / "w").stat().st_size <= 3 * MiB


@pytest.mark.parametrize(
    ("target", "refused"),
    [("/etc", True), ("../outside", True), ("variables.index", False)],
    ids=["a link to /etc", "a link to a sibling of the model directory", "a link within the model directory"],
)
def test_a_model_directory_may_not_link_outside_itself(tmp_path: Path, target: str, refused: bool) -> None:
    (tmp_path / "outside").mkdir()
    model = tmp_path / "sm"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"pb")
    (model / "variables.index").write_bytes(b"idx")
    (model / "link").symlink_to(target)
    if refused:
        with pytest.raises(BadInputError, match=rf"link is a symbolic link to '{target}', outside the model"):
            F.fetch(str(model), tmp_path)
    else:
        assert F.fetch(str(model), tmp_path).path == model


def test_the_cli_refuses_a_bomb_above_max_extracted_bytes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bomb = _tar(tmp_path / "model.tgz", (_tar_entry("sm/saved_model.pb"), ZEROS))
    repo = tmp_path / "repo"
    r = run_cli(capsys, "build", "--source", bomb, "--repo", repo, "--name", "m", "--max-extracted-bytes", str(MiB),
                "--json")  # fmt: skip
    assert r.code == 3, r.err
    err = r.json
    assert err["error_type"] == "BadInputError" and "--max-extracted-bytes" in err["hint"]
    assert "'sm/saved_model.pb' declares 67108864 bytes" in err["error"] and "1048576-byte limit" in err["error"]
    assert not [p for p in repo.rglob("*") if p.is_file()]
