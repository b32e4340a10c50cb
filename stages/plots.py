"""plots: every figure a person looks at, built from tracked files only, plus a one-page report."""

import mlflow
import numpy as np
from sklearn.metrics import confusion_matrix

from onecycle import cli, figures, paths, report, tracking
from onecycle.augment import augmented_samples, train_transform
from onecycle.config import load_params
from onecycle.data import load_prepared

HINT = "run the earlier stages first (`dvc repro`)"


def main() -> None:
    params = load_params()
    cfg = params.plots
    data = load_prepared(paths.PREPARED_DIR)
    classes = data.classes
    lr_find = cli.read_json(paths.LR_FIND_METRICS, HINT)
    curve = [
        r for r in cli.read_csv(paths.LR_FIND_CURVE, HINT) if int(r["seed"]) == params.base.seed
    ]
    train = cli.read_json(paths.TRAIN_METRICS, HINT)
    history = cli.read_csv(paths.TRAIN_HISTORY, HINT)
    sched = cli.read_csv(paths.TRAIN_SCHEDULE, HINT)
    evaluation = cli.read_json(paths.EVAL_METRICS, HINT)
    preds = cli.read_csv(paths.PREDICTIONS, HINT)

    def col(rows, key):
        return [float(r[key]) if r.get(key) not in ("", None) else None for r in rows]

    index = {c: i for i, c in enumerate(classes)}
    actual = np.array([index[r["actual"]] for r in preds])
    predicted = np.array([index[r["predicted"]] for r in preds])
    conf = np.array(col(preds, "confidence"))
    wrong = np.flatnonzero(actual != predicted)
    shown = wrong[np.argsort(-conf[wrong])][: cfg.gallery_size]  # the most confident mistakes
    idx = np.array([int(preds[i]["index"]) for i in shown], dtype=int)
    transform = train_transform(params.train.augment, data.x_train.shape[1], data.mean, data.std)
    aug_images, aug_labels = augmented_samples(
        data.x_train, data.y_train, transform, data.mean, data.std, params.base.seed
    )
    steps_per_epoch = (
        max(1, round(1 / float(sched[1]["epoch"])))
        if len(sched) > 1 and float(sched[1]["epoch"])
        else None
    )

    built = {
        "lr_find.png": (
            "LR range test",
            figures.lr_find_figure(
                col(curve, "lr"),
                col(curve, "loss"),
                col(curve, "smooth_loss"),
                {m: lr_find[m] for m in ("valley", "steepest", "min_div10")},
                lr_find["method"],
                col(curve, "val_loss") if curve and "val_loss" in curve[0] else None,
                log_x=params.lr_find.mode == "exp",
            ),
        ),
        "history.png": (
            "Loss and accuracy per epoch",
            figures.history_figure(
                [int(r["epoch"]) for r in history],
                col(history, "train_loss"),
                col(history, "test_loss"),
                col(history, "train_acc"),
                col(history, "test_acc"),
            ),
        ),
        "schedule.png": (
            "LR and momentum schedule",
            figures.schedule_figure(
                col(sched, "step"), col(sched, "lr"), col(sched, "momentum"), steps_per_epoch
            ),
        ),
        "confusion_matrix.png": (
            "Confusion matrix",
            figures.confusion_figure(
                confusion_matrix(actual, predicted, labels=list(range(len(classes)))), classes
            ),
        ),
        "per_class_accuracy.png": (
            "Per-class accuracy",
            figures.per_class_accuracy_figure(
                {c: m["accuracy"] for c, m in evaluation["per_class"].items()}
            ),
        ),
        "misclassified.png": (
            "Most confident mistakes",
            figures.image_grid(
                data.x_test[idx],
                [
                    f"{preds[i]['actual']}\n→ {preds[i]['predicted']} {100 * conf[i]:.0f}%"
                    for i in shown
                ],
                f"Misclassified test images, most confident first ({len(wrong):,} of {len(preds):,} wrong)",
                colors=["firebrick"] * len(shown),
            ),
        ),
        "augmented.png": (
            "Augmented training samples",
            figures.image_grid(
                aug_images,
                [classes[i] for i in aug_labels],
                "Augmented training images (as the model sees them)",
            ),
        ),
    }
    paths.PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    with tracking.add_to_run(paths.TRAIN_RUN, "plots"):
        for name, (_, fig) in built.items():
            fig.savefig(paths.PLOTS_DIR / name, dpi=cfg.dpi)
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
