"""``make bench``: the training step's speed against a bare loop, side by side in one process.

* bare: the same model, batch and optimizer step on already-normalized batches already on the
  device, no augmentation: forward, backward and the SGD step only;
* pipeline: the project's real training loop (``loop.train_epoch``: the batch stream with
  its augmentation backend, the schedule, the sums and the progress bar) over as many steps;
* each augmentation backend alone.

The two loops alternate (bare, pipeline, bare, ...); the ratio is the median of each repeat's
pipeline/bare pair, so drift in the machine's speed hits both sides of a pair alike. Writes ``metrics/bench.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from onecycle import paths, progress
from onecycle.config import AugmentConfig, ModelConfig, TrainConfig
from onecycle.data.prepared import Prepared
from onecycle.files import write_json
from onecycle.tracking import provenance
from onecycle.training import batches, loop, torch_augment
from onecycle.training.augment import AugmentedBatches, train_transform
from onecycle.training.plan import make_plan
from onecycle.training.runtime import (
    build_model,
    build_optimizer,
    make_scaler,
    select_device,
    train_step,
)
from onecycle.training.session import build_session, use_compile

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's, for the data


def _data(images: int, seed: int = 0) -> Prepared:
    """Random uint8 images: the speed of a step does not depend on what they show."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, images).astype(np.int64)
    classes = [str(i) for i in range(10)]
    meta = {"fingerprint": "bench"}
    return Prepared(x, y, x[:256], y[:256], classes, MEAN, STD, meta)


