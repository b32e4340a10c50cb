"""What download would refuse about the subsets, found before any stage runs (check_params).

DVC removes a stage's outputs before it runs it, so a ``data.train_subset`` smaller than the
classes, refused by download, used to cost ``data/prepared``. Only what is known without reading
the source is checked here (the class count of cifar10, cifar100 and a local folder); download
checks the rest.
"""

from __future__ import annotations

from pathlib import Path

from onecycle.config import DataConfig
from onecycle.errors import DataError


def known_class_count(cfg: DataConfig, root: Path) -> int | None:
    """The number of classes ``data.source`` holds where it is known without reading it:
    cifar10 and cifar100 by name, a local folder by its ``train/`` subfolders; else None."""
    names = {"cifar10": 10, "cifar100": 100}
    if cfg.source in names:
        return names[cfg.source]
    path = Path(cfg.source).expanduser()
    path = path if path.is_absolute() else root / path
    train = path / "train"
    if not train.is_dir() or train.is_symlink():
        return None
    return sum(1 for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_counts(cfg: DataConfig, root: Path) -> None:
    """What download would refuse about data.train_subset, data.test_subset and
    data.val_images, found before any stage runs (check_params), where the class count is known."""
    n = known_class_count(cfg, root)
    for key, count in (("train_subset", cfg.train_subset), ("test_subset", cfg.test_subset)):
        if n is not None and count is not None and count < n:
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
    import json

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
