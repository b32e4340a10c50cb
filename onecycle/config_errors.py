"""params.yaml's problems as people read them: one line per bad key, naming the key, what is wrong and the value given (secrets hidden), a likely typo's intended key, and what took the place of a key that no longer exists."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from onecycle.redact import redact

if TYPE_CHECKING:
    from onecycle.config import Params


def _key(loc: tuple, root: type[BaseModel]) -> tuple[str, type[BaseModel] | None]:
    """The dotted key of an error location, and the section model holding its last part.

    Walks the models rather than filtering names, so that union-branch tags pydantic appends
    (``literal['auto']``, ``float``) are dropped while an unknown key such as ``interval`` is kept.
    """
    model: type[BaseModel] | None = root
    parts: list[str] = []
    parent = None
    for p in loc:
        if model is None:  # past a leaf field: what follows are union-branch tags
            break
        parts.append(str(p))
        parent = model
        field = model.model_fields.get(str(p))
        if field is None:  # an unknown key
            break
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return ".".join(parts), parent


REPLACED = {  # keys of older params.yaml files: what took their place
    "lr_find.smooth_beta": (
        "the curve is now smoothed over a fraction of the sweep, lr_find.smooth_window (0.2: a "
        "fifth of its steps), centered so its minimum does not lag (lr_find.smooth: centered); "
        "delete smooth_beta (make bench-lr chose the new smoothing, docs/method.md)"
    ),
    "train.step_size": "renamed train.step_epochs (epochs between the step schedule's LR drops)",
    "train.gamma": "renamed train.step_gamma (the step schedule's LR factor at each drop)",
}


def _describe(err: dict[str, Any], root: type[BaseModel]) -> tuple[str, str, str]:
    """(key, message, shown input) for one pydantic error."""
    key, parent = _key(err["loc"], root)
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    if err["type"] == "extra_forbidden" and key in REPLACED:
        msg = f"no longer a key: {REPLACED[key]}"
    elif err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(
            str(err["loc"][-1]), list(parent.model_fields), n=1, cutoff=0.75
        )
        hint = f"a typo of {close[0]!r}?" if close else "a typo?"
        msg = f"unknown key ({hint}); see params.yaml for the keys each section takes"
    got = err.get("input")
    shown = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {redact(repr(got))})"
    return key or "<top level>", msg, shown


def lines(errors: list[dict[str, Any]], root: type[BaseModel]) -> list[str]:
    """One line per bad key of ``root`` (config.Params): ``  train.epochs: ... (got ...)``."""
    # A union (e.g. 'auto' | number) reports one error per branch: join them on one line per key.
    grouped: dict[tuple[str, str], list[str]] = {}
    for err in errors:
        key, msg, shown = _describe(err, root)
        msgs = grouped.setdefault((key, shown), [])
        if msg not in msgs:
            msgs.append(msg)
    return [f"  {key}: {', or '.join(msgs)}{shown}" for (key, shown), msgs in grouped.items()]


def across_sections(p: Params) -> list[str]:
    """Checks that tie keys of two sections together (each names the key to change)."""
    problems = []
    for key, grid, example in (
        ("weight_decay", "weight_decay_grid", "[1.0e-4, 5.0e-4, 1.0e-3]"),
        ("max_momentum", "momentum_grid", "[0.85, 0.9, 0.95]"),
    ):
        if getattr(p.train, key) == "auto" and not getattr(p.lr_find, grid):
            problems.append(
                f"  train.{key}: 'auto' takes lr_find's {grid} choice, but lr_find.{grid} is "
                f"empty; set one (e.g. {example}) or give train.{key} a number"
            )
    if p.lr_find.refine and not p.data.val_images:
        problems.append(
            "  lr_find.refine: its probes are scored on the validation split, and "
            "data.val_images is 0; set data.val_images (e.g. 1000) or lr_find.refine: 0"
        )
    if p.lr_find.refine and p.train.schedule != "onecycle":
        problems.append(
            f"  lr_find.refine: its probes are 1cycle runs, and train.schedule is "
            f"{p.train.schedule!r}; set lr_find.refine: 0 or train.schedule: onecycle"
        )
    return problems
