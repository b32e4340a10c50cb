"""onecycle.data.sources, .archives, .imagefolder and .prepared: every data.source kind, bad input,
the limits on one file and one image, subsets and the prepared form (a damaged data/prepared:
tests/test_prepared.py).

Every archive is made here, in tmp_path, a few images at a time; nothing is downloaded from
outside: the "download" tests serve made-up archives from a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import types
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onecycle import files
from onecycle.config import ConfigError, DataConfig, load_params, parse_params
from onecycle.data import archives, imagefolder, prepared, sources, splits
from onecycle.errors import DataError, WriteError

OFFICIAL_NAME = "cifar-10-python.tar.gz"
CLASSES = ["ant", "cat", "dog"]  # written in another order below; labels follow sorted names


# ---------------------------------------------------------------- builders


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_official_archive(path: Path, folder: str = "cifar-10-batches-py") -> dict:
    """A small archive in the official python-pickle layout; returns the expected arrays (HWC)."""
    rng = np.random.default_rng(1)
    names = [f"class{i}" for i in range(10)]
    per_batch = {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 6}
    rows, labels = {}, {}
    with tarfile.open(path, "w:gz") as tar:
        for batch, n in per_batch.items():
            rows[batch] = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # CHW rows
            labels[batch] = [int(v) for v in rng.integers(0, 10, size=n)]
            entry = {"batch_label": batch, "data": rows[batch], "labels": labels[batch]}
            _add_bytes(tar, f"{folder}/{batch}", pickle.dumps(entry))
        _add_bytes(tar, f"{folder}/batches.meta", pickle.dumps({"label_names": names}))
        _add_bytes(tar, f"{folder}/readme.html", b"<html></html>")

    def hwc(batches):
        x = np.concatenate([rows[b] for b in batches]).reshape(-1, 3, 32, 32)
        return x.transpose(0, 2, 3, 1), np.concatenate([labels[b] for b in batches])

    train = [f"data_batch_{i}" for i in range(1, 6)]
    x_train, y_train = hwc(train)
    x_test, y_test = hwc(["test_batch"])
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "classes": names}  # fmt: skip


def make_image_folder(root: Path, counts=None, mode: str = "RGB", size: int = 32) -> dict:
    """``root/{train,test}/<class>/<i>.png`` with random pixels; returns the expected arrays."""
    counts = counts or {"train": 2, "test": 1}
    rng = np.random.default_rng(2)
    expected = {}
    for split, n in counts.items():
        xs, ys = [], []
        for label, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size, size) if mode == "L" else (size, size, 3)
                pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(root / split / cls / f"{i}.png")
                xs.append(pixels)
                ys.append(label)
        expected[f"x_{split}"] = np.stack(xs)
        expected[f"y_{split}"] = np.array(ys)
    expected["classes"] = CLASSES
    return expected


def make_tar(src: Path, archive: Path, arcname: str = "", mode: str = "w:gz") -> Path:
    """Tar the contents of ``src`` (directory entries included) under ``arcname``."""
    with tarfile.open(archive, mode) as tar:
        for entry in sorted(src.rglob("*"), key=lambda p: str(p)):
            name = entry.relative_to(src).as_posix()
            tar.add(entry, arcname=f"{arcname}/{name}" if arcname else name, recursive=False)
    return archive


def make_zip(src: Path, archive: Path, arcname: str = "") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry in sorted(src.rglob("*"), key=lambda p: str(p)):
            name = entry.relative_to(src).as_posix()
            zf.write(entry, f"{arcname}/{name}" if arcname else name)  # dirs get "name/" entries
    return archive


def png_bytes(value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (value,) * 3).save(buf, "PNG")
    return buf.getvalue()


def tar_of(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    """A .tar.gz holding a valid 2-class layout plus ``members`` (TarInfo or (name, bytes))."""
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                _add_bytes(tar, f"{split}/{cls}/0.png", png_bytes())
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                _add_bytes(tar, *m)
    return path


def fetch(source, tmp_path: Path, image_size: int = 32, timeout: float = 5.0, **data):
    """``sources.fetch`` with a ``data`` section of these values (others keep their defaults)."""
    cfg = DataConfig(source=str(source), image_size=image_size, timeout=timeout, **data)
    return sources.fetch(cfg, tmp_path, tmp_path / "raw")


def assert_dataset(ds: prepared.Dataset, expected: dict) -> None:
    for key in ("x_train", "x_test"):
        got = getattr(ds, key)
        assert got.dtype == np.uint8
        assert got.shape == expected[key].shape
        np.testing.assert_array_equal(got, expected[key])
    for key in ("y_train", "y_test"):
        got = getattr(ds, key)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected[key])
    assert ds.classes == expected["classes"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def official(tmp_path, monkeypatch):
    """A made-up official archive whose MD5 is patched in as cifar10's."""
    src = tmp_path / "src"
    src.mkdir()
    path = src / OFFICIAL_NAME
    expected = make_official_archive(path)
    spec = dataclasses.replace(sources.official_specs()["cifar10"], md5=_md5(path))
    monkeypatch.setitem(sources.official_specs(), "cifar10", spec)
    monkeypatch.setitem(sources.OFFICIAL_FILES, "cifar10", (spec.filename, spec.md5))
    return types.SimpleNamespace(path=path, expected=expected, spec=spec)


def test_the_pinned_official_names_and_md5s_are_torchvisions():
    specs = sources.official_specs()
    assert sources.OFFICIAL_FILES == {k: (s.filename, s.md5) for k, s in specs.items()}
    assert all(s.url == sources.OFFICIAL_URL + s.filename for s in specs.values())


