"""The albumentations backend: the training transform, per image, and its batches for a
DataLoader (see batches.py for both backends).

Batch ``b`` of epoch ``e`` is a fixed slice of a permutation seeded by ``(seed, e)``, augmented with
a generator seeded by ``(seed, e, b)``. So a batch is the same whichever worker builds it, two runs
with one seed see the same images, and an interrupted epoch resumes at batch ``b`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from onecycle.config import AugmentConfig
from onecycle.data.preprocess import to_tensor


def train_transform(
    aug: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> A.Compose:
    """Pad + random crop, horizontal flip, cutout, normalize: in that order, each optional."""
    steps: list = []
    if aug.pad:
        side = image_size + 2 * aug.pad
        steps += [
            A.PadIfNeeded(side, side, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(image_size, image_size),
        ]
    if aug.flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if aug.cutout:
        side = min(aug.cutout, image_size)
        steps.append(
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(side, side),
                hole_width_range=(side, side),
                fill=tuple(255.0 * m for m in mean),  # the mean pixel: 0 after normalizing
                p=aug.cutout_p,
            )
        )
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    return A.Compose(steps)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` training images in ``epoch``: batch ``b`` is its ``b``-th slice."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class AugmentedBatches(torch.utils.data.Dataset):
    """Indexed by ``(epoch, batch)``; returns an augmented ``(images, labels)`` batch."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, batch_size: int, transform: A.Compose, seed: int
    ):
        if len(x) == 0:
            raise ValueError("no training images")
        self.x, self.y, self.transform, self.seed = x, y, transform, seed
        self.batch_size = min(batch_size, len(x))
        self.batches_per_epoch = len(x) // self.batch_size  # drop the ragged last batch
        self._perm: tuple[int, np.ndarray] | None = None

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_order(self.seed, epoch, len(self.x)))
        return self._perm[1][batch * self.batch_size : (batch + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, batch = key
        idx = self.indices(epoch, batch)
        self.transform.set_random_seed(
            int(np.random.SeedSequence([self.seed, epoch, batch]).generate_state(1)[0])
        )
        images = np.stack([self.transform(image=self.x[i])["image"] for i in idx])
        return to_tensor(images), torch.from_numpy(self.y[idx])


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, batch)`` keys from ``start`` on; set ``epoch``/``start`` before each pass."""

    def __init__(self, batches_per_epoch: int):
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.first_batch = 0

    def __iter__(self):
        return iter([(self.epoch, b) for b in range(self.first_batch, self.batches_per_epoch)])

    def __len__(self) -> int:
        return self.batches_per_epoch - self.first_batch


def batch_loader(
    ds: AugmentedBatches, num_workers: int, pin_memory: bool
) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    sampler = EpochSampler(len(ds))
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return loader, sampler
