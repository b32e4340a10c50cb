"""A stage's MLflow run from start to end: one run per stage execution, ended FINISHED, KILLED
(Ctrl-C, SIGTERM) or FAILED; runs a killed process left RUNNING are closed by the next; later
stages add to the train run through the run reference files.

Tracking never costs training: the store is checked once at a stage's start (``connect.setup``:
an unusable one stops the stage there, in one line, within about 30 s); after that a failing call
is kept, warned about once, retried later (``recorder``), and whatever could not be logged is
listed at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from onecycle import files, paths, progress
from onecycle.errors import MissingInput, UserError
from onecycle.redact import redact, redact_values
from onecycle.tracking import connect, provenance
from onecycle.tracking.recorder import Recorder, short_error
from onecycle.tracking.unlogged import report_unlogged

# How long a stage's end waits for each call that marks its run ended once the store did not take
# the queue (it hangs or is away): one try, not MLflow's three of 15 s for each of two calls.
END_SECONDS = 5


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


RUN_REFS = {"lr_find": paths.LR_FIND_RUN, "train": paths.TRAIN_RUN}  # each run's last act


def _ended_run(stage: str) -> str | None:
    """The run whose stage wrote its run reference: its work ended, whatever the store heard."""
    ref = RUN_REFS.get(stage)
    try:
        return files.read_json(ref).get("run_id") if ref is not None and ref.exists() else None
    except (OSError, ValueError, AttributeError, UserError):
        return None


def close_stale_runs(stage: str, keep: str | None = None) -> list[str]:
    """Close the RUNNING runs of ``stage`` that this workspace started on this host from a
    process that is gone: KILLED (SIGKILL, a power cut: MLflow never heard they ended), or
    FINISHED where the stage's run reference names the run (its work ended while the store
    was away, and nothing later logged into it)."""
    import mlflow

    here = provenance.here()
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(connect.EXPERIMENT)
    query = (
        f"tags.`dvc.stage` = '{stage}' and attributes.status = 'RUNNING' and "
        f"tags.`onecycle.workspace` = '{here['onecycle.workspace']}' and "
        f"tags.`onecycle.host` = '{here['onecycle.host']}'"
    )
    closed, ended = [], _ended_run(stage)
    for run in client.search_runs([exp.experiment_id], query):
        pid = run.data.tags.get("onecycle.pid", "")
        if run.info.run_id == keep or not pid.isdigit() or _alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "onecycle.closed_as_stale", "true")
        finished = run.info.run_id == ended
        client.set_terminated(run.info.run_id, "FINISHED" if finished else "KILLED")
        closed.append(run.info.run_id)
        if finished:
            progress.say(f"{stage}: marked run {ended} FINISHED (the store was away when it ended)")
    if len(closed) > (ended in closed):
        progress.say(
            f"{stage}: closed {len(closed) - (ended in closed)} run(s) left RUNNING by a killed process"
        )
    return closed


def close_killed_experiments(names: list[str], root: Path) -> list[str]:
    """Mark KILLED the RUNNING runs of the queued experiments ``names`` (``dvc.exp_name``) that
    this host started from a process that is gone: a study requeues them after their queue
    workers were killed, and the temporary copy they ran in is never used again, so
    :func:`close_stale_runs` (keyed to the workspace) never reaches them."""
    import mlflow

    exp_id = connect.setup(root)
    client, host, closed = mlflow.MlflowClient(), provenance.here()["onecycle.host"], []
    for name in names:
        query = (
            f"tags.`dvc.exp_name` = '{name}' and attributes.status = 'RUNNING' and "
            f"tags.`onecycle.host` = '{host}'"
        )
        for run in client.search_runs([exp_id], query):
            pid = run.data.tags.get("onecycle.pid", "")
            if pid.isdigit() and not _alive(int(pid)):
                client.set_tag(run.info.run_id, "onecycle.closed_as_stale", "true")
                client.set_terminated(run.info.run_id, "KILLED")
                closed.append(run.info.run_id)
    if closed:
        progress.say(f"study: closed {len(closed)} run(s) of those experiments as KILLED")
    return closed


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same clean-up runs."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stage_run(
    stage: str, run_id: str | None = None, tags: dict | None = None
) -> Iterator[Recorder]:
    """One MLflow run for one stage execution (or a resumed one, given ``run_id``).

    Ends FINISHED on success, KILLED on Ctrl-C or SIGTERM, FAILED on any other exception. Runs
    that a killed process left RUNNING in this workspace are closed as KILLED first.
    """
    import mlflow

    exp_id = connect.setup()
    uri = mlflow.get_tracking_uri()
    run_tags = redact_values({**provenance.dvc_tags(stage), **(tags or {})})

    connect.within(
        connect.CHECK_SECONDS,
        "looking for stale runs",
        uri,
        lambda: close_stale_runs(stage, run_id),
    )
    run = _start_run(stage, run_id, run_tags, uri)
    recorder = Recorder(run.info.run_id, exp_id, uri)
    status = "FINISHED"
    try:
        with sigterm_as_interrupt():
            yield recorder
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _end(recorder, stage, status)


def _start_run(stage: str, run_id: str | None, tags: dict, uri: str):
    """``mlflow.start_run`` (a new run named for the stage, or ``run_id`` resumed), in this
    thread: MLflow keeps the active run per thread."""
    import mlflow

    try:
        return mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else redact(provenance.run_name(stage)),
            tags=tags,
            log_system_metrics=True,  # CPU, memory, GPU: the run page's System tab
        )
    except Exception as exc:
        raise connect.access_error(exc, uri, "starting a run") or connect.TrackingError(
            f"MLflow store {redact(uri)} cannot be used (starting a run: "
            f"{redact(short_error(exc))}): {connect.way_out(uri, exc)}"
        ) from None


def _end(recorder: Recorder, stage: str, status: str) -> None:
    """What the store lacks said, then the run marked ``status``: at once where the store
    took every record, else in one short try (the work is done; it does not wait long)."""
    taken = report_unlogged(recorder, stage)
    try:
        with contextlib.nullcontext() if taken else _one_short_try(END_SECONDS):
            _end_run(status)
    except Exception as exc:  # noqa: BLE001 - the work is done; say what MLflow lacks
        fate = (
            "the next stage that logs into it marks it FINISHED"
            if status == "FINISHED"
            else f"the next run of {stage} here closes it as KILLED"
        )
        progress.say(
            f"{stage}: could not mark run {recorder.run_id} {status} ({short_error(exc)}); {fate}"
        )


@contextlib.contextmanager
def _one_short_try(seconds: int) -> Iterator[None]:
    """MLflow's HTTP calls begun meanwhile wait ``seconds`` once, with no retry: a stage's end
    marks its run ended this way after the store did not take the queue, so a server that
    accepts and never answers holds it ``seconds``, not 48 s (issue 26, item 3)."""
    quick = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(seconds), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    saved = {key: os.environ.get(key) for key in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _end_run(status: str) -> None:
    """``mlflow.end_run``, whose "View run ... at: <tracking URI>" lines are printed redacted."""
    import io

    import mlflow

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            mlflow.end_run(status)
    finally:
        sys.stdout.write(redact(printed.getvalue()))


@contextlib.contextmanager
def add_to_run(ref_path: Path, stage: str) -> Iterator[Recorder]:
    """Log a later stage's results into the run named in ``ref_path`` (written by lr_find or
    train). The run keeps its status; a failure here is recorded as a tag on it."""
    import mlflow

    ref = read_run_ref(ref_path)
    exp_id = connect.setup()
    uri = mlflow.get_tracking_uri()
    try:
        connect.within(
            connect.CHECK_SECONDS,
            "finding the run",
            uri,
            lambda: mlflow.MlflowClient().get_run(ref["run_id"]),
        )
    except connect.AccessError:
        raise
    except connect.TrackingError as exc:
        raise MissingInput(
            f"{ref_path} names MLflow run {ref['run_id']}, which {redact(uri)} cannot give ({exc}); "
            f"rerun the stage that wrote it (`dvc repro -f {ref_path.stem}`)"
        ) from None
    recorder = Recorder(ref["run_id"], exp_id, uri)
    _finish_if_orphaned(ref["run_id"], stage)
    try:
        with sigterm_as_interrupt():
            yield recorder
    except BaseException as exc:
        recorder.set_tags({f"{stage}.error": f"{type(exc).__name__}: {exc}"[:500]})
        report_unlogged(recorder, stage)
        raise
    recorder.set_tags({f"{stage}.done": "true"})
    report_unlogged(recorder, stage)


def _finish_if_orphaned(run_id: str, stage: str) -> None:
    """A run named in a run-reference file finished its stage (the file is written last); if it
    is still RUNNING and its process is gone, the store was out of reach when it ended."""
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    pid = run.data.tags.get("onecycle.pid", "")
    if run.info.status == "RUNNING" and pid.isdigit() and not _alive(int(pid)):
        client.set_tag(run_id, "onecycle.finished_by", stage)
        client.set_terminated(run_id, "FINISHED")
        progress.say(f"{stage}: marked run {run_id} FINISHED (the store was away when it ended)")


def write_run_ref(path: Path, recorder: Recorder, **extra) -> None:
    """The file a later stage reads to log into this run (never 'the latest run'); ``extra``:
    e.g. the MLflow model the run logged (``model_id``)."""
    ref = {
        "run_id": recorder.run_id,
        "experiment_id": recorder.experiment_id,
        "connect.tracking_uri": redact(recorder.uri),
        **extra,
    }
    files.write_json(path, ref)


def read_run_ref(path: Path, hint: str = "run the train stage first (`dvc repro train`)") -> dict:
    return files.read_json(path, hint)