def test_reading_a_local_image_folder_loads_no_torchvision(tmp_path):
    root = tmp_path / "imgs"
    make_image_folder(root)
    archive = make_tar(root, tmp_path / "set.tar.gz")
    code = (
        "import sys; from pathlib import Path; from onecycle.data import sources; "
        "from onecycle.config import DataConfig; "
        f"sources.fetch(DataConfig(source={str(archive)!r}), Path('.'), Path('raw')); "
        "print('torchvision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    return types.SimpleNamespace(root=root, expected=make_image_folder(root))


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("pickle.loads was called on an archive whose MD5 was not verified")

    monkeypatch.setattr(sources, "pickle", types.SimpleNamespace(loads=refuse))


@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    """Serve a folder over HTTP on 127.0.0.1; yields (folder, base URL)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(served))
    )
    # polled every 50 ms, not 500: shutdown() waits for the next poll, 0.5 s per test at 0.5
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- official archive


def test_official_archive_round_trips_pixels_and_labels(official, tmp_path):
    ds, source = fetch(official.path, tmp_path)
    assert_dataset(ds, official.expected)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
    assert source == f"{official.path} (md5 {official.spec.md5})"
    assert not (tmp_path / "raw").exists()  # a local archive is read in place, not copied


def test_official_archive_recognised_by_md5_when_renamed(official, tmp_path):
    renamed = tmp_path / "mirror" / "cifar10-copy.bin"
    renamed.parent.mkdir()
    shutil.copy(official.path, renamed)
    ds, _ = fetch(renamed, tmp_path)
    assert_dataset(ds, official.expected)


def test_official_archive_relative_path_resolves_against_root(official, tmp_path):
    ds, _ = fetch(f"src/{OFFICIAL_NAME}", tmp_path)
    assert_dataset(ds, official.expected)


def test_official_archive_resized_to_image_size(official, tmp_path):
    ds, _ = fetch(official.path, tmp_path, image_size=16)
    assert ds.x_train.shape == (20, 16, 16, 3) and ds.x_test.shape == (6, 16, 16, 3)
    assert ds.x_train.dtype == np.uint8
    np.testing.assert_array_equal(ds.y_train, official.expected["y_train"])


def test_name_cifar10_downloads_checks_and_caches(official, tmp_path, http_dir, monkeypatch):
    # The real download_official path (torchvision's download_url) over HTTP from 127.0.0.1:
    # download_url cannot read file:// URLs, see test_file_url_is_read_as_a_local_path.
    served, base = http_dir
    shutil.copy(official.path, served / OFFICIAL_NAME)
    url = f"{base}/{OFFICIAL_NAME}"
    monkeypatch.setitem(
        sources.official_specs(), "cifar10", dataclasses.replace(official.spec, url=url)
    )
    ds, source = fetch("cifar10", tmp_path)
    assert_dataset(ds, official.expected)
    assert source == f"{url} (md5 {official.spec.md5})"
    raw = tmp_path / "raw"
    assert [p.name for p in raw.iterdir()] == [OFFICIAL_NAME]  # no .partial-* folder left
    # The verified copy in the raw dir is used again without the network.
    (served / OFFICIAL_NAME).unlink()
    ds, _ = fetch("cifar10", tmp_path)
    assert_dataset(ds, official.expected)


def test_url_source_downloads_official_archive(official, tmp_path, http_dir):
    served, base = http_dir
    shutil.copy(official.path, served / OFFICIAL_NAME)
    ds, source = fetch(f"{base}/{OFFICIAL_NAME}", tmp_path)
    assert_dataset(ds, official.expected)
    assert (tmp_path / "raw" / OFFICIAL_NAME).read_bytes() == official.path.read_bytes()


def test_file_url_is_read_as_a_local_path(official, folder, tmp_path):
    # torchvision's download_url cannot read file:// URLs (urllib's file response has no
    # .length), so fetch reads them as local paths: the official archive, recognised by MD5 ...
    ds, _ = fetch(official.path.as_uri(), tmp_path)
    assert_dataset(ds, official.expected)
    # ... and an image-folder archive alike.
    archive = make_tar(folder.root, tmp_path / "my set.tar.gz")  # space: percent-encoded URI
    ds, _ = fetch(archive.as_uri(), tmp_path)
    assert_dataset(ds, folder.expected)
    assert not (tmp_path / "raw").exists()


def test_download_failure_explains_local_source_and_leaves_nothing(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/{OFFICIAL_NAME}"
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError) as err:
        fetch(url, tmp_path, timeout=2)
    msg = str(err.value)
    assert url in msg
    assert f"data.source=/path/to/{OFFICIAL_NAME}" in msg
    assert "image-folder" in msg
    assert list((tmp_path / "raw").iterdir()) == []  # no partial archive, no temp folder
    assert socket.getdefaulttimeout() == before


def test_download_with_wrong_md5_is_refused_and_not_kept(official, tmp_path, http_dir):
    served, base = http_dir
    (served / OFFICIAL_NAME).write_bytes(b"not the archive")
    with pytest.raises(DataError) as err:
        fetch(f"{base}/{OFFICIAL_NAME}", tmp_path)
    msg = str(err.value)
    assert "MD5" in msg and official.spec.md5 in msg
    assert hashlib.md5(b"not the archive").hexdigest() in msg
    assert "data.source=" in msg
    assert list((tmp_path / "raw").iterdir()) == []


@pytest.mark.parametrize("name", ["images.rar", "images", ""])
def test_url_of_neither_an_official_nor_an_archive_name_is_refused(name, tmp_path):
    with pytest.raises(DataError) as err:
        fetch(f"https://example.invalid/data/{name}", tmp_path)
    msg = str(err.value)
    assert "must end in an official archive name" in msg
    assert OFFICIAL_NAME in msg and ".tar.gz" in msg and ".zip" in msg
    assert not (tmp_path / "raw").exists()  # refused before any download


# ---------------------------------------------------------------- image folders


@pytest.mark.parametrize(
    "kind",
    ["dir", "tar.gz", "tgz", "tar", "zip", "prefixed tar.gz", "prefixed zip", "prefixed dir"],
)
def test_image_folder_sources(kind, folder, tmp_path):
    prefix = "cifar10" if kind.startswith("prefixed") else ""
    if kind == "dir":
        source = folder.root
    elif kind == "prefixed dir":
        source = tmp_path / "outer"
        shutil.copytree(folder.root, source / prefix)
    elif kind.endswith("zip"):
        source = make_zip(folder.root, tmp_path / "set.zip", prefix)
    else:
        ext = kind.split()[-1]
        mode = "w" if ext == "tar" else "w:gz"
        source = make_tar(folder.root, tmp_path / f"set.{ext}", prefix, mode)
    ds, desc = fetch(source, tmp_path)
    assert_dataset(ds, folder.expected)
    np.testing.assert_array_equal(ds.y_train, [0, 0, 1, 1, 2, 2])
    assert desc.startswith(str(source))


def _download_stage(repo: Path, monkeypatch, seed: int, **data) -> prepared.Prepared:
    """stages/download.py run in ``repo`` with base.seed ``seed`` and this data section."""
    from stages import download

    repo.mkdir()
    (repo / "dvc.yaml").write_text("stages: {}\n")
    params = {"base": {"seed": seed}, "data": data}
    (repo / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    monkeypatch.chdir(repo)
    download.main()
    return prepared.load_prepared(repo / "data" / "prepared")


def test_split_seed_holds_the_subsets_and_validation_split_fixed_across_base_seeds(
    tmp_path, monkeypatch
):
    make_image_folder(tmp_path / "imgs", counts={"train": 8, "test": 4})
    data = {"source": str(tmp_path / "imgs"), "train_subset": 18, "test_subset": 6,
            "val_images": 6}  # fmt: skip

    def run(name, seed, **more):
        got = _download_stage(tmp_path / name, monkeypatch, seed, **data, **more)
        return [got.x_train, got.x_val, got.x_test]

    same = run("fixed-0", 0, split_seed=5), run("fixed-1", 1, split_seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(*same, strict=True))
    assert same[0][1].shape[0] == 6 and same[0][0].shape[0] == 12
    apart = run("seed-0", 0), run("seed-1", 1)  # null: each base.seed draws its own images
    assert not np.array_equal(apart[0][1], apart[1][1])
    follows = run("seed-5", 5)  # null is base.seed
    assert all(np.array_equal(a, b) for a, b in zip(follows, same[0], strict=True))


def test_a_negative_split_seed_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"data\.split_seed"):
        parse_params({"data": {"split_seed": -1}})


def test_image_folder_classes_are_sorted_folder_names(tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("zebra", "Ox", "moth"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32), (len(cls), 0, 0)).save(root / split / cls / "0.png")
    ds, _ = fetch(root, tmp_path)
    assert ds.classes == ["Ox", "moth", "zebra"]  # case-sensitive sort, as sorted() does
    # each image's red value is its class name's length: labels follow the sorted names
    assert ds.x_train[:, 0, 0, 0].tolist() == [2, 4, 5]
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2])


def test_hidden_files_and_macos_folders_are_ignored(folder, tmp_path):
    (folder.root / "train" / "cat" / ".DS_Store").write_bytes(b"\0junk")
    (folder.root / "__MACOSX" / "train" / "cat").mkdir(parents=True)
    (folder.root / "__MACOSX" / "train" / "cat" / "._0.png").write_bytes(b"junk")
    (folder.root / "README.txt").write_text("not an image, not in the layout")
    ds, _ = fetch(make_zip(folder.root, tmp_path / "set.zip"), tmp_path)
    assert_dataset(ds, folder.expected)


def test_grayscale_and_other_sizes_become_rgb_at_image_size(tmp_path):
    root = tmp_path / "imgs"
    # train: grayscale 40x40 and RGB 20x20; test: palette 32x32 and RGBA 33x17
    images = {
        "train": [Image.new("L", (40, 40), 77), Image.new("RGB", (20, 20), (10, 200, 30))],
        "test": [Image.new("P", (32, 32), 0), Image.new("RGBA", (33, 17), (1, 2, 3, 255))],
    }
    for split, imgs in images.items():
        (root / split / "only").mkdir(parents=True)
        for i, img in enumerate(imgs):
            img.save(root / split / "only" / f"{i}.png")
    ds, _ = fetch(root, tmp_path)
    assert ds.x_train.shape == (2, 32, 32, 3) and ds.x_test.shape == (2, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.x_test.dtype == np.uint8
    # uniform images stay uniform through the resize; grayscale is copied to all 3 channels
    assert (ds.x_train[0] == 77).all()
    assert (ds.x_train[1] == [10, 200, 30]).all()
    assert (ds.x_test[0] == 0).all()
    assert (ds.x_test[1] == [1, 2, 3]).all()


def test_grayscale_random_pixels_are_copied_to_three_channels(tmp_path):
    root = tmp_path / "imgs"
    expected = make_image_folder(root, mode="L")
    ds, _ = fetch(root, tmp_path)
    assert ds.x_train.shape == (6, 32, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(ds.x_train[..., c], expected["x_train"])


# ---------------------------------------------------------------- bad input


def assert_refused(source, tmp_path, *needles, **data):
    with pytest.raises(DataError) as err:
        fetch(source, tmp_path, **data)
    msg = str(err.value)
    assert str(source) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_missing_source(tmp_path):
    assert_refused(tmp_path / "nowhere.tar.gz", tmp_path, "does not exist")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "set.rar"
    path.write_bytes(b"whatever")
    assert_refused(path, tmp_path, "neither an official CIFAR archive")


@pytest.mark.parametrize("name", ["set.tar.gz", "set.zip"])
def test_corrupt_archive(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_refused(path, tmp_path, "corrupt or truncated")


@pytest.mark.parametrize("name", ["set.tar.gz", "set.tar", "set.zip"])
def test_truncated_archive(name, folder, tmp_path):
    full = tmp_path / f"full-{name}"
    if name.endswith("zip"):
        make_zip(folder.root, full)
    else:
        make_tar(folder.root, full, mode="w" if name.endswith(".tar") else "w:gz")
    path = tmp_path / name
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert_refused(path, tmp_path)


def test_plain_tar_cut_at_a_member_boundary(folder, tmp_path):
    # tarfile itself stops without an error where a plain .tar ends between two members.
    full = make_tar(folder.root, tmp_path / "full.tar", mode="w")
    with tarfile.open(full) as tar:
        members = tar.getmembers()
    cut = members[len(members) // 2].offset
    path = tmp_path / "set.tar"
    path.write_bytes(full.read_bytes()[:cut])
    assert_refused(path, tmp_path, "truncated")


def test_damaged_tar_gz(tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(10):
                Image.new("RGB", (32, 32), (i, i, i)).save(root / split / cls / f"{i}.png")
    full = make_tar(root, tmp_path / "full.tar.gz")
    raw = bytearray(full.read_bytes())
    for k in range(4):
        raw[len(raw) // 2 + k] ^= 0xFF
    path = tmp_path / "set.tar.gz"
    path.write_bytes(bytes(raw))
    assert_refused(path, tmp_path)


@pytest.mark.parametrize("name", ["set.tar", "set.tar.gz"])
def test_damaged_member_header_does_not_silently_drop_images(name, tmp_path):
    # tarfile stops without a word at a garbage header after the first member, so without a
    # check the dataset would just lose every image after it (here test/b/5.png on).
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(10):
                (root / split / cls / f"{i}.png").write_bytes(png_bytes(i))
    full = make_tar(root, tmp_path / "full.tar", mode="w")
    with tarfile.open(full) as tar:
        header = tar.getmember("test/b/5.png").offset
    raw = bytearray(full.read_bytes())
    raw[header + 148 : header + 156] = b"0000000\0"  # a wrong header checksum
    path = tmp_path / name
    path.write_bytes(gzip.compress(bytes(raw)) if name.endswith(".gz") else bytes(raw))
    assert_refused(path, tmp_path, "corrupt")


def test_tar_gz_failing_its_crc_check(folder, tmp_path):
    # Damage that still inflates (e.g. in a JPEG, which has no checksum of its own) shows only
    # in the gzip CRC at the very end, which tarfile never reads.
    full = make_tar(folder.root, tmp_path / "full.tar.gz")
    raw = bytearray(full.read_bytes())
    raw[-8] ^= 0xFF  # the trailer: CRC32, then size
    path = tmp_path / "set.tar.gz"
    path.write_bytes(bytes(raw))
    assert_refused(path, tmp_path, "CRC")


def bmp_bytes(value: int) -> bytes:
    pixels = np.tile((np.arange(32, dtype=np.uint8) * 4 + value)[:, None, None], (1, 32, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "BMP")
    return buf.getvalue()


@pytest.mark.parametrize("where", ["start", "middle"])
def test_damaged_zip_member(where, tmp_path):
    # BMP compresses well, so damage at the start of its deflate data is invalid deflate
    # (zlib.error) and damage further on decodes but fails the member's CRC (BadZipFile).
    full = tmp_path / "full.zip"
    with zipfile.ZipFile(full, "w", zipfile.ZIP_DEFLATED) as zf:
        for split in ("train", "test"):
            zf.writestr(f"{split}/a/0.bmp", bmp_bytes(1))
    with zipfile.ZipFile(full) as zf:
        info = zf.getinfo("train/a/0.bmp")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    at = start if where == "start" else start + info.compress_size * 3 // 4
    raw = bytearray(full.read_bytes())
    for k in range(4):
        raw[at + k] ^= 0xFF
    path = tmp_path / "set.zip"
    path.write_bytes(bytes(raw))
    assert_refused(path, tmp_path, "corrupt", "train/a/0.bmp")


def test_wrong_md5_for_official_name(official, tmp_path, no_unpickling):
    path = tmp_path / OFFICIAL_NAME
    make_official_archive(path)  # same layout, different bytes (gzip timestamp, contents)
    path.write_bytes(path.read_bytes() + b"\0")
    msg = assert_refused(path, tmp_path, "MD5", official.spec.md5)
    assert _md5(path) in msg


def test_unverified_pickle_layout_is_never_unpickled(tmp_path, no_unpickling):
    path = tmp_path / "cifar-copy.tar.gz"
    make_official_archive(path)  # MD5 not patched in: not official
    assert_refused(path, tmp_path, "no images found under train/<class>/")


def test_official_archive_is_unpickled_only_once_verified(official, tmp_path, monkeypatch):
    calls = []
    real = pickle.loads
    monkeypatch.setattr(
        sources,
        "pickle",
        types.SimpleNamespace(loads=lambda *a, **k: calls.append(1) or real(*a, **k)),
    )
    fetch(official.path, tmp_path)
    assert len(calls) == 7  # five train batches, the test batch, the meta file


def _info(name: str, kind=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "member",
    [
        ("../evil.png", png_bytes()),
        ("train/a/../../../evil.png", png_bytes()),
        ("/etc/evil.png", png_bytes()),
        ("/train/a/1.png", png_bytes()),  # would fit the layout if the "/" were stripped
        _info("train/a/passwd.png", tarfile.SYMTYPE, "/etc/passwd"),
        _info("x", tarfile.SYMTYPE, "../../x"),
        _info("train/a/up.png", tarfile.SYMTYPE, "../../../outside.png"),
        _info("train/a/hard.png", tarfile.LNKTYPE, "../outside.png"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "absolute-layout",
        "symlink-abs",
        "symlink-up",
        "symlink-up-nested",
        "hardlink-up",
    ],  # fmt: skip
)
def test_tar_member_escaping_the_target_is_refused(member, tmp_path):
    path = tar_of(tmp_path / "set.tar.gz", [member])
    name = member.name if isinstance(member, tarfile.TarInfo) else member[0]
    assert_refused(path, tmp_path, repr(name), "refusing")


def test_tar_symlink_inside_the_folder_is_skipped(tmp_path, capsys):
    path = tar_of(tmp_path / "set.tar.gz", [_info("train/a/link.png", tarfile.SYMTYPE, "0.png")])
    ds, _ = fetch(path, tmp_path)
    assert len(ds.y_train) == 2  # the link is neither read nor counted
    # ... but said, in one line on stderr
    err = capsys.readouterr().err
    assert f"{path}: skipped 1 symbolic link(s), not read and not counted: train/a/link.png" in err


@pytest.mark.parametrize("name", ["../evil.png", "train/../../evil.png", "/evil.png"])
def test_zip_member_escaping_the_target_is_refused(name, tmp_path):
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train/a/0.png", png_bytes())
        zf.writestr("test/a/0.png", png_bytes())
        zf.writestr(name, png_bytes())
    assert_refused(path, tmp_path, repr(name), "refusing")


def _zip_with_link(path: Path, target: str | bytes) -> Path:
    """An image folder zip whose train/a/1.png is a symbolic link to ``target``."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train/a/0.png", png_bytes())
        zf.writestr("test/a/0.png", png_bytes())
        link = zipfile.ZipInfo("train/a/1.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, target)
    return path


def test_zip_symlink_pointing_outside_is_refused(tmp_path):
    path = _zip_with_link(tmp_path / "set.zip", "../../../../etc/passwd")
    assert_refused(path, tmp_path, "'train/a/1.png'", "points outside")


def zip_of(path: Path, name: str, payload: bytes, symlink: bool = False) -> Path:
    """A .zip holding a valid 2-class layout plus ``name`` (a symlink to ``payload`` if asked)."""
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                zf.writestr(f"{split}/{cls}/0.png", png_bytes())
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, payload)
    return path


