"""Compare the workspace's pipeline results with ci/baseline.json; exit 1 if a check fails.

python ci/gate.py                      # after the quick run
python ci/gate.py --expect-max-lr 0.2  # after `dvc exp run -S train.max_lr=0.2`
python ci/gate.py --update             # write the current run's metrics into the baseline
"""

import argparse
import json
import sys
from pathlib import Path

from onecycle.commands.gate import run_checks, table, updated_baseline

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "ci" / "baseline.json"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--expect-max-lr", type=float, help="the train.max_lr override the run used")
    ap.add_argument(
        "--update", action="store_true", help="deliberately replace the baseline's metrics"
    )
    ap.add_argument(
        "--root", type=Path, default=ROOT, help="the workspace to check (default: this repo)"
    )
    args = ap.parse_args()
    baseline = json.loads(BASELINE.read_text())
    if args.update:
        new = updated_baseline(baseline, args.root)
        BASELINE.write_text(json.dumps(new, indent=2) + "\n")
        print(
            f"{BASELINE.relative_to(ROOT)}: metrics {baseline['metrics']} -> {new['metrics']}; commit it"
        )
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
