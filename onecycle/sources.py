"""What ``data.source`` names, and how it is fetched and verified (the download stage's input).

Sources (``data.source``):
  * ``cifar10`` / ``cifar100``: the official python archive, downloaded with torchvision and
    MD5-checked before anything in it is read.
  * a path or URL of an official archive (renamed or mirrored): recognised by its MD5.
  * an image-folder dataset, as a directory or a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` archive
    laid out ``train/<class>/*`` and ``test/<class>/*`` (read by :mod:`onecycle.archives`).

Pickles are only ever read from an archive whose MD5 matched an official one. torchvision is
imported only when needed (the official specs, a download), not when this module is.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import posixpath
import socket
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from .archives import (
    ARCHIVE_ERRORS,
    ARCHIVE_SUFFIXES,
    read_image_folder_dir,
    read_image_folder_tar,
    read_image_folder_zip,
    tar_members,
)
from .errors import DataError
from .prepared import Dataset


@dataclass(frozen=True)
class Official:
    """One official CIFAR python archive (constants taken from torchvision)."""

    name: str
    url: str
    filename: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str


@functools.cache
def official_specs() -> dict[str, Official]:
    """The official archives by ``data.source`` name; cached, so torchvision loads once, late."""
    from torchvision.datasets import CIFAR10, CIFAR100

    def make(name, cls, label_key):
        return Official(
            name=name,
            url=cls.url,
            filename=cls.filename,
            md5=cls.tgz_md5,
            folder=cls.base_folder,
            train_files=tuple(f for f, _ in cls.train_list),
            test_files=tuple(f for f, _ in cls.test_list),
            meta_file=cls.meta["filename"],
            label_key=label_key,
            names_key=cls.meta["key"],
        )

    return {
        "cifar10": make("cifar10", CIFAR10, "labels"),
        "cifar100": make("cifar100", CIFAR100, "fine_labels"),
    }


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- official archive


def download_official(spec: Official, url: str, raw_dir: Path, timeout: float) -> Path:
    """Download into a temporary folder, verify the MD5, then move into ``raw_dir``.

    A partial or corrupt download never reaches ``raw_dir``, so no later run can trust it.
    """
    from torchvision.datasets.utils import check_integrity, download_url

    target = raw_dir / spec.filename
    if check_integrity(str(target), spec.md5):
        return target
    raw_dir.mkdir(parents=True, exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".partial-") as tmp:
            # No md5= here: download_url would raise a bare "File not found or corrupted."
            # RuntimeError; the check below says what failed.
            download_url(url, tmp, filename=spec.filename)
            got = Path(tmp) / spec.filename
            if not check_integrity(str(got), spec.md5):
                raise DataError(
                    f"{url}: downloaded file failed its MD5 check (got {md5sum(got)}, expected "
                    f"{spec.md5}); it is corrupt or not the official {spec.filename}. Retry, or "
                    f"point data.source at a verified local copy: "
                    f"dvc exp run -S data.source=/path/to/{spec.filename}"
                )
            os.replace(got, target)
    except DataError:
        raise
    except Exception as exc:  # urllib, socket and torchvision all raise their own kinds
        raise DataError(
            f"could not download {url} ({type(exc).__name__}: {exc}).\n"
            f"Without network access, fetch {spec.filename} elsewhere and point the stage at it:\n"
            f"  dvc exp run -S data.source=/path/to/{spec.filename}\n"
            "or at an image-folder copy (train/<class>/*, test/<class>/*), e.g. "
            "data.source=../shared/datasets/cifar10-jpg.tar.gz"
        ) from exc
    finally:
        socket.setdefaulttimeout(old_timeout)
    return target


def read_official(path: Path, spec: Official) -> Dataset:
    """Read an official archive whose MD5 has already been verified."""
    wanted = {f"{spec.folder}/{f}" for f in (*spec.train_files, *spec.test_files, spec.meta_file)}
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar_members(tar, path, check_end=False):
                if member.isfile() and member.name in wanted:
                    blobs[member.name] = tar.extractfile(member).read()
    except ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: corrupt or truncated archive ({exc})") from None
    missing = sorted(wanted - set(blobs))
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; is it the official archive?")

    def load(name):
        return pickle.loads(blobs[f"{spec.folder}/{name}"], encoding="latin1")

    def split(files):
        xs, ys = [], []
        for f in files:
            entry = load(f)
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry[spec.label_key], dtype=np.int64))
        return np.concatenate(xs).transpose(0, 2, 3, 1).copy(), np.concatenate(ys)

    x_train, y_train = split(spec.train_files)
    x_test, y_test = split(spec.test_files)
    classes = [str(c) for c in load(spec.meta_file)[spec.names_key]]
    return Dataset(x_train, y_train, x_test, y_test, classes)


def _official_sized(ds: Dataset, image_size: int) -> Dataset:
    if image_size == ds.x_train.shape[1]:
        return ds

    def resize(x):
        return np.stack(
            [
                np.asarray(
                    Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BICUBIC)
                )
                for im in x
            ]
        )

    return Dataset(resize(ds.x_train), ds.y_train, resize(ds.x_test), ds.y_test, ds.classes)


# ---------------------------------------------------------------- the source switch


def fetch(
    source: str, root: Path, raw_dir: Path, image_size: int, timeout: float
) -> tuple[Dataset, str]:
    """Read ``data.source`` into memory. Returns the dataset and a description of the source."""
    specs = official_specs()
    if source in specs:
        spec = specs[source]
        path = download_official(spec, spec.url, raw_dir, timeout)
        return _official_sized(
            read_official(path, spec), image_size
        ), f"{spec.url} (md5 {spec.md5})"

    url = urlparse(source)
    if url.scheme == "file":
        # torchvision's download_url cannot read file:// URLs (it asks the response for a
        # length a local file does not have); a local file needs no download anyway.
        if url.netloc not in ("", "localhost"):
            raise DataError(f"data.source: {source} names a remote host; give a local path")
        source = unquote(url.path)
    elif url.scheme in ("http", "https", "ftp"):
        name = posixpath.basename(url.path)
        spec = next((s for s in specs.values() if s.filename == name), None)
        if spec is None:
            raise DataError(
                f"data.source: URL {source} must end in an official archive name "
                f"({', '.join(s.filename for s in specs.values())}); for an image-folder "
                "dataset, download it and give its local path"
            )
        path = download_official(spec, source, raw_dir, timeout)
        return _official_sized(read_official(path, spec), image_size), f"{source} (md5 {spec.md5})"

    path = Path(source).expanduser()
    return _read_local((path if path.is_absolute() else root / path).resolve(), image_size)


def _read_local(path: Path, image_size: int) -> tuple[Dataset, str]:
    """A local official archive (recognised by its MD5), image-folder archive or directory."""
    if not path.exists():
        raise DataError(
            f"data.source: {path} does not exist; give cifar10, cifar100, the official archive's "
            "path or URL, or an image-folder dataset (directory or .tar.gz/.zip)"
        )
    if path.is_dir():
        return read_image_folder_dir(path, image_size), str(path)
    specs = official_specs()
    digest = md5sum(path)
    spec = next((s for s in specs.values() if s.md5 == digest), None)
    if spec is not None:
        return _official_sized(read_official(path, spec), image_size), f"{path} (md5 {digest})"
    official_name = next((s for s in specs.values() if s.filename == path.name), None)
    if official_name is not None:
        raise DataError(
            f"{path}: MD5 {digest} does not match the official {official_name.filename} "
            f"({official_name.md5}); the file is corrupt or not the official archive. "
            "Delete it and download it again."
        )
    if path.name.endswith(ARCHIVE_SUFFIXES[:3]):
        return read_image_folder_tar(path, image_size), f"{path} (md5 {digest})"
    if path.name.endswith(".zip"):
        return read_image_folder_zip(path, image_size), f"{path} (md5 {digest})"
    raise DataError(
        f"data.source: {path} is neither an official CIFAR archive nor an image-folder "
        f"archive ({', '.join(ARCHIVE_SUFFIXES)}) or directory"
    )
