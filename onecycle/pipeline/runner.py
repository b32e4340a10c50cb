"""The stage runner: a user error prints one clear message and exits 1, without a traceback.

It also refuses to let DVC record a lie. A second ``dvc exp run -S ...`` rewrites params.yaml even
when DVC's lock then refuses to run it, so the pipeline run already going would go on with values
check_params never checked, and lock them as if it had. Run by DVC, a stage therefore refuses to
start when params.yaml is no longer what check_params checked at this pipeline run's start (its
entry in dvc.lock), and fails when its own params changed while it ran; either way naming the
changed keys.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from onecycle import files, paths
from onecycle.errors import UserError
from onecycle.params_file import flatten, read_yaml
from onecycle.redact import redact

DVC_YAML = Path("dvc.yaml")
DVC_LOCK = Path("dvc.lock")
PARAMS = Path("params.yaml")


def stage_params(stage: str) -> dict[str, object]:
    """The values of the params dvc.yaml lists for ``stage``, as params.yaml holds them now
    (empty when dvc.yaml or the stage is not there, e.g. a stage run by hand elsewhere)."""
    try:
        listed = yaml.safe_load(DVC_YAML.read_text())["stages"][stage].get("params", [])
        raw = read_yaml(PARAMS) or {}
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return {}
    values: dict[str, object] = {}
    for entry in listed:
        key = entry if isinstance(entry, str) else ""
        value: object = raw
        for part in filter(None, key.split(".")):
            value = value.get(part) if isinstance(value, dict) else None
        if key:
            values[key] = value
        else:  # `- params.yaml:` lists the whole file
            values |= value if isinstance(value, dict) else {}
    return values


def restore_hint(stage: str) -> str:
    """How to get back what DVC removed before running ``stage``, which then failed: its cached
    outputs as dvc.lock still records them, the others as last committed ("" where dvc.yaml
    does not list the stage)."""
    try:
        spec = yaml.safe_load(DVC_YAML.read_text())["stages"][stage]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return ""
    cached, plain = [], []
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind) or []:
            path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            (plain if (opts or {}).get("cache") is False else cached).append(path)
    plain = _committed(plain)  # `git checkout` of a path git never had stops on it
    ways = [f"`dvc checkout {stage}` restores {', '.join(cached)}"] if cached else []
    if plain:
        which = "the others" if cached else "them"
        ways.append(f"`git checkout -- {' '.join(plain)}` restores {which} as last committed")
    return f"DVC removed {stage}'s outputs before running it: {'; '.join(ways)}." if ways else ""


def _committed(paths_: list[str]) -> list[str]:
    """Those of ``paths_`` that git tracks (all of them where git cannot say)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "ls-files", "--", *paths_], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return paths_
    tracked = set(out.stdout.split()) if out.returncode == 0 else set(paths_)
    return [p for p in paths_ if p in tracked]


_ABSENT = object()


def _changed(before: dict, after: dict) -> list[str]:
    """One line per changed key, ``  train.epochs: 24 -> 2``."""
    old, new = flatten(before), flatten(after)
    show = lambda v: "(absent)" if v is _ABSENT else repr(v)  # noqa: E731
    return [
        f"  {k}: {show(old.get(k, _ABSENT))} -> {show(new.get(k, _ABSENT))}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k, _ABSENT) != new.get(k, _ABSENT)
    ]


def checked_params() -> dict | None:
    """params.yaml as check_params last checked it, from its entry in dvc.lock (DVC writes it once
    check_params ran or was found up to date in this pipeline run); None where there is none."""
    try:
        lock = read_yaml(DVC_LOCK) or {}
        return lock["stages"]["check_params"]["params"]["params.yaml"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def _check_unchanged_since_check_params(stage: str) -> None:
    """Run by DVC (``DVC_STAGE`` set), a stage refuses to start on params that check_params did
    not check at this pipeline run's start."""
    if not os.environ.get("DVC_STAGE") or stage == "check_params":
        return
    checked = checked_params()
    try:
        now = read_yaml(PARAMS) or {}
    except (OSError, yaml.YAMLError):
        return  # the stage's own loading says what is wrong with it
    changed = _changed(checked, now) if isinstance(checked, dict) else []
    if changed:
        raise UserError(
            "params.yaml is not what check_params checked when this pipeline run started:\n"
            + "\n".join(changed)
            + "\nAnother `dvc exp run -S ...` (or an edit) changed it meanwhile; nothing was "
            "written. Run one pipeline at a time: `dvc repro` (or your `dvc exp run`) again."
        )


def run(main: Callable[[], None], stage: str) -> None:
    files.remove_stale_temps({p.parent for p in paths.outputs()} | {paths.RAW_DIR})
    before = stage_params(stage)
    try:
        _check_unchanged_since_check_params(stage)
        main()
        changed = _changed(before, stage_params(stage))
        if changed:
            raise UserError(
                "params.yaml changed while the stage ran:\n" + "\n".join(changed) + "\nIts "
                "results were made with the old values, so DVC must not record them with the "
                "new ones; rerun `dvc repro` (one `dvc exp run` at a time)."
            )
    except KeyboardInterrupt:
        print(f"\n{stage}: interrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as exc:
        print(f"\n{stage}: error: {redact(str(exc))}", file=sys.stderr)
        if os.environ.get("DVC_STAGE") and stage != "check_params":  # (its output: a stamp)
            if hint := restore_hint(stage):
                print(hint, file=sys.stderr)
        sys.exit(1)
    finally:
        ddp = sys.modules.get("onecycle.training.distributed")  # imported by the stages that train
        if ddp is not None:
            ddp.shutdown()  # a data-parallel rank leaves its process group
