"""A progress bar that counts work in samples and stays out of the way.

A bar is only worth drawing for a run long enough to watch, on a terminal: tqdm's `delay`
keeps it hidden for the first seconds (a 50 ms run prints nothing), and `disable=None`
turns it off when stderr is not a terminal (logs, pipes, CI). It counts samples (for
integrated gradients, sample-steps), so the bar moves in proportion to the work done.
"""
from __future__ import annotations

import sys

#: seconds a run must last before its bar appears
DELAY_S = 1.0


class Progress:
    """`update(k)` after k units of work; a no-op when not enabled."""

    def __init__(self, total: int, desc: str, unit: str = "sample", enabled: bool = True,
                 delay: float | None = None, file=None):
        self._bar = None
        if enabled and total > 0:
            from tqdm.auto import tqdm  # noqa: PLC0415 - imported only when a bar may show

            self._bar = tqdm(total=total, desc=desc, unit=unit, delay=DELAY_S if delay is None else delay,
                             file=file if file is not None else sys.stderr,
                             disable=None, dynamic_ncols=True)

    def update(self, k: int) -> None:
        if self._bar is not None:
            self._bar.update(k)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
