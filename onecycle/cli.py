"""Small helpers for the stage scripts: clean errors, JSON/CSV writing."""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import ConfigError
from .data import DataError
from .lr_finder import LRFindError
from .training import NonFiniteLoss, ResumeMismatch

USER_ERRORS = (
    ConfigError,
    DataError,
    LRFindError,
    NonFiniteLoss,
    ResumeMismatch,
    FileNotFoundError,
)


def run(main: Callable[[], None], stage: str) -> None:
    """Run a stage's main(); a user error prints one clear message and exits 1 (no traceback)."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"\n{stage}: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as exc:
        print(f"\n{stage}: error: {exc}", file=sys.stderr)
        sys.exit(1)


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    _atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, hint: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {hint}") from None


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _atomic_write_text(path, buf.getvalue())


def read_csv(path: Path, hint: str) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {hint}") from None
