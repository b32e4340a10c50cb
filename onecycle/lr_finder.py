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

from . import progress
from .config import Params
from .engine import Device, predict
from .errors import UserError
from .prepared import Prepared
from .preprocess import normalize
from .schedule import sweep_lrs
from .session import build_session


class LRFindError(UserError):
    """The curve has no usable descent; the message says which lr_find key to change."""


@dataclass
class Sweep:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # raw mini-batch loss
    smooth: list[float] = field(default_factory=list)  # bias-corrected EMA
    val_losses: list[float] = field(default_factory=list)  # held-out loss (empty when off)
    stop: str = "completed"  # completed | diverged | non-finite


class SmoothedLoss:
    """Exponential moving average with bias correction (fastai / torch-lr-finder)."""

    def __init__(self, beta: float):
        self.beta, self.avg, self.count = beta, 0.0, 0

    def update(self, loss: float) -> float:
        self.count += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        return self.avg / (1 - self.beta**self.count)


def ema(losses: Iterable[float], beta: float) -> list[float]:
    smoother = SmoothedLoss(beta)
    return [smoother.update(loss) for loss in losses]


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
    smoother, best = SmoothedLoss(beta), math.inf
    for i, lr in enumerate(lrs, start=1):
        loss = step(lr)
        if not math.isfinite(loss):
            sweep.stop = "non-finite"
            break
        smoothed = smoother.update(loss)
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


