"""Learning-rate and momentum schedules as pure functions of the step.

Each training schedule maps a 0-based step to the ``(lr, momentum)`` that step uses; the loop
writes both into the optimizer's param groups before the step (as the range test writes its LR),
so no scheduler object holds state and a resumed run needs only its step number.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from onecycle.config import TrainConfig

Schedule = Callable[[int], tuple[float, float]]  # step -> (lr, momentum)


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


def _anneal(start: float, end: float, pct: float, strategy: str) -> float:
    """torch's OneCycleLR annealing, term for term (so the values agree to the last bit)."""
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def one_cycle(
    step: int,
    total_steps: int,
    max_lr: float,
    *,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
    three_phase: bool,
    anneal_strategy: str,
    cycle_momentum: bool,
    base_momentum: float,
    max_momentum: float,
) -> tuple[float, float]:
    """Smith's 1cycle as torch's ``OneCycleLR`` computes it for its ``step``-th step.

    LR: max_lr / div_factor -> max_lr (at pct_start of the steps) -> that / final_div_factor;
    with ``three_phase`` back down to the start before the final annihilation. Momentum runs the
    other way (max -> base -> max), or stays at max_momentum without ``cycle_momentum``.
    """
    initial = max_lr / div_factor
    final = initial / final_div_factor
    up = float(pct_start * total_steps) - 1  # the step where the LR peaks
    if three_phase:  # (last step of the phase, lr from, lr to, momentum from, momentum to)
        phases = [
            (up, initial, max_lr, max_momentum, base_momentum),
            (float(2 * pct_start * total_steps) - 2, max_lr, initial, base_momentum, max_momentum),
            (total_steps - 1, initial, final, max_momentum, max_momentum),
        ]
    else:
        phases = [
            (up, initial, max_lr, max_momentum, base_momentum),
            (total_steps - 1, max_lr, final, base_momentum, max_momentum),
        ]
    start = 0.0
    for i, (end, lr_from, lr_to, m_from, m_to) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            pct = (step - start) / (end - start)
            lr = _anneal(lr_from, lr_to, pct, anneal_strategy)
            mom = _anneal(m_from, m_to, pct, anneal_strategy) if cycle_momentum else max_momentum
            return lr, mom
        start = end
    raise AssertionError("unreachable: the last phase always matches")


def cyclic(
    step: int,
    base_lr: float,
    max_lr: float,
    *,
    step_size_up: float,
    step_size_down: float,
    mode: str,
    gamma: float,
    cycle_momentum: bool,
    base_momentum: float,
    max_momentum: float,
) -> tuple[float, float]:
    """Smith's cyclical LR as torch's ``CyclicLR`` computes it for its ``step``-th step.

    The LR climbs from ``base_lr`` to ``max_lr`` over ``step_size_up`` steps and back over
    ``step_size_down``, again and again; ``triangular2`` halves the height every cycle,
    ``exp_range`` scales it by ``gamma ** step``. Momentum runs the other way (max at base_lr).
    """
    total = step_size_up + step_size_down
    ratio = step_size_up / total
    cycle = math.floor(1 + step / total)
    x = 1.0 + step / total - cycle
    factor = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
    scale = {
        "triangular": lambda: 1.0,
        "triangular2": lambda: 1 / (2.0 ** (cycle - 1)),
        "exp_range": lambda: gamma**step,
    }[mode]()
    lr = base_lr + (max_lr - base_lr) * factor * scale
    if not cycle_momentum:
        return lr, max_momentum
    return lr, max_momentum - (max_momentum - base_momentum) * factor * scale


def constant(step: int, max_lr: float, momentum: float) -> tuple[float, float]:
    return max_lr, momentum


def step_decay(
    step: int, max_lr: float, momentum: float, step_size: int, gamma: float
) -> tuple[float, float]:
    """``max_lr * gamma ** (step // step_size)`` (torch's StepLR, ``step_size`` in steps)."""
    return max_lr * gamma ** (step // step_size), momentum


def for_training(
    cfg: TrainConfig, max_lr: float, steps_per_epoch: int, base_lr: float | None = None
) -> Schedule:
    """The ``train.schedule`` of ``cfg``, bound to its settings: call it with a step.
    ``base_lr`` (resolved from ``train.base_lr``) is the cyclic schedule's floor."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return functools.partial(
            one_cycle,
            total_steps=total,
            max_lr=max_lr,
            pct_start=cfg.pct_start,
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
            three_phase=cfg.three_phase,
            anneal_strategy=cfg.anneal_strategy,
            cycle_momentum=cfg.cycle_momentum,
            base_momentum=cfg.base_momentum,
            max_momentum=cfg.max_momentum,
        )
    if cfg.schedule == "constant":
        return functools.partial(constant, max_lr=max_lr, momentum=cfg.max_momentum)
    if cfg.schedule == "cyclic":
        if base_lr is None or not 0 < base_lr < max_lr:
            raise ValueError(
                f"the cyclic schedule needs 0 < base_lr < max_lr, got {base_lr}, {max_lr}"
            )
        half = cfg.cycle_epochs * steps_per_epoch / 2
        return functools.partial(
            cyclic,
            base_lr=base_lr,
            max_lr=max_lr,
            step_size_up=half,
            step_size_down=half,
            mode=cfg.cyclic_mode,
            gamma=cfg.cyclic_gamma,
            cycle_momentum=cfg.cycle_momentum,
            base_momentum=cfg.base_momentum,
            max_momentum=cfg.max_momentum,
        )
    if cfg.schedule == "step":
        return functools.partial(
            step_decay,
            max_lr=max_lr,
            momentum=cfg.max_momentum,
            step_size=cfg.step_epochs * steps_per_epoch,  # the one place epochs become steps
            gamma=cfg.step_gamma,
        )
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
