"""The studies' figures (``make study-*``, ``make bench-lr``): accuracy per epoch or against
max LR over seeds, and a scenario's LR-choice picks on its grid. Data in, a matplotlib Figure out,
as in figures.py, whose ``save`` writes them."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _mean_std(values: list[list[float]]):
    arr = np.asarray(values, dtype=float)
    std = arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1])
    return arr.mean(0), std


def study_epochs_figure(results, name: str) -> Figure:
    """Test accuracy per epoch, one mean line and a std band per setting (a study's runs)."""
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for i, label in enumerate(dict.fromkeys(r.label for r in results)):
        mine = [r for r in results if r.label == label and r.test_acc]
        if not mine:
            continue
        curves = [r.test_acc for r in mine]
        n = min(len(c) for c in curves)
        mean, std = _mean_std([c[:n] for c in curves])
        # the epochs the test set was looked at (train.eval_every), else one look an epoch
        epochs = np.asarray(mine[0].test_epochs[:n] or np.arange(1, n + 1))
        ax.plot(epochs, 100 * mean, "o-", color=f"C{i}", label=f"{label} ({len(curves)} seeds)")
        ax.fill_between(epochs, 100 * (mean - std), 100 * (mean + std), color=f"C{i}", alpha=0.2)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"Study {name}: mean ± std over seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def study_lr_figure(results, name: str) -> Figure:
    """Test accuracy against max LR (log x), mean ± std per fixed LR; each suggestion method's
    picks marked where they trained."""
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    grid = sorted({r.max_lr for r in results if not r.label.startswith("pick-")})
    by_lr = [
        [r.accuracy for r in results if r.max_lr == lr and not r.label.startswith("pick-")]
        for lr in grid
    ]
    means = [100 * np.mean(a) for a in by_lr]
    stds = [100 * np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in by_lr]
    ax.errorbar(grid, means, yerr=stds, fmt="o-", color="0.3", capsize=3, label="fixed max LR")
    markers = {"pick-min": "D", "pick-valley": "v", "pick-steepest": "^", "pick-min_div10": "s"}
    for i, label in enumerate(m for m in markers if any(r.label == m for r in results)):
        mine = [r for r in results if r.label == label]
        ax.scatter(
            [r.max_lr for r in mine],
            [100 * r.accuracy for r in mine],
            marker=markers[label],
            s=60,
            color=f"C{i + 1}",
            zorder=3,
            label=f"{label.removeprefix('pick-')} picks (mean {100 * np.mean([r.accuracy for r in mine]):.1f}%)",
        )
    ax.set_xscale("log")
    ax.set(
        xlabel="max LR (log scale)",
        ylabel="test accuracy (%)",
        title=f"Study {name}: accuracy against max LR",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    return fig


def lr_choice_figure(
    name: str,
    lrs: Sequence[float],
    val_mean: Sequence[float],
    val_std: Sequence[float],
    test_mean: Sequence[float],
    picks: dict[str, Sequence[float]],
    subtitle: str = "",
) -> Figure:
    """One LR-choice scenario: validation accuracy (%) against max LR (log x) with its seed std
    band and the test accuracy beside it; each rule's picks (one per sweep) as a row of ticks
    under the curve, their median ringed."""
    fig, ax = plt.subplots(figsize=(8.5, 6.2), layout="constrained")
    lrs, mean, std = np.asarray(lrs), np.asarray(val_mean), np.asarray(val_std)
    ax.fill_between(lrs, mean - std, mean + std, color="C0", alpha=0.2, label="validation ± std")
    ax.plot(lrs, mean, "o-", color="C0", label="validation (mean over seeds)")
    ax.plot(lrs, test_mean, "s--", color="0.5", ms=4, lw=1, label="test (reported, not chosen on)")
    low = float(np.nanmin(mean - std))
    span = float(np.nanmax(mean + std)) - low
    for i, (rule_name, chosen) in enumerate(picks.items()):
        ok = [p for p in chosen if np.isfinite(p)]
        y = low - span * (0.12 + 0.08 * i)
        color = f"C{i + 1}"
        ax.scatter(ok, [y] * len(ok), marker="|", s=120, color=color, label=rule_name)
        if ok:
            ax.scatter([np.median(ok)], [y], s=70, facecolors="none", edgecolors=color, lw=1.5)
    ax.set_xscale("log")
    ax.set(
        xlabel="max LR (log scale)",
        ylabel="accuracy (%)",
        title=f"LR choice, {name}: accuracy against max LR" + (f"\n{subtitle}" if subtitle else ""),
    )
    ax.grid(True, which="both", alpha=0.3)
    # under the axes: the rows of picks fill the bottom of the plot
    fig.legend(fontsize=8, loc="outside lower center", ncols=2)
    return fig
