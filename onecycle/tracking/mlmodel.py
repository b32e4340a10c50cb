"""The trained network as an MLflow model: raw uint8 images (N, H, W, C) in, class probabilities
out, in the order of the class names the model carries (its metadata ``classes``).

Logged by the train stage with ``mlflow.pytorch`` in torch.export's pt2 format, so loading it runs
no pickled code and needs nothing of this project: ``mlflow.pyfunc.load_model(uri).predict(images)``
and ``mlflow models serve -m <uri>`` work from torch alone. Evaluate registers it.

:func:`load` reads such a model back and nothing else: a model from a registry anyone with EDIT
can write to may be a pickle that runs code when loaded, so its MLmodel file and data folder are
checked first, and the program is read with torch's weights-only unpickler forced on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from onecycle.errors import UserError

ARTIFACT = "model"  # the LoggedModel's name in the run
PROGRAM = "model.pt2"  # what mlflow.pytorch saves a torch.export program as, in its data folder
PICKLES = ("model.pth", "pickle_module_info.txt")  # mlflow.pytorch's pickle format (loaded first)


class ModelFlavorError(UserError):
    """An MLflow model that is not this pipeline's torch.export program; refused unloaded."""


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


def check_flavor(folder: Path, uri: str) -> tuple[Path, dict]:
    """The torch.export program's path in a downloaded MLflow model, and the model's metadata;
    a ModelFlavorError naming the flavor found for anything else (read as YAML, nothing run)."""
    try:
        spec = yaml.safe_load((folder / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelFlavorError(f"MLflow model {uri} has no readable MLmodel file ({exc})") from None
    flavors = spec.get("flavors") or {}
    pyfunc, torch_flavor = flavors.get("python_function") or {}, flavors.get("pytorch") or {}
    loader = pyfunc.get("loader_module", "none")
    found = ", ".join(flavors) or "none"
    data = folder / str(torch_flavor.get("model_data", ""))
    problem = None
    if not torch_flavor or loader not in ("none", "mlflow.pytorch"):
        problem = f"flavor {found} (python_function loader {loader})"
    elif torch_flavor.get("code") or pyfunc.get("code"):
        problem = "a pytorch model that ships code of its own"
    elif not data.resolve().is_relative_to(folder.resolve()) or not (data / PROGRAM).is_file():
        problem = f"a pytorch model without a torch.export program ({PROGRAM})"
    elif any((data / name).exists() for name in PICKLES):
        problem = "a pickled pytorch model"
    if problem:
        raise ModelFlavorError(
            f"MLflow model {uri} is {problem}, not the torch.export program this pipeline logs; "
            "refused without loading it (a pickle can run any code)"
        )
    return data / PROGRAM, dict(spec.get("metadata") or {})


@contextlib.contextmanager
def _weights_only() -> Iterator[None]:
    """torch.export.load falls back to a full unpickle when weights-only loading fails; this
    forbids the fallback."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",)}
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def load(folder: Path, uri: str) -> tuple[nn.Module, dict]:
    """(the network, uint8 NHWC in, probabilities out; the model's metadata) of a downloaded
    MLflow model that :func:`log` wrote, checked by :func:`check_flavor` before it is read."""
    program, metadata = check_flavor(folder, uri)
    with _weights_only():
        try:
            exported = torch.export.load(program)
        except Exception as exc:  # noqa: BLE001 - a corrupt or tampered archive
            raise ModelFlavorError(
                f"MLflow model {uri}: its torch.export program cannot be read ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
            ) from None
    return exported.module(), metadata
