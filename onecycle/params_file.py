"""params.yaml as a file: read as DVC reads it (YAML 1.2 floats such as ``1e-05``), its dotted keys and overrides as ``dvc exp run -S`` sets them, and the repository root that relative paths in it are read against. config.py checks what it holds."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml


def repo_root() -> Path:
    """The repository root: $DVC_ROOT when DVC runs a stage, else the nearest folder with dvc.yaml."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return here


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-05`` / ``5e-4`` as floats (YAML 1.2, as DVC does).

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so ``5e-4`` would
    load as a string; ``dvc exp run -S lr_find.start_lr=1e-5`` writes exactly ``1e-05``.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: str | os.PathLike):
    """A YAML file as DVC reads it (YAML 1.2 floats such as ``1e-05``)."""
    return yaml.load(Path(path).read_text(), Loader=_Loader)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 24}}`` -> ``{"train.epochs": 24}``: dotted keys, as MLflow's params
    and ``dvc exp run -S`` name them."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def with_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """A copy of params ``raw`` with ``overrides`` (dotted keys) set, as ``dvc exp run -S`` sets
    them; a key params.yaml does not have is added, and :func:`parse_params` then names it."""
    import copy

    out = copy.deepcopy(raw or {})
    for key, value in overrides.items():
        *sections, last = key.split(".")
        node = out
        for part in sections:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # (a value where a section should be: parse_params says so)
            node = node[part]
        node[last] = value
    return out


def resolve_path(value: str | os.PathLike, root: Path | None = None) -> Path:
    """A relative path from params resolves against the repository root, not the cwd."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root or repo_root()) / p