def check_curve(sweep: Sweep, start_lr: float, num_iter: int, smooth_beta: float) -> None:
    """Refuse curves no suggestion can be read from, saying what caused it and what to change."""
    n = len(sweep.smooth)
    if n < 10 and sweep.stop == "completed":
        raise LRFindError(
            f"lr_find.num_iter is {num_iter}: a curve needs at least 10 steps; raise it (100 is usual)"
        )
    if n < 10:
        last = sweep.lrs[-1] if n else start_lr
        raise LRFindError(
            f"the sweep stopped after {n} of {num_iter} steps ({sweep.stop}, last LR {last:.3g}): "
            f"the loss blew up almost at once. Lower lr_find.start_lr (now {start_lr:g}) or raise "
            "lr_find.diverge_factor."
        )
    _, loss = _trim(sweep.lrs, sweep.smooth)
    first, low = loss[0], loss.min()
    if int(np.argmin(loss)) > 0 and low <= 0.98 * first:
        return
    window = 1 / (1 - smooth_beta)  # steps the smoothed loss averages over
    cause = (
        f"lr_find.smooth_beta {smooth_beta:g} averages the loss over about {window:.0f} steps, "
        f"too many for a {n}-step sweep to show a fall: lower it (e.g. "
        f"{max(0.0, 1 - 5 / n):.2g}) or raise lr_find.num_iter. "
        if window > n / 2
        else ""
    )
    raise LRFindError(
        f"the smoothed loss never fell clearly below its start ({first:.3f} -> min {low:.3f} in "
        f"{n} steps, stop: {sweep.stop}); no usable descent. {cause}If the loss only rose, lower "
        "lr_find.start_lr; if it stayed flat, raise lr_find.end_lr or lr_find.num_iter."
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


def _held_out(data: Prepared, val_images: int, seed: int):
    """(indices to train on, normalized held-out images and labels or None)."""
    n = len(data.y_train)
    if not val_images:
        return None, None
    if val_images >= n // 2:
        raise LRFindError(f"lr_find.val_images={val_images} leaves too few training images ({n})")
    held = np.random.default_rng([seed, 1]).permutation(n)
    val_idx = held[:val_images]
    x_val = normalize(data.x_train[val_idx], data.mean, data.std)
    return held[val_images:], (x_val, torch.from_numpy(data.y_train[val_idx]))


def range_test(
    params: Params, data: Prepared, dev: Device, seed: int, desc: str = "lr_find"
) -> Sweep:
    """Sweep the LR over ``lr_find.num_iter`` mini-batches of the training data, in the session
    that training builds (same model, optimizer, loss and augmentation as ``params.train``)."""
    lr_cfg = params.lr_find
    train_idx, val = _held_out(data, lr_cfg.val_images, seed)
    session = build_session(
        params.model, params.train, data, dev, seed, momentum=lr_cfg.momentum, indices=train_idx
    )
    batches = session.stream()
    session.model.train()

    def step(lr: float) -> float:
        loss, _ = session.step(*next(batches), lr, lr_cfg.momentum)
        return float(loss)

    def val_loss() -> float:
        x, y = val
        return float(F.cross_entropy(predict(session.model, x, dev), y))

    lrs = sweep_lrs(lr_cfg.num_iter, lr_cfg.start_lr, lr_cfg.end_lr, lr_cfg.mode)
    with progress.bar(len(lrs), desc) as bar:

        def show(i: int, smoothed: float) -> None:
            bar.set_postfix(lr=f"{lrs[i - 1]:.3g}", loss=f"{smoothed:.3f}", refresh=False)
            bar.update()

        return run_sweep(
            step, lrs, lr_cfg.smooth_beta, lr_cfg.diverge_factor, val_loss if val else None, show
        )


@dataclass
class Finding:
    """What the lr_find stage records: every seed's sweep and suggestions, and the choice."""

    seeds: list[int]
    sweeps: list[Sweep]
    per_seed: list[dict[str, float]]
    result: dict  # choose()'s: max_lr, and every method's median, min and max

    def curve_rows(self) -> list[dict]:
        """metrics/lr_find_curve.csv: one row per step of every seed's sweep."""
        rows = []
        for seed, sweep in zip(self.seeds, self.sweeps, strict=True):
            for i, (lr, loss, smooth) in enumerate(
                zip(sweep.lrs, sweep.losses, sweep.smooth, strict=True)
            ):
                row = {"step": i, "seed": seed, "lr": lr, "loss": loss, "smooth_loss": smooth}
                if sweep.val_losses:
                    row["val_loss"] = sweep.val_losses[i]
                rows.append(row)
        return rows

    def metrics(self, method: str) -> dict:
        """metrics/lr_find.json."""
        first = self.sweeps[0]
        return {
            **self.result,
            "method": method,
            "steps": len(first.lrs),
            "stop": first.stop,
            "seeds": len(self.seeds),
        }

    def describe(self, method: str) -> str:
        """One line: the choice, its spread over the seeds, and every method's first-seed pick."""
        r = self.result
        spread = f" (seeds: {r[method + '_min']:.3g}..{r[method + '_max']:.3g})"
        picks = ", ".join(f"{m} {self.per_seed[0][m]:.3g}" for m in SUGGESTERS)
        return f"max_lr = {r['max_lr']:.4g} by {method}{spread if len(self.seeds) > 1 else ''}; {picks}"


def find(params: Params, data: Prepared, dev: Device) -> Finding:
    """The range test once per seed (``lr_find.seeds`` of them from ``base.seed`` on), each curve
    checked, and the median suggestion of ``lr_find.suggestion`` chosen."""
    lr_cfg = params.lr_find
    seeds = [params.base.seed + k for k in range(lr_cfg.seeds)]
    sweeps = []
    for k, s in enumerate(seeds):
        sweep = range_test(params, data, dev, s, desc=f"lr_find seed {k + 1}/{len(seeds)}")
        check_curve(sweep, lr_cfg.start_lr, lr_cfg.num_iter, lr_cfg.smooth_beta)
        sweeps.append(sweep)
    per_seed = [suggestions(sweep) for sweep in sweeps]
    swept = (lr_cfg.start_lr, min(sweep.lrs[-1] for sweep in sweeps))
    return Finding(seeds, sweeps, per_seed, choose(per_seed, lr_cfg.suggestion, swept))
