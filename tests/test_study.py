"""Studies: the study file's checks, and the numbers a report gives (the end-to-end run through
DVC and MLflow is tests/test_pipeline.py's, marked long)."""

import math
from pathlib import Path

import pytest

from onecycle.commands import study, study_queue, study_report, study_spec
from onecycle.tracking import connect

GOOD = """
name: lr
description: fixed LRs
common: {model.width: 16}
settings:
  lr-0.01: {train.max_lr: 0.01}
  lr-0.1: {train.max_lr: 0.1}
picks: [valley]
seeds: [0, 1, 2]
figure: max_lr
"""


def _file(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_a_study_file_is_read_with_its_runs_named_for_finding_them_again(tmp_path):
    s = study_spec.load(_file(tmp_path, GOOD))
    labels = ("lr-0.01", "lr-0.1", "pick-valley")
    assert s.runs() == [(lab, seed) for lab in labels for seed in (0, 1, 2)]
    assert s.exp_name("lr-0.1", 2) == "lr-lr-0.1-s2"
    # a pick is the pipeline's own choice with that suggestion method
    assert s.all_settings()["pick-valley"] == {
        "lr_find.suggestion": "valley",
        "train.max_lr": "auto",
    }
    assert study_queue._set_args({"lr_find.momentum_grid": [0.9, 0.95], "train.max_lr": 0.1}) == [
        "-S", "lr_find.momentum_grid=[0.9, 0.95]", "-S", "train.max_lr=0.1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("name: lr", "name: LR study"), "name: 'LR study' must be"),
        (("seeds: [0, 1, 2]", "seeds: []"), "seeds: List should have at least 1 item"),
        (("seeds: [0, 1, 2]", "seeds: [0, true]"), "seeds.1: Input should be a valid integer"),
        (("picks: [valley]", "picks: [fastest]"), "picks.0: Input should be 'min', 'min_div10'"),
        (("figure: max_lr", "figure: pie"), "figure: Input should be 'epochs' or 'max_lr'"),
        (("  lr-0.1:", "  lr..1:"), r"settings: labels \['lr..1'\]"),
        (("figure: max_lr", "figur: max_lr"), "figur: unknown key; the keys here are name, desc"),
        (
            ("figure: max_lr", "figure: max_lr\nsource: {checkpoint: a.pt}"),
            "source.overrides: Field",
        ),
        (("figure: max_lr", "figure: max_lr\njobs: 0"), "jobs: Input should be greater than or"),
    ],
)
def test_a_bad_study_file_is_refused_naming_the_file_and_key(tmp_path, change, message):
    path = _file(tmp_path, GOOD.replace(*change))
    with pytest.raises(study_spec.StudyError, match=message) as err:
        study_spec.load(path)
    assert str(path) in str(err.value)


def test_the_transfer_study_trains_its_source_first_and_names_its_checkpoint_in_settings():
    s = study_spec.load(Path("studies/transfer.yaml"))
    assert s.source_name == "transfer-source"
    checkpoint = s.source.checkpoint
    pretrained = {label: o.get("model.pretrained") for label, o in s.all_settings().items()}
    assert {v for k, v in pretrained.items() if not k.startswith("scratch")} == {checkpoint}
    assert s.common["data.source"] != s.source.overrides["data.source"]


