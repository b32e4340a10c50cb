"""Typed, frozen view of params.yaml.

Every stage loads the whole file through :func:`load_params`, so a typo anywhere (including one
given to ``dvc exp run -S``) stops the stage before any work, with the key and the allowed values
named. The library below this module takes these objects, never the YAML.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from onecycle import config_errors, params_file
from onecycle.errors import UserError
from onecycle.redact import has_credentials, redact

# lr_find.suggestion's choices (curves.SUGGESTERS reads each); the first is the default, chosen
# by make bench-lr (docs/method.md)
SUGGESTIONS = ("min", "min_div10", "valley", "steepest")
RESNET9 = "resnet9"  # model.arch's default, the custom ResNet (training/model.py)


class ConfigError(UserError):
    """params.yaml (or an override) holds a value the pipeline cannot use."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BaseConfig(_Section):
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    num_workers: Literal["auto"] | int = Field("auto")
    devices: int = Field(1, ge=1)  # >1: data-parallel over this many processes (torchrun, DDP)

    # Checks that a plain Field constraint cannot express are field validators (not model
    # validators), so the error names the key (base.num_workers), not just the section.
    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError("must be 'auto' or an integer >= 0")
        return v


class DataConfig(_Section):
    source: str = Field("cifar10", min_length=1)
    image_size: int = Field(32, ge=8, le=512)
    train_subset: int | None = Field(None, ge=1)
    test_subset: int | None = Field(None, ge=1)
    val_images: int = Field(0, ge=0)  # carved from the training images: what choices are made on
    # the seed the subsets and the validation split are drawn with; None: base.seed, so each seed
    # of a study also trains and validates on other images
    split_seed: int | None = Field(None, ge=0)
    timeout: float = Field(60.0, gt=0)
    # Checked on what a header declares, before reading or decoding: a small archive must not
    # make the stage allocate gigabytes (a 1 GiB zero file compresses to 1 MB).
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_file_mb: float = Field(64.0, gt=0)
    max_total_mb: float = Field(2048.0, gt=0)  # an archive's image files, held in memory

    @field_validator("source")
    @classmethod
    def _no_credentials(cls, v):
        # DVC records every param value in dvc.lock, so a password here would end up in git.
        if isinstance(v, str) and has_credentials(v):
            clean = re.sub(r"://[^/?#]*@", "://", v)
            raise ValueError(
                "a URL with credentials would be recorded in dvc.lock (and git): give "
                f"{redact(clean)} and put them in ~/.netrc (machine <host> login <user> password "
                "<password>) or in ONECYCLE_DATA_USERNAME and ONECYCLE_DATA_PASSWORD, which the "
                "download reads"
            )
        return v


class ModelConfig(_Section):
    arch: str = Field(RESNET9, min_length=1)  # or a torchvision classification model
    width: int = Field(64, ge=1, le=1024)  # resnet9 only
    logit_scale: float = Field(0.125, gt=0)  # resnet9 only
    pretrained: str = Field("none", min_length=1)  # none | default | a weights file
    freeze: Literal["none", "backbone"] = "none"
    backbone_lr_mult: float = Field(1.0, gt=0, le=1e3)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v):
        if v == RESNET9:  # (without importing torch: every stage and check_params load params)
            return v
        from onecycle.training.model import torchvision_archs

        known = torchvision_archs()
        if v not in known:
            close = difflib.get_close_matches(v, [RESNET9, *known], n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"must be {RESNET9} or a torchvision classification model (resnet18, resnet50, "
                f"mobilenet_v3_small, efficientnet_b0, ...: torchvision.models.list_models()){hint}"
            )
        return v

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, v, info: ValidationInfo):
        if v == "default" and info.data.get("arch") == "resnet9":
            raise ValueError(
                "resnet9 has no published weights: give the path of a checkpoint of this "
                "pipeline (models/model.pt of another run), or none"
            )
        return v

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, v, info: ValidationInfo):
        if v == "backbone" and info.data.get("pretrained") == "none":
            raise ValueError(
                "a frozen backbone needs pretrained weights (model.pretrained: default or a "
                "weights file); with none it would train the classifier on random features"
            )
        return v

    def architecture(self) -> dict:
        """What decides the network's shape (with the number of classes): a checkpoint must
        match it to be loaded."""
        if self.arch == "resnet9":
            return {"arch": self.arch, "width": self.width, "logit_scale": self.logit_scale}
        return {"arch": self.arch}


