"""A scenario of the LR-choice benchmark (``studies/lr-choice/<name>.yaml``): its schema and
loading, checked when read, and the studies it runs (the grid, the confirmation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from onecycle.commands import study_spec
from onecycle.errors import UserError

OUT = Path("reports/lr-choice")


class BenchError(UserError):
    """A scenario file or the stored data cannot be used; the message says which and why."""


class Sweeps(study_spec.StrictModel):
    """``sweeps:``: the range tests stored as data, per seed and length."""

    seeds: int = Field(10, ge=1)  # sweeps 0 .. seeds-1 per length
    lengths: list[int] = Field([100], min_length=1)  # lr_find.num_iter of each
    val_images: int = Field(512, ge=0)  # held-out loss per step, from the validation split


class MoreSeeds(study_spec.StrictModel):
    """``more_seeds:``: seeds run at some grid LRs only, beside ``seeds``: around the peak,
    where the best point's mean and its seed std (the tolerance) are read."""

    seeds: study_spec.Seeds
    at: list[float] = Field(min_length=1)  # grid LRs


class Scenario(study_spec.StrictModel):
    name: str
    description: str = ""
    common: dict[str, Any] = {}  # params overrides for every run and sweep
    grid: list[float] = Field(min_length=2)  # fixed max LRs, increasing
    seeds: study_spec.Seeds = [0, 1]  # of the grid runs
    more_seeds: MoreSeeds | None = None
    sweeps: Sweeps = Sweeps()
    source: study_spec.Source | None = None  # as a study's: trained first
    jobs: int = Field(2, ge=1)
    path: Path = Path(".")  # the file it was read from (not a key of it)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return study_spec.checked_name(v)

    @field_validator("grid", mode="before")
    @classmethod
    def _increasing(cls, v: Any) -> Any:
        if isinstance(v, list) and v != sorted(v):
            raise ValueError(f"{v}: list the max LRs in increasing order")
        return [float(x) if isinstance(x, int) else x for x in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _more_at_grid_points(self) -> Scenario:
        if self.more_seeds:
            off = [lr for lr in self.more_seeds.at if lr not in self.grid]
            if off:
                raise ValueError(f"more_seeds.at: {off} not in the grid {self.grid}")
            if set(self.more_seeds.seeds) & set(self.seeds):
                raise ValueError(f"more_seeds.seeds: repeat some of seeds {self.seeds}")
        return self

    def seeds_at(self, lr: float) -> list[int]:
        """The grid's seeds at ``lr``: ``seeds``, and ``more_seeds`` where it lists ``lr``."""
        more = self.more_seeds
        return self.seeds + (more.seeds if more and lr in more.at else [])

    def study(self) -> study_spec.Study:
        """The grid: one setting per max LR over its seeds (``seeds_at``)."""
        settings = {}
        for lr in self.grid:
            seeds = self.seeds_at(lr)
            own = {"seeds": seeds} if seeds != self.seeds else {}
            settings[f"lr-{lr:g}"] = {"train.max_lr": lr, **own}
        return study_spec.Study(
            name=f"lrc-{self.name}",
            description=self.description,
            common=self.common,
            settings=settings,
            seeds=self.seeds,
            jobs=self.jobs,
            figure="max_lr",
            source=self.source,
        )

    def confirm_study(self, refine: int = 0) -> study_spec.Study:
        """The pipeline's own default (``train.max_lr: auto``: lr_find's defaults, median of
        its seeds' picks) on the scenario's longest sweep, over 3 seeds: the scoring's
        interpolation checked by training. With ``refine``, that pick checked by
        ``lr_find.refine: refine`` probes (range_test/refine.py) before training."""
        label = "refine" if refine else "auto"
        return study_spec.Study(
            name=f"lrc-{self.name}-{label}",
            description=f"{self.description} The default rule's own pick"
            + (f", refined by {refine} probes," if refine else "")
            + " trained.",
            common={
                **self.common,
                "lr_find.num_iter": max(self.sweeps.lengths),
                "train.max_lr": "auto",
                **(self._refine(refine) if refine else {}),
            },
            settings={label: {}},
            seeds=[0, 1, 2],
            jobs=self.jobs,
            source=self.source,
        )

    def _refine(self, count: int) -> dict:
        """lr_find.refine at ``count`` candidates, its first probes 1/16 of the scenario's
        training (params.yaml's 1.5 of 24 epochs), so that they cost half of it everywhere."""
        epochs = self.common.get("train.epochs", 24)
        return {"lr_find.refine": count, "lr_find.refine_epochs": epochs / 16}

    @property
    def out(self) -> Path:
        return OUT / self.name


def load(path: Path) -> Scenario:
    """Read and check ``path``; every problem names the file and the key."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BenchError(f"{path}: cannot read the scenario ({exc})") from None
    if not isinstance(raw, dict) or "path" in raw:
        raise BenchError(f"{path}: a scenario is a mapping of its keys (see studies/lr-choice/)")
    try:
        return Scenario.model_validate({**raw, "path": Path(path)})
    except ValidationError as exc:
        lines = study_spec.problems(exc, Scenario)
        raise BenchError(f"{path} is not a usable scenario:\n" + "\n".join(lines)) from None


def sweeps_path(scenario: Scenario) -> Path:
    return scenario.out / "sweeps.json"
