"""``lr_find.refine``: the curve's pick checked by training, for when the loss curve alone
misleads (make bench-lr: on mobilenet_v3_small the curve's minimum lay 1-6x above the best max
LR, and its accuracy fell 14 points from 0.1 to 0.4).

Short 1cycle probes at max LRs a factor 2 apart around the pick, each scored on the validation
split, the better half kept and probed twice as long, until one is left: successive halving
(Jamieson & Talwalkar, AISTATS 2016; the inner loop of Li et al.'s Hyperband). Every probe starts
from the same initial weights and sees the same batches (``base.seed``), so the candidates
differ only in their LR.

The halving is pure (:func:`halve`, :func:`candidates`); :func:`refine` runs the probes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from onecycle import progress
from onecycle.config import Params
from onecycle.data.prepared import Prepared
from onecycle.range_test.curves import LRFindError
from onecycle.training import init_weights, schedule
from onecycle.training.distributed import ONE, Ranks
from onecycle.training.loop import evaluate
from onecycle.training.plan import split_tensors
from onecycle.training.runtime import Device
from onecycle.training.session import build_session

MIN_PROBE_STEPS = 10  # below this a 1cycle probe has no warm-up to speak of
BN_BATCHES = 16  # training batches that re-estimate BatchNorm's statistics before a probe's score


@dataclass(frozen=True)
class Probe:
    """One short 1cycle run: its max LR, length and what the validation split made of it."""

    max_lr: float
    round: int  # 1-based
    steps: int
    val_acc: float  # 0 where the loss went non-finite
    val_loss: float  # inf where it went non-finite
    seconds: float


def recalibrate_batchnorm(model: torch.nn.Module, batches, count: int) -> None:
    """BatchNorm's running statistics recomputed as the plain average over ``count`` training
    batches (no gradient; "precise BN", Wu & Johnson 2021). After a short probe they are still
    near their start, most with torchvision's momentum of 0.01 (mobilenet_v3: 1 - 0.99^49 = 39 %
    of the way after 49 steps), and in eval mode every probe scored 10.0 %, chance, whatever
    its LR: the halving then chose on noise."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    was_training = model.training
    model.train()
    with torch.no_grad():
        for _ in range(count):
            model(next(batches)[0])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def candidates(pick: float, count: int) -> list[float]:
    """``count`` max LRs a factor 2 apart, from twice the curve's ``pick`` down (4: 2p, p, p/2,
    p/4). One step above the pick because the pick itself is noisy (a median of sweeps whose
    minima spread 1.5-3x); the rest below because above the curve's minimum the loss rises."""
    return [pick * 2.0 ** (1 - k) for k in range(count)]


def rank(probes: list[Probe]) -> list[Probe]:
    """Best first: highest validation accuracy, then lowest validation loss, then the lower LR
    (the safer one on a tie)."""
    return sorted(probes, key=lambda p: (-p.val_acc, p.val_loss, p.max_lr))


