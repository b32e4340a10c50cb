"""Leslie Smith's LR range test and the suggestions read off its curve.

The suggestion functions are pure functions of (lrs, losses); the sweep only produces the curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


class LRFindError(RuntimeError):
    """The curve has no usable descent; the message says which lr_find key to change."""


@dataclass
class Sweep:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # raw mini-batch loss
    smooth: list[float] = field(default_factory=list)  # bias-corrected EMA
    val_losses: list[float] = field(default_factory=list)  # held-out loss (empty when off)
    stop: str = "completed"  # completed | diverged | non-finite


def ema(losses: Iterable[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction (fastai / torch-lr-finder)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def run_sweep(
    step: Callable[[float], float],
    lrs: list[float],
    beta: float,
    diverge_factor: float,
    val_loss: Callable[[], float] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> Sweep:
    """Take one optimizer step per LR; stop on a NaN/inf loss or a diverged smoothed loss.

    ``step(lr)`` trains one mini-batch at ``lr`` and returns its loss. A non-finite loss ends the
    sweep without being recorded (torch-lr-finder's check, ``loss > factor * best``, is never true
    for NaN, so its sweep runs on).
    """
    sweep = Sweep()
    avg, best = 0.0, math.inf
    for i, lr in enumerate(lrs, start=1):
        loss = step(lr)
        if not math.isfinite(loss):
            sweep.stop = "non-finite"
            break
        avg = beta * avg + (1 - beta) * loss
        smoothed = avg / (1 - beta**i)
        sweep.lrs.append(lr)
        sweep.losses.append(loss)
        sweep.smooth.append(smoothed)
        if val_loss is not None:
            sweep.val_losses.append(val_loss())
        if progress:
            progress(i, smoothed)
        best = min(best, smoothed)
        if smoothed > diverge_factor * best:
            sweep.stop = "diverged"
            break
    return sweep


# ------------------------------------------------------------------ suggestions (pure)


def _trim(lrs, losses, skip_start: int | None = None, skip_end: int = 5):
    """fastai drops the first 10% and the last 5 points before reading the curve."""
    n = len(losses)
    start = n // 10 if skip_start is None else skip_start
    end = max(n - skip_end, start + 2)
    return np.asarray(lrs[start:end], float), np.asarray(losses[start:end], float)


def suggest_steepest(lrs, losses) -> float:
    """LR of the steepest fall of the loss against log10(LR), before the loss minimum."""
    lr, loss = _trim(lrs, losses)
    stop = int(np.argmin(loss)) + 1
    if stop < 2:
        return float("nan")
    grad = np.gradient(loss[:stop], np.log10(lr[:stop]))
    return float(lr[int(np.argmin(grad))])


def suggest_valley(lrs, losses) -> float:
    """fastai's valley: the longest decreasing subsequence of the loss; the LR half-way into it
    (fastai's ``start + int(len / 3) + int(len / 6)``)."""
    lr, loss = _trim(lrs, losses)
    n = len(loss)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if loss[i] < loss[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lr[idx])


def suggest_min_div10(lrs, losses) -> float:
    """LR at the loss minimum, divided by 10."""
    lr, loss = _trim(lrs, losses)
    return float(lr[int(np.argmin(loss))] / 10)


SUGGESTERS = {
    "valley": suggest_valley,
    "steepest": suggest_steepest,
    "min_div10": suggest_min_div10,
}


def check_curve(sweep: Sweep, start_lr: float, num_iter: int) -> None:
    """Refuse curves no suggestion can be read from, saying what to change."""
    n = len(sweep.smooth)
    if n < 10:
        raise LRFindError(
            f"the sweep stopped after {n} of {num_iter} steps ({sweep.stop}, last LR {sweep.lrs[-1] if n else start_lr:.3g}): "
            f"the loss blew up almost at once. Lower lr_find.start_lr (now {start_lr:g}) or raise "
            "lr_find.diverge_factor."
        )
    _, loss = _trim(sweep.lrs, sweep.smooth)
    first, low = loss[0], loss.min()
    if int(np.argmin(loss)) == 0 or low > 0.98 * first:
        raise LRFindError(
            f"the smoothed loss never fell clearly below its start ({first:.3f} -> min {low:.3f}, stop: {sweep.stop}); "
            "no usable descent. If it only rose, lower lr_find.start_lr; if it stayed flat, raise "
            "lr_find.end_lr or lr_find.num_iter."
        )


def suggestions(sweep: Sweep) -> dict[str, float]:
    return {name: fn(sweep.lrs, sweep.smooth) for name, fn in SUGGESTERS.items()}


def choose(per_seed: list[dict[str, float]], method: str, lr_range: tuple[float, float]) -> dict:
    """Median (and min/max) of each method over the seeds; the chosen one is checked for range."""
    out: dict = {}
    for name in SUGGESTERS:
        vals = np.asarray([s[name] for s in per_seed], float)
        vals = vals[np.isfinite(vals)]
        out[name] = float(np.median(vals)) if len(vals) else float("nan")
        out[f"{name}_min"] = float(vals.min()) if len(vals) else float("nan")
        out[f"{name}_max"] = float(vals.max()) if len(vals) else float("nan")
    chosen = out[method]
    lo, hi = lr_range
    if not (math.isfinite(chosen) and lo <= chosen <= hi):
        raise LRFindError(
            f"suggestion {method!r} gave {chosen!r}, outside the swept range [{lo:g}, {hi:g}]; "
            "try lr_find.suggestion: valley, or widen start_lr/end_lr"
        )
    out["max_lr"] = chosen
    return out


@torch.no_grad()
def held_out_loss(model, x: torch.Tensor, y: torch.Tensor, dev) -> float:
    from .engine import predict

    return float(F.cross_entropy(predict(model, x, dev), y).item())


def range_test(lr_cfg, train_cfg, model_cfg, data, dev, seed: int, desc: str = "lr_find") -> Sweep:
    """Sweep the LR over ``lr_cfg.num_iter`` mini-batches of the training data, with the model,
    optimizer, loss and augmentation that training uses (built by the same functions)."""
    from tqdm import tqdm

    from .augment import AugmentedBatches, batch_loader, normalize, train_transform
    from .engine import (
        build_model,
        build_optimizer,
        make_scaler,
        seed_everything,
        to_device,
        train_step,
    )
    from .schedule import sweep_lrs

    seed_everything(seed)
    x, y = data.x_train, data.y_train
    val = None
    if lr_cfg.val_images:
        if lr_cfg.val_images >= len(x) // 2:
            raise LRFindError(
                f"lr_find.val_images={lr_cfg.val_images} leaves too few training images ({len(x)})"
            )
        held = np.random.default_rng([seed, 1]).permutation(len(x))
        val_idx, train_idx = held[: lr_cfg.val_images], held[lr_cfg.val_images :]
        val = (normalize(x[val_idx], data.mean, data.std), torch.from_numpy(y[val_idx]))
        x, y = x[train_idx], y[train_idx]

    model = build_model(model_cfg, len(data.classes), dev)
    optimizer = build_optimizer(
        model, lr_cfg.start_lr, lr_cfg.momentum, train_cfg.nesterov, train_cfg.weight_decay
    )
    scaler = make_scaler(dev)
    transform = train_transform(train_cfg.augment, x.shape[1], data.mean, data.std)
    batches = AugmentedBatches(x, y, train_cfg.batch_size, transform, seed)
    loader, sampler = batch_loader(batches, dev.num_workers, pin_memory=dev.type == "cuda")

    def stream():
        epoch = 0
        while True:
            sampler.epoch = epoch
            yield from loader
            epoch += 1

    it = stream()
    model.train()

    def step(lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        xb, yb = to_device(*next(it), dev)
        loss, _ = train_step(model, optimizer, scaler, xb, yb, dev)
        return float(loss)

    lrs = sweep_lrs(lr_cfg.num_iter, lr_cfg.start_lr, lr_cfg.end_lr, lr_cfg.mode)
    with tqdm(total=len(lrs), desc=desc, unit="batch", dynamic_ncols=True, mininterval=1.0) as bar:

        def progress(i, smoothed):
            bar.set_postfix(lr=f"{lrs[i - 1]:.3g}", loss=f"{smoothed:.3f}", refresh=False)
            bar.update()

        val_fn = (lambda: held_out_loss(model, *val, dev)) if val else None
        return run_sweep(step, lrs, lr_cfg.smooth_beta, lr_cfg.diverge_factor, val_fn, progress)
