"""Graceful stop on SIGTERM/SIGINT: the loop finishes its step, checkpoints and exits.

This is how Modal (and most schedulers) preempt: SIGTERM, a grace period, then
SIGKILL. A second SIGINT (Ctrl-C twice) interrupts at once.
"""

from __future__ import annotations

import signal
import threading


class StopRequested(RuntimeError):
    """Raised by the loop after it saved a checkpoint in answer to a signal."""

    def __init__(self, signal_name: str, exit_code: int, message: str):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = exit_code


class GracefulStop:
    """Context manager that records SIGTERM/SIGINT instead of dying mid-step."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    def _handle(self, signum, frame):
        if self.signal_number is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal_number = signum

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
