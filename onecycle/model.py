"""The seeds' "custom ResNet" (David Page's ResNet-9 for CIFAR-10)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ResNetConfig:
    num_classes: int = 10
    width: int = 64  # prep-layer channels; 64 -> 6,573,130 parameters for 10 classes
    logit_scale: float = 0.125  # fixed, not learned: Page's ResNet-9 scales the logits by 1/8


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """conv 3x3 (no bias: BN follows) [- MaxPool 2] - BN - ReLU."""
    layers = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """X = conv-pool-BN-ReLU(in); out = X + (conv-BN-ReLU-conv-BN-ReLU)(X)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.pre = conv_bn(c_in, c_out, pool=True)
        self.res = nn.Sequential(conv_bn(c_out, c_out), conv_bn(c_out, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return x + self.res(x)


class ResNet9(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.prep = conv_bn(3, w)  # (N, w, 32, 32)
        self.layer1 = Residual(w, 2 * w)  # (N, 2w, 16, 16)
        self.layer2 = conv_bn(2 * w, 4 * w, pool=True)  # (N, 4w, 8, 8)
        self.layer3 = Residual(4 * w, 8 * w)  # (N, 8w, 4, 4)
        # MaxPool 4 at 32x32 input; adaptive so other data.image_size values work too.
        self.pool = nn.AdaptiveMaxPool2d(1)  # (N, 8w, 1, 1)
        self.fc = nn.Linear(8 * w, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(self.pool(x).flatten(1)) * self.cfg.logit_scale  # (N, classes) logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
