"""What every stage that runs the network shares: device choice, model and optimizer
construction, one SGD step, and prediction."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from onecycle.config import ConfigError, ModelConfig
from onecycle.training.model import build


@dataclass(frozen=True)
class Device:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype on CUDA, None elsewhere
    num_workers: int

    @property
    def type(self) -> str:
        return self.device.type

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def select_device(preference: str = "auto", num_workers: int | str = "auto") -> Device:
    """cuda, then mps, then cpu (``base.device`` forces one; an unavailable one is an error)."""
    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if preference == "auto":
        preference = next(d for d in ("cuda", "mps", "cpu") if has[d])
    elif not has[preference]:
        raise ConfigError(
            f"params.yaml: base.device={preference} but no {preference} device is available; use auto or cpu"
        )
    amp = None
    if preference == "cuda":
        torch.backends.cudnn.benchmark = True
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if num_workers == "auto":
        num_workers = 0 if preference == "cpu" else min(8, os.cpu_count() or 1)
    return Device(torch.device(preference), amp, int(num_workers))


def seed_everything(seed: int) -> None:
    """Python, numpy and torch; batches carry their own seeds (see augment.AugmentedBatches)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: ModelConfig, num_classes: int, dev: Device) -> torch.nn.Module:
    """``model.arch`` freshly initialized (pretrained weights: :mod:`onecycle.training.init_weights`)."""
    model = build(cfg.arch, num_classes, width=cfg.width, logit_scale=cfg.logit_scale)
    # channels_last pays on CUDA tensor cores and on CPU oneDNN alike (3x at width 16 on 2 cores).
    return model.to(dev.device, memory_format=torch.channels_last)


def build_optimizer(params, lr: float, momentum: float, nesterov: bool, weight_decay: float):
    """SGD over parameters or param groups (a group may carry an ``lr_mult``: see
    :func:`onecycle.training.init_weights.param_groups`)."""
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov and momentum > 0,
        weight_decay=weight_decay,
    )


def make_scaler(dev: Device) -> torch.amp.GradScaler:
    """Loss scaling only for fp16 autocast; bf16 and fp32 need none (then it is a no-op)."""
    return torch.amp.GradScaler(dev.type, enabled=dev.amp_dtype == torch.float16)


def train_step(model, optimizer, scaler, x, y, dev: Device) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch already on the device. Returns (mean loss, correct count), unsynced."""
    with dev.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), (logits.argmax(1) == y).sum()


@torch.no_grad()
def predict(model, x: torch.Tensor, dev: Device, batch_size: int = 1000) -> torch.Tensor:
    """Logits (float32, on CPU) for a preprocessed (N, C, H, W) tensor, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = (
            x[start : start + batch_size]
            .to(dev.device, non_blocking=True)
            .contiguous(memory_format=torch.channels_last)
        )
        with dev.autocast():
            out.append(model(xb).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
