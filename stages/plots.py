"""plots: every figure a person looks at, built once from tracked files, plus a one-page report.

The figures go to plots/ and into the train run's MLflow artifacts; the LR range test also into
the lr_find run it came from.
"""

import numpy as np

from onecycle import files, paths
from onecycle.config import load_params
from onecycle.data.prepared import load_prepared
from onecycle.pipeline import runner
from onecycle.reports import figures, report
from onecycle.tracking import connect, lifecycle
from onecycle.training.batches import sample_images


def build(params, data, lr_find: dict, evaluation: dict) -> dict:
    """Every figure, from the tracked files: {paths.FIGURES / GRID_FIGURES key: (title, Figure)}."""
    seed = params.base.seed
    curve = [r for r in files.read_csv(paths.LR_FIND_CURVE) if int(r["seed"]) == seed]
    samples = sample_images(
        data.x_train, data.y_train, params.train.augment, data.mean, data.std, seed
    )
    per_class = {c: m["accuracy"] for c, m in evaluation["per_class"].items()}
    predictions = files.read_csv(paths.PREDICTIONS)
    confusion = np.asarray(evaluation["confusion_matrix"])
    built = {
        "lr_find": (
            "LR range test",
            figures.lr_find_figure_from_rows(curve, lr_find, params.lr_find.mode == "exp"),
        ),
        "history": (
            "Loss and accuracy per epoch",
            figures.history_figure_from_rows(files.read_csv(paths.TRAIN_HISTORY)),
        ),
        "schedule": (
            "LR and momentum schedule",
            figures.schedule_figure(files.read_csv(paths.TRAIN_SCHEDULE)),
        ),
        "confusion_matrix": ("Confusion matrix", figures.confusion_figure(confusion, data.classes)),
        "per_class_accuracy": ("Per-class accuracy", figures.per_class_accuracy_figure(per_class)),
        "misclassified": (
            "Most confident mistakes",
            figures.misclassified_figure(data.x_test, predictions, params.plots.gallery_size),
        ),
        "augmented": (
            "Augmented training samples",
            figures.augmented_figure(*samples, data.classes),
        ),
    }
    grid_rows = files.read_csv(paths.LR_FIND_GRID)
    for name, summary in lr_find.get("grids", {}).items():  # only the grids that ran
        rows = [r for r in grid_rows if r["grid"] == name]
        title = f"LR range test per {name.replace('_', ' ')}"
        built[name] = (title, figures.grid_figure(rows, name, summary))
    return built


def main() -> None:
    params = load_params()
    connect.setup()  # an unusable MLflow store stops the stage here, before any work
    data = load_prepared(paths.PREPARED_DIR)
    lr_find, evaluation = (
        files.read_json(paths.LR_FIND_METRICS),
        files.read_json(paths.EVAL_METRICS),
    )
    built = build(params, data, lr_find, evaluation)
    where = paths.FIGURES | paths.GRID_FIGURES
    pngs = figures.save({where[k]: fig for k, (_, fig) in built.items()}, params.plots.dpi)
    sections = [(title, where[k].name) for k, (title, _) in built.items()]
    meta = data.meta | {"num_classes": len(data.classes)}
    train = files.read_json(paths.TRAIN_METRICS)
    files.write_text(paths.REPORT, report.render(lr_find, train, evaluation, meta, sections))
    with lifecycle.add_to_run(paths.TRAIN_RUN, "plots") as run:
        run.log_files(*pngs, artifact_path="figures")
        run.log_files(paths.REPORT)
    on_lr_find = [
        p for p in pngs if p == paths.FIGURES["lr_find"] or p in paths.GRID_FIGURES.values()
    ]
    with lifecycle.add_to_run(paths.LR_FIND_RUN, "plots") as run:
        run.log_files(*on_lr_find, artifact_path="figures")
    print(f"plots: {len(pngs)} figures and {paths.REPORT} in {paths.PLOTS_DIR}/")


if __name__ == "__main__":
    runner.run(main, "plots")
