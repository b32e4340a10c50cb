"""Studies: the study file's checks, and the numbers a report gives (the end-to-end run through
DVC and MLflow is tests/test_pipeline.py's, marked long)."""

import math

import pytest

from onecycle import study

GOOD = """
name: lr
description: fixed LRs
common: {model.width: 16}
settings:
  lr-0.01: {train.max_lr: 0.01}
  lr-0.1: {train.max_lr: 0.1}
picks: [valley]
seeds: [0, 1, 2]
figure: max_lr
"""


def _file(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_a_study_file_is_read_with_its_runs_named_for_finding_them_again(tmp_path):
    s = study.load(_file(tmp_path, GOOD))
    labels = ("lr-0.01", "lr-0.1", "pick-valley")
    assert s.runs() == [(lab, seed) for lab in labels for seed in (0, 1, 2)]
    assert s.exp_name("lr-0.1", 2) == "lr-lr-0.1-s2"
    # a pick is the pipeline's own choice with that suggestion method
    assert s.all_settings()["pick-valley"] == {
        "lr_find.suggestion": "valley",
        "train.max_lr": "auto",
    }
    assert study._set_args({"lr_find.momentum_grid": [0.9, 0.95], "train.max_lr": 0.1}) == [
        "-S", "lr_find.momentum_grid=[0.9, 0.95]", "-S", "train.max_lr=0.1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("name: lr", "name: LR study"), "name 'LR study' must be"),
        (("seeds: [0, 1, 2]", "seeds: []"), "seeds must be a list"),
        (("picks: [valley]", "picks: [fastest]"), "not suggestion methods"),
        (("figure: max_lr", "figure: pie"), "figure 'pie'"),
        (("  lr-0.1:", "  lr..1:"), "settings must map labels"),
        (("figure: max_lr", "figur: max_lr"), "unknown key"),
    ],
)
def test_a_bad_study_file_is_refused_naming_the_file_and_key(tmp_path, change, message):
    path = _file(tmp_path, GOOD.replace(*change))
    with pytest.raises(study.StudyError, match=message) as err:
        study.load(path)
    assert str(path) in str(err.value)


def _result(label, seed, acc, lr=0.1, seconds=10.0):
    return study.Result(label, seed, f"{label}{seed}", acc, lr, seconds, [acc / 2, acc])


def test_the_summary_is_mean_and_sample_std_per_setting():
    results = [
        _result("a", 0, 0.80),
        _result("a", 1, 0.82),
        _result("a", 2, 0.84),
        _result("b", 0, 0.5),
    ]
    a, b = study.summarize(results)
    assert (a["setting"], a["runs"]) == ("a", 3)
    assert a["accuracy_mean"] == pytest.approx(0.82) and a["accuracy_std"] == pytest.approx(0.02)
    assert b["runs"] == 1 and math.isnan(b["accuracy_std"])
    text = study.markdown(study.load_text(GOOD), [a, b], ["lr-lr-0.1-s2"], "lr.png", "a CPU")
    assert "| a | 3 | 82.00 ± 2.00 % |" in text and "| b | 1 | 50.00 ± n/a % |" in text
    assert "Not finished (left out): lr-lr-0.1-s2" in text and "Measured on a CPU" in text


@pytest.mark.parametrize("kind", ["epochs", "max_lr"])
def test_both_study_figures_draw(kind):
    from onecycle import figures

    results = [
        _result(lab, s, 0.5 + 0.1 * s, lr)
        for lab, lr in (("lr-0.1", 0.1), ("pick-valley", 0.05))
        for s in range(2)
    ]
    draw = figures.study_epochs_figure if kind == "epochs" else figures.study_lr_figure
    fig = draw(results, "t")
    assert fig.axes and fig.axes[0].get_title().startswith("Study t")


def test_queued_runs_share_the_cores_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(study.os, "cpu_count", lambda: 2)
    assert study.threads_env(2)["OMP_NUM_THREADS"] == "1"
    assert study.threads_env(1)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert study.threads_env(2)["OMP_NUM_THREADS"] == "3"
