"""check_params: params.yaml in full (every section, key and value), before any other stage.

DVC removes a stage's outputs before it runs the stage, so a value the stage then refused would
cost the last results. This stage runs first whenever params.yaml changes and stops the pipeline
before any output is removed; a new section that no stage reads (``-S +trian.x=1``) stops it too.
Its output never changes, so it makes nothing else rerun.
"""

from pathlib import Path

from onecycle import files, paths
from onecycle.config import load_params
from onecycle.errors import UserError
from onecycle.params_file import repo_root
from onecycle.pipeline import precheck, runner


def main() -> None:
    others = precheck.other_pipeline_runs(Path("."))  # this workspace (a queued run: its copy)
    if others:
        raise UserError(
            "another pipeline run is going on in this workspace (" + "; ".join(others) + "); "
            "params.yaml already holds this run's values, and that run's next stage refuses "
            "them. Run one at a time (`dvc exp run --queue ...` queues one), then set "
            "params.yaml back (`make reset-params`, or the values you meant) and rerun"
        )
    params = load_params()
    precheck.check_counts(params.data, repo_root())  # the subsets against the classes
    if params.model.pretrained not in ("none", "default"):  # a weights file: there, loadable,
        from onecycle.training import (
            init_weights,  # this network's (torchvision's default: lr_find gets it)
        )

        init_weights.load(params.model)
    if params.base.devices > 1:  # what the ranks need, known before DVC removes any output
        from onecycle.training import distributed

        distributed.check(params)
    files.write_text(paths.PARAMS_CHECKED, "params.yaml: every section, key and value is valid\n")


if __name__ == "__main__":
    runner.run(main, "check_params")
