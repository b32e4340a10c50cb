import numpy as np
import pytest
import torch

from onecycle.config import ConfigError, ModelConfig
from onecycle.range_test import handoff
from onecycle.training import checkpoint, loop, outputs
from onecycle.training.model import ResNet9, ResNetConfig, count_parameters
from onecycle.training.plan import make_plan, split_tensors, too_few_steps
from onecycle.training.runtime import select_device
from onecycle.training.session import build_session

CPU = select_device("cpu", 0)


def _resume(params, data, path, seed=0, max_lr=0.2):
    key = checkpoint.resume_key(params.train, params.model, data.meta["fingerprint"], seed, max_lr)
    return checkpoint.ResumeFile(path, key)


def _fit(params, data, path, seed=0, max_lr=0.2, state=None, hooks=None, stop=None):
    """What the train stage does: one session, one plan, then the loop."""
    cfg = params.train
    session = build_session(params.model, cfg, data, CPU, seed, cfg.max_momentum)
    plan = make_plan(cfg, max_lr, session, data)
    resume = _resume(params, data, path, seed, max_lr)
    return loop.fit(session, plan, resume, state, hooks, stop)


def _history(result):
    """Per-epoch figures that must repeat exactly (timings excluded)."""
    return [
        (h.train_loss, h.train_acc, h.test_loss, h.test_acc, h.lr, h.momentum)
        for h in result.history
    ]


def _stop_after(steps: int) -> tuple[loop.Stop, loop.Hooks]:
    """A stop flag set after ``steps`` steps, as Ctrl-C would set it."""
    stop = loop.Stop()
    return stop, loop.Hooks(on_step=lambda s: stop.request() if s + 1 == steps else None)


def test_default_model_has_the_recipes_parameter_count():
    assert count_parameters(ResNet9(ResNetConfig())) == 6_573_130


def test_model_follows_class_count_and_width():
    model = ResNet9(ResNetConfig(num_classes=100, width=8))
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 100)
    assert count_parameters(ResNet9(ResNetConfig(width=8))) < 6_573_130 // 50


@pytest.mark.parametrize("name", ["onecycle", "constant", "step"])
def test_every_step_trains_at_the_scheduled_lr_and_momentum(tiny_data, tiny_params, tmp_path, name):
    params = tiny_params.model_copy(
        update={"train": tiny_params.train.model_copy(update={"schedule": name, "step_epochs": 1})}
    )
    cfg = params.train
    session = build_session(params.model, cfg, tiny_data, CPU, 0, cfg.max_momentum)
    plan = make_plan(cfg, 0.2, session, tiny_data)
    used = []  # what the optimizer held during each step

    def record(step):
        group = session.optimizer.param_groups[0]
        used.append((step, group["lr"], group["momentum"]))

    loop.fit(session, plan, _resume(params, tiny_data, tmp_path / "s.pt"), hooks=loop.Hooks(record))
    assert [s for s, _, _ in used] == list(range(cfg.epochs * session.steps_per_epoch))
    assert [(lr, m) for _, lr, m in used] == [plan.schedule(s) for s, _, _ in used]
    rows = outputs.schedule_rows(plan, session.steps_per_epoch)
    assert [(r["lr"], r["momentum"]) for r in rows] == [(lr, m) for _, lr, m in used]


def test_two_seeded_runs_give_identical_metrics(tiny_data, tiny_params, tmp_path):
    a = _fit(tiny_params, tiny_data, tmp_path / "a.pt", seed=7)
    b = _fit(tiny_params, tiny_data, tmp_path / "b.pt", seed=7)
    assert _history(a) == _history(b)
    c = _fit(tiny_params, tiny_data, tmp_path / "c.pt", seed=8)
    assert _history(c) != _history(a)


@pytest.mark.parametrize("stop_after", [3, 10, 13])  # mid-epoch, at the epoch boundary, in epoch 2
def test_interrupt_and_resume_equals_uninterrupted(tiny_data, tiny_params, tmp_path, stop_after):
    full = _fit(tiny_params, tiny_data, tmp_path / "full.pt")
    state_path = tmp_path / "resume.pt"
    stop, hooks = _stop_after(stop_after)
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_params, tiny_data, state_path, hooks=hooks, stop=stop)
    assert state_path.exists()
    state = _resume(tiny_params, tiny_data, state_path).load()
    assert state["epoch"] * 10 + state["batch"] == stop_after  # 640 / 64 = 10 steps an epoch
    resumed = _fit(tiny_params, tiny_data, state_path, state=state)
    assert resumed.resumed_from == (state["epoch"], state["batch"])
    assert _history(resumed) == _history(full)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_resume_state_with_other_params_is_refused(tiny_data, tiny_params, tmp_path):
    state_path = tmp_path / "resume.pt"
    stop, hooks = _stop_after(2)
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_params, tiny_data, state_path, hooks=hooks, stop=stop)
    other = tiny_params.train.model_copy(update={"epochs": 3, "batch_size": 32})
    other_params = tiny_params.model_copy(update={"train": other})
    with pytest.raises(checkpoint.ResumeMismatch) as err:
        _resume(other_params, tiny_data, state_path).load()
    msg = str(err.value)
    assert (
        "train.epochs: saved 2, now 3" in msg
        and "train.batch_size" in msg
        and f"rm {state_path}" in msg
    )


