"""evaluate: test-set metrics for models/model.pt, added to the MLflow run that trained it."""

from onecycle import files, paths, progress
from onecycle.config import load_params
from onecycle.data.prepared import load_prepared
from onecycle.data.preprocess import normalize
from onecycle.pipeline import runner
from onecycle.reports import evaluation
from onecycle.tracking import connect, lifecycle
from onecycle.training import checkpoint
from onecycle.training.runtime import predict, select_device


def main() -> None:
    params = load_params()
    connect.setup()  # an unusable MLflow store stops the stage here, before any work
    data = load_prepared(paths.PREPARED_DIR)
    dev = select_device(params.base.device)
    model, inputs = checkpoint.load_trained(paths.MODEL, params.model, data.classes, dev)
    inputs = inputs or {"mean": data.mean, "std": data.std}  # what it was trained with
    x_test = normalize(data.x_test, inputs["mean"], inputs["std"])
    logits = predict(model, x_test, dev, params.evaluate.batch_size)
    metrics, pred, conf = evaluation.evaluate_logits(logits, data.y_test, data.classes)

    files.write_json(paths.EVAL_METRICS, metrics)
    rows = evaluation.prediction_rows(data.y_test, pred, conf, data.classes)
    files.write_csv(paths.PREDICTIONS, rows)
    model_id = lifecycle.read_run_ref(paths.TRAIN_RUN).get("model_id")
    with lifecycle.add_to_run(paths.TRAIN_RUN, "evaluate") as run:
        # the run's metrics, and the logged model's (its page in the UI shows them)
        run.log_metrics(evaluation.flat_metrics(metrics), model_id=model_id)
        run.log_files(paths.EVAL_METRICS)
        version = register(run, model_id, params.evaluate.register_as)
    print(
        f"evaluate: accuracy {100 * metrics['accuracy']:.2f}% ({metrics['misclassified']:,} of "
        f"{metrics['num_test']:,} misclassified), loss {metrics['loss']:.4f}"
        + (f"; registered as models:/{params.evaluate.register_as}/{version}" if version else "")
    )


def register(run, model_id: str | None, name: str | None) -> str | None:
    """The train run's model as a version of ``name`` in the Model Registry (once per model: an
    evaluate run again finds its version); returns the version."""
    if not name:
        return None
    if not model_id:
        progress.say(
            f"evaluate: {paths.TRAIN_RUN} names no MLflow model (the store was away when train "
            "logged it); not registered. `dvc repro -f train` logs it again."
        )
        return None

    def find_or_register():
        import mlflow

        source = f"models:/{model_id}"
        for mv in mlflow.MlflowClient().search_model_versions(f"name = '{name}'"):
            if mv.source == source or getattr(mv, "model_id", None) == model_id:
                return mv.version
        return mlflow.register_model(source, name).version

    version = run.call_now(f"registering the model as {name}", find_or_register)
    if version:
        run.set_tags({"registered_model": f"{name}/{version}"})
    return version


if __name__ == "__main__":
    runner.run(main, "evaluate")
