"""What a run lacks when a stage ends with the store away, said in a few lines: which metrics
(names, steps), which files, and why (the store unreachable, read-only or full, or a folder this
machine cannot write)."""

from __future__ import annotations

import errno

from onecycle import progress
from onecycle.files import CANNOT_WRITE, NO_SPACE
from onecycle.redact import redact
from onecycle.tracking.connect import sqlite_trouble
from onecycle.tracking.recorder import Call, Recorder, short_error, some_names

LOCAL_ERRNOS = NO_SPACE | set(CANNOT_WRITE) | {errno.ENOTDIR}  # a folder this machine cannot write


def _cause(recorder: Recorder) -> str:
    """Why the store failed, as the closing line says it: a folder this machine cannot write
    (the local artifact store: permissions, read-only, full), else the store unreachable."""
    exc = recorder.last_error
    trouble = sqlite_trouble(exc)
    if recorder.uri.startswith("sqlite:///") and trouble:
        db = recorder.uri.removeprefix("sqlite:///")
        cause = "is read-only" if trouble == "read-only" else "has no space left on its disk"
        return (
            f"the MLflow store {db} {cause} (make it and its folder writable, free space, or set "
            "MLFLOW_TRACKING_URI to another store)"
        )
    if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
        where = redact(str(exc.filename)) if exc.filename else "its artifact folder"
        return (
            f"MLflow could not write {where} ({exc.strerror or short_error(exc)}: make the folder "
            "writable or free space, or set MLFLOW_TRACKING_URI to another store)"
        )
    return f"MLflow at {recorder.shown_uri} is unreachable"


def summarize(calls: list[Call], files_shown: int = 5) -> list[str]:
    """What a run lacks in a few lines: the metric batches as one line (their names, the step
    range, how many batches), the files as one, the rest as they are."""
    batches = [c for c in calls if c.metrics]
    files = [c.file for c in calls if c.file]
    lines = [c.what for c in calls if not c.metrics and not c.file]
    if len(batches) == 1:
        lines.append(batches[0].what)
    elif batches:
        names = sorted({n for c in batches for n in c.metrics})
        low = min(c.steps[0] for c in batches)
        high = max(c.steps[1] for c in batches)
        lines.append(f"metrics {some_names(names)} at steps {low}..{high} ({len(batches)} batches)")
    if files:
        more = f", and {len(files) - files_shown} more" if len(files) > files_shown else ""
        lines.append(f"{len(files)} file(s): {', '.join(files[:files_shown])}{more}")
    return lines


def report_unlogged(recorder: Recorder, stage: str) -> bool:
    """At a stage's end: send what waits (True), or say in a few lines what the run lacks and
    why (False)."""
    if recorder.flush():
        return True
    lines = "\n".join(f"  - {what}" for what in summarize(recorder.unlogged()))
    progress.say(
        f"{stage}: {_cause(recorder)}; run {recorder.run_id} is missing:\n"
        f"{lines}\nThe stage's own outputs hold all of it (metrics/, plots/, models/)."
    )
    return False
