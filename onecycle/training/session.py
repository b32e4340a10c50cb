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

from onecycle.config import ModelConfig, TrainConfig
from onecycle.data.prepared import Prepared
from onecycle.training import distributed, init_weights
from onecycle.training.batches import Batch, make_stream
from onecycle.training.runtime import (
    Device,
    build_model,
    build_optimizer,
    make_scaler,
    seed_everything,
    train_step,
)


@dataclass
class Session:
    dev: Device
    model: torch.nn.Module  # what is saved and evaluated
    forward: torch.nn.Module  # what trains: the model under DDP and/or torch.compile, or itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: object  # batches.AlbumentationsStream or batches.TensorStream
    ranks: distributed.Ranks = distributed.Ranks()  # data-parallel ranks (one process: world 1)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, first_batch: int = 0) -> Iterator[Batch]:
        """``(batch index, images, labels)`` of ``epoch`` from batch ``first_batch`` on, on the device."""
        return self.batches.epoch(epoch, first_batch)

    def stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches without end, epoch after epoch (the range test's)."""
        for epoch in itertools.count():
            for _, x, y in self.epoch(epoch):
                yield x, y

    def step(self, x, y, lr: float, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step at ``lr``/``momentum``; returns (mean loss, correct count), unsynced."""
        for group in self.optimizer.param_groups:  # the backbone's at its model.backbone_lr_mult
            group["lr"], group["momentum"] = lr * group.get("lr_mult", 1.0), momentum
        return train_step(self.forward, self.optimizer, self.scaler, x, y, self.dev)

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


def use_compile(setting: str | bool, dev: Device) -> bool:
    """``train.compile``: ``auto`` compiles on CUDA only (on a CPU the compile time outweighs)."""
    return dev.type == "cuda" if setting == "auto" else bool(setting)


def build_session(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: Prepared,
    dev: Device,
    seed: int,
    momentum: float,
    indices: np.ndarray | None = None,
    weights: init_weights.InitialWeights = init_weights.RANDOM,
    ranks: distributed.Ranks = distributed.ONE,
) -> Session:
    """Everything one run trains with; ``indices`` restricts the training images (the range
    test's held-out split). ``momentum`` is the optimizer's first (it decides Nesterov).
    ``weights``: the initial weights, a pretrained backbone (``data`` normalized as its weights expect: see
    :meth:`init_weights.InitialWeights.normalize`); ``model.freeze`` and ``model.backbone_lr_mult`` apply."""
    seed_everything(seed)
    x, y = data.x_train, data.y_train
    if indices is not None:
        x, y = x[indices], y[indices]
    model = build_model(model_cfg, len(data.classes), dev)
    head = init_weights.head_of(model_cfg, len(data.classes))
    init_weights.initialize(model, weights, head)
    if model_cfg.freeze == "backbone":
        init_weights.freeze(model, head)
    groups = init_weights.param_groups(model, head, model_cfg.backbone_lr_mult)
    forward = distributed.wrap(model, dev, ranks)  # DDP over the ranks (rank 0's weights to all)
    forward = torch.compile(forward) if use_compile(train_cfg.compile, dev) else forward
    optimizer = build_optimizer(groups, 0.0, momentum, train_cfg.nesterov, train_cfg.weight_decay)
    aug = train_cfg.augment
    stream = make_stream(x, y, train_cfg.batch_size, aug, data.mean, data.std, seed, dev, ranks)
    return Session(dev, model, forward, optimizer, make_scaler(dev), stream, ranks)
