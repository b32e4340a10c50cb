"""The LR-choice benchmark's pieces on made-up numbers: the new curve readers and smoothers
(exact values, as the other suggestion tests), and the offline scoring (regret interpolated on
log LR, spread, the median of several sweeps, the choice and its leave-one-scenario-out check).
The benchmark itself (hours of CPU) is `make bench-lr`, never run here."""

import json
import math
import re

import numpy as np
import pytest

from onecycle.commands import lrbench_report, lrbench_score, lrbench_spec
from onecycle.range_test import curves

from .test_lr_finder import LRS, _curve


def test_min_is_the_extremum_and_divides_by_k():
    assert curves.suggest_min(LRS, _curve()) == LRS[75]
    assert curves.suggest_min(LRS, _curve(), divisor=3) == pytest.approx(LRS[75] / 3, rel=1e-12)


def test_blowup_is_where_the_loss_climbs_back_above_its_start():
    # Trimmed, the curve starts at index 10 (2.5 - 1.5e-8). Past the minimum (75) the loss is
    # 1.5 + 0.2 (i - 75) give or take the tanh's last 1e-4: 2.30 at 79, 2.50005 at 80.
    assert curves.suggest_blowup(LRS, _curve(), divisor=1) == LRS[80]
    with pytest.raises(curves.LRFindError, match="never climbed back.*lr_find.end_lr"):
        curves.suggest_blowup(LRS, list(np.linspace(3, 2, 101)), divisor=1)


def test_the_cap_keeps_a_pick_its_margin_below_the_blowup():
    # The curve climbs back above its start at LRS[80] (see above); LRS[75] / LRS[80] = 10^-0.25
    blowup = curves.blowup_lr(LRS, _curve())
    assert blowup == LRS[80]
    assert curves.cap(LRS[75], blowup, 12) == pytest.approx(LRS[80] / 12, rel=1e-12)
    assert curves.cap(LRS[75], blowup, 1.5) == LRS[75]  # 1.5 x LRS[75] is below LRS[80]
    assert curves.cap(LRS[75], blowup, 0) == LRS[75]  # 0: off
    never = list(np.linspace(3, 2, 101))  # still falling at the end: no blow-up, no cap
    assert np.isnan(curves.blowup_lr(LRS, never))
    assert curves.cap(0.5, curves.blowup_lr(LRS, never), 12) == 0.5
    # the same curve where the sweep stopped on a blown-up loss after step 60: the losses that
    # blew up are not in the curve read, so the blow-up is its last LR
    assert curves.blowup_lr(LRS[:61], never[:61], "diverged") == LRS[60]
    assert curves.blowup_lr(LRS[:61], never[:61], "non-finite") == LRS[60]


def test_suggestions_cap_every_max_lr_but_not_the_floor():
    sweep = curves.Sweep(LRS, _curve(), _curve())
    plain, capped = curves.suggestions(sweep), curves.suggestions(sweep, margin=12)
    assert capped["blowup"] == plain["blowup"] == LRS[80]
    assert capped["min"] == pytest.approx(LRS[80] / 12, rel=1e-12) and plain["min"] == LRS[75]
    assert capped["min_div10"] == plain["min_div10"]  # LRS[75] / 10 is below LRS[80] / 12
    assert capped["lower_bound"] == plain["lower_bound"]
    out = curves.choose([capped, plain | {"blowup": math.nan}], "min", (1e-4, 10))
    assert out["blowup"] == LRS[80]  # the median of the sweeps that climbed back
    falling = list(np.linspace(3, 2, 61))  # stopped on a blow-up the curve read leaves out
    cut = curves.suggestions(curves.Sweep(LRS[:61], falling, falling, stop="diverged"), 12)
    assert cut["blowup"] == LRS[60] and cut["min"] == pytest.approx(LRS[60] / 12, rel=1e-12)
    none = curves.choose([plain | {"blowup": math.nan}], "min", (1e-4, 10))
    assert none["blowup"] is None and none["blowup_min"] is None  # null in the JSON, not NaN