UNSAFE = {  # member name, symlink target (None: a plain file), what the refusal says
    "absolute": ("/train/a/1.png", None, "has an absolute path"),
    "absolute-backslash": ("\\train\\a\\1.png", None, "has an absolute path"),
    "drive-letter": ("C:/evil.png", None, "has an absolute path"),
    "dotdot": ("train/../../evil.png", None, "escapes the target folder"),
    "symlink-up": ("train/a/1.png", "../../../etc/passwd", "points outside the archive"),
    "symlink-abs": ("train/a/1.png", "/etc/passwd", "points outside the archive"),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_tar_and_zip_refuse_the_same_member_the_same_way(case, tmp_path):
    name, target, says = UNSAFE[case]
    tar_member = (name, png_bytes()) if target is None else _info(name, tarfile.SYMTYPE, target)
    payload = png_bytes() if target is None else target.encode()
    messages = []
    for path in (
        tar_of(tmp_path / "set.tar.gz", [tar_member]),
        zip_of(tmp_path / "set.zip", name, payload, symlink=target is not None),
    ):
        msg = assert_refused(path, tmp_path, repr(name), says, "refusing the archive")
        messages.append(msg.replace(str(path), "<archive>"))
    assert messages[0] == messages[1]


def test_tar_device_or_fifo_is_refused(tmp_path):
    path = tar_of(tmp_path / "set.tar.gz", [_info("train/a/fifo.png", tarfile.FIFOTYPE)])
    assert_refused(path, tmp_path, "'train/a/fifo.png'", "device or FIFO", "refusing")


def test_zip_symlink_inside_the_folder_is_skipped(tmp_path, capsys):
    path = zip_of(tmp_path / "set.zip", "train/a/link.png", b"0.png", symlink=True)
    ds, _ = fetch(path, tmp_path)
    assert len(ds.y_train) == 2  # the link is neither read nor counted
    err = capsys.readouterr().err
    assert f"{path}: skipped 1 symbolic link(s), not read and not counted: train/a/link.png" in err


def test_symlink_targets_are_relative_to_their_folder_hardlinks_to_the_archive():
    archive = Path("set.tar")
    archives.check_member(archive, "train/a/l.png", "symlink", "../b/0.png")
    archives.check_member(archive, "train/a/l.png", "hardlink", "train/b/0.png")
    with pytest.raises(DataError, match="points outside"):
        archives.check_member(archive, "train/a/l.png", "hardlink", "../b/0.png")


@pytest.mark.parametrize("kind", ["dir", "tar.gz", "zip"])
def test_class_folder_missing_from_test(kind, folder, tmp_path):
    shutil.rmtree(folder.root / "test" / "dog")
    source = _as(kind, folder.root, tmp_path)
    assert_refused(source, tmp_path, "dog", "present in train/ but not in test/")


@pytest.mark.parametrize("kind", ["dir", "tar.gz", "zip"])
def test_empty_class_folder(kind, folder, tmp_path):
    (folder.root / "train" / "bird").mkdir()  # a folder entry with no files
    (folder.root / "test" / "bird").mkdir()
    (folder.root / "test" / "bird" / "0.png").write_bytes(png_bytes())
    source = _as(kind, folder.root, tmp_path)
    assert_refused(source, tmp_path, "class folder train/bird is empty")


@pytest.mark.parametrize("kind", ["dir", "tar.gz", "zip"])
def test_unreadable_image(kind, folder, tmp_path):
    (folder.root / "test" / "cat" / "broken.png").write_bytes(b"this is not a png")
    source = _as(kind, folder.root, tmp_path)
    msg = assert_refused(source, tmp_path, "unreadable image")
    assert "test/cat/broken.png" in msg
    assert msg.endswith("; replace it with a good copy or delete it from the dataset, then rerun")


def test_no_image_folder_layout(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    (root / "0.png").write_bytes(png_bytes())
    assert_refused(root, tmp_path, "no images found under train/<class>/")


def _as(kind: str, root: Path, tmp_path: Path) -> Path:
    if kind == "dir":
        return root
    if kind == "zip":
        return make_zip(root, tmp_path / "set.zip")
    return make_tar(root, tmp_path / "set.tar.gz")


# ---------------------------------------------------------------- links and duplicate members


def test_tar_hardlink_is_read_as_the_file_it_links_to(folder, tmp_path):
    # tar stores the second name of a file with two links as a hardlink member (LNKTYPE).
    cat = folder.root / "train" / "cat"
    os.link(cat / "0.png", cat / "9.png")
    path = make_tar(folder.root, tmp_path / "set.tar.gz")
    with tarfile.open(path) as tar:
        assert tar.getmember("train/cat/9.png").islnk()
    ds, _ = fetch(path, tmp_path)
    assert len(ds.y_train) == 7 and np.bincount(ds.y_train).tolist() == [2, 3, 2]
    cat0 = folder.expected["x_train"][2]  # labels follow sorted names: ant, cat, dog
    np.testing.assert_array_equal(ds.x_train[2], cat0)
    np.testing.assert_array_equal(ds.x_train[4], cat0)  # 0.png, 1.png, 9.png


def test_tar_hardlink_to_a_file_outside_the_layout(tmp_path):
    link = _info("train/b/1.png", tarfile.LNKTYPE, "originals/x.png")
    path = tar_of(tmp_path / "set.tar.gz", [("originals/x.png", png_bytes(7)), link])
    ds, _ = fetch(path, tmp_path)
    assert ds.y_train.tolist() == [0, 1, 1]
    assert (ds.x_train[2] == 7).all()


@pytest.mark.parametrize("target", ["train/a/missing.png", "train/a/later.png", "train/a"])
def test_tar_hardlink_to_no_earlier_file_is_refused(target, tmp_path):
    members = [_info("train/a/1.png", tarfile.LNKTYPE, target), ("train/a/later.png", png_bytes())]
    path = tar_of(tmp_path / "set.tar.gz", members)
    assert_refused(path, tmp_path, "hardlink 'train/a/1.png'", repr(target), "names no file")


def test_many_skipped_links_are_summarised_in_one_line(tmp_path, capsys):
    links = [_info(f"train/a/l{i}.png", tarfile.SYMTYPE, "0.png") for i in range(5)]
    fetch(tar_of(tmp_path / "set.tar.gz", links), tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if "symbolic link" in line]
    assert len(lines) == 1
    assert "skipped 5 symbolic link(s)" in lines[0]
    assert "train/a/l0.png, train/a/l1.png, train/a/l2.png, ... (2 more)" in lines[0]


@pytest.mark.parametrize("name", ["train/a/0.png", "./train/a/0.png", "test/b/0.png"])
def test_tar_member_twice_is_refused(name, tmp_path):
    path = tar_of(tmp_path / "set.tar.gz", [(name, png_bytes(9))])
    assert_refused(path, tmp_path, repr(name), "occurs more than once", "refusing the archive")


def test_zip_member_twice_is_refused(tmp_path):
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = zip_of(tmp_path / "set.zip", "train/a/0.png", png_bytes(9))
    assert_refused(path, tmp_path, "'train/a/0.png'", "occurs more than once", "refusing")


def test_a_folder_entry_twice_is_fine(tmp_path):
    path = tar_of(tmp_path / "set.tar.gz", [_info("train/a", tarfile.DIRTYPE)] * 2)
    assert len(fetch(path, tmp_path)[0].y_train) == 2


# ---------------------------------------------------------------- limits on one file, one image


def test_limit_keys_defaults_ranges_and_params_yaml():
    assert (DataConfig().max_image_pixels, DataConfig().max_file_mb) == (40_000_000, 64)
    data = load_params(Path(__file__).resolve().parents[1] / "params.yaml").data
    assert (data.max_image_pixels, data.max_file_mb) == (40_000_000, 64)
    for key, bad in [("max_image_pixels", 0), ("max_image_pixels", 1.5), ("max_file_mb", 0)]:
        with pytest.raises(ConfigError, match=rf"  data\.{key}: "):
            parse_params({"data": {key: bad}})


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none (decoding it fails)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind", ["dir", "tar.gz", "zip"])
def test_image_over_the_pixel_limit_is_refused_before_decoding(kind, folder, tmp_path):
    (folder.root / "train" / "cat" / "huge.png").write_bytes(png_header(13000, 13000))
    source = _as(kind, folder.root, tmp_path)
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # "image too large", not "unreadable image": refused from the header, never decoded
        msg = assert_refused(
            source, tmp_path, "train/cat/huge.png: image too large (13000x13000 = 169,000,000 "
            "pixels), over data.max_image_pixels=40,000,000", "-S data.max_image_pixels="
        )  # fmt: skip
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's global limit is put back
    assert msg.count("\n") == 0


def test_pixel_limit_is_the_param(folder, tmp_path):
    # 32x32 images: 1,024 pixels. Just below, PIL would only have warned (under twice its limit).
    msg = "32x32 = 1,024 pixels), over data.max_image_pixels=1,023"
    assert_refused(folder.root, tmp_path, msg, max_image_pixels=1023)
    ds, _ = fetch(folder.root, tmp_path, max_image_pixels=1024)
    assert_dataset(ds, folder.expected)


@pytest.mark.parametrize("kind", ["dir", "tar.gz", "zip"])
def test_file_over_the_size_limit_is_refused_before_reading(kind, folder, tmp_path, monkeypatch):
    with open(folder.root / "test" / "dog" / "big.png", "wb") as f:
        f.truncate(8192)  # sparse zeros: declared 8 KiB, nothing written
    source = _as(kind, folder.root, tmp_path)
    read = []
    spies = {
        "dir": (Path, "read_bytes", lambda self: self),
        "tar.gz": (tarfile.TarFile, "extractfile", lambda self, m: m.name),
        "zip": (zipfile.ZipFile, "open", lambda self, i, *a, **k: getattr(i, "filename", i)),
    }
    cls, attr, name_of = spies[kind]
    real = getattr(cls, attr)

    def spy(self, *args, **kwargs):
        read.append(str(name_of(self, *args, **kwargs)))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, attr, spy)
    with pytest.raises(DataError) as err:
        fetch(source, tmp_path, max_file_mb=0.005)
    msg = str(err.value)
    assert "test/dog/big.png: 8,192 bytes, over data.max_file_mb=0.005 (5,242 bytes)" in msg
    assert "-S data.max_file_mb=" in msg
    assert not [r for r in read if r.endswith("big.png")]


def test_an_archive_over_its_total_limit_is_refused_before_reading_any_member(
    tmp_path, monkeypatch
):
    """Many members each under data.max_file_mb: 40 of 63 MiB of zeros (2.9 MB as tar.gz) once
    peaked at 3.5 GB, and at 2.1 GB while the total was checked as the tar.gz was read.
    data.max_total_mb bounds what the image files may declare together, from the headers (the
    tar.gz's, the zip's central directory), before any member is read."""
    big = [(f"train/a/{i}.png", bytes(8192)) for i in range(1, 5)]
    tgz = tar_of(tmp_path / "set.tar.gz", big)
    zpath = tmp_path / "set.zip"
    with tarfile.open(tgz) as tar, zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for m in tar.getmembers():
            zf.writestr(m.name, tar.extractfile(m).read())
    read = []
    real_tar, real_zip = tarfile.TarFile.extractfile, zipfile.ZipFile.open
    monkeypatch.setattr(
        tarfile.TarFile, "extractfile", lambda self, m: read.append(m.name) or real_tar(self, m)
    )
    monkeypatch.setattr(
        zipfile.ZipFile,
        "open",
        lambda self, i, *a, **k: read.append(i) or real_zip(self, i, *a, **k),
    )
    for source in (tgz, zpath):
        read.clear()
        with pytest.raises(DataError) as err:
            fetch(source, tmp_path, max_file_mb=0.01, max_total_mb=0.02)  # 10,485 / 20,971 bytes
        msg = str(err.value)
        assert msg.startswith(f"{source}: its image files declare over ") and "in all" in msg
        assert "over data.max_total_mb=0.02 (20,971 bytes)" in msg
        assert msg.endswith("dvc exp run -S data.max_total_mb=<MiB>")
        assert read == [], read  # nothing was read
    assert DataConfig().max_total_mb == 2048


def test_size_limit_holds_for_a_hardlink_target(tmp_path):
    link = _info("train/b/1.png", tarfile.LNKTYPE, "originals/x.bin")
    path = tar_of(tmp_path / "set.tar.gz", [("originals/x.bin", bytes(8192)), link])
    with pytest.raises(DataError, match=r"train/b/1.png \(-> originals/x.bin\): 8,192 bytes"):
        fetch(path, tmp_path, max_file_mb=0.005)


def test_files_outside_the_layout_are_not_held_to_the_size_limit(folder, tmp_path):
    (folder.root / "notes.bin").write_bytes(bytes(8192))
    for source in (
        folder.root,
        make_tar(folder.root, tmp_path / "s.tar"),
        make_zip(folder.root, tmp_path / "s.zip"),
    ):
        assert_dataset(fetch(source, tmp_path, max_file_mb=0.005)[0], folder.expected)


# ---------------------------------------------------------------- directory entries


def test_dir_unreadable_image_is_named(folder, tmp_path, monkeypatch):
    # Simulated: as root (CI) chmod 000 does not stop a read.
    victim = folder.root / "train" / "dog" / "1.png"
    real = Path.read_bytes

    def read_bytes(self):
        if self == victim:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert_refused(folder.root, tmp_path, f"{victim}: unreadable (Permission denied)")


def test_dir_unreadable_class_folder_is_named_not_called_empty(folder, tmp_path, monkeypatch):
    victim = folder.root / "test" / "cat"
    real = os.scandir

    def scandir(path="."):
        if Path(path) == victim:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)  # what os.walk calls
    msg = assert_refused(folder.root, tmp_path, f"{victim}: unreadable (Permission denied)")
    assert "empty" not in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("what", ["test/cat/0.png", "test/cat"])
