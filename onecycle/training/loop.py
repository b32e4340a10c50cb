"""The training loop: a schedule stepped every batch, a test-set look each epoch, and a resume
state that lets an interrupted run continue bit for bit.

``fit`` is a short loop over ``train_epoch``. One interrupt mechanism: a :class:`Stop` flag that
SIGINT/SIGTERM set (and that anything else may set); the loop saves its state after the current
batch and raises KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from onecycle import progress
from onecycle.errors import UserError
from onecycle.training.checkpoint import ResumeFile
from onecycle.training.distributed import Ranks
from onecycle.training.plan import Plan
from onecycle.training.runtime import Device, predict
from onecycle.training.session import Session

SYNC_EVERY = 50  # steps between host syncs on a GPU (loss shown, NaN checked)


class NonFiniteLoss(UserError):
    """The loss became NaN or inf; no checkpoint was written."""


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
    val_loss: float | None = None  # the validation split (data.val_images), when there is one
    val_acc: float | None = None

    def metrics(self) -> dict[str, float | None]:
        """The epoch's numbers for MLflow, logged at step ``epoch``, named by the UI section they
        belong in (``train/loss``, ``test/accuracy``, ``schedule/lr``, ``speed/epoch_seconds``)."""
        return {MLFLOW_NAMES[k]: v for k, v in asdict(self).items() if k != "epoch"}


MLFLOW_NAMES = {  # EpochStats field -> MLflow metric (metrics/train_history.csv keeps the fields)
    "train_loss": "train/loss",
    "train_acc": "train/accuracy",
    "test_loss": "test/loss",
    "test_acc": "test/accuracy",
    "val_loss": "val/loss",
    "val_acc": "val/accuracy",
    "lr": "schedule/lr",
    "momentum": "schedule/momentum",
    "epoch_seconds": "speed/epoch_seconds",
    "images_per_sec": "speed/images_per_sec",
}


@dataclass
class Totals:
    """Running sums of one epoch (a mid-epoch resume state carries them)."""

    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


@dataclass
class Hooks:
    """Observers of the loop (the train stage logs each epoch to MLflow)."""

    on_step: Callable[[int], None] | None = None  # after each step: its 0-based global step
    on_epoch: Callable[[EpochStats], None] | None = None


@dataclass
class Result:
    model: torch.nn.Module
    history: list[EpochStats]
    resumed_from: tuple[int, int] | None  # (epoch, batch) the run continued from


@dataclass
class Stop:
    """Set by SIGINT/SIGTERM (or by a hook); the loop stops after the current batch."""

    signum: int | None = field(default=None)

    def request(self, signum: int = signal.SIGINT) -> None:
        self.signum = signum

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


def sync_every(dev: Device) -> int:
    """Steps between host syncs: every step on a CPU (free there), SYNC_EVERY on a GPU."""
    return 1 if dev.type == "cpu" else SYNC_EVERY


class _DeviceSums:
    """An epoch's running loss, correct count and first non-finite step, kept on the device so a
    step needs no host sync; :meth:`sync` moves them into ``totals`` (and raises on a NaN)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int, step: int) -> None:
        finite = torch.isfinite(loss)
        first = ~finite & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, loss.double(), self.bad_loss)
        self.loss += torch.where(finite, loss.double(), 0.0) * n
        self.correct += correct
        self.seen += n

    def sync(self, totals: Totals, plan: Plan, steps_per_epoch: int, ranks: Ranks) -> None:
        if ranks.world > 1:  # the sums over every rank's share of the batches
            import torch.distributed as dist

            dist.all_reduce(self.loss)
            dist.all_reduce(self.correct)
            dist.all_reduce(self.bad_step, op=dist.ReduceOp.MAX)
            dist.all_reduce(self.bad_loss, op=dist.ReduceOp.MAX)
            self.seen *= ranks.world
        bad_step = int(self.bad_step)
        if bad_step >= 0:
            epoch, batch = divmod(bad_step, steps_per_epoch)
            raise NonFiniteLoss(
                f"loss became {float(self.bad_loss)} at epoch {epoch + 1}, step {bad_step} (batch "
                f"{batch}) with LR {plan.schedule(bad_step)[0]:.4g}; no checkpoint written. "
                "Lower train.max_lr (or lr_find's choice) and rerun."
            )
        totals.loss += float(self.loss)
        totals.correct += int(self.correct)
        totals.seen += self.seen
        self.loss.zero_()
        self.correct.zero_()
        self.seen = 0