def test_slide_follows_fastai():
    # After the trim (indices 10..95) the end rises at a constant 0.2 a step: the gradient at 95
    # equals the one 15 steps left, at 80, so the rule stops at once there.
    assert curves.suggest_slide(LRS, _curve()) == LRS[80]


def test_centred_smoothing_does_not_lag_where_the_ema_does():
    parabola = [(i - 30) ** 2 / 100 for i in range(61)]
    assert int(np.argmin(curves.centered(parabola, 4))) == 30
    assert int(np.argmin(curves.ema(parabola, 0.8))) > 30  # the EMA's minimum comes late
    assert curves.centered([2.0] * 10, 3) == pytest.approx([2.0] * 10)


def test_the_window_follows_the_sweep_length():
    assert curves.window(100, 0.1) == 10 and curves.window(10, 0.1) == 2
    assert curves.smooth([1.0, 2.0, 3.0], "ema", 0.1) == curves.ema([1.0, 2.0, 3.0], 0.5)
    with pytest.raises(ValueError, match="unknown smoothing"):
        curves.smooth([1.0], "spline", 0.1)


# ---------------------------------------------------------------- scoring, on known numbers


def _results(table: dict[float, list[float]]) -> list[dict]:
    """Grid results: per max LR, the validation accuracy of each seed (test = val - 0.01)."""
    return [
        {"max_lr": lr, "val_accuracy": v, "accuracy": v - 0.01, "seed": s}
        for lr, vals in table.items()
        for s, v in enumerate(vals)
    ]


CURVE = lrbench_score.Curve.from_results(
    _results({0.1: [0.70, 0.72], 0.4: [0.80, 0.84], 1.6: [0.60, 0.60]})
)


def test_a_grid_with_more_seeds_at_some_lrs_says_where_in_the_report():
    from onecycle.commands import lrbench_report

    curve = lrbench_score.Curve.from_results(
        _results({0.1: [0.70, 0.72], 0.2: [0.8, 0.8, 0.9, 0.7], 0.4: [0.8, 0.8, 0.9, 0.7]})
    )
    assert curve.seeds == 2 and curve.runs.tolist() == [2, 4, 4]
    assert curve.val_mean[1] == pytest.approx(0.8)  # the mean of its 4 seeds
    assert lrbench_report._runs(curve) == "3 LRs x 2; x 4 at 0.2, 0.4"
    assert lrbench_report._runs(CURVE) == "3 LRs x 2"


def test_the_grid_curve_is_the_mean_over_seeds_interpolated_on_log_lr():
    assert CURVE.val_mean.tolist() == pytest.approx([0.71, 0.82, 0.60])
    assert CURVE.val_std[1] == pytest.approx(np.std([0.80, 0.84], ddof=1))
    assert CURVE.best == 1 and CURVE.seeds == 2 and CURVE.runs.tolist() == [2, 2, 2]
    assert CURVE.at(0.2) == pytest.approx((0.71 + 0.82) / 2)  # half-way on a log axis
    assert CURVE.at(0.8, "test") == pytest.approx((0.81 + 0.59) / 2)
    assert CURVE.at(0.01) == pytest.approx(0.71)  # beyond the grid: its end point
    assert CURVE.regret(0.4) == 0 and CURVE.regret(0.2) == pytest.approx(5.5)
    assert lrbench_score.tolerance(CURVE) == pytest.approx(100 * np.std([0.80, 0.84], ddof=1))


def test_a_rule_is_scored_by_its_picks_spread_and_regret():
    got = lrbench_score.score_rule(CURVE, [0.2, 0.4, 0.8])
    assert got["spread"] == pytest.approx(4.0) and got["median_pick"] == 0.4
    assert got["regret_mean"] == pytest.approx((5.5 + 0 + 11.0) / 3)
    assert got["regret_max"] == pytest.approx(11.0) and got["failed"] == 0
    failed = lrbench_score.score_rule(CURVE, [0.4, float("nan")])
    assert failed["failed"] == 1 and failed["regret_mean"] == float("inf")


