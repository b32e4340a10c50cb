"""Studies: a set of param overrides times N seeds, run as named DVC experiments and reported from
the MLflow store.

A study is a YAML file (``studies/<name>.yaml``): ``common`` overrides for every run, ``settings``
(label -> overrides), ``seeds``, optionally a ``source`` (a run trained first, once, whose
``models/model.pt`` is copied to ``source.checkpoint`` for the settings' ``model.pretrained``:
the transfer study), and optionally ``picks``: suggestion methods each trained as a
setting of its own, ``pick-<method>``, at the max LR that method picks from the same seed's range
test (``lr_find.suggestion: <method>``, ``train.max_lr: auto``). Every run is a queued ``dvc exp
run`` named ``<study>-<label>-s<seed>``, all queued at once; a study that is started again skips the runs that
finished (on this commit) and queues the rest, so an interrupted study resumes; its report only
ever reads runs of its own names on the current commit.
"""

from __future__ import annotations

from pathlib import Path

from onecycle import progress
from onecycle.commands import study_queue, study_report, study_spec


def train_source(study: study_spec.Study, repo: Path) -> Path:
    """The source run (once per commit), its models/model.pt fetched from the DVC cache to
    ``source.checkpoint`` (``dvc get --rev <its commit>``); returns that path."""
    name = study.source_name
    if name not in study_queue.finished(repo):
        killed = study_queue.requeue_orphans([name], repo)  # may still read Running: queue anew
        if killed or study_queue.queue_states(repo).get(name) not in ("Queued", "Running"):
            sets = study_queue._set_args(study.source.overrides)
            study_queue._dvc("exp", "run", "--queue", "-n", name, *sets, study.target, cwd=repo)
        if study_queue.wait([name], repo, 1):  # alone: every core to it
            raise study_spec.StudyError(
                f"study {study.name}: the source run failed; see `dvc queue logs {name}`"
            )
    out = repo / study.source.checkpoint
    out.parent.mkdir(parents=True, exist_ok=True)
    rev = study_queue.exp_commit(name, repo)
    study_queue._dvc(
        "get", ".", "models/model.pt", "--rev", rev, "-o", str(out.resolve()), "--force", cwd=repo
    )
    return out


def check_overrides(study: study_spec.Study, repo: Path) -> None:
    """Every run's overrides (the source's, then each setting's with the common ones and its
    seed) applied to the repository's params.yaml and checked as check_params would, before
    anything is queued: a typo in the last setting used to leave the earlier ones queued, with
    DVC's advice to add the misspelt key (``+trian.max_lr``)."""
    from onecycle.config import ConfigError, parse_params
    from onecycle.params_file import read_yaml, with_overrides

    base = read_yaml(repo / "params.yaml") or {}
    runs = [("source", study.source.overrides)] if study.source else []
    runs += [
        (f"setting {label}", {**study.common, **settings, "base.seed": 0})
        for label, settings in study.all_settings().items()
    ]
    for what, overrides in runs:
        try:
            parse_params(with_overrides(base, overrides), f"study {study.name}, {what}")
        except ConfigError as exc:
            raise study_spec.StudyError(f"{exc}\n(nothing was queued)") from None


def run(study: study_spec.Study, repo: Path = Path(".")) -> list[str]:
    """Queue and run what is missing (the source first, when there is one); returns the names
    that failed. Every run's overrides are checked first, so a bad one queues nothing."""
    check_overrides(study, repo)
    if study.source:
        path = train_source(study, repo)
        progress.say(f"study {study.name}: source model {study.source_name} -> {path}")
    settings = study.all_settings()
    grid = [(label, seed, settings[label]) for label, seed in study.runs()]
    try:
        return study_queue.wait(study_queue.enqueue(study, grid, repo), repo, study.jobs)
    except study_queue.WorkersGone as gone:
        # once: a worker stopped by DVC's monitor mid-run (seen on a 2-run grid step, stop 43)
        # would otherwise end a benchmark of hours; twice in a row is the user's or the machine's
        progress.say(
            f"study {study.name}: the queue's workers stopped while its runs waited ({gone.names}); "
            "queueing them again, once"
        )
        return study_queue.wait(study_queue.enqueue(study, grid, repo), repo, study.jobs)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m onecycle.commands.study", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "action",
        choices=["run", "report"],
        help="run (then report) | report only",
    )
    ap.add_argument("study", type=Path, help="the study file, e.g. studies/lr.yaml")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more common override, e.g. --set data.source=/data/cifar-10-python.tar.gz",
    )
    args = ap.parse_args(argv)
    study = study_spec.with_common(study_spec.load(args.study), args.set)
    failed = run(study) if args.action == "run" else []
    why = (
        f"study {study.name}: {len(failed)} run(s) failed: {', '.join(failed)}; see "
        "`dvc queue logs <name>`"
    )
    try:
        path = study_report.report(study)
    except study_spec.StudyError as exc:
        raise study_spec.StudyError(f"{why}\n{exc}" if failed else str(exc)) from None
    print(f"study {study.name}: {path}")
    if failed:
        raise study_spec.StudyError(why)


if __name__ == "__main__":
    from onecycle.pipeline import runner

    runner.run(main, "study")
