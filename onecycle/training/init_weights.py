"""Transfer learning: where a network's weights start (``model.pretrained``), what of it trains
(``model.freeze``, ``model.backbone_lr_mult``), and the inputs the weights expect.

The classifier (the *head*: the parameters whose shape follows the number of classes, see
:func:`onecycle.training.model.head_keys`) always starts fresh for the dataset's classes; everything else
is the *backbone*. Pretrained weights fill the backbone, from torchvision's published weights
(``default``) or from a file: a torchvision state dict, or a checkpoint of this pipeline, so a
network trained here on one dataset can start another. The normalization follows the weights:
theirs when pretrained, the data's own otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from onecycle.config import ModelConfig
from onecycle.data.prepared import Prepared
from onecycle.errors import UserError
from onecycle.params_file import resolve_path
from onecycle.training import checkpoint
from onecycle.training.checkpoint import architecture_diff, state_dict_misfit
from onecycle.training.model import AUX_PREFIXES, TORCHVISION_KWARGS, head_keys

# torchvision's ImageNet weights all expect this normalization (their transforms() say so);
# a bare state dict carries none, so a torchvision weights file is taken to expect it too.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision builds these two with transform_input=True when given weights: it turns ImageNet-
# normalized input into the (x - 0.5) / 0.5 the original weights were trained on. The pipeline
# builds them without it, so it normalizes that way itself.
HALF = (0.5, 0.5, 0.5)
TRANSFORM_INPUT = ("googlenet", "inception_v3")


class PretrainedError(UserError):
    """model.pretrained names weights that cannot be had or do not fit the architecture."""


@dataclass(frozen=True)
class Inputs:
    """What the network is fed: normalization and the image size the weights were trained at."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # "data" (the training split's own) or the weights it follows
    image_size: int | None = None  # what the weights were trained at; None: the data's


@dataclass(frozen=True)
class InitialWeights:
    """Where training starts: the backbone's weights (None: random init) and their inputs."""

    state: dict[str, torch.Tensor] | None
    inputs: Inputs | None  # None: the data's own normalization
    origin: str  # "random init", "torchvision ResNet18_Weights.IMAGENET1K_V1", "<file>"
    digest: str | None = None  # sha256 of the weights file (the resume key holds it)

    def record(self, data: Prepared) -> dict:
        """What MLflow records of the start and the inputs (params ``start.*``), ``data`` as
        :meth:`normalize` made it."""
        return {
            "weights": self.origin,
            "weights_sha256": self.digest,
            "image_size": int(data.x_train.shape[1]),
            "mean": [round(float(m), 4) for m in data.mean],
            "std": [round(float(s), 4) for s in data.std],
            "normalization": self.inputs.source if self.inputs else "data",
        }

    def warning(self, data: Prepared) -> str | None:
        """Why the data does not look like what the weights learned on (None when it does)."""
        want = self.inputs.image_size if self.inputs else None
        have = int(data.x_train.shape[1])
        if want is None or want == have:
            return None
        return (
            f"the pretrained weights ({self.origin}) were trained on {want}x{want} images, the "
            f"data is {have}x{have}: set data.image_size: {want} for the features they learned"
        )

    def normalize(self, data: Prepared) -> Prepared:
        """``data`` with the mean/std every later step normalizes by: the weights' when there
        are any, else its own."""
        if self.inputs is None:
            return data
        return dataclasses.replace(data, mean=self.inputs.mean, std=self.inputs.std)


RANDOM = InitialWeights(None, None, "random init")


