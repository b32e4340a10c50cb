"""The team set-up for real (README: For teams): a PostgreSQL server started from Debian's binaries,
the real `make mlflow-server` on it, the tiny pipeline and two queued experiments logging through
it, and a shared DVC remote that a second clone pulls from. `pytest -m scaleout`."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from onecycle import paths

from .conftest import ROOT
from .test_pipeline import TINY_PIPELINE, _copy_repo, _env, _free_port, _set_params, _train

pytestmark = [pytest.mark.scaleout, pytest.mark.slow, pytest.mark.long]

GIT_ID = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


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
    data, port = folder / "data", _free_port()
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
    port = _free_port()
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
    return {**_env(repo), **GIT_ID, "MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1"}


def _sh(repo: Path, env: dict, *args: str) -> str:
    proc = subprocess.run(
        list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def team_repo(server, tmp_path_factory):
    """Clone A: the tiny pipeline, then two queued experiments run two at a time, all logging
    to the server."""
    url, _ = server
    repo = _copy_repo(tmp_path_factory.mktemp("clone-a"))
    _set_params(repo, TINY_PIPELINE)
    env = _team_env(repo, url)
    _sh(repo, env, "git", "commit", "-qam", "tiny")
    _sh(repo, env, "dvc", "repro")
    _sh(repo, env, "git", "add", "-A")
    _sh(repo, env, "git", "commit", "-qm", "tiny pipeline run")
    for name, lr in (("team-a", "0.05"), ("team-b", "0.1")):
        _sh(repo, env, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.max_lr={lr}")
    _sh(repo, env, "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 900
    while True:
        status = _sh(repo, env, "dvc", "queue", "status")
        rows = [line.split() for line in status.splitlines()[1:] if line.strip()]
        states = {r[1]: r[-1] for r in rows if len(r) >= 3 and r[0] != "Worker"}
        if all(states.get(n) in ("Success", "Failed") for n in ("team-a", "team-b")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert states["team-a"] == states["team-b"] == "Success", status
    return repo


def test_the_server_on_postgresql_holds_every_run_metric_figure_and_model(server, team_repo):
    import mlflow

    url, artifacts = server
    client = mlflow.MlflowClient(tracking_uri=url)  # the REST API, as the UI and a team use it
    exp = client.get_experiment_by_name("cifar10-onecycle")
    runs = client.search_runs([exp.experiment_id])
    names = {r.info.run_name for r in runs}
    commit = _sh(team_repo, _env(team_repo), "git", "rev-parse", "--short=7", "HEAD~1").strip()
    assert {f"repro@{commit} · lr_find", f"repro@{commit} · train"} <= names, names
    assert {"team-a · train", "team-b · train"} <= names, names
    trains = [r for r in runs if r.data.tags.get("dvc.stage") == "train"]
    assert len(trains) == 3 and all(r.info.status == "FINISHED" for r in runs)
    for run in trains:
        assert 0 <= run.data.metrics["eval/accuracy"] <= 1
        history = client.get_metric_history(run.info.run_id, "test/accuracy")
        assert len(history) == TINY_PIPELINE["train"]["epochs"]
    for run in runs:  # lr_find's sweep figure; train's history, schedule, confusion matrix, ...
        figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
        assert figures and all(f.endswith(".png") for f in figures), figures
        local = client.download_artifacts(run.info.run_id, figures[0])  # through the server
        assert Path(local).read_bytes().startswith(b"\x89PNG")
    models = client.search_logged_models([exp.experiment_id])
    assert {m.source_run_id for m in models} == {r.info.run_id for r in trains}
    version = client.get_model_version("cifar10-resnet9", "1")
    assert version.source.startswith("models:/")
    assert any(artifacts.rglob("*.png")), "artifacts go through the server to its destination"
    assert not list(team_repo.rglob("mlflow.db")), "nothing may fall back to a local store"


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
    _sh(team_repo, env_a, "dvc", "remote", "add", "-d", "team", str(remote))
    _sh(team_repo, env_a, "git", "commit", "-qam", "the team's DVC remote")
    _sh(team_repo, env_a, "dvc", "push", "--run-cache")

    clone = tmp_path / "clone-b"
    _sh(tmp_path, env_a, "git", "clone", "-q", str(team_repo), str(clone))
    env_b = _team_env(clone, url)
    _sh(clone, env_b, "dvc", "pull", "--run-cache")
    out = _sh(clone, env_b, "dvc", "repro")
    assert "Running stage" not in out and "up to date" in out, out
    for metrics in (paths.EVAL_METRICS, paths.TRAIN_METRICS):
        assert (clone / metrics).read_text() == (team_repo / metrics).read_text()
    assert (clone / paths.MODEL).read_bytes() == (team_repo / paths.MODEL).read_bytes()

    run_id = json.loads((clone / paths.TRAIN_RUN).read_text())["run_id"]
    assert run_id == json.loads((team_repo / paths.TRAIN_RUN).read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=url)
    before = client.get_run(run_id).data.metrics["eval/accuracy"]
    started = time.time() * 1000
    _sh(clone, env_b, "dvc", "repro", "-s", "-f", "evaluate")  # B logs into A's run
    after = client.get_metric_history(run_id, "eval/accuracy")
    assert max(m.timestamp for m in after) >= started and after[-1].value == pytest.approx(before)


# --- data-parallel training: 2 gloo processes on the CPU ----------------------------------------

DDP_LR = 0.2  # a fixed max LR: the comparison with one process is about the training, not lr_find
DDP_TOLERANCE = 0.05  # test accuracy, absolute: plain BatchNorm normalizes over half the batch


@pytest.fixture(scope="module")
def ddp_repo(tmp_path_factory):
    repo = _copy_repo(tmp_path_factory.mktemp("ddp"))
    _set_params(repo, TINY_PIPELINE)
    _set_params(repo, {"base": {"devices": 2}, "train": {"max_lr": DDP_LR, "epochs": 3}})
    _sh(repo, {**_env(repo), **GIT_ID}, "git", "commit", "-qam", "two processes")
    return repo


def _train_runs(repo: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / paths.MLFLOW_DB}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r for r in runs if r.data.tags.get("dvc.stage") == "train"]


def test_two_gloo_processes_train_as_one_run_close_to_one_process(ddp_repo):
    env = _env(ddp_repo)
    out = _sh(ddp_repo, env, "dvc", "repro")
    assert out.count("train: test accuracy") == 1, out  # rank 0 alone reports, writes and logs
    assert out.count("lr_find: ") == 1, out
    (run,) = _train_runs(ddp_repo)
    assert run.info.status == "FINISHED" and run.data.params["base.devices"] == "2"
    assert json.loads((ddp_repo / paths.TRAIN_RUN).read_text())["run_id"] == run.info.run_id
    history = (ddp_repo / paths.TRAIN_HISTORY).read_text().strip().splitlines()
    assert len(history) == 1 + 3  # one header, one row per epoch: written once
    two = json.loads((ddp_repo / paths.EVAL_METRICS).read_text())["accuracy"]

    _set_params(ddp_repo, {"base": {"devices": 1}})  # the same run in one process
    for stage in ("train", "evaluate"):
        _sh(ddp_repo, env, sys.executable, "-m", f"stages.{stage}")
    one = json.loads((ddp_repo / paths.EVAL_METRICS).read_text())["accuracy"]
    print(f"test accuracy: 2 processes {two:.4f}, 1 process {one:.4f}")
    assert abs(two - one) <= DDP_TOLERANCE, (two, one)
    _sh(ddp_repo, env, "git", "checkout", "-q", "params.yaml")


def _rank_process(stage_pid: int, rank: int):
    """The process of data-parallel rank ``rank`` under the stage's torchrun."""
    import psutil

    for child in psutil.Process(stage_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("RANK") == str(rank) and "LOCAL_RANK" in child.environ():
                return child
    raise AssertionError(f"no rank {rank} under process {stage_pid}")


@pytest.mark.parametrize("target", ["the stage", "rank 1"])
def test_a_signal_stops_every_rank_and_the_next_run_resumes_the_same_mlflow_run(ddp_repo, target):
    """SIGTERM to the stage (as `kill` or DVC would send it) or to one rank alone: every rank
    stops at the same step, rank 0 saves the resume state, the run is KILLED; the next run
    continues it."""
    _set_params(ddp_repo, {"train": {"epochs": 3}})
    proc = _train(ddp_repo)
    seen = []
    for line in proc.stdout:  # the first epoch done, then the signal
        seen.append(line)
        if line.startswith("epoch 1:"):
            victim = proc if target == "the stage" else _rank_process(proc.pid, 1)
            victim.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, "".join(seen) + rest
    assert (ddp_repo / paths.RESUME_STATE).exists(), "".join(seen) + rest
    killed = max(_train_runs(ddp_repo), key=lambda r: r.info.start_time)
    assert killed.info.status == "KILLED"
    out = _sh(ddp_repo, _env(ddp_repo), sys.executable, "-m", "stages.train")
    assert "resuming from" in out and not (ddp_repo / paths.RESUME_STATE).exists(), out
    resumed = next(r for r in _train_runs(ddp_repo) if r.info.run_id == killed.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags.get("resumed") == "true"
    _sh(ddp_repo, _env(ddp_repo), "git", "checkout", "-q", "params.yaml")
