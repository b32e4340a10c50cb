"""The training augmentation of :func:`augment.train_transform`, on a whole uint8 batch at once, in
torch, on whatever device the batch is on (the ``torch`` backend).

The same augmentation, not a look-alike: reflect-101 padding by ``pad`` then a random crop back to
the image size (offsets uniform over ``0..2*pad``, as albumentations' ``RandomCrop``), a
horizontal flip with probability 0.5, one ``cutout``-sized hole lying wholly inside the image
(top-left uniform over ``0..size-cutout``, as ``CoarseDropout``) filled with the mean pixel
truncated to uint8, with probability ``cutout_p``; then the normalization. Given the same draws,
both backends give the same pixels (tests/test_torch_augment.py).

Pad, crop and flip are one gather: output pixel ``(r, c)`` of image ``n`` is input pixel
``(reflect(crop_y + r - pad), reflect(crop_x + c' - pad))`` with ``c' = size-1-c`` when flipped.
The draws come from a CPU generator seeded by ``(seed, epoch, batch)``, so a batch is the same on
any device and a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from onecycle.config import AugmentConfig


@dataclass(frozen=True)
class Draws:
    """The random choices for a batch of ``n`` images (all (n,) tensors on the CPU)."""

    crop_y: torch.Tensor  # top of the crop in the padded image, 0..2*pad
    crop_x: torch.Tensor
    flip: torch.Tensor  # bool
    hole_y: torch.Tensor  # top of the cutout hole, 0..size-side
    hole_x: torch.Tensor
    hole: torch.Tensor  # bool: this image gets a hole (cutout_p)

    def to(self, device: torch.device) -> Draws:
        return Draws(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The same per-batch seed the albumentations backend uses (augment.AugmentedBatches)."""
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1)[0])


def draw(n: int, size: int, aug: AugmentConfig, seed: int) -> Draws:
    """The choices for ``n`` images of side ``size``, from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    zeros = torch.zeros(n, dtype=torch.int64)
    crop = (lambda: torch.randint(0, 2 * aug.pad + 1, (n,), generator=g)) if aug.pad else None
    crop_y, crop_x = (crop(), crop()) if crop else (zeros, zeros)
    flip = torch.rand(n, generator=g) < 0.5 if aug.flip else torch.zeros(n, dtype=torch.bool)
    side = min(aug.cutout, size)
    if side:
        hole_y = torch.randint(0, size - side + 1, (n,), generator=g)
        hole_x = torch.randint(0, size - side + 1, (n,), generator=g)
        hole = torch.rand(n, generator=g) < aug.cutout_p
    else:
        hole_y, hole_x, hole = zeros, zeros, torch.zeros(n, dtype=torch.bool)
    return Draws(crop_y, crop_x, flip, hole_y, hole_x, hole)


def _reflect101(i: torch.Tensor, n: int) -> torch.Tensor:
    """Index ``i`` in ``-n+1..2n-2`` mirrored into ``0..n-1`` without repeating the edge (OpenCV's
    BORDER_REFLECT_101, torch's "reflect")."""
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def pack(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> int32 ``(N, H, W)``: a pixel per element, so the gather below
    moves one 4-byte value per pixel instead of three bytes (twice as fast on a CPU)."""
    alpha = torch.zeros((*x.shape[:-1], 1), dtype=torch.uint8, device=x.device)
    return torch.cat([x, alpha], dim=-1).view(torch.int32).squeeze(-1)


def unpack(p: torch.Tensor) -> torch.Tensor:
    """int32 ``(N, H, W)`` -> a uint8 ``(N, H, W, 3)`` view."""
    return p.unsqueeze(-1).view(torch.uint8)[..., :3]


def apply_packed(p: torch.Tensor, d: Draws, aug: AugmentConfig, fill: torch.Tensor) -> torch.Tensor:
    """:func:`apply` on packed pixels (``fill`` packed too); returns packed pixels."""
    n, size = p.shape[0], p.shape[1]
    d = d.to(p.device)
    r = torch.arange(size, device=p.device)
    rows = _reflect101(d.crop_y[:, None] - aug.pad + r, size)  # (N, H)
    cols = _reflect101(d.crop_x[:, None] - aug.pad + r, size)  # (N, W)
    cols = torch.where(d.flip[:, None], cols.flip(1), cols)
    out = p[torch.arange(n, device=p.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    side = min(aug.cutout, size)
    if side:
        in_rows = (r >= d.hole_y[:, None]) & (r < d.hole_y[:, None] + side)  # (N, H)
        in_cols = (r >= d.hole_x[:, None]) & (r < d.hole_x[:, None] + side)
        hole = in_rows[:, :, None] & in_cols[:, None, :] & d.hole[:, None, None]  # (N, H, W)
        out = torch.where(hole, fill.to(p.device), out)
    return out


def apply(x: torch.Tensor, d: Draws, aug: AugmentConfig, fill: torch.Tensor) -> torch.Tensor:
    """Augment a uint8 batch ``(N, H, W, 3)`` (square images) with the draws ``d``; returns uint8
    ``(N, H, W, 3)`` on the same device. ``fill`` is the hole's uint8 pixel ``(3,)``."""
    packed = apply_packed(pack(x), d, aug, pack(fill.view(1, 1, 1, 3)).view(()))
    return unpack(packed).contiguous()


def fill_pixel(mean: Sequence[float]) -> torch.Tensor:
    """The hole's colour as albumentations stores it: 255 * mean, truncated to uint8."""
    return torch.tensor([255.0 * m for m in mean]).to(torch.uint8)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> normalized float ``(N, C, H, W)``, channels_last in memory:
    ``x / (255 std) - mean / std``, one fused pass after the conversion."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)
    s = torch.tensor(std, dtype=torch.float32, device=x.device)
    return torch.addcmul(-m / s, x.to(torch.float32), 1.0 / (255.0 * s)).permute(0, 3, 1, 2)


def augment_batch(
    packed: torch.Tensor,
    aug: AugmentConfig,
    mean,
    std,
    seed: int,
    epoch: int,
    batch: int,
    whole: int | None = None,
    part: slice | None = None,
) -> torch.Tensor:
    """Batch ``batch`` of ``epoch`` (packed pixels, see :func:`pack`), augmented and normalized:
    what the network trains on. ``packed`` may be the ``part`` of a batch of ``whole`` images (a
    data-parallel rank's share): it gets the draws those images get in the whole batch."""
    d = draw(whole or packed.shape[0], packed.shape[1], aug, batch_seed(seed, epoch, batch))
    if part is not None:
        d = Draws(*(getattr(d, f)[part] for f in d.__dataclass_fields__))
    fill = pack(fill_pixel(mean).view(1, 1, 1, 3)).view(())
    return normalize(unpack(apply_packed(packed, d, aug, fill)), mean, std)
