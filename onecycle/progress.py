"""Progress bars and the lines printed beside them (tqdm): what a person watches, never an output."""

from __future__ import annotations

import os
import time

from tqdm import tqdm

from onecycle.redact import redact

LONG_RUN_SECONDS = 3600  # a run projected past this is worth a word in its first minute
HINT_AFTER_SECONDS = 20  # enough steps to project from


def bar(total: int, desc: str, unit: str = "batch", initial: int = 0) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        mininterval=1.0,
        disable=quiet(),
    )


def say(message: str) -> None:
    """Print a line without breaking an open bar; a URL's password or signed query hidden."""
    if not quiet():
        tqdm.write(redact(message))


def quiet() -> bool:
    """In a data-parallel rank other than 0 (torchrun sets RANK): nothing on screen, so one bar
    and one set of lines show, rank 0's."""
    return "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("RANK", "0") != "0"


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def long_run_hint(done: int, left: int, seconds: float, device: str) -> str | None:
    """What to say when ``left`` more steps at the pace of ``done`` in ``seconds`` take hours."""
    if done <= 0 or seconds <= 0:
        return None
    eta = left * seconds / done
    if eta < LONG_RUN_SECONDS:
        return None
    return (
        f"at this pace the whole run takes about {duration(eta)} more on this {device}. For a "
        "look in minutes: `make quick` (width 16, 5 epochs on CPU); the full recipe is meant "
        "for a GPU."
    )


class RunBar:
    """One bar over every step of a training run, so its ETA is the whole stage's, not an
    epoch's; if the run looks like hours, it says so (and what to run instead) early on."""

    def __init__(self, total: int, initial: int, device: str):
        self.tqdm = bar(total, "train", initial=initial)
        self.device, self.start, self.t0, self.hinted = device, initial, time.monotonic(), False

    def __enter__(self) -> RunBar:
        return self

    def __exit__(self, *exc) -> None:
        self.tqdm.close()

    def update(self) -> None:
        self.tqdm.update()

    def show(self, epoch: int, epochs: int, loss: float, lr: float) -> None:
        self.tqdm.set_description(f"train epoch {epoch + 1}/{epochs}", refresh=False)
        self.tqdm.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", refresh=False)
        elapsed = time.monotonic() - self.t0
        if not self.hinted and elapsed >= HINT_AFTER_SECONDS:
            self.hinted = True
            done = self.tqdm.n - self.start
            hint = long_run_hint(done, self.tqdm.total - self.tqdm.n, elapsed, self.device)
            if hint:
                say(f"train: {hint}")
