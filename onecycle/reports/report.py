"""The one-page Markdown report that the plots stage writes (and CI can post)."""

from __future__ import annotations

from onecycle.config import SUGGESTIONS


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * float(v):.2f}%"


def _val(data: dict) -> str:
    return f"{data['num_val']:,} validation / " if data.get("num_val") else ""


def render(
    lr_find: dict, train: dict, evaluation: dict, data: dict, figures: list[tuple[str, str]]
) -> str:
    """``figures`` is a list of (title, relative PNG path)."""
    weak = sorted(evaluation["per_class"].items(), key=lambda kv: kv[1]["accuracy"])[:4]
    lines = [
        "# CIFAR-10 1cycle run",
        "",
        f"**Test accuracy: {_pct(evaluation['accuracy'])}** ({evaluation['misclassified']:,} of "
        f"{evaluation['num_test']:,} test images misclassified), test loss {evaluation['loss']:.4f}.",
        "",
        "| what | value |",
        "| --- | --- |",
        f"| data | {data['num_train']:,} train / {_val(data)}{data['num_test']:,} test images, {data['num_classes']} classes |",
        *([f"| validation accuracy | {_pct(train['val_acc'])} |"] if train.get("val_acc") else []),
        f"| max LR used | {train['max_lr']:.4g} (from {train['max_lr_source']}) |",
        f"| lr_find suggestion ({lr_find['method']}) | {lr_find['max_lr']:.4g} |",
        "| lr_find, every method | "
        + ", ".join(
            f"{m} {lr_find[m]:.3g}"
            for m in (*SUGGESTIONS, "lower_bound", "blowup")
            if lr_find.get(m) is not None
        )
        + " |",
        f"| epochs | {train['epochs']} ({train['train_seconds']:.0f} s of training, {train['images_per_sec']:.0f} img/s) |",
        f"| final train accuracy | {_pct(train['train_acc'])} (on augmented images) |",
        f"| macro F1 | {evaluation['macro_f1']:.4f} |",
        "| weakest classes | " + ", ".join(f"{c} {_pct(m['accuracy'])}" for c, m in weak) + " |",
        "",
    ]
    for title, path in figures:
        lines += [f"## {title}", "", f"![{title}]({path})", ""]
    return "\n".join(lines)
