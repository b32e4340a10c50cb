"""The LR-choice benchmark's scoring, offline and pure: a grid's accuracy against max LR (``Curve``), the suggestion rules read off stored sweeps, each rule's picks, spread and regret, and the rule chosen."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onecycle.range_test import curves


@dataclass(frozen=True)
class Curve:
    """Accuracy against max LR from the grid: per LR the mean and std over seeds."""

    lrs: np.ndarray
    val_mean: np.ndarray
    val_std: np.ndarray
    test_mean: np.ndarray
    runs: np.ndarray  # per LR: its seeds (more around the peak where the scenario asks)

    @classmethod
    def from_results(cls, results: list[dict]) -> Curve:
        by_lr: dict[float, list[dict]] = {}
        for r in results:
            by_lr.setdefault(float(r["max_lr"]), []).append(r)
        lrs = sorted(by_lr)
        val = [[r["val_accuracy"] for r in by_lr[lr]] for lr in lrs]
        test = [[r["accuracy"] for r in by_lr[lr]] for lr in lrs]
        return cls(
            np.array(lrs),
            np.array([np.mean(v) for v in val]),
            np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in val]),
            np.array([np.mean(t) for t in test]),
            np.array([len(v) for v in val]),
        )

    @property
    def seeds(self) -> int:
        """The seeds every grid LR has."""
        return int(self.runs.min())

    @property
    def best(self) -> int:
        return int(np.argmax(self.val_mean))

    def at(self, lr: float, which: str = "val") -> float:
        """Mean accuracy at ``lr``, linear in log LR between grid points (the end points'
        value beyond them)."""
        ys = self.val_mean if which == "val" else self.test_mean
        return float(np.interp(np.log(lr), np.log(self.lrs), ys))

    def regret(self, lr: float) -> float:
        """Best grid point's validation accuracy minus the pick's, in points."""
        return 100 * (self.val_mean[self.best] - self.at(lr))


# (lrs, losses, val, stop) -> lr; stop is the sweep's own: completed | diverged | non-finite
Rule = Callable[[list[float], list[float], list[float], str], float]


STOP = 4.0  # lr_find.diverge_factor: the stored sweeps ran on to 10, cut here when read


def rule(
    reader: Callable, how: str, fraction: float, on: str = "train", margin: float = 0, **kw
) -> Rule:
    """A suggestion rule: the curve (training or held-out loss) smoothed by ``how`` over
    ``fraction`` of the sweep, then read by ``reader`` (a ``curves.suggest_*``); with
    ``margin``, capped at the curve's blow-up over it (``curves.cap``, lr_find.blowup_margin)."""

    def pick(lrs, losses, val_losses, stop="completed"):
        raw = val_losses if on == "val" else losses
        read = curves.Sweep(lrs, raw, stop=stop).reread(how, fraction, STOP)  # as range_test
        lr = reader(read.lrs, read.smooth, **kw)
        return curves.cap(lr, curves.blowup_lr(read.lrs, read.smooth, read.stop), margin)

    return pick


def legacy(reader: Callable, beta: float = 0.98, **kw) -> Rule:
    """The old rules: the EMA at a fixed ``beta`` (the former lr_find.smooth_beta, 0.98)."""

    def pick(lrs, losses, val_losses, stop="completed"):
        smoothed = curves.ema(losses, beta)
        n = next((i + 1 for i, v in enumerate(smoothed) if v > STOP * min(smoothed[: i + 1])), None)
        return reader(lrs[:n], smoothed[:n], **kw)

    return pick


MARGINS = (8, 10, 12, 14, 16)  # lr_find.blowup_margin's candidates


def candidates() -> dict[str, Rule]:
    """Every rule the benchmark scores (name -> rule)."""
    out: dict[str, Rule] = {
        "min_div10 (ema 0.98)": legacy(curves.suggest_min_div10),
        "steepest (ema 0.98)": legacy(curves.suggest_steepest),
        "valley (ema 0.98)": legacy(curves.suggest_valley),
        "slide (ema 0.98)": legacy(curves.suggest_slide),
    }
    for how in ("ema", "centered"):
        for frac in (0.05, 0.1, 0.2):
            tag = f"{how} {frac:g}"
            for k in (1, 2, 3, 4, 10):
                out[f"min/{k} ({tag})"] = rule(curves.suggest_min, how, frac, divisor=k)
            for m in MARGINS:
                out[f"min/1 ({tag}) capped at blowup/{m}"] = rule(
                    curves.suggest_min, how, frac, margin=m
                )
            out[f"steepest ({tag})"] = rule(curves.suggest_steepest, how, frac)
            out[f"valley ({tag})"] = rule(curves.suggest_valley, how, frac)
            for k in (3, 10):
                out[f"blowup/{k} ({tag})"] = rule(curves.suggest_blowup, how, frac, divisor=k)
            for k in (1, 2, 3):
                out[f"val min/{k} ({tag})"] = rule(
                    curves.suggest_min, how, frac, on="val", divisor=k
                )
    return out


