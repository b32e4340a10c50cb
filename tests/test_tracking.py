import contextlib
import threading
import time
from pathlib import Path

import mlflow
import pytest

from onecycle.tracking import connect, lifecycle, provenance, recorder


@pytest.fixture(scope="session")
def migrated(tmp_path_factory):
    """An MLflow store with its schema made (a second per new SQLite store), copied per test."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def empty(tmp_path, monkeypatch):
    """An empty repository root; the store must land there whatever the working directory."""
    root = tmp_path / "repo"
    (root / "elsewhere").mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root / "elsewhere")  # like a queued experiment's temporary copy
    yield root
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def store(empty, migrated):
    """A repository root holding a store with its schema but no run, no experiment of ours."""
    import shutil

    shutil.copy(migrated, empty / "mlflow.db")
    return empty


def _status(run_id):
    return mlflow.MlflowClient().get_run(run_id).info.status


def test_store_is_at_the_repository_root_not_the_working_directory(empty):
    with lifecycle.stage_run("lr_find") as run:
        mlflow.log_metric("x", 1.0, step=0)
        mlflow.log_text("hi", "a.txt")
    assert (empty / "mlflow.db").exists() and not (empty / "elsewhere" / "mlflow.db").exists()
    artifact_uri = mlflow.MlflowClient().get_run(run.run_id).info.artifact_uri
    assert artifact_uri.startswith((empty / "mlartifacts").as_uri())
    assert (empty / "mlartifacts").exists() and not (empty / "elsewhere" / "mlruns").exists()
    assert _status(run.run_id) == "FINISHED"


def test_env_var_overrides_the_store(store, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert connect.tracking_uri() == uri


def test_exception_leaves_the_run_failed(store):
    with pytest.raises(ValueError), lifecycle.stage_run("lr_find") as run:
        raise ValueError("boom")
    assert _status(run.run_id) == "FAILED"


def test_ctrl_c_leaves_the_run_killed(store):
    with pytest.raises(KeyboardInterrupt), lifecycle.stage_run("train") as run:
        raise KeyboardInterrupt
    assert _status(run.run_id) == "KILLED"


def test_sigterm_leaves_the_run_killed(store):
    import os
    import signal

    with pytest.raises(KeyboardInterrupt), lifecycle.stage_run("train") as run:
        os.kill(os.getpid(), signal.SIGTERM)
    assert _status(run.run_id) == "KILLED"


def test_runs_carry_dvc_tags(store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    with lifecycle.stage_run("train") as run:
        pass
    tags = mlflow.MlflowClient().get_run(run.run_id).data.tags
    assert (
        tags["dvc.stage"] == "train"
        and tags["dvc.exp_name"] == "brisk-lark"
        and tags["dvc.exp_baseline_rev"] == "abc123"
    )


def test_later_stages_add_to_the_train_run_without_changing_its_status(store, tmp_path):
    with lifecycle.stage_run("train") as run:
        pass
    ref = tmp_path / "train.json"
    lifecycle.write_run_ref(ref, run)
    with lifecycle.add_to_run(ref, "evaluate") as later:
        later.log_metrics({"eval/accuracy": 0.9})
    with pytest.raises(RuntimeError), lifecycle.add_to_run(ref, "plots"):
        raise RuntimeError("plot failed")
    got = mlflow.MlflowClient().get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["eval/accuracy"] == 0.9
    assert (
        "plot failed" in got.data.tags["plots.error"] and got.data.tags["evaluate.done"] == "true"
    )


def test_a_missing_run_reference_names_the_stage_to_run(store, tmp_path):
    with (
        pytest.raises(FileNotFoundError, match="dvc repro train"),
        lifecycle.add_to_run(tmp_path / "nope.json", "evaluate"),
    ):
        pass


# ---------------------------------------------------------------- an unusable or lost store


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_stops_the_stage_at_once_naming_the_uri(store, monkeypatch):
    import time

    uri = f"http://127.0.0.1:{_closed_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.perf_counter()
    with pytest.raises(connect.TrackingError) as err:
        connect.setup()
    assert time.perf_counter() - t0 < connect.CHECK_SECONDS + 5
    msg = str(err.value)
    assert uri in msg and "MLFLOW_TRACKING_URI" in msg and len(msg.splitlines()) == 1


def test_a_server_that_never_answers_is_given_up_after_the_deadline(store, monkeypatch):
    import socket
    import time

    listener = socket.socket()  # accepts connections, never answers a request
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    monkeypatch.setattr(connect, "CHECK_SECONDS", 2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{listener.getsockname()[1]}")
    t0 = time.perf_counter()
    with pytest.raises(connect.TrackingError, match="did not answer within 2 s"):
        connect.setup()
    assert time.perf_counter() - t0 < 5
    listener.close()


@pytest.mark.parametrize(
    "content", [b"this is not a database" * 100, b"SQLite format 3\x00" + b"\xff" * 4000]
)
def test_a_corrupt_store_is_named_with_the_way_out(store, content):
    (store / "mlflow.db").write_bytes(content)
    with pytest.raises(connect.TrackingError) as err:
        connect.setup()
    msg = str(err.value)
    assert str(store / "mlflow.db") in msg and "mv " in msg and "MLFLOW_TRACKING_URI" in msg


def test_a_store_folder_that_cannot_be_created_is_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where the repository folder should be")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "file" / "repo"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(connect.TrackingError, match="mlflow.db"):
        connect.setup()


def test_a_read_only_store_is_named_when_the_run_starts(store, monkeypatch):
    # As root (CI) chmod cannot make a file read-only, so the store's own error is simulated.
    connect.setup()

    def refuse(*args, **kwargs):
        raise mlflow.exceptions.MlflowException(
            "(sqlite3.OperationalError) attempt to write a readonly database"
        )

    monkeypatch.setattr(mlflow, "start_run", refuse)
    with pytest.raises(connect.TrackingError, match="readonly database") as err:
        with lifecycle.stage_run("train"):
            pytest.fail("the stage must not start")
    assert "mv " in str(err.value)


def test_a_store_lost_mid_run_costs_no_work_and_logs_the_rest_once_back(store, monkeypatch, capsys):
    down = {"on": False}
    real = mlflow.MlflowClient.log_batch

    trying = threading.Event()

    def flaky(self, *args, **kwargs):
        if down["on"]:
            trying.set()
            time.sleep(0.3)  # fails slowly: a try begun while it was down ends after it is back
            raise ConnectionError("server gone")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky)
    monkeypatch.setattr(recorder, "RETRY_SECONDS", 0)
    with lifecycle.stage_run("train") as run:
        run.log_metrics({"loss": 3.0}, step=1)
        assert run.flush()  # sent in the background: wait for it before the store goes away
        down["on"] = True
        run.log_metrics({"loss": 2.0}, step=2)
        run.log_metrics({"loss": 1.5}, step=3)
        assert not run.flush(timeout=10)  # a try failed: kept, not raised
        assert [c.what for c in run.unlogged()] == [
            "metrics loss at step 2",
            "metrics loss at step 3",
        ]
        trying.clear()
        assert trying.wait(10)  # a retry is under way, begun while the store was down
        down["on"] = False
        run.log_metrics({"loss": 1.0}, step=4)  # sends what waited first, in order
        # the stage's end waits for a try begun after it, not the one still failing
    history = mlflow.MlflowClient().get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]
    out = capsys.readouterr()
    assert (out.out + out.err).count("warning: MLflow") == 1
    assert _status(run.run_id) == "FINISHED"


def test_what_could_not_be_logged_is_listed_at_the_end(store, monkeypatch, capsys):
    def down(self, *args, **kwargs):
        raise ConnectionError("server gone")

    with lifecycle.stage_run("train") as run:
        monkeypatch.setattr(mlflow.MlflowClient, "log_batch", down)
        run.log_metrics({"test_acc": 0.5}, step=2)
    text = "".join(capsys.readouterr())
    assert f"run {run.run_id} is missing" in text and "metrics test_acc at step 2" in text


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_left_running_by_a_killed_process_is_closed_by_the_next_run(store):
    exp_id = connect.setup()
    client = mlflow.MlflowClient()
    here = provenance.here()
    stale = client.create_run(
        exp_id, tags={"dvc.stage": "train", **here, "onecycle.pid": str(_dead_pid())}
    )
    alive = client.create_run(exp_id, tags={"dvc.stage": "train", **here})  # this process
    elsewhere = client.create_run(
        exp_id,
        tags={
            "dvc.stage": "train",
            **here,
            "onecycle.workspace": "/another/checkout",
            "onecycle.pid": str(_dead_pid()),
        },
    )
    other_stage = client.create_run(
        exp_id, tags={"dvc.stage": "lr_find", **here, "onecycle.pid": str(_dead_pid())}
    )
    with lifecycle.stage_run("train"):
        pass
    assert _status(stale.info.run_id) == "KILLED"
    for run in (alive, elsewhere, other_stage):
        assert _status(run.info.run_id) == "RUNNING"


def test_a_run_whose_work_ended_is_closed_finished_not_killed(store, capsys):
    """The server hung at train's end, so its run stayed RUNNING; the next train run closed it
    as KILLED although runs/train.json names it (issue 26, item 3, on a fresh clone)."""
    from onecycle import paths

    exp_id = connect.setup()
    client = mlflow.MlflowClient()
    tags = {"dvc.stage": "train", **provenance.here(), "onecycle.pid": str(_dead_pid())}
    ended, killed = client.create_run(exp_id, tags=tags), client.create_run(exp_id, tags=tags)
    paths.TRAIN_RUN.parent.mkdir(exist_ok=True)
    lifecycle.write_run_ref(
        paths.TRAIN_RUN, lifecycle.Recorder(ended.info.run_id, exp_id, mlflow.get_tracking_uri())
    )
    with lifecycle.stage_run("train"):
        pass
    assert _status(ended.info.run_id) == "FINISHED" and _status(killed.info.run_id) == "KILLED"
    out = "".join(capsys.readouterr())
    assert (
        f"train: marked run {ended.info.run_id} FINISHED (the store was away when it ended)" in out
    )
    assert "train: closed 1 run(s) left RUNNING by a killed process" in out


def test_the_runs_of_a_killed_queued_experiment_are_closed_when_it_is_requeued(store, tmp_path):
    """A study whose queue workers were SIGKILLed requeues the experiment; its lr_find run,
    tagged with the queue's temporary copy as its workspace, stayed RUNNING for good (issue
    26, item 5, on a fresh clone)."""
    exp_id = connect.setup()
    client = mlflow.MlflowClient()
    here = provenance.here() | {"onecycle.workspace": "/repo/.dvc/tmp/exps/tmpab12"}
    dead = {**here, "dvc.stage": "lr_find", "onecycle.pid": str(_dead_pid())}
    killed = client.create_run(exp_id, tags={**dead, "dvc.exp_name": "s-a-s0"})
    other = client.create_run(exp_id, tags={**dead, "dvc.exp_name": "s-b-s0"})
    alive = client.create_run(exp_id, tags={**here, "dvc.stage": "train", "dvc.exp_name": "s-a-s0"})
    closed = lifecycle.close_killed_experiments(["s-a-s0"], Path.cwd())
    assert closed == [killed.info.run_id] and _status(killed.info.run_id) == "KILLED"
    assert _status(other.info.run_id) == _status(alive.info.run_id) == "RUNNING"


def test_a_finished_run_the_store_missed_ending_is_finished_by_the_next_stage(store, tmp_path):
    # train wrote runs/train.json (its last act) while the server was away, so its run stayed
    # RUNNING; evaluate, logging into it later, marks it FINISHED
    exp_id = connect.setup()
    client = mlflow.MlflowClient()
    tags = {"dvc.stage": "train", **provenance.here(), "onecycle.pid": str(_dead_pid())}
    run = client.create_run(exp_id, tags=tags)
    ref = tmp_path / "train.json"
    lifecycle.write_run_ref(
        ref, lifecycle.Recorder(run.info.run_id, exp_id, mlflow.get_tracking_uri())
    )
    with lifecycle.add_to_run(ref, "evaluate") as later:
        later.log_metrics({"eval/accuracy": 0.5})
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["onecycle.finished_by"] == "evaluate"


def test_stages_starting_at_once_on_a_fresh_clone_share_one_new_store(empty):
    # `dvc queue start -j 2` on a fresh clone: both experiments' first stage creates mlflow.db;
    # without a lock one of them failed with "duplicate column name: step" (seen in a study)
    import os
    import subprocess
    import sys

    code = "from onecycle.tracking import connect; print(connect.setup())"
    env = {**os.environ, "DVC_ROOT": str(empty)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    ids = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    assert len(set(ids)) == 1  # one experiment, created once


def test_the_ui_address_opens_the_experiments_runs_in_the_model_training_view(tmp_path):
    """MLflow 3.17's UI opens an experiment on its GenAI overview unless the URL says otherwise:
    `make mlflow-ui` prints the runs table's address, found from the runs or the store."""
    from onecycle import paths

    base, view = "http://127.0.0.1:5000", "?workflowType=machine_learning"
    assert connect.ui_url(base, tmp_path) == f"{base}/#/experiments{view}"  # nothing run yet
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / paths.MLFLOW_DB}")
    exp_id = client.create_experiment(connect.EXPERIMENT)
    assert connect.ui_url(base, tmp_path) == f"{base}/#/experiments/{exp_id}/runs{view}"
    (tmp_path / paths.TRAIN_RUN).parent.mkdir()
    (tmp_path / paths.TRAIN_RUN).write_text('{"experiment_id": "42"}')
    assert connect.ui_url(base, tmp_path) == f"{base}/#/experiments/42/runs{view}"


