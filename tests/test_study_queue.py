"""A study through DVC's queue, for real (the file's checks and the report's numbers are
tests/test_study.py's, in-process): one queue for a source run, then a tiny studies/full.yaml
setting that starts frozen from the source's checkpoint at the max LR its own range test picks; the
report against the MLflow store; started again, it runs nothing."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from .tiny_repo import ROOT, TINY_PIPELINE, run, runs

pytestmark = [pytest.mark.slow, pytest.mark.long]


def _tiny_full() -> str:
    """studies/full.yaml at the tiny run's size (its setting auto, one seed, one epoch), started
    frozen from a source run's checkpoint: one queue, the source then the setting (each queued
    run costs a minute of CPU here, so one setting checks both the range test's own pick and
    the source)."""
    full = yaml.safe_load((ROOT / "studies" / "full.yaml").read_text())
    settings = {"auto": {**full["settings"]["auto"], "seeds": [0]}}
    settings["auto"] |= {  # a frozen width-4 backbone's loss falls little in 40 steps
        "model.pretrained": "weights/source.pt",
        "model.freeze": "backbone",
        "lr_find.smooth_window": 0.1,
    }
    study = {
        "name": "tiny",
        "description": "the suite's study: a tiny studies/full.yaml, its fixed LR frozen on a source run",
        # the tiny run's training again (its range test from DVC's run cache)
        "source": {"checkpoint": "weights/source.pt", "overrides": {"train.eval_every": 2}},
        "common": {**full["common"], "train.epochs": 1},
        "settings": settings,
        "seeds": [0],
        "jobs": 2,
        "figure": full["figure"],
    }
    return yaml.safe_dump(study, sort_keys=False)


def _study(repo: Path) -> tuple[list[dict], str]:
    (repo / "tiny.yaml").write_text(_tiny_full())
    run(repo, "git", "add", "tiny.yaml")
    run(repo, "git", "commit", "-qm", "tiny study")
    run(repo, sys.executable, "-m", "onecycle.commands.study", "run", "tiny.yaml")
    out = repo / "reports" / "tiny"
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_a_study_trains_its_source_then_its_settings_and_reports_what_the_store_holds(fork):
    import numpy as np
    import torch

    from onecycle import paths
    from onecycle.commands import study_queue
    from onecycle.training import checkpoint

    results, report = _study(fork)
    assert [(r["label"], r["seed"]) for r in results] == [("auto", 0)]
    (auto,) = results

    # the full study's report: per setting the accuracy, the picks, s/epoch, img/s and the
    # experiment's wall time split into training and the rest
    for r in results:
        assert r["epochs"] == 1 and r["images_per_sec"] > 0
        assert r["wall_seconds"] > r["seconds"] > 0
        line = next(ln for ln in report.splitlines() if ln.startswith(f"| {r['label']} | 1 | "))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[5]) == pytest.approx(r["seconds"], abs=0.01)  # s/epoch, 1 epoch
        assert cells[6] == f"{r['images_per_sec']:.0f}"
        wall, _, parts = cells[7].partition(": ")
        assert float(wall) == pytest.approx(r["wall_seconds"], abs=0.5)
    assert "Wall s: from the run's range test" in report

    # the report: every number is the store's; one parent run holds the study's runs
    client, found = runs(fork)
    by_id = {r.info.run_id: r for r in found}
    for r in results:
        mine = by_id[r["run_id"]]
        assert mine.data.metrics["eval/accuracy"] == r["accuracy"]
        assert mine.data.tags["dvc.exp_name"] == f"tiny-{r['label']}-s{r['seed']}"
        assert float(mine.data.params["max_lr_used"]) == r["max_lr"]
        history = client.get_metric_history(r["run_id"], "test/accuracy")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == r["test_acc"]
        assert f"| {r['label']} | 1 | {100 * np.mean(r['accuracy']):.2f} ± n/a % |" in report
    assert (fork / "reports" / "tiny" / "tiny.png").exists()
    parents = {by_id[r["run_id"]].data.tags.get("mlflow.parentRunId") for r in results}
    assert client.get_run(parents.pop()).data.tags["study"] == "tiny" and not parents

    # the source: trained first, its checkpoint fetched from the DVC cache; the frozen run's own
    # checkpoint has the source's backbone bit for bit (BatchNorm too) and a
    # classifier of its own
    source = checkpoint.read_weights(fork / "weights" / "source.pt")
    assert "Source model `tiny-source`" in report and "% on its own test split" in report
    frozen = by_id[auto["run_id"]]
    digest = hashlib.sha256((fork / "weights" / "source.pt").read_bytes()).hexdigest()
    assert frozen.data.params["start.weights_sha256"] == digest
    assert frozen.data.params["start.normalization"].startswith("checkpoint source.pt")
    width = 8 * TINY_PIPELINE["model"]["width"]  # the classifier's inputs
    assert int(frozen.data.params["trainable_parameters"]) == width * 10 + 10
    rev = study_queue.exp_commit("tiny-auto-s0", fork)
    run(fork, "dvc", "get", ".", "models/model.pt", "--rev", rev, "-o", str(fork / "frozen.pt"))
    trained = checkpoint.read_weights(fork / "frozen.pt")
    for k, v in source["model"].items():
        if not k.startswith("fc."):
            assert torch.equal(trained["model"][k], v), k
    assert not torch.equal(trained["model"]["fc.weight"], source["model"]["fc.weight"])

    # DVC's side: queued experiments show by name with their metrics, and record into the
    # project's one store, not their temporary copies
    shown = json.loads(run(fork, "dvc", "exp", "show", "--json").stdout)
    exps = {
        rev["name"]: rev["data"]["metrics"]
        for entry in shown
        for exp in entry.get("experiments") or []
        if (rev := exp["revs"][0]).get("name")
    }
    shown = exps["tiny-auto-s0"]
    picked = shown[str(paths.LR_FIND_METRICS)]["data"]["max_lr"]  # its own range test's pick
    assert shown["metrics/train.json"]["data"]["max_lr"] == pytest.approx(picked)
    assert (
        auto["max_lr"] == pytest.approx(picked) and frozen.data.params["max_lr_source"] == "lr_find"
    )
    strays = [
        p
        for p in (fork / ".dvc" / "tmp").rglob("*")
        if p.name in ("mlflow.db", "mlruns", "mlartifacts")
    ]
    assert not strays and not (fork / "mlruns").exists(), strays

    # started again, it runs nothing; its report alone reads the same runs
    out = run(fork, sys.executable, "-m", "onecycle.commands.study", "run", "tiny.yaml")
    assert json.loads((fork / "reports" / "tiny" / "results.json").read_text()) == results, out
    assert "study runs" not in out.stderr  # no progress bar: nothing was queued