def test_dir_unreadable_for_real(what, folder, tmp_path):
    victim = folder.root / what
    victim.chmod(0)
    try:
        assert_refused(folder.root, tmp_path, f"{victim}: unreadable (Permission denied)")
    finally:
        victim.chmod(0o755)


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    def timeout(*args):
        raise TimeoutError(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["FIFO", "socket", "device"])
def test_dir_non_regular_file_is_refused_by_name_never_opened(kind, folder, tmp_path):
    node = folder.root / "train" / "cat" / "x.png"
    with contextlib.ExitStack() as stack:
        if kind == "FIFO":
            os.mkfifo(node)  # opening it would block until a writer comes: forever
        elif kind == "socket":
            sock = stack.enter_context(socket.socket(socket.AF_UNIX))
            sock.bind(str(node))
        else:
            # /dev/null, not /dev/zero: should this check ever break, a read of /dev/zero
            # would fill memory before any alarm could stop it.
            node.symlink_to("/dev/null")
        with no_hang():
            assert_refused(folder.root, tmp_path, f"{node} is not a regular file (a {kind})")


def test_dir_dangling_symlink_is_named(folder, tmp_path):
    link = folder.root / "train" / "cat" / "gone.png"
    link.symlink_to(tmp_path / "nowhere.png")
    assert_refused(folder.root, tmp_path, f"{link}: unreadable (No such file or directory)")


