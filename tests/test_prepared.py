"""onecycle.data.prepared.load_prepared on a damaged data/prepared: every kind of damage is a DataError
naming the file and what is wrong, never a traceback from numpy, zipfile or json, nor a shape
error deep inside training.

Each test saves a tiny prepared folder (7 images of 2x2 pixels), damages one file and loads it.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from onecycle.data import prepared, splits
from onecycle.errors import DataError, UserError

RERUN = "rerun `dvc repro -f download`"


def tiny_dataset() -> prepared.Dataset:
    rng = np.random.default_rng(0)
    return prepared.Dataset(
        rng.integers(0, 256, (4, 2, 2, 3), dtype=np.uint8),
        np.array([0, 1, 0, 1]),
        rng.integers(0, 256, (3, 2, 2, 3), dtype=np.uint8),
        np.array([1, 1, 0]),
        ["neg", "pos"],
    )


@pytest.fixture
def out(tmp_path) -> Path:
    """A valid data/prepared folder (train: 4 images, test: 3, 2 classes, 2x2 pixels)."""
    path = tmp_path / "data" / "prepared"
    prepared.save_prepared(tiny_dataset(), path, "made-up source")
    return path


def load_arrays(out: Path, split: str) -> dict[str, np.ndarray]:
    with np.load(out / f"{split}.npz") as npz:
        return {k: npz[k] for k in npz.files}


def resave(out: Path, split: str, **arrays) -> None:
    """Rewrite ``split``.npz with some arrays replaced (None: left out)."""
    merged = load_arrays(out, split) | arrays
    np.savez(out / f"{split}.npz", **{k: v for k, v in merged.items() if v is not None})


def edit_meta(out: Path, change: Callable[[dict], object]) -> None:
    meta = json.loads((out / "meta.json").read_text())
    change(meta)
    (out / "meta.json").write_text(json.dumps(meta))


def assert_corrupt(out: Path, name: str, *needles: str) -> str:
    with pytest.raises(DataError) as err:
        prepared.load_prepared(out)
    msg = str(err.value)
    assert msg.startswith(f"{out / name} is corrupt ("), msg
    assert msg.endswith(RERUN), msg
    for needle in needles:
        assert needle in msg, msg
    assert isinstance(err.value, UserError)  # printed by cli.run without a traceback
    return msg


def test_valid_folder_loads(out):
    loaded = prepared.load_prepared(out)
    assert loaded.x_train.shape == (4, 2, 2, 3) and loaded.y_test.tolist() == [1, 1, 0]
    assert loaded.meta["fingerprint"] == prepared.fingerprint(tiny_dataset(), stats=loaded.meta)


@pytest.mark.parametrize("name", ["meta.json", "train.npz", "test.npz"])
def test_missing_file_says_run_download(out, name):
    (out / name).unlink()
    with pytest.raises(DataError) as err:
        prepared.load_prepared(out)
    assert f"prepared data missing ({out / name})" in str(err.value)
    assert "run `dvc repro download`" in str(err.value)


# ---------------------------------------------------------------- the .npz files


def test_truncated_npz(out):
    raw = (out / "train.npz").read_bytes()
    (out / "train.npz").write_bytes(raw[: len(raw) // 2])
    assert_corrupt(out, "train.npz", "unreadable", "BadZipFile")


def test_random_bytes_are_not_reported_as_pickled_data(out):
    rng = np.random.default_rng(1)
    (out / "test.npz").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    msg = assert_corrupt(out, "test.npz", "not an .npz archive")
    assert "pickle" not in msg


def test_damaged_bytes_inside_an_array_fail_its_crc(out):
    raw = bytearray((out / "train.npz").read_bytes())
    x_at = raw.index(b"x.npy") + 200  # inside x's data, past the .npy header
    raw[x_at] ^= 0xFF
    (out / "train.npz").write_bytes(bytes(raw))
    assert_corrupt(out, "train.npz", "CRC")


def test_a_plain_npy_under_the_npz_name(out):
    np.save(out / "train.npz.npy", np.zeros(3))
    (out / "train.npz.npy").rename(out / "train.npz")
    assert_corrupt(out, "train.npz", "not an .npz archive")


@pytest.mark.parametrize("key", ["x", "y"])
def test_missing_array(out, key):
    resave(out, "train", **{key: None})
    assert_corrupt(out, "train.npz", f"no array '{key}'")


def test_pickled_object_array_is_never_unpickled(out, monkeypatch):
    resave(out, "test", y=np.array([1, "two", None], dtype=object))

    def refuse(*args, **kwargs):
        pytest.fail("load_prepared unpickled data")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert_corrupt(out, "test.npz", "unreadable", "allow_pickle=False")


@pytest.mark.parametrize(
    "split, arrays, needles",
    [
        ("train", {"x": np.zeros((4, 2, 2, 3), np.float32)}, ["x is float32", "uint8"]),
        ("train", {"x": np.zeros((4, 3, 3, 3), np.uint8)}, ["(4, 3, 3, 3)", "(4, 2, 2, 3)"]),
        ("test", {"x": np.zeros((3, 2, 2), np.uint8)}, ["(3, 2, 2)"]),
        ("train", {"y": np.array([0, 1, 0, 1], np.int32)}, ["y is int32", "int64"]),
        ("test", {"y": np.array([[1], [1], [0]])}, ["(3, 1)", "(3,)"]),
    ],
    ids=["x-dtype", "x-image-size", "x-no-channels", "y-dtype", "y-shape"],
)
def test_wrong_shape_or_dtype(out, split, arrays, needles):
    resave(out, split, **arrays)
    assert_corrupt(out, f"{split}.npz", *needles)


@pytest.mark.parametrize("label", [2, -1])
def test_label_out_of_range(out, label):
    resave(out, "train", y=np.array([0, 1, label, 1]))
    assert_corrupt(out, "train.npz", "labels span", "outside 0..1")


def test_count_disagrees_with_meta(out):
    ds = tiny_dataset()
    resave(out, "test", x=ds.x_test[:2], y=ds.y_test[:2])
    assert_corrupt(out, "test.npz", "(2, 2, 2, 3)", "(3, 2, 2, 3)")


def test_label_counts_disagree_with_meta(out):
    resave(out, "train", y=np.array([0, 0, 0, 1]))
    assert_corrupt(out, "train.npz", "train_per_class")


def test_changed_pixels_fail_the_fingerprint(out):
    x = load_arrays(out, "train")["x"]
    x[0, 0, 0, 0] ^= 1
    resave(out, "train", x=x)
    assert_corrupt(out, "train.npz, test.npz or meta.json", "fingerprint")


@pytest.mark.parametrize("key", ["mean", "std"])
def test_an_edited_normalization_in_meta_json_fails_the_fingerprint(out, key):
    """Train and evaluate normalize with meta.json's mean and std: an edit there is caught at
    load like a changed pixel, not trained on silently (issue 26, item 7)."""
    meta = json.loads((out / "meta.json").read_text())
    meta[key] = [v + 0.01 for v in meta[key]]
    (out / "meta.json").write_text(json.dumps(meta))
    assert_corrupt(out, "train.npz, test.npz or meta.json", "mean/std", "fingerprint")


# ---------------------------------------------------------------- meta.json


def test_meta_not_json(out):
    (out / "meta.json").write_text('{"classes": ["neg", ')
    assert_corrupt(out, "meta.json", "not readable as JSON")


def test_meta_not_an_object(out):
    (out / "meta.json").write_text("[1, 2, 3]")
    assert_corrupt(out, "meta.json", "a JSON list, not an object")


@pytest.mark.parametrize(
    "key", ["classes", "image_size", "num_train", "num_test", "mean", "std", "fingerprint"]
)
def test_meta_missing_key(out, key):
    edit_meta(out, lambda m: m.pop(key))
    assert_corrupt(out, "meta.json", f"no '{key}'")


@pytest.mark.parametrize(
    "key, value",
    [
        ("classes", []),
        ("classes", "neg,pos"),
        ("image_size", "2"),
        ("num_train", True),
        ("num_test", -3),
        ("mean", [0.5, 0.5]),
        ("std", [0.1, "x", 0.1]),
        ("fingerprint", None),
    ],
)
def test_meta_wrong_type(out, key, value):
    edit_meta(out, lambda m: m.update({key: value}))
    assert_corrupt(out, "meta.json", f"'{key}' is {value!r}")


def test_meta_count_disagrees_with_the_arrays(out):
    edit_meta(out, lambda m: m.update(num_train=5))
    assert_corrupt(out, "train.npz", "(4, 2, 2, 3)", "(5, 2, 2, 3)")


def test_meta_with_more_classes_than_the_counts_name(out):
    edit_meta(out, lambda m: m.update(classes=["neg", "pos", "odd"]))
    assert_corrupt(out, "train.npz", "train_per_class")


# ---------------------------------------------------------------- the validation split


def _labelled(n_per_class: int, classes: int = 3) -> prepared.Dataset:
    y = np.repeat(np.arange(classes), n_per_class)
    x = np.arange(len(y), dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    return prepared.Dataset(x, y, x[:3], y[:3], [f"c{i}" for i in range(classes)])


def test_the_validation_split_is_stratified_and_held_out_of_training(tmp_path):
    ds, (x_val, y_val) = splits.carve_validation(_labelled(20), 12, seed=0)
    assert np.bincount(y_val).tolist() == [4, 4, 4] and len(ds.y_train) == 48
    assert not set(x_val[:, 0, 0, 0]) & set(ds.x_train[:, 0, 0, 0])  # no image in both
    again = splits.carve_validation(_labelled(20), 12, seed=0)[1][0]
    assert np.array_equal(again, x_val)  # reproducible from the seed
    saved = prepared.save_prepared(ds, tmp_path / "p", "src", (x_val, y_val))
    loaded = prepared.load_prepared(tmp_path / "p")
    assert np.array_equal(loaded.x_val, x_val) and loaded.has_val
    assert loaded.meta["num_val"] == 12 and loaded.meta["val_per_class"] == [4, 4, 4]
    assert loaded.mean == saved.mean  # the statistics of the training images alone
    assert splits.carve_validation(_labelled(20), 0, seed=0)[1] is None


def test_a_validation_split_of_more_than_half_is_refused_naming_the_key():
    with pytest.raises(DataError, match=r"data.val_images=31 .* at most half \(30\)"):
        splits.carve_validation(_labelled(20), 31, seed=0)


def test_a_changed_validation_file_is_caught_by_the_fingerprint(tmp_path):
    ds, val = splits.carve_validation(_labelled(20), 12, seed=0)
    out = tmp_path / "p"
    prepared.save_prepared(ds, out, "src", val)
    resave(out, "val", x=load_arrays(out, "val")["x"][::-1].copy())
    assert_corrupt(out, "train.npz, test.npz, val.npz or meta.json", "fingerprint")
