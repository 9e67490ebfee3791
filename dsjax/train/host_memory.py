"""Reuse the CPU step's memory instead of taking fresh pages from the kernel every step.

XLA:CPU allocates each run of a compiled program's temporaries as one malloc block
(nano's train step: 362 MiB) and frees it when the run ends. glibc serves a block that
large with mmap and returns it with munmap, so every step touched fresh pages: about
92,700 minor page faults and 190 ms of system time per step on the 2-core CPU, a fifth
of the step's CPU time (BENCHMARKS.md).

`keep_freed_host_memory` makes the block come back from malloc's heap instead:
- mallopt(M_MMAP_MAX, 0): no mmap'd blocks, and mallopt(M_TRIM_THRESHOLD, max): freed
  memory at the heap's top stays in the process;
- JAX's synchronous CPU dispatch (`jax_cpu_enable_async_dispatch` off): one-device
  programs run on the calling (main) thread, whose heap follows those settings. With async dispatch
  they run on a worker thread, and glibc gives a worker's arena blocks over 64 MiB by
  mmap whatever the settings; making every thread share one arena (M_ARENA_MAX 1)
  fixed that too, but slowed compiles by 1.5-2.5 s.
Then nano's step takes no page faults, and no system time for them. Resident memory stays
at the run's high-water mark, as with any allocator that keeps freed memory. It must run
before JAX starts its CPU backend: `dsjax run` and `dsjax bench` call it before any work
(`generate` and `eval` do not: their small decode calls were slower with synchronous
dispatch). It changes only how the CPU backend dispatches (a GPU's programs stay
asynchronous). DSJAX_MALLOC=system leaves glibc and JAX at their defaults (`keep`, the
default, is the above); other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "DSJAX_MALLOC"
KEEP, SYSTEM = "keep", "system"

# mallopt(3) parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_INT_MAX = 2**31 - 1

_kept_in_this_process = False  # a process-wide malloc setting, recorded for `dsjax bench`'s rows


def kept() -> bool:
    """Whether `keep_freed_host_memory` took effect in this process."""
    return _kept_in_this_process


def _choice() -> str:
    return os.environ.get(ENV, "").strip().lower() or KEEP


def env_error() -> str | None:
    """One line when DSJAX_MALLOC holds something other than keep or system, else None."""
    if _choice() in (KEEP, SYSTEM):
        return None
    return f"{ENV}={os.environ[ENV]!r} is not one of {KEEP} (the default), {SYSTEM}"


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is Linux's glibc (the only one whose options this sets), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: other C libraries have other options
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_host_memory() -> bool:
    """Keep the CPU step's freed memory for the next step (glibc); returns whether it was set."""
    libc = glibc()
    if _choice() != KEEP or libc is None:
        return False
    if not all(libc.mallopt(option, value) == 1 for option, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX))):
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    global _kept_in_this_process
    _kept_in_this_process = True
    return True