def test_a_folder_that_cannot_be_written_is_named_not_called_unreachable(
    store, monkeypatch, capsys
):
    """An artifact folder the stage cannot create used to end in "MLflow at … is unreachable"
    (issue 26, item 8); the closing lines name the folder and the cause, and 300 failed metric
    batches read as one line (issue 26, item 3)."""
    import errno

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/mlartifacts/7")

    with lifecycle.stage_run("train") as run:
        monkeypatch.setattr(mlflow.MlflowClient, "log_batch", denied)
        monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", denied)
        for step in range(300):
            run.log_metrics({"loss": 1.0, "lr": 0.1}, step=step)
        run.log_files(*[f"metrics/m{i}.json" for i in range(7)])
    text = "".join(capsys.readouterr())
    closing = text[text.index("train: MLflow") :].splitlines()
    assert closing[0] == (
        "train: MLflow could not write /srv/mlartifacts/7 (Permission denied: make the folder "
        f"writable or free space, or set MLFLOW_TRACKING_URI to another store); run {run.run_id} "
        "is missing:"
    )
    assert closing[1:3] == [
        "  - metrics loss, lr at steps 0..299 (300 batches)",
        "  - 7 file(s): metrics/m0.json, metrics/m1.json, metrics/m2.json, metrics/m3.json, "
        "metrics/m4.json, and 2 more",
    ]
    assert "unreachable" not in text


