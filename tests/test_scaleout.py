"""The team set-up for real (docs/teams.md): a PostgreSQL server started from Debian's binaries
(with a password), the real `make mlflow-server` on it with MLflow's basic-auth app, users made
and granted permissions through its REST API, an experiment of the tiny pipeline logging through
it as a user with EDIT, and a shared DVC remote that a second clone pulls from. No password may
show anywhere: files (params.yaml and dvc.lock included), MLflow, output, `ps`. It builds on a
fork of the suite's tiny run. `pytest -m scaleout` (with tests/test_ddp.py)."""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from onecycle import paths
from onecycle.tracking import connect

from .tiny_repo import ROOT, TINY_PIPELINE, env, fork, free_port, run, wait_until_healthy

pytestmark = [pytest.mark.scaleout, pytest.mark.slow, pytest.mark.long]

DB_PASSWORD = f"db-{secrets.token_hex(8)}"
ADMIN_PASSWORD, ROTATED = f"admin-{secrets.token_hex(8)}", f"rotated-{secrets.token_hex(8)}"
ALICE, BOB = ("alice", f"alice-{secrets.token_hex(8)}"), ("bob", f"bob-{secrets.token_hex(8)}")
SECRETS = (DB_PASSWORD, ADMIN_PASSWORD, ROTATED, ALICE[1], BOB[1])
ALLOWED_HOST = "mlflow.test"


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
    """A PostgreSQL server of its own: initdb in a temporary folder, a password for TCP (trust on
    its own socket, to create the database), listening on 127.0.0.1 and a free port; a database
    `mlflow`. Stopped after."""
    bindir = _pg_bin()
    user = None
    folder = Path(tempfile.mkdtemp(prefix="onecycle-pg-"))
    (folder / "pw").write_text(DB_PASSWORD)
    if os.geteuid() == 0:  # initdb and postgres refuse root: run them as the postgres user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        for path in (folder, folder / "pw"):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        user = "postgres"
    data, port = folder / "data", free_port()
    _as_user(user, [str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth-local=trust",
                    "--auth-host=scram-sha-256", f"--pwfile={folder / 'pw'}"])  # fmt: skip
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
        _as_user(user, [str(bindir / "createdb"), "-h", str(folder), "-p", str(port),
                        "-U", "mlflow", "mlflow"])  # fmt: skip
        yield f"postgresql+psycopg://mlflow:{DB_PASSWORD}@127.0.0.1:{port}/mlflow"
    finally:
        _as_user(user, [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(folder, ignore_errors=True)


def _server_env(**extra: str) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    return out | {"MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)} | extra


class _PsWatch:
    """Every command line on the machine, sampled once a second while the module runs."""

    def __init__(self):
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.wait(1.0):
            out = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
            self.seen.update(out.splitlines())

    def stop(self):
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def ps_watch():
    watch = _PsWatch()
    yield watch
    watch.stop()


@pytest.fixture(scope="module")
def server(postgres, ps_watch, tmp_path_factory):
    """The real `make mlflow-server` on that database: basic-auth, the admin's password from
    MLFLOW_AUTH_ADMIN_PASSWORD, allowed hosts given, artifacts proxied into a folder."""
    artifacts = tmp_path_factory.mktemp("server-artifacts")
    port = free_port()
    server_env = _server_env(
        MLFLOW_BACKEND_STORE_URI=postgres,
        MLFLOW_ARTIFACTS_DESTINATION=str(artifacts),
        MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
    )
    log = tmp_path_factory.mktemp("server-log") / "mlflow-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["make", "-s", "-C", str(ROOT), "mlflow-server", f"MLFLOW_SERVER_PORT={port}",
             "MLFLOW_SERVER_WORKERS=1", f"MLFLOW_SERVER_ALLOWED_HOSTS={ALLOWED_HOST}"],
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        # creating the schema on a new database takes a while
        wait_until_healthy(url, proc, 120, lambda: ":\n" + log.read_text()[-3000:])
        yield SimpleServer(url, artifacts, log, proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


class SimpleServer:
    def __init__(self, url: str, artifacts: Path, log: Path, pid: int):
        self.url, self.artifacts, self.log, self.pid = url, artifacts, log, pid


@contextlib.contextmanager
def _as(user: str, password: str):
    """MLflow's client calls in this process as ``user`` (MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict(zip(keys, (user, password), strict=True)))
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def users(server):
    """What docs/teams.md shows an admin doing, run as written: create users, grant one
    EDIT on the pipeline's experiment (the other keeps the default, READ), rotate the admin's
    password. Returns the experiment id."""
    import mlflow
    from mlflow.server import get_app_client

    with _as("admin", ADMIN_PASSWORD):
        auth = get_app_client("basic-auth", tracking_uri=server.url)
        auth.create_user("alice", ALICE[1])
        auth.create_user("bob", BOB[1])
        client = mlflow.MlflowClient(tracking_uri=server.url)
        exp_id = client.create_experiment("cifar10-onecycle", tags=connect.EXPERIMENT_KIND)
        auth.grant_user_permission("alice", "experiment", exp_id, "EDIT")
        auth.update_user_password("admin", ROTATED, current_password=ADMIN_PASSWORD)
    return exp_id


def _status(url: str, path: str, method: str = "GET", auth: tuple | None = None, host=None):
    conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
    headers = {"Content-Type": "application/json"}
    if host:
        headers["Host"] = host
    if auth:
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    conn.request(method, path, body="{}" if method == "POST" else None, headers=headers)
    response = conn.getresponse()
    return response.status, response.read().decode(errors="replace")


def test_without_credentials_the_rest_api_answers_401(server, users):
    for method, path in (
        ("GET", f"/api/2.0/mlflow/experiments/get?experiment_id={users}"),
        ("POST", "/api/2.0/mlflow/runs/search"),
        ("POST", "/api/2.0/mlflow/runs/log-metric"),
        ("POST", "/api/2.0/mlflow/registered-models/create"),
    ):
        assert _status(server.url, path, method)[0] == 401, path
    get = f"/api/2.0/mlflow/experiments/get?experiment_id={users}"
    assert _status(server.url, get, auth=("admin", ADMIN_PASSWORD))[0] == 401  # rotated
    assert _status(server.url, get, auth=("admin", ROTATED))[0] == 200
    assert _status(server.url, get, auth=BOB)[0] == 200  # READ: may look


def test_the_server_starts_no_job_runner_that_would_poll_for_nothing(server):
    """MLflow's job runner (GenAI scorers, trace archival) is off: on, it added 8 processes and
    12.6 s of CPU per 30 s idle."""
    import psutil

    lines = [" ".join(p.cmdline()) for p in psutil.Process(server.pid).children(recursive=True)]
    assert any("mlflow" in ln and "server" in ln for ln in lines), lines
    assert not [ln for ln in lines if "huey" in ln or "job" in ln], lines


def test_a_host_header_not_in_the_allowed_list_is_refused(server, users):
    get = f"/api/2.0/mlflow/experiments/get?experiment_id={users}"
    status, body = _status(server.url, get, auth=ALICE, host="evil.example")
    assert status == 403 and "Invalid Host header" in body
    assert _status(server.url, get, auth=ALICE, host=ALLOWED_HOST)[0] == 200


def test_the_server_refuses_bad_settings_each_in_one_line_naming_the_variable(postgres):
    closed = f"postgresql+psycopg://mlflow:{DB_PASSWORD}@127.0.0.1:{free_port()}/mlflow"
    cases = {  # started at once: each refusal comes before the server would start
        "MLFLOW_AUTH_ADMIN_PASSWORD": ({"MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}, []),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": ({"MLFLOW_FLASK_SERVER_SECRET_KEY": ""}, []),
        "MLFLOW_SERVER_ALLOWED_HOSTS": ({}, ["MLFLOW_SERVER_HOST=0.0.0.0"]),
        "within 2 s": ({"MLFLOW_BACKEND_STORE_URI": closed}, ["MLFLOW_SERVER_DB_WAIT=2"]),
        "WARNING: authentication is off": (
            {"MLFLOW_BACKEND_STORE_URI": closed},
            ["MLFLOW_SERVER_DB_WAIT=2", "MLFLOW_SERVER_AUTH=off"],
        ),
    }
    started = time.monotonic()
    procs = {
        needle: subprocess.Popen(
            ["make", "-s", "-C", str(ROOT), "mlflow-server", *make_vars],
            env=_server_env(MLFLOW_BACKEND_STORE_URI=postgres, MLFLOW_AUTH_ADMIN_PASSWORD=ROTATED)
            | env_,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for needle, (env_, make_vars) in cases.items()
    }
    for needle, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        ours = [ln for ln in err.splitlines() if not ln.startswith("make")]
        assert proc.returncode != 0 and not out, (needle, out, err)
        assert needle in "\n".join(ours) and len(ours) <= 2, (needle, err)  # auth off: 2
        assert all(ln.startswith("mlflow-server: ") for ln in ours), err
        assert DB_PASSWORD not in err, err
        if "within" in needle:
            assert "PostgreSQL at postgresql+psycopg://mlflow:***@127.0.0.1" in err, err
    assert time.monotonic() - started < 30


def _team_env(repo: Path, url: str, user: tuple[str, str] = ALICE) -> dict:
    """As ``user``, through MLflow's own variables."""
    return env(
        repo,
        MLFLOW_TRACKING_URI=url,
        MLFLOW_TRACKING_USERNAME=user[0],
        MLFLOW_TRACKING_PASSWORD=user[1],
    )


@pytest.fixture(scope="module")
def team_repo(server, users, pipeline, tmp_path_factory):
    """Clone A: a fork of the tiny run whose experiment logs to the server as alice (EDIT), her
    password also in MLFLOW_TRACKING_URI; a longer sweep, so every stage after download reruns;
    committed. Returns the repository and the experiment's output. (Queued experiments:
    tests/test_study_queue.py; a signed data.source: tests/test_data.py and test_secrets.py.)"""
    repo = fork(pipeline, tmp_path_factory.mktemp("clone-a") / "repo")
    host = server.url.removeprefix("http://")
    team = _team_env(repo, f"http://{ALICE[0]}:{ALICE[1]}@{host}")
    out = run(repo, "dvc", "exp", "run", "-n", "team-a", "-S", "lr_find.num_iter=41", env_=team)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "team-a")
    return repo, out.stdout + out.stderr


def test_an_edit_user_runs_the_pipeline_and_the_server_holds_every_run_metric_figure_and_model(
    server, team_repo, monkeypatch
):
    import mlflow

    url, artifacts, (team_repo, _) = server.url, server.artifacts, team_repo
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ALICE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE[1])
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
    server, team_repo, tmp_path, monkeypatch
):
    """Clone A pushes to a shared remote (a local folder standing in for an object store); a fresh
    clone B pulls, `dvc repro` runs nothing and ends with A's metrics, and B's evaluate logs into
    A's run on the shared server."""
    import mlflow

    url, (team_repo, _) = server.url, team_repo
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ALICE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE[1])
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


