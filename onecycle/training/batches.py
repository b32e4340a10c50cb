"""The augmented mini-batch stream of a training session, one per augmentation backend.

Both backends key every batch the same way: batch ``b`` of epoch ``e`` holds the same images (a
slice of a permutation seeded by ``(seed, e)``), augmented with draws seeded by ``(seed, e, b)``.
So two runs with one seed see the same batches, and an interrupted epoch resumes at batch ``b``
exactly. ``train.augment.backend``:

* ``albumentations``: per image on the CPU, in DataLoader workers (what the first seeds used);
* ``torch``: the whole uint8 training set as one tensor on the device (on a GPU, CIFAR-10's
  150 MB stay there), each batch gathered and augmented there at once, no workers;
* ``auto``: ``torch``, which ``make bench`` measured faster on the CPU as well (docs/speed.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from onecycle.config import AugmentConfig
from onecycle.training import torch_augment
from onecycle.training.augment import AugmentedBatches, batch_loader, epoch_order, train_transform

if TYPE_CHECKING:
    from onecycle.training.runtime import Device

Batch = tuple[int, torch.Tensor, torch.Tensor]  # (index in the epoch, images, labels)


def resolve_backend(backend: str) -> str:
    return "torch" if backend == "auto" else backend


class AlbumentationsStream:
    def __init__(
        self, x, y, batch_size: int, aug: AugmentConfig, mean, std, seed: int, dev: Device
    ):
        transform = train_transform(aug, x.shape[1], mean, std)
        self.batches = AugmentedBatches(x, y, batch_size, transform, seed)
        pin = dev.type == "cuda"
        self.loader, self.sampler = batch_loader(self.batches, dev.num_workers, pin_memory=pin)
        self.dev = dev

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, first_batch: int = 0) -> Iterator[Batch]:
        self.sampler.epoch, self.sampler.first_batch = epoch, first_batch
        for b, (x, y) in enumerate(self.loader, start=first_batch):
            x = x.to(self.dev.device, non_blocking=True)
            yield b, x.contiguous(memory_format=torch.channels_last), y.to(self.dev.device)


class TensorStream:
    def __init__(
        self,
        x,
        y,
        batch_size: int,
        aug: AugmentConfig,
        mean,
        std,
        seed: int,
        dev: Device,
        ranks=None,
    ):
        if len(x) == 0:
            raise ValueError("no training images")
        self.x = torch_augment.pack(torch.from_numpy(x)).to(dev.device)  # (N, H, W) int32
        self.y = torch.from_numpy(y).to(dev.device)
        self.batch_size = min(batch_size, len(x))
        self.aug, self.mean, self.std, self.seed = aug, mean, std, seed
        self.ranks = ranks  # distributed.Ranks: this rank takes its slice of every batch

    def __len__(self) -> int:
        return len(self.x) // self.batch_size  # the ragged last batch is dropped

    def epoch(self, epoch: int, first_batch: int = 0) -> Iterator[Batch]:
        """Batch ``b`` of the epoch's permutation; under data parallelism, this rank's slice of
        it, augmented with the draws one process would give those images."""
        order = torch.from_numpy(epoch_order(self.seed, epoch, len(self.x))).to(self.x.device)
        part = self.ranks.shard(self.batch_size) if self.ranks and self.ranks.world > 1 else None
        for b in range(first_batch, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if part is not None:
                idx = idx[part]
            x = torch_augment.augment_batch(
                self.x[idx], self.aug, self.mean, self.std, self.seed, epoch, b,
                self.batch_size, part,
            )  # fmt: skip
            yield b, x, self.y[idx]


def make_stream(
    x, y, batch_size: int, aug: AugmentConfig, mean, std, seed: int, dev: Device, ranks=None
):
    """The stream ``aug.backend`` names, over the uint8 images ``x`` and labels ``y``; with
    data-parallel ``ranks`` (torch backend only), this rank's slice of every batch."""
    if resolve_backend(aug.backend) == "torch":
        return TensorStream(x, y, batch_size, aug, mean, std, seed, dev, ranks)
    return AlbumentationsStream(x, y, batch_size, aug, mean, std, seed, dev)


def sample_images(x, y, aug: AugmentConfig, mean, std, seed: int, n: int = 32):
    """The first ``n`` images of epoch 0's first batch as training augments them, as uint8 for
    display, with their labels (the plots stage's figure)."""
    n = min(n, len(x))
    idx = epoch_order(seed, 0, len(x))[:n]
    if resolve_backend(aug.backend) == "torch":
        draws = torch_augment.draw(n, x.shape[1], aug, torch_augment.batch_seed(seed, 0, 0))
        images = torch_augment.apply(
            torch.from_numpy(x[idx]), draws, aug, torch_augment.fill_pixel(mean)
        )
        return images.numpy(), y[idx]
    transform = train_transform(aug, x.shape[1], mean, std)
    images, labels = AugmentedBatches(x, y, n, transform, seed)[(0, 0)]
    img = images.permute(0, 2, 3, 1).numpy() * np.asarray(std, np.float32) + np.asarray(
        mean, np.float32
    )
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), labels.numpy()
