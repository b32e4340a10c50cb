"""CI's metric gate: compare a fresh quick run with the committed baseline (ci/baseline.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import paths


@dataclass
class Check:
    name: str
    baseline: str
    current: str
    tolerance: str
    ok: bool
    message: str = ""


def declared_outputs(dvc_yaml: Path) -> list[str]:
    """Every out, metric and plot file the stages of dvc.yaml declare."""
    stages = yaml.safe_load(Path(dvc_yaml).read_text()).get("stages", {})
    found = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                found.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return found


def _read(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_checks(root: Path, baseline: dict, expect_max_lr: float | None = None) -> list[Check]:
    """The gate: declared outputs exist, test accuracy within tolerance, lr_find's max_lr within a
    factor; with ``expect_max_lr``, that train used exactly that LR from params."""
    tol = baseline["tolerances"]
    base = baseline["metrics"]
    checks = []
    missing = [p for p in declared_outputs(root / "dvc.yaml") if not (root / p).exists()]
    checks.append(
        Check(
            "declared outputs",
            "all present",
            f"{len(missing)} missing",
            "none missing",
            not missing,
            f"missing declared output(s): {', '.join(missing)}" if missing else "",
        )
    )
    ev = _read(root / paths.EVAL_METRICS) or {}
    acc = ev.get("accuracy")
    floor = base["accuracy"] - tol["accuracy_drop"]
    ok = acc is not None and acc >= floor
    checks.append(
        Check(
            f"accuracy ({paths.EVAL_METRICS})",
            f"{base['accuracy']:.4f}",
            "missing" if acc is None else f"{acc:.4f}",
            f"-{tol['accuracy_drop']:.4f}",
            ok,
            ""
            if ok
            else f"test accuracy {acc if acc is None else round(acc, 4)} is more than the tolerance "
            f"{tol['accuracy_drop']:.4f} below the baseline {base['accuracy']:.4f} (ci/baseline.json)",
        )
    )
    if expect_max_lr is None:
        lr = (_read(root / paths.LR_FIND_METRICS) or {}).get("max_lr")
        f = tol["max_lr_factor"]
        ok = lr is not None and base["max_lr"] / f <= lr <= base["max_lr"] * f
        checks.append(
            Check(
                f"max_lr ({paths.LR_FIND_METRICS})",
                f"{base['max_lr']:.4g}",
                "missing" if lr is None else f"{lr:.4g}",
                f"x/÷ {f:g}",
                ok,
                ""
                if ok
                else f"lr_find's max_lr {lr} moved more than a factor {f:g} from the baseline "
                f"{base['max_lr']:.4g} (ci/baseline.json)",
            )
        )
    else:
        tr = _read(root / paths.TRAIN_METRICS) or {}
        ok = tr.get("max_lr") == expect_max_lr and tr.get("max_lr_source") == "params"
        checks.append(
            Check(
                f"max_lr used ({paths.TRAIN_METRICS})",
                f"{expect_max_lr:g} (params)",
                f"{tr.get('max_lr')} ({tr.get('max_lr_source')})",
                "exact",
                ok,
                ""
                if ok
                else f"train did not record the override: expected max_lr {expect_max_lr:g} from params, "
                f"got {tr.get('max_lr')} from {tr.get('max_lr_source')}",
            )
        )
    return checks


def table(checks: list[Check]) -> str:
    rows = [("check", "baseline", "current", "tolerance", "result")]
    rows += [(c.name, c.baseline, c.current, c.tolerance, "ok" if c.ok else "FAIL") for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def updated_baseline(baseline: dict, root: Path) -> dict:
    """The baseline with its metrics replaced by the current run's (tolerances kept)."""
    ev = _read(root / paths.EVAL_METRICS)
    lr = _read(root / paths.LR_FIND_METRICS)
    if ev is None or lr is None:
        raise FileNotFoundError(
            f"{paths.EVAL_METRICS} or {paths.LR_FIND_METRICS} missing: run the quick pipeline first"
        )
    return {**baseline, "metrics": {"accuracy": ev["accuracy"], "max_lr": lr["max_lr"]}}