class LRFindConfig(_Section):
    start_lr: float = Field(1e-4, gt=0)
    end_lr: float = Field(10.0, gt=0, validate_default=True)  # checked against start_lr
    num_iter: int = Field(200, ge=5)
    mode: Literal["exp", "linear"] = "exp"
    momentum: float = Field(0.9, ge=0, lt=1)
    smooth: Literal["centered", "ema"] = "centered"
    smooth_window: float = Field(0.2, gt=0, le=0.5)  # a fraction of the sweep's steps
    diverge_factor: float = Field(4.0, gt=1)
    suggestion: Literal[SUGGESTIONS] = SUGGESTIONS[0]  # chosen by make bench-lr
    # the pick at most the blow-up LR (curves.blowup_lr) over this; 0 = off
    blowup_margin: float = Field(12.0, ge=0)
    seeds: int = Field(3, ge=1, le=20)
    val_images: int = Field(0, ge=0)
    refine: int = Field(0, ge=0, le=8)  # candidates probed by training (range_test/refine.py)
    refine_epochs: float = Field(1.5, gt=0, le=100)  # the first probes' length
    momentum_grid: list[float] = Field(default_factory=list)
    weight_decay_grid: list[float] = Field(default_factory=list)

    @field_validator("momentum_grid", "weight_decay_grid")
    @classmethod
    def _grid(cls, v, info: ValidationInfo):
        what, example = {
            "momentum_grid": ("momentum", "[0.85, 0.9, 0.95, 0.99]"),
            "weight_decay_grid": ("weight decay", "[1e-4, 5e-4, 1e-3]"),
        }[info.field_name]
        if any(not 0 < x < 1 for x in v):
            raise ValueError(f"every value must be a {what} in (0, 1), e.g. {example}")
        return sorted(set(v))

    @field_validator("blowup_margin")
    @classmethod
    def _margin(cls, v):
        if 0 < v < 1:
            raise ValueError("a factor below the blow-up LR: 0 (off) or 1 or more (12 is usual)")
        return v

    @field_validator("refine")
    @classmethod
    def _refine(cls, v):
        if v == 1:
            raise ValueError("probes compare max LRs: 0 (off) or 2 or more (4 is usual)")
        return v

    @field_validator("end_lr")
    @classmethod
    def _range(cls, v, info: ValidationInfo):
        start = info.data.get("start_lr")  # absent when start_lr itself was invalid
        if start is not None and v <= start:
            raise ValueError(f"must be greater than lr_find.start_lr ({start})")
        return v


class AugmentConfig(_Section):
    backend: Literal["auto", "albumentations", "torch"] = "auto"
    pad: int = Field(4, ge=0, le=64)
    flip: bool = True
    cutout: int = Field(8, ge=0, le=512)
    cutout_p: float = Field(1.0, ge=0, le=1)


