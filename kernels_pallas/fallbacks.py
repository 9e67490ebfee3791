"""Which asked-for compute paths ran as another while a program was traced.

A kernel that cannot take a call (cuDNN on CPU, a dtype it lacks) runs the reference
instead and logs it once per process. `recorded()` lets a caller that labels results
(`dsjax bench`) see every fallback of the program it traces, logged before or not.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple


class Fallback(NamedTuple):
    part: str  # "attention" or "moe"
    asked: str  # the path asked for
    ran: str  # the path that ran (the same when only the way it ran differs, e.g. interpreted)
    reason: str

    def __str__(self) -> str:
        return f"{self.part} {self.asked} -> {self.ran}: {self.reason}"


_open: list[list[Fallback]] = []  # the lists of the `recorded()` blocks now open


@contextlib.contextmanager
def recorded():
    """Collect, while open, each distinct fallback traced."""
    seen: list[Fallback] = []
    _open.append(seen)
    try:
        yield seen
    finally:
        _open.remove(seen)


def note(part: str, asked: str, ran: str, reason: str) -> None:
    fallback = Fallback(part, asked, ran, reason)
    for seen in _open:
        if fallback not in seen:
            seen.append(fallback)