def test_a_store_that_hangs_mid_run_never_holds_up_the_work(store, monkeypatch, capsys):
    """A server that stops answering mid-run (a proxy that stopped forwarding) used to stall the
    training loop for each call's HTTP timeout, 197 s of wall time for 100 s of work (issue 26,
    item 3). Calls are queued and sent by a background thread: an epoch's logging returns at
    once while the store hangs, the stage's end waits FLUSH_SECONDS at most, and the closing
    lines sum up what is missing."""
    import threading
    import time

    release = threading.Event()
    hung = {"on": False}
    real = mlflow.MlflowClient.log_batch

    def hang(self, *args, **kwargs):
        if hung["on"]:
            release.wait(120)  # a request to a server that accepted it and never answers
            raise ConnectionError("read timed out")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", hang)
    monkeypatch.setattr(recorder, "FLUSH_SECONDS", 1.0)
    try:
        started = time.monotonic()
        with lifecycle.stage_run("train") as run:
            run.log_metrics({"loss": 3.0}, step=0)
            assert run.flush()
            hung["on"] = True
            calls = []
            for epoch in range(1, 6):
                t = time.perf_counter()
                run.log_metrics({"loss": 1.0 / epoch, "lr": 0.1}, step=epoch)
                calls.append(time.perf_counter() - t)
        ended = time.monotonic() - started
    finally:
        release.set()
    assert max(calls) < 0.1, calls  # queued, not sent: the loop goes on at full speed
    assert ended < 20, ended  # the end waited about FLUSH_SECONDS, not an HTTP timeout
    text = "".join(capsys.readouterr())
    assert f"run {run.run_id} is missing:\n  - metrics loss, lr at steps 1..5 (5 batches)\n" in text
    assert _status(run.run_id) == "FINISHED"


