"""Learning-rate and momentum schedules: pure functions and thin builders around torch's."""

from __future__ import annotations

import torch


def sweep_lr(step: int, num_iter: int, start_lr: float, end_lr: float, mode: str) -> float:
    """LR of the range test at ``step`` (0-based); reaches ``end_lr`` at the last step.

    exp:    start * (end / start) ** r      (torch-lr-finder's ExponentialLR)
    linear: start + (end - start) * r       with r = step / (num_iter - 1)
    """
    r = step / max(num_iter - 1, 1)
    if mode == "exp":
        return start_lr * (end_lr / start_lr) ** r
    if mode == "linear":
        return start_lr + (end_lr - start_lr) * r
    raise ValueError(f"unknown sweep mode {mode!r}; use 'exp' or 'linear'")


def sweep_lrs(num_iter: int, start_lr: float, end_lr: float, mode: str) -> list[float]:
    return [sweep_lr(i, num_iter, start_lr, end_lr, mode) for i in range(num_iter)]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, max_lr: float, steps_per_epoch: int):
    """The per-batch scheduler for ``train.schedule`` (cfg is a TrainConfig)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=max_lr,
            total_steps=total,
            pct_start=cfg.pct_start,
            anneal_strategy=cfg.anneal_strategy,
            cycle_momentum=cfg.cycle_momentum,
            base_momentum=cfg.base_momentum,
            max_momentum=cfg.max_momentum,
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
            three_phase=cfg.three_phase,
        )
    for group in optimizer.param_groups:
        group["lr"] = max_lr
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma
        )
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
