"""The LR range test's curve and what is read off it: the record of a sweep, the smoothed loss,
the stops, the checks, and the suggestions: pure functions of (lrs, losses), no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from onecycle.errors import UserError


class LRFindError(UserError):
    """The curve has no usable descent; the message says which lr_find key to change."""


@dataclass
class Sweep:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # raw mini-batch loss
    smooth: list[float] = field(default_factory=list)  # the curve read: see reread()
    val_losses: list[float] = field(default_factory=list)  # held-out loss (empty when off)
    stop: str = "completed"  # completed | diverged | non-finite

    def reread(self, how: str, fraction: float, diverge_factor: float) -> Sweep:
        """The sweep as the suggestions read it: the raw losses smoothed over ``fraction`` of
        its steps (:func:`smooth`; ``smooth`` during the sweep was the lagging EMA that only
        decided where to stop), cut where that curve passes ``diverge_factor`` times its best.

        A centered window also looks ahead, so a blown-up raw loss would leak back and move
        the minimum with its size (on mobilenet_v3_small a last loss of 2,004 after 1.9-2.5
        moved it from 0.20 to 0.055). So the centered curve is smoothed again without the raw
        losses past ``diverge_factor`` times the first pass's best, and cut as above."""
        losses = self.losses
        if how == "centered":
            first = np.minimum.accumulate(smooth(losses, how, fraction)) if losses else []
            over = [
                i
                for i, (raw, best) in enumerate(zip(losses, first, strict=True))
                if raw > diverge_factor * best
            ]
            losses = losses[: max(over[0], 1)] if over else losses
        curve = smooth(losses, how, fraction)
        kept = _cut(curve, diverge_factor)
        return Sweep(
            self.lrs[:kept],
            self.losses[:kept],
            curve[:kept],
            self.val_losses[:kept],
            "diverged" if kept < len(self.losses) else self.stop,
        )


def _cut(curve: list[float], diverge_factor: float) -> int:
    """The steps up to and including the first that passes ``diverge_factor`` times the best
    before it (all of them when none does)."""
    best = math.inf
    for i, v in enumerate(curve):
        best = min(best, v)
        if v > diverge_factor * best:
            return i + 1
    return len(curve)


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


def suggest_lower_bound(lrs, losses, fraction: float = 0.1) -> float:
    """Where the loss starts to fall clearly: the cyclical schedule's floor (Smith's CLR paper:
    "when the accuracy starts to increase"). The first LR, after fastai's trim and before the
    minimum, at which the loss lies below its start by ``fraction`` of its whole fall."""
    lr, loss = _trim(lrs, losses)
    lowest = int(np.argmin(loss))
    if lowest == 0:
        return float("nan")
    threshold = loss[0] - fraction * (loss[0] - loss[lowest])
    return float(lr[int(np.argmax(loss[: lowest + 1] <= threshold))])


def suggest_min(lrs, losses, divisor: float = 1.0) -> float:
    """LR at the loss minimum, divided by ``divisor`` (1: Smith's extremum, the largest usable
    maximum bound of a cyclical schedule, arXiv 1803.09820 sec. 4.1; 10: ``min_div10``)."""
    lr, loss = _trim(lrs, losses)
    return float(lr[int(np.argmin(loss))] / divisor)


def suggest_slide(lrs, losses, lr_diff: int = 15, thresh: float = 0.005) -> float:
    """fastai's slide rule (Andrew Chang): walking left from the end, the first LR where the
    loss's gradient (per step) differs by at most ``thresh`` from ``lr_diff`` steps to its right."""
    lr, loss = _trim(lrs, losses)
    lr_diff = min(lr_diff, len(loss) - 1)
    grad = np.gradient(loss)
    right = len(loss) - 1
    left = right - lr_diff
    pick = lr[left]
    while left >= 0 and abs(grad[right] - grad[left]) > thresh:
        pick = lr[left]
        right, left = right - 1, left - 1
    return float(pick)


def suggest_blowup(lrs, losses, divisor: float = 10.0) -> float:
    """The LR where the loss, past its minimum, first climbs back above its starting level (the
    divergence point), divided by ``divisor``. A sweep that never climbs back has no divergence
    point to read (its last LR would be the sweep's range, not the model's): LRFindError."""
    lr, loss = _trim(lrs, losses)
    low = int(np.argmin(loss))
    above = np.flatnonzero(loss[low:] > loss[0])
    if not len(above):
        raise LRFindError(
            "the loss never climbed back above its start: no divergence point to read; "
            "raise lr_find.end_lr or choose another lr_find.suggestion"
        )
    return float(lr[low + above[0]]) / divisor