def test_a_class_subset_is_an_image_folder_of_those_classes_only(tmp_path, shared_cifar):
    from onecycle.data import subset

    out = tmp_path / "vehicles"
    counts = subset.make(shared_cifar, out, ["truck", "ship"])
    assert counts == {"train": {"ship": 5000, "truck": 5000}, "test": {"ship": 1000, "truck": 1000}}
    assert sorted(p.name for p in (out / "test").iterdir()) == ["ship", "truck"]
    assert len(list((out / "train" / "ship").iterdir())) == 5000
    # a folder is a source too (the archive is not read twice)
    with pytest.raises(subset.SubsetError, match="no images for train/unicorn.*'ship', 'truck'"):
        subset.make(out, tmp_path / "x", ["unicorn"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()


def _result(label, seed, acc, lr=0.1, seconds=10.0):
    return study_report.RunResult(label, seed, f"{label}{seed}", acc, lr, seconds, [acc / 2, acc])


def test_the_summary_is_mean_and_sample_std_per_setting():
    results = [
        _result("a", 0, 0.80),
        _result("a", 1, 0.82),
        _result("a", 2, 0.84),
        _result("b", 0, 0.5),
    ]
    a, b = study_report.summarize(results)
    assert (a["setting"], a["runs"]) == ("a", 3)
    assert a["accuracy_mean"] == pytest.approx(0.82) and a["accuracy_std"] == pytest.approx(0.02)
    assert b["runs"] == 1 and math.isnan(b["accuracy_std"])
    text = study_report.markdown(
        study_spec.load_text(GOOD), [a, b], ["lr-lr-0.1-s2"], "lr.png", "a CPU"
    )
    assert "| a | 3 | 82.00 ± 2.00 % |" in text and "| b | 1 | 50.00 ± n/a % |" in text
    assert "Not finished (left out): lr-lr-0.1-s2" in text and "Measured on a CPU" in text


@pytest.mark.parametrize("kind", ["epochs", "max_lr"])
def test_both_study_figures_draw(kind):
    from onecycle.reports import study_figures

    results = [
        _result(lab, s, 0.5 + 0.1 * s, lr)
        for lab, lr in (("lr-0.1", 0.1), ("pick-valley", 0.05))
        for s in range(2)
    ]
    draw = study_figures.study_epochs_figure if kind == "epochs" else study_figures.study_lr_figure
    fig = draw(results, "t")
    assert fig.axes and fig.axes[0].get_title().startswith("Study t")


def test_the_epochs_figure_puts_each_test_look_at_its_epoch():
    from onecycle.reports import study_figures

    looks = [
        study_report.RunResult("a", s, "r", 0.6, 0.1, 1.0, [0.3, 0.5, 0.6], [3, 6, 9])
        for s in (0, 1)
    ]
    line = study_figures.study_epochs_figure(looks, "t").axes[0].lines[0]
    assert list(line.get_xdata()) == [3, 6, 9]  # train.eval_every 3: not 1, 2, 3


def test_queued_runs_share_the_cores_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(study_queue.os, "cpu_count", lambda: 2)
    assert study_queue.threads_env(2)["OMP_NUM_THREADS"] == "1"
    assert study_queue.threads_env(1)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert study_queue.threads_env(2)["OMP_NUM_THREADS"] == "3"


def test_a_report_reads_its_own_runs_from_a_real_store_and_nothing_else(tmp_path, monkeypatch):
    """A tiny study's report against a real MLflow store (seconds; the run through DVC queues is
    tests/test_pipeline.py's, marked long): the numbers are the store's, the latest finished run
    of each name on this commit counts, and other studies, commits and stages stay out."""
    import json
    import os
    import subprocess

    import mlflow
    import numpy as np

    from onecycle import paths

    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env)
    rev = study_queue.baseline_rev(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    exp_id = connect.setup(tmp_path)
    client = mlflow.MlflowClient()
    s = study_spec.load_text(GOOD.replace("seeds: [0, 1, 2]", "seeds: [0, 1]"))
    rng = np.random.default_rng(0)

    def train_run(name, acc, lr, base=rev, stage="train", status="FINISHED"):
        tags = {"dvc.stage": stage, "dvc.exp_name": name, "dvc.exp_baseline_rev": base}
        run = client.create_run(exp_id, tags=tags).info.run_id
        client.log_param(run, "max_lr_used", lr)
        for epoch, a in enumerate((acc / 2, acc), start=1):
            client.log_metric(run, "test/accuracy", a, step=epoch)
            client.log_metric(run, "speed/epoch_seconds", 3.0, step=epoch)
        client.log_metric(run, "eval/accuracy", acc)
        client.set_terminated(run, status)
        return run

    expected = {}
    for label, lr in (("lr-0.01", 0.01), ("lr-0.1", 0.1), ("pick-valley", 0.04)):
        for seed in (0, 1):
            name = s.exp_name(label, seed)
            train_run(name, 0.1, lr)  # an older run of the same name: the latest counts
            expected[name] = (float(rng.uniform(0.2, 0.6)), lr)
            train_run(name, *expected[name])
    train_run("lr-lr-0.01-s0", 0.99, 0.01, base="0" * 40)  # another commit
    train_run("other-lr-0.01-s0", 0.99, 0.01)  # another study
    train_run("lr-lr-0.1-s1", 0.99, 0.1, stage="lr_find")  # not a train run
    train_run("lr-lr-0.1-s0", 0.99, 0.1, status="FAILED")  # not finished

    path = study_report.report(s, tmp_path)
    results = json.loads((tmp_path / "reports" / "lr" / "results.json").read_text())
    assert {s.exp_name(r["label"], r["seed"]): (r["accuracy"], r["max_lr"]) for r in results} == (
        expected
    )
    assert all(r["seconds"] == 6.0 and len(r["test_acc"]) == 2 for r in results)
    text = path.read_text()
    for label in ("lr-0.01", "lr-0.1", "pick-valley"):
        accs = [a for n, (a, _) in expected.items() if n.startswith(f"lr-{label}-")]
        std = np.std(accs, ddof=1)
        assert f"| {label} | 2 | {100 * np.mean(accs):.2f} ± {100 * std:.2f} % |" in text
    assert (tmp_path / "reports" / "lr" / "lr.png").stat().st_size > 10_000
    parent = client.search_runs([exp_id], "tags.study = 'lr'")
    assert len(parent) == 1
    children = client.search_runs(
        [exp_id], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'"
    )
    assert {r.info.run_id for r in children} == {r["run_id"] for r in results}
    assert not (tmp_path / paths.MLFLOW_DB).with_suffix(".broken").exists()


def test_a_setting_may_run_over_seeds_of_its_own_and_the_command_adds_overrides(tmp_path):
    s = study_spec.load(Path("studies/full.yaml"))
    assert s.runs()[:5] == [("auto", seed) for seed in range(5)]
    assert [seed for label, seed in s.runs() if label == "lr-0.4"] == [0, 1]
    assert s.all_settings()["lr-0.4"] == {"train.max_lr": 0.4}  # seeds are not a param
    local = study_spec.with_common(
        s, ["data.source=/data/cifar-10-python.tar.gz", "train.epochs=2"]
    )
    assert local.common["data.source"] == "/data/cifar-10-python.tar.gz"
    assert local.common["train.epochs"] == 2 and s.common == {"evaluate.register_as": None}
    with pytest.raises(study_spec.StudyError, match="KEY=VALUE"):
        study_spec.with_common(s, ["data.source"])
    bad = _file(tmp_path, GOOD.replace("lr-0.1: {train.max_lr: 0.1}", "lr-0.1: {seeds: [-1]}"))
    with pytest.raises(
        study_spec.StudyError, match=r"settings: lr-0.1.seeds: a list of integers >= 0"
    ):
        study_spec.load(bad)


def test_the_report_gives_seconds_per_epoch_throughput_and_the_wall_time_split():
    results = [
        study_report.RunResult(
            "auto", s, f"r{s}", 0.9, 0.3 + s, 20.0, [0.9], [2], None, 500.0, 50.0, 2
        )
        for s in range(2)
    ]
    (row,) = study_report.summarize(results)
    assert (row["epoch_seconds"], row["images_per_sec"], row["wall_seconds"]) == (10, 500, 50)
    text = study_report.markdown(study_spec.load_text(GOOD), [row], [], "x.png", "a GPU")
    assert "| auto | 2 | 90.00 ± 0.00 % | 0.8; 0.3..1.3 | 20 | 10.00 | 500 | 50: 20 + 30 |" in text


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"trian.max_lr": 0.1}, "setting zz is invalid:\n  trian: unknown key (a typo of 'train'?)"),
        ({"train.epochs": 0}, "train.epochs: Input should be greater than or equal to 1 (got 0)"),
    ],
)  # fmt: skip
def test_a_bad_setting_queues_nothing_and_names_itself(tmp_path, monkeypatch, bad, message):
    """A typo in the last setting used to leave the earlier ones queued, with DVC's advice to add
    the misspelt key (issue 26, item 8): every run is checked against params.yaml first."""
    from .tiny_repo import committed_params

    (tmp_path / "params.yaml").write_text(committed_params())
    s = study_spec.load_text(
        "name: t\nseeds: [0]\nsettings:\n  ok: {train.max_lr: 0.1}\n  zz: {}\n"
        "common: {train.epochs: 2}\n"
    )
    s.settings["zz"].update(bad)
    called = []
    monkeypatch.setattr(study_queue, "_dvc", lambda *a, **k: called.append(a))
    with pytest.raises(study_spec.StudyError) as err:
        study.run(s, tmp_path)
    assert message in str(err.value) and "nothing was queued" in str(err.value)
    assert not called
    s.settings["zz"].clear()
    study.check_overrides(s, tmp_path)  # the same study without it: accepted


