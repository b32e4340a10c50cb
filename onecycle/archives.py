"""Reading image-folder datasets: a directory, a ``.tar.gz``/``.tgz``/``.tar`` or a ``.zip``.

The layout is ``train/<class>/*`` and ``test/<class>/*`` (any prefix folder above ``train``);
labels follow the sorted class folder names, and every image is decoded to RGB at
``data.image_size``. Hidden files and ``__MACOSX`` folders are ignored.

Archives are read in memory, never extracted, yet every member goes through one safety check
(:func:`check_member`) for tar and zip alike, so an archive that would write outside its folder
if someone did extract it is refused rather than half-trusted. Links inside the folder are
skipped: neither read nor counted.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import DataError
from .prepared import Dataset

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SPLITS = ("train", "test")
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
    dest = str(archive.parent / "_extract_check")
    for member in tar:
        kind = _tar_kind(member)
        link = member.linkname if kind in ("symlink", "hardlink") else None
        check_member(archive, member.name, kind, link)
        try:  # a second opinion: tarfile's own rules for extraction (check_member covers them)
            tarfile.data_filter(member, dest)
        except tarfile.FilterError as exc:
            raise DataError(
                f"{archive}: member {member.name!r} is unsafe ({type(exc).__name__}: {exc}); "
                "refusing the archive"
            ) from None
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


# ---------------------------------------------------------------- layout and decoding


def _decode(data: bytes, name: str, image_size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except Exception as exc:
        raise DataError(f"{name}: unreadable image ({type(exc).__name__}: {exc})") from None


def _is_hidden(parts: list[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


class _Layout:
    """Collects ``<prefix>/<split>/<class>/<file>`` entries and checks the folder layout."""

    def __init__(self, origin: str):
        self.origin = origin
        self.prefix: tuple[str, ...] | None = None
        self.files: dict[str, dict[str, list]] = {s: {} for s in SPLITS}
        self.dirs: dict[str, set[str]] = {s: set() for s in SPLITS}

    def place(self, path: str, is_dir: bool) -> tuple[str, str] | None:
        parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
        if not parts or _is_hidden(parts):
            return None
        depth = 2 if is_dir else 3  # split/class (folder) or split/class/file
        if len(parts) < depth or parts[-depth] not in SPLITS:
            return None
        prefix = tuple(parts[:-depth])
        if self.prefix is None and not is_dir:
            self.prefix = prefix
        if self.prefix is not None and prefix != self.prefix:
            return None
        split, cls = parts[-depth], parts[-depth + 1]
        if is_dir:
            self.dirs[split].add(cls)
            return None
        return split, cls

    def add(self, split: str, cls: str, item) -> None:
        self.files[split].setdefault(cls, []).append(item)

    def classes(self) -> list[str]:
        for split in SPLITS:
            for cls in self.dirs[split]:
                if cls not in self.files[split]:
                    raise DataError(f"{self.origin}: class folder {split}/{cls} is empty")
        train, test = set(self.files["train"]), set(self.files["test"])
        if not train:
            raise DataError(
                f"{self.origin}: no images found under train/<class>/; expected an image-folder "
                "layout train/<class>/*.png|jpg and test/<class>/*"
            )
        if train - test:
            raise DataError(
                f"{self.origin}: class folder(s) {', '.join(sorted(train - test))} present in "
                "train/ but not in test/"
            )
        if test - train:
            raise DataError(
                f"{self.origin}: class folder(s) {', '.join(sorted(test - train))} present in "
                "test/ but not in train/"
            )
        return sorted(train)


def _assemble(layout: _Layout, load, image_size: int) -> Dataset:
    classes = layout.classes()
    out = {}
    total = sum(len(v) for s in SPLITS for v in layout.files[s].values())
    with tqdm(total=total, desc="decode images", unit="img", mininterval=1.0) as bar:
        for split in SPLITS:
            xs, ys = [], []
            for label, cls in enumerate(classes):
                for item in sorted(layout.files[split][cls], key=lambda t: t[0]):
                    name, data = load(item)
                    xs.append(_decode(data, name, image_size))
                    ys.append(label)
                    bar.update()
            out[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    return Dataset(*out["train"], *out["test"], classes)


# ---------------------------------------------------------------- the three readers


def read_image_folder_dir(root: Path, image_size: int) -> Dataset:
    layout = _Layout(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        for d in dirnames:
            layout.place(posixpath.join(rel, d), is_dir=True)
        for f in filenames:
            placed = layout.place(posixpath.join(rel, f), is_dir=False)
            if placed:
                path = Path(dirpath) / f
                layout.add(*placed, (str(path), path))
    return _assemble(layout, lambda item: (item[0], item[1].read_bytes()), image_size)


def read_image_folder_tar(path: Path, image_size: int) -> Dataset:
    layout = _Layout(str(path))
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar_members(tar, path):
                if not (member.isfile() or member.isdir()):
                    continue  # links inside the folder are checked above and skipped
                placed = layout.place(member.name, is_dir=member.isdir())
                if placed:
                    blobs[member.name] = tar.extractfile(member).read()
                    layout.add(*placed, (member.name, None))
    except ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: corrupt or truncated archive ({exc})") from None
    return _assemble(layout, lambda item: (f"{path}:{item[0]}", blobs[item[0]]), image_size)


def read_image_folder_zip(path: Path, image_size: int) -> Dataset:
    layout = _Layout(str(path))
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                kind = _zip_kind(info)
                link = zf.read(info).decode() if kind == "symlink" else None
                check_member(path, info.filename, kind, link)
                if kind == "symlink":
                    continue  # a link inside the folder is checked above and skipped
                placed = layout.place(info.filename, is_dir=kind == "dir")
                if placed:
                    layout.add(*placed, (info.filename, None))

            def load(item):
                # zf.read checks the member's CRC (BadZipFile); bad deflate data: zlib.error.
                try:
                    return f"{path}:{item[0]}", zf.read(item[0])
                except ARCHIVE_ERRORS as exc:
                    raise DataError(f"{path}: corrupt member {item[0]!r} ({exc})") from None

            return _assemble(layout, load, image_size)
    except ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: corrupt or truncated archive ({exc})") from None
