"""dvc.yaml agrees with the code: every path it declares comes from onecycle/paths.py, and every
project module a stage runs is one of its deps, so `dvc repro` reruns a stage when its code
changes (and only then)."""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from onecycle import paths

from .conftest import ROOT

# Modules that cannot change a stage's outputs, so editing them must not rerun the stage:
NOT_DEPS = {
    "onecycle/__init__.py": "the package marker and its version string",
    **{
        f"onecycle/{layer}/__init__.py": "a layer's docstring"
        for layer in (
            "commands",
            "data",
            "pipeline",
            "range_test",
            "reports",
            "tracking",
            "training",
        )
    },
    "onecycle/pipeline/runner.py": "the stage runner: how an error is printed",
    "onecycle/progress.py": "progress bars and lines printed beside them",
    "onecycle/tracking/lifecycle.py": "what is logged to MLflow (and the run reference files)",
    "onecycle/tracking/connect.py": "which MLflow store is logged to",
    "onecycle/tracking/provenance.py": "the tags a run carries (commit, machine, datasets)",
    "onecycle/tracking/recorder.py": "how a failed MLflow call is kept and retried",
}
PACKAGES = ("onecycle", "stages")


def _module_file(module: str) -> str | None:
    path = Path(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if (ROOT / candidate).is_file():
            return candidate.as_posix()
    return None


def _running_nodes(tree: ast.AST):
    """Every node, less the bodies of ``if TYPE_CHECKING:`` (imports for annotations only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo += node.orelse
            continue
        todo += ast.iter_child_nodes(node)


def imported_files(path: str, source: str | None = None) -> set[str]:
    """Project files that ``path`` (or ``source`` placed there) imports, at module level or
    inside functions."""
    parts = Path(path).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    names: set[str] = set()
    for node in _running_nodes(ast.parse(source or (ROOT / path).read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}  # `from pkg import module`
    found = set()
    for name in names:
        if name.split(".")[0] in PACKAGES:
            dotted = name.split(".")
            found |= {
                f for i in range(len(dotted)) if (f := _module_file(".".join(dotted[: i + 1])))
            }
    return found


def code_closure(script: str) -> set[str]:
    """``script`` and every project file it imports, transitively (not through NOT_DEPS)."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            if path not in NOT_DEPS:
                todo += imported_files(path)
    return seen - set(NOT_DEPS)


def stage_script(cmd: str) -> str:
    """`python -m stages.train` -> stages/train.py"""
    module = cmd.split(" -m ", 1)[1].split()[0]
    return _module_file(module)


def dep_problems(dvc: dict) -> list[str]:
    """One line per code file a stage runs but does not list, or lists but does not run."""
    problems = []
    for name, stage in dvc["stages"].items():
        runs = code_closure(stage_script(stage["cmd"]))
        listed = {d for d in stage.get("deps", []) if d.endswith(".py")}
        problems += [
            f"stage {name!r} imports {f} but does not list it in deps"
            for f in sorted(runs - listed)
        ]
        problems += [
            f"stage {name!r} lists {f} in deps but never imports it" for f in sorted(listed - runs)
        ]
    return problems


def declared_paths(dvc: dict) -> set[str]:
    """Every data path dvc.yaml names: stage deps/outs/metrics/plots and the plot definitions."""
    found = set()
    for stage in dvc["stages"].values():
        for kind in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                found.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    for plot in dvc.get("plots", []):
        if isinstance(plot, str):
            found.add(plot)
        else:
            (spec,) = plot.values()
            y = spec.get("y")
            found |= set(y) if isinstance(y, dict) else set()
    return {p for p in found if not p.endswith(".py")}


def _paths_module() -> set[str]:
    values = set()
    for v in vars(paths).values():
        values |= {
            str(p) for p in (v.values() if isinstance(v, dict) else [v]) if isinstance(p, Path)
        }
    return values


@pytest.fixture(scope="module")
def dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_path_dvc_yaml_declares_comes_from_the_paths_module(dvc):
    strays = declared_paths(dvc) - _paths_module()
    assert not strays, f"dvc.yaml names paths that onecycle/paths.py does not: {sorted(strays)}"


def test_the_figures_dvc_shows_are_the_ones_the_plots_stage_writes(dvc):
    pngs = {p for p in dvc["plots"] if isinstance(p, str) and p.endswith(".png")}
    assert pngs == {str(p) for p in (paths.FIGURES | paths.GRID_FIGURES).values()}


def test_each_stage_lists_exactly_the_code_it_runs(dvc):
    assert dep_problems(dvc) == []


@pytest.mark.parametrize(
    ("stage", "module"),
    [
        ("evaluate", "onecycle/training/model.py"),
        ("download", "onecycle/data/archives.py"),
        ("train", "onecycle/training/schedule.py"),
    ],
)
def test_a_removed_dep_is_caught_naming_the_stage_and_the_module(dvc, stage, module):
    broken = copy.deepcopy(dvc)
    broken["stages"][stage]["deps"].remove(module)
    assert dep_problems(broken) == [
        f"stage {stage!r} imports {module} but does not list it in deps"
    ]


def test_a_dep_on_code_the_stage_never_runs_is_caught(dvc):
    broken = copy.deepcopy(dvc)
    broken["stages"]["download"]["deps"].append("onecycle/training/loop.py")
    assert dep_problems(broken) == [
        "stage 'download' lists onecycle/training/loop.py in deps but never imports it"
    ]


def test_imports_inside_functions_and_of_submodules_count():
    source = (
        "from typing import TYPE_CHECKING\nfrom . import progress\n\n"
        "if TYPE_CHECKING:\n    from .model import ResNet9  # annotations only: never runs\n\n"
        "def f():\n    from .training.loop import fit\n"
    )
    assert imported_files("onecycle/new.py", source) == {
        "onecycle/__init__.py",
        "onecycle/progress.py",
        "onecycle/training/__init__.py",
        "onecycle/training/loop.py",
    }


@pytest.mark.parametrize(
    ("stage", "heavy"),
    [
        ("download", ("torch", "torchvision", "albumentations", "mlflow")),
        ("evaluate", ("albumentations",)),
    ],
)
def test_a_stage_loads_only_what_it_uses(stage, heavy):
    code = f"import sys, stages.{stage}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", f"stages.{stage} imports {out.stdout.strip()}"


def test_check_params_on_the_defaults_loads_no_torch():
    """check_params runs before every pipeline run; the default model (resnet9) is checked
    without importing torch (2 s of CPU a run, most of the stage's time)."""
    code = (
        "import sys, stages.check_params; from onecycle.config import load_params; "
        "load_params(); print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", f"check_params imports {out.stdout.strip()}"