def test_a_wait_for_the_store_says_what_it_waits_for(store, monkeypatch, capsys):
    """The stage's end waited for a hung server in silence: 78 s after train's last epoch, the
    model's upload (issue 26, item 3, on a fresh clone). A wait past SAY_WAITING_SECONDS prints
    one line: the store, the call, how many are left and for how long at most."""
    import threading

    release = threading.Event()
    real = mlflow.MlflowClient.log_batch

    def hang(self, *args, **kwargs):
        release.wait(60)  # then taken, quietly, after the test
        return real(self, *args, **kwargs)

    monkeypatch.setattr(recorder, "FLUSH_SECONDS", 1.0)
    monkeypatch.setattr(recorder, "SAY_WAITING_SECONDS", 0.2)
    try:
        with lifecycle.stage_run("train") as run:
            monkeypatch.setattr(mlflow.MlflowClient, "log_batch", hang)
            run.log_metrics({"loss": 1.0}, step=1)
            assert not run.flush()
    finally:
        release.set()
        monkeypatch.setattr(mlflow.MlflowClient, "log_batch", real)
    out = "".join(capsys.readouterr())
    uri = mlflow.get_tracking_uri()
    assert f"waiting for MLflow at {uri} to take metrics" in out, out
    assert "call(s) left), up to 1 s more; the stage's outputs are written" in out, out


