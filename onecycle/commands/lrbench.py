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
import tempfile
from pathlib import Path

from onecycle import progress
from onecycle.commands import lrbench_report, lrbench_spec

# ---------------------------------------------------------------- the sweeps (in-process)


def params_for(scenario: lrbench_spec.Scenario, repo: Path, **overrides):
    """params.yaml of ``repo`` with the scenario's overrides and ``overrides`` (dotted keys)."""
    from onecycle.config import parse_params
    from onecycle.params_file import read_yaml, with_overrides

    raw = with_overrides(read_yaml(repo / "params.yaml"), {**scenario.common, **overrides})
    return parse_params(raw, f"{scenario.path} over params.yaml")


def prepare(params, repo: Path):
    """The download stage's data/prepared, in memory (a temporary folder)."""
    from onecycle import paths
    from onecycle.data import prepared, sources, splits

    ds, source = sources.fetch(params.data, repo, repo / paths.RAW_DIR, params.split_seed)
    ds, val = splits.carve_validation(ds, params.data.val_images, params.split_seed)
    with tempfile.TemporaryDirectory() as tmp:
        return prepared.save_prepared(ds, Path(tmp) / "prepared", source, val)


def run_sweeps(scenario: lrbench_spec.Scenario, repo: Path = Path(".")) -> list[dict]:
    """``sweeps.seeds`` range tests per length, each stored as it ends (resumable). They run to
    a wide divergence factor (10): a rule's own stop is applied when it is scored. Stored as
    they ran, every raw loss up to the stop, not as the pipeline reads them: mobilenet's first
    sweeps, stored as read, had been cut 40 steps short by a smoothing bug (docs/method.md)."""
    from onecycle.range_test import lr_finder
    from onecycle.training import init_weights
    from onecycle.training.runtime import select_device

    path = lrbench_spec.sweeps_path(scenario)
    done = json.loads(path.read_text()) if path.exists() else []
    have = {(s["seed"], s["num_iter"]) for s in done}
    todo = [
        (seed, n) for seed in range(scenario.sweeps.seeds) for n in scenario.sweeps.lengths
        if (seed, n) not in have
    ]  # fmt: skip
    data_seed, data, weights = None, None, None
    for seed, n in todo:
        params = params_for(
            scenario,
            repo,
            **{
                "base.seed": seed,
                "lr_find.num_iter": n,
                "lr_find.val_images": scenario.sweeps.val_images,
                "lr_find.diverge_factor": 10.0,
            },
        )
        if data_seed != seed:  # the subsets and the validation split follow the seed
            weights = init_weights.load(params.model)
            data, data_seed = weights.normalize(prepare(params, repo)), seed
        dev = select_device(params.base.device, params.base.num_workers)
        sweep = lr_finder.range_test(
            params, data, dev, seed, f"{scenario.name} sweep {seed}/{n}", weights, read=False
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


def run_confirm(scenario: lrbench_spec.Scenario, repo: Path = Path("."), refine: int = 0) -> Path:
    """The default's pick trained over 3 seeds (a study; resumes), reported into
    ``out/confirm``; with ``refine``, checked by that many probes first, into
    ``out/confirm-refine``."""
    from onecycle.commands import study, study_report

    s = scenario.confirm_study(refine)
    failed = study.run(s, repo)
    folder = lrbench_report.CONFIRM[bool(refine)]
    report = study_report.report(s, repo, out=repo / scenario.out / folder)
    if failed:
        raise lrbench_spec.BenchError(f"{scenario.name}: confirm runs failed: {', '.join(failed)}")
    return report


def run_grid(scenario: lrbench_spec.Scenario, repo: Path = Path(".")) -> Path:
    """The grid as a study (queued DVC experiments), one max LR at a time, reported into
    ``out/grid``. Resumes across clones and sessions: the runs already in the committed
    ``results.json`` are kept, not queued again, and each LR's runs are added to it as they end
    (the study's report then covers the runs of this clone's store)."""
    from onecycle.commands import study, study_report

    s = scenario.study()
    path = repo / scenario.out / "grid" / "results.json"
    stored = json.loads(path.read_text()) if path.exists() else []
    failed = []
    for label, overrides in s.settings.items():
        have = {r["seed"] for r in stored if r["label"] == label}
        seeds = [x for x in s.setting_seeds.get(label, s.seeds) if x not in have]
        if not seeds:
            continue
        plain = {k: v for k, v in overrides.items() if k != "seeds"}
        part = s.model_copy(update={"settings": {label: plain}, "seeds": seeds})
        failed += study.run(part, repo)
        found, _ = study_report.collect(part, repo)
        stored += [r.__dict__ for r in found]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=2) + "\n")
    if failed:
        raise lrbench_spec.BenchError(f"{scenario.name}: grid runs failed: {', '.join(failed)}")
    return lrbench_report.grid_report(
        scenario, s, [study_report.RunResult(**r) for r in stored], repo
    )


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
    ap.add_argument(
        "--refine",
        type=int,
        default=0,
        help="confirm: the pick checked by this many lr_find.refine probes (into confirm-refine/)",
    )
    args = ap.parse_args(argv)
    if args.action == "report":
        print(f"bench-lr: {lrbench_report.report([lrbench_spec.load(p) for p in args.scenarios])}")
        return
    for path in args.scenarios:
        scenario = lrbench_spec.load(path)
        if scenario.source and args.action != "confirm":  # settings and sweeps start from it
            from onecycle.commands import study

            study.train_source(scenario.study(), Path("."))
        if args.action in ("sweeps", "run"):
            found = run_sweeps(scenario)
            progress.say(
                f"{scenario.name}: {len(found)} sweeps in {lrbench_spec.sweeps_path(scenario)}"
            )
        if args.action in ("grid", "run"):
            progress.say(f"{scenario.name}: {run_grid(scenario)}")
        if args.action == "confirm":
            progress.say(f"{scenario.name}: {run_confirm(scenario, refine=args.refine)}")


if __name__ == "__main__":
    from onecycle.pipeline import runner

    runner.run(main, "bench-lr")
