"""Where the training loop's host time goes per step, so a run can say what bounds it."""

from __future__ import annotations

import time
from typing import Callable

# what the loop does each step, in order ("metrics": summing each step's on the device, and fetching
# the sums at log, eval and checkpoint steps)
PARTS = {
    "data": "data",
    "call": "step call",
    "waiting": "waiting for the device",
    "metrics": "metrics",
}


class HostLoopTimer:
    """Milliseconds per step the loop spends on each part, averaged over the steps timed.

    The loop keeps one step queued behind the running one, so when the device bounds the
    run most of each step is spent waiting for it; when data or the step call take most of
    it, the host bounds the run and a faster device would not speed it up. (On CPU the
    call runs the step itself, so the call is most of the step.)
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._seconds = dict.fromkeys(PARTS, 0.0)
        self._steps = 0
        self._last = 0.0

    def start(self) -> None:
        self._last = self._clock()

    def lap(self, part: str, counted: bool = True) -> None:
        """Time since the last start or lap goes to `part` (left out when not `counted`: a compile, say)."""
        now = self._clock()
        if counted:
            self._seconds[part] += now - self._last
        self._last = now

    def step_timed(self) -> None:
        self._steps += 1

    @property
    def steps(self) -> int:
        return self._steps

    def ms_per_step(self) -> dict[str, float]:
        steps = max(self._steps, 1)
        return {part: round(1e3 * seconds / steps, 3) for part, seconds in self._seconds.items()}

    def describe(self) -> str:
        parts = ", ".join(f"{PARTS[p]} {ms:.2f}" for p, ms in self.ms_per_step().items())
        return f"host loop, ms per step over {self._steps} steps after the first: {parts}"