def _timed(fn, steps: int, batch: int, dev) -> float:
    """Images per second of ``fn()`` (which runs ``steps`` steps), synchronized on a GPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def _bare(model_cfg: ModelConfig, cfg: TrainConfig, dev, steps: int):
    model = build_model(model_cfg, 10, dev)
    forward = torch.compile(model) if use_compile(cfg.compile, dev) else model
    optimizer = build_optimizer(
        model.parameters(), 0.05, cfg.max_momentum, cfg.nesterov, cfg.weight_decay
    )
    scaler = make_scaler(dev)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(steps, cfg.batch_size, 3, 32, 32, generator=gen)
    xs = [x.to(dev.device).contiguous(memory_format=torch.channels_last) for x in xs]
    ys = [torch.randint(0, 10, (cfg.batch_size,), generator=gen).to(dev.device) for _ in xs]

    def run():
        for x, y in zip(xs, ys, strict=True):
            train_step(forward, optimizer, scaler, x, y, dev)

    first = steps * cfg.batch_size / _timed(run, steps, cfg.batch_size, dev)  # the warm-up:
    return run, first  # first-call allocations, kernel choices and, if on, compilation


def _pipeline(model_cfg: ModelConfig, cfg: TrainConfig, dev, steps: int):
    """One epoch of ``steps`` batches of the real loop per call (a new epoch each time)."""
    data = _data(steps * cfg.batch_size)
    session = build_session(model_cfg, cfg, data, dev, seed=0, momentum=cfg.max_momentum)
    plan = make_plan(cfg.model_copy(update={"epochs": 1000}), 0.05, session, data)
    epochs = iter(range(1000))

    def run():
        with progress.RunBar(steps, 0, dev.type) as bar:
            totals, stop, hooks = loop.Totals(), loop.Stop(), loop.Hooks()
            loop.train_epoch(session, plan, next(epochs), 0, totals, stop, hooks, bar)

    first = steps * cfg.batch_size / _timed(run, steps, cfg.batch_size, dev)  # with compilation
    return run, first


def _augment_rates(aug: AugmentConfig, batch: int, dev, batches_: int = 8) -> dict[str, float]:
    x = _data(batch * batches_).x_train
    rates = {}
    transform = train_transform(aug, 32, MEAN, STD)
    per_image = AugmentedBatches(x, np.zeros(len(x), np.int64), batch, transform, 0)
    per_image[(0, 0)]
    t0 = time.perf_counter()
    for b in range(batches_):
        per_image[(0, b)]
    rates["albumentations"] = batch * batches_ / (time.perf_counter() - t0)
    xt = torch_augment.pack(torch.from_numpy(x)).to(dev.device)

    def torch_backend():
        for b in range(batches_):
            torch_augment.augment_batch(xt[b * batch : (b + 1) * batch], aug, MEAN, STD, 0, 0, b)

    torch_backend()
    rates["torch"] = _timed(torch_backend, batches_, batch, dev)
    return rates


def run(
    width: int, batch: int, steps: int, repeats: int, backend: str, device: str, compile_: str
) -> dict:
    dev = select_device(device, 0)
    model_cfg = ModelConfig(width=width)
    aug = AugmentConfig(backend=backend)
    compiled = compile_ if compile_ == "auto" else compile_ == "true"
    cfg = TrainConfig(batch_size=batch, max_lr=0.05, augment=aug, compile=compiled)
    bare, first_seconds = _bare(model_cfg, cfg, dev, steps)  # compiles first (if on)
    pipeline, _ = _pipeline(model_cfg, cfg, dev, steps)
    bare_rates, pipe_rates = [], []
    for _ in range(repeats):
        bare_rates.append(_timed(bare, steps, batch, dev))
        pipe_rates.append(_timed(pipeline, steps, batch, dev))
    bare_ips, pipe_ips = statistics.median(bare_rates), statistics.median(pipe_rates)
    return {
        "device": str(dev.device),
        "device_name": torch.cuda.get_device_name()
        if dev.type == "cuda"
        else provenance.cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "width": width,
        "batch_size": batch,
        "steps": steps,
        "repeats": repeats,
        "backend": batches.resolve_backend(backend),
        "compile": use_compile(cfg.compile, dev),
        # the first bare call's extra time over a steady one: torch.compile's cost, if on
        "first_call_extra_seconds": first_seconds - steps * batch / bare_ips,
        "bare_img_per_s": bare_ips,
        "pipeline_img_per_s": pipe_ips,
        # each repeat's pipeline against the bare loop timed just before it, then the median:
        # a 2-core VM's speed drifts by 20% within a minute, which a ratio of medians takes in
        "ratio": statistics.median(p / b for p, b in zip(pipe_rates, bare_rates, strict=True)),
        "bare_runs": bare_rates,
        "pipeline_runs": pipe_rates,
        "augment_img_per_s": _augment_rates(aug, batch, dev),
    }


def table(r: dict) -> str:
    aug = r["augment_img_per_s"]
    rows = [
        ("bare loop (model + SGD only)", f"{r['bare_img_per_s']:,.0f}"),
        (f"pipeline ({r['backend']} backend)", f"{r['pipeline_img_per_s']:,.0f}"),
        ("ratio pipeline / bare", f"{r['ratio']:.3f}  "),
        ("augmentation alone, albumentations", f"{aug['albumentations']:,.0f}"),
        ("augmentation alone, torch", f"{aug['torch']:,.0f}"),
    ]
    if r["compile"]:
        rows.append(
            ("torch.compile, seconds on the first call", f"{r['first_call_extra_seconds']:.1f}")
        )
    head = f"{r['device']} ({r['device_name']}), width {r['width']}, batch {r['batch_size']}"
    lines = [
        f"  {name:<38} {value:>10}{'' if name.startswith(('ratio', 'torch.compile')) else ' img/s'}"
        for name, value in rows
    ]
    return head + "\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--width", type=int, help="default: 16 on a CPU, 64 (the recipe) on a GPU")
    ap.add_argument("--batch", type=int, help="default: 256 on a CPU, 512 on a GPU")
    ap.add_argument("--steps", type=int, help="timed steps per repeat (default 20 CPU, 50 GPU)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backend", default="auto", choices=["auto", "albumentations", "torch"])
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    args = ap.parse_args()
    gpu = select_device(args.device, 0).type == "cuda"
    result = run(
        args.width or (64 if gpu else 16),
        args.batch or (512 if gpu else 256),
        args.steps or (50 if gpu else 20),
        args.repeats,
        args.backend,
        args.device,
        args.compile,
    )
    write_json(paths.BENCH, result)
    print(table(result))
    print(f"written to {paths.BENCH}")


if __name__ == "__main__":
    main()
