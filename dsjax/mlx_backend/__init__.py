"""The MLX backend: the same model and params tree in MLX (Apple silicon; `mlx[cpu]` on Linux)."""

from __future__ import annotations

import functools
import logging
import platform


class MLXUnavailable(RuntimeError):
    pass


def require_mlx():
    """Import mlx.core, or fail with the install command."""
    try:
        import mlx.core as mx
    except ImportError:
        raise MLXUnavailable(
            "--backend mlx needs MLX, which is not installed: run `uv sync --extra mlx` "
            "(mlx on Apple silicon, mlx[cpu] on Linux)"
        ) from None
    return mx


@functools.cache
def note_linux_speed() -> None:
    """Once per process, when MLX work starts (after every check): mlx[cpu] on Linux is correct (tested
    against JAX) but far slower than JAX there."""
    if platform.system() == "Linux":
        logging.getLogger(__name__).warning(
            "--backend mlx on Linux runs MLX's CPU build, kept for the tests: expect it tens of times slower than JAX "
            "on this machine (MLX is fast on Apple silicon)"
        )
