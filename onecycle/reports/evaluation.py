"""Test-set metrics from logits (scikit-learn): what evaluate writes and the plots stage reads."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def evaluate_logits(
    logits: torch.Tensor, y: np.ndarray, classes: list[str]
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Returns (metrics for metrics/eval.json, predicted labels, confidence of each prediction).

    The metrics hold the confusion matrix (rows: true class, columns: predicted, in the order of
    ``classes``), so no later stage computes it again.
    """
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
        "loss": float(F.cross_entropy(logits.float(), torch.as_tensor(y))),
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
        "confusion_matrix": cm.tolist(),  # DVC's metrics views skip lists
    }
    return metrics, pred_np, conf.numpy()


def prediction_rows(
    y: np.ndarray, pred: np.ndarray, conf: np.ndarray, classes: list[str]
) -> list[dict]:
    """metrics/predictions.csv, the input of DVC's confusion template and the mistakes gallery."""
    return [
        {
            "index": i,
            "actual": classes[a],
            "predicted": classes[p],
            "confidence": round(float(c), 5),
        }
        for i, (a, p, c) in enumerate(zip(y, pred, conf, strict=True))
    ]


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The scalar metrics for MLflow: the overall ones in the UI's ``eval`` section, the per-class
    ones (``<class>.<metric>``) in a section of their own, ``eval_per_class``."""
    flat = {f"eval/{k}": metrics[k] for k in ("accuracy", "loss", "misclassified", "macro_f1")}
    for c, m in metrics["per_class"].items():
        flat |= {f"eval_per_class/{c}.{k}": v for k, v in m.items() if k != "support"}
    return flat
