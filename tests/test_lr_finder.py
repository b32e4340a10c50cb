import math

import numpy as np
import pytest

from onecycle.range_test import curves
from onecycle.range_test import lr_finder as lf
from onecycle.training.runtime import select_device

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
        {"min": 0.5, "valley": 0.1, "steepest": 0.3, "min_div10": 0.05, "lower_bound": 0.01},
        {"min": 0.6, "valley": 0.3, "steepest": 0.2, "min_div10": 0.06, "lower_bound": 0.02},
        {"min": 0.7, "valley": 0.2, "steepest": 0.1, "min_div10": 0.07, "lower_bound": 0.03},
    ]
    out = curves.choose(per_seed, "valley", (1e-4, 10))
    assert out["max_lr"] == out["valley"] == pytest.approx(0.2)
    assert (out["valley_min"], out["valley_max"]) == (0.1, 0.3)
    assert out["steepest"] == pytest.approx(0.2) and out["min_div10"] == pytest.approx(0.06)


def test_choose_refuses_a_value_outside_the_swept_range():
    with pytest.raises(curves.LRFindError, match="outside the swept range"):
        curves.choose(
            [{"min": 1.0, "valley": 50.0, "steepest": 1.0, "min_div10": 1.0, "lower_bound": 0.1}],
            "valley",
            (1e-4, 10),
        )
    with pytest.raises(curves.LRFindError):
        curves.choose(
            [{"min": 1, "valley": float("nan"), "steepest": 1, "min_div10": 1, "lower_bound": 0.1}],
            "valley",
            (1e-4, 10),
        )


def test_curve_diverging_from_the_start_is_refused_with_advice():
    sweep = curves.run_sweep(_stepper([2.0, 3.0, 50.0]), [1, 2, 3], 0.0, 4.0)
    with pytest.raises(curves.LRFindError, match="lr_find.start_lr"):
        curves.check_curve(sweep, 1e-4, 100)


def test_flat_curve_is_refused_with_advice():
    sweep = curves.run_sweep(_stepper([2.3] * 50), LRS[:50], 0.9, 4.0)
    with pytest.raises(curves.LRFindError, match="end_lr"):
        curves.check_curve(sweep, 1e-4, 50)


def test_rising_curve_is_refused():
    sweep = curves.run_sweep(_stepper(list(np.linspace(2.0, 3.0, 40))), LRS[:40], 0.0, 100.0)
    with pytest.raises(curves.LRFindError, match="no usable descent"):
        curves.check_curve(sweep, 1e-4, 40)


# ------------------------------------------------------------------ the real range test


def test_range_test_on_real_cifar_gives_a_sane_suggestion(tiny_data, tiny_params):
    p = tiny_params
    cfg = p.lr_find.model_copy(update={"num_iter": 60, "val_images": 64})
    params = p.model_copy(update={"lr_find": cfg})
    sweep = lf.range_test(params, tiny_data, select_device("cpu", 0), seed=0)
    assert len(sweep.lrs) >= 20 and len(sweep.val_losses) == len(sweep.lrs)
    assert sweep.lrs[0] == pytest.approx(cfg.start_lr)
    curves.check_curve(sweep, cfg.start_lr, cfg.num_iter)
    chosen = curves.choose([curves.suggestions(sweep)], "valley", (cfg.start_lr, sweep.lrs[-1]))[
        "max_lr"
    ]
    assert 1e-3 <= chosen <= 10


def test_the_sweep_as_it_ran_reads_as_the_pipelines_curve(tiny_data, tiny_params):
    """What make bench-lr stores (read=False: every raw loss up to the stop) is what the
    pipeline reads once reread: the same steps, losses and curve."""
    cfg = tiny_params.lr_find.model_copy(update={"num_iter": 40, "end_lr": 100.0})
    params = tiny_params.model_copy(update={"lr_find": cfg})
    dev = select_device("cpu", 0)
    read = lf.range_test(params, tiny_data, dev, seed=0)
    ran = lf.range_test(params, tiny_data, dev, seed=0, read=False)
    assert len(ran.losses) >= len(read.losses) and ran.losses[: len(read.losses)] == read.losses
    again = ran.reread(cfg.smooth, cfg.smooth_window, cfg.diverge_factor)
    assert (again.lrs, again.losses, again.stop) == (read.lrs, read.losses, read.stop)
    assert again.smooth == pytest.approx(read.smooth, rel=1e-12)


