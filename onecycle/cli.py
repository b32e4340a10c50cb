"""The stage runner: a user error prints one clear message and exits 1, without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .errors import UserError


def run(main: Callable[[], None], stage: str) -> None:
    try:
        main()
    except KeyboardInterrupt:
        print(f"\n{stage}: interrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as exc:
        print(f"\n{stage}: error: {exc}", file=sys.stderr)
        sys.exit(1)
