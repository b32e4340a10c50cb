"""The LR-choice benchmark (``make bench-lr``): is the range test's pick the best max LR?

Per scenario (``studies/lr-choice/<name>.yaml``):

* a grid of fixed max LRs, each trained with 1cycle through the pipeline over several seeds (a
  study: queued DVC experiments, reported from MLflow), giving validation accuracy against max
  LR, with the test accuracy beside it;
* range-test sweeps over many seeds, stored as data (lrs, raw losses, held-out losses): a sweep
  is cheap, so every suggestion rule can be scored offline from the same sweeps.

Then every rule is scored without retraining (``score``): its picks over the sweeps, their
spread (max / min), and its regret: the best grid point's mean validation accuracy minus the
accuracy at the pick, interpolated on log LR between grid points. Nothing here reads the test
split to choose; it is reported beside the validation numbers.

Everything is resumable: a sweep or run that is stored is not redone.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from onecycle import progress
from onecycle.errors import UserError
from onecycle.range_test import curves
from onecycle.tracking import provenance

OUT = Path("reports/lr-choice")


class BenchError(UserError):
    """A scenario file or the stored data cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    common: dict[str, object]  # params overrides for every run and sweep
    grid: list[float]  # fixed max LRs
    seeds: list[int]  # of the grid runs
    sweep_seeds: int = 10
    sweep_lengths: list[int] = field(default_factory=lambda: [100])
    sweep_val_images: int = 512  # held-out loss per step, from the validation split
    source: dict | None = None  # as a study's: trained first, its checkpoint for the settings
    jobs: int = 2
    path: Path = Path(".")

    def study(self):
        from onecycle.commands import study_spec

        settings = {f"lr-{lr:g}": {"train.max_lr": lr} for lr in self.grid}
        return study_spec.Study(
            f"lrc-{self.name}",
            self.description,
            self.common,
            settings,
            self.seeds,
            jobs=self.jobs,
            figure="max_lr",
            source=self.source,
        )

    def confirm_study(self):
        """The pipeline's own default (``train.max_lr: auto``: lr_find's defaults, median of
        its seeds' picks) on the scenario's longest sweep, over 3 seeds: the scoring's
        interpolation checked by training."""
        from onecycle.commands import study_spec

        return study_spec.Study(
            f"lrc-{self.name}-auto",
            f"{self.description} The default rule's own pick, trained.",
            {**self.common, "lr_find.num_iter": max(self.sweep_lengths), "train.max_lr": "auto"},
            {"auto": {}},
            [0, 1, 2],
            jobs=self.jobs,
            source=self.source,
        )

    @property
    def out(self) -> Path:
        return OUT / self.name


def load(path: Path) -> Scenario:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BenchError(f"{path}: cannot read the scenario ({exc})") from None
    sweeps = raw.pop("sweeps", {}) or {}
    allowed = {"name", "description", "common", "grid", "seeds", "source", "jobs"}
    unknown = sorted(set(raw) - allowed) + sorted(set(sweeps) - {"seeds", "lengths", "val_images"})
    if unknown:
        raise BenchError(f"{path}: unknown key(s) {unknown}")
    grid = [float(x) for x in raw.get("grid") or []]
    if len(grid) < 2 or sorted(grid) != grid:
        raise BenchError(f"{path}: grid must list at least 2 max LRs, increasing")
    return Scenario(
        str(raw.get("name", "")),
        str(raw.get("description", "")),
        dict(raw.get("common") or {}),
        grid,
        list(raw.get("seeds") or [0, 1]),
        int(sweeps.get("seeds", 10)),
        [int(n) for n in sweeps.get("lengths", [100])],
        int(sweeps.get("val_images", 512)),
        raw.get("source"),
        int(raw.get("jobs", 2)),
        Path(path),
    )


# ---------------------------------------------------------------- the sweeps (in-process)


def params_for(scenario: Scenario, repo: Path, **overrides):
    """params.yaml of ``repo`` with the scenario's overrides and ``overrides`` (dotted keys)."""
    from onecycle.config import parse_params, read_yaml, with_overrides

    raw = with_overrides(read_yaml(repo / "params.yaml"), {**scenario.common, **overrides})
    return parse_params(raw, f"{scenario.path} over params.yaml")