def picks(sweeps: list[dict], fn: Rule, num_iter: int, median_of: int = 1) -> list[float]:
    """``fn``'s pick on each stored sweep of ``num_iter`` steps (in seed order); with
    ``median_of`` > 1, the median of consecutive groups of that many sweeps (the pipeline's
    lr_find.seeds)."""
    chosen = sorted((s for s in sweeps if s["num_iter"] == num_iter), key=lambda s: s["seed"])
    out = []
    for s in chosen:
        try:
            lr = fn(s["lrs"], s["losses"], s["val_losses"], s.get("stop", "completed"))
        except (ValueError, IndexError, curves.LRFindError):
            lr = float("nan")
        out.append(lr if np.isfinite(lr) and lr > 0 else float("nan"))
    if median_of > 1:
        groups = [out[i : i + median_of] for i in range(0, len(out) - median_of + 1, median_of)]
        out = [float(np.nanmedian(g)) if np.isfinite(g).any() else float("nan") for g in groups]
    return out


def score_rule(curve: Curve, lrs: list[float]) -> dict:
    """One rule on one scenario: its picks' spread and regret (mean and worst), and the test
    accuracy at its picks (reported, never chosen on)."""
    ok = [lr for lr in lrs if np.isfinite(lr)]
    if not ok:
        return {"picks": lrs, "failed": len(lrs), "regret_mean": math.inf, "regret_max": math.inf}
    regrets = [curve.regret(lr) for lr in ok]
    return {
        "picks": lrs,
        "failed": len(lrs) - len(ok),
        "median_pick": float(np.median(ok)),
        "spread": float(max(ok) / min(ok)),
        "regret_mean": float(np.mean(regrets)) if len(ok) == len(lrs) else math.inf,
        "regret_max": float(np.max(regrets)) if len(ok) == len(lrs) else math.inf,
        "val_at_picks": 100 * float(np.mean([curve.at(lr) for lr in ok])),
        "test_at_picks": 100 * float(np.mean([curve.at(lr, "test") for lr in ok])),
        "outside_grid": sum(not curve.lrs[0] <= lr <= curve.lrs[-1] for lr in ok),
    }


# How a rule reads the stored sweeps: at the pipeline's sweep length or the scenario's longest,
# one sweep per pick or the median of three (the pipeline's lr_find.seeds: 3).
VARIANTS: dict[str, tuple[str, int]] = {
    "": ("short", 1),
    ", long sweep": ("long", 1),
    ", median of 3": ("short", 3),
    ", long sweep, median of 3": ("long", 3),
}


def score(scenarios: dict[str, tuple[Curve, list[dict], int]], rules: dict[str, Rule]) -> dict:
    """Every rule in every variant on every scenario: {name: {scenario: score_rule(...)}}; each
    scenario is (its grid curve, its sweeps, the pipeline's sweep length). A variant's name is
    the rule's with VARIANTS' suffix."""
    out = {}
    for name, fn in rules.items():
        for suffix, (length, median_of) in VARIANTS.items():
            per = {}
            for sc, (curve, sweeps, n) in scenarios.items():
                n = max(s["num_iter"] for s in sweeps) if length == "long" else n
                per[sc] = score_rule(curve, picks(sweeps, fn, n, median_of)) | {"num_iter": n}
            out[name + suffix] = per
    return out


def variant_picks(name: str, rules: dict[str, Rule], sweeps: list[dict], n: int) -> list[float]:
    """The picks of a scored name (a rule and a VARIANTS suffix) on one scenario's sweeps."""
    for suffix, (length, median_of) in sorted(VARIANTS.items(), key=lambda kv: -len(kv[0])):
        base = name.removesuffix(suffix) if suffix else name
        if base in rules and (not suffix or name.endswith(suffix)):
            n = max(s["num_iter"] for s in sweeps) if length == "long" else n
            return picks(sweeps, rules[base], n, median_of)
    raise KeyError(name)


def worst_case(scores: dict, leave_out: str | None = None) -> dict[str, float]:
    """Per rule, its worst mean regret over the scenarios (``leave_out`` left out)."""
    return {
        rule_: max(v["regret_mean"] for sc, v in per.items() if sc != leave_out)
        for rule_, per in scores.items()
    }