STATUS = """Task     Name            Created    Status
a256897  t-a-s0          10:24 PM   {a}
aa1fd21  t-b-s0          09:27 PM   Queued

Worker status: {workers} active, 0 idle
"""


def test_runs_left_running_by_dead_workers_are_stopped_and_queued_again(tmp_path, monkeypatch):
    """Queue workers killed (SIGKILL to the study's process group) left their tasks Running with
    no worker, and a restarted study waited at 0/2 forever (issue 26, item 5): started again,
    it stops them with `dvc queue kill` and queues them anew; while it waits, a queue whose
    workers are all gone stops it with the way out instead of a wait without end."""
    calls, state = [], {"a": "Running", "workers": 0}

    def dvc(*args, cwd, env=None):
        calls.append(args)
        if args[:2] == ("queue", "status"):
            return STATUS.format(**state)
        return ""  # `dvc queue kill` returns before the task reads Failed (seen on the benchmark)

    monkeypatch.setattr(study_queue, "_dvc", dvc)
    monkeypatch.setattr(study_queue, "finished", lambda repo: set())
    monkeypatch.setattr(study_queue, "start_queue", lambda repo, jobs: None)
    monkeypatch.setattr(study_queue.time, "sleep", lambda s: None)
    closed = []
    monkeypatch.setattr(study_queue, "close_runs", lambda names, repo: closed.extend(names))
    s = study_spec.load_text("name: t\nseeds: [0]\nsettings:\n  a: {}\n  b: {}\n")
    waiting = study_queue.enqueue(s, [("a", 0, {}), ("b", 0, {})], tmp_path)
    assert ("queue", "kill", "t-a-s0") in calls and closed == ["t-a-s0"]
    assert ("exp", "run", "--queue", "-n", "t-a-s0", "-S", "base.seed=0", "evaluate") in calls
    assert waiting == ["t-a-s0", "t-b-s0"] and not any(
        c[:1] == ("exp",) and "t-b-s0" in c for c in calls
    )

    state.update(a="Running", workers=0)  # the queue started, then its workers died
    monkeypatch.setattr(study_queue, "POLL_SECONDS", 0)
    clock = iter(range(0, 10_000, 5))
    monkeypatch.setattr(study_queue.time, "monotonic", lambda: next(clock))
    with pytest.raises(study_spec.StudyError, match=r"no worker left .* while t-a-s0, t-b-s0 wait"):
        study_queue.wait(waiting, tmp_path, 2)

    state.update(a="Running", workers=1)  # a live worker: nothing is touched
    calls.clear()
    assert study_queue.requeue_orphans(["t-a-s0"], tmp_path) == []
    assert not [c for c in calls if c[:2] == ("queue", "kill")]

    # DVC's status reads 0 workers, but one is alive as a process (the first worker, stopping
    # idle, cleared the broker the status is read from): its run is neither killed nor given up
    state.update(a="Running", workers=0)
    monkeypatch.setattr(study_queue, "live_workers", lambda repo: 1)
    assert study_queue.requeue_orphans(["t-a-s0"], tmp_path) == []
    assert not [c for c in calls if c[:2] == ("queue", "kill")]
    started = []
    monkeypatch.setattr(study_queue, "start_queue", lambda repo, jobs: started.append(jobs))
    done = iter([set()] * 8 + [{"t-a-s0"}])
    monkeypatch.setattr(study_queue, "finished", lambda repo: next(done))
    assert study_queue.wait(["t-a-s0"], tmp_path, 2) == []
    assert started == [1]  # one run, one worker: never a worker with nothing to run