def prepare(params, repo: Path):
    """The download stage's data/prepared, in memory (a temporary folder)."""
    from onecycle import paths
    from onecycle.data import prepared, sources

    ds, source = sources.fetch(params.data, repo, repo / paths.RAW_DIR, params.base.seed)
    ds, val = prepared.carve_validation(ds, params.data.val_images, params.base.seed)
    with tempfile.TemporaryDirectory() as tmp:
        return prepared.save_prepared(ds, Path(tmp) / "prepared", source, val)


def sweeps_path(scenario: Scenario) -> Path:
    return scenario.out / "sweeps.json"


def run_sweeps(scenario: Scenario, repo: Path = Path(".")) -> list[dict]:
    """``sweep_seeds`` range tests per length, each stored as it ends (resumable). They run to
    a wide divergence factor (10): a rule's own stop is applied when it is scored."""
    from onecycle.range_test import lr_finder
    from onecycle.training import init_weights
    from onecycle.training.runtime import select_device

    path = sweeps_path(scenario)
    done = json.loads(path.read_text()) if path.exists() else []
    have = {(s["seed"], s["num_iter"]) for s in done}
    todo = [
        (seed, n) for seed in range(scenario.sweep_seeds) for n in scenario.sweep_lengths
        if (seed, n) not in have
    ]  # fmt: skip
    data_seed, data, start = None, None, None
    for seed, n in todo:
        params = params_for(
            scenario,
            repo,
            **{
                "base.seed": seed,
                "lr_find.num_iter": n,
                "lr_find.val_images": scenario.sweep_val_images,
                "lr_find.diverge_factor": 10.0,
            },
        )
        if data_seed != seed:  # the subsets and the validation split follow the seed
            start = init_weights.load(params.model)
            data, data_seed = start.normalize(prepare(params, repo)), seed
        dev = select_device(params.base.device, params.base.num_workers)
        sweep = lr_finder.range_test(
            params, data, dev, seed, f"{scenario.name} sweep {seed}/{n}", start
        )
        done.append(
            {
                "seed": seed,
                "num_iter": n,
                "lrs": sweep.lrs,
                "losses": sweep.losses,
                "val_losses": sweep.val_losses,
                "stop": sweep.stop,
            }
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(done) + "\n")
    return done


# ---------------------------------------------------------------- the grid (through DVC)


def run_confirm(scenario: Scenario, repo: Path = Path(".")) -> Path:
    """The default's pick trained over 3 seeds (a study; resumes), reported into ``out/confirm``."""
    from onecycle.commands import study, study_report

    s = scenario.confirm_study()
    failed = study.run(s, repo)
    report = study_report.report(s, repo, out=repo / scenario.out / "confirm")
    if failed:
        raise BenchError(f"{scenario.name}: confirm runs failed: {', '.join(failed)}")
    return report


def run_grid(scenario: Scenario, repo: Path = Path(".")) -> Path:
    """The grid as a study (queued DVC experiments), one max LR at a time, reported into
    ``out/grid``. Resumes across clones and sessions: the runs already in the committed
    ``results.json`` are kept, not queued again, and each LR's runs are added to it as they end
    (the study's report then covers the runs of this clone's store)."""
    from dataclasses import replace

    from onecycle.commands import study, study_report

    s = scenario.study()
    path = repo / scenario.out / "grid" / "results.json"
    stored = json.loads(path.read_text()) if path.exists() else []
    failed = []
    for label, overrides in s.settings.items():
        have = {r["seed"] for r in stored if r["label"] == label}
        seeds = [x for x in s.seeds if x not in have]
        if not seeds:
            continue
        part = replace(s, settings={label: overrides}, seeds=seeds)
        failed += study.run(part, repo)
        found, _ = study_report.collect(part, repo)
        stored += [r.__dict__ for r in found]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=2) + "\n")
    if failed:
        raise BenchError(f"{scenario.name}: grid runs failed: {', '.join(failed)}")
    return grid_report(scenario, s, [study_report.RunResult(**r) for r in stored], repo)


def grid_report(scenario: Scenario, s, results: list, repo: Path) -> Path:
    """The grid's report.md and figure from its stored results (whichever clone ran them)."""
    from onecycle.commands import study_report
    from onecycle.reports import figures

    out = repo / scenario.out / "grid"
    order = s.runs()
    results = sorted(results, key=lambda r: order.index((r.label, r.seed)))
    done = {(r.label, r.seed) for r in results}
    missing = [s.exp_name(label, seed) for label, seed in order if (label, seed) not in done]
    png = out / f"{s.name}.png"
    figures.save({png: figures.study_lr_figure(results, s.name)}, dpi=120)
    source = study_report.source_line(s, repo) if s.source else None
    text = study_report.markdown(
        s, study_report.summarize(results), missing, png.name, provenance.machine_name(), source
    )
    (out / "report.md").write_text(text)
    return out / "report.md"


