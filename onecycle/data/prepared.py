"""The prepared form the download stage writes and every later stage reads.

``data/prepared/{train.npz,test.npz,meta.json}``: uint8 images (N, H, W, 3), int64 labels, the
class names, per-channel mean/std of the training split and a fingerprint of the arrays, and
the validation split (``val.npz``) that ``splits.carve_validation`` took from the training
images.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onecycle import files
from onecycle.errors import DataError
from onecycle.redact import redact


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
    x_val: np.ndarray | None = None  # the validation split (None without data.val_images)
    y_val: np.ndarray | None = None

    @property
    def has_val(self) -> bool:
        return self.y_val is not None and len(self.y_val) > 0


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


STATS = ("mean", "std")  # what later stages read from meta.json beside the arrays and classes


def fingerprint(ds: Dataset, val: tuple | None = None, stats: dict | None = None) -> str:
    """A SHA-256 of the arrays and class names, and of ``stats`` (meta.json's mean and std):
    everything the later stages read, so an edited normalization is caught like a changed pixel."""
    h = hashlib.sha256()
    for arr in (ds.x_train, ds.y_train, ds.x_test, ds.y_test, *(val or ())):
        h.update(np.ascontiguousarray(arr).data)
    h.update("\n".join(ds.classes).encode())
    if stats is not None:
        h.update(json.dumps({k: list(stats[k]) for k in STATS}).encode())
    return h.hexdigest()[:16]


def save_prepared(
    ds: Dataset, out_dir: Path, source: str, val: tuple[np.ndarray, np.ndarray] | None = None
) -> Prepared:
    """Write ``out_dir/{train.npz,test.npz,meta.json}`` (and ``val.npz``: ``val`` is (x, y))
    atomically (temp folder, then rename)."""
    mean, std = channel_stats(ds.x_train)
    meta = _meta(ds, source, val, mean, std)
    with files.atomic_folder(out_dir) as tmp:
        np.savez(tmp / "train.npz", x=ds.x_train, y=ds.y_train)
        np.savez(tmp / "test.npz", x=ds.x_test, y=ds.y_test)
        if val is not None:
            np.savez(tmp / "val.npz", x=val[0], y=val[1])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    x_val, y_val = val if val is not None else (None, None)
    return Prepared(
        ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.classes, mean, std, meta, x_val, y_val
    )


def _meta(ds: Dataset, source: str, val, mean: tuple, std: tuple) -> dict:
    """meta.json: where the images came from, the classes and counts per split, the training
    split's mean/std, and the fingerprint of it all."""
    val_meta = {}
    if val is not None:
        val_meta = {
            "num_val": int(len(val[1])),
            "val_per_class": np.bincount(val[1], minlength=len(ds.classes)).tolist(),
        }
    return {
        "source": redact(source),  # a signed URL's query is a secret
        "classes": ds.classes,
        "image_size": int(ds.x_train.shape[1]),
        "num_train": int(len(ds.y_train)),
        "num_test": int(len(ds.y_test)),
        "train_per_class": np.bincount(ds.y_train, minlength=len(ds.classes)).tolist(),
        "test_per_class": np.bincount(ds.y_test, minlength=len(ds.classes)).tolist(),
        **val_meta,
        "mean": list(mean),
        "std": list(std),
        "fingerprint": fingerprint(ds, val, {"mean": mean, "std": std}),
    }


# ---------------------------------------------------------------- loading, checked


class _Corrupt(Exception):
    """What is wrong with one file of data/prepared (turned into a DataError naming it)."""

    def __init__(self, name: str, what: str):
        super().__init__(what)
        self.name, self.what = name, what


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and np.isfinite(v)


META_CHECKS = {  # key: (check, what it must be)
    "source": (lambda v: isinstance(v, str), "a string"),
    "classes": (
        lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v),
        "a non-empty list of names",
    ),
    "image_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "num_train": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "num_test": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "train_per_class": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "counts"),
    "test_per_class": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "counts"),
    "mean": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_num, v)), "3 numbers"),
    "std": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_num, v)), "3 numbers"),
    "fingerprint": (lambda v: isinstance(v, str), "a string"),
}


