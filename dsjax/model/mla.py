"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are compressed into one latent `c_kv` of `kv_lora_rank` values per
token, plus one rope key `k_pe` of `qk_rope_head_dim` values shared by all heads.

Two paths compute the same function:
- `attention` (training/prefill): expand the latent to per-head keys and values.
- `decode_attention` (generation): never expand. The key up-projection is absorbed
  into the query projection (W_q_nope @ W_uk) and the value up-projection into the
  output projection (W_uv @ W_o), so the cache holds only `kv_lora_rank +
  qk_rope_head_dim` values per token per layer and attention runs on them directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.layers import apply_rope, rms_norm, softmax_scale
from kernels_pallas.attention import causal_attention
from meshes.rules import constrain, logical_spec


def _queries(p, x_BTD, c: ModelConfig):
    dtype = x_BTD.dtype
    if c.q_lora_rank is None:
        q_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD, p["q_proj"]["kernel"].astype(dtype))
    else:
        cq_BTQ = rms_norm(x_BTD @ p["q_a_proj"]["kernel"].astype(dtype), p["q_a_layernorm"]["scale"], c.rms_norm_eps)
        q_BTHK = jnp.einsum("btq,qhk->bthk", cq_BTQ, p["q_b_proj"]["kernel"].astype(dtype))
    return q_BTHK[..., : c.qk_nope_head_dim], q_BTHK[..., c.qk_nope_head_dim :]


def latents(p, x_BTD, cos, sin, c: ModelConfig):
    """The per-token cache entries: normed latent c_kv [B,T,C] and rotated rope key k_pe [B,T,R]."""
    return _latents_of(p, x_BTD @ p["kv_a_proj_with_mqa"]["kernel"].astype(x_BTD.dtype), cos, sin, c)


def _latents_of(p, kv_a_BTW, cos, sin, c: ModelConfig):
    """`latents` from kv_a_proj's output [B, T, C + R]."""
    ckv_BTC = rms_norm(kv_a_BTW[..., : c.kv_lora_rank], p["kv_a_layernorm"]["scale"], c.rms_norm_eps)
    return ckv_BTC, apply_rope(kv_a_BTW[..., c.kv_lora_rank :], cos, sin)


def attention(p, x_BTD, cos, sin, c: ModelConfig):
    """Causal self-attention over the whole sequence (training path)."""
    dtype = x_BTD.dtype
    B, T, _ = x_BTD.shape
    H = c.num_attention_heads
    q_nope, q_pe = _queries(p, x_BTD, c)
    q_pe = apply_rope(q_pe, cos, sin)
    ckv_BTC, kpe_BTR = latents(p, x_BTD, cos, sin, c)
    # sequence parallelism gathers only the compressed latents (kv_lora + rope values per token)
    ckv_BTC = constrain(ckv_BTC, ("batch", "kv_sequence", None))
    kpe_BTR = constrain(kpe_BTR, ("batch", "kv_sequence", None))
    # heads-first layouts: XLA:CPU runs the batched score matmuls ~1.7x faster this way
    kv_BHTK = jnp.einsum("btc,chk->bhtk", ckv_BTC, p["kv_b_proj"]["kernel"].astype(dtype))
    k_nope, v_BHTV = kv_BHTK[..., : c.qk_nope_head_dim], kv_BHTK[..., c.qk_nope_head_dim :]
    q_BHTK = jnp.concatenate([q_nope, q_pe], axis=-1).transpose(0, 2, 1, 3)
    kpe_BHTR = jnp.broadcast_to(kpe_BTR[:, None], (B, H, T, c.qk_rope_head_dim))
    k_BHTK = constrain(jnp.concatenate([k_nope, kpe_BHTR], axis=-1), ("batch", "activation_heads", "kv_sequence", None))
    q_BHTK = constrain(q_BHTK, ("batch", "activation_heads", "sequence", None))
    # xla: attention_reference (full fp32 scores); cudnn / pallas: flash kernels, per shard under a mesh
    out_BHTV = causal_attention(
        q_BHTK, k_BHTK, v_BHTV, softmax_scale(c), impl=c.attention_impl,
        spec=logical_spec(("batch", "activation_heads", "sequence")),
    )
    return jnp.einsum("bhtv,hvd->btd", out_BHTV, p["o_proj"]["kernel"].astype(dtype))


DECODE_IN, DECODE_Q, DECODE_OUT, DECODE_UV = "decode_in_DX", "decode_q_QX", "decode_out_HCD", "decode_uv_HCV"