# ---------------------------------------------------------------- archive names and URLs


@pytest.mark.parametrize("name", ["SET.TAR.GZ", "set.Tgz", "set.TAR", "set.Zip"])
def test_archive_suffix_in_any_case(name, folder, tmp_path):
    if name.lower().endswith(".zip"):
        source = make_zip(folder.root, tmp_path / name)
    else:
        mode = "w" if name.lower().endswith(".tar") else "w:gz"
        source = make_tar(folder.root, tmp_path / name, mode=mode)
    assert_dataset(fetch(source, tmp_path)[0], folder.expected)


@pytest.mark.parametrize("name", ["imgs.tar.gz", "imgs.TGZ", "imgs.tar", "imgs.zip"])
def test_url_of_an_image_folder_archive_is_downloaded_and_read(name, folder, tmp_path, http_dir):
    served, base = http_dir
    if name.endswith("zip"):
        make_zip(folder.root, served / name)
    else:
        make_tar(folder.root, served / name, mode="w" if name.endswith(".tar") else "w:gz")
    url = f"{base}/sets/../{name}?v=1"
    ds, desc = fetch(url, tmp_path)
    assert_dataset(ds, folder.expected)
    assert desc == f"{url} (md5 {_md5(served / name)})"
    assert [p.name for p in (tmp_path / "raw").iterdir()] == [name]  # no .partial-* left
    assert (tmp_path / "raw" / name).read_bytes() == (served / name).read_bytes()


