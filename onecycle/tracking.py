"""MLflow tracking shared by every stage: one store, one run per stage execution, DVC tags.

The store is an SQLite database at the repository root (``$DVC_ROOT/mlflow.db``), with artifacts
beside it, so queued ``dvc exp run`` experiments (which run in a temporary copy under .dvc/tmp)
record into the same store. ``MLFLOW_TRACKING_URI`` overrides it (a team's tracking server).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from . import files, paths
from .config import repo_root
from .errors import MissingInput

EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "cifar10-onecycle")


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or repo_root()) / paths.MLFLOW_DB}"


def _quiet_mlflow() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.store"):
        logging.getLogger(name).setLevel(logging.WARNING)


def setup(root: Path | None = None) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    import mlflow

    _quiet_mlflow()
    root = root or repo_root()
    # Read before set_tracking_uri, which exports MLFLOW_TRACKING_URI itself.
    user_store = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    mlflow.set_tracking_uri(tracking_uri(root))
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        # An explicit artifact root: MLflow's default (./mlruns) follows the working directory.
        location = None if user_store else (root / paths.MLFLOW_ARTIFACTS).as_uri()
        try:
            exp_id = mlflow.create_experiment(EXPERIMENT, artifact_location=location)
        except Exception:  # created meanwhile by a parallel queued experiment
            exp_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def dvc_tags(stage: str) -> dict[str, str]:
    tags = {"dvc.stage": stage}
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
def stage_run(stage: str, run_id: str | None = None, tags: dict | None = None) -> Iterator:
    """One MLflow run for one stage execution (or a resumed one, given ``run_id``).

    Ends FINISHED on success, KILLED on Ctrl-C or SIGTERM, FAILED on any other exception: never
    left RUNNING.
    """
    import mlflow

    setup()
    run_tags = {**dvc_tags(stage), **(tags or {})}
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else stage, tags=run_tags)
    try:
        with sigterm_as_interrupt():
            yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


@contextlib.contextmanager
def add_to_run(ref_path: Path, stage: str) -> Iterator:
    """Reopen the run named in ``ref_path`` (written by train) to add a later stage's results.

    The run keeps the status it had (FINISHED); a failure here is recorded as a tag on it, not by
    marking the training FAILED.
    """
    import mlflow

    ref = read_run_ref(ref_path)
    setup()
    client = mlflow.MlflowClient()
    try:
        before = client.get_run(ref["run_id"]).info.status
    except Exception as exc:
        raise MissingInput(
            f"{ref_path} names MLflow run {ref['run_id']}, which is not in {mlflow.get_tracking_uri()} "
            f"({type(exc).__name__}); rerun the train stage (`dvc repro -f train`)"
        ) from None
    final = before if before in ("FINISHED", "FAILED", "KILLED") else "FINISHED"
    run = mlflow.start_run(run_id=ref["run_id"])
    try:
        with sigterm_as_interrupt():
            yield run
    except BaseException as exc:
        mlflow.set_tag(f"{stage}.error", f"{type(exc).__name__}: {exc}"[:500])
        mlflow.end_run(final)
        raise
    mlflow.set_tag(f"{stage}.done", "true")
    mlflow.end_run(final)


def write_run_ref(path: Path, run) -> None:
    """The file a later stage reads to log into this run (never 'the latest run')."""
    import mlflow

    ref = {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": mlflow.get_tracking_uri(),
    }
    files.write_json(path, ref)


def read_run_ref(path: Path, hint: str = "run the train stage first (`dvc repro train`)") -> dict:
    return files.read_json(path, hint)


def context(dev, data) -> dict:
    """Where and on what a run trained: device, mixed precision, data, library versions."""
    import platform
    from importlib.metadata import version

    versions = ", ".join(
        f"{name} {version(name)}" for name in ("torch", "albumentations", "mlflow", "onecycle")
    )
    return {
        "device": str(dev.device),
        "amp": str(dev.amp_dtype),
        "num_train": len(data.y_train),
        "num_test": len(data.y_test),
        "data_source": data.meta["source"],
        "versions": f"python {platform.python_version()}, {versions}",
    }


def log_params_flat(params: dict, prefix: str = "") -> None:
    """Nested dicts become dotted keys: ``{"train": {"epochs": 24}}`` -> ``train.epochs``."""
    import mlflow

    flat: dict[str, object] = {}

    def walk(d, pre):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{pre}{k}.")
            else:
                flat[f"{pre}{k}"] = v

    walk(params, prefix)
    mlflow.log_params(flat)


def log_metrics(values: dict, step: int | None = None) -> None:
    """The numbers of ``values`` at ``step``; None and non-numbers are left out."""
    import mlflow

    numbers = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
    mlflow.log_metrics(numbers, step=step)


def log_series(rows: list[dict], keys: list[str], step_key: str = "step") -> None:
    """Every row's ``keys`` as metrics at the row's step, in batches (one request per 1000
    values rather than one per step: it matters against a remote tracking server)."""
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(r[k]), now, int(r[step_key])) for r in rows for k in keys if k in r]
    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def log_files(
    *local: str | Path, artifact_path: str | None = None, run_id: str | None = None
) -> None:
    """Copy files into the active run's artifacts (or into run ``run_id``'s)."""
    import mlflow

    client = mlflow.MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    for path in local:
        client.log_artifact(run_id, str(path), artifact_path)
