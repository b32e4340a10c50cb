"""Every ``torch.save`` and ``torch.load`` of the pipeline: the resume state of an interrupted run
and the trained weights. Written atomically, read back with ``weights_only=True`` (a checkpoint
can never run code)."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onecycle.config import ModelConfig, TrainConfig
from onecycle.errors import UserError
from onecycle.files import atomic_write
from onecycle.training.runtime import Device, build_model


class ResumeMismatch(UserError):
    """A saved resume state is unreadable or belongs to a run with other settings."""


class CheckpointError(UserError):
    """The weights file is missing, unreadable, not finite, or does not fit the model."""


def save(obj: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def nonfinite(state: dict) -> str | None:
    """Which floating tensors of a state dict hold NaN or infinity ("3 of 62 tensors, e.g.
    conv1.weight"), or None when every value is finite."""
    bad = [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if not bad:
        return None
    total = sum(isinstance(v, torch.Tensor) and v.is_floating_point() for v in state.values())
    return f"{len(bad)} of {total} tensors, e.g. {bad[0]}"


def why_unloadable(path: Path, exc: BaseException) -> str:
    """Why :func:`load` refused ``path``, in words a user can act on. Never torch's advice to
    load with ``weights_only=False``: a weights file that needs it can run code."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    if not head:
        return "empty: 0 bytes"
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in text:
        detail = " ".join(
            ln.strip().removeprefix("WeightsUnpickler error:").strip()
            for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith(_TORCH_ADVICE)
        )
        return (
            f"it holds more than tensors and plain containers: {detail.rstrip('.')}. A "
            "weights-only load refuses that (a whole pickled model, or code) and this pipeline "
            "loads no other way: save the model's state_dict() instead"
        )
    if head.startswith(b"PK"):
        return _why_zip(path)
    if head.startswith(b"\x80"):
        return "a pickle, but not one torch.save wrote"
    return "not a torch.save file: neither torch's zip format nor a pickle"


def _why_zip(path: Path) -> str:
    """A zip that torch refused: cut short, damaged, or not torch's layout."""
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):  # no end-of-archive record: the file stops early
        return (
            f"cut short: a zip archive without its end ({size:,} bytes), as a copy or download "
            "that stopped leaves it; copy the file again"
        )
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"a damaged zip archive ({err}); copy the file again"
    if bad is not None:
        return f"a damaged zip archive: {bad} fails its checksum; copy the file again"
    if not any(n.endswith("data.pkl") for n in names):
        return "a zip archive, but not one torch.save wrote (it has no data.pkl)"
    return "a zip archive from torch.save that torch cannot read (another torch version's?)"


# ---------------------------------------------------------------- resume state


def resume_key(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    fingerprint: str | None,
    seed: int,
    max_lr: float,
    base_lr: float | None = None,
    pretrained: str | None = None,
) -> dict:
    """Everything that must match for a saved state to be continued (``base_lr``: the cyclic
    schedule's floor as used, None for the other schedules; ``pretrained``: the sha256 of the
    weights file the backbone started from)."""
    return {
        **{f"train.{k}": v for k, v in cfg.model_dump().items() if k != "eval_every"},
        **{f"model.{k}": v for k, v in model_cfg.model_dump().items()},
        "base.seed": seed,
        "max_lr (used)": max_lr,
        "base_lr (used)": base_lr,
        "data (fingerprint of data/prepared)": fingerprint,
        "pretrained weights (sha256)": pretrained,
    }


@dataclass
class ResumeFile:
    """Where an interrupted run keeps its state; ``key`` must match for it to be continued and
    ``extra`` travels with it (the train stage keeps its MLflow run id there)."""

    path: Path
    key: dict
    extra: dict = field(default_factory=dict)

    def load(self) -> dict | None:
        """The saved state (None if there is none); refused if its settings differ from ``key``."""
        if not self.path.exists():
            return None
        try:
            state = load(self.path)
        except Exception as exc:
            raise ResumeMismatch(
                f"{self.path} is unreadable ({why_unloadable(self.path, exc)}); delete it to "
                f"start over: rm {self.path}"
            ) from None
        if not isinstance(state, dict) or not isinstance(state.get("key"), dict):
            raise ResumeMismatch(
                f"{self.path} is not a resume state of this pipeline ({type(state).__name__}); "
                f"delete it to start over: rm {self.path}"
            )
        saved = state["key"]
        diff = [k for k in sorted(set(self.key) | set(saved)) if saved.get(k) != self.key.get(k)]
        if diff:
            lines = "\n".join(
                f"  {k}: saved {saved.get(k)!r}, now {self.key.get(k)!r}" for k in diff
            )
            raise ResumeMismatch(
                f"{self.path} holds an interrupted run with other settings:\n{lines}\n"
                "Resuming would mix two runs. Restore those params to resume, or delete the file "
                f"to start over: rm {self.path}"
            )
        return state

    def save(self, state: dict) -> None:
        save({**state, "key": self.key, "extra": self.extra}, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------- trained weights


def save_weights(
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    classes: list[str],
    path: Path,
    inputs: dict | None = None,
) -> None:
    """Weights plus the little needed to rebuild and check the model, and with ``inputs`` (see
    :func:`inputs_of`) to use it on its own (``predict``); refuses non-finite weights."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"weight {k} is not finite; refusing to write {path}")
    config = {**model_cfg.model_dump(), "num_classes": len(classes)}
    save({"model": state, "config": config, "classes": list(classes), "inputs": inputs}, path)


def inputs_of(data) -> dict:
    """What the network expects of an image: its size and the training data's mean/std."""
    return {
        "image_size": int(data.x_train.shape[1]),
        "mean": [float(m) for m in data.mean],
        "std": [float(s) for s in data.std],
    }


def read_weights(path: Path) -> dict:
    """A weights file of this pipeline, read and checked: it exists, loads, and holds a state
    dict (with its 'config', 'classes' and, from train, 'inputs')."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} not found: run the train stage first (`dvc repro train`)")
    try:
        ckpt = load(path)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a loadable weights-only checkpoint ({why_unloadable(path, exc)}); "
            "rerun `dvc repro train`"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(
            f"{path} is not a checkpoint of this pipeline (a {type(ckpt).__name__}, not a dict "
            "holding 'model', 'config' and 'classes'); rerun `dvc repro train`"
        )
    bad = nonfinite(ckpt["model"])
    if bad:
        raise CheckpointError(
            f"{path} holds weights that are NaN or infinite ({bad}): the file is damaged or the "
            "model it holds had diverged; rerun `dvc repro train`"
        )
    return ckpt


def load_weights(
    path: Path, model_cfg: ModelConfig, classes: list[str], dev: Device
) -> torch.nn.Module:
    """Rebuild the model that params describe and load ``path``'s weights into it (eval mode)."""
    return load_trained(path, model_cfg, classes, dev)[0]


def load_trained(
    path: Path, model_cfg: ModelConfig, classes: list[str], dev: Device
) -> tuple[torch.nn.Module, dict | None]:
    """:func:`load_weights`, and the inputs the model was trained on (image size, the mean/std
    it normalizes by: see :func:`inputs_of`; None in a checkpoint older than them)."""
    ckpt = read_weights(path)
    diff = architecture_diff(
        ckpt.get("config"), {**model_cfg.architecture(), "num_classes": len(classes)}
    )
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"{path} does not fit this model and data ({what}); retrain with `dvc repro train`"
        )
    if ckpt.get("classes") not in (None, list(classes)):
        raise CheckpointError(
            f"{path} was trained on classes {ckpt['classes']}, the data has {classes}; retrain"
        )
    model = build_model(model_cfg, len(classes), dev)
    misfit = state_dict_misfit(model.state_dict(), ckpt["model"])
    if misfit:
        raise CheckpointError(f"{path}: weights do not fit the model:\n{misfit}\nRetrain.")
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt.get("inputs")


def saved_architecture(config) -> dict:
    """A checkpoint's ``config``, with the ``arch`` that checkpoints from before model.arch
    leave out (they are all resnet9)."""
    return {"arch": "resnet9", **(config if isinstance(config, dict) else {})}


def architecture_diff(config, want: dict) -> dict[str, tuple]:
    """key -> (the checkpoint's value, ``want``'s) for each of ``want``'s keys that differ."""
    have = saved_architecture(config)
    return {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}


def state_dict_misfit(expected: dict, given: dict, show: int = 8) -> str:
    """What keeps ``given`` from loading where ``expected`` is: missing and unexpected keys and
    shape differences, one line each (the first ``show`` of each kind); empty when it fits."""

    def shape(v):
        return tuple(v.shape) if hasattr(v, "shape") else type(v).__name__

    problems = {
        "missing": sorted(set(expected) - set(given)),
        "unexpected": sorted(set(given) - set(expected)),
        "wrong shape": [
            f"{k}: checkpoint {shape(given[k])}, model {shape(expected[k])}"
            for k in sorted(set(expected) & set(given))
            if shape(given[k]) != shape(expected[k])
        ],
    }
    lines = []
    for kind, items in problems.items():
        if items:
            more = f" (and {len(items) - show} more)" if len(items) > show else ""
            lines.append(f"  {kind} ({len(items)}): {', '.join(items[:show])}{more}")
    return "\n".join(lines)
