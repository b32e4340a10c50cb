"""The schedules are pure functions of the step: exact values against torch's schedulers."""

import itertools

import pytest
import torch

from onecycle.config import TrainConfig
from onecycle.training import schedule

SETTINGS = dict(div_factor=10.0, final_div_factor=1000.0, base_momentum=0.85, max_momentum=0.95)


def test_exp_sweep_matches_closed_form():
    assert schedule.sweep_lrs(4, 1e-3, 1.0, "exp") == pytest.approx(
        [1e-3, 1e-2, 1e-1, 1.0], rel=1e-12
    )
    n, a, b = 100, 1e-7, 10.0
    for i in (0, 1, 37, 99):
        assert schedule.sweep_lr(i, n, a, b, "exp") == pytest.approx(
            a * (b / a) ** (i / (n - 1)), rel=1e-12
        )


def test_linear_sweep_matches_closed_form():
    # the seed write-ups' linear sweep, 0.001 to 0.065 in 5 steps
    assert schedule.sweep_lrs(5, 0.001, 0.065, "linear") == pytest.approx(
        [0.001, 0.017, 0.033, 0.049, 0.065], rel=1e-12
    )


def test_unknown_sweep_mode_is_refused():
    with pytest.raises(ValueError, match="exp"):
        schedule.sweep_lr(0, 10, 1e-3, 1, "cubic")


def _torch_one_cycle(total, max_lr, **kw):
    """(lr, momentum) that torch's OneCycleLR gives SGD at each of ``total`` steps. Without
    cycle_momentum it leaves SGD's own momentum, which training builds at max_momentum."""
    params = torch.nn.Linear(1, 1).parameters()
    opt = torch.optim.SGD(params, lr=1.0, momentum=kw["max_momentum"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, **kw)
    out = []
    for _ in range(total):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(
    ("three_phase", "anneal", "cycle_momentum"),
    list(itertools.product([False, True], ["linear", "cos"], [True, False])),
)
@pytest.mark.parametrize(("total", "pct_start"), [(240, 5 / 24), (97, 0.3), (7, 0.25)])
def test_one_cycle_equals_torchs_one_cycle_lr_bit_for_bit(
    three_phase, anneal, cycle_momentum, total, pct_start
):
    kw = dict(SETTINGS, pct_start=pct_start, three_phase=three_phase, cycle_momentum=cycle_momentum)
    expected = _torch_one_cycle(total, 0.4, anneal_strategy=anneal, **kw)
    ours = [schedule.one_cycle(s, total, 0.4, anneal_strategy=anneal, **kw) for s in range(total)]
    assert ours == expected  # exact: the same arithmetic, term for term


def test_one_cycle_recipe_hits_its_landmarks():
    # 24 epochs of 10 steps, peak at 5/24: step 0 starts at max_lr/10, step 49 is the peak with
    # the lowest momentum, the last step ends at max_lr/10/1000 with the momentum back at max.
    cfg = TrainConfig(epochs=24)
    f = schedule.for_training(cfg, 0.4, steps_per_epoch=10)
    assert f(0) == pytest.approx((0.04, 0.95))
    assert f(49) == pytest.approx((0.4, 0.85))
    assert max(f(s)[0] for s in range(240)) == pytest.approx(0.4)
    assert f(239) == pytest.approx((0.4e-4, 0.95))


def test_constant_keeps_max_lr_and_max_momentum():
    f = schedule.for_training(TrainConfig(schedule="constant", epochs=3), 0.05, 7)
    assert {f(s) for s in range(21)} == {(0.05, 0.95)}


def test_step_decay_equals_torchs_step_lr():
    cfg = TrainConfig(schedule="step", epochs=6, step_epochs=2, step_gamma=0.1)
    f = schedule.for_training(cfg, 0.4, steps_per_epoch=5)
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.4, momentum=0.95)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
    for s in range(30):
        # torch multiplies step by step (0.4 * 0.1 * 0.1), we take the power: equal to rounding
        assert f(s) == pytest.approx((opt.param_groups[0]["lr"], 0.95), rel=1e-12)
        opt.step()
        sched.step()
    assert [f(s)[0] for s in (0, 9, 10, 19, 20)] == pytest.approx([0.4, 0.4, 0.04, 0.04, 0.004])


def test_unknown_schedule_is_refused():
    cfg = TrainConfig.model_construct(**{**TrainConfig().model_dump(), "schedule": "cubic"})
    with pytest.raises(ValueError, match="cubic"):
        schedule.for_training(cfg, 0.1, 10)


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
@pytest.mark.parametrize(("up", "down"), [(5, 5), (7, 3)])
@pytest.mark.parametrize("cycle_momentum", [True, False])
def test_cyclic_equals_torchs_cyclic_lr_bit_for_bit(mode, up, down, cycle_momentum):
    params = torch.nn.Linear(1, 1).parameters()
    opt = torch.optim.SGD(params, lr=1.0, momentum=0.95)
    kw = dict(
        mode=mode, gamma=0.97, cycle_momentum=cycle_momentum, base_momentum=0.85, max_momentum=0.95
    )
    sched = torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=0.01, max_lr=0.4, step_size_up=up, step_size_down=down, **kw
    )
    for step in range(40):  # four cycles
        expected = (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"])
        ours = schedule.cyclic(
            step, 0.01, 0.4, step_size_up=float(up), step_size_down=float(down), **kw
        )
        assert ours == expected, step
        opt.step()
        sched.step()


def test_cyclic_training_schedule_cycles_every_cycle_epochs():
    cfg = TrainConfig(schedule="cyclic", epochs=8, cycle_epochs=4.0, max_lr=0.4, base_lr=0.04)
    f = schedule.for_training(cfg, 0.4, steps_per_epoch=10, base_lr=0.04)
    assert f(0) == pytest.approx((0.04, 0.95))  # floor, momentum at its top
    assert f(20) == pytest.approx((0.4, 0.85))  # half a cycle (2 epochs): peak
    assert f(40) == pytest.approx((0.04, 0.95))  # one cycle (4 epochs): back to the floor
    assert f(60) == pytest.approx((0.4, 0.85))


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"schedule": "cyclic", "epochs": 4, "cycle_epochs": 6}, "longer than training"),
        ({"schedule": "cyclic", "max_lr": 0.1, "base_lr": 0.2}, "must be below train.max_lr"),
        ({"schedule": "cyclic", "base_lr": 0.0}, "finite number > 0"),
    ],
)
def test_bad_cyclic_settings_are_refused_naming_the_key(train, message):
    from onecycle.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match=message) as err:
        parse_params({"train": train})
    assert "train." in str(err.value)
