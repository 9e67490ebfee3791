"""Graceful stop on SIGTERM/SIGINT: the loop finishes its step, checkpoints and exits.

This is how Modal (and most schedulers) preempt: SIGTERM, a grace period, then
SIGKILL. A second SIGINT (Ctrl-C twice) interrupts at once, if it comes at least
REPEAT_WINDOW_SEC after the first: one Ctrl-C can arrive twice, because the terminal
signals the whole process group and a wrapper such as `uv run` forwards its own copy
to us as well; taking that copy for a second press would abandon the checkpoint the
first one asked for.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

REPEAT_WINDOW_SEC = 1.0

# When the CLI's own SIGINT handler last took a Ctrl-C (process-wide, as signals are). The training
# loop checks it before it starts, in case a KeyboardInterrupt was swallowed on the way.
_interrupted_at: float | None = None
_deferring = False
_redelivering = False
REDELIVER_AFTER_SEC = 0.05


def _same_press(first_at: float | None, now: float) -> bool:
    """A SIGINT this soon after the first is that Ctrl-C again (the terminal's copy and `uv run`'s)."""
    return first_at is not None and now - first_at < REPEAT_WINDOW_SEC


def _in_gc_callback(frame) -> bool:
    """A KeyboardInterrupt raised in a garbage-collection callback (JAX registers one) is printed as
    'Exception ignored' with a traceback, and lost."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks:
            return True
        frame = frame.f_back
    return False


def _interrupt(signum, frame):
    global _interrupted_at, _redelivering
    now = time.monotonic()
    if _redelivering:
        _redelivering = False  # our own second delivery, below
    elif _same_press(_interrupted_at, now):
        return  # the same Ctrl-C, forwarded again by a wrapper such as `uv run`
    _interrupted_at = now
    if _deferring:
        return
    if _in_gc_callback(frame):
        _redelivering = True  # raise it again once the collection is over
        threading.Timer(REDELIVER_AFTER_SEC, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
    raise KeyboardInterrupt


def install_interrupt_handler():
    """Ctrl-C before training: KeyboardInterrupt at once, remembered (see above). Returns the handler it replaced."""
    global _interrupted_at, _redelivering
    _interrupted_at, _redelivering = None, False
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, _interrupt)


def restore_interrupt_handler(previous) -> None:
    """Put back the handler install_interrupt_handler replaced, and forget its record."""
    global _interrupted_at
    _interrupted_at = None
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, previous)


class deferred_interrupts:
    """Record a Ctrl-C without raising inside the block (a KeyboardInterrupt inside a C++ extension's
    import can abort the process); raise it when the block ends."""

    def __enter__(self):
        global _deferring
        _deferring = True

    def __exit__(self, *exc):
        global _deferring
        _deferring = False
        if _interrupted_at is not None and exc[0] is None:
            raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """A Ctrl-C since install_interrupt_handler whose KeyboardInterrupt was swallowed: raise it now."""
    if _interrupted_at is not None:
        raise KeyboardInterrupt


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
        elif signum == signal.SIGINT and not _same_press(self._first_at, now):
            raise KeyboardInterrupt  # a second Ctrl-C: stop now

    def __enter__(self) -> "GracefulStop":
        raise_if_interrupted()  # a Ctrl-C during start-up that something swallowed
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
