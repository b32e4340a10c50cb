"""Reading image-folder archives (``.tar.gz``/``.tgz``/``.tar`` or ``.zip``) in memory.

Archives are never extracted, yet every member goes through one safety check
(:func:`check_member`) for tar and zip alike, so an archive that would write outside its folder
if someone did extract it is refused rather than half-trusted. A name that occurs twice is
refused too (an extractor keeps the last copy, a reader would count both). A tar hardlink is
read as the file it links to; a symlink inside the folder is skipped (neither read nor counted)
and reported on stderr. The layout, the limits and the decoding are :mod:`onecycle.data.imagefolder`'s.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from onecycle.data.imagefolder import Layout, Pick, assemble
from onecycle.data.images import Limits
from onecycle.data.prepared import Dataset
from onecycle.errors import DataError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")  # matched case-insensitively
TAR_SUFFIXES = ARCHIVE_SUFFIXES[:3]
# What a damaged archive raises while being read (zlib.error: bad deflate data in a .zip;
# OSError covers gzip.BadGzipFile, e.g. a failed CRC check).
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError)

# "special": a device or FIFO (refused); "other": a member type neither reader knows, e.g. a GNU
# tar volume label: only its name is checked (as tarfile's data_filter does), and it is skipped.
MemberKind = Literal["file", "dir", "symlink", "hardlink", "special", "other"]


# ---------------------------------------------------------------- member safety


def _is_absolute(name: str) -> bool:
    # "\\x" and "C:x" too: extracted on Windows, they would land outside the folder.
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":")


def _escapes(name: str) -> bool:
    norm = posixpath.normpath(name)
    return norm == ".." or norm.startswith("../")


def check_member(
    archive: Path, name: str, kind: MemberKind, link_target: str | None = None
) -> None:
    """Refuse the archive over a member that could land outside its folder when extracted.

    The one rule set for tar and zip: no absolute name, no name climbing out through ``..``, no
    device or FIFO, and no link (``link_target`` set) whose target is absolute or lands outside
    the folder; a symlink's target is relative to its own folder, a hardlink's to the archive's.
    """
    if _is_absolute(name):
        raise DataError(f"{archive}: member {name!r} has an absolute path; refusing the archive")
    if _escapes(name):
        raise DataError(
            f"{archive}: member {name!r} escapes the target folder; refusing the archive"
        )
    if kind == "special":
        raise DataError(f"{archive}: member {name!r} is a device or FIFO; refusing the archive")
    if kind in ("symlink", "hardlink"):
        target = link_target or ""
        lands = target
        if kind == "symlink":
            lands = posixpath.join(posixpath.dirname(posixpath.normpath(name)), target)
        if posixpath.isabs(target) or _escapes(lands):
            raise DataError(
                f"{archive}: link {name!r} -> {link_target!r} points outside the archive; "
                "refusing the archive"
            )


def check_unique(archive: Path, name: str, seen: set[str]) -> str:
    """Refuse a second member of the same (normalised) name; returns that name.

    Extracting would keep only the last copy while a reader would count both, so the archive
    does not say which images it holds.
    """
    key = posixpath.normpath(name)
    if key in seen:
        raise DataError(
            f"{archive}: member {name!r} occurs more than once; refusing the archive (rebuild "
            "it with each file once)"
        )
    seen.add(key)
    return key


def _tar_kind(member: tarfile.TarInfo) -> MemberKind:
    if member.isfile():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr() or member.isblk() or member.isfifo():
        return "special"
    return "other"


def _zip_kind(info: zipfile.ZipInfo) -> MemberKind:
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symlink"
    return "dir" if info.is_dir() else "file"


def tar_members(
    tar: tarfile.TarFile, archive: Path, check_end: bool = True
) -> Iterator[tarfile.TarInfo]:
    """Yield members, each through :func:`check_member`.

    Then (``check_end``) check that the archive really ended: tarfile stops without a word at a
    damaged header (or a plain .tar cut at a member boundary), which would silently drop every
    image after it. An MD5-verified official archive needs no such check.
    """
    for member in tar:
        kind = _tar_kind(member)
        link = member.linkname if kind in ("symlink", "hardlink") else None
        # The rules of tarfile's data_filter, without its file-system lookups (a quarter of
        # the download stage): nothing is extracted, so no real path needs resolving.
        check_member(archive, member.name, kind, link)
        yield member
    if check_end:
        _check_tar_end(tar, archive)


def _check_tar_end(tar: tarfile.TarFile, archive: Path) -> None:
    """After the last member, only the end-of-archive zero blocks may follow.

    Reading to the end also makes a compressed stream check its CRC (gzip.BadGzipFile).
    """
    tar.fileobj.seek(tar.offset)
    zeros = 0
    while block := tar.fileobj.read(1 << 20):
        if block.strip(b"\0"):
            raise DataError(
                f"{archive}: corrupt archive: unreadable member header at byte {tar.offset} "
                f"(after {len(tar.members)} members)"
            )
        zeros += len(block)
    if zeros < tarfile.BLOCKSIZE:
        raise DataError(
            f"{archive}: truncated archive: it stops after {len(tar.members)} members with no "
            "end-of-archive marker"
        )


# ---------------------------------------------------------------- the two readers


def _link_target(
    archive: Path, member: tarfile.TarInfo, files: dict[str, tarfile.TarInfo]
) -> tarfile.TarInfo:
    """The earlier file member a hardlink names (tar stores a second link to a file this way)."""
    target = files.get(posixpath.normpath(member.linkname))
    if target is None:
        raise DataError(
            f"{archive}: hardlink {member.name!r} -> {member.linkname!r} names no file earlier "
            "in the archive; refusing the archive"
        )
    return target


def _check_declared_total(path: Path, members: list[tarfile.TarInfo], limits: Limits) -> None:
    """The image files' sizes summed from the member headers alone (``tar.getmembers()``: one
    walk through the stream, no file read) and refused past ``data.max_total_mb`` before any
    file is read: checked while reading instead, 40 members of 63 MiB of zeros held 2.1 GB
    before the refusal. The reader then goes over the same headers, not a second walk (that
    took half of the 8 s a 640-image subset of CIFAR-10's tar.gz cost)."""
    layout, total = Layout(str(path)), 0
    for member in members:
        if member.isfile() and layout.place(member.name, is_dir=False):
            total += member.size
            limits.check_total(path, total)


def class_count(path: Path) -> int | None:
    """The classes (``train/<class>/`` folders holding a file) of an image-folder archive,
    from its names alone: a zip's central directory, a tar's headers (read through, nothing
    kept). None where it holds no such layout (an official archive) or cannot be read: the
    download stage says why."""
    layout = Layout(str(path))
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir()]
        else:
            with tarfile.open(path, "r:*") as tar:
                names = [m.name for m in tar if m.isfile()]
    except ARCHIVE_ERRORS:
        return None
    classes = {
        placed[1]
        for n in names
        if (placed := layout.place(n, is_dir=False)) and placed[0] == "train"
    }
    return len(classes) or None


