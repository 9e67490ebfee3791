"""Device-synchronised timing shared by the GPU benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax


def median_ms(fn, sets, reps: int, budget_s: float) -> float:
    """Median ms of device-synchronised calls after two warm-ups (compile included in the first),
    cycling over the input `sets` so repeated calls do not time a warm cache."""
    for i in range(2):
        jax.block_until_ready(fn(*sets[i % len(sets)]))
    times, start = [], time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        args = sets[len(times) % len(sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
