"""A study's file: its schema and loading (``studies/<name>.yaml``), checked when read."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from onecycle.config import SUGGESTIONS
from onecycle.errors import UserError

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
LABEL = re.compile(r"^[a-z0-9]([a-z0-9_-]|\.(?!\.))*$")  # a Git ref part: no "..", e.g. lr-0.03

Seeds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
_SEEDS = TypeAdapter(Seeds, config=ConfigDict(strict=True))


def checked_name(name: str) -> str:
    """A study's or scenario's name, which names its experiments and reports."""
    if not NAME.match(name):
        raise ValueError(f"{name!r} must be lower-case letters, digits, - or _")
    return name


class StudyError(UserError):
    """A study file or a study run is not usable; the message says which and why."""


class StrictModel(BaseModel):
    """A file's section: unknown keys refused, no type coercion, frozen (as config.py's)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Source(StrictModel):
    """A run trained before the settings (``source:``), its checkpoint where they name it."""

    overrides: dict[str, Any]  # the source run's params (dotted keys)
    checkpoint: str  # where its models/model.pt goes: what `model.pretrained` names


class Study(StrictModel):
    """``studies/<name>.yaml``: runs of the pipeline, each a setting (params overrides) at a
    seed, queued as DVC experiments and reported from MLflow."""

    name: str
    description: str = ""
    common: dict[str, Any] = {}  # overrides of every run
    # label -> overrides; a setting's own `seeds:` replaces the study's for it
    settings: dict[str, dict[str, Any]] = Field(min_length=1)
    seeds: Seeds
    picks: list[Literal[SUGGESTIONS]] = []  # suggestion methods run at their pick
    target: str = "evaluate"  # the stage each run goes up to
    jobs: int = Field(2, ge=1)  # experiments at a time (`dvc queue start -j`)
    figure: Literal["epochs", "max_lr"] = "epochs"  # accuracy per epoch, or against max LR
    source: Source | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return checked_name(v)

    @field_validator("settings", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v  # (pydantic says what it wanted)
        bad = [str(k) for k in v if not LABEL.match(str(k))]
        if bad:
            raise ValueError(f"labels {bad}: use a-z, 0-9, -, _ and single dots, e.g. lr-0.1")
        taken = [k for k in v if str(k).startswith("pick-")]
        if taken:
            raise ValueError(f"labels {taken}: pick-* are the picks' own")
        return {str(k): dict(o or {}) for k, o in v.items()}  # `label:` alone: no overrides

    @field_validator("settings")
    @classmethod
    def _setting_seeds(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for label, overrides in v.items():
            if "seeds" in overrides:
                try:
                    _SEEDS.validate_python(overrides["seeds"])
                except ValidationError:
                    raise ValueError(
                        f"{label}.seeds: a list of integers >= 0, e.g. [0, 1]"
                    ) from None
        return v

    @property
    def source_name(self) -> str:
        return f"{self.name}-source"

    @property
    def setting_seeds(self) -> dict[str, list[int]]:
        """A setting's own seeds, where it gives them."""
        return {k: o["seeds"] for k, o in self.settings.items() if "seeds" in o}

    def exp_name(self, label: str, seed: int) -> str:
        return f"{self.name}-{label}-s{seed}"

    def all_settings(self) -> dict[str, dict[str, object]]:
        """The settings' overrides, then one per pick: the pipeline's own choice with that
        method."""
        own = {k: {p: v for p, v in o.items() if p != "seeds"} for k, o in self.settings.items()}
        picks = {f"pick-{m}": {"lr_find.suggestion": m, "train.max_lr": "auto"} for m in self.picks}
        return {**own, **picks}

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
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study is a mapping of keys, got {type(raw).__name__}")
    try:
        return Study.model_validate(raw)
    except ValidationError as exc:
        raise StudyError(f"{path} is not a usable study:\n" + "\n".join(problems(exc))) from None


def problems(exc: ValidationError, model: type[BaseModel] = Study) -> list[str]:
    """One line per bad key of a ``model`` file (``  settings: ...``); an unknown key lists the
    keys its section takes."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("literal[", "function-"))]
        if err["type"] == "extra_forbidden":
            keys = [k for k in _section(model, loc[:-1]).model_fields if k != "path"]
            msg = f"unknown key; the keys here are {', '.join(keys)}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        line = f"  {'.'.join(loc) or '<top level>'}: {msg}"
        if line not in lines:
            lines.append(line)
    return lines


def _section(model: type[BaseModel], loc: list[str]) -> type[BaseModel]:
    """The model that holds the keys at ``loc`` (``["source"]``: Source)."""
    for part in loc:
        field = model.model_fields.get(part)
        inner = typing.get_args(field.annotation) or (field.annotation,) if field else ()
        found = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not found:
            break
        model = found[0]
    return model


def with_common(study: Study, pairs: list[str]) -> Study:
    """``study`` with ``KEY=VALUE`` overrides (YAML values) added to its common ones: a local
    data copy, say, on a machine with no network. A changed override makes new runs."""
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise StudyError(
                f"--set {pair!r}: give KEY=VALUE, e.g. --set data.source=/data/x.tar.gz"
            )
        extra[key.strip()] = yaml.safe_load(value)
    return study.model_copy(update={"common": {**study.common, **extra}}) if extra else study
