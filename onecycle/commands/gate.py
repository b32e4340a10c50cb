"""CI's metric gate: compare the workspace's pipeline results with the committed baseline
(ci/baseline.json); exit 1 if a check fails.

python -m onecycle.commands.gate                      # after the quick run
python -m onecycle.commands.gate --expect-max-lr 0.2  # after `dvc exp run -S train.max_lr=0.2`
python -m onecycle.commands.gate --update             # the current run's metrics into the baseline
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from onecycle import paths
from onecycle.errors import MissingInput


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


def _outputs(root: Path) -> Check:
    missing = [p for p in declared_outputs(root / "dvc.yaml") if not (root / p).exists()]
    message = f"missing declared output(s): {', '.join(missing)}" if missing else ""
    return Check(
        "declared outputs",
        "all present",
        f"{len(missing)} missing",
        "none missing",
        not missing,
        message,
    )


def _accuracy(root: Path, base: dict, drop: float) -> Check:
    acc = (_read(root / paths.EVAL_METRICS) or {}).get("accuracy")
    ok = acc is not None and acc >= base["accuracy"] - drop
    message = (
        f"test accuracy {acc if acc is None else round(acc, 4)} is more than the tolerance "
        f"{drop:.4f} below the baseline {base['accuracy']:.4f} (ci/baseline.json)"
    )
    return Check(
        f"accuracy ({paths.EVAL_METRICS})",
        f"{base['accuracy']:.4f}",
        "missing" if acc is None else f"{acc:.4f}",
        f"-{drop:.4f}",
        ok,
        "" if ok else message,
    )


def _max_lr(root: Path, base: dict, factor: float) -> Check:
    lr = (_read(root / paths.LR_FIND_METRICS) or {}).get("max_lr")
    ok = lr is not None and base["max_lr"] / factor <= lr <= base["max_lr"] * factor
    message = (
        f"lr_find's max_lr {lr} moved more than a factor {factor:g} from the baseline "
        f"{base['max_lr']:.4g} (ci/baseline.json)"
    )
    return Check(
        f"max_lr ({paths.LR_FIND_METRICS})",
        f"{base['max_lr']:.4g}",
        "missing" if lr is None else f"{lr:.4g}",
        f"x/÷ {factor:g}",
        ok,
        "" if ok else message,
    )


def _override(root: Path, expected: float) -> Check:
    tr = _read(root / paths.TRAIN_METRICS) or {}
    ok = tr.get("max_lr") == expected and tr.get("max_lr_source") == "params"
    message = (
        f"train did not record the override: expected max_lr {expected:g} from params, "
        f"got {tr.get('max_lr')} from {tr.get('max_lr_source')}"
    )
    return Check(
        f"max_lr used ({paths.TRAIN_METRICS})",
        f"{expected:g} (params)",
        f"{tr.get('max_lr')} ({tr.get('max_lr_source')})",
        "exact",
        ok,
        "" if ok else message,
    )


def run_checks(root: Path, baseline: dict, expect_max_lr: float | None = None) -> list[Check]:
    """The gate: declared outputs exist, test accuracy within tolerance, lr_find's max_lr within a
    factor. With ``expect_max_lr`` (an override run, shorter than the baseline's), instead: the
    outputs exist and train used exactly that LR from params."""
    tol, base = baseline["tolerances"], baseline["metrics"]
    if expect_max_lr is not None:
        return [_outputs(root), _override(root, expect_max_lr)]
    return [
        _outputs(root),
        _accuracy(root, base, tol["accuracy_drop"]),
        _max_lr(root, base, tol["max_lr_factor"]),
    ]


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
        raise MissingInput(
            f"{paths.EVAL_METRICS} or {paths.LR_FIND_METRICS} missing: run the quick pipeline first"
        )
    return {**baseline, "metrics": {"accuracy": ev["accuracy"], "max_lr": lr["max_lr"]}}


BASELINE = Path("ci/baseline.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m onecycle.commands.gate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--expect-max-lr", type=float, help="the train.max_lr override the run used")
    ap.add_argument(
        "--update", action="store_true", help="deliberately replace the baseline's metrics"
    )
    ap.add_argument(
        "--root", type=Path, default=Path("."), help="the workspace to check (default: here)"
    )
    ap.add_argument("--baseline", type=Path, default=BASELINE, help=f"default: {BASELINE}")
    args = ap.parse_args(argv)
    baseline = json.loads(args.baseline.read_text())
    if args.update:
        new = updated_baseline(baseline, args.root)
        args.baseline.write_text(json.dumps(new, indent=2) + "\n")
        print(f"{args.baseline}: metrics {baseline['metrics']} -> {new['metrics']}; commit it")
        return 0
    checks = run_checks(args.root, baseline, args.expect_max_lr)
    print(table(checks))
    failed = [c for c in checks if not c.ok]
    for c in failed:
        print(f"gate: FAIL: {c.message}", file=sys.stderr)
    print("gate: passed" if not failed else f"gate: {len(failed)} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