def train_epoch(
    session: Session,
    plan: Plan,
    epoch: int,
    first_batch: int,
    totals: Totals,
    stop: Stop,
    hooks: Hooks,
    bar: progress.RunBar,
) -> int:
    """Batches ``first_batch..`` of ``epoch``, each at its scheduled LR and momentum, summed into
    ``totals``. Returns the batch it stopped before: ``steps_per_epoch`` unless ``stop`` was set.

    The sums stay on the device between syncs (every step on a CPU, where a sync costs nothing;
    every ``SYNC_EVERY`` steps on a GPU); a NaN still names its first epoch, step and LR.
    """
    spe = session.steps_per_epoch
    every = sync_every(session.dev)
    sums = _DeviceSums(session.dev.device)
    next_batch = spe
    t0 = time.perf_counter()
    for b, x, y in session.epoch(epoch, first_batch):
        step = epoch * spe + b
        lr, momentum = plan.schedule(step)
        loss, correct = session.step(x, y, lr, momentum)
        sums.add(loss, correct, len(y), step)
        bar.update()
        if hooks.on_step:
            hooks.on_step(step)
        at_sync = (b + 1 - first_batch) % every == 0 or b == spe - 1
        stopping = stop.signum is not None
        if session.ranks.world > 1:  # every rank stops at the same step, or the others hang
            stopping = at_sync and session.ranks.any(stopping, session.dev.device)
        if stopping or at_sync:
            sums.sync(totals, plan, spe, session.ranks)
            bar.show(epoch, plan.epochs, totals.loss / max(totals.seen, 1), lr)
        if stopping:
            next_batch = b + 1
            break
    sums.sync(totals, plan, spe, session.ranks)
    totals.seconds += time.perf_counter() - t0
    return next_batch


def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dev: Device
) -> tuple[float, float]:
    """(loss, accuracy) on a normalized set; the model's train/eval mode is kept."""
    logits = predict(model, x, dev)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def _epoch_stats(session: Session, plan: Plan, epoch: int, totals: Totals) -> EpochStats:
    test_loss = test_acc = val_loss = val_acc = None
    if epoch == plan.epochs - 1 or (plan.eval_every and (epoch + 1) % plan.eval_every == 0):
        test_loss, test_acc = evaluate(session.model, plan.x_test, plan.y_test, session.dev)
        if plan.x_val is not None:
            val_loss, val_acc = evaluate(session.model, plan.x_val, plan.y_val, session.dev)
    lr, momentum = plan.schedule((epoch + 1) * session.steps_per_epoch - 1)  # its last step's
    return EpochStats(
        epoch=epoch + 1,
        train_loss=totals.loss / totals.seen,
        train_acc=totals.correct / totals.seen,
        test_loss=test_loss,
        test_acc=test_acc,
        lr=lr,
        momentum=momentum,
        epoch_seconds=totals.seconds,
        images_per_sec=totals.seen / max(totals.seconds, 1e-9),
        val_loss=val_loss,
        val_acc=val_acc,
    )


def _stopped(session: Session, stop: Stop) -> bool:
    """Whether a signal stopped the epoch: on any rank, agreed by all (one process: its flag)."""
    if session.ranks.world == 1:
        return stop.signum is not None
    return session.ranks.any(stop.signum is not None, session.dev.device)


def _state(session: Session, epoch: int, batch: int, totals: Totals, history) -> dict:
    return {
        **session.state_dict(),
        "epoch": epoch,
        "batch": batch,
        "totals": asdict(totals),
        "history": [asdict(h) for h in history],
    }


def fit(
    session: Session,
    plan: Plan,
    resume: ResumeFile,
    state: dict | None = None,
    hooks: Hooks | None = None,
    stop: Stop | None = None,
) -> Result:
    """Train from scratch, or continue ``state`` (from ``resume.load()``).

    Each finished epoch saves a resume state before the hooks see it; a set ``stop`` saves one
    after the current batch and raises KeyboardInterrupt.
    """
    hooks, stop = hooks or Hooks(), stop or Stop()
    history: list[EpochStats] = []
    first_epoch, first_batch, totals, resumed = 0, 0, Totals(), None
    if state is not None:
        session.load_state_dict(state)
        first_epoch, first_batch = state["epoch"], state["batch"]
        totals, resumed = Totals(**state["totals"]), (first_epoch, first_batch)
        history = [EpochStats(**h) for h in state["history"]]
        progress.say(f"resuming from {resume.path}: epoch {first_epoch + 1}, batch {first_batch}")
    session.model.train()
    spe = session.steps_per_epoch
    run_bar = progress.RunBar(plan.epochs * spe, first_epoch * spe + first_batch, session.dev.type)
    with stop.installed(), run_bar:
        for epoch in range(first_epoch, plan.epochs):
            if epoch > first_epoch:
                first_batch, totals = 0, Totals()
            batch = train_epoch(session, plan, epoch, first_batch, totals, stop, hooks, run_bar)
            if _stopped(session, stop):
                if session.ranks.is_main:
                    resume.save(_state(session, epoch, batch, totals, history))
                progress.say(f"interrupted: state saved to {resume.path}; `dvc repro` resumes")
                raise KeyboardInterrupt(f"signal {stop.signum}")
            stats = _epoch_stats(session, plan, epoch, totals)
            history.append(stats)
            if epoch + 1 < plan.epochs and session.ranks.is_main:
                resume.save(_state(session, epoch + 1, 0, Totals(), history))
            test = "" if stats.test_acc is None else f", test acc {stats.test_acc:.4f}"
            test += "" if stats.val_acc is None else f", val acc {stats.val_acc:.4f}"
            progress.say(
                f"epoch {stats.epoch}: train loss {stats.train_loss:.4f}, acc "
                f"{stats.train_acc:.4f}{test} ({stats.epoch_seconds:.1f}s)"
            )
            if hooks.on_epoch:
                hooks.on_epoch(stats)
    return Result(session.model, history, resumed)