def test_the_defaults_own_runs_are_set_against_the_grid():
    runs = [
        {"max_lr": 0.2, "val_accuracy": 0.78, "accuracy": 0.77},
        {"max_lr": 0.4, "val_accuracy": 0.82, "accuracy": 0.80},
        {"max_lr": 0.4, "val_accuracy": 0.80, "accuracy": 0.81},
    ]
    grid = _results({0.1: [0.70, 0.72], 0.4: [0.80, 0.84], 1.6: [0.60, 0.60]})
    got = lrbench_score.confirmed(CURVE, [r | {"seed": s} for s, r in enumerate(runs)], grid)
    assert got["picks"] == [0.2, 0.4, 0.4] and got["runs"] == 3
    assert got["val_mean"] == pytest.approx(80.0) and got["val_std"] == pytest.approx(2.0)
    assert got["test_mean"] == pytest.approx(79.333, abs=1e-3)
    assert got["interpolated"] == pytest.approx((76.5 + 82 + 82) / 3)  # at 0.2: half-way
    assert got["regret"] == pytest.approx(82.0 - 80.0)
    assert got["test_regret"] == pytest.approx(81.0 - 79.333, abs=1e-3)  # 0.4's test: val - 1
    # seeds 0 and 1 ran in the grid too: 0.80 - 0.78 and 0.84 - 0.82 at its best LR, 0.4
    assert got["paired_regret"] == pytest.approx(2.0) and got["paired_seeds"] == 2


# Symmetric about its minimum at index 60 (LR 0.1), so centred smoothing keeps it there.
PARABOLA = [1 + (i - 60) ** 2 / 1000 for i in range(101)]


def test_picks_read_each_stored_sweep_and_take_medians_of_groups():
    sweeps = [
        {"seed": s, "num_iter": 101, "lrs": LRS, "losses": PARABOLA, "val_losses": PARABOLA}
        for s in range(4)
    ]
    sweeps.append({"seed": 0, "num_iter": 50, "lrs": LRS[:50], "losses": [1.0] * 50})
    rule = lrbench_score.rule(curves.suggest_min, "centered", 0.1, divisor=2)
    assert lrbench_score.picks(sweeps, rule, 101) == pytest.approx([LRS[60] / 2] * 4)
    assert lrbench_score.picks(sweeps, rule, 101, median_of=3) == pytest.approx([LRS[60] / 2])
    lagging = lrbench_score.legacy(curves.suggest_min_div10)  # EMA 0.98: its minimum comes late
    assert lrbench_score.picks(sweeps, lagging, 101)[0] > LRS[60] / 10


def test_the_default_is_the_lowest_worst_case_regret_and_each_scenario_is_held_out():
    scores = {
        "a": {"s1": {"regret_mean": 0.1}, "s2": {"regret_mean": 2.0}, "s3": {"regret_mean": 0.1}},
        "b": {"s1": {"regret_mean": 0.6}, "s2": {"regret_mean": 0.7}, "s3": {"regret_mean": 0.5}},
    }
    best, held_out = lrbench_score.choose_default(scores)
    assert best == "b"  # a is better on average, but 2 points off on s2
    assert held_out == {"s1": "b", "s2": "a", "s3": "b"}


def test_a_tie_on_the_worst_case_goes_to_the_lower_mean_not_the_name():
    scores = {  # both lose 0.6 on s2, where they read alike; "b" loses less elsewhere
        "a": {"s1": {"regret_mean": 0.5}, "s2": {"regret_mean": 0.6}, "s3": {"regret_mean": 0.4}},
        "b": {"s1": {"regret_mean": 0.1}, "s2": {"regret_mean": 0.6}, "s3": {"regret_mean": 0.2}},
    }
    best, held_out = lrbench_score.choose_default(scores)
    assert best == "b" and held_out == {"s1": "b", "s2": "b", "s3": "b"}