# ---------------------------------------------------------------- scoring (offline, pure)


@dataclass(frozen=True)
class Curve:
    """Accuracy against max LR from the grid: per LR the mean and std over seeds."""

    lrs: np.ndarray
    val_mean: np.ndarray
    val_std: np.ndarray
    test_mean: np.ndarray
    seeds: int

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
            min(len(v) for v in val),
        )

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


Rule = Callable[[list[float], list[float], list[float]], float]  # (lrs, losses, val) -> lr


STOP = 4.0  # lr_find.diverge_factor: the stored sweeps ran on to 10, cut here when read


def rule(reader: Callable, how: str, fraction: float, on: str = "train", **kw) -> Rule:
    """A suggestion rule: the curve (training or held-out loss) smoothed by ``how`` over
    ``fraction`` of the sweep, then read by ``reader`` (a ``curves.suggest_*``)."""

    def pick(lrs, losses, val_losses):
        raw = val_losses if on == "val" else losses
        read = curves.Sweep(lrs, raw).reread(how, fraction, STOP)  # as lr_finder.range_test
        return reader(read.lrs, read.smooth, **kw)

    return pick


def legacy(reader: Callable, beta: float = 0.98, **kw) -> Rule:
    """The old rules: the EMA at a fixed ``beta`` (the former lr_find.smooth_beta, 0.98)."""

    def pick(lrs, losses, val_losses):
        smoothed = curves.ema(losses, beta)
        n = next((i + 1 for i, v in enumerate(smoothed) if v > STOP * min(smoothed[: i + 1])), None)
        return reader(lrs[:n], smoothed[:n], **kw)

    return pick


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
            lr = fn(s["lrs"], s["losses"], s["val_losses"])
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


# ---------------------------------------------------------------- the report


SHOWN = {  # the rules drawn on each scenario's figure
    "the old default": "min_div10 (ema 0.98)",
    "fastai valley": "valley (ema 0.98)",
}
# What params.yaml's lr_find defaults read as a rule here (suggestion min, smooth centered,
# smooth_window 0.2, seeds 3, the scenario's longer sweep); tests/test_lr_choice.py holds it to
# config.py's defaults. The report marks it apart from the rule the scores rank first.
PIPELINE_DEFAULT = "min/1 (centered 0.2), long sweep, median of 3"


def collect(scenarios: list[Scenario]) -> dict[str, tuple[Curve, list[dict], int]]:
    """Each scenario whose grid and sweeps are stored: (its grid curve, its sweeps, the sweep
    length it is scored at: its pipeline's lr_find.num_iter)."""
    found = {}
    for sc in scenarios:
        grid, sweeps = sc.out / "grid" / "results.json", sweeps_path(sc)
        if not (grid.exists() and sweeps.exists()):
            continue
        results = [r for r in json.loads(grid.read_text()) if r.get("val_accuracy") is not None]
        if len({r["max_lr"] for r in results}) < 2:
            continue
        n = int(sc.common.get("lr_find.num_iter", 100))
        found[sc.name] = (Curve.from_results(results), json.loads(sweeps.read_text()), n)
    return found


SPREAD_LIMIT = 1.5  # the acceptance bound on a rule's pick spread over the sweeps


def stable(scores: dict, leave_out: str | None = None) -> dict:
    """The rules whose picks spread at most SPREAD_LIMIT in every scenario (``leave_out`` left
    out); all of them when none does."""
    ok = {
        r: per for r, per in scores.items()
        if all(v.get("spread", math.inf) <= SPREAD_LIMIT for sc, v in per.items() if sc != leave_out)
    }  # fmt: skip
    return ok or scores


def choose_default(scores: dict) -> tuple[str, dict[str, str]]:
    """Among the stable rules, the one of lowest worst-case mean regret over all scenarios; and
    for each scenario left out, the rule that the others would have chosen (leave one scenario
    out: the choice made without it, then scored on it)."""
    worst = worst_case(stable(scores))
    best = min(worst, key=lambda r: (worst[r], r))
    scenarios = list(next(iter(scores.values())))
    held_out = {}
    for sc in scenarios if len(scenarios) > 1 else []:
        others = worst_case(stable(scores, leave_out=sc), leave_out=sc)
        held_out[sc] = min(others, key=lambda r: (others[r], r))
    return best, held_out


