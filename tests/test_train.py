import numpy as np
import pytest
import torch

from onecycle import training
from onecycle.config import ConfigError, ModelConfig
from onecycle.engine import select_device
from onecycle.model import ResNet9, ResNetConfig, count_parameters

CPU = select_device("cpu", 0)


def _history(result):
    """Per-epoch figures that must repeat exactly (timings excluded)."""
    return [
        (h.train_loss, h.train_acc, h.test_loss, h.test_acc, h.lr, h.momentum)
        for h in result.history
    ]


def test_default_model_has_the_recipes_parameter_count():
    assert count_parameters(ResNet9(ResNetConfig())) == 6_573_130


def test_model_follows_class_count_and_width():
    model = ResNet9(ResNetConfig(num_classes=100, width=8))
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 100)
    assert count_parameters(ResNet9(ResNetConfig(width=8))) < 6_573_130 // 50


def test_schedule_hits_the_params_at_first_peak_and_last_step(tiny_data, tiny_params, tmp_path):
    # 640 images / batch 64 = 10 steps per epoch; 24 epochs = 240 steps; peak at 5/24 -> step 49.
    cfg = tiny_params.train.model_copy(update={"epochs": 24, "eval_every": 0})
    res = training.fit(cfg, tiny_params.model, tiny_data, CPU, 0, 0.4, tmp_path / "state.pt")
    steps = {s: (lr, mom) for s, lr, mom in res.schedule}
    assert len(res.schedule) == 240
    assert steps[0] == pytest.approx((0.4 / cfg.div_factor, cfg.max_momentum))
    assert steps[49] == pytest.approx((0.4, cfg.base_momentum))
    assert max(lr for lr, _ in steps.values()) == pytest.approx(0.4)
    assert steps[239] == pytest.approx(
        (0.4 / cfg.div_factor / cfg.final_div_factor, cfg.max_momentum), rel=1e-3, abs=1e-9
    )
    assert res.history[-1].lr == pytest.approx(
        steps[239][0], abs=1e-9
    )  # never the negative post-end value


def test_constant_schedule_keeps_max_lr(tiny_data, tiny_params, tmp_path):
    cfg = tiny_params.train.model_copy(update={"schedule": "constant", "epochs": 1})
    res = training.fit(cfg, tiny_params.model, tiny_data, CPU, 0, 0.05, tmp_path / "s.pt")
    assert {lr for _, lr, _ in res.schedule} == {0.05}


def test_two_seeded_runs_give_identical_metrics(tiny_data, tiny_params, tmp_path):
    p = tiny_params
    a = training.fit(p.train, p.model, tiny_data, CPU, 7, 0.2, tmp_path / "a.pt")
    b = training.fit(p.train, p.model, tiny_data, CPU, 7, 0.2, tmp_path / "b.pt")
    assert _history(a) == _history(b)
    c = training.fit(p.train, p.model, tiny_data, CPU, 8, 0.2, tmp_path / "c.pt")
    assert _history(c) != _history(a)


@pytest.mark.parametrize("stop_after", [3, 10, 13])  # mid-epoch, at the epoch boundary, in epoch 2
def test_interrupt_and_resume_equals_uninterrupted(tiny_data, tiny_params, tmp_path, stop_after):
    p = tiny_params
    full = training.fit(p.train, p.model, tiny_data, CPU, 0, 0.2, tmp_path / "full.pt")
    state_path = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        training.fit(
            p.train, p.model, tiny_data, CPU, 0, 0.2, state_path, stop_after_steps=stop_after
        )
    assert state_path.exists()
    key = training.resume_key(p.train, p.model, tiny_data, 0, 0.2)
    state = training.load_resume(state_path, key)
    resumed = training.fit(p.train, p.model, tiny_data, CPU, 0, 0.2, state_path, state=state)
    assert resumed.resumed_from is not None
    assert _history(resumed) == _history(full)
    assert [s[1:] for s in resumed.schedule] == [s[1:] for s in full.schedule]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_resume_state_with_other_params_is_refused(tiny_data, tiny_params, tmp_path):
    p = tiny_params
    state_path = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        training.fit(p.train, p.model, tiny_data, CPU, 0, 0.2, state_path, stop_after_steps=2)
    other = p.train.model_copy(update={"epochs": 3, "batch_size": 32})
    with pytest.raises(training.ResumeMismatch) as err:
        training.load_resume(state_path, training.resume_key(other, p.model, tiny_data, 0, 0.2))
    msg = str(err.value)
    assert (
        "train.epochs: saved 2, now 3" in msg
        and "train.batch_size" in msg
        and f"rm {state_path}" in msg
    )


