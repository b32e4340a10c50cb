"""MLflow tracking shared by every stage: one store, one run per stage execution, DVC tags.

The store is an SQLite database at the repository root (``$DVC_ROOT/mlflow.db``), with artifacts
beside it, so queued ``dvc exp run`` experiments (which run in a temporary copy under .dvc/tmp)
record into the same store. ``MLFLOW_TRACKING_URI`` overrides it (a team's tracking server).

Tracking never costs training: the store is checked once at a stage's start (an unusable one
stops the stage there, in one line, within about 30 s); after that a failing call is kept,
warned about once, retried later, and whatever could not be logged is listed at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from onecycle import files, paths, progress
from onecycle.config import repo_root
from onecycle.errors import MissingInput, UserError
from onecycle.redact import redact, redact_values
from onecycle.tracking.recorder import Recorder, report_unlogged, short_error

EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "cifar10-onecycle")
# The experiment tag MLflow's UI reads to open an experiment on its runs table (the model-training
# view) instead of the GenAI overview; the value is the one its "experiment type" selector writes.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
SYSTEM_METRICS_SECONDS = "5"  # sampling interval of the system metrics (MLflow's default: 10)
CHECK_SECONDS = 30  # how long a stage waits for the store to answer at its start
# MLflow's own HTTP retries default to 7 with backoff 2 and a 120 s timeout (about 4 minutes per
# call against a dead server); bounded here unless the user set them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


class TrackingError(UserError):
    """The MLflow store cannot be reached or used; the message names it and the way out."""


class AccessError(TrackingError):
    """The server refused the credentials (401) or this user may not do that (403): no retry
    helps, so the stage stops at once, naming the variables to set."""


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or repo_root()) / paths.MLFLOW_DB}"


def _way_out(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        db = uri.removeprefix("sqlite:///")
        return (
            f"move it aside to start a new store (mv {db} {db}.broken), make it and its folder "
            "writable, or set MLFLOW_TRACKING_URI to another store"
        )
    return (
        "start the server or fix MLFLOW_TRACKING_URI (unset it to use the local mlflow.db); "
        "for a server with authentication set MLFLOW_TRACKING_USERNAME/PASSWORD"
    )


def _access_error(exc: BaseException, uri: str, what: str) -> AccessError | None:
    """The one line for a refusal by an authenticating server, or None for any other error."""
    code = str(getattr(exc, "error_code", ""))
    text = str(exc)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    shown = redact(uri)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
        trusted = f"MLFLOW_TRACKING_SERVER_CERT_PATH={cert} does" if cert else "this machine does"
        return AccessError(
            f"MLflow server {shown} presented a TLS certificate that {trusted} not trust "
            f"({what}): set MLFLOW_TRACKING_SERVER_CERT_PATH to the PEM file of the CA that signed "
            "it, or of the certificate itself (docs/teams.md)"
        )
    if code == "UNAUTHENTICATED" or "error code 401" in text:
        given = f"as user {user}" if user else "no MLFLOW_TRACKING_USERNAME set"
        return AccessError(
            f"MLflow server {shown} refused the credentials ({given}; {what}): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to "
            "a user of that server (docs/teams.md)"
        )
    if code == "PERMISSION_DENIED" or "error code 403" in text:
        return AccessError(
            f"MLflow server {shown} does not let user {user or '(none)'} write here ({what}: "
            f"permission denied): an admin grants EDIT on experiment {EXPERIMENT} (docs/teams.md), "
            "or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user who "
            "has it"
        )
    return None


def _within(seconds: float, what: str, uri: str, fn: Callable):
    """``fn()``, or a TrackingError if it raises or has not returned after ``seconds``."""
    box: dict = {}

    def call():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["error"] = exc

    worker = threading.Thread(target=call, daemon=True)  # daemon: a hung call cannot block exit
    worker.start()
    worker.join(seconds)
    shown = redact(uri)
    if worker.is_alive():
        raise TrackingError(
            f"MLflow store {shown} did not answer within {seconds:.0f} s ({what}): {_way_out(uri)}"
        )
    if "error" in box:
        raise _access_error(box["error"], uri, what) or TrackingError(
            f"MLflow store {shown} cannot be used ({what}: {redact(short_error(box['error']))}): "
            f"{_way_out(uri)}"
        )
    return box.get("value")


def _experiment_id(root: Path, user_store: bool) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():  # a store made by an older version
            if key not in exp.tags:
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    # An explicit artifact root: MLflow's default (./mlruns) follows the working directory.
    location = None if user_store else (root / paths.MLFLOW_ARTIFACTS).as_uri()
    try:
        return mlflow.create_experiment(EXPERIMENT, location, tags=EXPERIMENT_KIND)
    except Exception:  # created meanwhile by a parallel queued experiment
        return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id


@contextlib.contextmanager
def _creating(root: Path, user_store: bool) -> Iterator[None]:
    """One process at a time opens the local store: the first creates the SQLite schema, and two
    queued experiments creating it at once (``dvc queue start -j 2`` on a fresh clone) break each
    other's migration ("duplicate column name"). A server (MLFLOW_TRACKING_URI) needs no lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        fcntl = None
    try:
        handle = open(root / paths.MLFLOW_LOCK, "a") if fcntl and not user_store else None
    except OSError:  # read-only folder: opening the store says what to do
        handle = None
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _opened(root: Path, user_store: bool) -> str:
    with _creating(root, user_store):
        return _experiment_id(root, user_store)


