"""The stage runner: a user error prints one clear message and exits 1, without a traceback.

It also refuses to let DVC record a lie: if params.yaml changed under a running stage (a second
``dvc exp run -S ...`` rewrites it even when DVC's lock then refuses to run), the stage's results
were made with the old values while DVC would lock the new ones, so the stage fails instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from . import files, paths
from .config import read_yaml
from .errors import UserError
from .redact import redact

DVC_YAML = Path("dvc.yaml")
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
        key = entry if isinstance(entry, str) else ""  # `- params.yaml:` lists the whole file
        value: object = raw
        for part in filter(None, key.split(".")):
            value = value.get(part) if isinstance(value, dict) else None
        values[key or "<all of params.yaml>"] = value
    return values


def _changed(before: dict, after: dict) -> list[str]:
    return [
        f"  {k}: {before[k]!r} -> {after.get(k)!r}" for k in before if before[k] != after.get(k)
    ]


def run(main: Callable[[], None], stage: str) -> None:
    files.remove_stale_temps({p.parent for p in paths.outputs()} | {paths.RAW_DIR})
    before = stage_params(stage)
    try:
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
        sys.exit(1)
    finally:
        ddp = sys.modules.get("onecycle.distributed")  # imported by the stages that train
        if ddp is not None:
            ddp.shutdown()  # a data-parallel rank leaves its process group