def confirmed(curve: Curve, results: list[dict], grid: list[dict] | None = None) -> dict:
    """The default's own runs against the grid: its picks, measured validation and test
    accuracy (mean, sample std), the grid's interpolation at those picks, and the regret; with
    the grid's results, also the paired regret: on the seeds the grid ran too (each seed
    carves its own validation split), the best grid LR's accuracy minus the pick's, seed by
    seed."""
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
        "runs": len(results),
        **_paired(curve, results, grid or []),
    }


def _paired(curve: Curve, results: list[dict], grid: list[dict]) -> dict:
    best_lr = float(curve.lrs[curve.best])
    at_best = {r["seed"]: r["val_accuracy"] for r in grid if float(r["max_lr"]) == best_lr}
    diffs = [
        100 * (at_best[r["seed"]] - r["val_accuracy"]) for r in results if r["seed"] in at_best
    ]
    if not diffs:
        return {}
    return {"paired_regret": float(np.mean(diffs)), "paired_seeds": len(diffs)}


def confirmations(scenarios: list[Scenario], found: dict) -> dict[str, dict]:
    out = {}
    for sc in scenarios:
        path = sc.out / "confirm" / "results.json"
        if sc.name in found and path.exists():
            results = [r for r in json.loads(path.read_text()) if r.get("val_accuracy") is not None]
            grid = json.loads((sc.out / "grid" / "results.json").read_text())
            if results:
                out[sc.name] = confirmed(found[sc.name][0], results, grid)
    return out


