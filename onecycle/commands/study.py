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

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from onecycle import progress
from onecycle.config import SUGGESTIONS
from onecycle.errors import UserError
from onecycle.redact import redact, redact_values
from onecycle.tracking import connect, provenance

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
LABEL = re.compile(r"^[a-z0-9]([a-z0-9_-]|\.(?!\.))*$")  # a Git ref part: no "..", e.g. lr-0.03
POLL_SECONDS = 10  # at most, between looks at the queue (a tenth of the time waited, at least 1)


class StudyError(UserError):
    """A study file or a study run is not usable; the message says which and why."""


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    common: dict[str, object]
    settings: dict[str, dict[str, object]]  # label -> overrides
    seeds: list[int]
    picks: list[str] = field(default_factory=list)  # suggestion methods run at their pick
    target: str = "evaluate"  # the stage each run goes up to
    jobs: int = 2  # experiments at a time (`dvc queue start -j`)
    figure: str = "epochs"  # epochs: test accuracy per epoch | max_lr: accuracy against max LR
    source: dict | None = None  # {"overrides": {...}, "checkpoint": path}: trained first
    setting_seeds: dict[str, list[int]] = field(default_factory=dict)  # a setting's own seeds

    @property
    def source_name(self) -> str:
        return f"{self.name}-source"

    def exp_name(self, label: str, seed: int) -> str:
        return f"{self.name}-{label}-s{seed}"

    def all_settings(self) -> dict[str, dict[str, object]]:
        """The settings, then one per pick: the pipeline's own choice with that method."""
        picks = {f"pick-{m}": {"lr_find.suggestion": m, "train.max_lr": "auto"} for m in self.picks}
        return {**self.settings, **picks}

    def runs(self) -> list[tuple[str, int]]:
        """(label, seed) of every run: each setting over its own ``seeds`` or the study's."""
        return [
            (label, seed)
            for label in self.all_settings()
            for seed in self.setting_seeds.get(label, self.seeds)
        ]


def load(path: Path) -> Study:
    """Read and check ``path``; every problem names the file and the key."""
    try:
        return load_text(Path(path).read_text(), str(path))
    except OSError as exc:
        raise StudyError(f"{path}: cannot read the study ({exc})") from None


def load_text(text: str, path: str = "<study>") -> Study:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({exc})") from None
    allowed = {
        "name",
        "description",
        "common",
        "settings",
        "seeds",
        "picks",
        "target",
        "jobs",
        "figure",
        "source",
    }
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {unknown}; a study has {sorted(allowed)}")
    name = str(raw.get("name", ""))
    if not NAME.match(name):
        raise StudyError(f"{path}: name {name!r} must be lower-case letters, digits, - or _")
    settings = raw.get("settings") or {}
    seeds = raw.get("seeds") or []
    if (
        not isinstance(settings, dict)
        or not settings
        or not all(LABEL.match(str(k)) for k in settings)
    ):
        raise StudyError(f"{path}: settings must map labels (a-z, 0-9, -, _, .) to overrides")
    if not _seed_list(seeds):
        raise StudyError(f"{path}: seeds must be a list of integers >= 0, e.g. [0, 1, 2]")
    settings = {str(k): dict(v or {}) for k, v in settings.items()}
    setting_seeds = {k: v.pop("seeds") for k, v in settings.items() if "seeds" in v}
    bad_seeds = [k for k, v in setting_seeds.items() if not _seed_list(v)]
    if bad_seeds:
        raise StudyError(f"{path}: settings {bad_seeds}: seeds must be a list of integers >= 0")
    picks = list(raw.get("picks") or [])
    taken = [k for k in settings if str(k).startswith("pick-")]
    if picks and taken:
        raise StudyError(f"{path}: settings {taken}: labels pick-* are the picks' own")
    bad = [p for p in picks if p not in SUGGESTIONS]
    if bad:
        raise StudyError(
            f"{path}: picks {bad} are not suggestion methods ({', '.join(SUGGESTIONS)})"
        )
    source = raw.get("source")
    if source is not None and (
        not isinstance(source, dict)
        or set(source) != {"overrides", "checkpoint"}
        or not isinstance(source["overrides"], dict)
    ):
        raise StudyError(
            f"{path}: source must map overrides (the source run's params) and checkpoint "
            "(where its models/model.pt goes)"
        )
    return Study(
        name,
        str(raw.get("description", "")),
        dict(raw.get("common") or {}),
        settings,
        list(seeds),
        picks,
        str(raw.get("target", "evaluate")),
        int(raw.get("jobs", 2)),
        _figure(path, raw.get("figure", "epochs")),
        source,
        setting_seeds,
    )