def tolerance(curve: Curve) -> float:
    """What counts as close enough: 0.5 points, or the best grid point's seed std if larger."""
    return max(0.5, 100 * float(curve.val_std[curve.best]))


# What params.yaml's lr_find defaults read as a rule here (suggestion min, smooth centered,
# smooth_window 0.2, seeds 3, the scenario's longer sweep); tests/test_lr_choice.py holds it to
# config.py's defaults. The report marks it apart from the rule the scores rank first.
PIPELINE_DEFAULT = "min/1 (centered 0.2) capped at blowup/12, long sweep, median of 3"


SPREAD_LIMIT = 1.5  # the acceptance bound on a rule's pick spread over the sweeps


def stable(scores: dict, leave_out: str | None = None) -> dict:
    """The rules whose picks spread at most SPREAD_LIMIT in every scenario (``leave_out`` left
    out); all of them when none does."""
    ok = {
        r: per for r, per in scores.items()
        if all(v.get("spread", math.inf) <= SPREAD_LIMIT for sc, v in per.items() if sc != leave_out)
    }  # fmt: skip
    return ok or scores


def mean_regret(scores: dict, leave_out: str | None = None) -> dict[str, float]:
    """Per rule, its mean regret over the scenarios (``leave_out`` left out)."""
    return {
        rule_: float(np.mean([v["regret_mean"] for sc, v in per.items() if sc != leave_out]))
        for rule_, per in scores.items()
    }


def _lowest(scores: dict, leave_out: str | None = None) -> str:
    """The stable rule of lowest worst-case regret; on a tie, of lowest mean regret. Ties are
    common: the worst case is often one scenario that many rules read alike (plain ``min`` and
    every capped ``min`` agree wherever no sweep climbed back)."""
    ok = stable(scores, leave_out)
    worst, mean = worst_case(ok, leave_out), mean_regret(ok, leave_out)
    return min(worst, key=lambda r: (round(worst[r], 9), mean[r], r))


def choose_default(scores: dict) -> tuple[str, dict[str, str]]:
    """Among the stable rules, the one of lowest worst-case mean regret over all scenarios (then
    of lowest mean); and for each scenario left out, the rule that the others would have chosen
    (leave one scenario out: the choice made without it, then scored on it)."""
    scenarios = list(next(iter(scores.values())))
    held_out = {sc: _lowest(scores, sc) for sc in (scenarios if len(scenarios) > 1 else [])}
    return _lowest(scores), held_out


def confirmed(curve: Curve, results: list[dict], grid: list[dict] | None = None) -> dict:
    """The default's own runs against the grid: its picks, measured validation and test
    accuracy (mean, sample std), the grid's interpolation at those picks, and the regret; the
    test regret beside it: the test accuracy of the grid LR best on validation minus the runs'
    (reported, never chosen on; the test images are the same for every seed, where each seed
    carves its own validation split); with the grid's results, also the paired regret: on the
    seeds the grid ran too, the best grid LR's accuracy minus the pick's, seed by seed."""
    val = [100 * r["val_accuracy"] for r in results]
    test = [100 * r["accuracy"] for r in results]
    lrs = [float(r["max_lr"]) for r in results]
    best = 100 * float(curve.val_mean[curve.best])
    return {
        "picks": lrs,
        "val_mean": float(np.mean(val)),
        "val_std": float(np.std(val, ddof=1)) if len(val) > 1 else 0.0,
        "test_mean": float(np.mean(test)),
        "test_std": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0,
        "interpolated": float(np.mean([100 * curve.at(lr) for lr in lrs])),
        "regret": best - float(np.mean(val)),
        "test_regret": 100 * float(curve.test_mean[curve.best]) - float(np.mean(test)),
        "runs": len(results),
        "train_seconds": _mean_of(results, "seconds"),
        "other_seconds": _mean_of(
            [{"other": r["wall_seconds"] - r["seconds"]} for r in results if r.get("wall_seconds")],
            "other",
        ),
        **_paired(curve, results, grid or []),
    }


def _mean_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _paired(curve: Curve, results: list[dict], grid: list[dict]) -> dict:
    best_lr = float(curve.lrs[curve.best])
    at_best = {r["seed"]: r["val_accuracy"] for r in grid if float(r["max_lr"]) == best_lr}
    diffs = [
        100 * (at_best[r["seed"]] - r["val_accuracy"]) for r in results if r["seed"] in at_best
    ]
    if not diffs:
        return {}
    return {"paired_regret": float(np.mean(diffs)), "paired_seeds": len(diffs)}
