"""Figures: each function takes data and returns a matplotlib Figure (never shows it).

The caller saves it, logs it to MLflow, or both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from onecycle.config import SUGGESTIONS  # noqa: E402


def lr_find_figure(
    lrs: Sequence[float],
    losses: Sequence[float],
    smooth: Sequence[float],
    suggestions: dict[str, float],
    chosen: str,
    val_losses: Sequence[float] | None = None,
    log_x: bool = True,
    refined: float | None = None,
    margin: float = 0.0,
) -> Figure:
    """The sweep, every suggestion, and the max LR used: ``chosen``'s suggestion, or
    ``refined`` where lr_find.refine's probes moved it. ``suggestions`` may hold ``blowup``,
    drawn with its cap (over ``margin``, lr_find.blowup_margin)."""
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    ax.plot(lrs, losses, color="0.7", lw=1, label="mini-batch loss")
    ax.plot(lrs, smooth, color="C0", lw=2, label="smoothed loss (what the suggestions read)")
    if val_losses:
        ax.plot(lrs, val_losses, color="C2", lw=1.5, label="held-out loss")
    styles = {"min": "C6", "valley": "C3", "steepest": "C1", "min_div10": "C4", "lower_bound": "C5",
              "blowup": "0.3"}  # fmt: skip
    for name, lr in suggestions.items():
        if name not in styles or not np.isfinite(lr):
            continue
        lw, ls = (2.5, "-") if name == chosen else (1.2, "--")
        tag = (" (probed around)" if refined else " (chosen)") if name == chosen else ""
        if name == "blowup":
            ls, tag = ":", " (where the loss blew up)"
            tag += f"; cap / {margin:g}: {lr / margin:.3g}" if margin else ""
        ax.axvline(lr, color=styles[name], lw=lw, ls=ls, label=f"{name}: {lr:.3g}{tag}")
    if refined:
        ax.axvline(refined, color="k", lw=2.5, label=f"refined by probes: {refined:.3g} (chosen)")
    if log_x:
        ax.set_xscale("log")
    finite = np.asarray(smooth)[np.isfinite(smooth)]
    if len(finite):
        lo, hi = finite.min(), finite[0]
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), max(hi, lo) + 0.6 * (hi - lo + 1e-3))
    ax.set_xlabel("learning rate (log scale)" if log_x else "learning rate")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("LR range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    return fig


def history_figure(
    epochs, train_loss, test_loss, train_acc, test_acc, val_loss=None, val_acc=None
) -> Figure:
    """Loss and accuracy per epoch; test (and validation) values may be None where not
    evaluated."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")

    def points(xs, ys):
        pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        return ([p[0] for p in pairs], [p[1] for p in pairs])

    ax1.plot(epochs, train_loss, "o-", label="train (augmented)")
    ax1.plot(*points(epochs, test_loss), "s-", label="test")
    if val_loss and any(v is not None for v in val_loss):
        ax1.plot(*points(epochs, val_loss), "^-", label="validation")
        va = points(epochs, val_acc)
        ax2.plot(va[0], [100 * a for a in va[1]], "^-", color="C2", label="validation")
    ax1.set(title="Loss per epoch", xlabel="epoch", ylabel="cross-entropy loss")
    ax2.plot(epochs, [100 * a for a in train_acc], "o-", color="C0", label="train (augmented)")
    te = points(epochs, test_acc)
    ax2.plot(te[0], [100 * a for a in te[1]], "s-", color="C1", label="test")
    if te[1]:
        ax2.annotate(
            f"{100 * te[1][-1]:.2f}%",
            (te[0][-1], 100 * te[1][-1]),
            textcoords="offset points",
            xytext=(-8, -14),
            ha="right",
        )
    ax2.set(title="Accuracy per epoch", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    return fig


def _column(rows: Sequence[dict], key: str) -> list[float | None]:
    return [None if r.get(key) in ("", None) else float(r[key]) for r in rows]


def history_figure_from_rows(rows: Sequence[dict]) -> Figure:
    """From metrics/train_history.csv rows (or training.epoch_rows)."""
    return history_figure(
        [int(float(r["epoch"])) for r in rows],
        *(_column(rows, k) for k in ("train_loss", "test_loss", "train_acc", "test_acc")),
        *(_column(rows, k) for k in ("val_loss", "val_acc")),
    )


def schedule_figure(rows: Sequence[dict]) -> Figure:
    """LR and momentum of every step taken, from metrics/train_schedule.csv rows."""
    fig, ax1 = plt.subplots(figsize=(8, 4.2), layout="constrained")
    x = _column(rows, "epoch")
    ax1.plot(x, _column(rows, "lr"), color="C0", lw=2, label="learning rate")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("learning rate", color="C0")
    ax2 = ax1.twinx()
    ax2.plot(x, _column(rows, "momentum"), color="C1", lw=2, ls="--", label="momentum")
    ax2.set_ylabel("momentum", color="C1")
    ax1.set_title("Schedule over the steps taken (stepped every batch)")
    ax1.grid(True, alpha=0.3)
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.9))
    return fig


