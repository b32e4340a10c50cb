"""What the train stage writes from a finished run: the per-epoch history, every step's LR and
momentum, and metrics/train.json."""

from __future__ import annotations

from dataclasses import asdict

from onecycle.range_test.handoff import Resolved
from onecycle.training.loop import EpochStats, Result
from onecycle.training.plan import Plan


def history_rows(history: list[EpochStats]) -> list[dict]:
    """Per-epoch rows as written to metrics/train_history.csv (None -> empty cell)."""
    return [{k: ("" if v is None else v) for k, v in asdict(h).items()} for h in history]


def schedule_rows(plan: Plan, steps_per_epoch: int) -> list[dict]:
    """Every step's LR and momentum, as written to metrics/train_schedule.csv."""
    rows = []
    for step in range(plan.epochs * steps_per_epoch):
        lr, momentum = plan.schedule(step)
        rows.append({"step": step, "epoch": step / steps_per_epoch, "lr": lr, "momentum": momentum})
    return rows


def summary(result: Result, hyper: Resolved) -> dict:
    """metrics/train.json: the final epoch, and the LR and other ``auto`` values it used."""
    last, h = result.history[-1], result.history
    return {
        "test_acc": last.test_acc,
        "test_loss": last.test_loss,
        "val_acc": last.val_acc,  # the validation split: what choices are made on (None: none)
        "val_loss": last.val_loss,
        "train_acc": last.train_acc,
        "train_loss": last.train_loss,
        "max_lr": hyper.max_lr,
        "max_lr_source": hyper.sources["max_lr"],
        "base_lr": hyper.base_lr,
        "weight_decay": hyper.cfg.weight_decay,
        "max_momentum": hyper.cfg.max_momentum,
        "sources": hyper.sources,
        "epochs": len(h),
        "train_seconds": sum(e.epoch_seconds for e in h),
        "images_per_sec": sum(e.images_per_sec for e in h) / len(h),
    }
