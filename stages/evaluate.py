"""evaluate: test-set metrics for models/model.pt, added to the MLflow run that trained it."""

import mlflow

from onecycle import cli, figures, paths, tracking
from onecycle.augment import normalize
from onecycle.config import load_params
from onecycle.data import load_prepared
from onecycle.engine import predict, select_device
from onecycle.evaluation import evaluate_logits, load_checkpoint


def main() -> None:
    params = load_params()
    data = load_prepared(paths.PREPARED_DIR)
    dev = select_device(params.base.device, params.base.num_workers)
    model = load_checkpoint(paths.MODEL, params.model, data.classes, dev)
    logits = predict(
        model, normalize(data.x_test, data.mean, data.std), dev, params.evaluate.batch_size
    )
    metrics, cm, pred, conf = evaluate_logits(logits, data.y_test, data.classes)

    cli.write_json(paths.EVAL_METRICS, metrics)
    cli.write_csv(
        paths.PREDICTIONS,
        [
            {
                "index": i,
                "actual": data.classes[a],
                "predicted": data.classes[p],
                "confidence": round(float(c), 5),
            }
            for i, (a, p, c) in enumerate(zip(data.y_test, pred, conf, strict=True))
        ],
    )
    with tracking.add_to_run(paths.TRAIN_RUN, "evaluate"):
        flat = {
            "eval.accuracy": metrics["accuracy"],
            "eval.loss": metrics["loss"],
            "eval.misclassified": metrics["misclassified"],
            "eval.macro_f1": metrics["macro_f1"],
        }
        for c, m in metrics["per_class"].items():
            flat |= {f"eval.{c}.{k}": v for k, v in m.items() if k != "support"}
        mlflow.log_metrics(flat)
        tracking.log_figure(figures.confusion_figure(cm, data.classes), "confusion_matrix.png")
        tracking.log_figure(
            figures.per_class_accuracy_figure(
                {c: m["accuracy"] for c, m in metrics["per_class"].items()}
            ),
            "per_class_accuracy.png",
        )
        mlflow.log_artifact(str(paths.EVAL_METRICS))
    print(
        f"evaluate: accuracy {100 * metrics['accuracy']:.2f}% ({metrics['misclassified']:,} of "
        f"{metrics['num_test']:,} misclassified), loss {metrics['loss']:.4f}"
    )


if __name__ == "__main__":
    cli.run(main, "evaluate")
