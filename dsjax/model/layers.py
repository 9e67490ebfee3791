"""Small building blocks: RMSNorm, rotary embeddings with DeepSeek's YaRN, SwiGLU."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig, YarnConfig


def rms_norm(x, scale, eps: float):
    """RMSNorm computed in fp32, returned in the input's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale).astype(x.dtype)


def swiglu(x, gate_kernel, up_kernel, down_kernel):
    dtype = x.dtype
    hidden = jax.nn.silu(x @ gate_kernel.astype(dtype)) * (x @ up_kernel.astype(dtype))
    return hidden @ down_kernel.astype(dtype)


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


def rope_cos_sin(c: ModelConfig, positions):
    """cos/sin tables [..., rope/2] for integer positions (any leading shape)."""
    inv_freq = jnp.asarray(rope_inv_freq(c))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    scale = 1.0
    if c.rope_scaling is not None:
        y = c.rope_scaling
        scale = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the last axis, as DeepSeek's reference code does.

    x: [B, T, (H,) R]; cos/sin: [B or 1, T, R/2], broadcast over the head axis when present.
    """
    if x.ndim == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x32.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def softmax_scale(c: ModelConfig) -> float:
    scale = c.qk_head_dim**-0.5
    if c.rope_scaling is not None and c.rope_scaling.mscale_all_dim:
        m = yarn_mscale(c.rope_scaling.factor, c.rope_scaling.mscale_all_dim)
        scale *= m * m
    return scale
