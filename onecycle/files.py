"""Writing outputs atomically and reading the small JSON/CSV files stages pass to each other.

Every output is written to a temporary file beside it and renamed into place, so a killed
write never leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from onecycle.errors import MissingInput, WriteError
from onecycle.redact import redact_values

TMP_SUFFIX = ".tmp"  # temporary files are `.<name>.<random>.tmp` (.gitignore matches them)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, then rename it to ``path``.

    The file gets the umask's mode (mkstemp's 0600 would hide results from the rest of a team).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save's writer raises RuntimeError
        tmp.unlink(missing_ok=True)  # first: the free space it reports is what is left
        error = write_error(path, exc)
        if error is None:
            raise
        raise error from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """A new folder beside ``out_dir`` to fill; once the block ends without an error it takes
    ``out_dir``'s place in one rename (the old one, if any, put aside first and removed after;
    back in place if the rename fails). On an error nothing of it is left, and a full disk or a
    read-only folder is one :class:`WriteError` line, as for :func:`atomic_write`."""
    # Not tempfile.mkdtemp: its folder is mode 0700, and the rename would keep that mode. Named
    # like atomic_write's temporaries: git ignores them and remove_stale_temps finds them.
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir.parent / f".{out_dir.name}.{tag}{TMP_SUFFIX}"
    old = out_dir.parent / f".{out_dir.name}.{tag}-old{TMP_SUFFIX}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
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
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # first: the free space it reports is what is left
        error = write_error(out_dir, exc)
        if error is None:
            raise
        raise error from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
CANNOT_WRITE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "not permitted"}  # fmt: skip


def write_error(path: Path, exc: BaseException) -> WriteError | None:
    """One line for an output that could not be written for a cause the user can fix: no space
    (torch.save says so only in its text), a read-only file system, no permission; else None."""
    chain, seen = [], exc  # torch.save's RuntimeError hides the OSError in its context
    while seen is not None and len(chain) < 5:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    codes = [getattr(e, "errno", None) for e in chain]
    code = next((c for c in codes if c in NO_SPACE or c in CANNOT_WRITE), None)
    text = " ".join(map(str, chain))
    kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
    if code in NO_SPACE or "No space left on device" in text or "Disk quota exceeded" in text:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        room = f" ({free / 2**20:.0f} MiB free there)" if free is not None else ""
        return WriteError(
            f"{path}: no space left on its file system{room}; {kept}. Free space there (or "
            "point the outputs at a bigger disk) and rerun"
        )
    if code in CANNOT_WRITE:
        return WriteError(
            f"{path}: cannot be written ({CANNOT_WRITE[code]}); {kept}. Make its folder writable "
            "(or run from a writable copy) and rerun"
        )
    return None


def remove_stale_temps(folders: Iterable[Path], older_than: float = 60.0) -> list[Path]:
    """Delete the temporary files (and folders) that killed writes left in ``folders``; a temp
    touched in the last ``older_than`` seconds may be another process's write in progress."""
    removed = []
    now = time.time()
    for folder in folders:
        for tmp in Path(folder).glob(f".*{TMP_SUFFIX}") if Path(folder).is_dir() else []:
            try:
                if now - tmp.lstat().st_mtime < older_than:
                    continue
                shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:  # removed meanwhile
                continue
    return removed


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj) -> None:
    """Every string in ``obj`` redacted: metrics/, runs/ and meta.json never hold a URL's
    password or signed query."""
    write_text(path, json.dumps(redact_values(obj), indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str] | None = None) -> None:
    """``rows`` under a header of ``fields`` (default: the first row's keys; a file of no rows
    still gets its header when ``fields`` are given)."""
    buf = io.StringIO()
    fields = list(fields or (rows[0] if rows else []))
    if fields:
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_json(path: Path, hint: str = "run the earlier stages first (`dvc repro`)") -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MissingInput(f"{path} not found: {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MissingInput(
            f"{path} is not valid JSON ({exc}): it was edited or damaged; rerun the stage that "
            "writes it (`dvc repro -f <stage>`, see dvc.yaml)"
        ) from None


def read_csv(path: Path, hint: str = "run the earlier stages first (`dvc repro`)") -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise MissingInput(f"{path} not found: {hint}") from None
