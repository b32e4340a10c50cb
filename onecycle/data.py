"""The download stage's logic: fetch or read a dataset, check it, and write one prepared form.

Sources (``data.source``):
  * ``cifar10`` / ``cifar100``: the official python archive, downloaded with torchvision and
    MD5-checked before anything in it is read.
  * a path or URL of an official archive (renamed or mirrored): recognised by its MD5.
  * an image-folder dataset, as a directory or a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` archive
    laid out ``train/<class>/*`` and ``test/<class>/*`` (any prefix folder above ``train``).

Pickles are only ever read from an archive whose MD5 matched an official one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import posixpath
import shutil
import socket
import stat
import tarfile
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image
from tqdm import tqdm

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SPLITS = ("train", "test")
# What a damaged archive raises while being read (zlib.error: bad deflate data in a .zip;
# OSError covers gzip.BadGzipFile, e.g. a failed CRC check).
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError)


class DataError(RuntimeError):
    """The data source is missing, corrupt or not in a layout the pipeline can read."""


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


def _official() -> dict[str, Official]:
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


OFFICIAL = _official()


@dataclass
class Dataset:
    x_train: np.ndarray  # (N, H, W, 3) uint8
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]


@dataclass
class Prepared(Dataset):
    mean: tuple[float, float, float]  # per channel, on [0, 1], training split only
    std: tuple[float, float, float]
    meta: dict


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


def _checked_tar_members(
    tar: tarfile.TarFile, archive: Path, check_end: bool = True
) -> Iterator[tarfile.TarInfo]:
    """Yield members, refusing any that would land outside the archive's folder.

    Then (``check_end``) check that the archive really ended: tarfile stops without a word at a
    damaged header (or a plain .tar cut at a member boundary), which would silently drop every
    image after it. An MD5-verified official archive needs no such check.
    """
    dest = str(archive.parent / "_extract_check")
    for member in tar:
        # data_filter strips a leading "/" instead of refusing it; an absolute name is refused.
        if member.name.startswith(("/", "\\")) or (len(member.name) > 1 and member.name[1] == ":"):
            raise DataError(
                f"{archive}: member {member.name!r} has an absolute path; refusing the archive"
            )
        try:
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


def read_official(path: Path, spec: Official) -> Dataset:
    """Read an official archive whose MD5 has already been verified."""
    wanted = {f"{spec.folder}/{f}" for f in (*spec.train_files, *spec.test_files, spec.meta_file)}
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in _checked_tar_members(tar, path, check_end=False):
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


# ---------------------------------------------------------------- image folders


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
            for member in _checked_tar_members(tar, path):
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
                name = info.filename
                norm = posixpath.normpath(name)
                if (
                    name.startswith(("/", "\\"))
                    or norm == ".."
                    or norm.startswith("../")
                    or (len(name) > 1 and name[1] == ":")
                ):
                    raise DataError(f"{path}: member {name!r} escapes the target folder; refusing")
                if stat.S_ISLNK(info.external_attr >> 16):
                    target = posixpath.normpath(
                        posixpath.join(posixpath.dirname(norm), zf.read(info).decode())
                    )
                    if target.startswith(("/", "..")):
                        raise DataError(
                            f"{path}: link {name!r} points outside the archive; refusing"
                        )
                    continue
                placed = layout.place(name, is_dir=info.is_dir())
                if placed:
                    layout.add(*placed, (name, None))

            def load(item):
                # zf.read checks the member's CRC (BadZipFile); bad deflate data: zlib.error.
                try:
                    return f"{path}:{item[0]}", zf.read(item[0])
                except ARCHIVE_ERRORS as exc:
                    raise DataError(f"{path}: corrupt member {item[0]!r} ({exc})") from None

            return _assemble(layout, load, image_size)
    except ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: corrupt or truncated archive ({exc})") from None


# ---------------------------------------------------------------- the source switch


def fetch(
    source: str, root: Path, raw_dir: Path, image_size: int, timeout: float
) -> tuple[Dataset, str]:
    """Read ``data.source`` into memory. Returns the dataset and a description of the source."""
    if source in OFFICIAL:
        spec = OFFICIAL[source]
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
        spec = next((s for s in OFFICIAL.values() if s.filename == name), None)
        if spec is None:
            raise DataError(
                f"data.source: URL {source} must end in an official archive name "
                f"({', '.join(s.filename for s in OFFICIAL.values())}); for an image-folder "
                "dataset, download it and give its local path"
            )
        path = download_official(spec, source, raw_dir, timeout)
        return _official_sized(read_official(path, spec), image_size), f"{source} (md5 {spec.md5})"

    path = Path(source).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.exists():
        raise DataError(
            f"data.source: {path} does not exist; give cifar10, cifar100, the official archive's "
            "path or URL, or an image-folder dataset (directory or .tar.gz/.zip)"
        )
    if path.is_dir():
        return read_image_folder_dir(path, image_size), str(path)
    digest = md5sum(path)
    spec = next((s for s in OFFICIAL.values() if s.md5 == digest), None)
    if spec is not None:
        return _official_sized(read_official(path, spec), image_size), f"{path} (md5 {digest})"
    official_name = next((s for s in OFFICIAL.values() if s.filename == path.name), None)
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


# ---------------------------------------------------------------- subset, stats, storage


def stratified_subset(y: np.ndarray, count: int | None, seed: int, key: str) -> np.ndarray:
    """Indices of a class-balanced subset of ``count`` items (all, in order, when None)."""
    if count is None or count == len(y):
        return np.arange(len(y))
    if count > len(y):
        raise DataError(
            f"{key}={count} exceeds the {len(y)} images in the split; lower it or set null"
        )
    n_classes = len(np.unique(y))
    if count < n_classes:
        raise DataError(
            f"{key}={count} is smaller than the {n_classes} classes; raise it or set null"
        )
    sizes = np.unique(y, return_counts=True)[1]
    if len(y) - count < n_classes or sizes.min() < 2:
        # train_test_split refuses these (fewer left out than classes, or a class of one image)
        # with a bare ValueError; only then use the plain allocation below, so that the subsets
        # of every setting that worked before stay the same images.
        return _proportional_subset(y, count, seed)
    from sklearn.model_selection import train_test_split

    idx, _ = train_test_split(np.arange(len(y)), train_size=count, stratify=y, random_state=seed)
    return np.sort(idx)


def _proportional_subset(y: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Each class gets floor(count * share) images, the rest go by largest remainder."""
    rng = np.random.default_rng(seed)
    classes, inverse, sizes = np.unique(y, return_inverse=True, return_counts=True)
    quota = sizes * count / len(y)
    take = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - take), kind="stable")[: count - int(take.sum())]
    take[extra] += 1
    picked = [
        rng.choice(np.flatnonzero(inverse == c), size=int(take[c]), replace=False)
        for c in range(len(classes))
    ]
    return np.sort(np.concatenate(picked))


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on [0, 1], accumulated in float64 chunks."""
    total = np.zeros(3)
    sq = np.zeros(3)
    for start in range(0, len(x), 4096):
        chunk = x[start : start + 4096].reshape(-1, 3).astype(np.float64) / 255.0
        total += chunk.sum(0)
        sq += (chunk**2).sum(0)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def fingerprint(ds: Dataset) -> str:
    h = hashlib.sha256()
    for arr in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        h.update(np.ascontiguousarray(arr).data)
    h.update("\n".join(ds.classes).encode())
    return h.hexdigest()[:16]


def save_prepared(ds: Dataset, out_dir: Path, source: str) -> Prepared:
    """Write ``out_dir/{train.npz,test.npz,meta.json}`` atomically (temp folder, then rename)."""
    mean, std = channel_stats(ds.x_train)
    meta = {
        "source": source,
        "classes": ds.classes,
        "image_size": int(ds.x_train.shape[1]),
        "num_train": int(len(ds.y_train)),
        "num_test": int(len(ds.y_test)),
        "train_per_class": np.bincount(ds.y_train, minlength=len(ds.classes)).tolist(),
        "test_per_class": np.bincount(ds.y_test, minlength=len(ds.classes)).tolist(),
        "mean": list(mean),
        "std": list(std),
        "fingerprint": fingerprint(ds),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its folder is mode 0700, and the rename would keep that mode.
    tmp = out_dir.parent / f".{out_dir.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    old = tmp.with_name(tmp.name + "-old")
    try:
        np.savez(tmp / "train.npz", x=ds.x_train, y=ds.y_train)
        np.savez(tmp / "test.npz", x=ds.x_test, y=ds.y_test)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        # Move the old output aside rather than delete it first: an interrupted rmtree would
        # leave half of it, and a failed rename puts it back.
        if out_dir.exists() or out_dir.is_symlink():
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old.exists() or old.is_symlink():
                os.replace(old, out_dir)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    return Prepared(ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.classes, mean, std, meta)


def load_prepared(path: Path) -> Prepared:
    try:
        meta = json.loads((path / "meta.json").read_text())
        with np.load(path / "train.npz") as train, np.load(path / "test.npz") as test:
            return Prepared(
                train["x"],
                train["y"],
                test["x"],
                test["y"],
                list(meta["classes"]),
                tuple(meta["mean"]),
                tuple(meta["std"]),
                meta,
            )
    except FileNotFoundError as exc:
        raise DataError(
            f"{path}: prepared data missing ({exc.filename}); run `dvc repro download`"
        ) from None


def subset(ds: Dataset, train_count: int | None, test_count: int | None, seed: int) -> Dataset:
    """Stratified ``data.train_subset`` / ``data.test_subset``, reproducible from ``base.seed``."""
    tr = stratified_subset(ds.y_train, train_count, seed, "data.train_subset")
    te = stratified_subset(ds.y_test, test_count, seed, "data.test_subset")
    return Dataset(ds.x_train[tr], ds.y_train[tr], ds.x_test[te], ds.y_test[te], ds.classes)