def setup(root: Path | None = None) -> str:
    """Point MLflow at the project's store and experiment, checking that the store answers;
    returns the experiment id. Call it first in a stage that logs, before any work."""
    import mlflow

    for name in (
        "alembic",
        "mlflow.store.db.utils",
        "mlflow.tracking.fluent",
        "mlflow.store",
        "mlflow.system_metrics",
        "mlflow.models.model",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Its ERROR is a 60-line SQLAlchemy traceback for a read-only or full store; the recorder
    # and the stage say it in one line, naming the cause.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", SYSTEM_METRICS_SECONDS)
    root = root or repo_root()
    # Read before set_tracking_uri, which exports MLFLOW_TRACKING_URI itself.
    user_store = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    exp_id = _within(CHECK_SECONDS, "opening it", uri, lambda: _opened(root, user_store))
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def ui_url(base: str, root: Path | None = None) -> str:
    """Where to open the MLflow UI on this project's runs: the experiment's runs table in the UI's
    "Model training" view. MLflow 3.17's UI opens every experiment in its GenAI view unless the URL
    (or the switch at its top left, which the browser remembers) says otherwise."""
    root = root or repo_root()
    view = "?workflowType=machine_learning"
    for ref in (paths.TRAIN_RUN, paths.LR_FIND_RUN):
        with contextlib.suppress(MissingInput, KeyError, TypeError):
            exp_id = files.read_json(root / ref)["experiment_id"]
            return f"{base}/#/experiments/{exp_id}/runs{view}"
    db = root / paths.MLFLOW_DB  # no run in the workspace yet (e.g. only queued experiments)
    if db.exists():
        import sqlite3

        with (
            contextlib.suppress(sqlite3.Error),
            contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con,
        ):
            query = "SELECT experiment_id FROM experiments WHERE name = ?"
            row = con.execute(query, (EXPERIMENT,)).fetchone()
            if row:
                return f"{base}/#/experiments/{row[0]}/runs{view}"
    return f"{base}/#/experiments{view}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _here() -> dict[str, str]:
    """Who runs the stage: the workspace (a queued experiment's temporary copy is its own), the
    host and the process. A RUNNING run whose process is gone was killed."""
    return {
        "onecycle.workspace": str(Path.cwd().resolve()),
        "onecycle.host": socket.gethostname(),
        "onecycle.pid": str(os.getpid()),
    }


def dvc_tags(stage: str) -> dict[str, str]:
    tags = {"dvc.stage": stage, **_here()}
    for env, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_name(stage: str) -> str:
    """What the runs table shows: the DVC experiment and the stage (``ci-quick-17 · train``); a
    plain ``dvc repro`` says so, with its commit (``repro@1a2b3c4 · train``)."""
    exp = os.environ.get("DVC_EXP_NAME")
    if not exp:
        commit = git_commit()
        exp = f"repro@{commit[:7]}" if commit else "repro"
    return f"{exp} · {stage}"


def datasets(data) -> list[tuple[object, str]]:
    """The prepared training and test splits as MLflow datasets, named by source and split, with
    the prepared data's fingerprint as digest: two runs on different data show different ones."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.numpy_dataset import NumpyDataset

    from onecycle.data.sources import OFFICIAL_FILES, OFFICIAL_URL

    # The prepared data's source is described as "<path or URL> (md5 <digest>)" for archives.
    source = redact(re.sub(r" \(md5 [0-9a-f]{32}\)$", "", str(data.meta["source"])))
    if source in OFFICIAL_FILES:
        origin, short = HTTPDatasetSource(OFFICIAL_URL + OFFICIAL_FILES[source][0]), source
    elif "://" in source:
        origin, short = HTTPDatasetSource(source), Path(urlsplit(source).path.rstrip("/")).name
    else:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        path = Path(source).resolve()
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": the same class
            warnings.simplefilter("ignore", UserWarning)
            origin, short = resolve_dataset_source(str(path)), path.name
    digest = str(data.meta["fingerprint"])
    return [
        (NumpyDataset(x, origin, y, name=f"{short}:{split}", digest=digest), context)
        for x, y, split, context in (
            (data.x_train, data.y_train, "train", "training"),
            (data.x_test, data.y_test, "test", "testing"),
        )
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def close_stale_runs(stage: str, keep: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of ``stage`` that this workspace started on this host from a
    process that is gone (SIGKILL, a power cut): MLflow never heard they ended."""
    import mlflow

    here = _here()
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    query = (
        f"tags.`dvc.stage` = '{stage}' and attributes.status = 'RUNNING' and "
        f"tags.`onecycle.workspace` = '{here['onecycle.workspace']}' and "
        f"tags.`onecycle.host` = '{here['onecycle.host']}'"
    )
    closed = []
    for run in client.search_runs([exp.experiment_id], query):
        pid = run.data.tags.get("onecycle.pid", "")
        if run.info.run_id == keep or not pid.isdigit() or _alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "onecycle.closed_as_stale", "true")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    if closed:
        progress.say(f"{stage}: closed {len(closed)} run(s) left RUNNING by a killed process")
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

    exp_id = setup()
    uri = mlflow.get_tracking_uri()
    run_tags = redact_values({**dvc_tags(stage), **(tags or {})})

    _within(CHECK_SECONDS, "looking for stale runs", uri, lambda: close_stale_runs(stage, run_id))
    try:  # in this thread: MLflow keeps the active run per thread
        run = mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else redact(run_name(stage)),
            tags=run_tags,
            log_system_metrics=True,  # CPU, memory, GPU: the run page's System tab
        )
    except Exception as exc:
        raise _access_error(exc, uri, "starting a run") or TrackingError(
            f"MLflow store {redact(uri)} cannot be used (starting a run: "
            f"{redact(short_error(exc))}): {_way_out(uri)}"
        ) from None
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
        report_unlogged(recorder, stage)
        try:
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
    exp_id = setup()
    uri = mlflow.get_tracking_uri()
    try:
        _within(
            CHECK_SECONDS,
            "finding the run",
            uri,
            lambda: mlflow.MlflowClient().get_run(ref["run_id"]),
        )
    except AccessError:
        raise
    except TrackingError as exc:
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
        "tracking_uri": redact(recorder.uri),
        **extra,
    }
    files.write_json(path, ref)


