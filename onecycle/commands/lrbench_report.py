"""The LR-choice benchmark's reports from what is stored: ``reports/lr-choice/{report.md, scores.json, <scenario>.png}`` and each grid's own report."""

from __future__ import annotations

import json
from pathlib import Path

from onecycle.commands import lrbench_score, lrbench_spec
from onecycle.tracking import provenance

SHOWN = {  # the rules drawn on each scenario's figure
    "the old default": "min_div10 (ema 0.98)",
    "fastai valley": "valley (ema 0.98)",
}


def collect(
    scenarios: list[lrbench_spec.Scenario],
) -> dict[str, tuple[lrbench_score.Curve, list[dict], int]]:
    """Each scenario whose grid and sweeps are stored: (its grid curve, its sweeps, the sweep
    length it is scored at: its pipeline's lr_find.num_iter)."""
    found = {}
    for sc in scenarios:
        grid, sweeps = sc.out / "grid" / "results.json", lrbench_spec.sweeps_path(sc)
        if not (grid.exists() and sweeps.exists()):
            continue
        results = [r for r in json.loads(grid.read_text()) if r.get("val_accuracy") is not None]
        if len({r["max_lr"] for r in results}) < 2:
            continue
        n = int(sc.common.get("lr_find.num_iter", 100))
        found[sc.name] = (
            lrbench_score.Curve.from_results(results),
            json.loads(sweeps.read_text()),
            n,
        )
    return found


CONFIRM = {False: "confirm", True: "confirm-refine"}  # each scenario's folder, by lr_find.refine


def confirmations(
    scenarios: list[lrbench_spec.Scenario], found: dict, folder: str = CONFIRM[False]
) -> dict[str, dict]:
    out = {}
    for sc in scenarios:
        path = sc.out / folder / "results.json"
        if sc.name in found and path.exists():
            results = [r for r in json.loads(path.read_text()) if r.get("val_accuracy") is not None]
            grid = json.loads((sc.out / "grid" / "results.json").read_text())
            if results:
                out[sc.name] = lrbench_score.confirmed(found[sc.name][0], results, grid)
    return out


def markdown(scores: dict, found: dict, best: str, held_out: dict, machine: str, top: int = 12,
             confirm: dict | None = None, refined: dict | None = None):  # fmt: skip
    """report.md: the scenarios' grids, the rules ranked by worst-case regret, what each
    scenario left out would have chosen, and the default's confirmation runs."""
    default, limit = lrbench_score.PIPELINE_DEFAULT, lrbench_score.SPREAD_LIMIT
    worst = lrbench_score.worst_case(scores)
    lines = [
        "# LR choice: which rule lands on the best max LR?",
        "",
        "Regret = the best grid point's mean validation accuracy minus the accuracy at the "
        "rule's pick (interpolated on log LR), in points, averaged over the stored sweeps; "
        "spread = largest pick / smallest. Chosen on validation accuracy; test accuracy is "
        f"reported in scores.json. Scored offline on {machine}; the CPUs that ran the grids, "
        "sweeps and confirmation runs are named in docs/method.md.",
        "",
        "Each rule is read four ways: on one sweep of the pipeline's length, on the longest "
        "stored sweep (`long sweep`), and as the median of three sweeps (`median of 3`, the "
        "pipeline's `lr_find.seeds: 3`). Rules are ranked by their worst-case regret, first "
        f"among those whose picks spread at most {limit}x in every scenario (marked "
        "stable); the pipeline's default (params.yaml's lr_find) is in bold.",
        "",
        *_grid_table(found),
        "",
        *_rule_table(scores, list(found), top),
        "",
        *(
            [f"The pipeline's default (bold): {default}, worst case {worst[default]:.2f} points."]
            if default in scores
            else []
        ),  # fmt: skip
        f"Lowest worst-case regret among the stable rules: {best} ({worst[best]:.2f} points).",
        "",
        "Left out one scenario at a time, the others choose:",
        "",
    ]
    for sc, rule_ in held_out.items():
        v = scores[rule_][sc]
        lines.append(
            f"- without {sc}: {rule_}; on {sc} itself it scores {v['regret_mean']:.2f} points "
            f"(tolerance {lrbench_score.tolerance(found[sc][0]):.2f})"
        )
    if confirm:
        lines += ["", *_confirm_table(confirm, CONFIRM_TITLE)]
    if refined:
        lines += ["", *_confirm_table(refined, REFINE_TITLE)]
    return "\n".join(lines) + "\n"