def image_grid(
    images: np.ndarray,
    titles: Sequence[str],
    title: str,
    cols: int = 8,
    colors: Sequence[str] | None = None,
) -> Figure:
    """uint8 (N, H, W, 3) images in a grid with a caption under each."""
    n = len(images)
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.6 * cols, 1.85 * rows + 0.5), layout="constrained", squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            ax.set_title(titles[i], fontsize=8, color=colors[i] if colors else "black")
    fig.suptitle(title)
    return fig


def confusion_figure(cm: np.ndarray, classes: Sequence[str]) -> Figure:
    """Counts and row-normalised (recall) heatmaps side by side."""
    k = len(classes)
    size = max(5.5, 0.55 * k + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), layout="constrained")
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for ax, mat, title, fmt in (
        (axes[0], cm, f"Confusion matrix (counts, {int(cm.sum()):,} test images)", "d"),
        (axes[1], norm, "Row-normalised (fraction of each true class)", ".2f"),
    ):
        im = ax.imshow(mat, cmap="Blues")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set(
            xticks=range(k),
            yticks=range(k),
            xlabel="predicted class",
            ylabel="true class",
            title=title,
        )
        ax.set_xticklabels(classes, rotation=45, ha="right")
        ax.set_yticklabels(classes)
        if k <= 20:
            thresh = mat.max() / 2
            for i in range(k):
                for j in range(k):
                    ax.text(
                        j,
                        i,
                        format(mat[i, j], fmt),
                        ha="center",
                        va="center",
                        fontsize=7 if k > 10 else 8,
                        color="white" if mat[i, j] > thresh else "black",
                    )
    return fig


def per_class_accuracy_figure(acc: dict[str, float]) -> Figure:
    """Per-class accuracy, sorted ascending so the weak classes stand out at the top."""
    items = sorted(acc.items(), key=lambda kv: kv[1])
    names, vals = [k for k, _ in items], [100 * v for _, v in items]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(items) + 1.5), layout="constrained")
    mean = float(np.mean(vals))
    colors = ["C3" if v < mean else "C0" for v in vals]
    ax.barh(names, vals, color=colors)
    ax.axvline(mean, color="0.3", ls="--", lw=1, label=f"mean {mean:.1f}%")
    for i, v in enumerate(vals):
        ax.text(v + 0.3, i, f"{v:.1f}%", va="center", fontsize=8)
    ax.set(
        xlabel="test accuracy (%)",
        title="Per-class accuracy (red: below the mean)",
        xlim=(min(vals) - 5 if vals else 0, 101),
    )
    ax.legend(loc="lower right")
    return fig


def augmented_figure(images: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> Figure:
    return image_grid(
        images, [classes[i] for i in labels], "Augmented training images (as the model sees them)"
    )


def lr_find_figure_from_rows(rows: Sequence[dict], lr_find: dict, log_x: bool = True) -> Figure:
    """From metrics/lr_find_curve.csv rows (one seed) and metrics/lr_find.json."""
    return lr_find_figure(
        _column(rows, "lr"),
        _column(rows, "loss"),
        _column(rows, "smooth_loss"),
        {m: lr_find[m] for m in (*SUGGESTIONS, "lower_bound", "blowup") if lr_find.get(m)},
        lr_find["method"],
        _column(rows, "val_loss") if rows and "val_loss" in rows[0] else None,
        log_x=log_x,
        refined=lr_find["refine"]["chosen"] if "refine" in lr_find else None,
        margin=lr_find.get("blowup_margin") or 0.0,
    )


def misclassified_figure(x_test: np.ndarray, rows: Sequence[dict], count: int) -> Figure:
    """The most confident mistakes, from metrics/predictions.csv rows (index, actual, predicted,
    confidence)."""
    wrong = [r for r in rows if r["actual"] != r["predicted"]]
    shown = sorted(wrong, key=lambda r: -float(r["confidence"]))[:count]
    return image_grid(
        x_test[[int(r["index"]) for r in shown]],
        [f"{r['actual']}\n→ {r['predicted']} {100 * float(r['confidence']):.0f}%" for r in shown],
        f"Misclassified test images, most confident first ({len(wrong):,} of {len(rows):,} wrong)",
        colors=["firebrick"] * len(shown),
    )


def save(figs: dict[Path, Figure], dpi: int) -> list[Path]:
    """Write each figure to its path and close it; returns the paths."""
    for path, fig in figs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return list(figs)


def grid_figure(rows: Sequence[dict], name: str, summary: dict) -> Figure:
    """One grid's sweeps overlaid (log-x), one line per value, the chosen one bold: from
    metrics/lr_find_grid.csv rows of that grid and its summary in metrics/lr_find.json."""
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    held_out = bool(rows) and rows[0].get("val_loss") not in (None, "")
    key = "val_loss" if held_out else "smooth_loss"
    for i, value in enumerate(summary["values"]):
        mine = [r for r in rows if float(r["value"]) == value]
        chosen = value == summary["chosen"]
        ax.plot(
            _column(mine, "lr"),
            _column(mine, key),
            color=f"C{i % 10}",
            lw=2.8 if chosen else 1.3,
            label=f"{name} {value:g}" + (" (chosen)" if chosen else ""),
        )
    ax.set_xscale("log")
    ax.set(
        xlabel="learning rate (log scale)",
        ylabel=("held-out" if held_out else "smoothed training") + " loss",
        title=f"LR range test per {name.replace('_', ' ')} (choice: lowest loss)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    return fig
