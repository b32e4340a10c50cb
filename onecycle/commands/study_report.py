"""A study's report, from the MLflow store: each run's results, the summary per setting, the
markdown table and figure, and the parent run that groups the study in the UI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from onecycle.commands import study_queue, study_spec
from onecycle.redact import redact, redact_values
from onecycle.tracking import connect, provenance


@dataclass
class RunResult:
    label: str
    seed: int
    run_id: str
    accuracy: float  # eval/accuracy: the full test split, as evaluate measured it
    max_lr: float
    seconds: float  # training time (the epochs' sum)
    test_acc: list[float]  # per test-set look (monitoring): every train.eval_every epochs
    test_epochs: list[int] = field(default_factory=list)  # the epoch of each look (1-based)
    val_accuracy: float | None = None  # the validation split's, at the end (data.val_images)
    images_per_sec: float | None = None  # training throughput, the epochs' mean
    wall_seconds: float | None = None  # lr_find's start (or train's) to evaluate's last log
    epochs: int | None = None


def latest_train_runs(repo: Path, names: set[str]):
    """(client, {experiment name: its latest finished, evaluated train run}) for ``names``, on
    the current commit, from the MLflow store."""
    import mlflow

    exp_id = connect.setup(repo.resolve())
    client = mlflow.MlflowClient()
    query = (
        f"tags.`dvc.stage` = 'train' and attributes.status = 'FINISHED' and "
        f"tags.`dvc.exp_baseline_rev` = '{study_queue.baseline_rev(repo)}'"
    )
    latest = {}
    for r in client.search_runs(
        [exp_id], query, order_by=["attributes.start_time DESC"], max_results=5000
    ):
        name = r.data.tags.get("dvc.exp_name")
        if name in names and name not in latest and "eval/accuracy" in r.data.metrics:
            latest[name] = r
    return client, latest


def collect(study: study_spec.Study, repo: Path = Path(".")) -> tuple[list[RunResult], list[str]]:
    """The study's train runs on the current commit from the MLflow store (the latest finished
    run of each experiment name), and the names that have none yet."""
    wanted = {study.exp_name(label, seed): (label, seed) for label, seed in study.runs()}
    client, latest = latest_train_runs(repo, set(wanted))
    results = []
    for name, r in latest.items():
        label, seed = wanted[name]
        history = client.get_metric_history(r.info.run_id, "test/accuracy")
        seconds = client.get_metric_history(r.info.run_id, "speed/epoch_seconds")
        speed = client.get_metric_history(r.info.run_id, "speed/images_per_sec")
        results.append(
            RunResult(
                label,
                seed,
                r.info.run_id,
                r.data.metrics["eval/accuracy"],
                float(r.data.params["max_lr_used"]),
                sum(m.value for m in seconds),
                [m.value for m in sorted(history, key=lambda m: m.step)],
                sorted(m.step for m in history),
                r.data.metrics.get("val/accuracy"),
                sum(m.value for m in speed) / len(speed) if speed else None,
                _wall_seconds(client, r),
                len(seconds),
            )
        )
    order = list(wanted)  # the study's order: settings, then picks; seeds within
    results.sort(key=lambda r: order.index(study.exp_name(r.label, r.seed)))
    return results, [n for n in order if n not in latest]


def _wall_seconds(client, train_run) -> float | None:
    """The experiment's time from its range test's start (its train run's, when lr_find came
    from DVC's run cache) to evaluate's last metric in the train run: MLflow's timestamps."""
    start = train_run.info.start_time
    lr_run = train_run.data.tags.get("lr_find_run_id")
    if lr_run and lr_run != "none":
        try:
            start = min(start, client.get_run(lr_run).info.start_time)
        except Exception:  # noqa: BLE001 - a run deleted from the store: train's start then
            pass
    ends = [m.timestamp for m in client.get_metric_history(train_run.info.run_id, "eval/accuracy")]
    end = max([train_run.info.end_time or 0, *ends])
    return (end - start) / 1000 if end > start else None


def summarize(results: list[RunResult]) -> list[dict]:
    """Per setting, in first-seen order: runs, mean and sample std of the test accuracy, mean
    max LR and training seconds."""
    import numpy as np

    rows = []
    for label in dict.fromkeys(r.label for r in results):
        mine = [r for r in results if r.label == label]
        acc = np.array([r.accuracy for r in mine])
        val = np.array([r.val_accuracy for r in mine if r.val_accuracy is not None])
        rows.append(
            {
                "setting": label,
                "runs": len(mine),
                "accuracy_mean": float(acc.mean()),
                "accuracy_std": float(acc.std(ddof=1)) if len(mine) > 1 else float("nan"),
                "val_accuracy_mean": float(val.mean()) if len(val) else None,
                "val_accuracy_std": float(val.std(ddof=1)) if len(val) > 1 else float("nan"),
                "max_lr_mean": float(np.mean([r.max_lr for r in mine])),
                "max_lr_min": min(r.max_lr for r in mine),
                "max_lr_max": max(r.max_lr for r in mine),
                "seconds_mean": float(np.mean([r.seconds for r in mine])),
                "epoch_seconds": _mean([r.seconds / r.epochs for r in mine if r.epochs]),
                "images_per_sec": _mean([r.images_per_sec for r in mine]),
                "wall_seconds": _mean([r.wall_seconds for r in mine]),
            }
        )
    return rows


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _own_seeds(study: study_spec.Study) -> str:
    """Where settings give seeds of their own: "; seeds [0, 1, 2] at lr-0.1, lr-0.2 and lr-0.4"."""
    by_seeds: dict[str, list[str]] = {}
    for label, seeds in study.setting_seeds.items():
        by_seeds.setdefault(str(seeds), []).append(label)
    listed = {k: ", ".join(v[:-1]) + " and " * (len(v) > 1) + v[-1] for k, v in by_seeds.items()}
    return "".join(f"; seeds {k} at {labels}" for k, labels in listed.items())


def markdown(
    study: study_spec.Study,
    rows: list[dict],
    missing: list[str],
    figure: str,
    machine: str,
    source: str | None = None,
) -> str:
    """The report; ``source``: a line on the study's source run, above the table."""
    lines = [
        f"# Study: {study.name}",
        "",
        study.description.strip(),
        "",
        f"Every run: {', '.join(f'`{k}={v}`' for k, v in study.common.items()) or 'the defaults'}; "
        f"seeds {study.seeds}{_own_seeds(study)}. Measured on {machine}.",
        "",
        *([source, ""] if source else []),
    ]
    val = any(r.get("val_accuracy_mean") is not None for r in rows)
    lines += [
        "| setting | runs | "
        + ("validation accuracy (mean ± std) | " if val else "")
        + "test accuracy (mean ± std) | max LR (mean; min..max) | training s (mean) | s/epoch | "
        "img/s | wall s: training + other |",
        "| --- | --- | " + ("--- | " if val else "") + "--- | --- | --- | --- | --- | --- |",
    ]
    lines += [_row(r, val) for r in rows]
    lines += [
        "",
        "Wall s: from the run's range test (or its training, when DVC's run cache supplied the "
        "range test) to evaluate's last metric, by MLflow's timestamps; other = wall - training "
        "(stage start-ups, the sweep, compile, evaluation).",
    ]
    if missing:
        lines += ["", f"Not finished (left out): {', '.join(missing)}."]
    lines += ["", f"![{study.name}]({figure})", ""]
    return "\n".join(lines)


def _row(r: dict, val: bool) -> str:
    """One setting's line of the table (``val``: with its validation accuracy)."""
    val_cell = f"{_pct(r['val_accuracy_mean'], r['val_accuracy_std'])} | " if val else ""
    lrs = f"{r['max_lr_mean']:.3g}"
    if r.get("max_lr_min", r["max_lr_mean"]) != r.get("max_lr_max", r["max_lr_mean"]):
        lrs += f"; {r['max_lr_min']:.3g}..{r['max_lr_max']:.3g}"
    wall = r.get("wall_seconds")
    split = "n/a" if wall is None else (
        f"{wall:.0f}: {r['seconds_mean']:.0f} + {wall - r['seconds_mean']:.0f}"
    )  # fmt: skip
    return (
        f"| {r['setting']} | {r['runs']} | {val_cell}"
        f"{_pct(r['accuracy_mean'], r['accuracy_std'])} | "
        f"{lrs} | {r['seconds_mean']:.0f} | {_num(r.get('epoch_seconds'), '.2f')} | "
        f"{_num(r.get('images_per_sec'), '.0f')} | {split} |"
    )


def _pct(mean: float | None, std: float) -> str:
    """``82.00 ± 2.00 %``; n/a for a missing mean or the std of one run."""
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f} ± {'n/a' if std != std else f'{100 * std:.2f}'} %"


