"""lr_find.refine: the curve's pick checked by short 1cycle probes (successive halving)."""

import json
import math

import numpy as np
import pytest

from onecycle.config import ConfigError, parse_params
from onecycle.data import prepared, sources, splits
from onecycle.range_test import lr_finder
from onecycle.range_test import refine as rf
from onecycle.range_test.curves import LRFindError
from onecycle.reports import figures
from onecycle.training.runtime import select_device

from .conftest import ROOT, TINY


def test_candidates_run_a_factor_two_apart_from_twice_the_pick():
    assert rf.candidates(0.4, 4) == [0.8, 0.4, 0.2, 0.1]
    assert rf.candidates(0.05, 2) == [0.1, 0.05]


def _fake(peak: float, log: list):
    """A probe whose accuracy falls with the distance from ``peak`` on log LR; longer probes
    score higher, as training longer does."""

    def run(lr, steps, round_):
        log.append((lr, steps, round_))
        acc = 0.9 - 0.1 * abs(math.log2(lr / peak)) + steps / 1e4
        return rf.Probe(lr, round_, steps, acc, 1 - acc, 0.0)

    return run


def test_halving_keeps_the_better_half_at_twice_the_steps_until_one_is_left():
    log = []
    rounds = rf.halve([0.8, 0.4, 0.2, 0.1, 0.05], 10, _fake(0.25, log))
    assert [[p.max_lr for p in r] for r in rounds] == [
        [0.8, 0.4, 0.2, 0.1, 0.05],
        [0.2, 0.4, 0.1],  # the better half, rounded up, best first
        [0.2, 0.4],
    ]
    assert [{p.steps for p in r} for r in rounds] == [{10}, {20}, {40}]
    assert rf.rank(rounds[-1])[0].max_lr == 0.2
    assert sum(steps for _, steps, _ in log) == rf.probe_cost(5, 10) == 50 + 60 + 80


def test_four_candidates_cost_eight_first_probes():
    rounds = rf.halve([0.8, 0.4, 0.2, 0.1], 7, _fake(0.1, []))
    assert [len(r) for r in rounds] == [4, 2]
    assert rf.probe_cost(4, 7) == 8 * 7 and rf.rank(rounds[-1])[0].max_lr == 0.1


def test_a_diverged_probe_ranks_last_and_ties_go_to_the_lower_lr():
    diverged = rf.Probe(0.8, 1, 10, 0.0, math.inf, 0.0)
    a, b = rf.Probe(0.4, 1, 10, 0.5, 1.2, 0.0), rf.Probe(0.2, 1, 10, 0.5, 1.2, 0.0)
    better_loss = rf.Probe(0.1, 1, 10, 0.5, 1.1, 0.0)
    assert rf.rank([diverged, a, b, better_loss]) == [better_loss, b, a, diverged]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr_find": {"refine": 1}}, "lr_find.refine: .*0 \\(off\\) or 2 or more"),
        ({"lr_find": {"refine": 4}}, "lr_find.refine: .*set data.val_images"),
        (
            {
                "lr_find": {"refine": 4},
                "data": {"val_images": 100},
                "train": {"schedule": "constant"},
            },
            "lr_find.refine: its probes are 1cycle runs, and train.schedule is 'constant'",
        ),
    ],
)
def test_refine_settings_that_cannot_work_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(overrides)


@pytest.fixture(scope="module")
def tiny_val_data(shared_cifar, tmp_path_factory):
    """640 training images of real CIFAR-10, 128 more carved off as the validation split."""
    cfg = parse_params(
        {"data": {"source": str(shared_cifar), "train_subset": 768, "test_subset": 100}}
    )
    ds, _ = sources.fetch(cfg.data, ROOT, ROOT / "data" / "raw", seed=0)
    ds, val = splits.carve_validation(ds, 128, seed=0)
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepared.save_prepared(ds, out, "test slice of cifar10-jpg", val)
    return prepared.load_prepared(out)


