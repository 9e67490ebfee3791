"""Which asked-for compute paths fell back to another while a program was traced.

A kernel that cannot take a call (cuDNN on CPU, a dtype it lacks) runs the reference
instead and logs it once per process. `recorded()` lets a caller that labels results
(`dsjax bench`) see every fallback of the program it traces, logged before or not.
"""

from __future__ import annotations

import contextlib

_open: list[list[str]] = []  # the lists of the `recorded()` blocks now open


@contextlib.contextmanager
def recorded():
    """Collect, while open, one line per fallback traced: "attention cudnn -> xla: cuDNN needs a GPU"."""
    seen: list[str] = []
    _open.append(seen)
    try:
        yield seen
    finally:
        _open.remove(seen)


def note(line: str) -> None:
    for seen in _open:
        if line not in seen:
            seen.append(line)