def test_a_scenario_file_becomes_a_study_of_its_grid(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: quick\ncommon: {model.width: 16}\ngrid: [0.1, 0.2]\nseeds: [0, 1]\n"
        "sweeps: {seeds: 3, lengths: [50]}\n"
    )
    scenario = lrbench_spec.load(path)
    s = scenario.study()
    assert s.name == "lrc-quick" and s.runs() == [
        (lab, seed) for lab in ("lr-0.1", "lr-0.2") for seed in (0, 1)
    ]
    assert s.all_settings()["lr-0.2"] == {"train.max_lr": 0.2} and s.figure == "max_lr"
    path.write_text("name: x\ngrid: [0.2, 0.1]\n")
    with pytest.raises(lrbench_spec.BenchError, match="increasing"):
        lrbench_spec.load(path)
    for text, message in (
        ("sweep: {}", "sweep: unknown key; the keys here are name, description, common, grid"),
        ("sweeps: {length: [50]}", "sweeps.length: unknown key; the keys here are seeds, lengths"),
        ("sweeps: {seeds: 0}", "sweeps.seeds: Input should be greater than or equal to 1"),
        ("seeds: [0, -1]", "seeds.1: Input should be greater than or equal to 0"),
    ):
        path.write_text(f"name: x\ngrid: [0.1, 0.2]\n{text}\n")
        with pytest.raises(lrbench_spec.BenchError, match=re.escape(message)) as err:
            lrbench_spec.load(path)
        assert str(path) in str(err.value)


def test_more_seeds_run_at_their_grid_points_only_and_resume(tmp_path, monkeypatch):
    """``more_seeds`` added to a grid already run: only the new seeds at those LRs are queued
    (and the LRs not yet run), each part with plain overrides; the report counts them."""
    from onecycle.commands import lrbench, study, study_report

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text("name: peak\ngrid: [0.1, 0.2, 0.4]\nmore_seeds: {seeds: [2], at: [0.2]}\n")
    scenario = lrbench_spec.load(path)
    assert scenario.study().runs() == [
        ("lr-0.1", 0), ("lr-0.1", 1), ("lr-0.2", 0), ("lr-0.2", 1), ("lr-0.2", 2),
        ("lr-0.4", 0), ("lr-0.4", 1),
    ]  # fmt: skip

    def result(label, seed):
        lr = float(label[3:])
        return study_report.RunResult(label, seed, "r", 0.7, lr, 10.0, [0.7], [1], 0.7, 100.0)

    before = [result(f"lr-{lr}", seed) for lr in (0.1, 0.2) for seed in (0, 1)]
    (scenario.out / "grid").mkdir(parents=True)
    (scenario.out / "grid" / "results.json").write_text(json.dumps([r.__dict__ for r in before]))
    queued = []

    def run(part, repo):
        queued.append((part.settings, part.seeds))
        return []

    def collect(part, repo):
        return [result(label, seed) for label in part.settings for seed in part.seeds], []

    monkeypatch.setattr(study, "run", run)
    monkeypatch.setattr(study_report, "collect", collect)
    text = lrbench.run_grid(scenario, tmp_path).read_text()
    assert queued == [
        ({"lr-0.2": {"train.max_lr": 0.2}}, [2]),
        ({"lr-0.4": {"train.max_lr": 0.4}}, [0, 1]),
    ]
    assert "seeds [0, 1]; seeds [0, 1, 2] at lr-0.2. Measured on" in text
    assert "| lr-0.2 | 3 |" in text and "| lr-0.4 | 2 |" in text
    for more, message in (
        ("{seeds: [2], at: [0.3]}", "more_seeds.at: [0.3] not in the grid [0.1, 0.2, 0.4]"),
        ("{seeds: [1, 2], at: [0.2]}", "more_seeds.seeds: repeat some of seeds [0, 1]"),
    ):
        path.write_text(f"name: peak\ngrid: [0.1, 0.2, 0.4]\nmore_seeds: {more}\n")
        with pytest.raises(lrbench_spec.BenchError, match=re.escape(message)):
            lrbench_spec.load(path)


