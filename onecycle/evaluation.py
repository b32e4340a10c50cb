"""Test-set metrics from logits (scikit-learn), and safe checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from .config import ConfigError, ModelConfig
from .engine import Device, build_model


class CheckpointError(ConfigError):
    """The checkpoint is missing or does not fit the model the params describe."""


def load_checkpoint(
    path: Path, model_cfg: ModelConfig, classes: list[str], dev: Device
) -> torch.nn.Module:
    """Rebuild the model from params and load the weights with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} not found: run the train stage first (`dvc repro train`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a loadable weights-only checkpoint ({exc}); rerun `dvc repro train`"
        ) from None
    cfg = ckpt.get("config", {})
    want = {**model_cfg.model_dump(), "num_classes": len(classes)}
    diff = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) != v}
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
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: weights do not fit the model ({str(exc).splitlines()[0]}); retrain"
        ) from None
    return model.eval()


def evaluate_logits(
    logits: torch.Tensor, y: np.ndarray, classes: list[str]
) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Returns (metrics, confusion matrix, predicted labels, confidence of the prediction)."""
    y_t = torch.as_tensor(y)
    probs = F.softmax(logits.float(), dim=1)
    conf, pred = probs.max(1)
    pred_np = pred.numpy()
    labels = list(range(len(classes)))
    cm = confusion_matrix(y, pred_np, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred_np, labels=labels, zero_division=0
    )
    per_class_acc = np.diag(cm) / np.maximum(cm.sum(1), 1)
    correct = int((pred_np == y).sum())
    metrics = {
        "accuracy": correct / len(y),
        "loss": float(F.cross_entropy(logits.float(), y_t)),
        "num_test": int(len(y)),
        "correct": correct,
        "misclassified": int(len(y) - correct),
        "per_class": {
            c: {
                "accuracy": float(per_class_acc[i]),
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "macro_f1": float(np.mean(f1)),
    }
    return metrics, cm, pred_np, conf.numpy()