CONFIRM_TITLE = (
    "Confirmed by training (`python -m onecycle.commands.lrbench confirm`): the pipeline's "
    "own default (`train.max_lr: auto`) on the scenario's longest sweep, 3 seeds or more (a "
    "pick per seed):"
)
REFINE_TITLE = (
    "The same pick checked by `lr_find.refine: 4` (`lrbench confirm --refine 4`): short 1cycle "
    "probes at 2x, 1x, 1/2x and 1/4x the curve's pick on the validation split, the better half "
    "probed twice as long (range_test/refine.py), then trained, 3 seeds. The first probes train "
    "1/16 of the scenario's epochs (`lr_find.refine_epochs`), so the probes cost half of "
    "training's steps; `other s` is the wall time besides training (stage start-ups, the "
    "sweeps, the probes, evaluation):"
)


def _grid_table(found: dict) -> list[str]:
    lines = [
        "| scenario | grid runs (seeds) | best max LR | best val. accuracy | tolerance |",
        "| --- | --- | --- | --- | --- |",
    ]
    for sc, (curve, _, _) in found.items():
        b = curve.best
        lines.append(
            f"| {sc} | {_runs(curve)} | {curve.lrs[b]:g} | "
            f"{100 * curve.val_mean[b]:.2f} ± {100 * curve.val_std[b]:.2f} % | "
            f"{lrbench_score.tolerance(curve):.2f} |"
        )
    return lines


def _runs(curve: lrbench_score.Curve) -> str:
    """ "9 LRs x 2", and where some LRs have more seeds: "9 LRs x 2; x 4 at 0.0707, 0.1"."""
    more = {}
    for lr, n in zip(curve.lrs, curve.runs, strict=True):
        if n > curve.seeds:
            more.setdefault(int(n), []).append(f"{lr:g}")
    return f"{len(curve.lrs)} LRs x {curve.seeds}" + "".join(
        f"; x {n} at {', '.join(lrs)}" for n, lrs in more.items()
    )