def blowup_lr(lrs, losses, stop: str = "completed") -> float:
    """Where the sweep blew up: :func:`suggest_blowup`'s divergence point, where the loss climbed
    back above its start; where it did not, but the sweep stopped on a diverged or non-finite
    loss (``stop``), the last LR it kept (the curve read leaves out the losses that blew up, so
    it seldom climbs back before its end). NaN where the sweep ran to its end without either."""
    try:
        return suggest_blowup(lrs, losses, divisor=1.0)
    except LRFindError:
        return float(lrs[-1]) if stop != "completed" and len(lrs) else math.nan


def cap(pick: float, blowup: float, margin: float) -> float:
    """``pick``, at most ``blowup / margin`` (``lr_find.blowup_margin``): a max LR at least that
    factor below where the sweep's loss climbed back above its start. As it is where the loss
    never did (``blowup`` NaN) or the margin is 0 (off)."""
    if margin and math.isfinite(blowup):
        return min(pick, blowup / margin)
    return pick


def centered(losses: Iterable[float], sigma: float) -> list[float]:
    """A Gaussian-weighted moving average centred on each step (``sigma`` in steps): unlike the
    EMA it does not lag, so the minimum it shows sits where the raw loss's minimum is. The
    weights are renormalised at both ends."""
    y = np.asarray(list(losses), float)
    if sigma <= 0 or len(y) < 2:
        return y.tolist()
    offsets = np.arange(len(y))
    weights = np.exp(-0.5 * ((offsets[:, None] - offsets[None, :]) / sigma) ** 2)
    return (weights @ y / weights.sum(1)).tolist()


def window(steps: int, fraction: float) -> float:
    """The smoothing window (in steps) for a sweep of ``steps``: ``fraction`` of it, at least 2."""
    return max(2.0, fraction * steps)


def smooth(losses: list[float], how: str, fraction: float) -> list[float]:
    """The raw losses smoothed over ``fraction`` of the sweep: ``ema`` (bias-corrected, beta =
    1 - 1/window, lags about a window) or ``centered`` (Gaussian, sigma = window / 2, no lag)."""
    w = window(len(losses), fraction)
    if how == "ema":
        return ema(losses, 1 - 1 / w)
    if how == "centered":
        return centered(losses, w / 2)
    raise ValueError(f"unknown smoothing {how!r}")


SUGGESTERS = {  # config.SUGGESTIONS' readers, and the lower bound
    "min": suggest_min,
    "min_div10": suggest_min_div10,
    "valley": suggest_valley,
    "steepest": suggest_steepest,
    "lower_bound": suggest_lower_bound,  # a floor for train.base_lr, not a max_lr
}


def check_curve(sweep: Sweep, start_lr: float, num_iter: int) -> None:
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
    raise LRFindError(
        f"the smoothed loss never fell clearly below its start ({first:.3f} -> min {low:.3f} in "
        f"{n} steps, stop: {sweep.stop}); no usable descent. If the loss only rose, lower "
        "lr_find.start_lr; if it stayed flat, raise lr_find.end_lr or lr_find.num_iter."
    )


def suggestions(sweep: Sweep, margin: float = 0.0) -> dict[str, float]:
    """Every suggester's reading of the curve, each max-LR suggestion capped at the blow-up
    over ``margin`` (:func:`cap`; the floor, ``lower_bound``, is not), and ``blowup`` itself."""
    blowup = blowup_lr(sweep.lrs, sweep.smooth, sweep.stop)
    out = {name: fn(sweep.lrs, sweep.smooth) for name, fn in SUGGESTERS.items()}
    capped = {k: cap(v, blowup, margin) for k, v in out.items() if k != "lower_bound"}
    return out | capped | {"blowup": blowup}


def choose(per_seed: list[dict[str, float]], method: str, lr_range: tuple[float, float]) -> dict:
    """Median (and min/max) of each method over the seeds; the chosen one is checked for range."""
    out: dict = {}
    for name in (*SUGGESTERS, "blowup"):
        vals = np.asarray([s.get(name, math.nan) for s in per_seed], float)
        vals = vals[np.isfinite(vals)]
        out[name] = float(np.median(vals)) if len(vals) else float("nan")
        out[f"{name}_min"] = float(vals.min()) if len(vals) else float("nan")
        out[f"{name}_max"] = float(vals.max()) if len(vals) else float("nan")
    for key in ("blowup", "blowup_min", "blowup_max"):  # no sweep climbed back: none, not NaN
        out[key] = out[key] if math.isfinite(out[key]) else None
    chosen = out[method]
    lo, hi = lr_range
    if not (math.isfinite(chosen) and lo <= chosen <= hi):
        raise LRFindError(
            f"suggestion {method!r} gave {chosen!r}, outside the swept range [{lo:g}, {hi:g}]; "
            "try another lr_find.suggestion, or widen start_lr/end_lr"
        )
    out["max_lr"] = chosen
    return out