OPTIONAL_META = {  # present with a validation split (data.val_images)
    "num_val": META_CHECKS["num_train"],
    "val_per_class": META_CHECKS["train_per_class"],
}


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _Corrupt("meta.json", f"not readable as JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise _Corrupt("meta.json", f"a JSON {type(meta).__name__}, not an object")
    for key, (ok, must) in META_CHECKS.items():
        if key not in meta:
            raise _Corrupt("meta.json", f"no {key!r}")
        if not ok(meta[key]):
            raise _Corrupt("meta.json", f"{key!r} is {meta[key]!r}, not {must}")
    for key, (ok, must) in OPTIONAL_META.items():
        if key in meta and not ok(meta[key]):
            raise _Corrupt("meta.json", f"{key!r} is {meta[key]!r}, not {must}")
    if ("num_val" in meta) != ("val_per_class" in meta):
        raise _Corrupt("meta.json", "num_val and val_per_class come together")
    return meta


def _read_split(path: Path, split: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """``x`` uint8 (N, S, S, 3) and ``y`` int64 (N,) in [0, classes), N and counts as meta says."""
    name = f"{split}.npz"
    try:
        with open(path / name, "rb") as f:  # np.load would try anything else as a pickle
            if f.read(4) != b"PK\x03\x04":
                raise _Corrupt(name, "not an .npz archive: no zip header")
        # allow_pickle=False: a damaged or planted file must never unpickle.
        with np.load(path / name, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise _Corrupt(name, f"no array {' or '.join(map(repr, missing))}")
            x, y = npz["x"], npz["y"]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _Corrupt(name, f"unreadable: {type(exc).__name__}: {exc}") from None
    size, n, classes = meta["image_size"], meta[f"num_{split}"], len(meta["classes"])
    if x.dtype != np.uint8 or x.shape != (n, size, size, 3):
        raise _Corrupt(name, f"x is {x.dtype} {x.shape}, meta.json says uint8 {(n, size, size, 3)}")
    if y.dtype != np.int64 or y.shape != (n,):
        raise _Corrupt(name, f"y is {y.dtype} {y.shape}, meta.json says int64 {(n,)}")
    if y.min() < 0 or y.max() >= classes:
        raise _Corrupt(name, f"labels span {y.min()}..{y.max()}, outside 0..{classes - 1}")
    if np.bincount(y, minlength=classes).tolist() != meta[f"{split}_per_class"]:
        raise _Corrupt(name, f"label counts differ from meta.json's {split}_per_class")
    return x, y


def load_prepared(path: Path) -> Prepared:
    """Read and check data/prepared: a damaged file is named here, not deep inside training.

    The fingerprint (a SHA-256 of the arrays) is checked too: about 0.1 s for all of CIFAR-10.
    """
    try:
        meta = _read_meta(path)
        x_train, y_train = _read_split(path, "train", meta)
        x_test, y_test = _read_split(path, "test", meta)
        val = _read_split(path, "val", meta) if "num_val" in meta else None
        ds = Dataset(x_train, y_train, x_test, y_test, list(meta["classes"]))
        if fingerprint(ds, val, meta) != meta["fingerprint"]:
            arrays = "train.npz, test.npz, val.npz" if val else "train.npz, test.npz"
            raise _Corrupt(
                f"{arrays} or meta.json",
                "the arrays or meta.json's mean/std differ from meta.json's fingerprint",
            )
    except FileNotFoundError as exc:
        raise DataError(
            f"{path}: prepared data missing ({exc.filename}); run `dvc repro download`"
        ) from None
    except _Corrupt as exc:
        raise DataError(
            f"{path / exc.name} is corrupt ({exc.what}); rerun `dvc repro -f download`"
        ) from None
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    x_val, y_val = val if val is not None else (None, None)
    return Prepared(x_train, y_train, x_test, y_test, ds.classes, mean, std, meta, x_val, y_val)