def test_nan_loss_stops_at_once_and_writes_no_checkpoint(tiny_data, tiny_params, tmp_path):
    p = tiny_params
    state_path = tmp_path / "resume.pt"
    with pytest.raises(training.NonFiniteLoss, match=r"epoch 1, step \d+ .*LR") as err:
        training.fit(p.train, p.model, tiny_data, CPU, 0, 1e9, state_path)
    assert "train.max_lr" in str(err.value)
    assert not state_path.exists()


def test_weights_refuse_non_finite_values(tmp_path):
    model = ResNet9(ResNetConfig(width=2))
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(training.NonFiniteLoss):
        training.save_weights(
            model, ModelConfig(width=2), [str(i) for i in range(10)], tmp_path / "m.pt"
        )
    assert not (tmp_path / "m.pt").exists()


def test_checkpoint_loads_weights_only(tmp_path):
    model = ResNet9(ResNetConfig(width=2))
    training.save_weights(model, ModelConfig(width=2), list("abcdefghij"), tmp_path / "m.pt")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert ckpt["config"]["width"] == 2 and ckpt["classes"] == list("abcdefghij")
    assert set(ckpt["model"]) == set(model.state_dict())
    assert not list(tmp_path.glob(".m.pt*"))  # no temporary file left behind


@pytest.mark.parametrize(
    ("setting", "metrics", "expected"),
    [
        (0.05, None, (0.05, "params")),
        ("auto", {"max_lr": 0.3}, (0.3, "lr_find")),
        (0.05, {"max_lr": 0.3}, (0.05, "params")),
    ],
)
def test_max_lr_auto_takes_lr_finds_choice_and_a_number_overrides(
    setting, metrics, expected, tmp_path
):
    assert training.resolve_max_lr(setting, metrics, tmp_path / "lr_find.json") == expected


@pytest.mark.parametrize("metrics", [None, {"max_lr": float("nan")}, {"max_lr": -1}, {}])
def test_max_lr_auto_without_a_usable_lr_find_output_is_refused(metrics, tmp_path):
    with pytest.raises(ConfigError, match="lr_find"):
        training.resolve_max_lr("auto", metrics, tmp_path / "lr_find.json")


def test_augmented_batches_are_reproducible_and_differ_by_epoch(tiny_data, tiny_params):
    from onecycle.augment import AugmentedBatches, train_transform

    t = train_transform(tiny_params.train.augment, 32, tiny_data.mean, tiny_data.std)
    a = AugmentedBatches(tiny_data.x_train, tiny_data.y_train, 64, t, seed=0)
    b = AugmentedBatches(tiny_data.x_train, tiny_data.y_train, 64, t, seed=0)
    assert torch.equal(a[(1, 3)][0], b[(1, 3)][0])  # same key, same batch, any order of access
    assert not torch.equal(a[(0, 3)][0], a[(1, 3)][0])
    x, _ = a[(0, 0)]
    assert x.shape == (64, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    # cutout with p=1: every image has an 8x8 patch at the mean (0 after normalising)
    zeros = (x.abs() < 0.05).all(1).sum((1, 2))  # the fill is rounded to uint8 before normalising
    assert (zeros >= 64 - 8).float().mean() > 0.9 and np.isfinite(x.numpy()).all()
