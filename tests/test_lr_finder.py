import math

import numpy as np
import pytest

from onecycle import curves
from onecycle import lr_finder as lf
from onecycle.engine import select_device

# ------------------------------------------------------------------ smoothing


def test_ema_is_bias_corrected():
    # beta 0.5: avg 0.5 -> 1/0.5; 1.25 -> /0.75; 2.125 -> /0.875
    assert curves.ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])


# ------------------------------------------------------------------ stops


def _stepper(losses):
    it = iter(losses)
    return lambda lr: next(it)


def test_sweep_stops_on_nan_and_does_not_record_it():
    sweep = curves.run_sweep(
        _stepper([2.0, 1.9, float("nan"), 1.0]), [1e-3, 1e-2, 1e-1, 1.0], 0.9, 4.0
    )
    assert sweep.stop == "non-finite"
    assert sweep.lrs == [1e-3, 1e-2]
    assert all(math.isfinite(v) for v in sweep.smooth)


def test_sweep_stops_on_inf():
    sweep = curves.run_sweep(_stepper([2.0, float("inf"), 1.0]), [1, 2, 3], 0.9, 4.0)
    assert sweep.stop == "non-finite" and len(sweep.lrs) == 1


def test_sweep_stops_when_smoothed_loss_diverges():
    # beta 0: smoothed == raw. 10 > 4 * best (1.0) at the fourth step.
    sweep = curves.run_sweep(
        _stepper([2.0, 1.0, 1.5, 10.0, 0.5, 0.5]), [1, 2, 3, 4, 5, 6], 0.0, 4.0
    )
    assert sweep.stop == "diverged"
    assert sweep.lrs == [1, 2, 3, 4]


def test_sweep_runs_to_the_end_when_nothing_goes_wrong():
    sweep = curves.run_sweep(_stepper([3.0, 2.0, 1.0]), [1, 2, 3], 0.5, 4.0, val_loss=lambda: 0.25)
    assert sweep.stop == "completed" and sweep.val_losses == [0.25] * 3


# ------------------------------------------------------------------ suggestions on made-up curves

LRS = list(10 ** np.linspace(-4, 1, 101))


def _curve():
    """Flat at 2.0, a tanh-shaped fall centred on index 55 (steepest there), minimum at index 75,
    then a steep rise."""
    i = np.arange(101)
    loss = 2.0 - 0.5 * np.tanh((i - 55) / 5.0)
    loss[76:] += 0.2 * (i[76:] - 75)
    return list(loss)


def test_steepest_picks_the_steepest_fall():
    assert curves.suggest_steepest(LRS, _curve()) == LRS[55]


def test_min_div10_picks_a_tenth_of_the_minimum():
    assert curves.suggest_min_div10(LRS, _curve()) == pytest.approx(LRS[75] / 10, rel=1e-12)


def test_lower_bound_is_where_the_fall_starts_clearly():
    # Trimmed, the curve starts at index 10 (2.5, the tanh's floor) and falls to 1.5 at index 75:
    # a tenth of that fall is 2.4, first reached where tanh((i - 55) / 5) >= -0.8, i.e.
    # i >= 55 - 5 * atanh(0.8) = 49.5: index 50.
    assert curves.suggest_lower_bound(LRS, _curve()) == LRS[50]
    assert (
        curves.suggest_lower_bound(LRS, _curve(), fraction=0.5) == LRS[55]
    )  # half-way: the centre
    assert math.isnan(curves.suggest_lower_bound(LRS, list(np.linspace(2.0, 3.0, 101))))  # no fall


def test_valley_follows_fastai():
    # After fastai's trim (first 10 %, last 5) the curve is indices 10..95. The longest decreasing
    # run is 10..75 (66 points, trimmed 0..65): fastai's max_start = 65 - 66 = -1, sections = 22,
    # idx = -1 + 22 + 11 = 32 -> original index 42.
    assert curves.suggest_valley(LRS, _curve()) == LRS[42]