def test_find_sweeps_every_seed_and_records_each_curve(tiny_data, tiny_params):
    params = tiny_params.model_copy(
        update={
            "lr_find": tiny_params.lr_find.model_copy(
                update={"seeds": 2, "num_iter": 60, "suggestion": "steepest"}
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


def test_a_pick_stays_its_margin_below_where_the_sweep_blew_up(tiny_data, tiny_params):
    """Run on to LR 100 the tiny model's loss climbs back above its start; the default pick (the
    minimum) is then at most that LR / lr_find.blowup_margin, and says so."""
    cfg = tiny_params.lr_find.model_copy(update={"num_iter": 40, "end_lr": 100.0, "seeds": 1})
    dev = select_device("cpu", 0)
    runs = {
        m: lf.find(
            tiny_params.model_copy(update={"lr_find": cfg.model_copy(update={"blowup_margin": m})}),
            tiny_data,
            dev,
        )
        for m in (0, 100)
    }
    off, on = (runs[m].metrics("min") for m in (0, 100))
    assert off["blowup"] == on["blowup"] is not None  # the same sweep, read alike
    assert off["min"] > on["blowup"] / 100  # uncapped, the minimum lies within 100x of it
    assert on["max_lr"] == on["min"] == pytest.approx(on["blowup"] / 100, rel=1e-12)
    assert f"cap {on['blowup'] / 100:.3g} (blow-up / 100)" in runs[100].describe("min")
    assert "cap" not in runs[0].describe("min")


def test_a_short_sweep_is_smoothed_to_fit_not_refused():
    # 30 steps: the raw loss falls 9% over six steps, then rises. The old fixed EMA (beta 0.98,
    # a 50-step average) showed a 1% fall and refused the curve; a window of 0.2 of the sweep
    # (6 steps, centered) shows the fall where it is, and the minimum's LR is read there.
    losses = [2.3] * 18 + list(np.linspace(2.3, 2.1, 6)) + [2.1, 2.4, 2.6, 3.2, 3.8, 4.4]
    old = curves.run_sweep(_stepper(losses), LRS[:30], 0.98, 100.0)
    assert min(old.smooth[3:]) > 0.98 * old.smooth[3]  # the lagging average hid the fall
    sweep = curves.run_sweep(_stepper(losses), LRS[:30], 1 - 1 / 6, 100.0).reread(
        "centered", 0.2, 100.0
    )
    curves.check_curve(sweep, 1e-4, 30)
    assert sweep.smooth == pytest.approx(curves.centered(losses, 3.0))
    # the raw minimum is at steps 23-24, just before the steep rise; the smoothed one at 20
    assert curves.suggest_min(sweep.lrs, sweep.smooth) == LRS[20]


def test_reread_smooths_the_raw_losses_and_cuts_where_that_curve_diverges():
    # window 0.2 of 10 steps = 2 steps: sigma 1; the EMA over 2 steps is beta 0.5
    losses = [2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 1.2, 3.0, 9.0, 20.0]
    sweep = curves.Sweep(list(range(1, 11)), losses, [0.0] * 10, [], "completed")
    centered = curves.centered(losses, 1.0)
    assert 9.0 > 4.0 * min(centered[:9])  # 9.0 and 20.0 blew up: left out of the curve read
    read = sweep.reread("centered", 0.2, 4.0)
    assert read.smooth == pytest.approx(curves.centered(losses[:8], 1.0))
    assert read.lrs == list(range(1, 9)) and read.losses == losses[:8]
    assert read.stop == "diverged"
    ema_cut = curves.Sweep(list(range(1, 11)), losses).reread("ema", 0.2, 4.0)
    ema = curves.ema(losses, 0.5)  # causal: nothing leaks back; cut after the first step past 4x
    first = next(i for i, v in enumerate(ema) if v > 4.0 * min(ema[: i + 1]))
    assert ema_cut.smooth == pytest.approx(ema[: first + 1])
    assert sweep.reread("ema", 0.2, 100.0).smooth == pytest.approx(curves.ema(losses, 0.5))
    assert sweep.reread("ema", 0.2, 100.0).stop == "completed"


def test_a_blown_up_last_loss_does_not_move_the_centered_minimum():
    # a flat V with its minimum at step 60 of 101, then the step that blew up: 2,000, as on
    # mobilenet_v3_small. Smoothed with it, the window (sigma 10) carries it back and the
    # minimum moves left; smoothed without it, it stays at 60.
    losses = [1.9 + 0.005 * abs(i - 60) for i in range(101)] + [2000.0]
    lrs = list(np.geomspace(1e-4, 10, 102))
    assert int(np.argmin(curves.centered(losses, curves.window(102, 0.2) / 2))) == 56
    read = curves.Sweep(lrs, losses).reread("centered", 0.2, 4.0)
    assert read.stop == "diverged" and read.losses == losses[:101]
    assert read.smooth == pytest.approx(curves.centered(losses[:101], curves.window(101, 0.2) / 2))
    assert curves.suggest_min(read.lrs, read.smooth) == lrs[60]


def test_min_picks_the_minimum_itself():
    assert curves.suggest_min(LRS, _curve()) == pytest.approx(LRS[75], rel=1e-12)
    assert curves.suggest_min(LRS, _curve(), divisor=4) == pytest.approx(LRS[75] / 4, rel=1e-12)


def test_a_sweep_too_short_to_read_says_so():
    sweep = curves.run_sweep(_stepper([2.3, 2.2, 2.1, 2.0, 1.9]), LRS[:5], 0.0, 4.0)
    with pytest.raises(curves.LRFindError, match="num_iter is 5: a curve needs at least 10 steps"):
        curves.check_curve(sweep, 1e-4, 5)


def _with(params, section: str, **update):
    return params.model_copy(update={section: getattr(params, section).model_copy(update=update)})


def test_a_grid_sweeps_once_per_value_and_chooses_the_lowest_loss(tiny_data, tiny_params):
    params = _with(tiny_params, "lr_find", num_iter=60, val_images=64)
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
    params = _with(tiny_params, "lr_find", num_iter=40, weight_decay_grid=[1e-4, 5e-3])
    params = _with(params, "train", weight_decay="auto")
    found = lf.find(params, tiny_data, dev)
    chosen = found.metrics("steepest")["weight_decay"]
    assert (
        chosen in (1e-4, 5e-3)
        and found.metrics("steepest")["grids"]["weight_decay"]["chosen"] == chosen
    )
    again = lf.range_test(_with(params, "train", weight_decay=chosen), tiny_data, dev, seed=0)
    assert again.losses == found.sweeps[0].losses  # the same sweep: the choice was used


def test_every_suggestion_params_yaml_accepts_has_a_reader():
    from onecycle.config import SUGGESTIONS

    assert list(curves.SUGGESTERS) == [*SUGGESTIONS, "lower_bound"]