def decode_layout() -> str:
    """How decoding holds its cache and multiplies out of it, by backend.

    - "fused" (GPU): per layer one buffer of [latent | rope key] entries, written once and scored by one
      product, and the values' up-projection absorbed into o_proj: batch-1 decoding is bound by the
      kernels it launches, and this takes 4-5 fewer per layer and token than "split" (on an H200
      target, `gpu_kernels.py --decode`: `tiny` 96 against 114, `small` 248 against 295);
    - "split" (CPU): the latents and rope keys in two buffers, and W_uv then o_proj: there FLOPs and
      bytes count, and XLA:CPU copies a slice of a fused buffer before multiplying by it (512 rows of
      `nano` sampled about 12% slower with the fused layout on 2 cores).
    """
    return "split" if jax.default_backend() == "cpu" else "fused"


def _absorbed_queries(w_XHK, w_uk_HKC, c: ModelConfig):
    """A query projection [X, H, K + R] with its nope part absorbed into the keys' up-projection:
    [X, H * (C + R)], each head's latent query then its rope query."""
    nope = c.qk_nope_head_dim
    X, H, _ = w_XHK.shape
    latent_XHC = jnp.einsum("xhk,hkc->xhc", w_XHK[..., :nope], w_uk_HKC, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([latent_XHC, w_XHK[..., nope:]], axis=-1).reshape(X, -1)


def decode_weights(p, c: ModelConfig, layout: str | None = None):
    """The attention params `p` plus the matrices the decode path multiplies by, so a decoded token
    takes fewer, larger products (what launches kernels on a GPU, not FLOPs, bounds batch-1 decoding):

    - `decode_in_DX`: every projection of the layer's input side by side: the absorbed queries
      (q_nope @ W_uk per head, then q_pe) and kv_a ([D, H*(C+R) + C+R]); with a q LoRA, q_a and kv_a
      ([D, Q + C+R]) and `decode_q_QX`, q_b absorbed ([Q, H*(C+R)]);
    - layout "fused": `decode_out_HCD`, the values' up-projection absorbed into o_proj (W_uv @ W_o per
      head); "split": `decode_uv_HCV`, the values' up-projection head-major (`decode_layout`).

    Products are taken in the params' precision (fp32 master weights) and cast once by the caller.
    A decode loop makes them once before it starts (`transformer.with_decode_layouts`);
    `decode_attention` makes them itself from plain params.
    """
    layout = layout or decode_layout()
    nope = c.qk_nope_head_dim
    w_kv_CHK = p["kv_b_proj"]["kernel"]  # [C, H, nope + V]
    w_uk_HKC = w_kv_CHK[..., :nope].transpose(1, 2, 0)
    w_uv_HCV = w_kv_CHK[..., nope:].transpose(1, 0, 2)
    kv_a_DW = p["kv_a_proj_with_mqa"]["kernel"]
    out = {**p}
    if c.q_lora_rank is None:
        out[DECODE_IN] = jnp.concatenate([_absorbed_queries(p["q_proj"]["kernel"], w_uk_HKC, c), kv_a_DW], axis=1)
    else:
        out[DECODE_IN] = jnp.concatenate([p["q_a_proj"]["kernel"], kv_a_DW], axis=1)
        out[DECODE_Q] = _absorbed_queries(p["q_b_proj"]["kernel"], w_uk_HKC, c)
    if layout == "fused":
        out[DECODE_OUT] = jnp.einsum("hcv,hvd->hcd", w_uv_HCV, p["o_proj"]["kernel"], precision=jax.lax.Precision.HIGHEST)
    else:
        out[DECODE_UV] = w_uv_HCV
    return out


def _write_cache(buffer_BSW, new_BTW, start, one_row_as_matrix: bool = True):
    """buffer_BSW with new_BTW written at position `start`.

    One row is written as a [S, W] matrix: XLA:CPU fused the 3-D write twice when the attention
    products read it through the [S, W] view they take of a batch of one (once for the cache, once
    for the product), and copied the buffer three times per layer and token to feed both. With the
    sampler carrying a single row's cache without its batch axis (`infer.sampler`), the write is in
    place and nothing is copied (`nano` on 2 CPU cores, per token: 310 -> 234 us over 200 tokens, 636 -> 455 us
    over 1,000). The GPU's fused layout keeps the 3-D write (`one_row_as_matrix=False`): as a matrix, its
    products no longer read the latent part of the cache in place (4 more kernels per token for `tiny`).
    """
    new_BTW = new_BTW.astype(buffer_BSW.dtype)
    if one_row_as_matrix and buffer_BSW.shape[0] == 1:
        return jax.lax.dynamic_update_slice(buffer_BSW[0], new_BTW[0], (start, 0))[None]
    return jax.lax.dynamic_update_slice(buffer_BSW, new_BTW, (0, start, 0))


def decode_attention(p, x_BTD, cos, sin, cache, start, c: ModelConfig):
    """Attention for tokens at positions start..start+T-1 against a layer's latent cache.

    `cache` is one [B, S, C + R] buffer of [normed latent c_kv | rotated rope key] entries (layout
    "fused") or the pair ([B, S, C], [B, S, R]) ("split"; `decode_layout`). Writes this chunk's
    entries at `start` and attends over every cached position <= the query's own.
    Returns (out_BTD, cache).
    """
    dtype = x_BTD.dtype
    B, T, _ = x_BTD.shape
    H, C = c.num_attention_heads, c.kv_lora_rank
    fused = not isinstance(cache, tuple)
    laid_out = DECODE_IN in p and (DECODE_OUT if fused else DECODE_UV) in p  # for this cache's layout
    w = p if laid_out else decode_weights(p, c, "fused" if fused else "split")
    proj_BTX = x_BTD @ w[DECODE_IN].astype(dtype)
    if c.q_lora_rank is None:
        q_BTX, kv_a = proj_BTX[..., : -(C + c.qk_rope_head_dim)], proj_BTX[..., -(C + c.qk_rope_head_dim) :]
    else:
        cq_BTQ = rms_norm(proj_BTX[..., : c.q_lora_rank], p["q_a_layernorm"]["scale"], c.rms_norm_eps)
        q_BTX, kv_a = cq_BTQ @ w[DECODE_Q].astype(dtype), proj_BTX[..., c.q_lora_rank :]
    q_BTHW = q_BTX.reshape(B, T, H, -1)
    q_latent_BTHC, q_pe_BTHR = q_BTHW[..., :C], apply_rope(q_BTHW[..., C:], cos, sin)
    ckv_BTC, kpe_BTR = _latents_of(p, kv_a, cos, sin, c)
    if fused:
        cache = _write_cache(cache, jnp.concatenate([ckv_BTC, kpe_BTR], axis=-1), start, one_row_as_matrix=False)
        keys_BSW = cache.astype(dtype)
        scores_BHTS = jnp.einsum("bthw,bsw->bhts", jnp.concatenate([q_latent_BTHC, q_pe_BTHR], axis=-1), keys_BSW,
                                 preferred_element_type=jnp.float32)
        ckv_BSC = keys_BSW[..., :C]  # Triton GEMMs read the slice in place
    else:
        cache = (_write_cache(cache[0], ckv_BTC, start), _write_cache(cache[1], kpe_BTR, start))
        ckv_BSC, kpe_BSR = (buffer.astype(dtype) for buffer in cache)
        scores_BHTS = (jnp.einsum("bthc,bsc->bhts", q_latent_BTHC, ckv_BSC, preferred_element_type=jnp.float32)
                       + jnp.einsum("bthr,bsr->bhts", q_pe_BTHR, kpe_BSR, preferred_element_type=jnp.float32))
    S = ckv_BSC.shape[1]
    visible_TS = jnp.arange(S)[None, :] <= (start + jnp.arange(T))[:, None]
    scores_BHTS = jnp.where(visible_TS, scores_BHTS * softmax_scale(c), -jnp.inf)
    # the softmax's division comes after the values' weighted sum, on [H, C] instead of [H, S]
    # (one kernel fewer per layer and token on a GPU: the weights go to the product as they are made)
    weights_BHTS = jnp.exp(scores_BHTS - jnp.max(scores_BHTS, axis=-1, keepdims=True))
    total_BTH1 = jnp.sum(weights_BHTS, axis=-1).transpose(0, 2, 1)[..., None]
    # (with the letters bsw->bthw XLA:GPU adds a transpose: 9 more kernels per token for `small`)
    out_latent_BTHC = jnp.einsum("bhts,bsc->bthc", weights_BHTS.astype(dtype), ckv_BSC)
    out_latent_BTHC = (out_latent_BTHC / total_BTH1).astype(dtype)
    if fused:
        return jnp.einsum("bthc,hcd->btd", out_latent_BTHC, w[DECODE_OUT].astype(dtype)), cache
    out_BTHV = jnp.einsum("bthc,hcv->bthv", out_latent_BTHC, w[DECODE_UV].astype(dtype))
    return jnp.einsum("bthv,hvd->btd", out_BTHV, p["o_proj"]["kernel"].astype(dtype)), cache
