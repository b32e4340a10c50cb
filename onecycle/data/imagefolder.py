"""The image-folder layout, and decoding it: ``train/<class>/*`` and ``test/<class>/*``.

Any prefix folder above ``train`` is allowed; labels follow the sorted class folder names, and
every image is decoded to RGB at ``data.image_size``. Hidden files and ``__MACOSX`` folders are
ignored. The archive readers (:mod:`onecycle.data.archives`) fill the same :class:`Layout` as the
directory reader here, and share its limits (:mod:`onecycle.data.images`): every file's declared
size and every image's declared pixel count is checked before it is read or decoded, and a
directory entry that is not a regular file is refused before it is opened.
"""

from __future__ import annotations

import os
import posixpath
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from onecycle.data.images import Limits, UnreadableImage, decode, pixel_limit
from onecycle.data.prepared import Dataset
from onecycle.errors import DataError

SPLITS = ("train", "test")


# ---------------------------------------------------------------- layout


def _is_hidden(parts: list[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


class Layout:
    """Collects ``<prefix>/<split>/<class>/<file>`` entries and checks the folder layout."""

    def __init__(self, origin: str):
        self.origin = origin
        self.prefix: tuple[str, ...] | None = None
        self.files: dict[str, dict[str, list]] = {s: {} for s in SPLITS}
        self.dirs: dict[str, set[str]] = {s: set() for s in SPLITS}
        self.skipped_links: list[str] = []

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

    def report_links(self) -> None:
        """One line on stderr: a skipped link is a deliberate choice, not a silent loss."""
        if links := self.skipped_links:
            more = f", ... ({len(links) - 3} more)" if len(links) > 3 else ""
            tqdm.write(
                f"{self.origin}: skipped {len(links)} symbolic link(s), not read and not "
                f"counted: {', '.join(links[:3])}{more}",
                file=sys.stderr,
            )

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


Pick = Callable[[str, np.ndarray], np.ndarray]  # (split, labels of all its images) -> kept indices


def assemble(
    layout: Layout,
    load: Callable[[tuple], tuple[str, bytes]],
    image_size: int,
    limits: Limits,
    pick: Pick | None = None,
) -> Dataset:
    """Decode the images of each split in label order; with ``pick`` (a subset), only those it
    keeps: the labels are known from the folders before any image is decoded."""
    classes = layout.classes()
    layout.report_links()
    splits = {}
    for split in SPLITS:
        items = [
            (label, item)
            for label, cls in enumerate(classes)
            for item in sorted(layout.files[split][cls], key=lambda t: t[0])
        ]
        y = np.asarray([label for label, _ in items], dtype=np.int64)
        splits[split] = (items, y, pick(split, y) if pick else np.arange(len(y)))
    out = {}
    total = sum(len(keep) for _, _, keep in splits.values())
    with (
        pixel_limit(limits.max_image_pixels),
        tqdm(total=total, desc="decode images", unit="img", mininterval=1.0) as bar,
    ):
        for split, (items, y, keep) in splits.items():
            xs = []
            for i in keep:
                name, data = load(items[i][1])
                try:
                    xs.append(decode(data, name, image_size, limits.max_image_pixels))
                except UnreadableImage as exc:
                    raise DataError(
                        f"{exc}; replace it with a good copy or delete it from the dataset, "
                        "then rerun"
                    ) from None
                bar.update()
            out[split] = (np.stack(xs), y[keep])
    return Dataset(*out["train"], *out["test"], classes)


# ---------------------------------------------------------------- the directory reader


def _unreadable(path, exc: OSError) -> DataError:
    return DataError(
        f"{path}: unreadable ({exc.strerror or exc}); fix its permissions or leave it out of "
        "data.source"
    )


def _check_dir_file(path: Path, limits: Limits) -> None:
    """Only a regular file is ever opened: opening a FIFO blocks forever, a device never ends."""
    try:
        st = os.stat(path)  # follows a symlink, as reading it does
    except OSError as exc:
        raise _unreadable(path, exc) from None
    kind = not_regular(st.st_mode)
    if kind:
        raise DataError(f"{path} is not a regular file ({kind}); remove it from data.source")
    limits.check_size(str(path), st.st_size)


def not_regular(mode: int) -> str | None:
    """What a file of ``os.stat`` mode ``mode`` is when it is no regular file (None when it is):
    opening a FIFO blocks forever, reading a device never ends."""
    if stat.S_ISREG(mode):
        return None
    return (
        "a FIFO" if stat.S_ISFIFO(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a folder" if stat.S_ISDIR(mode)
        else "of another kind"
    )  # fmt: skip


def read_image_folder_dir(
    root: Path, image_size: int, limits: Limits, pick: Pick | None = None
) -> Dataset:
    layout = Layout(str(root))

    def walk_error(exc: OSError) -> None:  # os.walk would skip the folder, unnamed
        raise _unreadable(exc.filename, exc)

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error):
        rel = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = [d for d in dirnames if not _is_hidden([d])]  # ignored: never walked
        for d in dirnames:
            layout.place(posixpath.join(rel, d), is_dir=True)
        for f in filenames:
            placed = layout.place(posixpath.join(rel, f), is_dir=False)
            if placed:
                path = Path(dirpath) / f
                _check_dir_file(path, limits)
                layout.add(*placed, (str(path), path))

    def load(item: tuple[str, Path]) -> tuple[str, bytes]:
        try:
            return item[0], item[1].read_bytes()
        except OSError as exc:
            raise _unreadable(item[0], exc) from None

    return assemble(layout, load, image_size, limits, pick)