@pytest.mark.parametrize(
    "db_error, cause",
    [
        ("attempt to write a readonly database", "is read-only"),
        ("database or disk is full", "has no space left on its disk"),
    ],
)
def test_a_read_only_or_full_store_is_one_line_naming_it(
    store, monkeypatch, capsys, db_error, cause
):
    """A read-only mlflow.db, or one on a full disk, printed MLflow's 60-line SQLAlchemy
    traceback and a line about autoflush (issue 26, item 4; both seen on a tmpfs, remounted
    read-only or filled); the warning names the database's own error and the closing line the
    store, the cause and the way out."""
    import logging

    from mlflow.exceptions import MlflowException

    text = (
        "(raised as a result of Query-invoked autoflush; consider using a session.no_autoflush "
        f"block if this flush is occurring prematurely)\n(sqlite3.OperationalError) {db_error}\n"
        "[SQL: INSERT INTO metrics ...]"
    )

    def failing(self, *args, **kwargs):
        try:
            raise MlflowException(text)
        except MlflowException:  # what MLflow's session wrapper logs before raising
            logging.getLogger("mlflow.store.db.utils").exception("SQLAlchemy database error")
            raise

    with lifecycle.stage_run("evaluate") as run:
        monkeypatch.setattr(mlflow.MlflowClient, "log_batch", failing)
        run.log_metrics({"accuracy": 0.5}, step=0)
    out = "".join(capsys.readouterr())
    db = mlflow.get_tracking_uri().removeprefix("sqlite:///")
    assert "Traceback" not in out and "autoflush" not in out, out
    assert f"(MlflowException: (sqlite3.OperationalError) {db_error})" in out
    assert f"evaluate: the MLflow store {db} {cause} (make it and its folder writable" in out