def load(cfg: ModelConfig) -> InitialWeights:
    """``model.pretrained``'s weights: none, torchvision's default, or a file (checked here:
    it loads, and a checkpoint of this pipeline has the same architecture)."""
    if cfg.pretrained == "none":
        return RANDOM
    if cfg.pretrained == "default":
        return _torchvision_default(cfg.arch)
    return _from_file(resolve_path(cfg.pretrained), cfg)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _torchvision_default(arch: str) -> InitialWeights:
    """torchvision's default weights for ``arch``, from ``$TORCH_HOME/hub/checkpoints`` or
    downloaded there (torch.hub checks the download's hash; a file put there by hand is checked
    here against the same hash)."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    name = weights.url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    expected = torch.hub.HASH_REGEX.search(name)
    if path.exists() and expected and not _sha256(path).startswith(expected.group(1)):
        raise PretrainedError(
            f"model.pretrained=default: {path} does not match torchvision's hash for "
            f"{weights} (sha256 {expected.group(1)}...); delete it and rerun to download it "
            f"again, or copy the right file from {weights.url}"
        )
    kwargs = {k: v for k, v in TORCHVISION_KWARGS.get(arch, {}).items() if k != "init_weights"}
    try:  # the builder loads the weights as torchvision means them (densenet's renamed keys)
        net = torchvision.models.get_model(arch, weights=weights, **kwargs)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash a RuntimeError
        raise PretrainedError(
            f"model.pretrained=default: could not get {weights} ({exc}). Offline, download "
            f"{weights.url} elsewhere and put it at {path} (TORCH_HOME={torch.hub.get_dir()}/..), "
            "or set model.pretrained to a weights file"
        ) from None
    preprocess = weights.transforms()
    mean, std = (HALF, HALF) if arch in TRANSFORM_INPUT else (preprocess.mean, preprocess.std)
    inputs = Inputs(tuple(mean), tuple(std), f"torchvision {weights}", preprocess.crop_size[0])
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(AUX_PREFIXES)}
    return InitialWeights(
        state, inputs, f"torchvision {weights}", _sha256(path) if path.exists() else None
    )


def _from_file(path: Path, cfg: ModelConfig) -> InitialWeights:
    if not path.is_file():
        raise PretrainedError(
            f"model.pretrained: {path} not found; give a weights file (a torchvision state dict, "
            "or models/model.pt of another run of this pipeline), default or none"
        )
    try:
        obj = checkpoint.load(path)  # weights only: a weights file can never run code
    except Exception as exc:
        raise PretrainedError(
            f"model.pretrained: {path} is not a loadable weights-only file "
            f"({checkpoint.why_unloadable(path, exc)})"
        ) from None
    digest = _sha256(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "config" in obj:
        return _from_checkpoint(path, obj, cfg, digest)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning's and others' wrapper
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(
            f"model.pretrained: {path} holds a {type(obj).__name__}, not a state dict (name -> "
            "tensor) nor a checkpoint of this pipeline"
        )
    bad = checkpoint.nonfinite(obj)
    if bad:  # training from them would fail with a NaN loss, blamed on train.max_lr
        raise PretrainedError(
            f"model.pretrained: {path} holds weights that are NaN or infinite ({bad}); give "
            "a file of weights that trained"
        )
    state = {k.removeprefix("module."): v for k, v in obj.items()}  # saved from DDP
    state = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIXES)}
    mean, std = (HALF, HALF) if cfg.arch in TRANSFORM_INPUT else (IMAGENET_MEAN, IMAGENET_STD)
    inputs = Inputs(mean, std, "ImageNet's (torchvision's convention; the file names none)")
    return InitialWeights(state, inputs, str(path), digest)


def _from_checkpoint(path: Path, ckpt: dict, cfg: ModelConfig, digest: str) -> InitialWeights:
    """A models/model.pt of this pipeline: same architecture, its own inputs."""
    bad = checkpoint.nonfinite(ckpt["model"])
    if bad:
        raise PretrainedError(
            f"model.pretrained: {path} holds weights that are NaN or infinite ({bad}); give "
            "a file of weights that trained"
        )
    diff = architecture_diff(ckpt["config"], cfg.architecture())
    if diff:
        what = ", ".join(
            f"{k}: {there!r} there, {here!r} here" for k, (there, here) in diff.items()
        )
        raise PretrainedError(
            f"model.pretrained: {path} is a checkpoint of another network ({what}); set the "
            "model params it was trained with"
        )
    got = ckpt.get("inputs") or {}
    inputs = None
    if got.get("mean") and got.get("std"):
        classes = ckpt.get("classes") or []
        source = f"checkpoint {path.name} ({len(classes)} classes: {', '.join(classes[:6])})"
        inputs = Inputs(tuple(got["mean"]), tuple(got["std"]), source, got.get("image_size"))
    return InitialWeights(ckpt["model"], inputs, str(path), digest)


# ---------------------------------------------------------------- on the model


def initialize(model: nn.Module, start: InitialWeights, head: set[str]) -> None:
    """The backbone's weights from ``start`` (the head keeps its fresh init); weights that do
    not fit stop with the keys that differ."""
    if start.state is None:
        return
    expected = {k: v for k, v in model.state_dict().items() if k not in head}
    given = {k: v for k, v in start.state.items() if k not in head}
    misfit = state_dict_misfit(expected, given)
    if misfit:
        raise PretrainedError(
            f"model.pretrained: the weights of {start.origin} do not fit model.arch's backbone:"
            f"\n{misfit}\nGive weights of the same architecture."
        )
    model.load_state_dict(given, strict=False)  # every backbone key: checked just above


def _eval_only(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze(model: nn.Module, head: set[str]) -> None:
    """A fixed feature extractor: every backbone parameter without gradient, and its
    BatchNorm layers in eval mode for good (they keep the pretrained running statistics)."""
    for name, p in model.named_parameters():
        if name not in head:
            p.requires_grad_(False)
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in own
        ):
            module.train = types.MethodType(_eval_only, module)
            module.eval()


def param_groups(model: nn.Module, head: set[str], backbone_lr_mult: float) -> list[dict]:
    """The optimizer's groups: the backbone's trainable parameters at ``backbone_lr_mult`` times
    the scheduled LR (discriminative LRs), the head at the LR itself. Each group's ``lr_mult`` is
    what :meth:`onecycle.training.session.Session.step` multiplies the schedule's LR by."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if n not in head]
    groups = [{"params": [p for n, p in named if n in head], "lr_mult": 1.0, "name": "head"}]
    if backbone:
        groups.insert(0, {"params": backbone, "lr_mult": backbone_lr_mult, "name": "backbone"})
    return groups


def head_of(cfg: ModelConfig, num_classes: int) -> set[str]:
    """The classifier's state-dict keys of ``cfg``'s network."""
    shape = {"width": cfg.width, "logit_scale": cfg.logit_scale}
    return head_keys(cfg.arch, num_classes, **shape)
