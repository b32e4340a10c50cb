"""What ``data.source`` names, and how it is fetched and verified (the download stage's input).

Sources (``data.source``):
  * ``cifar10`` / ``cifar100``: the official python archive, downloaded with torchvision and
    MD5-checked before anything in it is read.
  * a path or URL of an official archive (renamed or mirrored): recognised by its MD5.
  * an image-folder dataset, as a directory or a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` archive
    (suffix in any case; a URL is downloaded into ``data/raw`` first) laid out
    ``train/<class>/*`` and ``test/<class>/*`` (read by :mod:`onecycle.data.archives` and
    :mod:`onecycle.data.imagefolder`, within ``data.max_file_mb`` and ``data.max_image_pixels``).

Pickles are only ever read from an archive whose MD5 matched an official one. torchvision is
imported only when needed (the official specs, a download), not when this module is.
"""

from __future__ import annotations

import functools
import pickle
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from onecycle.data import download
from onecycle.data.archives import (
    ARCHIVE_ERRORS,
    ARCHIVE_SUFFIXES,
    TAR_SUFFIXES,
    read_image_folder_tar,
    read_image_folder_zip,
    tar_members,
)
from onecycle.data.imagefolder import Pick, read_image_folder_dir
from onecycle.data.images import Limits
from onecycle.data.prepared import Dataset
from onecycle.data.splits import picker, take
from onecycle.errors import DataError

if TYPE_CHECKING:
    from onecycle.config import DataConfig


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


# torchvision's file names and MD5s (CIFAR10/CIFAR100 .filename, .tgz_md5), pinned so that
# reading a local image-folder dataset needs no torchvision import (2-4 s and ~650 MB per stage
# start); tests/test_data.py checks that they still agree with torchvision.
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/"  # + the file name: torchvision's .url
OFFICIAL_FILES = {
    "cifar10": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}


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


# ---------------------------------------------------------------- official archive


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


def fetch(cfg: DataConfig, root: Path, raw_dir: Path, seed: int = 0) -> tuple[Dataset, str]:
    """Read ``data.source`` into memory. Returns the dataset and a description of the source.

    ``cfg`` is the ``data`` section: the source, image size, download timeout, the limits on one
    file and one image, and the subsets (drawn with ``seed``; an image-folder reader decodes
    only the images they keep).
    """
    source, image_size = cfg.source, cfg.image_size
    limits = Limits(cfg.max_image_pixels, cfg.max_file_mb, cfg.max_total_mb)
    pick = picker(cfg.train_subset, cfg.test_subset, seed)
    if source in OFFICIAL_FILES:
        spec = official_specs()[source]
        path = download.download_official(spec, spec.url, raw_dir, cfg.timeout)
        return _official(path, spec, image_size, pick), f"{spec.url} (md5 {spec.md5})"

    url = urlparse(source)
    if url.scheme == "file":
        # torchvision's download_url cannot read file:// URLs (it asks the response for a
        # length a local file does not have); a local file needs no download anyway.
        if url.netloc not in ("", "localhost"):
            raise DataError(f"data.source: {source} names a remote host; give a local path")
        source = unquote(url.path)
    elif url.scheme in ("http", "https", "ftp"):
        return _fetch_url(source, raw_dir, image_size, cfg.timeout, limits, pick)

    path = Path(source).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    return _read_local(path, image_size, limits, pick)


def _official(path: Path, spec: Official, image_size: int, pick: Pick) -> Dataset:
    """A verified official archive, subset first (resizing is the slow part), then resized."""
    return _official_sized(take(read_official(path, spec), pick), image_size)


def _fetch_url(
    source: str, raw_dir: Path, image_size: int, timeout: float, limits: Limits, pick: Pick
) -> tuple[Dataset, str]:
    """An official archive's URL (MD5-checked, cached) or an image-folder archive's."""
    specs = official_specs()
    # Unquoted before taking the last part: "%2F" must not smuggle a folder into raw_dir.
    name = posixpath.basename(unquote(urlparse(source).path))
    spec = next((s for s in specs.values() if s.filename == name), None)
    if spec is not None:
        path = download.download_official(spec, source, raw_dir, timeout)
        return _official(path, spec, image_size, pick), f"{source} (md5 {spec.md5})"
    if not name.lower().endswith(ARCHIVE_SUFFIXES):
        raise DataError(
            f"data.source: URL {source} must end in an official archive name "
            f"({', '.join(s.filename for s in specs.values())}) or an image-folder archive "
            f"name ({', '.join(ARCHIVE_SUFFIXES)})"
        )
    path = download.download_archive(source, name, raw_dir, timeout)
    try:
        return _read_local(path, image_size, limits, pick, label=source)
    except DataError as exc:
        raise DataError(f"{exc}\n(downloaded from {source})") from None


def missing_source(path: Path) -> DataError:
    """The error for a local ``data.source`` that does not exist (download and check_params)."""
    return DataError(
        f"data.source: {path} does not exist; give cifar10, cifar100, the official archive's "
        "path or URL, or an image-folder dataset (directory or .tar.gz/.zip)"
    )


def _read_local(
    path: Path, image_size: int, limits: Limits, pick: Pick, label: str | None = None
) -> tuple[Dataset, str]:
    """A local official archive (recognised by its MD5), image-folder archive or directory.

    ``label`` names the source in the description (a URL the file was downloaded from).
    """
    if not path.exists():
        raise missing_source(path)
    if path.is_dir():
        return read_image_folder_dir(path, image_size, limits, pick), str(path)
    digest = download.md5sum(path)
    described = f"{label or path} (md5 {digest})"
    maybe_official = any(path.name == f or digest == m for f, m in OFFICIAL_FILES.values())
    specs = official_specs() if maybe_official else {}
    spec = next((s for s in specs.values() if s.md5 == digest), None)
    if spec is not None:
        return _official(path, spec, image_size, pick), described
    official_name = next((s for s in specs.values() if s.filename == path.name), None)
    if official_name is not None:
        raise DataError(
            f"{path}: MD5 {digest} does not match the official {official_name.filename} "
            f"({official_name.md5}); the file is corrupt or not the official archive. "
            "Delete it and download it again."
        )
    name = path.name.lower()
    if name.endswith(TAR_SUFFIXES):
        return read_image_folder_tar(path, image_size, limits, pick), described
    if name.endswith(".zip"):
        return read_image_folder_zip(path, image_size, limits, pick), described
    raise DataError(
        f"data.source: {path} is neither an official CIFAR archive nor an image-folder "
        f"archive ({', '.join(ARCHIVE_SUFFIXES)}, any case) or directory"
    )
