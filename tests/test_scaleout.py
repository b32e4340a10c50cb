"""The team set-up for real (README: For teams): a PostgreSQL server started from Debian's binaries,
the real `make mlflow-server` on it, an experiment of the tiny pipeline logging through it, and a
shared DVC remote that a second clone pulls from. It builds on a fork of the suite's tiny run.
`pytest -m scaleout` (with tests/test_ddp.py)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from onecycle import paths

from .tiny_repo import ROOT, TINY_PIPELINE, env, fork, free_port, run

pytestmark = [pytest.mark.scaleout, pytest.mark.slow, pytest.mark.long]


def _pg_bin() -> Path:
    """The folder of PostgreSQL's server binaries (Debian keeps them off PATH), or a skip."""
    found = shutil.which("initdb") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None
    )
    if not found:
        pytest.skip(
            "PostgreSQL not found (initdb): the team tests need Debian's postgresql package "
            "(`apt-get install postgresql`; .ci/run does it as root)"
        )
    return Path(found).resolve().parent  # initdb may be a link; createdb sits beside the real one


def _as_user(user: str | None, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """``cmd`` as ``user`` (PostgreSQL refuses to run as root), or as ourselves."""
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own: initdb in a temporary folder, trust auth, listening on
    127.0.0.1 and a free port; a database `mlflow`. Stopped after."""
    bindir = _pg_bin()
    user = None
    folder = Path(tempfile.mkdtemp(prefix="onecycle-pg-"))
    if os.geteuid() == 0:  # initdb and postgres refuse root: run them as the postgres user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        user = "postgres"
    data, port = folder / "data", free_port()
    _as_user(user, [str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "-A", "trust"])
    _as_user(
        user,
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(folder / "postgres.log"),
            "-o",
            f"-h 127.0.0.1 -p {port} -k {folder}",
            "-w",
            "start",
        ],
    )
    try:
        _as_user(user, [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                        "-U", "mlflow", "mlflow"])  # fmt: skip
        yield f"postgresql+psycopg://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        _as_user(user, [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """The real `make mlflow-server` on that database, artifacts proxied into a folder."""
    artifacts = tmp_path_factory.mktemp("server-artifacts")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_BACKEND_STORE_URI": postgres, "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts)}
    log = tmp_path_factory.mktemp("server-log") / "mlflow-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["make", "-s", "-C", str(ROOT), "mlflow-server", f"MLFLOW_SERVER_PORT={port}",
             "MLFLOW_SERVER_WORKERS=1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # creating the schema on a new database takes a while
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_tail = log.read_text()[-3000:]
                    raise AssertionError(f"mlflow server did not start:\n{log_tail}") from None
                time.sleep(1)
        yield url, artifacts
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def _team_env(repo: Path, url: str) -> dict:
    return env(repo, MLFLOW_TRACKING_URI=url)


@pytest.fixture(scope="module")
def team_repo(server, pipeline, tmp_path_factory):
    """Clone A: a fork of the tiny run whose experiment (every training stage: its range test
    changed) logs to the server; committed. (Queued experiments: tests/test_study_queue.py.)"""
    url, _ = server
    repo = fork(pipeline, tmp_path_factory.mktemp("clone-a") / "repo")
    team = _team_env(repo, url)
    run(repo, "dvc", "exp", "run", "-n", "team-a", "-S", "lr_find.num_iter=41", env_=team)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "team-a")
    return repo


def test_the_server_on_postgresql_holds_every_run_metric_figure_and_model(server, team_repo):
    import mlflow

    url, artifacts = server
    client = mlflow.MlflowClient(tracking_uri=url)  # the REST API, as the UI and a team use it
    exp = client.get_experiment_by_name("cifar10-onecycle")
    found = client.search_runs([exp.experiment_id])
    assert {r.info.run_name for r in found} == {"team-a · lr_find", "team-a · train"}
    assert all(r.info.status == "FINISHED" for r in found)
    (train,) = [r for r in found if r.data.tags.get("dvc.stage") == "train"]
    assert 0 <= train.data.metrics["eval/accuracy"] <= 1
    history = client.get_metric_history(train.info.run_id, "test/accuracy")
    assert len(history) == TINY_PIPELINE["train"]["epochs"]
    for r in found:  # lr_find's sweep figure; train's history, schedule, confusion matrix, ...
        figures = [a.path for a in client.list_artifacts(r.info.run_id, "figures")]
        assert figures and all(f.endswith(".png") for f in figures), figures
        local = client.download_artifacts(r.info.run_id, figures[0])  # through the server
        assert Path(local).read_bytes().startswith(b"\x89PNG")
    (model,) = client.search_logged_models([exp.experiment_id])
    assert model.source_run_id == train.info.run_id
    version = client.get_model_version("cifar10-resnet9", "1")
    assert version.source.startswith("models:/")
    assert any(artifacts.rglob("*.png")), "artifacts go through the server to its destination"
    stray = [p for p in (team_repo / ".dvc" / "tmp").rglob("mlflow.db")]
    assert not stray, "nothing may fall back to a local store"


def test_a_second_clone_pulls_the_results_from_the_shared_remote_and_reruns_nothing(
    server, team_repo, tmp_path
):
    """Clone A pushes to a shared remote (a local folder standing in for an object store); a fresh
    clone B pulls, `dvc repro` runs nothing and ends with A's metrics, and B's evaluate logs into
    A's run on the shared server."""
    import mlflow

    url, _ = server
    remote = tmp_path / "remote"
    env_a = _team_env(team_repo, url)
    run(team_repo, "dvc", "remote", "add", "-d", "team", str(remote), env_=env_a)
    run(team_repo, "git", "commit", "-qam", "the team's DVC remote", env_=env_a)
    run(team_repo, "dvc", "push", "--run-cache", env_=env_a)

    clone = tmp_path / "clone-b"
    run(tmp_path, "git", "clone", "-q", str(team_repo), str(clone), env_=env_a)
    env_b = _team_env(clone, url)
    run(clone, "dvc", "pull", "--run-cache", env_=env_b)
    out = run(clone, "dvc", "repro", env_=env_b).stdout
    assert "Running stage" not in out and "up to date" in out, out
    for metrics in (paths.EVAL_METRICS, paths.TRAIN_METRICS):
        assert (clone / metrics).read_text() == (team_repo / metrics).read_text()
    assert (clone / paths.MODEL).read_bytes() == (team_repo / paths.MODEL).read_bytes()

    run_id = json.loads((clone / paths.TRAIN_RUN).read_text())["run_id"]
    assert run_id == json.loads((team_repo / paths.TRAIN_RUN).read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=url)
    before = client.get_run(run_id).data.metrics["eval/accuracy"]
    started = time.time() * 1000
    run(clone, "dvc", "repro", "-s", "-f", "evaluate", env_=env_b)  # B logs into A's run
    after = client.get_metric_history(run_id, "eval/accuracy")
    assert max(m.timestamp for m in after) >= started and after[-1].value == pytest.approx(before)
