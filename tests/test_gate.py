import json
import shutil
import subprocess
import sys

import pytest

from onecycle import paths
from onecycle.commands.gate import declared_outputs, run_checks, table, updated_baseline

from .conftest import ROOT

BASELINE = {
    "metrics": {"accuracy": 0.80, "max_lr": 0.3},
    "tolerances": {"accuracy_drop": 0.02, "max_lr_factor": 2.0},
}


@pytest.fixture
def workspace(tmp_path):
    """A repo folder with every output dvc.yaml declares, and metrics equal to the baseline."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    for rel in declared_outputs(tmp_path / "dvc.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    _write(tmp_path, accuracy=0.80, max_lr=0.3)
    return tmp_path


def _write(root, accuracy=None, max_lr=None, used=None):
    if accuracy is not None:
        (root / paths.EVAL_METRICS).write_text(json.dumps({"accuracy": accuracy}))
    if max_lr is not None:
        (root / paths.LR_FIND_METRICS).write_text(json.dumps({"max_lr": max_lr}))
    if used is not None:
        (root / paths.TRAIN_METRICS).write_text(
            json.dumps({"max_lr": used[0], "max_lr_source": used[1]})
        )


def _failed(checks):
    return [c for c in checks if not c.ok]


def test_declared_outputs_cover_every_stage():
    outs = declared_outputs(ROOT / "dvc.yaml")
    for p in (
        paths.PREPARED_DIR,
        paths.MODEL,
        paths.EVAL_METRICS,
        paths.LR_FIND_METRICS,
        paths.PLOTS_DIR,
        paths.PREDICTIONS,
    ):
        assert str(p) in outs


def test_unchanged_results_pass(workspace):
    assert not _failed(run_checks(workspace, BASELINE))


def test_within_tolerance_passes(workspace):
    _write(workspace, accuracy=0.785, max_lr=0.55)
    assert not _failed(run_checks(workspace, BASELINE))


def test_worse_accuracy_fails_naming_metric_baseline_and_tolerance(workspace):
    _write(workspace, accuracy=0.62)  # e.g. a tiny train.epochs
    (fail,) = _failed(run_checks(workspace, BASELINE))
    assert "accuracy" in fail.message and "0.8000" in fail.message and "0.0200" in fail.message
    assert "FAIL" in table(run_checks(workspace, BASELINE))


def test_max_lr_moving_more_than_the_factor_fails(workspace):
    _write(workspace, max_lr=0.1)
    (fail,) = _failed(run_checks(workspace, BASELINE))
    assert "max_lr" in fail.message and "factor 2" in fail.message and "0.3" in fail.message


def test_a_missing_declared_output_fails(workspace):
    (workspace / paths.PREDICTIONS).unlink()
    (fail,) = _failed(run_checks(workspace, BASELINE))
    assert str(paths.PREDICTIONS) in fail.message


def test_override_check_needs_the_exact_lr_from_params(workspace):
    _write(workspace, used=(0.2, "params"))
    assert not _failed(run_checks(workspace, BASELINE, expect_max_lr=0.2))
    _write(workspace, used=(0.37, "lr_find"))
    (fail,) = _failed(run_checks(workspace, BASELINE, expect_max_lr=0.2))
    assert "0.2" in fail.message and "lr_find" in fail.message


def test_an_override_run_is_not_held_to_the_baseline_accuracy(workspace):
    # CI's override run trains one epoch: only the LR it used and the outputs are checked
    _write(workspace, accuracy=0.3, used=(0.2, "params"))
    checks = run_checks(workspace, BASELINE, expect_max_lr=0.2)
    assert not _failed(checks) and not any("accuracy" in c.name for c in checks)


def test_update_keeps_the_tolerances(workspace):
    _write(workspace, accuracy=0.83, max_lr=0.25)
    new = updated_baseline(BASELINE, workspace)
    assert (
        new["metrics"] == {"accuracy": 0.83, "max_lr": 0.25}
        and new["tolerances"] == BASELINE["tolerances"]
    )


def test_committed_baseline_is_well_formed():
    baseline = json.loads((ROOT / "ci" / "baseline.json").read_text())
    assert 0 < baseline["metrics"]["accuracy"] <= 1 and baseline["metrics"]["max_lr"] > 0
    assert (
        baseline["tolerances"]["accuracy_drop"] > 0 and baseline["tolerances"]["max_lr_factor"] > 1
    )
    assert baseline["how_measured"]


def _gate(root, *args):
    return subprocess.run(
        [sys.executable, "-m", "onecycle.commands.gate", "--root", str(root), *args],
        cwd=ROOT,  # its default baseline: ci/baseline.json
        capture_output=True,
        text=True,
    )


def test_gate_script_exits_nonzero_on_failure(workspace):
    baseline = json.loads((ROOT / "ci" / "baseline.json").read_text())["metrics"]
    _write(workspace, accuracy=baseline["accuracy"], max_lr=baseline["max_lr"])
    passed = _gate(workspace)
    assert passed.returncode == 0 and "gate: passed" in passed.stdout
    _write(workspace, accuracy=baseline["accuracy"] - 0.2)  # a far worse run
    failed = _gate(workspace)
    assert failed.returncode == 1
    assert "gate: FAIL: test accuracy" in failed.stderr and "ci/baseline.json" in failed.stderr
