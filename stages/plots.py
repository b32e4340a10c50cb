"""plots: every figure a person looks at, built once from tracked files, plus a one-page report.

The figures go to plots/ and into the train run's MLflow artifacts; the LR range test also into
the lr_find run it came from.
"""

import numpy as np

from onecycle import cli, figures, files, paths, report, tracking
from onecycle.batches import sample_images
from onecycle.config import load_params
from onecycle.prepared import load_prepared


def main() -> None:
    params = load_params()
    tracking.setup()  # an unusable MLflow store stops the stage here, before any work
    data = load_prepared(paths.PREPARED_DIR)
    lr_find = files.read_json(paths.LR_FIND_METRICS)
    curve = [r for r in files.read_csv(paths.LR_FIND_CURVE) if int(r["seed"]) == params.base.seed]
    train = files.read_json(paths.TRAIN_METRICS)
    evaluation = files.read_json(paths.EVAL_METRICS)
    predictions = files.read_csv(paths.PREDICTIONS)
    aug, seed = params.train.augment, params.base.seed
    samples = sample_images(data.x_train, data.y_train, aug, data.mean, data.std, seed)
    per_class = {c: m["accuracy"] for c, m in evaluation["per_class"].items()}

    built = {  # paths.FIGURES key: (title in the report, figure)
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
        "confusion_matrix": (
            "Confusion matrix",
            figures.confusion_figure(np.asarray(evaluation["confusion_matrix"]), data.classes),
        ),
        "per_class_accuracy": (
            "Per-class accuracy",
            figures.per_class_accuracy_figure(per_class),
        ),
        "misclassified": (
            "Most confident mistakes",
            figures.misclassified_figure(data.x_test, predictions, params.plots.gallery_size),
        ),
        "augmented": (
            "Augmented training samples",
            figures.augmented_figure(*samples, data.classes),
        ),
    }
    pngs = figures.save({paths.FIGURES[k]: fig for k, (_, fig) in built.items()}, params.plots.dpi)
    sections = [(title, paths.FIGURES[k].name) for k, (title, _) in built.items()]
    meta = data.meta | {"num_classes": len(data.classes)}
    files.write_text(paths.REPORT, report.render(lr_find, train, evaluation, meta, sections))
    with tracking.add_to_run(paths.TRAIN_RUN, "plots") as run:
        run.log_files(*pngs, artifact_path="figures")
        run.log_files(paths.REPORT)
    with tracking.add_to_run(paths.LR_FIND_RUN, "plots") as run:
        run.log_files(paths.FIGURES["lr_find"], artifact_path="figures")
    print(f"plots: {len(pngs)} figures and {paths.REPORT} in {paths.PLOTS_DIR}/")


if __name__ == "__main__":
    cli.run(main, "plots")
