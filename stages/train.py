"""train: the custom ResNet with the 1cycle policy; writes models/model.pt and the per-epoch history."""

import platform

import albumentations
import mlflow
import torch

from onecycle import __version__, cli, figures, paths, tracking, training
from onecycle.augment import augmented_samples, train_transform
from onecycle.config import load_params
from onecycle.data import load_prepared
from onecycle.engine import build_model, select_device
from onecycle.model import count_parameters


def main() -> None:
    params = load_params()
    cfg, seed = params.train, params.base.seed
    data = load_prepared(paths.PREPARED_DIR)
    dev = select_device(params.base.device, params.base.num_workers)
    lr_find = cli.read_json(paths.LR_FIND_METRICS, "") if paths.LR_FIND_METRICS.exists() else None
    max_lr, lr_source = training.resolve_max_lr(cfg.max_lr, lr_find, paths.LR_FIND_METRICS)
    state = training.load_resume(
        paths.RESUME_STATE, training.resume_key(cfg, params.model, data, seed, max_lr)
    )
    lr_run = (
        cli.read_json(paths.LR_FIND_RUN, "")
        if paths.LR_FIND_RUN.exists() and lr_source == "lr_find"
        else {}
    )

    run_id = state["extra"].get("mlflow_run_id") if state else None
    with tracking.stage_run(
        "train", run_id=run_id, tags={"lr_find_run_id": lr_run.get("run_id", "none")}
    ) as run:
        if state is None:
            tracking.log_params_flat(
                {
                    "train": cfg.model_dump(),
                    "model": params.model.model_dump(),
                    "base": params.base.model_dump(),
                }
            )
            mlflow.log_params(
                {
                    "max_lr_used": max_lr,
                    "max_lr_source": lr_source,
                    "parameters": count_parameters(
                        build_model(params.model, len(data.classes), dev)
                    ),
                    "device": str(dev.device),
                    "amp": str(dev.amp_dtype),
                    "num_train": len(data.y_train),
                    "num_test": len(data.y_test),
                    "data_source": data.meta["source"],
                    "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
                    f"albumentations {albumentations.__version__}, onecycle {__version__}",
                }
            )
        else:
            mlflow.set_tag("resumed", "true")

        def log_epoch(s: training.EpochStats) -> None:
            mlflow.log_metrics(
                {k: v for k, v in vars(s).items() if k != "epoch" and v is not None}, step=s.epoch
            )

        result = training.fit(
            cfg,
            params.model,
            data,
            dev,
            seed,
            max_lr,
            paths.RESUME_STATE,
            state=state,
            extra={"mlflow_run_id": run.info.run_id},
            on_epoch=log_epoch,
        )
        training.save_weights(result.model, params.model, data.classes, paths.MODEL)
        metrics = training.summary(result, max_lr, lr_source)
        history, schedule = training.epoch_rows(result.history), training.schedule_rows(result)
        cli.write_json(paths.TRAIN_METRICS, metrics)
        cli.write_csv(paths.TRAIN_HISTORY, history)
        cli.write_csv(paths.TRAIN_SCHEDULE, schedule)

        transform = train_transform(cfg.augment, data.x_train.shape[1], data.mean, data.std)
        images, labels = augmented_samples(
            data.x_train, data.y_train, transform, data.mean, data.std, seed
        )
        tracking.log_figure(figures.history_figure_from_rows(history), "history.png")
        tracking.log_figure(figures.schedule_figure(schedule), "schedule.png")
        tracking.log_figure(figures.augmented_figure(images, labels, data.classes), "augmented.png")
        for f in ("params.yaml", paths.TRAIN_METRICS, paths.TRAIN_HISTORY):
            mlflow.log_artifact(str(f))
        tracking.write_run_ref(paths.TRAIN_RUN, run)
    paths.RESUME_STATE.unlink(missing_ok=True)
    acc = "n/a" if metrics["test_acc"] is None else f"{100 * metrics['test_acc']:.2f}%"
    print(
        f"train: test accuracy {acc} after {metrics['epochs']} epochs, "
        f"max_lr {max_lr:.4g} ({lr_source}), {metrics['train_seconds']:.0f}s of training"
    )


if __name__ == "__main__":
    cli.run(main, "train")