def test_a_signed_url_is_downloaded_and_its_signature_is_written_nowhere(
    folder, tmp_path, http_dir
):
    """A presigned object-store URL (credential and signature in its query): the archive is read,
    saved under its own name, and the prepared data's meta.json shows the query redacted."""
    served, base = http_dir
    make_tar(folder.root, served / "imgs.tar.gz")
    url = f"{base}/imgs.tar.gz?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=SIGdeadbeef"
    ds, desc = fetch(url, tmp_path)
    assert_dataset(ds, folder.expected)
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["imgs.tar.gz"]
    prepared.save_prepared(ds, tmp_path / "prepared", desc)
    meta = (tmp_path / "prepared" / "meta.json").read_text()
    assert "X-Amz-Signature=***" in meta and "SIGdeadbeef" not in meta and "AKIAEXAMPLE" not in meta


def test_url_archive_is_downloaded_again_not_reused(folder, tmp_path, http_dir):
    # No checksum says whether an earlier copy is still what the URL serves.
    served, base = http_dir
    make_tar(folder.root, served / "imgs.tar.gz")
    fetch(f"{base}/imgs.tar.gz", tmp_path)
    shutil.rmtree(folder.root / "test" / "dog")
    make_tar(folder.root, served / "imgs.tar.gz")
    with pytest.raises(DataError) as err:
        fetch(f"{base}/imgs.tar.gz", tmp_path)
    msg = str(err.value)
    assert f"{tmp_path / 'raw' / 'imgs.tar.gz'}: class folder(s) dog present in train/" in msg
    assert msg.endswith(f"(downloaded from {base}/imgs.tar.gz)")


