# stop 41: mobilenet trained at the next candidate's picks (a quarter of the climb back / 4), read
# off each confirmation run's own sweeps; train.max_lr fixed, lr_find cut to one sweep
import json
from pathlib import Path
from onecycle.commands import lrbench_spec, study_queue, study_report
sc = lrbench_spec.load(Path("studies/lr-choice/mobilenet.yaml"))
base = sc.confirm_study()
common = {**base.common, "lr_find.seeds": 1}
common.pop("train.max_lr")
s = base.model_copy(update={"name": "lrc-mobilenet-q4", "common": common, "settings": {"q4": {}},
                            "seeds": [0, 1, 2], "jobs": 3})
picks = {0: 0.116, 1: 0.147, 2: 0.123}
names = study_queue.enqueue(s, [("q4", k, {"train.max_lr": p}) for k, p in picks.items()], Path("."))
failed = study_queue.wait(names, Path("."), s.jobs)
found, _ = study_report.collect(s, Path("."))
Path("/tmp/mz/q4.json").write_text(json.dumps([r.__dict__ for r in found], indent=2))
print("failed", failed, "found", len(found))