def halve(
    lrs: list[float], first_steps: int, run: Callable[[float, int, int], Probe]
) -> list[list[Probe]]:
    """Successive halving: every LR in ``lrs`` probed for ``first_steps``; the better half
    (rounded up) probed again at twice the steps, from the start; until one is left. ``run(lr,
    steps, round)`` trains one probe. Returns the probes round by round; the winner is
    ``rank(rounds[-1])[0]``."""
    rounds: list[list[Probe]] = []
    alive, steps = list(lrs), first_steps
    while True:
        probes = [run(lr, steps, len(rounds) + 1) for lr in alive]
        rounds.append(probes)
        if len(alive) <= 2:  # a last round of one would only repeat its winner
            return rounds
        alive = [p.max_lr for p in rank(probes)[: (len(alive) + 1) // 2]]
        steps *= 2


def probe_cost(count: int, first_steps: int) -> int:
    """Optimizer steps all of :func:`halve`'s probes take together."""
    total, alive, steps = 0, count, first_steps
    while True:
        total += alive * steps
        if alive <= 2:
            return total
        alive, steps = (alive + 1) // 2, steps * 2


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf


@dataclass
class Refinement:
    """What the refine step records: the curve's pick, every probe, and the LR it chose."""

    curve_pick: float
    rounds: list[list[Probe]]
    steps_per_epoch: int

    @property
    def probes(self) -> list[Probe]:
        return [p for r in self.rounds for p in r]

    @property
    def chosen(self) -> float:
        return rank(self.rounds[-1])[0].max_lr

    def summary(self) -> dict:
        """metrics/lr_find.json's ``refine`` section."""
        probes = self.probes
        return {
            "curve_pick": self.curve_pick,
            "chosen": self.chosen,
            "candidates": [p.max_lr for p in self.rounds[0]],
            "probes": [asdict(p) | {"val_loss": _finite(p.val_loss)} for p in probes],
            "steps": sum(p.steps for p in probes),
            "epochs": sum(p.steps for p in probes) / self.steps_per_epoch,
            "seconds": sum(p.seconds for p in probes),
            "rule": "successive halving on validation accuracy (then loss), 1cycle probes",
        }

    def describe(self) -> str:
        last = ", ".join(f"{p.max_lr:.3g}: {100 * p.val_acc:.1f} %" for p in rank(self.rounds[-1]))
        s = self.summary()
        return f"{len(s['probes'])} probes ({s['epochs']:.2f} epochs; last round, val. accuracy: {last})"


class _Prober:
    """Short 1cycle runs of ``params.train`` from the same initial weights and batches, each
    scored on the validation split with BatchNorm's statistics re-estimated."""

    def __init__(self, params: Params, data: Prepared, dev: Device, weights, ranks: Ranks):
        self.params, self.data, self.dev = params, data, dev
        self.weights, self.ranks = weights, ranks
        self.x_val, self.y_val = split_tensors(data, dev, "val")
        self.steps_per_epoch = self._session().steps_per_epoch

    def _session(self):
        p = self.params
        return build_session(
            p.model, p.train, self.data, self.dev, p.base.seed, p.train.base_momentum,
            weights=self.weights, ranks=self.ranks,
        )  # fmt: skip

    def run(self, lr: float, steps: int, round_: int, bar) -> Probe:
        t0 = time.perf_counter()
        s = self._session()
        sched = schedule.for_training(self.params.train.model_copy(update={"epochs": 1}), lr, steps)
        batches = s.stream()
        s.model.train()
        for step in range(steps):
            s.step(*next(batches), *sched(step))
            bar.set_postfix(round=round_, lr=f"{lr:.3g}", refresh=False)
            bar.update()
        recalibrate_batchnorm(s.model, batches, BN_BATCHES)
        loss, acc = evaluate(s.model, self.x_val, self.y_val, self.dev)
        # rank 0's score on every rank (each re-estimated BatchNorm on its own shard), so that
        # all ranks keep the same candidates and train them in step
        loss, acc = (
            s.ranks.main_value(torch.tensor(v, device=self.dev.device)) for v in (loss, acc)
        )
        if not math.isfinite(loss):
            loss, acc = math.inf, 0.0
        return Probe(lr, round_, steps, acc, loss, time.perf_counter() - t0)


def refine(
    params: Params,
    data: Prepared,
    dev: Device,
    pick: float,
    weights: init_weights.InitialWeights = init_weights.RANDOM,
    ranks: Ranks = ONE,
) -> Refinement:
    """:func:`halve` over :func:`candidates` of ``pick``, each probe a 1cycle run of
    ``params.train`` (its batch, weight decay, momentum, augmentation, pct_start; every ``auto``
    already made a number) cut to the probe's steps, scored on the validation split
    (``data.val_images``). The first round's probes are ``lr_find.refine_epochs`` long."""
    if not data.has_val:
        raise LRFindError(
            "lr_find.refine scores its probes on the validation split, and data/prepared has "
            "none: set data.val_images (e.g. 1000), or lr_find.refine: 0"
        )
    prober = _Prober(params, data, dev, weights, ranks)
    first = max(MIN_PROBE_STEPS, round(params.lr_find.refine_epochs * prober.steps_per_epoch))
    lrs = candidates(pick, params.lr_find.refine)
    with progress.bar(probe_cost(len(lrs), first), "lr_find refine") as bar:
        rounds = halve(lrs, first, lambda lr, steps, round_: prober.run(lr, steps, round_, bar))
    if not math.isfinite(rank(rounds[-1])[0].val_loss):
        raise LRFindError(
            f"every lr_find.refine probe's loss went non-finite (max LRs "
            f"{', '.join(f'{lr:.3g}' for lr in lrs)}, around the curve's pick {pick:.3g}): "
            "the curve's pick is far too high; lower lr_find.end_lr or choose another "
            "lr_find.suggestion"
        )
    return Refinement(pick, rounds, prober.steps_per_epoch)