def _rule_table(scores: dict, names: list[str], top: int) -> list[str]:
    """The default, the ``top`` stable rules and the ``top // 2`` best of all, and SHOWN: per
    scenario the mean regret and the picks' spread."""
    default = lrbench_score.PIPELINE_DEFAULT
    worst = lrbench_score.worst_case(scores)
    ranked = sorted(worst, key=lambda r: (worst[r], r))
    steady = [r for r in ranked if r in lrbench_score.stable(scores)]
    ours = [default] if default in scores else []
    shown = list(dict.fromkeys(ours + steady[:top] + ranked[: top // 2] + list(SHOWN.values())))
    lines = [
        "| rule | stable | worst | " + " | ".join(f"{sc}: regret, spread" for sc in names) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for r in shown:
        cells = []
        for sc in names:
            v = scores[r][sc]
            spread = f"{v['spread']:.1f}x" if "spread" in v else "n/a"
            cells.append(f"{v['regret_mean']:.2f}, {spread}")
        mark = "**" if r == default else ""
        ok = "yes" if r in steady and len(steady) < len(scores) else ""
        lines.append(f"| {mark}{r}{mark} | {ok} | {worst[r]:.2f} | " + " | ".join(cells) + " |")
    return lines


def _confirm_table(confirm: dict, title: str) -> list[str]:
    lines = [
        title,
        "",
        "| scenario | picks | val. accuracy | grid interpolated at the picks | regret | "
        "paired regret (seeds) | test accuracy | test regret | training s, other s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for sc, c in confirm.items():
        paired = (
            f"{c['paired_regret']:.2f} ({c['paired_seeds']})" if "paired_regret" in c else "n/a"
        )
        lines.append(
            f"| {sc} | {', '.join(f'{lr:.3g}' for lr in c['picks'])} | "
            f"{c['val_mean']:.2f} ± {c['val_std']:.2f} % | {c['interpolated']:.2f} % | "
            f"{c['regret']:.2f} | {paired} | {c['test_mean']:.2f} ± {c['test_std']:.2f} % | "
            f"{_test_regret(c)} | {_seconds(c)} |"
        )
    return lines + [
        "",
        "Regret: the best grid point's validation accuracy (its seeds' mean) minus the runs' "
        "mean; paired: the same, seed by seed, on the seeds the grid ran too (each seed "
        "carves its own validation split, so a seed the grid never ran is compared on "
        "other images). Test regret: the test accuracy of the grid LR best on validation minus "
        "the runs'; the test images are the same for every seed, so the split's sampling (about "
        "1.3 points on 1,000 validation images at 78 %) is not in it. Nothing is chosen on it.",
    ]


def _test_regret(c: dict) -> str:
    return "n/a" if c.get("test_regret") is None else f"{c['test_regret']:.2f}"


def _seconds(c: dict) -> str:
    if c.get("train_seconds") is None:
        return "n/a"
    other = "n/a" if c.get("other_seconds") is None else f"{c['other_seconds']:.0f}"
    return f"{c['train_seconds']:.0f}, {other}"


def report(scenarios: list[lrbench_spec.Scenario], out: Path = lrbench_spec.OUT) -> Path:
    """reports/lr-choice/{report.md, scores.json, <scenario>.png} from what is stored."""
    from onecycle.reports import figures, study_figures

    found = collect(scenarios)
    if not found:
        raise lrbench_spec.BenchError(
            "no scenario has both its grid and its sweeps stored yet; run them first"
        )
    rules = lrbench_score.candidates()
    scores = lrbench_score.score(found, rules)
    best, held_out = lrbench_score.choose_default(scores)
    out.mkdir(parents=True, exist_ok=True)
    for sc, (curve, sweeps, n) in found.items():
        shown = {**SHOWN, "the default": lrbench_score.PIPELINE_DEFAULT}
        if best != lrbench_score.PIPELINE_DEFAULT:
            shown["lowest worst-case regret"] = best
        drawn = {
            f"{label}: {r}": lrbench_score.variant_picks(r, rules, sweeps, n)
            for label, r in shown.items()
        }
        fig = study_figures.lr_choice_figure(
            sc, curve.lrs, 100 * curve.val_mean, 100 * curve.val_std, 100 * curve.test_mean,
            drawn, f"sweeps of {n} steps (long: {max(s['num_iter'] for s in sweeps)})",
        )  # fmt: skip
        figures.save({out / f"{sc}.png": fig}, dpi=110)
    confirm = confirmations(scenarios, found)
    refined = confirmations(scenarios, found, CONFIRM[True])
    (out / "scores.json").write_text(
        json.dumps(
            {
                "default": lrbench_score.PIPELINE_DEFAULT,
                "lowest_worst_case": best,
                "held_out": held_out,
                "confirmed": confirm,
                "confirmed_refine": refined,
                "scores": scores,
            },
            indent=1,
        )
        + "\n"
    )
    text = markdown(
        scores, found, best, held_out, provenance.cpu_name(), confirm=confirm, refined=refined
    )
    (out / "report.md").write_text(text)
    return out / "report.md"


def grid_report(scenario: lrbench_spec.Scenario, s, results: list, repo: Path) -> Path:
    """The grid's report.md and figure from its stored results (whichever clone ran them)."""
    from onecycle.commands import study_report
    from onecycle.reports import figures, study_figures

    out = repo / scenario.out / "grid"
    order = s.runs()
    results = sorted(results, key=lambda r: order.index((r.label, r.seed)))
    done = {(r.label, r.seed) for r in results}
    missing = [s.exp_name(label, seed) for label, seed in order if (label, seed) not in done]
    png = out / f"{s.name}.png"
    figures.save({png: study_figures.study_lr_figure(results, s.name)}, dpi=120)
    source = study_report.source_line(s, repo) if s.source else None
    text = study_report.markdown(
        s, study_report.summarize(results), missing, png.name, provenance.machine_name(), source
    )
    (out / "report.md").write_text(text)
    return out / "report.md"