def test_a_full_disk_under_the_store_says_to_free_space(tmp_path):
    """Starting a run on an mlflow.db whose disk is full said to move it aside or make it
    writable, never to free space (issue 26, item 4, on a fresh clone)."""
    db = tmp_path / "mlflow.db"
    full = Exception("(sqlite3.OperationalError) database or disk is full")
    assert connect.way_out(f"sqlite:///{db}", full) == (
        f"free space on its disk (df -h {tmp_path}), or set MLFLOW_TRACKING_URI to a store on "
        "another disk"
    )
    assert connect.way_out(f"sqlite:///{db}").startswith(
        f"move it aside to start a new store (mv {db}"
    )


def test_a_slow_store_that_keeps_taking_calls_is_waited_for(store, monkeypatch):
    """The stage's end gives up on a store that takes no call for FLUSH_SECONDS (it hangs), not
    on one that is slow but keeps going: five calls of 0.4 s each (2 s) are all sent under a
    1.2 s limit. The limit leaves 0.8 s for the store's own write: at 0.5 s against 0.3 s calls
    this failed on a 2-core machine loaded 4x over (stop 43)."""
    import time

    real = mlflow.MlflowClient.log_batch

    def slow(self, *args, **kwargs):
        time.sleep(0.4)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(recorder, "FLUSH_SECONDS", 1.2)
    with lifecycle.stage_run("train") as run:
        monkeypatch.setattr(mlflow.MlflowClient, "log_batch", slow)
        for step in range(5):
            run.log_metrics({"loss": 1.0}, step=step)
        assert run.flush()
    history = mlflow.MlflowClient().get_metric_history(run.run_id, "loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- a real server behind a proxy


class _Proxy:
    """A TCP proxy to a server on 127.0.0.1: it forwards until :meth:`hang`, then goes on
    accepting connections and reading requests but never forwards or answers one, like a proxy
    whose upstream stopped (issue 26, item 3). :meth:`close` closes every socket, so a request
    still waiting fails at once."""

    def __init__(self, port: int):
        import socket

        self.target = port
        self.hung = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: list = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _keep(self, sock):
        with self._lock:
            self._open.append(sock)
        return sock

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client = self._keep(self.listener.accept()[0])
            except OSError:  # closed
                return
            upstream = None
            if not self.hung.is_set():
                upstream = self._keep(socket.create_connection(("127.0.0.1", self.target)))
                threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        """Bytes from ``src`` to ``dst``; once hung, read and dropped."""
        try:
            while data := src.recv(65536):
                if dst is not None and not self.hung.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def hang(self) -> None:
        self.hung.set()

    def close(self) -> None:
        import socket

        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@pytest.fixture
def real_server(tmp_path):
    """A real `mlflow server` (one worker, SQLite, as `make mlflow-ui` without its job runner)
    on a free port; its port once /health answers."""
    import os
    import signal
    import subprocess

    from .tiny_repo import free_port, wait_until_healthy

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen(
        ["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path,
        env=env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", proc, 90)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def _epoch_of_work():
    """One epoch of fixed work, the same every time: 24 steps of a small conv net on random
    images (about 0.4 s on one core of the 2-core Intel Xeon); returns the last loss."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    for _ in range(24):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def test_a_real_server_that_stops_answering_mid_run_leaves_the_epochs_at_full_speed(
    empty, real_server, monkeypatch, capsys
):
    """test_a_store_that_hangs_mid_run_never_holds_up_the_work for real: MLflow's own REST
    client, a real `mlflow server`, and a TCP proxy that stops forwarding mid-run (it accepts and
    reads, never answers); a proxy like that stalled training 38 s, 47 s and about 45 s at a time
    (issue 26, item 3). While it hangs, logging adds under 10 % to an epoch and the epochs keep
    the pace of the same epochs logging nothing; the stage's end waits FLUSH_SECONDS for the queue and one short
    try to mark the run ended (it waited 48 s: MLflow's 3 tries of 15 s), then names what the run
    lacks."""
    import statistics

    proxy = _Proxy(real_server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setattr(recorder, "FLUSH_SECONDS", 1.0)
    monkeypatch.setattr(lifecycle, "END_SECONDS", 1)
    alone, hung = [], []  # seconds per epoch: no logging at all; logging into the hung server

    logging = []  # seconds each epoch's logging took

    def epoch(step=None):
        t = time.perf_counter()
        loss = _epoch_of_work()
        if step is not None:
            t_log = time.perf_counter()
            run.log_metrics({"loss": loss, "lr": 0.1}, step=step)  # as the train stage does
            logging.append(time.perf_counter() - t_log)
        return time.perf_counter() - t

    try:
        with lifecycle.stage_run("train") as run:
            for step in (1, 2):  # through the proxy to the server (and torch warmed up)
                epoch(step)
            assert run.flush(timeout=30)
            proxy.hang()
            # Each epoch beside the same one that logs nothing: the other jobs on the machine's
            # 2 cores slow both alike.
            for step in range(3, 11):
                alone.append(epoch())
                hung.append(epoch(step))
                if hung[-1] > 5 * alone[-1]:  # stalled (logging blocks): fail now, not after 8
                    break
            t_end = time.monotonic()
        ended = time.monotonic() - t_end
    finally:
        proxy.close()  # the sender's request, still waiting, fails: nothing is left hanging
    seconds = f"epochs alone {alone}, logging into the hung server {hung}, logging {logging}"
    # What logging adds to an epoch stays under 10 % of one (it queues; sending took 15 s or more
    # a call when it blocked): measured inside the epoch, so the load of other jobs on the cores
    # does not blur it.
    assert max(logging) < 0.1 * statistics.median(alone), seconds
    # Whole epochs, paired (each beside the same epoch logging nothing): alone on the 2-core Intel
    # Xeon the median ratio was 0.95-1.03; inside the full suite (3 workers on 2 cores) once 1.24,
    # so the bound here only catches a stall, which the check above pins down to 10 %.
    assert statistics.median(h / a for h, a in zip(hung, alone, strict=True)) <= 1.5, seconds
    assert max(hung) < max(alone) + 5, seconds  # no epoch stalled (a stall: 15 s or more)
    # the queue's wait, then one short try to mark the run ended: not MLflow's 48 s of retries
    assert ended < recorder.FLUSH_SECONDS + lifecycle.END_SECONDS + 3, ended
    text = "".join(capsys.readouterr())
    assert (
        f"train: MLflow at {proxy.url} is unreachable; run {run.run_id} is missing:\n"
        "  - metrics loss, lr at steps 3..10 (8 batches)\n"
    ) in text, text
    assert f"train: could not mark run {run.run_id} FINISHED (" in text, text
    got = mlflow.MlflowClient(f"http://127.0.0.1:{real_server}")
    assert [m.step for m in got.get_metric_history(run.run_id, "loss")] == [1, 2]  # before
    assert got.get_run(run.run_id).info.status == "RUNNING"  # the next stage marks it FINISHED
