"""The MLflow store a stage logs to: its URI (the repository's mlflow.db, or MLFLOW_TRACKING_URI),
checked once at a stage's start within a deadline, the experiment created, and the UI's address."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from onecycle import files, paths
from onecycle.errors import MissingInput, UserError
from onecycle.params_file import repo_root
from onecycle.redact import redact
from onecycle.tracking.recorder import short_error

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


def sqlite_trouble(error: BaseException | None) -> str | None:
    """ "full" or "read-only" where SQLite said so (its words for ENOSPC and a file it may not
    write, through SQLAlchemy), else None."""
    text = str(error) if error is not None else ""
    if "database or disk is full" in text:
        return "full"
    return "read-only" if "readonly database" in text else None


def way_out(uri: str, error: BaseException | None = None) -> str:
    """What to do about a store that cannot be used; ``error``, what it said."""
    if uri.startswith("sqlite:///"):
        db = uri.removeprefix("sqlite:///")
        if sqlite_trouble(error) == "full":
            return (
                f"free space on its disk (df -h {Path(db).parent}), or set MLFLOW_TRACKING_URI "
                "to a store on another disk"
            )
        return (
            f"move it aside to start a new store (mv {db} {db}.broken), make it and its folder "
            "writable, or set MLFLOW_TRACKING_URI to another store"
        )
    return (
        "start the server or fix MLFLOW_TRACKING_URI (unset it to use the local mlflow.db); "
        "for a server with authentication set MLFLOW_TRACKING_USERNAME/PASSWORD"
    )


def access_error(exc: BaseException, uri: str, what: str) -> AccessError | None:
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


def within(seconds: float, what: str, uri: str, fn: Callable):
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
            f"MLflow store {shown} did not answer within {seconds:.0f} s ({what}): {way_out(uri)}"
        )
    if "error" in box:
        raise access_error(box["error"], uri, what) or TrackingError(
            f"MLflow store {shown} cannot be used ({what}: {redact(short_error(box['error']))}): "
            f"{way_out(uri, box['error'])}"
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
    exp_id = within(CHECK_SECONDS, "opening it", uri, lambda: _opened(root, user_store))
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