def markdown(scores: dict, found: dict, best: str, held_out: dict, machine: str, top: int = 12,
             confirm: dict | None = None):  # fmt: skip
    names = list(found)
    worst = worst_case(scores)
    ranked = sorted(worst, key=lambda r: (worst[r], r))
    steady = [r for r in ranked if r in stable(scores)]
    ours = [PIPELINE_DEFAULT] if PIPELINE_DEFAULT in scores else []
    shown = list(dict.fromkeys(ours + steady[:top] + ranked[: top // 2] + list(SHOWN.values())))
    lines = [
        "# LR choice: which rule lands on the best max LR?",
        "",
        "Regret = the best grid point's mean validation accuracy minus the accuracy at the "
        "rule's pick (interpolated on log LR), in points, averaged over the stored sweeps; "
        "spread = largest pick / smallest. Chosen on validation accuracy; test accuracy is "
        f"reported in scores.json. Measured on {machine}.",
        "",
        "Each rule is read four ways: on one sweep of the pipeline's length, on the longest "
        "stored sweep (`long sweep`), and as the median of three sweeps (`median of 3`, the "
        "pipeline's `lr_find.seeds: 3`). Rules are ranked by their worst-case regret, first "
        f"among those whose picks spread at most {SPREAD_LIMIT}x in every scenario (marked "
        "stable); the pipeline's default (params.yaml's lr_find) is in bold.",
        "",
        "| scenario | grid runs (seeds) | best max LR | best val. accuracy | tolerance |",
        "| --- | --- | --- | --- | --- |",
    ]
    for sc, (curve, _, _) in found.items():
        b = curve.best
        lines.append(
            f"| {sc} | {len(curve.lrs)} LRs x {curve.seeds} | {curve.lrs[b]:g} | "
            f"{100 * curve.val_mean[b]:.2f} ± {100 * curve.val_std[b]:.2f} % | "
            f"{tolerance(curve):.2f} |"
        )
    lines += [
        "",
        "| rule | stable | worst | " + " | ".join(f"{sc}: regret, spread" for sc in names) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    steady_set = set(steady)
    for r in shown:
        cells = []
        for sc in names:
            v = scores[r][sc]
            spread = f"{v['spread']:.1f}x" if "spread" in v else "n/a"
            cells.append(f"{v['regret_mean']:.2f}, {spread}")
        mark = "**" if r == PIPELINE_DEFAULT else ""
        ok = "yes" if r in steady_set and len(steady_set) < len(scores) else ""
        lines.append(f"| {mark}{r}{mark} | {ok} | {worst[r]:.2f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        *(
            [
                f"The pipeline's default (bold): {PIPELINE_DEFAULT}, worst case "
                f"{worst_case(scores)[PIPELINE_DEFAULT]:.2f} points."
            ]
            if ours
            else []
        ),
        f"Lowest worst-case regret among the stable rules: {best} ({worst[best]:.2f} points).",
        "",
        "Left out one scenario at a time, the others choose:",
        "",
    ]
    for sc, rule_ in held_out.items():
        v = scores[rule_][sc]
        lines.append(
            f"- without {sc}: {rule_}; on {sc} itself it scores {v['regret_mean']:.2f} points "
            f"(tolerance {tolerance(found[sc][0]):.2f})"
        )
    if confirm:
        lines += [
            "",
            "Confirmed by training (`python -m onecycle.commands.lrbench confirm`): the pipeline's own "
            "default (`train.max_lr: auto`) on the scenario's longest sweep, 3 seeds:",
            "",
            "| scenario | picks | val. accuracy | grid interpolated at the picks | regret | "
            "paired regret (seeds) | test accuracy |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for sc, c in confirm.items():
            paired = (
                f"{c['paired_regret']:.2f} ({c['paired_seeds']})" if "paired_regret" in c else "n/a"
            )
            lines.append(
                f"| {sc} | {', '.join(f'{lr:.3g}' for lr in c['picks'])} | "
                f"{c['val_mean']:.2f} ± {c['val_std']:.2f} % | {c['interpolated']:.2f} % | "
                f"{c['regret']:.2f} | {paired} | {c['test_mean']:.2f} ± {c['test_std']:.2f} % |"
            )
        lines += [
            "",
            "Regret: the best grid point's validation accuracy (its seeds' mean) minus the runs' "
            "mean; paired: the same, seed by seed, on the seeds the grid ran too (each seed "
            "carves its own validation split, so a seed the grid never ran is compared on "
            "other images).",
        ]
    return "\n".join(lines) + "\n"


def report(scenarios: list[Scenario], out: Path = OUT) -> Path:
    """reports/lr-choice/{report.md, scores.json, <scenario>.png} from what is stored."""
    from onecycle.reports import figures

    found = collect(scenarios)
    if not found:
        raise BenchError("no scenario has both its grid and its sweeps stored yet; run them first")
    rules = candidates()
    scores = score(found, rules)
    best, held_out = choose_default(scores)
    out.mkdir(parents=True, exist_ok=True)
    for sc, (curve, sweeps, n) in found.items():
        shown = {**SHOWN, "the default": PIPELINE_DEFAULT}
        if best != PIPELINE_DEFAULT:
            shown["lowest worst-case regret"] = best
        drawn = {f"{label}: {r}": variant_picks(r, rules, sweeps, n) for label, r in shown.items()}
        fig = figures.lr_choice_figure(
            sc, curve.lrs, 100 * curve.val_mean, 100 * curve.val_std, 100 * curve.test_mean,
            drawn, f"sweeps of {n} steps (long: {max(s['num_iter'] for s in sweeps)})",
        )  # fmt: skip
        figures.save({out / f"{sc}.png": fig}, dpi=110)
    confirm = confirmations(scenarios, found)
    (out / "scores.json").write_text(
        json.dumps(
            {
                "default": PIPELINE_DEFAULT,
                "lowest_worst_case": best,
                "held_out": held_out,
                "confirmed": confirm,
                "scores": scores,
            },
            indent=1,
        )
        + "\n"
    )
    text = markdown(scores, found, best, held_out, provenance.cpu_name(), confirm=confirm)
    (out / "report.md").write_text(text)
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m onecycle.commands.lrbench", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "action",
        choices=["sweeps", "grid", "run", "confirm", "report"],
        help="sweeps | grid | run (both) | confirm (the default's own pick trained, 3 seeds) | "
        "report (score what is stored)",
    )
    ap.add_argument("scenarios", nargs="+", type=Path, help="studies/lr-choice/<name>.yaml")
    args = ap.parse_args(argv)
    if args.action == "report":
        print(f"bench-lr: {report([load(p) for p in args.scenarios])}")
        return
    for path in args.scenarios:
        scenario = load(path)
        if scenario.source and args.action != "confirm":  # settings and sweeps start from it
            from onecycle.commands import study

            study.train_source(scenario.study(), Path("."))
        if args.action in ("sweeps", "run"):
            found = run_sweeps(scenario)
            progress.say(f"{scenario.name}: {len(found)} sweeps in {sweeps_path(scenario)}")
        if args.action in ("grid", "run"):
            progress.say(f"{scenario.name}: {run_grid(scenario)}")
        if args.action == "confirm":
            progress.say(f"{scenario.name}: {run_confirm(scenario)}")


if __name__ == "__main__":
    from onecycle.pipeline import runner

    runner.run(main, "bench-lr")
