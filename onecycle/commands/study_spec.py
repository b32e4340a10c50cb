"""A study's file: its schema and loading (``studies/<name>.yaml``), checked when read."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from onecycle.config import SUGGESTIONS
from onecycle.errors import UserError

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


LABEL = re.compile(r"^[a-z0-9]([a-z0-9_-]|\.(?!\.))*$")  # a Git ref part: no "..", e.g. lr-0.03


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