def test_url_of_the_official_archive_under_another_name_is_recognised(official, tmp_path, http_dir):
    served, base = http_dir
    shutil.copy(official.path, served / "mirror.tgz")
    ds, desc = fetch(f"{base}/mirror.tgz", tmp_path)
    assert_dataset(ds, official.expected)
    assert desc == f"{base}/mirror.tgz (md5 {official.spec.md5})"


def test_url_archive_download_failure_leaves_nothing(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/imgs.zip"
    assert_refused(url, tmp_path, "could not download", "data.source=/path/to/imgs.zip")
    assert list((tmp_path / "raw").iterdir()) == []


@pytest.mark.parametrize("name, kind", [("imgs.tar.gz", "tar"), ("imgs.ZIP", "zip")])
def test_url_archive_with_a_bad_body_is_refused_and_not_kept(name, kind, tmp_path, http_dir):
    served, base = http_dir
    (served / name).write_bytes(b"<html>Sorry, this dataset has moved</html>")
    assert_refused(f"{base}/{name}", tmp_path, f"is not a {kind} archive", "check the URL")
    assert list((tmp_path / "raw").iterdir()) == []


def test_url_name_cannot_climb_out_of_the_raw_folder(folder, tmp_path, http_dir):
    # The server resolves x/../../evil.tar.gz to its own evil.tar.gz and serves it; the file
    # must land as raw/evil.tar.gz, not two folders up from a temporary folder in raw/.
    served, base = http_dir
    make_tar(folder.root, served / "evil.tar.gz")
    ds, _ = fetch(f"{base}/x%2F..%2F..%2Fevil.tar.gz", tmp_path)
    assert_dataset(ds, folder.expected)
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["evil.tar.gz"]
    assert not (tmp_path / "evil.tar.gz").exists()


# ---------------------------------------------------------------- subsets


def labels(per_class: list[int], seed: int = 0) -> np.ndarray:
    y = np.repeat(np.arange(len(per_class)), per_class)
    return np.random.default_rng(seed).permutation(y)


def test_stratified_subset_counts_balance_and_seed():
    y = labels([30] * 10)
    idx = splits.stratified_subset(y, 50, seed=0, key="data.train_subset")
    assert len(idx) == 50 and len(np.unique(idx)) == 50
    assert (np.diff(idx) > 0).all()  # sorted: the subset keeps the split's order
    assert np.bincount(y[idx]).tolist() == [5] * 10
    np.testing.assert_array_equal(idx, splits.stratified_subset(y, 50, 0, "data.train_subset"))
    assert not np.array_equal(idx, splits.stratified_subset(y, 50, 1, "data.train_subset"))


def test_stratified_subset_keeps_class_proportions():
    y = labels([60, 30, 10])
    idx = splits.stratified_subset(y, 10, seed=0, key="data.train_subset")
    assert np.bincount(y[idx]).tolist() == [6, 3, 1]


def test_stratified_subset_none_or_everything_keeps_all_in_order():
    y = labels([3, 3])
    np.testing.assert_array_equal(splits.stratified_subset(y, None, 0, "k"), np.arange(6))
    np.testing.assert_array_equal(splits.stratified_subset(y, 6, 0, "k"), np.arange(6))


@pytest.mark.parametrize(
    "per_class, count",
    [([10] * 10, 95), ([10] * 10, 99), ([1, 5, 5], 6), ([1, 1, 8], 3)],
    ids=["fewer-left-out-than-classes", "all-but-one", "single-image-class", "two-singletons"],
)
def test_stratified_subset_edge_counts(per_class, count):
    # sklearn's train_test_split refuses these with a bare ValueError.
    y = labels(per_class)
    idx = splits.stratified_subset(y, count, seed=0, key="data.train_subset")
    assert len(idx) == count and len(np.unique(idx)) == count
    share = np.array(per_class) * count / len(y)
    assert (np.abs(np.bincount(y[idx], minlength=len(per_class)) - share) < 1).all()
    np.testing.assert_array_equal(idx, splits.stratified_subset(y, count, 0, "data.train_subset"))


def _dataset(per_class_train, per_class_test) -> prepared.Dataset:
    y_train, y_test = labels(per_class_train), labels(per_class_test, seed=1)
    # every image's pixels hold its own label, so images and labels can be matched afterwards
    x_train = np.broadcast_to(y_train[:, None, None, None], (len(y_train), 4, 4, 3))
    x_test = np.broadcast_to(y_test[:, None, None, None], (len(y_test), 4, 4, 3))
    classes = [f"c{i}" for i in range(len(per_class_train))]
    return prepared.Dataset(
        x_train.astype(np.uint8), y_train, x_test.astype(np.uint8), y_test, classes
    )


def test_subset_selects_images_with_their_labels():
    ds = _dataset([20] * 4, [10] * 4)
    sub = splits.subset(ds, 8, 4, seed=3)
    assert sub.x_train.shape == (8, 4, 4, 3) and sub.x_test.shape == (4, 4, 4, 3)
    np.testing.assert_array_equal(sub.x_train[:, 0, 0, 0], sub.y_train)
    np.testing.assert_array_equal(sub.x_test[:, 0, 0, 0], sub.y_test)
    assert np.bincount(sub.y_train).tolist() == [2] * 4
    assert np.bincount(sub.y_test).tolist() == [1] * 4
    assert sub.classes == ds.classes
    again = splits.subset(ds, 8, 4, seed=3)
    np.testing.assert_array_equal(again.x_train, sub.x_train)
    assert splits.subset(ds, None, None, seed=3).y_train.tolist() == ds.y_train.tolist()


@pytest.mark.parametrize(
    "train, test, needles",
    [
        (81, None, ["data.train_subset=81", "exceeds the 80 images"]),
        (3, None, ["data.train_subset=3", "smaller than the 4 classes"]),
        (None, 41, ["data.test_subset=41", "exceeds the 40 images"]),
        (None, 2, ["data.test_subset=2", "smaller than the 4 classes"]),
    ],
)
def test_subset_errors_name_the_key(train, test, needles):
    with pytest.raises(DataError) as err:
        splits.subset(_dataset([20] * 4, [10] * 4), train, test, seed=0)
    for needle in needles:
        assert needle in str(err.value)


# ---------------------------------------------------------------- prepared form


def stats_dataset() -> prepared.Dataset:
    """Train: channel 0 half 0 / half 255, channel 1 all 51, channel 2 all 255. Test differs."""
    x_train = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    x_train[:2, ..., 0] = 255
    x_train[..., 1] = 51
    x_train[..., 2] = 255
    x_test = np.full((3, 2, 2, 3), 7, dtype=np.uint8)
    return prepared.Dataset(
        x_train, np.array([0, 1, 0, 1]), x_test, np.array([1, 1, 0]), ["neg", "pos"]
    )


def test_save_and_load_prepared_round_trip(tmp_path):
    ds = stats_dataset()
    out = tmp_path / "data" / "prepared"
    saved = prepared.save_prepared(ds, out, "made-up source")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz"]
    loaded = prepared.load_prepared(out)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(ds, key))
        assert getattr(loaded, key).dtype == getattr(ds, key).dtype
    assert loaded.classes == ["neg", "pos"]
    assert loaded.mean == saved.mean and loaded.std == saved.std
    meta = json.loads((out / "meta.json").read_text())
    assert meta == loaded.meta == saved.meta
    assert meta["source"] == "made-up source"
    assert (meta["num_train"], meta["num_test"], meta["image_size"]) == (4, 3, 2)
    assert meta["train_per_class"] == [2, 2] and meta["test_per_class"] == [1, 2]
    assert meta["fingerprint"] == prepared.fingerprint(ds, stats=meta)


