import mlflow
import pytest

from onecycle import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty repository root; the store must land there whatever the working directory."""
    root = tmp_path / "repo"
    (root / "elsewhere").mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root / "elsewhere")  # like a queued experiment's temporary copy
    yield root
    while mlflow.active_run():
        mlflow.end_run()


def _status(run_id):
    return mlflow.MlflowClient().get_run(run_id).info.status


def test_store_is_at_the_repository_root_not_the_working_directory(store):
    with tracking.stage_run("lr_find") as run:
        mlflow.log_metric("x", 1.0, step=0)
        mlflow.log_text("hi", "a.txt")
    assert (store / "mlflow.db").exists() and not (store / "elsewhere" / "mlflow.db").exists()
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())
    assert (store / "mlartifacts").exists() and not (store / "elsewhere" / "mlruns").exists()
    assert _status(run.info.run_id) == "FINISHED"


def test_env_var_overrides_the_store(store, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.tracking_uri() == uri


def test_exception_leaves_the_run_failed(store):
    with pytest.raises(ValueError), tracking.stage_run("lr_find") as run:
        raise ValueError("boom")
    assert _status(run.info.run_id) == "FAILED"


def test_ctrl_c_leaves_the_run_killed(store):
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("train") as run:
        raise KeyboardInterrupt
    assert _status(run.info.run_id) == "KILLED"


def test_sigterm_leaves_the_run_killed(store):
    import os
    import signal

    with pytest.raises(KeyboardInterrupt), tracking.stage_run("train") as run:
        os.kill(os.getpid(), signal.SIGTERM)
    assert _status(run.info.run_id) == "KILLED"


def test_runs_carry_dvc_tags(store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    with tracking.stage_run("train") as run:
        pass
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert (
        tags["dvc.stage"] == "train"
        and tags["dvc.exp_name"] == "brisk-lark"
        and tags["dvc.exp_baseline_rev"] == "abc123"
    )


def test_later_stages_add_to_the_train_run_without_changing_its_status(store, tmp_path):
    with tracking.stage_run("train") as run:
        pass
    ref = tmp_path / "train.json"
    tracking.write_run_ref(ref, run)
    with tracking.add_to_run(ref, "evaluate"):
        mlflow.log_metric("eval.accuracy", 0.9)
    with pytest.raises(RuntimeError), tracking.add_to_run(ref, "plots"):
        raise RuntimeError("plot failed")
    got = mlflow.MlflowClient().get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["eval.accuracy"] == 0.9
    assert (
        "plot failed" in got.data.tags["plots.error"] and got.data.tags["evaluate.done"] == "true"
    )


def test_a_missing_run_reference_names_the_stage_to_run(store, tmp_path):
    with (
        pytest.raises(FileNotFoundError, match="dvc repro train"),
        tracking.add_to_run(tmp_path / "nope.json", "evaluate"),
    ):
        pass
