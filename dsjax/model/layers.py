"""Small building blocks: RMSNorm, rotary embeddings with DeepSeek's YaRN, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.rope import cos_sin_scale, rope_inv_freq, softmax_scale  # noqa: F401 (softmax_scale re-exported)


def rms_norm(x, scale, eps: float):
    """RMSNorm computed in fp32, returned in the input's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale).astype(x.dtype)


def swiglu(x, gate_kernel, up_kernel, down_kernel):
    dtype = x.dtype
    hidden = jax.nn.silu(x @ gate_kernel.astype(dtype)) * (x @ up_kernel.astype(dtype))
    return hidden @ down_kernel.astype(dtype)


def swiglu_side_by_side(x, gate_up_kernel, down_kernel):
    """`swiglu` with the gate and up weights side by side in one [D, 2F] matrix: one product in (decoding)."""
    dtype = x.dtype
    gate_up = x @ gate_up_kernel.astype(dtype)
    F = gate_up.shape[-1] // 2
    return (jax.nn.silu(gate_up[..., :F]) * gate_up[..., F:]) @ down_kernel.astype(dtype)


def rope_cos_sin(c: ModelConfig, positions):
    """cos/sin tables [..., rope/2] for integer positions (any leading shape)."""
    inv_freq = jnp.asarray(rope_inv_freq(c))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    scale = cos_sin_scale(c)
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
