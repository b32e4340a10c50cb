"""Data-parallel training for real: the range test and training in two gloo processes on the CPU
(torchrun under the stage), stopped by signals and resumed, on a fork of the suite's tiny run.
`pytest -m scaleout` (with tests/test_scaleout.py)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from onecycle import paths

from .tiny_repo import TINY_PIPELINE, env, run, runs, set_params

pytestmark = [pytest.mark.scaleout, pytest.mark.slow, pytest.mark.long]


DDP_TOLERANCE = 0.05  # test accuracy, absolute: plain BatchNorm normalizes over half the batch


@pytest.fixture
def ddp_repo(pipeline, fork):
    """The tiny run's settings in 2 processes, at the max LR its range test picked."""
    max_lr = json.loads((pipeline / paths.LR_FIND_METRICS).read_text())["max_lr"]
    set_params(fork, {"base": {"devices": 2}, "train": {"max_lr": max_lr}})
    run(fork, "git", "commit", "-qam", "two processes")
    return fork


def _train_runs(repo: Path):
    return [r for r in runs(repo)[1] if r.data.tags.get("dvc.stage") == "train"]


def _rank_process(stage_pid: int, rank: int):
    """The process of data-parallel rank ``rank`` under the stage's torchrun."""
    import psutil

    for child in psutil.Process(stage_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("RANK") == str(rank) and "LOCAL_RANK" in child.environ():
                return child
    raise AssertionError(f"no rank {rank} under process {stage_pid}")


def _interrupt(repo: Path, target: str, after: str) -> None:
    """Train in 2 ranks; once a line starting ``after`` is printed, SIGTERM ``target`` (the
    stage or rank 1 alone): every rank must stop at the same step, rank 0 saving the resume
    state, the MLflow run KILLED."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=repo,
        env=env(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(after):
            victim = proc if target == "the stage" else _rank_process(proc.pid, 1)
            victim.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, "".join(seen) + rest
    assert (repo / paths.RESUME_STATE).exists(), "".join(seen) + rest
    assert max(_train_runs(repo), key=lambda r: r.info.start_time).info.status == "KILLED"


def test_two_gloo_processes_sweep_and_train_as_one_run_through_signals_close_to_one(
    pipeline, ddp_repo
):
    """The range test and training in 2 gloo processes: rank 0 alone reports, writes and logs.
    Training is stopped by SIGTERM to rank 1 alone, resumed, stopped again by SIGTERM to the
    stage (as `kill` or DVC sends it), and resumed to the end: one MLflow run throughout, FINISHED, whose accuracy is close
    to the tiny run's own in one process (same max LR, epochs and data)."""
    out = run(ddp_repo, sys.executable, "-m", "stages.lr_find").stdout
    assert out.count("lr_find: ") == 1, out
    assert (ddp_repo / paths.LR_FIND_METRICS).read_text() != ""

    before = {r.info.run_id for r in _train_runs(ddp_repo)}
    _interrupt(ddp_repo, "rank 1", after="epoch 1:")
    (killed,) = [r for r in _train_runs(ddp_repo) if r.info.run_id not in before]
    _interrupt(ddp_repo, "the stage", after="epoch 2:")  # the resumed run, stopped again
    out = run(ddp_repo, sys.executable, "-m", "stages.train").stdout
    assert "resuming from" in out and not (ddp_repo / paths.RESUME_STATE).exists(), out
    assert out.count("train: test accuracy") == 1, out
    (resumed,) = [r for r in _train_runs(ddp_repo) if r.info.run_id not in before]
    assert resumed.info.run_id == killed.info.run_id
    assert resumed.info.status == "FINISHED" and resumed.data.tags.get("resumed") == "true"
    assert resumed.data.params["base.devices"] == "2"
    assert json.loads((ddp_repo / paths.TRAIN_RUN).read_text())["run_id"] == resumed.info.run_id
    history = (ddp_repo / paths.TRAIN_HISTORY).read_text().strip().splitlines()
    assert len(history) == 1 + TINY_PIPELINE["train"]["epochs"]  # one row per epoch: written once

    two, one = (json.loads((r / paths.TRAIN_METRICS).read_text()) for r in (ddp_repo, pipeline))
    print(f"test accuracy: 2 processes {two['test_acc']:.4f}, 1 process {one['test_acc']:.4f}")
    assert two["max_lr"] == one["max_lr"]
    assert abs(two["test_acc"] - one["test_acc"]) <= DDP_TOLERANCE, (two, one)
