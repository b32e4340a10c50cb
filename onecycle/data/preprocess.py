"""uint8 images (N, H, W, C) to the network's input: float (N, C, H, W), channels_last in memory."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) float -> (N, C, H, W) view, already channels_last in memory."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Test-time preprocessing of a uint8 batch: only normalized, vectorised over the batch."""
    m = np.asarray(mean, np.float32) * 255.0
    s = np.asarray(std, np.float32) * 255.0
    return to_tensor((x.astype(np.float32) - m) / s)
