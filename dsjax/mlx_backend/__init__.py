"""The MLX backend: the same model and params tree in MLX (Apple silicon; `mlx[cpu]` on Linux)."""

from __future__ import annotations


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
