"""Typed, frozen view of params.yaml.

Every stage loads the whole file through :func:`load_params`, so a typo anywhere (including one
given to ``dvc exp run -S``) stops the stage before any work, with the key and the allowed values
named. The library below this module takes these objects, never the YAML.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """params.yaml (or an override) holds a value the pipeline cannot use."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BaseConfig(_Section):
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    num_workers: Literal["auto"] | int = Field("auto")

    @model_validator(mode="after")
    def _workers(self):
        if isinstance(self.num_workers, int) and self.num_workers < 0:
            raise ValueError("num_workers must be 'auto' or an integer >= 0")
        return self


class DataConfig(_Section):
    source: str = Field("cifar10", min_length=1)
    image_size: int = Field(32, ge=8, le=512)
    train_subset: int | None = Field(None, ge=1)
    test_subset: int | None = Field(None, ge=1)
    timeout: float = Field(60.0, gt=0)


class ModelConfig(_Section):
    width: int = Field(64, ge=1, le=1024)
    logit_scale: float = Field(0.125, gt=0)


class LRFindConfig(_Section):
    start_lr: float = Field(1e-4, gt=0)
    end_lr: float = Field(10.0, gt=0)
    num_iter: int = Field(100, ge=5)
    mode: Literal["exp", "linear"] = "exp"
    momentum: float = Field(0.9, ge=0, lt=1)
    smooth_beta: float = Field(0.98, ge=0, lt=1)
    diverge_factor: float = Field(4.0, gt=1)
    suggestion: Literal["valley", "steepest", "min_div10"] = "valley"
    seeds: int = Field(1, ge=1, le=20)
    val_images: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _range(self):
        if self.end_lr <= self.start_lr:
            raise ValueError(
                f"end_lr ({self.end_lr}) must be greater than start_lr ({self.start_lr})"
            )
        return self


class AugmentConfig(_Section):
    pad: int = Field(4, ge=0, le=64)
    flip: bool = True
    cutout: int = Field(8, ge=0, le=512)
    cutout_p: float = Field(1.0, ge=0, le=1)


class TrainConfig(_Section):
    max_lr: Literal["auto"] | float = "auto"
    epochs: int = Field(24, ge=1)
    batch_size: int = Field(512, ge=1)
    schedule: Literal["onecycle", "constant", "step"] = "onecycle"
    pct_start: float = Field(5 / 24, gt=0, lt=1)
    div_factor: float = Field(10.0, ge=1)
    final_div_factor: float = Field(1000.0, ge=1)
    three_phase: bool = False
    anneal_strategy: Literal["linear", "cos"] = "linear"
    cycle_momentum: bool = True
    base_momentum: float = Field(0.85, ge=0, lt=1)
    max_momentum: float = Field(0.95, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    step_size: int = Field(8, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    eval_every: int = Field(1, ge=0)
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _checks(self):
        if isinstance(self.max_lr, float) and not (0 < self.max_lr < float("inf")):
            raise ValueError(f"max_lr must be 'auto' or a finite number > 0, got {self.max_lr}")
        if self.base_momentum > self.max_momentum:
            raise ValueError("base_momentum must not exceed max_momentum")
        if self.nesterov and self.max_momentum == 0:
            raise ValueError("nesterov needs momentum > 0 (set nesterov: false)")
        return self


class EvaluateConfig(_Section):
    batch_size: int = Field(1000, ge=1)


class PlotsConfig(_Section):
    gallery_size: int = Field(36, ge=1, le=400)
    dpi: int = Field(120, ge=50, le=600)


class Params(_Section):
    base: BaseConfig = BaseConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    lr_find: LRFindConfig = LRFindConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    plots: PlotsConfig = PlotsConfig()


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(
        str(p) for p in err["loc"] if not str(p).startswith(("literal[", "float", "int"))
    )
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (a typo?); see params.yaml and README.md for the keys each section takes"
    got = err.get("input")
    shown = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
    return f"  {key or '<top level>'}: {msg}{shown}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        # Unions report one error per branch; keep one line per key.
        lines = list(dict.fromkeys(_describe(e) for e in exc.errors()))
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines)) from None


def repo_root() -> Path:
    """The repository root: $DVC_ROOT when DVC runs a stage, else the nearest folder with dvc.yaml."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return here


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Load the stage's params.yaml from the working directory.

    Not from $DVC_ROOT: a queued experiment runs in a temporary copy whose params.yaml holds the
    experiment's overrides, while DVC_ROOT still names the original repository.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run from the repository root") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw, str(path))


def resolve_path(value: str | os.PathLike, root: Path | None = None) -> Path:
    """A relative path from params resolves against the repository root, not the cwd."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root or repo_root()) / p