def test_a_study_whose_workers_stop_mid_run_queues_its_runs_again_once(monkeypatch, capsys):
    """DVC's monitor shut a worker down while its run was under way (dvc-task#77; seen in stop 43
    on a grid step of two runs on two workers): the study queues the runs again by itself, once,
    and says so; stopped twice, it stops with the way out."""
    from onecycle.commands import study

    enqueued, waits = [], iter(["gone", []])

    def wait(names, repo, jobs):
        outcome = next(waits)
        if outcome == "gone":
            raise study_queue.WorkersGone("the queue has no worker left (...)", "t-a-s0")
        return outcome

    monkeypatch.setattr(study, "check_overrides", lambda s, repo: None)
    monkeypatch.setattr(
        study_queue, "enqueue", lambda s, grid, repo: enqueued.append(grid) or ["t-a-s0"]
    )
    monkeypatch.setattr(study_queue, "wait", wait)
    s = study_spec.load_text("name: t\nseeds: [0]\nsettings:\n  a: {}\n")
    assert study.run(s) == []
    assert len(enqueued) == 2
    assert (
        "the queue's workers stopped while its runs waited (t-a-s0); queueing them again, once"
        in (capsys.readouterr().out)
    )

    waits = iter(["gone", "gone"])
    with pytest.raises(study_queue.WorkersGone, match="no worker left"):
        study.run(s)


def test_a_name_queued_again_counts_by_its_live_task(tmp_path, monkeypatch):
    """A run stopped and queued again is listed twice by `dvc queue status`, its old task
    Failed: the live one counts, or the study took it for failed and moved on (seen on the
    benchmark after its workers were killed)."""
    text = (
        "Task     Name      Created    Status\n"
        "c5323ca  t-a-s0    10:25 PM   Running\n"
        "6d30194  t-a-s0    10:20 PM   Failed\n"
        "1111111  t-b-s0    10:20 PM   Failed\n"
        "2222222  t-b-s0    10:25 PM   Success\n"
        "\nWorker status: 1 active, 0 idle\n"
    )
    monkeypatch.setattr(study_queue, "_dvc", lambda *a, **k: text)
    assert study_queue.queue_status(tmp_path) == ({"t-a-s0": "Running", "t-b-s0": "Success"}, 1)
