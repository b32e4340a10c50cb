"""One training session: model, optimizer, loss scaler and the augmented batch stream, built once.

The LR range test and training both build theirs here, so they train the same model with the
same optimizer, loss and augmentation; the caller decides the LR and momentum of every step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .augment import AugmentedBatches, EpochSampler, batch_loader, train_transform
from .config import ModelConfig, TrainConfig
from .engine import (
    Device,
    build_model,
    build_optimizer,
    make_scaler,
    seed_everything,
    to_device,
    train_step,
)
from .prepared import Prepared


@dataclass
class Session:
    dev: Device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: AugmentedBatches
    loader: torch.utils.data.DataLoader
    sampler: EpochSampler

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(batch index, images, labels)`` of ``epoch`` from batch ``start`` on, on the device."""
        self.sampler.epoch, self.sampler.start = epoch, start
        for b, (x, y) in enumerate(self.loader, start=start):
            yield b, *to_device(x, y, self.dev)

    def stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches without end, epoch after epoch (the range test's)."""
        for epoch in itertools.count():
            for _, x, y in self.epoch(epoch):
                yield x, y

    def step(self, x, y, lr: float, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step at ``lr``/``momentum``; returns (mean loss, correct count), unsynced."""
        for group in self.optimizer.param_groups:
            group["lr"], group["momentum"] = lr, momentum
        return train_step(self.model, self.optimizer, self.scaler, x, y, self.dev)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


def build_session(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: Prepared,
    dev: Device,
    seed: int,
    momentum: float,
    indices: np.ndarray | None = None,
) -> Session:
    """Everything one run trains with; ``indices`` restricts the training images (the range
    test's held-out split). ``momentum`` is the optimizer's first (it decides Nesterov)."""
    seed_everything(seed)
    x, y = (
        (data.x_train, data.y_train)
        if indices is None
        else (data.x_train[indices], data.y_train[indices])
    )
    model = build_model(model_cfg, len(data.classes), dev)
    optimizer = build_optimizer(model, 0.0, momentum, train_cfg.nesterov, train_cfg.weight_decay)
    transform = train_transform(train_cfg.augment, x.shape[1], data.mean, data.std)
    batches = AugmentedBatches(x, y, train_cfg.batch_size, transform, seed)
    loader, sampler = batch_loader(batches, dev.num_workers, pin_memory=dev.type == "cuda")
    return Session(dev, model, optimizer, make_scaler(dev), batches, loader, sampler)