@pytest.mark.parametrize("setting", ["auto", "number"])  # from lr_find, or given in params
def test_a_resume_state_saved_at_another_max_lr_is_refused(
    tiny_data, tiny_params, tmp_path, setting
):
    state_path = tmp_path / "resume.pt"
    stop, hooks = _stop_after(2)
    saved = tiny_params
    if setting == "number":
        saved = tiny_params.model_copy(
            update={"train": tiny_params.train.model_copy(update={"max_lr": 0.2})}
        )
    with pytest.raises(KeyboardInterrupt):
        _fit(saved, tiny_data, state_path, max_lr=0.2, hooks=hooks, stop=stop)
    now = saved
    if setting == "number":
        now = saved.model_copy(update={"train": saved.train.model_copy(update={"max_lr": 0.3})})
    with pytest.raises(checkpoint.ResumeMismatch, match="max_lr") as err:
        _resume(now, tiny_data, state_path, max_lr=0.3).load()
    assert f"rm {state_path}" in str(err.value)


@pytest.mark.parametrize("content", [[1, 2, 3], {"model": {}}])
def test_a_resume_state_of_another_kind_is_refused_with_the_rm_command(tmp_path, content):
    path = tmp_path / "resume.pt"
    torch.save(content, path)
    with pytest.raises(checkpoint.ResumeMismatch, match=f"not a resume state.*rm {path}"):
        checkpoint.ResumeFile(path, {}).load()


def test_nan_loss_stops_at_once_and_writes_no_checkpoint(tiny_data, tiny_params, tmp_path):
    state_path = tmp_path / "resume.pt"
    with pytest.raises(loop.NonFiniteLoss, match=r"epoch 1, step \d+ .*LR") as err:
        _fit(tiny_params, tiny_data, state_path, max_lr=1e9)
    assert "train.max_lr" in str(err.value)
    assert not state_path.exists()


def test_a_nan_between_syncs_still_names_its_first_step(
    tiny_data, tiny_params, tmp_path, monkeypatch
):
    # On a GPU the sums stay on the device for SYNC_EVERY steps; the error must not name the
    # step of the sync but the first bad one, as the every-step check on a CPU does.
    with pytest.raises(loop.NonFiniteLoss) as every_step:
        _fit(tiny_params, tiny_data, tmp_path / "a.pt", max_lr=1e9)
    monkeypatch.setattr(loop, "sync_every", lambda dev: 7)
    with pytest.raises(loop.NonFiniteLoss) as batched:
        _fit(tiny_params, tiny_data, tmp_path / "b.pt", max_lr=1e9)
    assert str(batched.value) == str(every_step.value)


def test_weights_refuse_non_finite_values(tmp_path):
    model = ResNet9(ResNetConfig(width=2))
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match="not finite"):
        checkpoint.save_weights(
            model, ModelConfig(width=2), [str(i) for i in range(10)], tmp_path / "m.pt"
        )
    assert not (tmp_path / "m.pt").exists()


def test_checkpoint_loads_weights_only(tmp_path):
    model = ResNet9(ResNetConfig(width=2))
    checkpoint.save_weights(model, ModelConfig(width=2), list("abcdefghij"), tmp_path / "m.pt")
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
    assert handoff.resolve_max_lr(setting, metrics, tmp_path / "lr_find.json") == expected


@pytest.mark.parametrize("metrics", [None, {"max_lr": float("nan")}, {"max_lr": -1}, {}])
def test_max_lr_auto_without_a_usable_lr_find_output_is_refused(metrics, tmp_path):
    with pytest.raises(ConfigError, match="lr_find"):
        handoff.resolve_max_lr("auto", metrics, tmp_path / "lr_find.json")


def test_augmented_batches_are_reproducible_and_differ_by_epoch(tiny_data, tiny_params):
    from onecycle.training.augment import AugmentedBatches, train_transform

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