def test_valley_ignores_a_noisy_early_dip():
    loss = _curve()
    loss[12] = 1.0  # one freak low batch early on must not become the valley
    assert LRS[30] < curves.suggest_valley(LRS, loss) < LRS[70]


def test_choose_reports_median_min_and_max_over_seeds():
    per_seed = [
        {"valley": 0.1, "steepest": 0.3, "min_div10": 0.05, "lower_bound": 0.01},
        {"valley": 0.3, "steepest": 0.2, "min_div10": 0.06, "lower_bound": 0.02},
        {"valley": 0.2, "steepest": 0.1, "min_div10": 0.07, "lower_bound": 0.03},
    ]
    out = curves.choose(per_seed, "valley", (1e-4, 10))
    assert out["max_lr"] == out["valley"] == pytest.approx(0.2)
    assert (out["valley_min"], out["valley_max"]) == (0.1, 0.3)
    assert out["steepest"] == pytest.approx(0.2) and out["min_div10"] == pytest.approx(0.06)


def test_choose_refuses_a_value_outside_the_swept_range():
    with pytest.raises(curves.LRFindError, match="outside the swept range"):
        curves.choose(
            [{"valley": 50.0, "steepest": 1.0, "min_div10": 1.0, "lower_bound": 0.1}],
            "valley",
            (1e-4, 10),
        )
    with pytest.raises(curves.LRFindError):
        curves.choose(
            [{"valley": float("nan"), "steepest": 1.0, "min_div10": 1.0, "lower_bound": 0.1}],
            "valley",
            (1e-4, 10),
        )


def test_curve_diverging_from_the_start_is_refused_with_advice():
    sweep = curves.run_sweep(_stepper([2.0, 3.0, 50.0]), [1, 2, 3], 0.0, 4.0)
    with pytest.raises(curves.LRFindError, match="lr_find.start_lr"):
        curves.check_curve(sweep, 1e-4, 100, 0.0)


def test_flat_curve_is_refused_with_advice():
    sweep = curves.run_sweep(_stepper([2.3] * 50), LRS[:50], 0.9, 4.0)
    with pytest.raises(curves.LRFindError, match="end_lr"):
        curves.check_curve(sweep, 1e-4, 50, 0.9)


def test_rising_curve_is_refused():
    sweep = curves.run_sweep(_stepper(list(np.linspace(2.0, 3.0, 40))), LRS[:40], 0.0, 100.0)
    with pytest.raises(curves.LRFindError, match="no usable descent"):
        curves.check_curve(sweep, 1e-4, 40, 0.0)


# ------------------------------------------------------------------ the real range test


def test_range_test_on_real_cifar_gives_a_sane_suggestion(tiny_data, tiny_params):
    p = tiny_params
    cfg = p.lr_find.model_copy(update={"num_iter": 60, "val_images": 64})
    params = p.model_copy(update={"lr_find": cfg})
    sweep = lf.range_test(params, tiny_data, select_device("cpu", 0), seed=0)
    assert len(sweep.lrs) >= 20 and len(sweep.val_losses) == len(sweep.lrs)
    assert sweep.lrs[0] == pytest.approx(cfg.start_lr)
    curves.check_curve(sweep, cfg.start_lr, cfg.num_iter, cfg.smooth_beta)
    chosen = curves.choose([curves.suggestions(sweep)], "valley", (cfg.start_lr, sweep.lrs[-1]))[
        "max_lr"
    ]
    assert 1e-3 <= chosen <= 10


