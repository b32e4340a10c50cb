"""Data-parallel training over ``base.devices`` processes: PyTorch DDP, launched by torchrun.

The stage stays the entry point (``dvc repro``): with ``base.devices: N > 1`` its process starts
``torchrun --standalone --nproc-per-node N -m stages.<stage>`` and waits; each of the N ranks
then runs the stage's ``main`` again, joins the process group (NCCL on GPUs, gloo on the CPU) and
trains its share. What holds across ranks:

* the global batch stays ``train.batch_size``: every rank takes a disjoint ``1/N`` slice of each
  batch of the epoch's permutation, with the augmentation draws the single process would use for
  those images, so the schedule, the LR and the images seen mean the same as with one process;
* BatchNorm is plain (not synchronized): each rank normalizes over its own slice, as torchvision's
  reference scripts do without ``--sync-bn``; DDP broadcasts rank 0's running statistics at each
  step, and rank 0's model is the one saved;
* rank 0 alone writes outputs, the resume state and the MLflow run;
* a SIGINT/SIGTERM on any rank stops every rank at the same step (the stop flag is all-reduced
  where the loss is), rank 0 saves the resume state, and the next ``dvc repro`` continues.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from onecycle.config import ConfigError, Params
from onecycle.errors import UserError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: rank ``rank`` of ``world`` (1 = no group)."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's part of a batch of ``n`` (``n`` divisible by ``world``)."""
        part = n // self.world
        return slice(self.rank * part, (self.rank + 1) * part)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (the value itself with one process)."""
        if self.world == 1:
            return float(value)
        t = value.detach().double().reshape(1).clone()
        dist.all_reduce(t)
        return float(t) / self.world

    def main_value(self, value: torch.Tensor) -> float:
        """Rank 0's value of a scalar, on every rank."""
        if self.world == 1:
            return float(value)
        t = value.detach().double().reshape(1).clone()
        dist.broadcast(t, src=0)
        return float(t)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is True on any."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


ONE = Ranks()  # one process, no group


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


class LaunchFailed(UserError):
    """A rank failed; torchrun and the ranks said why above."""


def launch(params: Params, module: str) -> bool:
    """In the stage's own process with ``base.devices > 1``: run the stage as ``devices`` ranks
    under torchrun and wait (True; the caller returns). False where there is nothing to launch.

    torchrun runs in a session of its own, so a Ctrl-C in the terminal reaches only this process,
    which passes one SIGTERM on: torchrun hands it to every rank and waits for them to save."""
    devices = params.base.devices
    if devices == 1 or under_torchrun():
        return False
    check(params)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={devices}", "-m", module]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    passed_on = False

    def pass_on(signum, frame):
        nonlocal passed_on
        if not passed_on:
            passed_on = True
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if passed_on:
        raise KeyboardInterrupt("the ranks were stopped")
    if rc != 0:
        raise LaunchFailed(
            f"{module} over base.devices={devices} processes failed (torchrun exit {rc}); the "
            "ranks' errors are above"
        )
    return True


def check(params: Params) -> None:
    """What data-parallel training needs, with the key to change when it is missing."""
    devices, batch = params.base.devices, params.train.batch_size
    if batch % devices:
        raise ConfigError(
            f"params.yaml: train.batch_size={batch} must split evenly over base.devices="
            f"{devices} (the global batch is shared out); pick a multiple of {devices}"
        )
    if params.train.augment.backend == "albumentations":
        raise ConfigError(
            "params.yaml: base.devices > 1 needs train.augment.backend torch (or auto); the "
            "albumentations backend has no per-rank sharding"
        )
    if params.base.device == "mps":
        raise ConfigError("params.yaml: base.devices > 1 is not supported on mps; use cuda or cpu")
    if torch.cuda.is_available() and params.base.device in ("auto", "cuda"):
        have = torch.cuda.device_count()
        if devices > have:
            raise ConfigError(
                f"params.yaml: base.devices={devices} but this machine has {have} CUDA device(s)"
            )
    elif params.base.device in ("auto", "cpu"):
        # each rank is a process of its own: more than the cores only thrash (64 ranks on a
        # 2-core machine reached 8.5 GB in 13 s)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if devices > (cores or 1):
            raise ConfigError(
                f"params.yaml: base.devices={devices} ranks on the CPU, but this machine gives "
                f"this process {cores} core(s): set base.devices to {cores or 1} or less"
            )


def init(dev) -> tuple[object, Ranks]:
    """In a rank: join the process group (NCCL on CUDA, gloo otherwise); returns the device this
    rank trains on (its own GPU) and the ranks. With one process, ``dev`` and one rank."""
    if not under_torchrun():
        return dev, ONE
    ranks = Ranks(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    )
    if dev.type == "cuda":
        torch.cuda.set_device(ranks.local)
        dev = type(dev)(torch.device("cuda", ranks.local), dev.amp_dtype, dev.num_workers)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev, ranks


def setup_stage(params: Params, module: str, setup) -> tuple[object, Ranks] | None:
    """The start of a stage that trains: its device and ranks, or None when this process only
    launched the ranks (and they are done). ``setup`` (the MLflow check) runs before any work,
    once: in the launching process, or in rank 0."""
    from onecycle.training.runtime import select_device

    dev = select_device(params.base.device, params.base.num_workers)
    if not under_torchrun():
        setup()
        if launch(params, module):
            return None
        return dev, ONE
    dev, ranks = init(dev)
    if ranks.is_main:
        setup()
    return dev, ranks


def wrap(model: torch.nn.Module, dev, ranks: Ranks) -> torch.nn.Module:
    """The module that trains: ``model`` under DDP over ``ranks``, else ``model`` itself."""
    if ranks.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dev.device.index] if dev.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shutdown() -> None:
    """Leave the process group (at the end of a rank's stage)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