def _params(**lr_find):
    raw = {**TINY, "data": {"val_images": 128}, "lr_find": {**TINY["lr_find"], **lr_find}}
    return parse_params(raw)


def test_find_with_refine_trains_with_the_probes_choice(tiny_val_data):
    params = _params(num_iter=40, suggestion="min", refine=3, refine_epochs=0.5)
    found = lr_finder.find(params, tiny_val_data, select_device("cpu", 0))
    pick, summary = found.result["curve_max_lr"], found.metrics("min")["refine"]
    assert found.result["max_lr"] == summary["chosen"] == found.refined.chosen
    assert summary["curve_pick"] == pick == found.result["min"]
    assert summary["candidates"] == pytest.approx([2 * pick, pick, pick / 2])
    # 640 images at batch 64: 10 steps an epoch; refine_epochs 0.5 is below the 10-step floor,
    # so 3 probes of 10 steps, then the better two at 20
    assert [(p["round"], p["steps"]) for p in summary["probes"]] == [(1, 10)] * 3 + [(2, 20)] * 2
    assert summary["steps"] == rf.probe_cost(3, 10) == 70 and summary["epochs"] == 7.0
    last = [p for p in summary["probes"] if p["round"] == 2]
    best = max(last, key=lambda p: (p["val_acc"], -p["val_loss"]))
    assert summary["chosen"] == best["max_lr"]
    assert all(0 <= p["val_acc"] <= 1 for p in summary["probes"])
    json.dumps(summary, allow_nan=False)  # lr_find.json stays valid JSON
    line = found.describe("min")
    assert line.startswith(f"max_lr = {summary['chosen']:.4g} refined from min's {pick:.4g}")
    assert " by 5 probes (7.00 epochs; last round, val. accuracy: " in line


def test_the_same_probe_gives_the_same_accuracy_twice(tiny_val_data):
    params = _params(refine=2)
    dev = select_device("cpu", 0)
    a = rf.refine(params, tiny_val_data, dev, 0.2)
    b = rf.refine(params, tiny_val_data, dev, 0.2)
    assert [(p.max_lr, p.val_acc, p.val_loss) for p in a.probes] == [
        (p.max_lr, p.val_acc, p.val_loss) for p in b.probes
    ]


def test_a_pick_where_every_probe_diverges_is_refused_with_the_key(tiny_val_data):
    with pytest.raises(LRFindError, match="every lr_find.refine probe's loss went non-finite"):
        rf.refine(_params(refine=2), tiny_val_data, select_device("cpu", 0), 1e6)


def test_refine_needs_a_validation_split(tiny_data):
    with pytest.raises(LRFindError, match="set data.val_images"):
        rf.refine(_params(refine=2), tiny_data, select_device("cpu", 0), 0.2)


def test_batchnorm_statistics_are_re_estimated_from_training_batches():
    """After a short probe, BatchNorm's running statistics (momentum 0.01, as torchvision's
    mobilenet_v3) are still near their start; the probe is scored on the batches' own."""
    import torch

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.01))
    batches = iter([(torch.full((4, 3, 2, 2), v), None) for v in (1.0, 3.0, 5.0)])
    model.eval()
    rf.recalibrate_batchnorm(model, batches, 3)
    bn = model[0]
    assert bn.running_mean.tolist() == pytest.approx([3.0] * 3)  # the plain average, not 0.01 of it
    assert bn.momentum == 0.01 and not model.training  # put back as they were


def test_the_lr_find_figure_marks_the_refined_lr():
    lrs = list(np.geomspace(1e-3, 1, 30))
    rows = [{"lr": lr, "loss": 2 - lr, "smooth_loss": 2 - lr} for lr in lrs]
    lr_find = {"method": "min", "min": 0.9, "max_lr": 0.45, "refine": {"chosen": 0.45}}
    fig = figures.lr_find_figure_from_rows(rows, lr_find)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "refined by probes: 0.45 (chosen)" in labels
    assert "min: 0.9 (probed around)" in labels