def test_mean_and_std_come_from_the_training_split_only(tmp_path):
    saved = prepared.save_prepared(stats_dataset(), tmp_path / "prepared", "s")
    assert saved.mean == pytest.approx((0.5, 0.2, 1.0), abs=1e-12)
    assert saved.std == pytest.approx((0.5, 0.0, 0.0), abs=1e-7)
    loaded = prepared.load_prepared(tmp_path / "prepared")
    assert loaded.mean == saved.mean and loaded.std == saved.std


def test_channel_stats_accumulate_over_chunks():
    # More images than one 4096-image chunk, with a value that changes between chunks.
    x = np.zeros((5000, 1, 1, 3), dtype=np.uint8)
    x[4096:] = 255
    mean, std = prepared.channel_stats(x)
    p = 904 / 5000
    assert mean == pytest.approx((p,) * 3, abs=1e-12)
    assert std == pytest.approx((np.sqrt(p * (1 - p)),) * 3, abs=1e-9)


def test_save_prepared_replaces_existing_output_atomically(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    old_umask = os.umask(0o022)
    try:
        prepared.save_prepared(stats_dataset(), out, "s")
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no temp folder left
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # the umask's mode, not mkdtemp's 0700


def test_failed_save_keeps_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepared.save_prepared(stats_dataset(), out, "first")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_savez = np.savez

    def savez(path, **arrays):
        if Path(path).name == "test.npz":
            raise OSError("disk full")
        real_savez(path, **arrays)

    monkeypatch.setattr(prepared.np, "savez", savez)
    with pytest.raises(OSError, match="disk full"):
        prepared.save_prepared(stats_dataset(), out, "second")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_failed_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepared.save_prepared(stats_dataset(), out, "first")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".prepared."):
            if not Path(src).name.endswith("-old.tmp"):
                raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)  # files.atomic_folder's rename
    with pytest.raises(OSError, match="rename failed"):
        prepared.save_prepared(stats_dataset(), out, "second")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_load_prepared_missing(tmp_path):
    with pytest.raises(DataError) as err:
        prepared.load_prepared(tmp_path / "prepared")
    assert str(tmp_path / "prepared") in str(err.value)
    assert "dvc repro download" in str(err.value)


# ---------------------------------------------------------------- module layout


def test_data_modules_load_no_torch_torchvision_or_albumentations():
    code = (
        "import sys\n"
        "import onecycle.data.archives, onecycle.data.prepared, onecycle.data.sources\n"
        "print([m for m in ('torch', 'torchvision', 'albumentations') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]"


def test_zip_symlink_whose_target_is_not_text_is_refused(tmp_path):
    path = _zip_with_link(tmp_path / "set.zip", b"\xff\xfe\xfd")
    assert_refused(path, tmp_path, "'train/a/1.png'", "not text")


def test_encrypted_zip_member_is_named(tmp_path, monkeypatch):
    # zipfile writes no encrypted archives: its reader's refusal of one is simulated
    make_image_folder(tmp_path / "imgs")
    path = make_zip(tmp_path / "imgs", tmp_path / "set.zip")
    real_open = zipfile.ZipFile.open

    def encrypted(self, name, *args, **kwargs):
        if getattr(name, "filename", name).endswith(".png"):
            raise RuntimeError(f"File {name!r} is encrypted, password required for extraction")
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", encrypted)
    assert_refused(path, tmp_path, "is encrypted", "without a password")


@pytest.mark.parametrize("kind", ["dir", "tar.gz", "zip"])
def test_a_subset_is_picked_before_decoding_and_equals_subsetting_after(
    kind, tmp_path, monkeypatch
):
    root = tmp_path / "imgs"
    make_image_folder(root, counts={"train": 6, "test": 4})
    source = _as(kind, root, tmp_path)
    full, _ = fetch(source, tmp_path)
    decoded = []
    real = imagefolder.decode
    monkeypatch.setattr(
        imagefolder, "decode", lambda data, name, *a: decoded.append(name) or real(data, name, *a)
    )
    cfg = DataConfig(source=str(source), train_subset=9, test_subset=6)
    picked, _ = sources.fetch(cfg, tmp_path, tmp_path / "raw", seed=5)
    assert len(decoded) == 9 + 6
    assert prepared.fingerprint(picked) == prepared.fingerprint(splits.subset(full, 9, 6, 5))


@pytest.mark.parametrize(
    "code, cause",
    [
        (errno.ENOSPC, "no space left on its file system ("),
        (errno.EROFS, "cannot be written (read-only file system)"),
    ],
)
def test_prepared_data_that_cannot_be_written_is_one_line_and_the_old_one_stays(
    tmp_path, monkeypatch, code, cause
):
    """A full disk while download wrote data/prepared ended in numpy's traceback; one line now
    names the folder, the cause and what to do, and the previous prepared data stay whole."""
    out = tmp_path / "prepared"
    prepared.save_prepared(stats_dataset(), out, "first")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def savez(file, **arrays):
        Path(file).write_bytes(b"half an array")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(prepared.np, "savez", savez)
    with pytest.raises(WriteError) as err:
        prepared.save_prepared(stats_dataset(), out, "second")
    text = str(err.value)
    assert text.startswith(f"{out}: {cause}") and "the previous prepared is unchanged" in text
    assert len(text.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
