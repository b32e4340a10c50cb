"""The networks: the seeds' "custom ResNet" (David Page's ResNet-9 for CIFAR-10), or any
torchvision classification model by name, its classifier sized for the dataset's classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onecycle.config import RESNET9


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


# Built without their auxiliary classifiers (a training forward would return a tuple) and with
# torchvision's fast init (the default warns and runs scipy's slow truncated normal).
TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}
AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")  # their keys in torchvision's weights files


def torchvision_archs() -> list[str]:
    """Every classification model in torchvision's registry (resnet18, mobilenet_v3_small, ...)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def build(arch: str, num_classes: int, width: int = 64, logit_scale: float = 0.125) -> nn.Module:
    """``arch`` with freshly initialized weights and a ``num_classes`` classifier; ``width`` and
    ``logit_scale`` shape the ResNet-9 only. Never downloads anything."""
    if arch == RESNET9:
        return ResNet9(ResNetConfig(num_classes=num_classes, width=width, logit_scale=logit_scale))
    import torchvision

    kwargs = TORCHVISION_KWARGS.get(arch, {})
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def head_keys(arch: str, num_classes: int, **shape) -> set[str]:
    """The state-dict keys of the classifier: those whose shape follows the number of classes
    (``fc.*`` of a ResNet, ``classifier.3.*`` of MobileNetV3, ``heads.head.*`` of a ViT)."""

    def shapes(n: int) -> dict[str, tuple]:
        try:  # on the meta device: no memory, no init (a few torchvision builders need real data)
            with torch.device("meta"):
                net = build(arch, n, **shape)
        except (NotImplementedError, RuntimeError):
            net = build(arch, n, **shape)
        return {k: tuple(v.shape) for k, v in net.state_dict().items()}

    a, b = shapes(num_classes), shapes(num_classes + 1)
    return {k for k in a if a[k] != b[k]}


def count_parameters(model: nn.Module, trainable: bool = False) -> int:
    """All parameters, or (``trainable``) those that get a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
