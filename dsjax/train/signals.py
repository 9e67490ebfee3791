"""Graceful stop on SIGTERM/SIGINT: the loop finishes its step, checkpoints and exits.

This is how Modal (and most schedulers) preempt: SIGTERM, a grace period, then
SIGKILL. A second SIGINT (Ctrl-C twice) interrupts at once, if it comes at least
REPEAT_WINDOW_SEC after the first: one Ctrl-C can arrive twice, because the terminal
signals the whole process group and a wrapper such as `uv run` forwards its own copy
to us as well; taking that copy for a second press would abandon the checkpoint the
first one asked for.
"""

from __future__ import annotations

import signal
import threading
import time

REPEAT_WINDOW_SEC = 1.0


class StopRequested(RuntimeError):
    """Raised by the loop after it saved a checkpoint in answer to a signal."""

    def __init__(self, signal_name: str, exit_code: int, message: str):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = exit_code


class GracefulStop:
    """Context manager that records SIGTERM/SIGINT instead of dying mid-step."""

    def __init__(self, clock=time.monotonic):
        self.signal_number: int | None = None
        self._first_at: float | None = None
        self._clock = clock
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    def _handle(self, signum, frame):
        now = self._clock()
        if self.signal_number is None:
            self.signal_number, self._first_at = signum, now
        elif signum == signal.SIGINT and now - self._first_at >= REPEAT_WINDOW_SEC:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
