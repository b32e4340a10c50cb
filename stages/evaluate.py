"""evaluate: test-set metrics for models/model.pt, added to the MLflow run that trained it."""

from onecycle import checkpoint, cli, evaluation, files, paths, tracking
from onecycle.config import load_params
from onecycle.engine import predict, select_device
from onecycle.prepared import load_prepared
from onecycle.preprocess import normalize


def main() -> None:
    params = load_params()
    tracking.setup()  # an unusable MLflow store stops the stage here, before any work
    data = load_prepared(paths.PREPARED_DIR)
    dev = select_device(params.base.device)
    model = checkpoint.load_weights(paths.MODEL, params.model, data.classes, dev)
    x_test = normalize(data.x_test, data.mean, data.std)
    logits = predict(model, x_test, dev, params.evaluate.batch_size)
    metrics, pred, conf = evaluation.evaluate_logits(logits, data.y_test, data.classes)

    files.write_json(paths.EVAL_METRICS, metrics)
    rows = evaluation.prediction_rows(data.y_test, pred, conf, data.classes)
    files.write_csv(paths.PREDICTIONS, rows)
    with tracking.add_to_run(paths.TRAIN_RUN, "evaluate") as run:
        run.log_metrics(evaluation.flat_metrics(metrics))
        run.log_files(paths.EVAL_METRICS)
    print(
        f"evaluate: accuracy {100 * metrics['accuracy']:.2f}% ({metrics['misclassified']:,} of "
        f"{metrics['num_test']:,} misclassified), loss {metrics['loss']:.4f}"
    )


if __name__ == "__main__":
    cli.run(main, "evaluate")
