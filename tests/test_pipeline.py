"""End to end through DVC on real CIFAR-10 (tiny settings): what a user sees after `dvc repro`.

The suite's one tiny run (``pipeline``, conftest.py) is only looked at here; a test that changes
something (params, a signal, a second run) works on a ``fork`` of it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from onecycle import paths
from onecycle.training import checkpoint

from .tiny_repo import ROOT, TINY_PIPELINE, env, run, runs, set_params

pytestmark = pytest.mark.slow


def test_every_declared_output_is_written(pipeline):
    for p in (
        paths.MODEL,
        paths.TRAIN_METRICS,
        paths.TRAIN_HISTORY,
        paths.TRAIN_SCHEDULE,
        paths.TRAIN_RUN,
        paths.LR_FIND_METRICS,
        paths.LR_FIND_CURVE,
        paths.LR_FIND_RUN,
        paths.EVAL_METRICS,
        paths.PREDICTIONS,
        paths.REPORT,
        paths.DATA_METRICS,
    ):
        assert (pipeline / p).exists(), p
    pngs = sorted(f.name for f in (pipeline / paths.PLOTS_DIR).glob("*.png"))
    assert pngs == sorted(
        [
            "lr_find.png",
            "history.png",
            "schedule.png",
            "confusion_matrix.png",
            "per_class_accuracy.png",
            "misclassified.png",
            "augmented.png",
        ]
    )
    assert not (pipeline / paths.RESUME_STATE).exists()


def test_outputs_agree(pipeline):
    lr = json.loads((pipeline / paths.LR_FIND_METRICS).read_text())
    train = json.loads((pipeline / paths.TRAIN_METRICS).read_text())
    ev = json.loads((pipeline / paths.EVAL_METRICS).read_text())
    assert (
        train["max_lr"] == lr["max_lr"] == lr[lr["method"]] and train["max_lr_source"] == "lr_find"
    )
    assert ev["num_test"] == 500 and ev["misclassified"] == 500 - ev["correct"]
    assert ev["accuracy"] == pytest.approx(train["test_acc"], abs=1e-6)
    rows = (pipeline / paths.PREDICTIONS).read_text().splitlines()
    assert rows[0].startswith("index,actual,predicted") and len(rows) == 501
    assert (
        f"**Test accuracy: {100 * ev['accuracy']:.2f}%**" in (pipeline / paths.REPORT).read_text()
    )


def test_mlflow_holds_both_runs_with_params_curves_and_figures(pipeline):
    client, found = runs(pipeline)
    by_stage = {r.data.tags["dvc.stage"]: r for r in found}
    assert set(by_stage) == {"lr_find", "train"} and all(r.info.status == "FINISHED" for r in found)
    lr_run, train_run = by_stage["lr_find"], by_stage["train"]
    assert lr_run.data.params["lr_find.num_iter"] == "40"
    assert len(client.get_metric_history(lr_run.info.run_id, "lr_find/smooth_loss")) >= 10
    assert "figures/lr_find.png" in [
        a.path for a in client.list_artifacts(lr_run.info.run_id, "figures")
    ]
    assert train_run.data.tags["lr_find_run_id"] == lr_run.info.run_id
    assert (
        train_run.data.params["max_lr_source"] == "lr_find" and train_run.data.params["parameters"]
    )
    history = client.get_metric_history(train_run.info.run_id, "test/accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    assert (
        "eval/accuracy" in train_run.data.metrics
        and "eval_per_class/cat.f1" in train_run.data.metrics
        and train_run.data.tags.get("plots.done") == "true"
    )
    figs = {a.path for a in client.list_artifacts(train_run.info.run_id, "figures")}
    assert {
        "figures/history.png",
        "figures/confusion_matrix.png",
        "figures/misclassified.png",
    } <= figs
    ref = json.loads((pipeline / paths.TRAIN_RUN).read_text())
    assert ref["run_id"] == train_run.info.run_id
    for r in found:  # artifacts at the repository root, whatever the working directory was
        assert r.info.artifact_uri.startswith((pipeline / paths.MLFLOW_ARTIFACTS).as_uri())


def test_mlflow_shows_named_runs_datasets_system_metrics_and_the_registered_model(
    pipeline, tmp_path, capsys
):
    """What a person finds in the MLflow UI after `dvc repro`, through the client; then the
    registered model and predict on image files give evaluate's answers again."""
    import csv

    import mlflow
    import numpy as np
    from PIL import Image

    from onecycle.commands import predict
    from onecycle.data.prepared import load_prepared

    client, found = runs(pipeline)
    exp = client.get_experiment(found[0].info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the runs view
    commit = run(pipeline, "git", "rev-parse", "--short=7", "HEAD~1").stdout.strip()  # repro's
    by_stage = {r.data.tags["dvc.stage"]: r for r in found}
    assert {r.info.run_name for r in found} == {f"repro@{commit} · {s}" for s in by_stage}
    data = load_prepared(pipeline / paths.PREPARED_DIR)
    digest = data.meta["fingerprint"]
    for stage, want in (("lr_find", {"training"}), ("train", {"training", "testing"})):
        inputs = by_stage[stage].inputs.dataset_inputs
        got = {i.tags[0].value: i.dataset for i in inputs}
        assert set(got) == want and {d.digest for d in got.values()} == {digest}
        assert got["training"].name == "cifar10-jpg.tar.gz:train"
    train = by_stage["train"]
    assert any(k.startswith("system/cpu_utilization") for k in train.data.metrics), sorted(
        train.data.metrics
    )
    # the model: logged by train, its metrics from evaluate, registered, loadable by name
    ref = json.loads((pipeline / paths.TRAIN_RUN).read_text())
    logged = client.get_logged_model(ref["model_id"])
    assert logged.source_run_id == train.info.run_id
    assert {m.key for m in logged.metrics} >= {"eval/accuracy", "eval/loss"}
    (version,) = client.search_model_versions("name = 'cifar10-resnet9'")
    assert train.data.tags["registered_model"] == f"cifar10-resnet9/{version.version}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{pipeline / paths.MLFLOW_DB}")
    try:
        model = mlflow.pyfunc.load_model(f"models:/cifar10-resnet9/{version.version}")
    finally:
        mlflow.set_tracking_uri(before)
    assert model.metadata.metadata["classes"] == data.classes
    probs = model.predict(data.x_test[:64])
    assert probs.shape == (64, len(data.classes)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    with open(pipeline / paths.PREDICTIONS) as f:
        rows = list(csv.DictReader(f))[:64]
    assert [data.classes[i] for i in probs.argmax(1)] == [r["predicted"] for r in rows]
    assert np.allclose(probs.max(1), [float(r["confidence"]) for r in rows], atol=1e-4)
    # predict, on image files, with the pipeline's checkpoint: evaluate's answers again
    images = []
    for i in range(8):
        images.append(tmp_path / f"test{i}.png")
        Image.fromarray(data.x_test[i]).save(images[-1])
    predict.main(["--model", str(pipeline / paths.MODEL), "--top", "1", *map(str, images)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8
    for line, row in zip(lines, rows, strict=False):
        cls, pct = line.split(": ")[1].rsplit(" ", 1)
        assert cls == row["predicted"], line
        assert float(pct.rstrip("%")) == pytest.approx(100 * float(row["confidence"]), abs=0.06)


def test_plots_show_renders(fork, tmp_path):
    run(fork, "dvc", "plots", "show", "-o", str(tmp_path / "html"))
    html = (tmp_path / "html" / "index.html").read_text()
    assert "LR range test" in html and "Confusion matrix" in html


def test_second_repro_runs_nothing(fork):
    out = run(fork, "dvc", "repro").stdout
    assert "Running stage" not in out, out


def _reset_params(repo: Path) -> None:
    """The documented way back to the committed params (works where `git checkout` does not)."""
    run(repo, "make", "reset-params")
    head = run(repo, "git", "show", "HEAD:params.yaml").stdout
    assert (repo / "params.yaml").read_text() == head


def test_a_refused_param_value_loses_no_result(fork):
    kept = (paths.MODEL, paths.TRAIN_METRICS, paths.TRAIN_RUN, paths.EVAL_METRICS, paths.REPORT)
    before = {p: (fork / p).read_bytes() for p in kept}
    proc = run(fork, "dvc", "exp", "run", "-S", "train.batch_size=0", ok=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "train.batch_size" in out
    assert "Running stage 'train'" not in out
    assert {p: (fork / p).read_bytes() for p in kept} == before
    _reset_params(fork)  # the documented way back, even where git shows params.yaml clean
    out = run(fork, "dvc", "repro").stdout  # check_params again: DVC removed its output
    assert out.count("Running stage") == 1, out  # the kept results are still the current ones


def test_a_stage_that_fails_late_says_how_to_get_back_what_dvc_removed(fork):
    """`train.max_lr=1e6` passes check_params; the loss turns NaN in train, after DVC removed
    train's outputs. The error's next line says how to restore them, and doing what it says
    brings back the previous model and metrics byte for byte (issue 26, item 1)."""
    kept = (paths.MODEL, paths.TRAIN_METRICS, paths.TRAIN_RUN, paths.TRAIN_HISTORY)
    before = {p: (fork / p).read_bytes() for p in kept}
    set_params(fork, {"train": {"max_lr": 1e6}})
    proc = run(fork, "dvc", "repro", ok=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "train: error: loss became nan" in out, out
    assert not (fork / paths.MODEL).exists()  # what DVC does before a stage runs
    lines = out.splitlines()
    hint = lines[lines.index(next(ln for ln in lines if ln.startswith("train: error:"))) + 1]
    commands = re.findall(r"`([^`]+)`", hint)
    assert [c.split()[:2] for c in commands] == [["dvc", "checkout"], ["git", "checkout"]], hint
    for command in commands:
        run(fork, *command.split())
    assert {p: (fork / p).read_bytes() for p in kept} == before


def _stages_to_rerun(repo: Path) -> set[str]:
    """The stages `dvc repro` would run for a change of params.yaml's values."""
    status = json.loads(run(repo, "dvc", "status", "--json").stdout)
    return {
        stage.split(":")[-1]
        for stage, changes in status.items()
        for change in changes
        if isinstance(change, dict) and "params.yaml" in json.dumps(change.get("changed deps", {}))
    }


def test_a_max_lr_override_reruns_train_not_lr_find_nor_download(fork):
    """`dvc exp run -S train.max_lr=...`, the README's example (CI ran it at the quick run's size
    until the suite's tiny run took it over): lr_find and download are not rerun, train uses
    exactly that LR, and the gate's override check passes; an lr_find key reruns lr_find."""
    from onecycle.commands.gate import run_checks

    set_params(fork, {"lr_find": {"num_iter": 41}})  # (train follows from lr_find's new output)
    assert _stages_to_rerun(fork) == {"check_params", "lr_find"}
    set_params(fork, {"lr_find": {"num_iter": TINY_PIPELINE["lr_find"]["num_iter"]}})
    set_params(fork, {"train": {"max_lr": 0.05}})
    assert _stages_to_rerun(fork) == {"check_params", "train"}
    out = run(fork, "dvc", "exp", "run", "-S", "train.max_lr=0.05", "-S", "train.epochs=1").stdout
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out, out
    assert "Running stage 'lr_find'" not in out and "Running stage 'download'" not in out, out
    train = json.loads((fork / paths.TRAIN_METRICS).read_text())
    assert train["max_lr"] == 0.05 and train["max_lr_source"] == "params"
    baseline = json.loads((ROOT / "ci" / "baseline.json").read_text())
    checks = run_checks(fork, baseline, expect_max_lr=0.05)
    assert all(c.ok for c in checks), [c.message for c in checks if not c.ok]


def test_a_typo_given_to_exp_run_fails_loudly(fork):
    # DVC refuses `-S train.max_lrr=...` itself (the key does not exist); `+` makes DVC add it,
    # and then check_params stops it before any stage runs.
    proc = run(fork, "dvc", "exp", "run", "-S", "+train.max_lrr=0.05", ok=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert "train.max_lrr: unknown key" in out and "Running stage 'train'" not in out
    _reset_params(fork)
    proc = run(fork, "dvc", "exp", "run", "-S", "+trian.epochs=1", ok=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "trian: unknown key (a typo of 'train'?)" in out


def test_sigterm_saves_a_state_kills_the_run_and_the_resume_is_exact(pipeline, fork):
    """SIGTERM mid-run (as `kill` or DVC sends it): a resume state, the MLflow run KILLED; the
    next run continues that run and ends with exactly the weights of the uninterrupted run."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=fork,
        env=env(fork),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:  # the first epoch done, then the signal: it stops in the second
        if line.startswith("epoch 1:"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "epoch 2:" not in rest, rest  # stopped inside epoch 2
    assert (fork / paths.RESUME_STATE).exists()
    _, found = runs(fork)
    killed = max(
        (r for r in found if r.data.tags["dvc.stage"] == "train"), key=lambda r: r.info.start_time
    )
    assert killed.info.status == "KILLED"

    out = run(fork, sys.executable, "-m", "stages.train").stdout
    at = re.search(r"resuming from \S+: epoch (\d+), batch (\d+)", out)
    assert at and at.group(1) == "2" and int(at.group(2)) > 0, out  # the signal's state
    assert not (fork / paths.RESUME_STATE).exists()
    _, found = runs(fork)
    resumed = next(r for r in found if r.info.run_id == killed.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags.get("resumed") == "true"
    uninterrupted = checkpoint.read_weights(pipeline / paths.MODEL)["model"]
    resumed_weights = checkpoint.read_weights(fork / paths.MODEL)["model"]
    for key, value in uninterrupted.items():
        assert resumed_weights[key].equal(value), key
    for name in ("test_acc", "train_loss", "max_lr"):
        metrics = [
            json.loads((repo / paths.TRAIN_METRICS).read_text()) for repo in (pipeline, fork)
        ]
        assert metrics[0][name] == metrics[1][name], name


def test_the_shared_run_is_what_its_params_say(pipeline):
    """The fixture's own check: the tests above read a run of TINY_PIPELINE's settings."""
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    for section, values in TINY_PIPELINE.items():
        assert {k: params[section][k] for k in values} == values
    assert run(pipeline, "git", "--no-optional-locks", "status", "--porcelain").stdout == ""
