"""Every file the pipeline passes between stages, named once. dvc.yaml declares the same paths;
tests/test_pipeline_files.py checks that every path it names is one of these."""

from pathlib import Path

PARAMS_CHECKED = Path("runs/params_checked.txt")  # check_params' constant output (orders stages)
RAW_DIR = Path("data/raw")  # download cache (not a DVC out: a rerun must not download again)
PREPARED_DIR = Path("data/prepared")  # uint8 images + labels + classes + mean/std
DATA_METRICS = Path("metrics/data.json")

LR_FIND_METRICS = Path("metrics/lr_find.json")  # max_lr + every method's suggestion
LR_FIND_CURVE = Path("metrics/lr_find_curve.csv")  # lr, loss, smooth_loss per step
LR_FIND_GRID = Path("metrics/lr_find_grid.csv")  # the momentum/weight-decay grids' sweeps
LR_FIND_RUN = Path("runs/lr_find.json")  # MLflow run of the sweep (train links to it)

MODEL = Path("models/model.pt")  # weights only
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_HISTORY = Path("metrics/train_history.csv")  # per epoch
TRAIN_SCHEDULE = Path("metrics/train_schedule.csv")  # lr and momentum per step taken
TRAIN_RUN = Path("runs/train.json")  # MLflow run that made MODEL (evaluate and plots log to it)
RESUME_STATE = Path("models/train.resume.pt")  # interrupted training; not a DVC out

EVAL_METRICS = Path("metrics/eval.json")
PREDICTIONS = Path("metrics/predictions.csv")  # actual, predicted, confidence per test image

PLOTS_DIR = Path("plots")  # the plots stage's out: every figure below and the report
FIGURES = {  # built once each, by the plots stage
    name: PLOTS_DIR / f"{name}.png"
    for name in (
        "lr_find",
        "history",
        "schedule",
        "confusion_matrix",
        "per_class_accuracy",
        "misclassified",
        "augmented",
    )
}
GRID_FIGURES = {  # drawn only when the grid ran (lr_find.momentum_grid, weight_decay_grid)
    name: PLOTS_DIR / f"lr_find_{name}.png" for name in ("momentum", "weight_decay")
}
REPORT = PLOTS_DIR / "report.md"

BENCH = Path("metrics/bench.json")  # make bench (not a pipeline output)

MLFLOW_DB = Path("mlflow.db")
MLFLOW_LOCK = Path("mlflow.db.lock")  # held while a process opens (and maybe creates) the store
MLFLOW_ARTIFACTS = Path("mlartifacts")


def outputs() -> list[Path]:
    """Every path above (the folders their temporary files are written in are their parents)."""
    found: list[Path] = []
    for value in list(globals().values()):
        found += [
            p
            for p in (value.values() if isinstance(value, dict) else [value])
            if isinstance(p, Path)
        ]
    return found