def test_find_sweeps_every_seed_and_records_each_curve(tiny_data, tiny_params):
    params = tiny_params.model_copy(
        update={
            "lr_find": tiny_params.lr_find.model_copy(
                update={"seeds": 2, "num_iter": 60, "smooth_beta": 0.9, "suggestion": "steepest"}
            )
        }
    )
    found = lf.find(params, tiny_data, select_device("cpu", 0))
    assert found.seeds == [0, 1] and len(found.per_seed) == 2
    rows = found.curve_rows()
    assert {r["seed"] for r in rows} == {0, 1}
    assert len(rows) == sum(len(s.lrs) for s in found.sweeps)
    metrics = found.metrics("steepest")
    picks = sorted(s["steepest"] for s in found.per_seed)
    assert metrics["max_lr"] == metrics["steepest"] == pytest.approx(sum(picks) / 2)
    assert (metrics["steepest_min"], metrics["steepest_max"]) == tuple(picks)
    assert metrics["seeds"] == 2 and metrics["method"] == "steepest"
    assert "max_lr = " in found.describe("steepest") and "seeds: " in found.describe("steepest")


def test_a_short_sweep_with_long_smoothing_names_smooth_beta():
    # 30 steps with beta 0.98 (a 50-step average): the raw loss falls 9% over six steps before
    # it rises, the smoothed one only 1%; a 5-step average shows the fall
    losses = [2.3] * 18 + list(np.linspace(2.3, 2.1, 6)) + [2.1, 2.4, 2.6, 3.2, 3.8, 4.4]
    sweep = curves.run_sweep(_stepper(losses), LRS[:30], 0.98, 100.0)
    with pytest.raises(
        curves.LRFindError, match=r"lr_find.smooth_beta 0.98 averages .* about 50 steps"
    ):
        curves.check_curve(sweep, 1e-4, 30, 0.98)
    smoothed = curves.run_sweep(_stepper(losses), LRS[:30], 0.8, 100.0)
    curves.check_curve(smoothed, 1e-4, 30, 0.8)  # the advice works


def test_a_sweep_too_short_to_read_says_so():
    sweep = curves.run_sweep(_stepper([2.3, 2.2, 2.1, 2.0, 1.9]), LRS[:5], 0.0, 4.0)
    with pytest.raises(curves.LRFindError, match="num_iter is 5: a curve needs at least 10 steps"):
        curves.check_curve(sweep, 1e-4, 5, 0.0)


def _with(params, section: str, **update):
    return params.model_copy(update={section: getattr(params, section).model_copy(update=update)})


def test_a_grid_sweeps_once_per_value_and_chooses_the_lowest_loss(tiny_data, tiny_params):
    params = _with(tiny_params, "lr_find", num_iter=60, smooth_beta=0.8, val_images=64)
    grid = lf.grid(params, tiny_data, select_device("cpu", 0), "momentum", [0.8, 0.95])
    summary = grid.summary()
    assert summary["values"] == [0.8, 0.95] and len(grid.sweeps) == 2
    lows = [min(s.val_losses) for s in grid.sweeps]  # the held-out curve, val_images > 0
    assert summary["min_loss"] == lows and summary["chosen"] == [0.8, 0.95][int(np.argmin(lows))]
    for diverged, sweep in zip(summary["diverged_at"], grid.sweeps, strict=True):
        assert diverged == (None if sweep.stop == "completed" else sweep.lrs[-1])
    rows = grid.rows()
    assert {r["value"] for r in rows} == {0.8, 0.95} and {r["grid"] for r in rows} == {"momentum"}
    assert "lowest loss" in summary["rule"]


def test_weight_decay_auto_runs_the_lr_sweep_with_the_grids_choice(tiny_data, tiny_params):
    dev = select_device("cpu", 0)
    params = _with(
        tiny_params, "lr_find", num_iter=40, smooth_beta=0.9, weight_decay_grid=[1e-4, 5e-3]
    )
    params = _with(params, "train", weight_decay="auto")
    found = lf.find(params, tiny_data, dev)
    chosen = found.metrics("steepest")["weight_decay"]
    assert (
        chosen in (1e-4, 5e-3)
        and found.metrics("steepest")["grids"]["weight_decay"]["chosen"] == chosen
    )
    again = lf.range_test(_with(params, "train", weight_decay=chosen), tiny_data, dev, seed=0)
    assert again.losses == found.sweeps[0].losses  # the same sweep: the choice was used
