"""The trained network as an MLflow model: raw uint8 images (N, H, W, C) in, class probabilities
out, in the order of the class names the model carries (its metadata ``classes``).

Logged by the train stage with ``mlflow.pytorch`` in torch.export's pt2 format, so loading it runs
no pickled code and needs nothing of this project: ``mlflow.pyfunc.load_model(uri).predict(images)``
and ``mlflow models serve -m <uri>`` work from torch alone. Evaluate registers it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

ARTIFACT = "model"  # the LoggedModel's name in the run
EXAMPLES = 2  # test images saved as the input example (also the batch size the export traces)


class ImageClassifier(nn.Module):
    """``net`` with the test-time preprocessing in front (uint8 NHWC -> normalized NCHW float)
    and a softmax behind: what a user of the model has is images, what they want is
    probabilities."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        # on the 0..255 scale, as preprocess.normalize does it
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return torch.softmax(self.net((x - self.mean) / self.std), dim=1)


def signature(classes: list[str], image_size: int):
    """uint8 (-1, H, W, 3) in; one float column per class, named, out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))]),
        outputs=Schema([ColSpec("float", c) for c in classes]),
    )


def log(
    net: nn.Module,
    classes: list[str],
    mean: Sequence[float],
    std: Sequence[float],
    examples: np.ndarray,
    run_id: str,
) -> str:
    """Log ``net`` into ``run_id`` as an MLflow model; returns its model id (``models:/<id>``)."""
    import mlflow

    model = ImageClassifier(_cpu_copy(net), mean, std).eval()
    image_size = int(examples.shape[1])
    info = mlflow.pytorch.log_model(
        model,
        name=ARTIFACT,
        run_id=run_id,
        signature=signature(list(classes), image_size),
        input_example=np.ascontiguousarray(examples[:EXAMPLES]),
        serialization_format="pt2",
        # stated, not inferred: inference loads the model in a subprocess (seconds)
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
        metadata={
            "classes": list(classes),
            "image_size": image_size,
            "mean": list(mean),
            "std": list(std),
        },
    )
    return info.model_id


def _cpu_copy(net: nn.Module) -> nn.Module:
    """An eval-mode float32 copy on the CPU in contiguous memory (the export's input)."""
    import copy

    net = getattr(net, "_orig_mod", net)  # a torch.compile wrapper
    return copy.deepcopy(net).to("cpu", memory_format=torch.contiguous_format).float().eval()