def test_the_refine_confirmation_probes_a_sixteenth_of_the_scenarios_training():
    scenario = lrbench_spec.Scenario(
        name="quick", common={"train.epochs": 5}, grid=[0.1, 0.2], sweeps={"lengths": [50, 150]}
    )
    plain, probed = scenario.confirm_study(), scenario.confirm_study(refine=4)
    assert (plain.name, probed.name) == ("lrc-quick-auto", "lrc-quick-refine")
    assert probed.common == plain.common | {"lr_find.refine": 4, "lr_find.refine_epochs": 5 / 16}
    assert plain.common["lr_find.num_iter"] == 150 and "lr_find.refine" not in plain.common
    assert list(probed.settings) == ["refine"] and probed.seeds == [0, 1, 2]


def test_the_report_is_written_from_stored_grids_and_sweeps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scenario = lrbench_spec.Scenario(
        name="made-up", common={"lr_find.num_iter": 101}, grid=[0.1, 0.4, 1.6]
    )
    (scenario.out / "grid").mkdir(parents=True)
    grid = _results({0.0001: [0.5, 0.5], 0.01: [0.7, 0.7], 1.0: [0.6, 0.6]})
    (scenario.out / "grid" / "results.json").write_text(json.dumps(grid))
    sweep = {"num_iter": 101, "lrs": LRS, "losses": PARABOLA, "val_losses": PARABOLA}
    lrbench_spec.sweeps_path(scenario).write_text(
        json.dumps([sweep | {"seed": s} for s in range(3)])
    )
    text = lrbench_report.report([scenario], tmp_path / "out").read_text()
    assert "| made-up | 3 LRs x 2 | 0.01 | 70.00 ± 0.00 % | 0.50 |" in text
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    smith = scores["scores"]["min/1 (centered 0.05)"]["made-up"]
    assert smith["median_pick"] == pytest.approx(0.1) and smith["spread"] == 1.0
    assert smith["regret_mean"] == pytest.approx(100 * (0.7 - 0.65))  # 0.1: half-way 0.01..1
    assert (tmp_path / "out" / "made-up.png").exists()


def test_a_grid_report_comes_from_stored_results_and_lists_what_is_missing(tmp_path, monkeypatch):
    """A grid resumed in another clone or session: its report is written from the stored
    results alone (no MLflow store), the runs not yet done named."""
    from onecycle.commands import study_report

    monkeypatch.chdir(tmp_path)
    scenario = lrbench_spec.Scenario(name="made-up", grid=[0.1, 0.4])
    (scenario.out / "grid").mkdir(parents=True)
    stored = [
        study_report.RunResult(
            f"lr-{lr:g}", seed, f"r{lr}{seed}", acc, lr, 10.0, [acc], [1], None, 100.0
        )
        for lr, seed, acc in ((0.1, 0, 0.70), (0.1, 1, 0.72), (0.4, 1, 0.80))
    ]
    text = lrbench_report.grid_report(
        scenario, scenario.study(), stored[::-1], tmp_path
    ).read_text()
    assert "| lr-0.1 | 2 | 71.00 ± 1.41 % |" in text and "| lr-0.4 | 1 | 80.00 ± n/a % |" in text
    assert text.index("| lr-0.1 |") < text.index("| lr-0.4 |")
    assert "Not finished (left out): lrc-made-up-lr-0.4-s0" in text
    assert (scenario.out / "grid" / "lrc-made-up.png").exists()


def test_the_rule_the_report_calls_the_default_is_params_yamls():
    """The report marks PIPELINE_DEFAULT as the pipeline's default: it must read lr_find's
    defaults (suggestion, smoothing, window, blow-up margin, seeds), whatever the scores rank
    first."""
    from onecycle.config import LRFindConfig

    d = LRFindConfig()
    seeds = "median of 3" if d.seeds == 3 else f"{d.seeds} seeds"
    cap = f" capped at blowup/{d.blowup_margin:g}" if d.blowup_margin else ""
    want = f"{d.suggestion}/1 ({d.smooth} {d.smooth_window:g}){cap}, long sweep, {seeds}"
    assert lrbench_score.PIPELINE_DEFAULT == want
    assert want.rsplit(", ", 2)[0] in lrbench_score.candidates()
