"""train: the custom ResNet with the 1cycle policy; writes models/model.pt and the per-epoch history."""

from onecycle import files, paths
from onecycle.pipeline import preamble, runner
from onecycle.range_test import handoff
from onecycle.tracking import lifecycle, mlmodel, provenance
from onecycle.training import checkpoint, loop, outputs
from onecycle.training.model import count_parameters
from onecycle.training.plan import make_plan
from onecycle.training.session import build_session


def main() -> None:
    stage = preamble.begin("stages.train")
    if stage is None:  # base.devices > 1: the ranks ran it
        return
    params, data, weights = stage.params, stage.data, stage.weights
    lr_find = files.read_json(paths.LR_FIND_METRICS) if paths.LR_FIND_METRICS.exists() else None
    hyper = handoff.resolve(params.train, lr_find, paths.LR_FIND_METRICS)
    cfg, max_lr = hyper.cfg, hyper.max_lr
    key = checkpoint.resume_key(
        cfg, params.model, data.meta.get("fingerprint"), params.base.seed, max_lr,
        hyper.base_lr, weights.digest,
    )  # fmt: skip
    resume = checkpoint.ResumeFile(paths.RESUME_STATE, key)
    state = resume.load()
    session = build_session(
        params.model, cfg, data, stage.dev, params.base.seed, cfg.max_momentum, weights=weights,
        ranks=stage.ranks,
    )  # fmt: skip
    plan = make_plan(cfg, max_lr, session, data, hyper.base_lr)
    if not stage.ranks.is_main:  # rank 0 alone writes outputs, the resume state and the MLflow run
        loop.fit(session, plan, resume, state)
        return
    linked = "lr_find" in hyper.sources.values() and paths.LR_FIND_RUN.exists()
    lr_run = lifecycle.read_run_ref(paths.LR_FIND_RUN)["run_id"] if linked else "none"
    run_id = state["extra"].get("mlflow_run_id") if state else None
    with lifecycle.stage_run("train", run_id, tags={"lr_find_run_id": lr_run}) as run:
        resume.extra["mlflow_run_id"] = run.run_id
        if state is None:
            run.log_params(_run_params(stage, hyper, session))
            run.log_datasets(provenance.datasets(data))
        else:
            run.set_tags({"resumed": "true"})
        warnings = [w for w in (stage.warning, plan.warning) if w]
        if warnings:
            run.set_tags({"warning": " | ".join(warnings)})
        hooks = loop.Hooks(on_epoch=lambda s: run.log_metrics(s.metrics(), s.epoch))
        result = loop.fit(session, plan, resume, state, hooks)
        metrics = _write_outputs(stage, hyper, plan, session, result, run)
    resume.remove()
    acc = "n/a" if metrics["test_acc"] is None else f"{100 * metrics['test_acc']:.2f}%"
    print(
        f"train: test accuracy {acc} after {metrics['epochs']} epochs, max_lr {max_lr:.4g} "
        f"({hyper.sources['max_lr']}), {metrics['train_seconds']:.0f}s of training"
    )


def _run_params(stage: preamble.TrainingStage, hyper: handoff.Resolved, session) -> dict:
    """What a new run logs as its params: the settings, the values used and where each came
    from, the model's size, the initial weights, and the machine."""
    params, data = stage.params, stage.data
    return {
        "train": hyper.cfg.model_dump(),
        "model": params.model.model_dump(),
        "base": params.base.model_dump(),
        "max_lr_used": hyper.max_lr,
        "max_lr_source": hyper.sources["max_lr"],
        "base_lr_used": hyper.base_lr,
        "sources": hyper.sources,
        "parameters": count_parameters(session.model),
        "trainable_parameters": count_parameters(session.model, trainable=True),
        "start": stage.weights.record(data),
        **provenance.context(stage.dev, data),
    }


def _write_outputs(stage: preamble.TrainingStage, hyper, plan, session, result, run) -> dict:
    """The checkpoint, the MLflow model, metrics/train.json, the history and the schedule, and
    the run's reference; returns the metrics."""
    params, data = stage.params, stage.data
    checkpoint.save_weights(
        result.model, params.model, data.classes, paths.MODEL, checkpoint.inputs_of(data)
    )
    metrics = outputs.summary(result, hyper)  # written before the upload, which may wait
    files.write_json(paths.TRAIN_METRICS, metrics)
    files.write_csv(paths.TRAIN_HISTORY, outputs.history_rows(result.history))
    files.write_csv(paths.TRAIN_SCHEDULE, outputs.schedule_rows(plan, session.steps_per_epoch))
    model_id = run.call_now(
        "the model",
        lambda: mlmodel.log(
            result.model, data.classes, data.mean, data.std, data.x_test, run.run_id
        ),
    )
    run.log_files("params.yaml", paths.TRAIN_METRICS, paths.TRAIN_HISTORY)
    lifecycle.write_run_ref(paths.TRAIN_RUN, run, model_id=model_id)
    return metrics


if __name__ == "__main__":
    runner.run(main, "train")
