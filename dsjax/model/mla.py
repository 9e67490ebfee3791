"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are compressed into one latent `c_kv` of `kv_lora_rank` values per
token, plus one rope key `k_pe` of `qk_rope_head_dim` values shared by all heads.

Two paths compute the same function:
- `attention` (training/prefill): expand the latent to per-head keys and values.
- `decode_attention` (generation): never expand. The key up-projection is absorbed
  into the query (q_nope @ W_uk) and the value up-projection is applied after the
  weighted sum of latents, so the cache holds only `kv_lora_rank + qk_rope_head_dim`
  values per token per layer.
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
    kv_a = x_BTD @ p["kv_a_proj_with_mqa"]["kernel"].astype(x_BTD.dtype)
    ckv_BTC = rms_norm(kv_a[..., : c.kv_lora_rank], p["kv_a_layernorm"]["scale"], c.rms_norm_eps)
    kpe_BTR = apply_rope(kv_a[..., c.kv_lora_rank :], cos, sin)
    return ckv_BTC, kpe_BTR


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


ABSORBED_UK, ABSORBED_UV = "absorbed_uk_HKC", "absorbed_uv_HCV"


def absorbed_weights(p, c: ModelConfig):
    """The attention params `p` plus kv_b_proj's key and value halves laid out head-major for the
    absorbed decode path ([H, K, C] and [H, C, V]). A decode loop makes them once before it starts
    (`transformer.with_decode_layouts`): made from [C, H, K+V] in the loop they were copies at
    every token (4 x 6-8 us of nano's decode step on the 2-core CPU)."""
    w_kv = p["kv_b_proj"]["kernel"]
    return {
        **p,
        ABSORBED_UK: w_kv[..., : c.qk_nope_head_dim].transpose(1, 2, 0),
        ABSORBED_UV: w_kv[..., c.qk_nope_head_dim :].transpose(1, 0, 2),
    }


def decode_attention(p, x_BTD, cos, sin, cache_ckv_BSC, cache_kpe_BSR, start, c: ModelConfig):
    """Attention for tokens at positions start..start+T-1 against a latent cache.

    Writes this chunk's latents into the cache at `start` and attends over every
    cached position <= the query's own. Returns (out_BTD, cache_ckv, cache_kpe).
    """
    dtype = x_BTD.dtype
    T, S = x_BTD.shape[1], cache_ckv_BSC.shape[1]
    q_nope, q_pe = _queries(p, x_BTD, c)
    q_pe = apply_rope(q_pe, cos, sin)
    ckv_BTC, kpe_BTR = latents(p, x_BTD, cos, sin, c)
    cache_ckv_BSC = jax.lax.dynamic_update_slice(cache_ckv_BSC, ckv_BTC.astype(cache_ckv_BSC.dtype), (0, start, 0))
    cache_kpe_BSR = jax.lax.dynamic_update_slice(cache_kpe_BSR, kpe_BTR.astype(cache_kpe_BSR.dtype), (0, start, 0))

    absorbed = p if ABSORBED_UK in p else absorbed_weights(p, c)
    w_uk_HKC, w_uv_HCV = absorbed[ABSORBED_UK].astype(dtype), absorbed[ABSORBED_UV].astype(dtype)
    q_latent_BTHC = jnp.einsum("bthk,hkc->bthc", q_nope, w_uk_HKC)
    ckv = cache_ckv_BSC.astype(dtype)
    scores_BHTS = (
        jnp.einsum("bthc,bsc->bhts", q_latent_BTHC, ckv, preferred_element_type=jnp.float32)
        + jnp.einsum("bthr,bsr->bhts", q_pe, cache_kpe_BSR.astype(dtype), preferred_element_type=jnp.float32)
    ) * softmax_scale(c)
    query_pos_T = start + jnp.arange(T)
    visible_TS = jnp.arange(S)[None, :] <= query_pos_T[:, None]
    scores_BHTS = jnp.where(visible_TS, scores_BHTS, -jnp.inf)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(dtype)
    out_latent_BTHC = jnp.einsum("bhts,bsc->bthc", probs_BHTS, ckv)
    out_BTHV = jnp.einsum("bthc,hcv->bthv", out_latent_BTHC, w_uv_HCV)
    out_BTD = jnp.einsum("bthv,hvd->btd", out_BTHV, p["o_proj"]["kernel"].astype(dtype))
    return out_BTD, cache_ckv_BSC, cache_kpe_BSR
