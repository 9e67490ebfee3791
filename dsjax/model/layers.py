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


@jax.custom_vjp
def fp32_logits(x_XD, head_DV):
    """x @ head in x's dtype, accumulated and returned in fp32 (any leading axes), whose
    gradient enters the two backward matmuls in x's dtype (fp32 accumulation).

    Autodiff of `jnp.dot(x, head, preferred_element_type=float32)` gives the matmuls of the
    backward pass the logits' fp32 cotangent, which makes them fp32 GEMMs on a GPU when x is
    bf16; every other layer's backward matmuls take bf16 operands. In fp32 this is autodiff's
    gradient. The output head uses it (`transformer.logits_from_hidden`, GRPO's log-probs,
    distillation's student); the chunked pretraining loss makes the same matmuls itself
    (`loss._nll_with_gradients_in_forward`)."""
    return jnp.dot(x_XD, head_DV.astype(x_XD.dtype), preferred_element_type=jnp.float32)


def _fp32_logits_forward(x_XD, head_DV):
    return fp32_logits(x_XD, head_DV), (x_XD, head_DV)


def _fp32_logits_backward(saved, d_logits_XV):
    x_XD, head_DV = saved
    d_XV = d_logits_XV.astype(x_XD.dtype)
    d_x_XD = jnp.dot(d_XV, head_DV.astype(x_XD.dtype).T, preferred_element_type=jnp.float32).astype(x_XD.dtype)
    leading = tuple(range(x_XD.ndim - 1))
    d_head_DV = jax.lax.dot_general(
        x_XD, d_XV, ((leading, leading), ((), ())), preferred_element_type=jnp.float32
    ).astype(head_DV.dtype)
    return d_x_XD, d_head_DV


fp32_logits.defvjp(_fp32_logits_forward, _fp32_logits_backward)


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