def report(study: study_spec.Study, repo: Path = Path("."), out: Path | None = None) -> Path:
    """reports/<study>/report.md and its figure, from the store; also an MLflow parent run
    (``study <name>``) holding them, with the study's train runs as its children."""
    from onecycle.reports import figures, study_figures

    results, missing = collect(study, repo)
    if not results:
        raise study_spec.StudyError(
            f"study {study.name}: no finished run on this commit; run it first"
        )
    out = out or repo / "reports" / study.name
    rows = summarize(results)
    fig = (
        study_figures.study_epochs_figure
        if study.figure == "epochs"
        else study_figures.study_lr_figure
    )(results, study.name)
    png = out / f"{study.name}.png"
    figures.save({png: fig}, dpi=120)
    source = source_line(study, repo) if study.source else None
    text = markdown(study, rows, missing, png.name, provenance.machine_name(), source)
    files_ = [png, out / "report.md"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(redact(text))
    (out / "results.json").write_text(
        json.dumps(redact_values([r.__dict__ for r in results]), indent=2) + "\n"
    )
    _parent_run(study, results, files_ + [out / "results.json"], study_queue.baseline_rev(repo))
    return out / "report.md"


def source_line(study: study_spec.Study, repo: Path) -> str:
    """The source run in one line: its settings and its own test accuracy, from the store."""
    _, found = latest_train_runs(repo, {study.source_name})
    run = found.get(study.source_name)
    sets = ", ".join(f"`{k}={v}`" for k, v in study.source.overrides.items())
    shown = (
        f"{100 * run.data.metrics['eval/accuracy']:.2f} % on its own test split"
        if run
        else "not found in the store"
    )
    return (
        f"Source model `{study.source_name}` ({sets}): {shown}; its checkpoint "
        f"`{study.source.checkpoint}` is what `model.pretrained` names."
    )


def _parent_run(
    study: study_spec.Study, results: list[RunResult], attach: list[Path], rev: str
) -> str:
    import mlflow

    client = mlflow.MlflowClient()

    exp_id = mlflow.get_experiment_by_name(connect.EXPERIMENT).experiment_id
    query = f"tags.study = '{study.name}' and tags.`dvc.exp_baseline_rev` = '{rev}'"
    found = client.search_runs([exp_id], query, max_results=1)
    if found:
        parent = found[0].info.run_id
    else:
        tags = {
            "study": study.name,
            "dvc.exp_baseline_rev": rev,
            "mlflow.runName": f"study {study.name}",
        }
        parent = client.create_run(exp_id, tags=tags).info.run_id
        client.set_terminated(parent, "FINISHED")
    for r in results:
        client.set_tag(r.run_id, "mlflow.parentRunId", parent)
    for path in attach:
        client.log_artifact(parent, str(path))
    return parent