def _seed_list(seeds) -> bool:
    return (
        isinstance(seeds, list)
        and bool(seeds)
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    )


def with_common(study: Study, pairs: list[str]) -> Study:
    """``study`` with ``KEY=VALUE`` overrides (YAML values) added to its common ones: a local
    data copy, say, on a machine with no network. A changed override makes new runs."""
    import dataclasses

    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise StudyError(
                f"--set {pair!r}: give KEY=VALUE, e.g. --set data.source=/data/x.tar.gz"
            )
        extra[key.strip()] = yaml.safe_load(value)
    return dataclasses.replace(study, common={**study.common, **extra}) if extra else study


def _figure(path: str, kind) -> str:
    if kind not in ("epochs", "max_lr"):
        raise StudyError(f"{path}: figure {kind!r} must be epochs or max_lr")
    return kind


# ---------------------------------------------------------------- running through DVC


def _dvc(*args: str, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise StudyError(
            f"dvc {' '.join(args)} failed:\n{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc.stdout


def _set_args(overrides: dict[str, object]) -> list[str]:
    args = []
    for key, value in overrides.items():
        text = json.dumps(value) if isinstance(value, list | bool) or value is None else str(value)
        args += ["-S", f"{key}={text}"]
    return args


WORKERS = re.compile(r"^Worker status: (\d+) active, (\d+) idle")
DEAD_LOOKS = 3  # looks in a row with tasks waiting and no worker: the workers are gone


def queue_status(repo: Path) -> tuple[dict[str, str], int | None]:
    """(experiment name -> its queue status (Queued, Running, Success, Failed, ...), the number
    of live queue workers, None where ``dvc queue status`` does not say)."""
    states, workers = {}, None
    for line in _dvc("queue", "status", cwd=repo).splitlines()[1:]:
        if m := WORKERS.match(line.strip()):
            workers = int(m[1]) + int(m[2])
            continue
        parts = line.split()
        if len(parts) >= 3 and parts[0] != "Worker":
            name, state = parts[1], parts[-1]
            if _rank(state) < _rank(states.get(name)):
                states[name] = state
    return states, workers


def _rank(state: str | None) -> int:
    """A name queued again lists its older, Failed task too: the live or newer one counts."""
    order = ("Running", "Queued", "Success")
    return order.index(state) if state in order else len(order) + (state is None)


def queue_states(repo: Path) -> dict[str, str]:
    """Experiment name -> its queue status (Queued, Running, Success, Failed, ...)."""
    return queue_status(repo)[0]


def requeue_orphans(names: list[str], repo: Path) -> list[str]:
    """Those of ``names`` that DVC shows Running with no queue worker alive (the workers were
    killed: SIGKILL, a closed terminal, a reboot), marked Failed with ``dvc queue kill`` so that
    they are queued again; returns them. Without this a restarted study waited for them forever."""
    states, workers = queue_status(repo)
    orphans = [n for n in names if states.get(n) == "Running"]
    if not orphans or workers != 0:
        return []
    _dvc("queue", "kill", *orphans, cwd=repo)
    progress.say(
        f"study: {', '.join(orphans)} were left Running by queue workers that are gone; "
        "stopped (`dvc queue kill`) and queued again"
    )
    return orphans


def _exp_refs(repo: Path) -> str:
    """Where DVC keeps the current commit's experiments: ``refs/exps/<baseline[:2]>/<baseline[2:]>``."""
    base = baseline_rev(repo)
    return f"refs/exps/{base[:2]}/{base[2:]}"


def finished(repo: Path) -> set[str]:
    """Names of the experiments that finished on the current commit: the refs DVC writes for
    them (``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>``, what ``dvc exp ls`` lists), read
    by one ``git`` process in milliseconds where a ``dvc`` process costs a second of CPU."""
    out = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname:lstrip=4)", f"{_exp_refs(repo)}/"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise StudyError(f"git for-each-ref refs/exps failed in {repo}: {out.stderr.strip()}")
    return set(out.stdout.split())


def enqueue(study: Study, runs: list[tuple[str, int, dict]], repo: Path) -> list[str]:
    """Queue the runs not finished nor queued yet; returns the names now waiting."""
    requeue_orphans([study.exp_name(label, seed) for label, seed, _ in runs], repo)
    done, states = finished(repo), queue_states(repo)
    waiting = []
    for label, seed, overrides in runs:
        name = study.exp_name(label, seed)
        if name in done:
            continue
        if states.get(name) not in ("Queued", "Running"):
            sets = _set_args({**study.common, **overrides, "base.seed": seed})
            _dvc("exp", "run", "--queue", "-n", name, *sets, study.target, cwd=repo)
        waiting.append(name)
    return waiting


def threads_env(jobs: int) -> dict[str, str]:
    """The environment for ``jobs`` experiments at once: the cores shared out among them. Each
    torch process otherwise takes every core, and two of them on 2 cores ran at a quarter speed
    each, not half (measured: 2 x 320 img/s against 2 x 610 with one thread each)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def start_queue(repo: Path, jobs: int) -> None:
    """``dvc queue start``, returning at once. Its workers outlive it and inherit its output
    files: captured through pipes, the call would wait for the whole queue (and the progress
    bar below would jump from 0 to done at the end)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(
            ["dvc", "queue", "start", "-j", str(jobs)],
            cwd=repo,
            env=threads_env(jobs),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        if proc.returncode != 0:
            err.seek(0)
            raise StudyError(f"dvc queue start -j {jobs} failed:\n{err.read().strip()[-2000:]}")


def wait(names: list[str], repo: Path, jobs: int) -> list[str]:
    """Run the queue until ``names`` are done; returns those that failed.

    Git's refs say cheaply which finished (every half second); DVC's queue, which alone says
    which failed, is asked only while some have not finished: soon on a short study, every
    ``POLL_SECONDS`` on a long one (each ``dvc queue status`` is a second of CPU, and on the
    suite's tiny study 30 of them took as much CPU as its training)."""
    if not names:
        return []
    start_queue(repo, jobs)
    started = time.monotonic()
    next_look, dead_looks = started + 2.0, 0
    with progress.bar(len(names), "study runs", unit="run") as bar:
        while True:
            ok = finished(repo) & set(names)
            done, failed, looked = ok, [], False
            if len(ok) < len(names) and time.monotonic() >= next_look:
                looked = True
                states, workers = queue_status(repo)
                stuck = [n for n in names if n not in ok and states.get(n) in ("Queued", "Running")]
                dead_looks = dead_looks + 1 if stuck and workers == 0 else 0
                if dead_looks >= DEAD_LOOKS:
                    raise StudyError(
                        f"the queue has no worker left (`dvc queue status`: 0 active, 0 idle) "
                        f"while {', '.join(stuck)} wait: its workers were stopped. Start the "
                        "study again: it stops those runs (`dvc queue kill`) and queues them anew"
                    )
                done = ok | {n for n in names if states.get(n) not in ("Queued", "Running")}
                failed = [n for n in names if n not in ok and states.get(n) == "Failed"]
                waited = time.monotonic() - started
                next_look = time.monotonic() + min(POLL_SECONDS, max(2.0, waited / 10))
            if looked or len(done) != bar.n:  # the bar's elapsed time as often as DVC is asked
                bar.n = len(done)
                bar.refresh()
            if len(done) == len(names):
                return failed
            time.sleep(0.5)


def exp_commit(name: str, repo: Path) -> str:
    """The commit of experiment ``name`` on the current commit (its ref
    ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>``)."""
    ref = f"{_exp_refs(repo)}/{name}"
    out = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", ref], cwd=repo, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise StudyError(f"experiment {name} has no commit on {baseline_rev(repo)[:7]} ({ref})")
    return out.stdout.strip()


def train_source(study: Study, repo: Path) -> Path:
    """The source run (once per commit), its models/model.pt fetched from the DVC cache to
    ``source.checkpoint`` (``dvc get --rev <its commit>``); returns that path."""
    name = study.source_name
    if name not in finished(repo):
        requeue_orphans([name], repo)
        if queue_states(repo).get(name) not in ("Queued", "Running"):
            sets = _set_args(study.source["overrides"])
            _dvc("exp", "run", "--queue", "-n", name, *sets, study.target, cwd=repo)
        if wait([name], repo, 1):  # alone: every core to it
            raise StudyError(
                f"study {study.name}: the source run failed; see `dvc queue logs {name}`"
            )
    out = repo / study.source["checkpoint"]
    out.parent.mkdir(parents=True, exist_ok=True)
    rev = exp_commit(name, repo)
    _dvc("get", ".", "models/model.pt", "--rev", rev, "-o", str(out.resolve()), "--force", cwd=repo)
    return out


def check_overrides(study: Study, repo: Path) -> None:
    """Every run's overrides (the source's, then each setting's with the common ones and its
    seed) applied to the repository's params.yaml and checked as check_params would, before
    anything is queued: a typo in the last setting used to leave the earlier ones queued, with
    DVC's advice to add the misspelt key (``+trian.max_lr``)."""
    from onecycle.config import ConfigError, parse_params, read_yaml, with_overrides

    base = read_yaml(repo / "params.yaml") or {}
    runs = [("source", study.source["overrides"])] if study.source else []
    runs += [
        (f"setting {label}", {**study.common, **settings, "base.seed": 0})
        for label, settings in study.all_settings().items()
    ]
    for what, overrides in runs:
        try:
            parse_params(with_overrides(base, overrides), f"study {study.name}, {what}")
        except ConfigError as exc:
            raise StudyError(f"{exc}\n(nothing was queued)") from None


def run(study: Study, repo: Path = Path(".")) -> list[str]:
    """Queue and run what is missing (the source first, when there is one); returns the names
    that failed. Every run's overrides are checked first, so a bad one queues nothing."""
    check_overrides(study, repo)
    if study.source:
        path = train_source(study, repo)
        progress.say(f"study {study.name}: source model {study.source_name} -> {path}")
    settings = study.all_settings()
    grid = [(label, seed, settings[label]) for label, seed in study.runs()]
    return wait(enqueue(study, grid, repo), repo, study.jobs)


# ---------------------------------------------------------------- the report, from MLflow


@dataclass
class Result:
    label: str
    seed: int
    run_id: str
    accuracy: float  # eval/accuracy: the full test split, as evaluate measured it
    max_lr: float
    seconds: float  # training time (the epochs' sum)
    test_acc: list[float]  # per test-set look (monitoring): every train.eval_every epochs
    test_epochs: list[int] = field(default_factory=list)  # the epoch of each look (1-based)
    val_accuracy: float | None = None  # the validation split's, at the end (data.val_images)
    images_per_sec: float | None = None  # training throughput, the epochs' mean
    wall_seconds: float | None = None  # lr_find's start (or train's) to evaluate's last log
    epochs: int | None = None


def baseline_rev(repo: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return out.stdout.strip()


def latest_train_runs(repo: Path, names: set[str]):
    """(client, {experiment name: its latest finished, evaluated train run}) for ``names``, on
    the current commit, from the MLflow store."""
    import mlflow

    exp_id = connect.setup(repo.resolve())
    client = mlflow.MlflowClient()
    query = (
        f"tags.`dvc.stage` = 'train' and attributes.status = 'FINISHED' and "
        f"tags.`dvc.exp_baseline_rev` = '{baseline_rev(repo)}'"
    )
    latest = {}
    for r in client.search_runs(
        [exp_id], query, order_by=["attributes.start_time DESC"], max_results=5000
    ):
        name = r.data.tags.get("dvc.exp_name")
        if name in names and name not in latest and "eval/accuracy" in r.data.metrics:
            latest[name] = r
    return client, latest


def collect(study: Study, repo: Path = Path(".")) -> tuple[list[Result], list[str]]:
    """The study's train runs on the current commit from the MLflow store (the latest finished
    run of each experiment name), and the names that have none yet."""
    wanted = {study.exp_name(label, seed): (label, seed) for label, seed in study.runs()}
    client, latest = latest_train_runs(repo, set(wanted))
    results = []
    for name, r in latest.items():
        label, seed = wanted[name]
        history = client.get_metric_history(r.info.run_id, "test/accuracy")
        seconds = client.get_metric_history(r.info.run_id, "speed/epoch_seconds")
        speed = client.get_metric_history(r.info.run_id, "speed/images_per_sec")
        results.append(
            Result(
                label,
                seed,
                r.info.run_id,
                r.data.metrics["eval/accuracy"],
                float(r.data.params["max_lr_used"]),
                sum(m.value for m in seconds),
                [m.value for m in sorted(history, key=lambda m: m.step)],
                sorted(m.step for m in history),
                r.data.metrics.get("val/accuracy"),
                sum(m.value for m in speed) / len(speed) if speed else None,
                _wall_seconds(client, r),
                len(seconds),
            )
        )
    order = list(wanted)  # the study's order: settings, then picks; seeds within
    results.sort(key=lambda r: order.index(study.exp_name(r.label, r.seed)))
    return results, [n for n in order if n not in latest]


def _wall_seconds(client, train_run) -> float | None:
    """The experiment's time from its range test's start (its train run's, when lr_find came
    from DVC's run cache) to evaluate's last metric in the train run: MLflow's timestamps."""
    start = train_run.info.start_time
    lr_run = train_run.data.tags.get("lr_find_run_id")
    if lr_run and lr_run != "none":
        try:
            start = min(start, client.get_run(lr_run).info.start_time)
        except Exception:  # noqa: BLE001 - a run deleted from the store: train's start then
            pass
    ends = [m.timestamp for m in client.get_metric_history(train_run.info.run_id, "eval/accuracy")]
    end = max([train_run.info.end_time or 0, *ends])
    return (end - start) / 1000 if end > start else None


def summarize(results: list[Result]) -> list[dict]:
    """Per setting, in first-seen order: runs, mean and sample std of the test accuracy, mean
    max LR and training seconds."""
    import numpy as np

    rows = []
    for label in dict.fromkeys(r.label for r in results):
        mine = [r for r in results if r.label == label]
        acc = np.array([r.accuracy for r in mine])
        val = np.array([r.val_accuracy for r in mine if r.val_accuracy is not None])
        rows.append(
            {
                "setting": label,
                "runs": len(mine),
                "accuracy_mean": float(acc.mean()),
                "accuracy_std": float(acc.std(ddof=1)) if len(mine) > 1 else float("nan"),
                "val_accuracy_mean": float(val.mean()) if len(val) else None,
                "val_accuracy_std": float(val.std(ddof=1)) if len(val) > 1 else float("nan"),
                "max_lr_mean": float(np.mean([r.max_lr for r in mine])),
                "max_lr_min": min(r.max_lr for r in mine),
                "max_lr_max": max(r.max_lr for r in mine),
                "seconds_mean": float(np.mean([r.seconds for r in mine])),
                "epoch_seconds": _mean([r.seconds / r.epochs for r in mine if r.epochs]),
                "images_per_sec": _mean([r.images_per_sec for r in mine]),
                "wall_seconds": _mean([r.wall_seconds for r in mine]),
            }
        )
    return rows


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown(
    study: Study,
    rows: list[dict],
    missing: list[str],
    figure: str,
    machine: str,
    source: str | None = None,
) -> str:
    """The report; ``source``: a line on the study's source run, above the table."""
    lines = [
        f"# Study: {study.name}",
        "",
        study.description.strip(),
        "",
        f"Every run: {', '.join(f'`{k}={v}`' for k, v in study.common.items()) or 'the defaults'}; "
        f"seeds {study.seeds}. Measured on {machine}.",
        "",
        *([source, ""] if source else []),
    ]
    val = any(r.get("val_accuracy_mean") is not None for r in rows)
    lines += [
        "| setting | runs | "
        + ("validation accuracy (mean ± std) | " if val else "")
        + "test accuracy (mean ± std) | max LR (mean; min..max) | training s (mean) | s/epoch | "
        "img/s | wall s: training + other |",
        "| --- | --- | " + ("--- | " if val else "") + "--- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        val_cell = f"{_pct(r['val_accuracy_mean'], r['val_accuracy_std'])} | " if val else ""
        lrs = f"{r['max_lr_mean']:.3g}"
        if r.get("max_lr_min", r["max_lr_mean"]) != r.get("max_lr_max", r["max_lr_mean"]):
            lrs += f"; {r['max_lr_min']:.3g}..{r['max_lr_max']:.3g}"
        wall = r.get("wall_seconds")
        split = "n/a" if wall is None else (
            f"{wall:.0f}: {r['seconds_mean']:.0f} + {wall - r['seconds_mean']:.0f}"
        )  # fmt: skip
        lines.append(
            f"| {r['setting']} | {r['runs']} | {val_cell}"
            f"{_pct(r['accuracy_mean'], r['accuracy_std'])} | "
            f"{lrs} | {r['seconds_mean']:.0f} | {_num(r.get('epoch_seconds'), '.2f')} | "
            f"{_num(r.get('images_per_sec'), '.0f')} | {split} |"
        )
    lines += [
        "",
        "Wall s: from the run's range test (or its training, when DVC's run cache supplied the "
        "range test) to evaluate's last metric, by MLflow's timestamps; other = wall - training "
        "(stage start-ups, the sweep, compile, evaluation).",
    ]
    if missing:
        lines += ["", f"Not finished (left out): {', '.join(missing)}."]
    lines += ["", f"![{study.name}]({figure})", ""]
    return "\n".join(lines)


def _pct(mean: float | None, std: float) -> str:
    """``82.00 ± 2.00 %``; n/a for a missing mean or the std of one run."""
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f} ± {'n/a' if std != std else f'{100 * std:.2f}'} %"


def report(study: Study, repo: Path = Path("."), out: Path | None = None) -> Path:
    """reports/<study>/report.md and its figure, from the store; also an MLflow parent run
    (``study <name>``) holding them, with the study's train runs as its children."""
    from onecycle.reports import figures

    results, missing = collect(study, repo)
    if not results:
        raise StudyError(f"study {study.name}: no finished run on this commit; run it first")
    out = out or repo / "reports" / study.name
    rows = summarize(results)
    fig = (figures.study_epochs_figure if study.figure == "epochs" else figures.study_lr_figure)(
        results, study.name
    )
    png = out / f"{study.name}.png"
    figures.save({png: fig}, dpi=120)
    source = source_line(study, repo) if study.source else None
    text = markdown(study, rows, missing, png.name, provenance.machine_name(), source)
    files_ = [png, out / "report.md"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(redact(text))
    (out / "results.json").write_text(
        json.dumps(redact_values([r.__dict__ for r in results]), indent=2) + "\n"
    )
    _parent_run(study, results, files_ + [out / "results.json"], baseline_rev(repo))
    return out / "report.md"


def source_line(study: Study, repo: Path) -> str:
    """The source run in one line: its settings and its own test accuracy, from the store."""
    _, found = latest_train_runs(repo, {study.source_name})
    run = found.get(study.source_name)
    sets = ", ".join(f"`{k}={v}`" for k, v in study.source["overrides"].items())
    shown = (
        f"{100 * run.data.metrics['eval/accuracy']:.2f} % on its own test split"
        if run
        else "not found in the store"
    )
    return (
        f"Source model `{study.source_name}` ({sets}): {shown}; its checkpoint "
        f"`{study.source['checkpoint']}` is what `model.pretrained` names."
    )


def _parent_run(study: Study, results: list[Result], attach: list[Path], rev: str) -> str:
    import mlflow

    client = mlflow.MlflowClient()

    exp_id = mlflow.get_experiment_by_name(connect.EXPERIMENT).experiment_id
    query = f"tags.study = '{study.name}' and tags.`dvc.exp_baseline_rev` = '{rev}'"
    found = client.search_runs([exp_id], query, max_results=1)
    if found:
        parent = found[0].info.run_id
    else:
        tags = {
            "study": study.name,
            "dvc.exp_baseline_rev": rev,
            "mlflow.runName": f"study {study.name}",
        }
        parent = client.create_run(exp_id, tags=tags).info.run_id
        client.set_terminated(parent, "FINISHED")
    for r in results:
        client.set_tag(r.run_id, "mlflow.parentRunId", parent)
    for path in attach:
        client.log_artifact(parent, str(path))
    return parent


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m onecycle.commands.study", description=__doc__.splitlines()[0]
    )
    ap.add_argument("action", choices=["run", "report"], help="run (then report) | report only")
    ap.add_argument("study", type=Path, help="the study file, e.g. studies/lr.yaml")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more common override, e.g. --set data.source=/data/cifar-10-python.tar.gz",
    )
    args = ap.parse_args(argv)
    study = with_common(load(args.study), args.set)
    failed = run(study) if args.action == "run" else []
    why = (
        f"study {study.name}: {len(failed)} run(s) failed: {', '.join(failed)}; see "
        "`dvc queue logs <name>`"
    )
    try:
        path = report(study)
    except StudyError as exc:
        raise StudyError(f"{why}\n{exc}" if failed else str(exc)) from None
    print(f"study {study.name}: {path}")
    if failed:
        raise StudyError(why)


if __name__ == "__main__":
    from onecycle.pipeline import runner

    runner.run(main, "study")
