"""lr_find: Leslie Smith's LR range test; writes the chosen max LR for train (metrics/lr_find.json)."""

from dataclasses import asdict

from onecycle import files, paths
from onecycle.pipeline import preamble, runner
from onecycle.range_test import lr_finder
from onecycle.tracking import lifecycle, provenance

SHARED_TRAIN_KEYS = ("batch_size", "nesterov", "weight_decay")  # what the sweep takes from train


def main() -> None:
    stage = preamble.begin("stages.lr_find")
    if stage is None:  # base.devices > 1: the ranks ran it
        return
    params, data, weights, warning = stage.params, stage.data, stage.weights, stage.warning
    cfg, tcfg = params.lr_find, params.train
    if not stage.ranks.is_main:  # the same sweeps, in step with rank 0, which alone writes and logs
        lr_finder.find(params, data, stage.dev, weights, stage.ranks)
        return
    with lifecycle.stage_run("lr_find") as run:
        run.log_params(
            {
                "lr_find": cfg.model_dump(),
                "model": params.model.model_dump(),
                "base": params.base.model_dump(),
                "train": {k: getattr(tcfg, k) for k in SHARED_TRAIN_KEYS},
                "augment": tcfg.augment.model_dump(),
                "data": {"num_train": len(data.y_train), "source": data.meta["source"]},
                "start": weights.record(data),
            }
        )
        run.set_tags({"device": str(stage.dev.device)} | ({"warning": warning} if warning else {}))
        run.log_datasets(provenance.datasets(data)[:1])  # the sweep sees the training split only
        found = lr_finder.find(params, data, stage.dev, weights, stage.ranks)
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
        if found.refined:  # each probe's LR and validation accuracy, at the probe's number
            probes = [asdict(p) | {"step": i} for i, p in enumerate(found.refined.probes)]
            run.log_series(probes, ["max_lr", "steps", "val_acc", "val_loss"], prefix="refine/")
        run.log_files("params.yaml", paths.LR_FIND_METRICS, paths.LR_FIND_CURVE, paths.LR_FIND_GRID)
        lifecycle.write_run_ref(paths.LR_FIND_RUN, run)
    print(f"lr_find: {found.describe(cfg.suggestion)}")


if __name__ == "__main__":
    runner.run(main, "lr_find")
