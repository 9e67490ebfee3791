"""Progress bars and console output (rich), shared by data prep, training and generation."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# soft_wrap: lines written to a file or pipe keep their length instead of wrapping at 80 columns
console = Console(stderr=True, soft_wrap=True)


class _StderrHandler(logging.StreamHandler):
    """Plain log lines to whatever sys.stderr is when a record is written (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbose: bool = False) -> None:
    """LOG_LEVEL (DEBUG/INFO/WARNING) sets detail; --verbose means DEBUG.

    In a terminal, rich's handler (time and level columns, wrapped to the window);
    to a file or pipe, one unwrapped line per record, so logs grep and diff cleanly.
    """
    level = "DEBUG" if verbose else os.environ.get("LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        level = "INFO"
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    for noisy in ("absl", "jax._src", "orbax", "etils"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None, unit: str = "") -> Iterator[Callable[[int], None]]:
    """Yields advance(n); a byte counter when unit == 'B'."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn()]
    columns.append(DownloadColumn() if unit == "B" else MofNCompleteColumn())
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    # bars are for terminals: in a file or pipe they would only add lines (logs carry the numbers)
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


class StepClock:
    """The recent training step rate, for an ETA that leaves out compilation, evals and checkpoint saves.

    The loop calls `step_done()` as each step finishes (in loop order, no metrics
    fetched) and `restart()` after anything that is not a train step. The first
    step after a (re)start is not timed: it carries compilation or the pause.
    """

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter):
        self._durations: collections.deque[float] = collections.deque(maxlen=window)
        self._clock = clock
        self._last: float | None = None

    def step_done(self) -> None:
        now = self._clock()
        if self._last is not None:
            self._durations.append(now - self._last)
        self._last = now

    def restart(self) -> None:
        """Time the next step from now (after an eval or a save)."""
        self._last = self._clock()

    def seconds_per_step(self) -> float | None:
        return sum(self._durations) / len(self._durations) if self._durations else None

    def eta(self, steps_left: int) -> str:
        rate = self.seconds_per_step()
        if steps_left <= 0:
            return "0:00:00"
        if rate is None:
            return "-:--:--"
        seconds = int(round(rate * max(steps_left, 0)))
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class EtaColumn(ProgressColumn):
    """The task's `eta` field (from StepClock) when the loop supplies one, else rich's own estimate."""

    def __init__(self):
        super().__init__()
        self._fallback = TimeRemainingColumn()

    def render(self, task) -> Text:
        eta = task.fields.get("eta")
        if eta is None:
            return self._fallback.render(task)
        return Text(str(eta), style="progress.remaining")


def training_progress() -> Progress:
    return Progress(
        TextColumn("[bold]step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        EtaColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
