"""Rotary-embedding tables and DeepSeek's YaRN scaling, in NumPy: shared by the JAX model and the MLX port."""

from __future__ import annotations

import math

import numpy as np

from dsjax.config import ModelConfig, YarnConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_positions: int) -> float:
    return (dim * math.log(max_positions / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_inv_freq(c: ModelConfig) -> np.ndarray:
    """Inverse frequencies for the rope half of each head, YaRN-interpolated when configured."""
    dim, base = c.qk_rope_head_dim, c.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    extrapolated = 1.0 / (base**exponents)
    y: YarnConfig | None = c.rope_scaling
    if y is None or y.factor == 1.0:
        return extrapolated.astype(np.float32)
    interpolated = extrapolated / y.factor
    low = max(math.floor(_yarn_correction_dim(y.beta_fast, dim, base, y.original_max_position_embeddings)), 0)
    high = min(math.ceil(_yarn_correction_dim(y.beta_slow, dim, base, y.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep_extrapolated = 1.0 - ramp  # high-frequency dims keep their original frequency
    inv_freq = interpolated * (1.0 - keep_extrapolated) + extrapolated * keep_extrapolated
    return inv_freq.astype(np.float32)


def cos_sin_scale(c: ModelConfig) -> float:
    """YaRN's attention-temperature factor folded into cos/sin (1 without YaRN)."""
    if c.rope_scaling is None:
        return 1.0
    y = c.rope_scaling
    return yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)


def softmax_scale(c: ModelConfig) -> float:
    scale = c.qk_head_dim**-0.5
    if c.rope_scaling is not None and c.rope_scaling.mscale_all_dim:
        m = yarn_mscale(c.rope_scaling.factor, c.rope_scaling.mscale_all_dim)
        scale *= m * m
    return scale