@pytest.mark.parametrize(
    ("images", "batch", "epochs", "warns"),
    [(2000, 512, 4, True), (50_000, 512, 24, False), (640, 64, 5, False), (640, 64, 2, True)],
)
def test_a_run_too_short_to_train_is_named_with_the_key_to_change(images, batch, epochs, warns):
    warning = too_few_steps(images, batch, epochs)
    assert (warning is not None) == warns
    if warns:
        assert f"{images:,} training images" in warning
        assert ("lower train.batch_size" in warning) == (images // batch < 10)
        assert ("raise train.epochs" in warning) == (images // batch >= 10)


def test_a_run_of_hours_says_so_early_with_the_quick_alternative(monkeypatch, capsys):
    from onecycle import progress

    assert progress.long_run_hint(done=100, left=1000, seconds=10, device="cpu") is None  # 100 s
    hint = progress.long_run_hint(done=20, left=9_000, seconds=20, device="cpu")  # 2.5 h
    assert "about 2.5 h more on this cpu" in hint and "make quick" in hint
    clock = iter([0.0, 5.0, 25.0, 30.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.RunBar(total=10_000, initial=0, device="cpu") as bar:
        for _ in range(2):
            for _ in range(10):
                bar.update()
            bar.show(0, 24, 2.3, 0.04)  # at 5 s nothing yet; at 25 s the projection is hours
        bar.show(0, 24, 2.2, 0.04)  # said once only
    out = capsys.readouterr()
    assert (out.out + out.err).count("at this pace the whole run takes about") == 1


LR_FIND = {"max_lr": 0.3, "lower_bound": 0.01, "weight_decay": 1e-3, "momentum": 0.9}


def test_auto_values_come_from_lr_find_and_say_so(tmp_path):
    from onecycle.config import TrainConfig

    cfg = TrainConfig(weight_decay="auto", max_momentum="auto", schedule="cyclic", base_lr="auto")
    hyper = handoff.resolve(cfg, LR_FIND, tmp_path / "lr_find.json")
    assert (hyper.max_lr, hyper.base_lr) == (0.3, 0.01)
    assert (hyper.cfg.weight_decay, hyper.cfg.max_momentum) == (1e-3, 0.9)
    assert set(hyper.sources.values()) == {"lr_find"}
    fixed = handoff.resolve(TrainConfig(max_lr=0.1), LR_FIND, tmp_path / "lr_find.json")
    assert fixed.base_lr is None and fixed.cfg.weight_decay == 5e-4 and fixed.max_lr == 0.1
    assert set(fixed.sources.values()) == {"params"}


@pytest.mark.parametrize(
    ("cfg", "lr_find", "message"),
    [
        ({"weight_decay": "auto"}, {"max_lr": 0.3}, "weight_decay_grid choice"),
        ({"max_momentum": "auto"}, {"max_lr": 0.3, "momentum": 0.8}, "below train.base_momentum"),
        ({"schedule": "cyclic", "base_lr": "auto"}, {"max_lr": 0.3}, "no usable lower_bound"),
        ({"schedule": "cyclic", "base_lr": 0.5}, {"max_lr": 0.3}, "not below the max LR"),
    ],
)
def test_an_auto_value_that_cannot_be_had_is_refused_naming_the_key(
    cfg, lr_find, message, tmp_path
):
    from onecycle.config import TrainConfig

    with pytest.raises(ConfigError, match=message) as err:
        handoff.resolve(TrainConfig(**cfg), lr_find, tmp_path / "lr_find.json")
    assert "train." in str(err.value)


def test_a_damaged_lr_find_json_names_the_file_and_the_way_out(tmp_path):
    from onecycle import files
    from onecycle.errors import UserError

    path = tmp_path / "lr_find.json"
    path.write_text('{"max_lr": 0.3')  # cut short
    with pytest.raises(UserError, match=r"lr_find.json is not valid JSON .*dvc repro -f"):
        files.read_json(path)


def test_the_validation_split_is_watched_every_epoch_and_reported(tiny_data, tiny_params, tmp_path):
    import dataclasses

    from onecycle.data import splits

    rest, (x_val, y_val) = splits.carve_validation(tiny_data, 128, seed=0)
    data = dataclasses.replace(
        tiny_data, x_train=rest.x_train, y_train=rest.y_train, x_val=x_val, y_val=y_val
    )
    result = _fit(tiny_params, data, tmp_path / "s.pt")
    assert all(h.val_acc is not None and h.val_loss is not None for h in result.history)
    assert {"val/accuracy", "val/loss"} <= set(result.history[-1].metrics())
    hyper = handoff.resolve(tiny_params.train, None, tmp_path / "lr_find.json")
    summary = outputs.summary(result, hyper)
    assert summary["val_acc"] == result.history[-1].val_acc
    session = build_session(tiny_params.model, tiny_params.train, data, CPU, 0, 0.9)
    _, acc = loop.evaluate(session.model, *split_tensors(data, CPU, "val"), CPU)
    assert 0 <= acc <= 1 and len(result.history) == tiny_params.train.epochs
