"""plots: every figure a person looks at, built from tracked files only, plus a one-page report."""

import mlflow
from sklearn.metrics import confusion_matrix

from onecycle import cli, figures, paths, report, tracking
from onecycle.augment import augmented_samples, train_transform
from onecycle.config import load_params
from onecycle.data import load_prepared

HINT = "run the earlier stages first (`dvc repro`)"


def main() -> None:
    params = load_params()
    data = load_prepared(paths.PREPARED_DIR)
    classes = data.classes
    lr_find = cli.read_json(paths.LR_FIND_METRICS, HINT)
    curve = [
        r for r in cli.read_csv(paths.LR_FIND_CURVE, HINT) if int(r["seed"]) == params.base.seed
    ]
    train = cli.read_json(paths.TRAIN_METRICS, HINT)
    evaluation = cli.read_json(paths.EVAL_METRICS, HINT)
    preds = cli.read_csv(paths.PREDICTIONS, HINT)
    cm = confusion_matrix(
        [r["actual"] for r in preds], [r["predicted"] for r in preds], labels=classes
    )
    transform = train_transform(params.train.augment, data.x_train.shape[1], data.mean, data.std)
    images, labels = augmented_samples(
        data.x_train, data.y_train, transform, data.mean, data.std, params.base.seed
    )

    built = {  # file name: (title in the report, figure)
        "lr_find.png": (
            "LR range test",
            figures.lr_find_figure_from_rows(curve, lr_find, params.lr_find.mode == "exp"),
        ),
        "history.png": (
            "Loss and accuracy per epoch",
            figures.history_figure_from_rows(cli.read_csv(paths.TRAIN_HISTORY, HINT)),
        ),
        "schedule.png": (
            "LR and momentum schedule",
            figures.schedule_figure(cli.read_csv(paths.TRAIN_SCHEDULE, HINT)),
        ),
        "confusion_matrix.png": ("Confusion matrix", figures.confusion_figure(cm, classes)),
        "per_class_accuracy.png": (
            "Per-class accuracy",
            figures.per_class_accuracy_figure(
                {c: m["accuracy"] for c, m in evaluation["per_class"].items()}
            ),
        ),
        "misclassified.png": (
            "Most confident mistakes",
            figures.misclassified_figure(data.x_test, preds, params.plots.gallery_size),
        ),
        "augmented.png": (
            "Augmented training samples",
            figures.augmented_figure(images, labels, classes),
        ),
    }
    paths.PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    with tracking.add_to_run(paths.TRAIN_RUN, "plots"):
        for name, (_, fig) in built.items():
            fig.savefig(paths.PLOTS_DIR / name, dpi=params.plots.dpi)
            tracking.log_figure(fig, name)
        text = report.render(
            lr_find,
            train,
            evaluation,
            data.meta | {"num_classes": len(classes)},
            [(title, name) for name, (title, _) in built.items()],
        )
        paths.REPORT.write_text(text)
        mlflow.log_artifact(str(paths.REPORT))
    print(f"plots: {len(built)} figures and {paths.REPORT} in {paths.PLOTS_DIR}/")


if __name__ == "__main__":
    cli.run(main, "plots")
