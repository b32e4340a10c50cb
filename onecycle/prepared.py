"""The prepared form the download stage writes and every later stage reads.

``data/prepared/{train.npz,test.npz,meta.json}``: uint8 images (N, H, W, 3), int64 labels, the
class names, per-channel mean/std of the training split and a fingerprint of the arrays. Also
the stratified ``data.train_subset`` / ``data.test_subset`` taken before it is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError


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


# ---------------------------------------------------------------- subsets


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


def subset(ds: Dataset, train_count: int | None, test_count: int | None, seed: int) -> Dataset:
    """Stratified ``data.train_subset`` / ``data.test_subset``, reproducible from ``base.seed``."""
    tr = stratified_subset(ds.y_train, train_count, seed, "data.train_subset")
    te = stratified_subset(ds.y_test, test_count, seed, "data.test_subset")
    return Dataset(ds.x_train[tr], ds.y_train[tr], ds.x_test[te], ds.y_test[te], ds.classes)


# ---------------------------------------------------------------- stats and storage


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
