"""The stratified ``data.train_subset`` / ``data.test_subset`` the download stage takes before it
writes the prepared form, and the validation split ``data.val_images`` carves from the training
images: what anything that chooses (an LR, a rule, a setting) is chosen on, never the test split.
"""

from __future__ import annotations

import numpy as np

from onecycle.data.prepared import Dataset
from onecycle.errors import DataError


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


def picker(train_count: int | None, test_count: int | None, seed: int):
    """``data.train_subset`` / ``data.test_subset`` as a function of (split, labels) -> indices,
    so a reader can keep the subset before it decodes anything."""
    counts = {"train": (train_count, "data.train_subset"), "test": (test_count, "data.test_subset")}

    def pick(split: str, y: np.ndarray) -> np.ndarray:
        count, key = counts[split]
        return stratified_subset(y, count, seed, key)

    return pick


def take(ds: Dataset, pick) -> Dataset:
    tr, te = pick("train", ds.y_train), pick("test", ds.y_test)
    return Dataset(ds.x_train[tr], ds.y_train[tr], ds.x_test[te], ds.y_test[te], ds.classes)


def subset(ds: Dataset, train_count: int | None, test_count: int | None, seed: int) -> Dataset:
    """Stratified ``data.train_subset`` / ``data.test_subset``, reproducible from ``base.seed``."""
    return take(ds, picker(train_count, test_count, seed))


def carve_validation(ds: Dataset, count: int, seed: int) -> tuple[Dataset, tuple | None]:
    """``data.val_images``: a stratified validation split of ``count`` training images (drawn
    with ``seed``, after the subsets), and the training split without them. None when 0."""
    if not count:
        return ds, None
    n = len(ds.y_train)
    if count > n // 2:
        raise DataError(
            f"data.val_images={count} would leave {n - count} of the {n} training images to "
            f"train on; keep it at most half ({n // 2}), or raise data.train_subset"
        )
    val = stratified_subset(ds.y_train, count, seed, "data.val_images")
    keep = np.setdiff1d(np.arange(n), val, assume_unique=True)
    rest = Dataset(ds.x_train[keep], ds.y_train[keep], ds.x_test, ds.y_test, ds.classes)
    return rest, (ds.x_train[val], ds.y_train[val])
