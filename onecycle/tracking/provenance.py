"""What a run records about where it ran: the git commit, DVC's experiment tags, the run name,
the datasets, and the machine, CPU and GPU."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from onecycle.redact import redact


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def here() -> dict[str, str]:
    """Who runs the stage: the workspace (a queued experiment's temporary copy is its own), the
    host and the process. A RUNNING run whose process is gone was killed."""
    return {
        "onecycle.workspace": str(Path.cwd().resolve()),
        "onecycle.host": socket.gethostname(),
        "onecycle.pid": str(os.getpid()),
    }


def dvc_tags(stage: str) -> dict[str, str]:
    tags = {"dvc.stage": stage, **here()}
    for env, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_name(stage: str) -> str:
    """What the runs table shows: the DVC experiment and the stage (``ci-quick-17 · train``); a
    plain ``dvc repro`` says so, with its commit (``repro@1a2b3c4 · train``)."""
    exp = os.environ.get("DVC_EXP_NAME")
    if not exp:
        commit = git_commit()
        exp = f"repro@{commit[:7]}" if commit else "repro"
    return f"{exp} · {stage}"


def datasets(data) -> list[tuple[object, str]]:
    """The prepared training and test splits as MLflow datasets, named by source and split, with
    the prepared data's fingerprint as digest: two runs on different data show different ones."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.numpy_dataset import NumpyDataset

    from onecycle.data.sources import OFFICIAL_FILES, OFFICIAL_URL

    # The prepared data's source is described as "<path or URL> (md5 <digest>)" for archives.
    source = redact(re.sub(r" \(md5 [0-9a-f]{32}\)$", "", str(data.meta["source"])))
    if source in OFFICIAL_FILES:
        origin, short = HTTPDatasetSource(OFFICIAL_URL + OFFICIAL_FILES[source][0]), source
    elif "://" in source:
        origin, short = HTTPDatasetSource(source), Path(urlsplit(source).path.rstrip("/")).name
    else:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        path = Path(source).resolve()
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": the same class
            warnings.simplefilter("ignore", UserWarning)
            origin, short = resolve_dataset_source(str(path)), path.name
    digest = str(data.meta["fingerprint"])
    return [
        (NumpyDataset(x, origin, y, name=f"{short}:{split}", digest=digest), context)
        for x, y, split, context in (
            (data.x_train, data.y_train, "train", "training"),
            (data.x_test, data.y_test, "test", "testing"),
        )
    ]


def machine_name() -> str:
    """The CPU, and the GPU where there is one: what a report's timings were measured on."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} GPU; CPU {cpu_name()}"
    except ImportError:
        pass
    return cpu_name()


def cpu_name() -> str:
    """The CPU's model name and whether it has AVX2/AVX-512 (CPUs here differ by 3.5x)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
        "?",
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    simd = [f for f in ("avx2", "avx512f") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {'+'.join(simd) or 'no avx2'}"


def _gpu_name(dev) -> str:
    if dev.type != "cuda":
        return "none"
    import torch

    return torch.cuda.get_device_name(dev.device)


def context(dev, data) -> dict:
    """Where and on what a run trained: device, mixed precision, data, library versions."""
    from importlib.metadata import version

    versions = ", ".join(
        f"{name} {version(name)}" for name in ("torch", "albumentations", "mlflow", "onecycle")
    )
    return {
        "device": str(dev.device),
        "cpu": cpu_name(),
        "gpu": _gpu_name(dev),
        "amp": str(dev.amp_dtype),
        "num_train": len(data.y_train),
        "num_test": len(data.y_test),
        "data_source": redact(str(data.meta["source"])),
        "versions": f"python {platform.python_version()}, {versions}",
    }
