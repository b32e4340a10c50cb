"""The training loop: 1cycle (or constant/step) stepped every batch, resumable after Ctrl-C/SIGTERM."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .augment import AugmentedBatches, batch_loader, normalize, train_transform
from .config import ModelConfig, TrainConfig
from .data import Prepared
from .engine import (
    Device,
    build_model,
    build_optimizer,
    make_scaler,
    predict,
    seed_everything,
    to_device,
    train_step,
)
from .schedule import build_scheduler


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; no checkpoint was written."""


class ResumeMismatch(RuntimeError):
    """A saved resume state belongs to a run with other settings."""


@dataclass
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    test_loss: float | None
    test_acc: float | None
    lr: float  # of the epoch's last step
    momentum: float
    epoch_seconds: float
    images_per_sec: float


@dataclass
class Result:
    model: torch.nn.Module
    history: list[EpochStats]
    schedule: list[tuple[int, float, float]]  # (step, lr, momentum) for every step taken
    resumed_from: tuple[int, int] | None  # (epoch, batch) the run continued from


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fresh_totals() -> dict:
    """Running sums of one epoch (saved with a mid-epoch resume state)."""
    return {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves its state after the current batch and stops."""

    def __init__(self):
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum, frame):
            if self.signum is not None:  # a second Ctrl-C: stop right now
                raise KeyboardInterrupt
            self.signum = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def resume_key(
    cfg: TrainConfig, model_cfg: ModelConfig, data: Prepared, seed: int, max_lr: float
) -> dict:
    """Everything that must match for a saved state to be continued."""
    return {
        **{f"train.{k}": v for k, v in cfg.model_dump().items() if k != "eval_every"},
        **{f"model.{k}": v for k, v in model_cfg.model_dump().items()},
        "base.seed": seed,
        "max_lr (used)": max_lr,
        "data (fingerprint of data/prepared)": data.meta.get("fingerprint"),
    }


def _check_resume(state: dict, key: dict, path: Path) -> None:
    saved = state.get("key", {})
    diff = [k for k in sorted(set(key) | set(saved)) if saved.get(k) != key.get(k)]
    if diff:
        lines = "\n".join(f"  {k}: saved {saved.get(k)!r}, now {key.get(k)!r}" for k in diff)
        raise ResumeMismatch(
            f"{path} holds an interrupted run with other settings:\n{lines}\n"
            f"Resuming would mix two runs. Restore those params to resume, or delete the file to "
            f"start over: rm {path}"
        )


def load_resume(path: Path, key: dict) -> dict | None:
    """The state an interrupted run left at ``path`` (None if there is none); refused if its
    settings differ from ``key``."""
    if not Path(path).exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ResumeMismatch(
            f"{path} is unreadable ({exc}); delete it to start over: rm {path}"
        ) from None
    _check_resume(state, key, path)
    return state


def fit(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    data: Prepared,
    dev: Device,
    seed: int,
    max_lr: float,
    state_path: Path,
    state: dict | None = None,
    extra: dict | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    stop_after_steps: int | None = None,
) -> Result:
    """Train from scratch, or continue ``state`` (from :func:`load_resume`).

    Ctrl-C or SIGTERM saves a resume state to ``state_path`` after the current batch, then raises
    KeyboardInterrupt; each finished epoch saves one too. ``extra`` is stored with every state
    (the stage keeps its MLflow run id there). ``stop_after_steps`` simulates Ctrl-C (for tests).
    """
    seed_everything(seed)
    key = resume_key(cfg, model_cfg, data, seed, max_lr)
    extra = extra or {}

    model = build_model(model_cfg, len(data.classes), dev)
    optimizer = build_optimizer(model, max_lr, cfg.max_momentum, cfg.nesterov, cfg.weight_decay)
    transform = train_transform(cfg.augment, data.x_train.shape[1], data.mean, data.std)
    batches = AugmentedBatches(data.x_train, data.y_train, cfg.batch_size, transform, seed)
    steps_per_epoch = len(batches)
    scheduler = build_scheduler(optimizer, cfg, max_lr, steps_per_epoch)
    scaler = make_scaler(dev)
    loader, sampler = batch_loader(batches, dev.num_workers, pin_memory=dev.type == "cuda")

    x_test = normalize(data.x_test, data.mean, data.std)
    y_test = torch.from_numpy(data.y_test)
    if dev.type == "cuda":  # the whole test split lives on the GPU
        x_test = x_test.to(dev.device).contiguous(memory_format=torch.channels_last)

    history: list[EpochStats] = []
    schedule: list[tuple[int, float, float]] = []
    start_epoch, start_batch, running, resumed = 0, 0, None, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_batch, running = state["epoch"], state["batch"], state["running"]
        history = [EpochStats(**h) for h in state["history"]]
        schedule = [tuple(s) for s in state["schedule"]]
        resumed = (start_epoch, start_batch)
        tqdm.write(f"resuming from {state_path}: epoch {start_epoch + 1}, batch {start_batch}")

    def save_state(epoch: int, batch: int, run: dict) -> None:
        atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "batch": batch,
                "running": run,
                "history": [asdict(h) for h in history],
                "schedule": schedule,
                "key": key,
                "extra": extra,
            },
            state_path,
        )

    stop = _StopFlag()
    model.train()
    with stop.installed():
        for epoch in range(start_epoch, cfg.epochs):
            run = running or _fresh_totals()
            running = None
            sampler.epoch, sampler.start = epoch, (start_batch if epoch == start_epoch else 0)
            bar = tqdm(
                total=steps_per_epoch,
                initial=sampler.start,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="batch",
                dynamic_ncols=True,
                mininterval=1.0,
            )
            t0 = time.perf_counter()
            for b, (x, y) in enumerate(loader, start=sampler.start):
                x, y = to_device(x, y, dev)
                group = optimizer.param_groups[0]
                lr, mom = float(group["lr"]), float(group["momentum"])
                loss, correct = train_step(model, optimizer, scaler, x, y, dev)
                loss_v = float(loss)
                step = epoch * steps_per_epoch + b
                if not math.isfinite(loss_v):
                    bar.close()
                    raise NonFiniteLoss(
                        f"loss became {loss_v} at epoch {epoch + 1}, step {step} (batch {b}) with LR {lr:.4g}; "
                        "no checkpoint written. Lower train.max_lr (or lr_find's choice) and rerun."
                    )
                scheduler.step()
                schedule.append((step, lr, mom))
                run["loss"] += loss_v * len(y)
                run["correct"] += int(correct)
                run["seen"] += len(y)
                bar.set_postfix(
                    loss=f"{run['loss'] / run['seen']:.3f}", lr=f"{lr:.3g}", refresh=False
                )
                bar.update()
                if (
                    stop_after_steps is not None
                    and len(schedule) >= stop_after_steps
                    and stop.signum is None
                ):
                    stop.signum = signal.SIGINT
                if stop.signum is not None:
                    bar.close()
                    run["seconds"] += time.perf_counter() - t0
                    save_state(epoch, b + 1, run)
                    tqdm.write(
                        f"interrupted: state saved to {state_path}; `dvc repro` resumes from it"
                    )
                    raise KeyboardInterrupt(f"signal {stop.signum}")
            bar.close()
            seconds = run["seconds"] + time.perf_counter() - t0
            last = epoch == cfg.epochs - 1
            test_loss = test_acc = None
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                logits = predict(model, x_test, dev)
                test_loss = float(F.cross_entropy(logits, y_test))
                test_acc = float((logits.argmax(1) == y_test).float().mean())
            _, last_lr, last_mom = schedule[-1]  # the last values a step used (the scheduler's
            # current value lies one step past the end, where linear annealing goes negative)
            stats = EpochStats(
                epoch=epoch + 1,
                train_loss=run["loss"] / run["seen"],
                train_acc=run["correct"] / run["seen"],
                test_loss=test_loss,
                test_acc=test_acc,
                lr=last_lr,
                momentum=last_mom,
                epoch_seconds=seconds,
                images_per_sec=run["seen"] / max(seconds, 1e-9),
            )
            history.append(stats)
            acc = f", test acc {test_acc:.4f}" if test_acc is not None else ""
            tqdm.write(
                f"epoch {epoch + 1}: train loss {stats.train_loss:.4f}, acc {stats.train_acc:.4f}{acc} ({seconds:.1f}s)"
            )
            if on_epoch:
                on_epoch(stats)
            if not last:
                save_state(epoch + 1, 0, _fresh_totals())
    return Result(model, history, schedule, resumed)


def save_weights(
    model: torch.nn.Module, model_cfg: ModelConfig, classes: list[str], path: Path
) -> None:
    """Weights plus the little needed to rebuild and check the model; loads with weights_only=True."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise NonFiniteLoss(f"weight {k} is not finite; refusing to write {path}")
    atomic_save(
        {
            "model": state,
            "config": {**model_cfg.model_dump(), "num_classes": len(classes)},
            "classes": list(classes),
        },
        path,
    )


def epoch_rows(history: list[EpochStats]) -> list[dict]:
    """Per-epoch rows as written to metrics/train_history.csv (None -> empty cell)."""
    return [{k: ("" if v is None else v) for k, v in asdict(h).items()} for h in history]


def schedule_rows(result: Result) -> list[dict]:
    """Every step taken, as written to metrics/train_schedule.csv."""
    per_epoch = len(result.schedule) // len(result.history)
    return [
        {"step": s, "epoch": s / per_epoch, "lr": lr, "momentum": m} for s, lr, m in result.schedule
    ]


def summary(result: Result, max_lr: float, lr_source: str) -> dict:
    """metrics/train.json: the final epoch and where the max LR came from."""
    last, h = result.history[-1], result.history
    return {
        "test_acc": last.test_acc,
        "test_loss": last.test_loss,
        "train_acc": last.train_acc,
        "train_loss": last.train_loss,
        "max_lr": max_lr,
        "max_lr_source": lr_source,
        "epochs": len(h),
        "train_seconds": sum(e.epoch_seconds for e in h),
        "images_per_sec": sum(e.images_per_sec for e in h) / len(h),
    }


def resolve_max_lr(
    setting: str | float, lr_find_metrics: dict | None, path: Path
) -> tuple[float, str]:
    """``train.max_lr``: a number is used as given; ``auto`` takes lr_find's ``max_lr``.

    Returns (value, where it came from: "params" or "lr_find").
    """
    from .config import ConfigError

    if setting != "auto":
        return float(setting), "params"
    if lr_find_metrics is None:
        raise ConfigError(
            f"train.max_lr is 'auto' but {path} does not exist: run the lr_find stage first "
            "(`dvc repro lr_find`) or set a number, e.g. `dvc exp run -S train.max_lr=0.05`"
        )
    value = lr_find_metrics.get("max_lr")
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{path}: max_lr is {value!r}, not a positive number; rerun `dvc repro lr_find`"
        )
    return float(value), "lr_find"
