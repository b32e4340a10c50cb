"""Leslie Smith's LR range test on the real training session, and the momentum and weight-decay
grids that repeat it once per value (Smith, "A disciplined approach", part 1).

What is read off a curve lives in :mod:`onecycle.range_test.curves`; this module produces the curves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from onecycle import progress
from onecycle.config import Params
from onecycle.data.prepared import Prepared
from onecycle.data.preprocess import normalize
from onecycle.range_test import handoff, refine
from onecycle.range_test.curves import (
    SUGGESTERS,
    LRFindError,
    Sweep,
    check_curve,
    choose,
    run_sweep,
    suggestions,
    window,
)
from onecycle.range_test.refine import Refinement
from onecycle.training import init_weights
from onecycle.training.distributed import ONE, Ranks
from onecycle.training.runtime import Device, predict
from onecycle.training.schedule import sweep_lrs
from onecycle.training.session import build_session


def _held_out(data: Prepared, val_images: int, seed: int):
    """(indices to train on, normalized held-out images and labels or None). The held-out
    images come from the validation split when there is one (``data.val_images``), else they
    are carved from the training images."""
    n = len(data.y_train)
    if not val_images:
        return None, None
    if data.has_val:
        take = np.random.default_rng([seed, 1]).permutation(len(data.y_val))[:val_images]
        x_val = normalize(data.x_val[take], data.mean, data.std)
        return None, (x_val, torch.from_numpy(data.y_val[take]))
    if val_images >= n // 2:
        raise LRFindError(f"lr_find.val_images={val_images} leaves too few training images ({n})")
    held = np.random.default_rng([seed, 1]).permutation(n)
    val_idx = held[:val_images]
    x_val = normalize(data.x_train[val_idx], data.mean, data.std)
    return held[val_images:], (x_val, torch.from_numpy(data.y_train[val_idx]))


def range_test(
    params: Params,
    data: Prepared,
    dev: Device,
    seed: int,
    desc: str = "lr_find",
    weights: init_weights.InitialWeights = init_weights.RANDOM,
    ranks: Ranks = ONE,
    read: bool = True,
) -> Sweep:
    """Sweep the LR over ``lr_find.num_iter`` mini-batches of the training data, in the session
    that training builds (same model, initial weights, optimizer, loss and augmentation as
    ``params.train``: the LR swept is the head's, the backbone's is ``model.backbone_lr_mult``
    times it). The sweep stops on an EMA of the loss over ``lr_find.smooth_window`` of its steps
    (all that is known while it runs); the curve returned is smoothed by ``lr_find.smooth``
    over the same window, centered by default so its minimum does not lag. With ``read``
    False, the sweep as it ran (every raw loss up to its stop): what the LR-choice benchmark
    stores, so that a change in how curves are read never alters stored data."""
    lr_cfg = params.lr_find
    train_idx, val = _held_out(data, lr_cfg.val_images, seed)
    session = build_session(
        params.model,
        params.train,
        data,
        dev,
        seed,
        momentum=lr_cfg.momentum,
        indices=train_idx,
        weights=weights,
        ranks=ranks,
    )
    batches = session.stream()
    session.model.train()

    def step(lr: float) -> float:  # the mean over the ranks' shares of the batch
        loss, _ = session.step(*next(batches), lr, lr_cfg.momentum)
        return session.ranks.mean(loss)

    def val_loss() -> float:  # rank 0's model (its BatchNorm statistics) decides, on every rank
        x, y = val
        loss = F.cross_entropy(predict(session.model, x, dev), y)
        return session.ranks.main_value(loss)

    lrs = sweep_lrs(lr_cfg.num_iter, lr_cfg.start_lr, lr_cfg.end_lr, lr_cfg.mode)
    with progress.bar(len(lrs), desc) as bar:

        def show(i: int, smoothed: float) -> None:
            bar.set_postfix(lr=f"{lrs[i - 1]:.3g}", loss=f"{smoothed:.3f}", refresh=False)
            bar.update()

        beta = 1 - 1 / window(lr_cfg.num_iter, lr_cfg.smooth_window)
        sweep = run_sweep(step, lrs, beta, lr_cfg.diverge_factor, val_loss if val else None, show)
    return (
        sweep.reread(lr_cfg.smooth, lr_cfg.smooth_window, lr_cfg.diverge_factor) if read else sweep
    )


def _curve_rows(sweep: Sweep, **keys) -> list[dict]:
    rows = []
    for i, (lr, loss, smooth) in enumerate(zip(sweep.lrs, sweep.losses, sweep.smooth, strict=True)):
        row = {**keys, "step": i, "lr": lr, "loss": loss, "smooth_loss": smooth}
        if sweep.val_losses:
            row["val_loss"] = sweep.val_losses[i]
        rows.append(row)
    return rows


GRID_RULE = (
    "the value whose sweep reaches the lowest loss (held-out loss when lr_find.val_images > 0, "
    "else the smoothed training loss)"
)


@dataclass
class Grid:
    """The LR sweep repeated once per value of momentum or weight decay (Smith's part 1)."""

    name: str  # "momentum" or "weight_decay"
    values: list[float]
    sweeps: list[Sweep]

    def _loss(self, sweep: Sweep) -> list[float]:
        return sweep.val_losses or sweep.smooth

    def summary(self) -> dict:
        """Per value: the lowest loss, the LR there, and the LR where the sweep blew up (None
        when it did not); the chosen value, by GRID_RULE."""
        lows = [min(self._loss(s)) for s in self.sweeps]
        at = [s.lrs[int(np.argmin(self._loss(s)))] for s in self.sweeps]
        diverged = [s.lrs[-1] if s.stop != "completed" else None for s in self.sweeps]
        return {
            "values": self.values,
            "min_loss": lows,
            "lr_at_min": at,
            "diverged_at": diverged,
            "chosen": self.values[int(np.argmin(lows))],
            "rule": GRID_RULE,
        }

    def rows(self) -> list[dict]:
        return [
            r
            for v, s in zip(self.values, self.sweeps, strict=True)
            for r in _curve_rows(s, grid=self.name, value=v)
        ]


def grid(
    params: Params,
    data: Prepared,
    dev: Device,
    name: str,
    values: list[float],
    weights: init_weights.InitialWeights = init_weights.RANDOM,
    ranks: Ranks = ONE,
) -> Grid:
    """One LR sweep per value, everything else equal (``base.seed``, the held-out split)."""
    where = {"momentum": "lr_find", "weight_decay": "train"}[name]
    sweeps = []
    for value in values:
        section = getattr(params, where).model_copy(update={name: value})
        varied = params.model_copy(update={where: section})
        sweep = range_test(
            varied, data, dev, params.base.seed, f"lr_find {name} {value:g}", weights, ranks
        )
        check_curve(sweep, params.lr_find.start_lr, params.lr_find.num_iter)
        sweeps.append(sweep)
    return Grid(name, list(values), sweeps)


@dataclass
class Finding:
    """What the lr_find stage records: every seed's sweep and suggestions, and the choice."""

    seeds: list[int]
    sweeps: list[Sweep]
    per_seed: list[dict[str, float]]
    result: dict  # choose()'s: max_lr, and every method's median, min and max
    grids: list[Grid]  # the momentum and weight-decay grids that ran (none by default)
    refined: Refinement | None = None  # lr_find.refine's probes; result's max_lr is its choice
    margin: float = 0.0  # lr_find.blowup_margin: the picks were capped at the blow-up over it

    def curve_rows(self) -> list[dict]:
        """metrics/lr_find_curve.csv: one row per step of every seed's sweep."""
        return [
            r
            for seed, s in zip(self.seeds, self.sweeps, strict=True)
            for r in _curve_rows(s, seed=seed)
        ]

    def grid_rows(self) -> list[dict]:
        """metrics/lr_find_grid.csv: one row per step of every grid value's sweep."""
        return [r for g in self.grids for r in g.rows()]

    def metrics(self, method: str) -> dict:
        """metrics/lr_find.json."""
        first = self.sweeps[0]
        chosen = {g.name: g.summary() for g in self.grids}
        return {
            **self.result,
            "method": method,
            "blowup_margin": self.margin,
            "steps": len(first.lrs),
            "stop": first.stop,
            "seeds": len(self.seeds),
            **{name: summary["chosen"] for name, summary in chosen.items()},
            "grids": chosen,
            **({"refine": self.refined.summary()} if self.refined else {}),
        }

    def describe(self, method: str) -> str:
        """One line: the choice, its spread over the seeds, and every method's first-seed pick."""
        r = self.result
        spread = f" (seeds: {r[method + '_min']:.3g}..{r[method + '_max']:.3g})"
        picks = ", ".join(f"{m} {self.per_seed[0][m]:.3g}" for m in SUGGESTERS)
        spread = spread if len(self.seeds) > 1 else ""
        by = f"by {method}{spread}"
        if self.margin and r.get("blowup") is not None:  # the cap, whether it bound or not
            b = r["blowup"]
            by += f"; blow-up {b:.3g}, cap {b / self.margin:.3g} (blow-up / {self.margin:g})"
        if self.refined:
            by = f"refined from {method}'s {r['curve_max_lr']:.4g}{spread} by {self.refined.describe()}"
        return f"max_lr = {r['max_lr']:.4g} {by}; {picks}"


def find(
    params: Params,
    data: Prepared,
    dev: Device,
    weights: init_weights.InitialWeights = init_weights.RANDOM,
    ranks: Ranks = ONE,
) -> Finding:
    """The grids first (weight decay, then momentum), each choice taken where the train params
    say ``auto``; then the range test once per seed (``lr_find.seeds`` of them from
    ``base.seed`` on), each curve checked, and the median of ``lr_find.suggestion`` chosen;
    with ``lr_find.refine``, that pick checked by short training probes (:mod:`refine`)."""
    lr_cfg = params.lr_find
    grids = []
    if lr_cfg.weight_decay_grid:
        grids.append(
            grid(params, data, dev, "weight_decay", lr_cfg.weight_decay_grid, weights, ranks)
        )
        if params.train.weight_decay == "auto":  # the LR sweeps below use the choice
            chosen = grids[-1].summary()["chosen"]
            train = params.train.model_copy(update={"weight_decay": chosen})
            params = params.model_copy(update={"train": train})
    if lr_cfg.momentum_grid:
        grids.append(grid(params, data, dev, "momentum", lr_cfg.momentum_grid, weights, ranks))
    seeds = [params.base.seed + k for k in range(lr_cfg.seeds)]
    sweeps = []
    for k, s in enumerate(seeds):
        desc = f"lr_find seed {k + 1}/{len(seeds)}"
        sweep = range_test(params, data, dev, s, desc, weights, ranks)
        check_curve(sweep, lr_cfg.start_lr, lr_cfg.num_iter)
        sweeps.append(sweep)
    per_seed = [suggestions(sweep, lr_cfg.blowup_margin) for sweep in sweeps]
    swept = (lr_cfg.start_lr, min(sweep.lrs[-1] for sweep in sweeps))
    result = choose(per_seed, lr_cfg.suggestion, swept)
    refined = None
    if lr_cfg.refine:  # the curve's pick checked by short training runs (range_test/refine.py)
        chosen = {g.name: g.summary()["chosen"] for g in grids}
        # every auto of train made a number, as train will (the path only names the file in
        # errors, which the config checks rule out here)
        train = handoff.resolve(params.train, {**chosen, **result}, Path("lr_find")).cfg
        probed = params.model_copy(update={"train": train})
        refined = refine.refine(probed, data, dev, result["max_lr"], weights, ranks)
        result = result | {"curve_max_lr": result["max_lr"], "max_lr": refined.chosen}
    return Finding(seeds, sweeps, per_seed, result, grids, refined, lr_cfg.blowup_margin)