def read_run_ref(path: Path, hint: str = "run the train stage first (`dvc repro train`)") -> dict:
    return files.read_json(path, hint)


def machine_name() -> str:
    """The CPU, and the GPU where there is one: what a report's timings were measured on."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} GPU; CPU {cpu_name()}"
    except ImportError:
        pass
    return cpu_name()


def cpu_name() -> str:
    """The CPU's model name and whether it has AVX2/AVX-512 (CPUs here differ by 3.5x)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
        "?",
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    simd = [f for f in ("avx2", "avx512f") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {'+'.join(simd) or 'no avx2'}"


def _gpu_name(dev) -> str:
    if dev.type != "cuda":
        return "none"
    import torch

    return torch.cuda.get_device_name(dev.device)


def context(dev, data) -> dict:
    """Where and on what a run trained: device, mixed precision, data, library versions."""
    from importlib.metadata import version

    versions = ", ".join(
        f"{name} {version(name)}" for name in ("torch", "albumentations", "mlflow", "onecycle")
    )
    return {
        "device": str(dev.device),
        "cpu": cpu_name(),
        "gpu": _gpu_name(dev),
        "amp": str(dev.amp_dtype),
        "num_train": len(data.y_train),
        "num_test": len(data.y_test),
        "data_source": redact(str(data.meta["source"])),
        "versions": f"python {platform.python_version()}, {versions}",
    }
