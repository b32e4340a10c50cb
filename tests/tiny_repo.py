"""The one tiny pipeline run the test suite shares, and the copies (forks) of it that tests change.

``python -m tests.tiny_repo DEST`` builds it: the working tree as git sees it, copied and committed
in a new repository, params.yaml shrunk to :data:`TINY_PIPELINE`, ``dvc repro``, and the result
committed. conftest.py starts that in the background as soon as the collected tests need it, so
the in-process tests run meanwhile; :func:`fork` copies the finished repository (git, the DVC
cache, the MLflow store and every output) for a test that must change something.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

from onecycle import paths

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = Path(
    os.environ.get("ONECYCLE_TEST_DATA", ROOT / ".." / "shared" / "datasets" / "cifar10-jpg.tar.gz")
).resolve()

TINY_PIPELINE = {
    "base": {"device": "cpu"},
    "data": {"source": str(SHARED_CIFAR), "train_subset": 1000, "test_subset": 500},
    "model": {"width": 4},
    # One sweep (3: test_lr_finder.py), read the old way (a tenth of a trailing EMA's minimum:
    # 0.31 here). 48 training steps on 1,000 images at width 4 are a mechanics check: at 1.5 (the
    # default rule's pick) and at 0.15, tests/test_ddp.py's one process and two differed by
    # 8 points by chance; at 0.31 they agreed within its 5 in every CI run so far. The default
    # rule was chosen at real training lengths (make bench-lr).
    "lr_find": {
        "num_iter": 40,
        "start_lr": 1e-3,
        "seeds": 1,
        "suggestion": "min_div10",
        "smooth": "ema",
    },
    "train": {"epochs": 3, "batch_size": 64},  # 3: room for two interrupts
    "plots": {"gallery_size": 4, "dpi": 50},
}
GIT_ID = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}
DONE, FAILED, LOG = ".tiny-done", ".tiny-failed", ".tiny-build.log"  # beside the repository


def wait_until_healthy(
    url: str, proc: subprocess.Popen, seconds: float, why: Callable[[], str] = lambda: ""
) -> None:
    """Until the MLflow server at ``url`` answers /health; an AssertionError (with ``why()``,
    e.g. its log's tail) if it exits first or takes more than ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server at {url} did not start{why()}") from None
            time.sleep(0.3)


def env(repo: Path, **extra: str) -> dict:
    """A stage's environment in ``repo``: its code (not the editable install's), the test run's
    Python, no MLflow or DVC variables of the caller's, one thread per process."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out['PATH']}"
    out["PYTHONPATH"] = str(repo)
    # The tiny runs last seconds: sample the system metrics every second, or they show none.
    out["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    # Tiny models gain nothing from a second thread, and tests may run two at a time (xdist).
    out.setdefault("OMP_NUM_THREADS", "1")
    return out | GIT_ID | extra


def run(repo: Path, *args: str, ok: bool = True, env_: dict | None = None, timeout: float = 900):
    """``args`` in ``repo``; with ``ok`` a failure raises with the end of its output."""
    proc = subprocess.run(
        list(args), cwd=repo, env=env_ or env(repo), capture_output=True, text=True, timeout=timeout
    )
    if ok and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def set_params(repo: Path, overrides: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# What a pipeline run in the checkout leaves behind (`make quick`, CI's runs): never copied, so
# the suite builds its own run whatever was run here before.
RUN_LEFTOVERS = ("dvc.lock", "metrics/", "plots/", "runs/", "models/", "data/")


def committed_params() -> str:
    """params.yaml as committed: `dvc exp run -S ...` leaves its overrides in the working copy."""
    return run(ROOT, "git", "show", "HEAD:params.yaml", env_=dict(os.environ)).stdout


def copy_worktree(dest: Path) -> Path:
    """The working tree as git sees it (tracked + untracked-not-ignored, but no leftovers of a
    pipeline run and the committed params.yaml), committed in a new repo."""

    def listed(*flags: str) -> list[str]:
        out = subprocess.run(
            ["git", "ls-files", *flags, "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        return list(filter(None, out.split("\0")))

    untracked = [r for r in listed("-o", "--exclude-standard") if not r.startswith(RUN_LEFTOVERS)]
    for rel in listed("-c") + untracked:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "params.yaml").write_text(committed_params())
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(dest, *cmd)
    return dest


def build(dest: Path) -> Path:
    """The tiny pipeline, run once and committed (dvc.lock with it)."""
    dest.mkdir(parents=True, exist_ok=True)
    copy_worktree(dest)
    set_params(dest, TINY_PIPELINE)
    run(dest, "git", "commit", "-qam", "tiny")
    t0 = time.perf_counter()
    out = run(dest, "dvc", "repro").stdout
    print(out, f"\ntiny dvc repro: {time.perf_counter() - t0:.0f} s", flush=True)
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-qm", "the tiny pipeline's results")
    return dest


def start_build(dest: Path) -> None:
    """``build(dest)`` in a process of its own, once (several xdist workers may ask)."""
    import fcntl

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".tiny-start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest.parent / LOG).exists():
            return
        with open(dest.parent / LOG, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.tiny_repo", str(dest)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (dest.parent / ".tiny-pid").write_text(str(proc.pid))


def stop_build(dest: Path) -> None:
    """Stop a build still running (the session ended before it was needed)."""
    import signal

    pid_file = dest.parent / ".tiny-pid"
    if pid_file.exists() and not (dest.parent / DONE).exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def wait_for_build(dest: Path, seconds: float = 900) -> Path:
    """The built repository, once its build finished; its log if it failed."""
    start_build(dest)  # a test asked for it before collection said so (e.g. `pytest -k`)
    deadline = time.monotonic() + seconds
    while not (dest.parent / DONE).exists():
        if (dest.parent / FAILED).exists() or time.monotonic() > deadline:
            log = (dest.parent / LOG).read_text()[-5000:]
            raise AssertionError(f"the tiny pipeline did not build:\n{log}")
        time.sleep(0.2)
    return dest


def fork(src: Path, dest: Path) -> Path:
    """A copy of the finished repository ``src`` that a test may change: git, the DVC cache, the
    MLflow store (its absolute artifact paths moved to the copy) and every output. DVC's
    temporary folder (locks, queue) stays behind."""
    shutil.copytree(src, dest, symlinks=True, ignore=_skip_dvc_tmp(src))
    _relocate_store(dest / paths.MLFLOW_DB, str(src), str(dest))
    return dest


def _skip_dvc_tmp(src: Path):
    tmp = (src / ".dvc" / "tmp").resolve()
    return lambda folder, names: ["tmp"] if Path(folder).resolve() == tmp.parent else []


def _relocate_store(db: Path, old: str, new: str) -> None:
    """Every text in the SQLite store naming ``old`` (artifact locations, model sources) names
    ``new`` instead, so the copy's runs write their artifacts into the copy."""
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")'):
                if kind.upper().startswith(("TEXT", "VARCHAR")):
                    con.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                        f'WHERE instr("{column}", ?) > 0',
                        (old, new, old),
                    )


def runs(repo: Path):
    """(client, every run) of the repository's local MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / paths.MLFLOW_DB}")
    exps = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in exps])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    target = Path(sys.argv[1])
    try:
        build(target)
    except BaseException:
        (target.parent / FAILED).touch()
        raise
    (target.parent / DONE).touch()
