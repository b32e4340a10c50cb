"""The run-length plan: how long, with which schedule stepped every batch, watched on which
splits; and the warning when a run is too short to train."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onecycle import progress
from onecycle.config import TrainConfig
from onecycle.data.prepared import Prepared
from onecycle.data.preprocess import normalize
from onecycle.training import schedule
from onecycle.training.runtime import Device
from onecycle.training.schedule import Schedule
from onecycle.training.session import Session

# Below these, BatchNorm's running statistics (momentum 0.1) and a warm-up-then-anneal schedule
# have too few steps: 2,000 images at batch 512 (3 steps an epoch) ended at chance accuracy.
MIN_STEPS_PER_EPOCH = 10
MIN_STEPS = 50


@dataclass(frozen=True)
class Plan:
    """How long, with which schedule, and on what test set to watch progress."""

    epochs: int
    schedule: Schedule
    eval_every: int  # epochs between test-set looks; 0 = the last epoch only
    x_test: torch.Tensor  # normalized (N, C, H, W)
    y_test: torch.Tensor
    warning: str | None = None  # too few steps (see too_few_steps)
    x_val: torch.Tensor | None = None  # the validation split, watched with the test split
    y_val: torch.Tensor | None = None


def split_tensors(
    data: Prepared, dev: Device, split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized test (or val) split; on CUDA it lives on the GPU for the whole run."""
    x = normalize(getattr(data, f"x_{split}"), data.mean, data.std)
    if dev.type == "cuda":
        x = x.to(dev.device).contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(getattr(data, f"y_{split}"))


def too_few_steps(images: int, batch_size: int, epochs: int) -> str | None:
    """Why a run this short may end near chance, and what to change (None when it is long enough)."""
    per_epoch = max(images // min(batch_size, images), 1)
    if per_epoch >= MIN_STEPS_PER_EPOCH and per_epoch * epochs >= MIN_STEPS:
        return None
    if per_epoch < MIN_STEPS_PER_EPOCH:
        batch = 1 << max(3, (images // MIN_STEPS_PER_EPOCH).bit_length() - 1)  # a power of two
        advice = f"lower train.batch_size (e.g. {batch}) or raise data.train_subset"
    else:
        advice = f"raise train.epochs (e.g. {-(-MIN_STEPS // per_epoch)})"
    return (
        f"only {per_epoch} steps an epoch, {per_epoch * epochs} in all ({images:,} training "
        f"images at train.batch_size {batch_size}, {epochs} epochs): BatchNorm statistics and the "
        f"schedule need at least {MIN_STEPS_PER_EPOCH} an epoch and {MIN_STEPS} in all, or the "
        f"model may end near chance; {advice}."
    )


def make_plan(
    cfg: TrainConfig, max_lr: float, session: Session, data: Prepared, base_lr: float | None = None
) -> Plan:
    """``cfg``'s schedule at ``max_lr`` (and ``base_lr``, the cyclic floor) over ``session``'s
    batches, watched on the test split (and the validation split, if any); warns (and the plan
    says) when the run is too short."""
    x_test, y_test = split_tensors(data, session.dev)
    x_val, y_val = split_tensors(data, session.dev, "val") if data.has_val else (None, None)
    sched = schedule.for_training(cfg, max_lr, session.steps_per_epoch, base_lr)
    warning = too_few_steps(len(data.y_train), cfg.batch_size, cfg.epochs)
    if warning:
        progress.say(f"warning: {warning}")
    return Plan(cfg.epochs, sched, cfg.eval_every, x_test, y_test, warning, x_val, y_val)
