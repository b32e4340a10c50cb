"""lr_find: Leslie Smith's LR range test; writes the chosen max LR for train (metrics/lr_find.json)."""

from onecycle import files, paths, progress
from onecycle.config import load_params
from onecycle.data.prepared import load_prepared
from onecycle.pipeline import runner
from onecycle.range_test import lr_finder
from onecycle.tracking import connect, lifecycle, provenance
from onecycle.training import distributed, init_weights

SHARED_TRAIN_KEYS = ("batch_size", "nesterov", "weight_decay")  # what the sweep takes from train


def main() -> None:
    params = load_params()
    cfg, tcfg = params.lr_find, params.train
    # An unusable MLflow store stops the stage here, before any work. With base.devices > 1 this
    # process runs the stage as that many data-parallel ranks (torchrun) and returns.
    started = distributed.setup_stage(params, "stages.lr_find", connect.setup)
    if started is None:
        return
    dev, ranks = started
    start = init_weights.load(params.model)  # model.pretrained; the data normalized as it expects
    data = start.normalize(load_prepared(paths.PREPARED_DIR))
    if not ranks.is_main:  # the same sweeps, in step with rank 0, which alone writes and logs
        lr_finder.find(params, data, dev, start)
        return
    warning = start.warning(data)
    if warning:
        progress.say(f"warning: {warning}")

    with lifecycle.stage_run("lr_find") as run:
        run.log_params(
            {
                "lr_find": cfg.model_dump(),
                "model": params.model.model_dump(),
                "base": params.base.model_dump(),
                "train": {k: getattr(tcfg, k) for k in SHARED_TRAIN_KEYS},
                "augment": tcfg.augment.model_dump(),
                "data": {"num_train": len(data.y_train), "source": data.meta["source"]},
                "start": start.record(data),
            }
        )
        run.set_tags({"device": str(dev.device)} | ({"warning": warning} if warning else {}))
        run.log_datasets(provenance.datasets(data)[:1])  # the sweep sees the training split only
        found = lr_finder.find(params, data, dev, start)
        rows = found.curve_rows()
        files.write_csv(paths.LR_FIND_CURVE, rows)
        grid_fields = ["grid", "value", "step", "lr", "loss", "smooth_loss"]
        files.write_csv(
            paths.LR_FIND_GRID, found.grid_rows(), grid_fields + ["val_loss"] * bool(cfg.val_images)
        )
        metrics = found.metrics(cfg.suggestion)
        files.write_json(paths.LR_FIND_METRICS, metrics)
        first_seed = [r for r in rows if r["seed"] == params.base.seed]
        run.log_series(first_seed, ["lr", "loss", "smooth_loss", "val_loss"], prefix="lr_find/")
        run.log_metrics(found.result | {k: metrics[k] for k in metrics["grids"]}, prefix="lr_find/")
        run.log_files("params.yaml", paths.LR_FIND_METRICS, paths.LR_FIND_CURVE, paths.LR_FIND_GRID)
        lifecycle.write_run_ref(paths.LR_FIND_RUN, run)
    print(f"lr_find: {found.describe(cfg.suggestion)}")


if __name__ == "__main__":
    runner.run(main, "lr_find")