def _stage_alone(repo: Path, url: str, user: tuple[str, str]):
    started = time.monotonic()
    proc = run(repo, "python", "-m", "stages.lr_find", ok=False, env_=_team_env(repo, url, user))
    return proc, time.monotonic() - started


def test_a_wrong_password_stops_a_stage_before_any_work_in_one_line(server, users, fork):
    before = (fork / paths.LR_FIND_METRICS).read_bytes()
    proc, seconds = _stage_alone(fork, server.url, (ALICE[0], "not-her-password"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"lr_find: error: MLflow server {server.url} refused the credentials"
    )
    assert "MLFLOW_TRACKING_PASSWORD" in lines[0] and "Traceback" not in proc.stderr
    assert seconds < 30 and (fork / paths.LR_FIND_METRICS).read_bytes() == before


def test_a_read_only_user_is_refused_at_the_first_write_in_one_line(server, users, fork):
    proc, seconds = _stage_alone(fork, server.url, BOB)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"lr_find: error: MLflow server {server.url} does not let user bob")
    assert "grants EDIT on experiment cifar10-onecycle" in lines[0] and seconds < 30


def test_no_password_or_signature_lands_in_files_mlflow_or_output(server, team_repo):
    """Everything the team run wrote or printed, and everything MLflow holds of it, is free of
    secrets."""
    import mlflow

    repo, output = team_repo
    found = [output]
    skip = {".git", "raw", "cache", "tmp"}
    for path in repo.rglob("*"):
        if path.is_file() and not skip & set(path.relative_to(repo).parts):
            if path.stat().st_size < 2**20:
                found.append(f"{path}: " + path.read_bytes().decode(errors="replace"))
    with _as(*ALICE):
        client = mlflow.MlflowClient(tracking_uri=server.url)
        exp = client.get_experiment_by_name("cifar10-onecycle")
        for r in client.search_runs([exp.experiment_id]):
            found += [r.info.run_name, json.dumps(r.data.params), json.dumps(r.data.tags)]
            found += [d.dataset.name + d.dataset.source for d in r.inputs.dataset_inputs]
            local = client.download_artifacts(r.info.run_id, "params.yaml")
            found.append(Path(local).read_text())
        for model in client.search_logged_models([exp.experiment_id]):
            found.append(json.dumps(model.params))
    found.append(server.log.read_text())
    text = "\n".join(found)
    leaks = [s for s in SECRETS if s in text]
    assert not leaks, [ln for ln in text.splitlines() if any(s in ln for s in leaks)][:5]
    assert f"{ALICE[0]}:***@" in text


def test_ps_never_showed_a_password(ps_watch, team_repo):
    """Sampled every second from the server's start through the team run and the tests above."""
    assert len(ps_watch.seen) > 10
    leaks = [line for line in ps_watch.seen if any(s in line for s in SECRETS)]
    assert not leaks, leaks[:3]
    assert any("mlflow server" in line or "mlflow.server" in line for line in ps_watch.seen)
