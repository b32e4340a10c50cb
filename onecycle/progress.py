"""Progress bars and the lines printed beside them (tqdm): what a person watches, never an output."""

from __future__ import annotations

from tqdm import tqdm


def bar(total: int, desc: str, unit: str = "batch", initial: int = 0) -> tqdm:
    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0
    )


def say(message: str) -> None:
    """Print a line without breaking an open bar."""
    tqdm.write(message)
