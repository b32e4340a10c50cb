"""What download would refuse about the subsets, found before any stage runs (check_params).

DVC removes a stage's outputs before it runs it, so a ``data.train_subset`` smaller than the
classes, refused by download, used to cost ``data/prepared``. Only what is known without reading
images is checked here (a local source that does not exist; the class count of cifar10,
cifar100, a local folder and an image-folder archive); download checks the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from onecycle import paths
from onecycle.config import DataConfig
from onecycle.errors import DataError


def local_source(cfg: DataConfig, root: Path) -> Path | None:
    """``data.source`` as a local path (relative ones from the repository root); None for
    cifar10, cifar100 and a URL. One that does not exist is refused here, as download would."""
    if cfg.source in ("cifar10", "cifar100") or "://" in cfg.source:
        return None
    path = Path(cfg.source).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.exists():
        from onecycle.data.sources import missing_source

        raise missing_source(path)
    return path


def known_class_count(cfg: DataConfig, root: Path) -> int | None:
    """The number of classes ``data.source`` holds where it is known without reading images:
    cifar10 and cifar100 by name, a local folder by its ``train/`` subfolders, an image-folder
    archive by its member names (a tar's headers: about a second for CIFAR-10's 60,000 JPEGs);
    else None."""
    names = {"cifar10": 10, "cifar100": 100}
    if cfg.source in names:
        return names[cfg.source]
    path = local_source(cfg, root)
    if path is None:
        return None
    if path.is_file():
        from onecycle.data import archives

        if not path.name.lower().endswith(archives.ARCHIVE_SUFFIXES):
            return None
        return _prepared_class_count(cfg, path, root) or archives.class_count(path)
    train = path / "train"
    if not train.is_dir() or train.is_symlink():
        return None
    return sum(1 for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))


def _prepared_class_count(cfg: DataConfig, path: Path, root: Path) -> int | None:
    """The classes data/prepared recorded, where it was made from this very file (its
    meta.json names the path and is newer than the file): no header walk then."""
    meta = root / paths.PREPARED_DIR / "meta.json"
    try:
        if meta.stat().st_mtime < path.stat().st_mtime:
            return None
        recorded = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    names = {f"{p} (" for p in (cfg.source, Path(cfg.source).expanduser(), path)}
    source, classes = recorded.get("source"), recorded.get("classes")
    if isinstance(source, str) and isinstance(classes, list) and source.startswith(tuple(names)):
        return len(classes)
    return None


def check_counts(cfg: DataConfig, root: Path) -> None:
    """What download would refuse about data.source (a missing path), data.train_subset,
    data.test_subset and data.val_images, found before any stage runs (check_params), where
    the class count is known."""
    subsets = (("train_subset", cfg.train_subset), ("test_subset", cfg.test_subset))
    given = [(key, count) for key, count in subsets if count is not None]
    if not given:
        local_source(cfg, root)  # that it exists
    n = known_class_count(cfg, root) if given else None  # (an archive's costs a header walk)
    for key, count in given:
        if n is not None and count < n:
            raise DataError(
                f"params.yaml: data.{key}={count} is smaller than the {n} classes of "
                f"data.source; raise it or set null"
            )
    if cfg.train_subset is not None and cfg.val_images > cfg.train_subset // 2:
        raise DataError(
            f"params.yaml: data.val_images={cfg.val_images} would leave "
            f"{cfg.train_subset - cfg.val_images} of data.train_subset={cfg.train_subset} "
            f"images to train on; keep it at most half ({cfg.train_subset // 2}), or raise "
            "data.train_subset"
        )


def other_pipeline_runs(root: Path) -> list[str]:
    """The other DVC processes that hold locks on this workspace's stages now, as ``PID <n>:
    <command>``: DVC's own per-output locks (``.dvc/tmp/rwlock``), less those of this process's
    own ancestors (the ``dvc repro`` running it) and of processes that are gone.

    DVC locks a stage's outputs only while the stage runs, so a second ``dvc exp run -S ...``
    started beside a first rewrites params.yaml and runs check_params before its lock refuses
    a later stage; DVC then records that check in dvc.lock, and the first run's next stage would
    train on values nobody meant for it (issue 26, item 2)."""

    import psutil

    try:
        lock = json.loads((root / ".dvc" / "tmp" / "rwlock").read_text())
    except (OSError, ValueError):
        return []
    holders = list((lock.get("write") or {}).values())
    holders += [info for infos in (lock.get("read") or {}).values() for info in infos]
    mine = {p.pid for p in psutil.Process().parents()}
    found = {}
    for info in holders:
        pid = info.get("pid") if isinstance(info, dict) else None
        if isinstance(pid, int) and pid not in mine and psutil.pid_exists(pid):
            found[pid] = f"PID {pid}: {info.get('cmd', '?')}"
    return list(found.values())
