"""The hand-off from the range test to training: every ``auto`` in ``train`` made a number
(max_lr, the cyclic base_lr, weight decay, momentum) from lr_find's output, with where each
came from."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from onecycle.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Resolved:
    """The numbers a run trains with where ``train`` says ``auto``, and where each came from."""

    cfg: TrainConfig  # weight_decay and max_momentum as numbers
    max_lr: float
    base_lr: float | None  # the cyclic schedule's floor; None for the others
    sources: dict[str, str]  # "max_lr", "base_lr", ... -> "params" or "lr_find"


def _from_grid(setting, lr_find: dict | None, key: str, grid: str, path: Path) -> tuple[float, str]:
    if setting != "auto":
        return setting, "params"
    value = (lr_find or {}).get(key)
    if not isinstance(value, int | float):
        raise ConfigError(
            f"train.{'max_momentum' if key == 'momentum' else key} is 'auto' but {path} holds no "
            f"{grid} choice: rerun lr_find with lr_find.{grid} set (`dvc repro lr_find`)"
        )
    return float(value), "lr_find"


def resolve(cfg: TrainConfig, lr_find: dict | None, path: Path) -> Resolved:
    """Every ``auto`` of ``cfg`` made a number from lr_find's output (``path``, read as
    ``lr_find``): max_lr, the cyclic base_lr, and the weight decay and momentum of its grids."""
    wd, wd_source = _from_grid(cfg.weight_decay, lr_find, "weight_decay", "weight_decay_grid", path)
    mom, mom_source = _from_grid(cfg.max_momentum, lr_find, "momentum", "momentum_grid", path)
    if mom < cfg.base_momentum:
        raise ConfigError(
            f"train.max_momentum {mom:g} ({mom_source}) is below train.base_momentum "
            f"{cfg.base_momentum:g}: lower train.base_momentum or set train.max_momentum"
        )
    max_lr, lr_source = resolve_max_lr(cfg.max_lr, lr_find, path)
    sources = {"max_lr": lr_source, "weight_decay": wd_source, "max_momentum": mom_source}
    base_lr = None
    if cfg.schedule == "cyclic":
        base_lr, sources["base_lr"] = resolve_base_lr(cfg.base_lr, lr_find, max_lr, path)
    resolved = cfg.model_copy(update={"weight_decay": wd, "max_momentum": mom})
    return Resolved(resolved, max_lr, base_lr, sources)


def resolve_base_lr(
    setting: str | float, lr_find_metrics: dict | None, max_lr: float, path: Path
) -> tuple[float, str]:
    """``train.base_lr`` of the cyclic schedule: a number, or ``auto`` for lr_find's lower-bound
    suggestion. Returns (value, where it came from); refused unless below ``max_lr``."""
    if setting == "auto":
        value = (lr_find_metrics or {}).get("lower_bound")
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(
                f"train.base_lr is 'auto' but {path} holds no usable lower_bound ({value!r}): "
                "run lr_find (`dvc repro lr_find`) or set a number, e.g. -S train.base_lr=0.01"
            )
        source = "lr_find"
    else:
        value, source = setting, "params"
    if value >= max_lr:
        raise ConfigError(
            f"train.base_lr {value:.4g} ({source}) is not below the max LR {max_lr:.4g}: the "
            "cycle would run downwards; lower train.base_lr or raise train.max_lr"
        )
    return float(value), source


def resolve_max_lr(
    setting: str | float, lr_find_metrics: dict | None, path: Path
) -> tuple[float, str]:
    """``train.max_lr``: a number is used as given; ``auto`` takes lr_find's ``max_lr``.

    Returns (value, where it came from: "params" or "lr_find").
    """
    if setting != "auto":
        return float(setting), "params"
    if lr_find_metrics is None:
        raise ConfigError(
            f"train.max_lr is 'auto' but {path} does not exist: run the lr_find stage first "
            "(`dvc repro lr_find`) or set a number, e.g. `dvc exp run -S train.max_lr=0.05`"
        )
    value = lr_find_metrics.get("max_lr")
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{path}: max_lr is {value!r}, not a positive number; rerun `dvc repro lr_find`"
        )
    return float(value), "lr_find"
