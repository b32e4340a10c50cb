"""lr_find: Leslie Smith's LR range test; writes the chosen max LR for train (metrics/lr_find.json)."""

import mlflow

from onecycle import cli, figures, lr_finder, paths, tracking
from onecycle.config import load_params
from onecycle.data import load_prepared
from onecycle.engine import select_device


def main() -> None:
    params = load_params()
    cfg, tcfg = params.lr_find, params.train
    data = load_prepared(paths.PREPARED_DIR)
    dev = select_device(params.base.device, params.base.num_workers)

    with tracking.stage_run("lr_find") as run:
        tracking.log_params_flat(
            {
                "lr_find": cfg.model_dump(),
                "model": params.model.model_dump(),
                "base": params.base.model_dump(),
                "train": {k: getattr(tcfg, k) for k in ("batch_size", "nesterov", "weight_decay")},
                "augment": tcfg.augment.model_dump(),
                "data": {"num_train": len(data.y_train), "source": data.meta["source"]},
            }
        )
        mlflow.set_tags({"device": str(dev.device)})
        sweeps, per_seed = [], []
        for k in range(cfg.seeds):
            sweep = lr_finder.range_test(
                cfg,
                tcfg,
                params.model,
                data,
                dev,
                params.base.seed + k,
                desc=f"lr_find seed {k + 1}/{cfg.seeds}",
            )
            lr_finder.check_curve(sweep, cfg.start_lr, cfg.num_iter)
            sweeps.append(sweep)
            per_seed.append(lr_finder.suggestions(sweep))
        result = lr_finder.choose(
            per_seed, cfg.suggestion, (cfg.start_lr, min(s.lrs[-1] for s in sweeps))
        )

        rows = []
        for k, sweep in enumerate(sweeps):
            for i, (lr, loss, smooth) in enumerate(
                zip(sweep.lrs, sweep.losses, sweep.smooth, strict=True)
            ):
                row = {
                    "step": i,
                    "seed": params.base.seed + k,
                    "lr": lr,
                    "loss": loss,
                    "smooth_loss": smooth,
                }
                if sweep.val_losses:
                    row["val_loss"] = sweep.val_losses[i]
                rows.append(row)
                if k == 0:
                    mlflow.log_metrics(
                        {k_: v for k_, v in row.items() if k_ not in ("step", "seed")}, step=i
                    )
        metrics = {
            **result,
            "method": cfg.suggestion,
            "steps": len(sweeps[0].lrs),
            "stop": sweeps[0].stop,
            "seeds": cfg.seeds,
        }
        cli.write_csv(paths.LR_FIND_CURVE, rows)
        cli.write_json(paths.LR_FIND_METRICS, metrics)
        mlflow.log_metrics({k: v for k, v in result.items() if isinstance(v, float)})
        seed0 = [r for r in rows if r["seed"] == params.base.seed]
        fig = figures.lr_find_figure_from_rows(seed0, metrics, log_x=cfg.mode == "exp")
        tracking.log_figure(fig, "lr_find.png")
        for f in ("params.yaml", paths.LR_FIND_METRICS, paths.LR_FIND_CURVE):
            mlflow.log_artifact(str(f))
        tracking.write_run_ref(paths.LR_FIND_RUN, run)
    spread = (
        f" (seeds: {result[cfg.suggestion + '_min']:.3g}..{result[cfg.suggestion + '_max']:.3g})"
        if cfg.seeds > 1
        else ""
    )
    print(
        f"lr_find: max_lr = {result['max_lr']:.4g} by {cfg.suggestion}{spread}; "
        + ", ".join(f"{m} {per_seed[0][m]:.3g}" for m in lr_finder.SUGGESTERS)
    )


if __name__ == "__main__":
    cli.run(main, "lr_find")