def read_image_folder_tar(
    path: Path, image_size: int, limits: Limits, pick: Pick | None = None
) -> Dataset:
    layout = Layout(str(path))
    blobs: dict[str, bytes] = {}  # by member name; a hardlink shares its target's bytes
    seen: set[str] = set()
    files: dict[str, tarfile.TarInfo] = {}  # file members so far, for the hardlinks that follow
    total = 0  # bytes read into blobs
    try:
        with tarfile.open(path, "r:*") as tar:
            _check_declared_total(path, tar.getmembers(), limits)
            for member in tar_members(tar, path):
                if member.isdir():
                    layout.place(member.name, is_dir=True)
                    continue
                key = check_unique(path, member.name, seen)
                if member.issym():  # a link inside the folder (checked above): skipped
                    layout.skipped_links.append(member.name)
                if not (member.isfile() or member.islnk()):
                    continue
                target = _link_target(path, member, files) if member.islnk() else member
                files[key] = target
                placed = layout.place(member.name, is_dir=False)
                if placed:
                    arrow = f" (-> {target.name})" if target is not member else ""
                    limits.check_size(f"{path}:{member.name}{arrow}", target.size)
                    # A target read before is reused: reading it again would seek back
                    # through a compressed stream from its start.
                    if target.name not in blobs:
                        total += target.size
                        limits.check_total(path, total)
                        blobs[target.name] = tar.extractfile(target).read()
                    blobs[member.name] = blobs[target.name]
                    layout.add(*placed, (member.name, None))
    except ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: corrupt or truncated archive ({exc})") from None
    return assemble(layout, lambda m: (f"{path}:{m[0]}", blobs[m[0]]), image_size, limits, pick)


def _zip_link(path: Path, info: zipfile.ZipInfo, read) -> str:
    """A zip symlink's target (its content); one that is not text is refused."""
    try:
        return read(info).decode()
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: link {info.filename!r} has a target that is not text; refusing the archive"
        ) from None


def read_image_folder_zip(
    path: Path, image_size: int, limits: Limits, pick: Pick | None = None
) -> Dataset:
    layout = Layout(str(path))
    seen: set[str] = set()
    total = 0
    try:
        with zipfile.ZipFile(path) as zf:

            def read(info: zipfile.ZipInfo) -> bytes:
                limits.check_size(f"{path}:{info.filename}", info.file_size)
                # Never more than the declared size, whatever the deflate data holds; reading
                # that much checks the member's CRC (BadZipFile); bad deflate data: zlib.error.
                try:
                    with zf.open(info) as f:
                        return f.read(info.file_size)
                except ARCHIVE_ERRORS as exc:
                    raise DataError(f"{path}: corrupt member {info.filename!r} ({exc})") from None
                except RuntimeError as exc:  # zipfile's word for an encrypted member
                    raise DataError(
                        f"{path}: member {info.filename!r} cannot be read ({exc}); give an "
                        "archive without a password"
                    ) from None

            for info in zf.infolist():
                kind = _zip_kind(info)
                if kind != "dir":
                    check_unique(path, info.filename, seen)
                link = _zip_link(path, info, read) if kind == "symlink" else None
                check_member(path, info.filename, kind, link)
                if kind == "symlink":
                    layout.skipped_links.append(info.filename)  # inside the folder: skipped
                    continue
                placed = layout.place(info.filename, is_dir=kind == "dir")
                if placed:
                    limits.check_size(f"{path}:{info.filename}", info.file_size)
                    total += info.file_size  # the central directory: all known before reading
                    limits.check_total(path, total)
                    layout.add(*placed, (info.filename, info))
            return assemble(
                layout, lambda m: (f"{path}:{m[0]}", read(m[1])), image_size, limits, pick
            )
    except ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: corrupt or truncated archive ({exc})") from None
