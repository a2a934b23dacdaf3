"""Model archives (tar, zip) extracted within limits, and model trees checked for links that leave them."""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Self

from model_repo_builder.errors import BadInputError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# The extracted tree may be this many times the download limit: model weights compress poorly, bombs compress well.
EXTRACT_FACTOR = 2
DEFAULT_MAX_MEMBERS = 10_000  # a SavedModel is a handful of files; vocabularies and assets add dozens
# GNU long-name and pax headers are read into memory whole: a real one holds a path, not megabytes.
MAX_METADATA_HEADER = 1 << 20
_CHUNK = 1 << 20
_LAYOUT_HINT = "an archive of a model holds its regular files and directories only: rebuild it (tar czf m.tgz model/)"
_SIZE_HINT = "raise --max-extracted-bytes if the model really is this large (or --max-download-bytes, which scales it)"
# Everything a corrupt, truncated or unsupported archive raises while it is read.
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError,
                RuntimeError, NotImplementedError)  # fmt: skip


@dataclass(frozen=True)
class Limits:
    max_bytes: int  # bytes written for all members together
    max_members: int = DEFAULT_MAX_MEMBERS


class _Budget:
    """What one extraction has written so far, against its limits; refusals name the archive and the member."""

    def __init__(self, archive: str, limits: Limits) -> None:
        self.archive, self.limits = archive, limits
        self.members = 0
        self.written = 0

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise self.too_many(f"more members (at {name!r})")

    def too_many(self, what: str) -> BadInputError:
        return BadInputError(
            f"archive {self.archive} has {what}, above the limit of {self.limits.max_members}", _LAYOUT_HINT
        )

    def declare(self, name: str, size: int) -> None:
        """Refuse a member whose header alone takes the total past the limit, before any of it is written."""
        if self.written + size > self.limits.max_bytes:
            raise self._too_large(name, f"declares {size} bytes")

    def add(self, name: str, size: int) -> None:
        """Count bytes really written: a header's size is a claim, the stream is the fact."""
        self.written += size
        if self.written > self.limits.max_bytes:
            raise self._too_large(name, "extracts to more bytes than its header says")

    def _too_large(self, name: str, what: str) -> BadInputError:
        return BadInputError(
            f"archive {self.archive}: member {name!r} {what}, taking the extracted size past the "
            f"{self.limits.max_bytes}-byte limit (a decompression bomb, or a model larger than allowed)",
            _SIZE_HINT,
        )


def member_path(name: str, archive: str) -> PurePosixPath:
    """The member's path relative to the extraction directory; absolute paths and '..' are refused."""
    parts = name.replace("\\", "/").split("/")
    drive = len(name) > 1 and name[1] == ":"
    if name.startswith(("/", "\\")) or drive or ".." in parts or "\0" in name:
        raise BadInputError(
            f"archive {archive}: member {name!r} is an absolute path or climbs out with '..'", _LAYOUT_HINT
        )
    return PurePosixPath(*[p for p in parts if p not in ("", ".")])


def _refuse(archive: str, name: str, what: str) -> BadInputError:
    return BadInputError(f"archive {archive}: member {name!r} is {what}", _LAYOUT_HINT)


def _target(out: Path, rel: PurePosixPath, archive: str) -> Path:
    target = out.joinpath(rel)
    # Links are refused, so no parent can lead elsewhere; checked anyway, since this is the promise that matters.
    if not target.resolve().is_relative_to(out.resolve()):
        raise _refuse(archive, str(rel), "outside the extraction directory")
    return target


def _copy(src: IO[bytes], target: Path, name: str, budget: _Budget) -> None:
    """Stream one member into a new file (never through an existing file or link), counting what is written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise _refuse(budget.archive, name, "in the archive twice") from None
    with os.fdopen(fd, "wb") as f:
        while chunk := src.read(_CHUNK):
            budget.add(name, len(chunk))
            f.write(chunk)


def _zip_kind(info: zipfile.ZipInfo) -> str:
    """'dir', 'file', or what else the member is: zip keeps a unix file type in the top bits of external_attr."""
    mode = info.external_attr >> 16
    if info.is_dir():
        return "dir"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_IFMT(mode) in (0, stat.S_IFREG):  # archivers that are not unix leave the type bits empty
        return "file"
    return "a device, FIFO or socket"


def _extract_zip(path: Path, out: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > budget.limits.max_members:
            raise budget.too_many(f"{len(infos)} members")
        for info in infos:
            budget.member(info.filename)
            target = _target(out, member_path(info.filename, budget.archive), budget.archive)
            kind = _zip_kind(info)
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            if kind != "file":
                raise _refuse(budget.archive, info.filename, kind)
            budget.declare(info.filename, info.file_size)
            with zf.open(info) as src:
                _copy(src, target, info.filename, budget)


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header that refuses oversized long-name and pax headers, which tarfile would read into memory whole."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        info = super().frombuf(buf, encoding, errors)
        metadata = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE)  # fmt: skip
        if info.type in metadata and info.size > MAX_METADATA_HEADER:
            raise BadInputError(
                f"archive member {info.name!r} carries a {info.size}-byte metadata header "
                f"(at most {MAX_METADATA_HEADER} bytes are read)",
                _LAYOUT_HINT,
            )
        return info


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isdir():
        return "dir"
    if member.isreg():
        return "file"
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device file"
    return "a FIFO or another special file"


def _extract_tar(path: Path, out: Path, budget: _Budget) -> None:
    with tarfile.open(path, "r:*", tarinfo=_BoundedTarInfo) as tf:
        # Iterated, not listed: a refusal stops before the next header is read (and a bomb's data decompressed).
        for member in tf:
            budget.member(member.name)
            target = _target(out, member_path(member.name, budget.archive), budget.archive)
            kind = _tar_kind(member)
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            if kind != "file":
                raise _refuse(budget.archive, member.name, kind)
            budget.declare(member.name, member.size)
            src = tf.extractfile(member)
            if src is None:  # cannot happen for a regular file; kept so a change in tarfile fails loudly here
                raise _refuse(budget.archive, member.name, "unreadable")
            with src:
                _copy(src, target, member.name, budget)


def extract(path: Path, out: Path, limits: Limits) -> None:
    """Extract the tar or zip archive `path` into the new directory `out`: regular files and directories only,
    at most `limits` bytes and members, nothing written outside `out`. Any refusal is a BadInputError naming the
    member, and leaves no `out` behind."""
    out.mkdir()
    budget = _Budget(path.name, limits)
    try:
        if path.name.lower().endswith(".zip"):
            _extract_zip(path, out, budget)
        else:
            _extract_tar(path, out, budget)
    except BadInputError:
        shutil.rmtree(out, ignore_errors=True)
        raise
    except _READ_ERRORS as exc:
        shutil.rmtree(out, ignore_errors=True)
        raise BadInputError(f"cannot extract archive {path.name}: {exc}", "re-upload a valid archive") from exc


def check_links(root: Path, uri: str) -> None:
    """Refuse a model directory with a symbolic link that resolves outside it (a volume's files are read as-is)."""
    top = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(top):
                raise BadInputError(
                    f"model source {uri!r}: {entry.relative_to(root)} is a symbolic link to "
                    f"{os.readlink(entry)!r}, outside the model directory",
                    "copy the files the link points to into the model directory",
                )