class TrainConfig(_Section):
    max_lr: Literal["auto"] | float = "auto"
    epochs: int = Field(24, ge=1)
    batch_size: int = Field(512, ge=1)
    schedule: Literal["onecycle", "constant", "step", "cyclic"] = "onecycle"
    pct_start: float = Field(5 / 24, gt=0, lt=1)
    div_factor: float = Field(10.0, ge=1)
    final_div_factor: float = Field(1000.0, ge=1)
    three_phase: bool = False
    anneal_strategy: Literal["linear", "cos"] = "linear"
    cycle_momentum: bool = True
    base_momentum: float = Field(0.85, ge=0, lt=1)
    max_momentum: Literal["auto"] | float = Field(0.95, validate_default=True)
    nesterov: bool = Field(True, validate_default=True)
    weight_decay: Literal["auto"] | float = 5e-4
    step_epochs: int = Field(8, ge=1)  # schedule step: epochs between LR drops
    step_gamma: float = Field(0.1, gt=0, le=1)  # schedule step: the LR's factor at each drop
    base_lr: Literal["auto"] | float = "auto"
    cycle_epochs: float = Field(4.0, gt=0)
    cyclic_mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    cyclic_gamma: float = Field(1.0, gt=0, le=1)
    eval_every: int = Field(1, ge=0)
    compile: Literal["auto"] | bool = "auto"
    augment: AugmentConfig = AugmentConfig()

    @field_validator("max_lr", "base_lr")
    @classmethod
    def _lr(cls, v, info: ValidationInfo):
        if isinstance(v, float) and not (0 < v < float("inf")):
            raise ValueError("must be 'auto' or a finite number > 0")
        max_lr = info.data.get("max_lr")
        cyclic = info.field_name == "base_lr" and info.data.get("schedule") == "cyclic"
        if cyclic and isinstance(v, float) and isinstance(max_lr, float) and v >= max_lr:
            raise ValueError(f"must be below train.max_lr ({max_lr}): the cycle runs up to it")
        return v

    @field_validator("cycle_epochs")
    @classmethod
    def _cycle(cls, v, info: ValidationInfo):
        epochs = info.data.get("epochs")
        if info.data.get("schedule") == "cyclic" and epochs is not None and v > epochs:
            raise ValueError(
                f"a cycle of {v:g} epochs is longer than training (train.epochs {epochs}); "
                "shorten it or train longer"
            )
        return v

    @field_validator("max_momentum")
    @classmethod
    def _momentum(cls, v, info: ValidationInfo):
        if v == "auto":
            return v
        if not 0 <= v < 1:
            raise ValueError("must be 'auto' (lr_find's momentum_grid choice) or in [0, 1)")
        base = info.data.get("base_momentum")
        if base is not None and base > v:
            raise ValueError(f"must not be below train.base_momentum ({base})")
        return v

    @field_validator("weight_decay")
    @classmethod
    def _weight_decay(cls, v):
        if v != "auto" and not 0 <= v < float("inf"):
            raise ValueError("must be 'auto' (lr_find's weight_decay_grid choice) or >= 0")
        return v

    @field_validator("nesterov")
    @classmethod
    def _nesterov(cls, v, info: ValidationInfo):
        if v and info.data.get("max_momentum") == 0:
            raise ValueError("needs train.max_momentum > 0 (set nesterov: false)")
        return v


class EvaluateConfig(_Section):
    batch_size: int = Field(1000, ge=1)
    # MLflow Model Registry name the evaluated model is registered under; null = not registered
    register_as: str | None = Field("cifar10-resnet9", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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

    @property
    def split_seed(self) -> int:
        """What ``data.train_subset``, ``data.test_subset`` and ``data.val_images`` are drawn
        with: ``data.split_seed``, else ``base.seed``."""
        return self.base.seed if self.data.split_seed is None else self.data.split_seed


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            f"{source} is invalid:\n" + "\n".join(config_errors.lines(exc.errors(), Params))
        ) from None
    problems = config_errors.across_sections(params)
    if problems:
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(problems))
    return params


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Load the stage's params.yaml from the working directory.

    Not from $DVC_ROOT: a queued experiment runs in a temporary copy whose params.yaml holds the
    experiment's overrides, while DVC_ROOT still names the original repository.
    """
    path = Path(path)
    try:
        raw = params_file.read_yaml(path)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run from the repository root") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw, str(path))
