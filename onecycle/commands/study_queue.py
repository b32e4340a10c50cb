"""A study's runs through DVC's queue: queued as named experiments, the queue's workers started
and watched (dead ones found and their runs queued again), finished runs read from Git's
``refs/exps``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from onecycle import progress
from onecycle.commands import study_spec

# Between looks at DVC's queue: a fifth of the time waited, at least FIRST_LOOK and at most
# POLL_SECONDS; RECHECK_SECONDS while the queue looks dead, so that DEAD_LOOKS take seconds, not
# minutes. (Each `dvc queue status` costs a second of CPU: at 2 s to 10 s apart, the suite's
# tiny study asked it 33 times, 31 s of CPU beside the study's own 128 s.)
FIRST_LOOK, POLL_SECONDS, RECHECK_SECONDS = 5.0, 30.0, 5.0


def _dvc(*args: str, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise study_spec.StudyError(
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


class WorkersGone(study_spec.StudyError):
    """The queue's workers stopped while some of the study's runs waited (killed, or a worker
    shut down by DVC's own monitor mid-run: dvc-task#77); ``names``: those runs."""

    def __init__(self, message: str, names: str):
        super().__init__(message)
        self.names = names


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
    if not orphans or workers != 0 or live_workers(repo):
        return []
    _dvc("queue", "kill", *orphans, cwd=repo)
    progress.say(
        f"study: {', '.join(orphans)} were left Running by queue workers that are gone; "
        "stopped (`dvc queue kill`) and queued again"
    )
    close_runs(orphans, repo)  # their stages' MLflow runs, left RUNNING
    return orphans


def close_runs(names: list[str], repo: Path) -> None:
    from onecycle.tracking import lifecycle

    lifecycle.close_killed_experiments(names, repo.resolve())


def live_workers(repo: Path) -> int:
    """The queue workers of ``repo`` alive as processes (``dvc exp queue-worker``, started in
    the repository). `dvc queue status` counts workers through the queue's broker, which the
    first worker clears (``--clean``) when it stops for want of tasks: another one still running
    a task then reads 0 there (seen with one run on two workers)."""
    import psutil

    root, alive = repo.resolve(), 0
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd, cwd = proc.info["cmdline"] or [], proc.info["cwd"]
        if "queue-worker" in cmd and cwd and Path(cwd).resolve() == root:
            alive += 1
    return alive


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
        raise study_spec.StudyError(
            f"git for-each-ref refs/exps failed in {repo}: {out.stderr.strip()}"
        )
    return set(out.stdout.split())


def enqueue(study: study_spec.Study, runs: list[tuple[str, int, dict]], repo: Path) -> list[str]:
    """Queue the runs not finished nor queued yet; returns the names now waiting."""
    # queued anew whatever DVC shows: right after `dvc queue kill` a task can still read Running
    killed = set(requeue_orphans([study.exp_name(label, seed) for label, seed, _ in runs], repo))
    done, states = finished(repo), queue_states(repo)
    waiting = []
    for label, seed, overrides in runs:
        name = study.exp_name(label, seed)
        if name in done:
            continue
        if name in killed or states.get(name) not in ("Queued", "Running"):
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
            raise study_spec.StudyError(
                f"dvc queue start -j {jobs} failed:\n{err.read().strip()[-2000:]}"
            )


def wait(names: list[str], repo: Path, jobs: int) -> list[str]:
    """Run the queue until ``names`` are done; returns those that failed.

    Git's refs say cheaply which finished (every half second); DVC's queue, which alone says
    which failed, is asked only while some have not finished: soon on a short study, every
    ``POLL_SECONDS`` on a long one (each ``dvc queue status`` is a second of CPU)."""
    if not names:
        return []
    jobs = min(jobs, len(names))  # a worker with nothing to run stops and clears the broker
    start_queue(repo, jobs)
    started = time.monotonic()
    next_look, dead_looks = started + FIRST_LOOK, 0
    with progress.bar(len(names), "study runs", unit="run") as bar:
        while True:
            ok = finished(repo) & set(names)
            done, failed, looked = ok, [], False
            if len(ok) < len(names) and time.monotonic() >= next_look:
                looked = True
                states, workers = queue_status(repo)
                stuck = [n for n in names if n not in ok and states.get(n) in ("Queued", "Running")]
                gone = stuck and workers == 0 and not live_workers(repo)
                dead_looks = dead_looks + 1 if gone else 0
                if dead_looks >= DEAD_LOOKS:
                    raise WorkersGone(
                        f"the queue has no worker left (`dvc queue status`: 0 active, 0 idle) "
                        f"while {', '.join(stuck)} wait: its workers were stopped. Start the "
                        "study again: it stops those runs (`dvc queue kill`) and queues them anew",
                        ", ".join(stuck),
                    )
                done = ok | {n for n in names if states.get(n) not in ("Queued", "Running")}
                failed = [n for n in names if n not in ok and states.get(n) == "Failed"]
                waited = time.monotonic() - started
                pause = RECHECK_SECONDS if gone else max(FIRST_LOOK, waited / 5)
                next_look = time.monotonic() + min(POLL_SECONDS, pause)
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
        raise study_spec.StudyError(
            f"experiment {name} has no commit on {baseline_rev(repo)[:7]} ({ref})"
        )
    return out.stdout.strip()


def baseline_rev(repo: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return out.stdout.strip()
