"""The decoder: embedding -> decoder layers (dense first, then MoE) -> norm -> head, plus MTP modules.

`forward` is the training/eval path over whole sequences. `decode_step` runs a
chunk of tokens (a prompt, or one new token) against the per-layer latent cache
and is what generation jits. Both are pure functions of (params, tokens, config).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig, resolve_compute_dtype
from dsjax.model import mla
from dsjax.model.layers import rms_norm, rope_cos_sin, swiglu, swiglu_side_by_side
from dsjax.model.moe import bias_update, moe, moe_decode
from dsjax.model.moe import decode_weights as moe_decode_weights
from meshes import pipeline
from meshes.rules import constrain

ACTIVATION = ("batch", "sequence", "activation_embed")


def remat_policy(fn, remat: str):
    """`model.remat`: none keeps every activation for the backward pass; full keeps only the
    block's input and recomputes the block; save_dots keeps the weight matmuls' outputs and
    recomputes the cheap elementwise work and the attention scores (batched dots)."""
    if remat == "full":
        return jax.checkpoint(fn)
    if remat == "save_dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return fn


def compute_dtype(c: ModelConfig):
    return jnp.dtype(resolve_compute_dtype(c, jax.default_backend()))


def _feed_forward(p, h_BTD, c: ModelConfig, moe_impl: str):
    """Returns (out, balance_loss, expert_load or None)."""
    if "gate" in p:
        return moe(p, h_BTD, c, moe_impl)
    return swiglu(h_BTD, p["gate_proj"]["kernel"], p["up_proj"]["kernel"], p["down_proj"]["kernel"]), 0.0, None


def decoder_layer(p, x_BTD, cos, sin, c: ModelConfig, moe_impl: str = "auto"):
    h = rms_norm(x_BTD, p["input_layernorm"]["scale"], c.rms_norm_eps)
    x_BTD = x_BTD + mla.attention(p["self_attn"], h, cos, sin, c)
    h = rms_norm(x_BTD, p["post_attention_layernorm"]["scale"], c.rms_norm_eps)
    out, aux_loss, load = _feed_forward(p["mlp"], h, c, moe_impl)
    return constrain(x_BTD + out, ACTIVATION), aux_loss, load


def _layer_fn(c: ModelConfig, moe_impl: str):
    def fn(p, x, cos, sin):
        return decoder_layer(p, x, cos, sin, c, moe_impl)

    return remat_policy(fn, c.remat)


def logits_from_hidden(params, h_BTD, norm_scale, c: ModelConfig):
    """Final norm + output head; logits always fp32."""
    h = rms_norm(h_BTD, norm_scale, c.rms_norm_eps)
    logits = jnp.dot(h, head_kernel(params, c).astype(h.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "sequence", "activation_vocab"))


def embed(params, tokens_BT, dtype):
    return params["embed_tokens"]["embedding"][tokens_BT].astype(dtype)


def layer_names(params) -> list[str]:
    return sorted(params["layers"], key=int)


def _stage_fn(c: ModelConfig, moe_impl: str):
    """One layer group of a pipeline stage: its L_g decoder layers in order, with per-microbatch stats.

    Expert loads travel as routed-slot *counts*, so summing them over microbatches
    and dividing once gives exactly the load the sequential model computes.
    """

    def stage(p_L, x_BTD, cos, sin):
        B, T, _ = x_BTD.shape
        slots = B * T * c.num_experts_per_tok

        def one_layer(x, p):
            x, aux_loss, load = decoder_layer(p, x, cos, sin, c, moe_impl)
            counts = jnp.round(load * slots) if load is not None else jnp.zeros((0,), jnp.float32)
            return x, (jnp.asarray(aux_loss, jnp.float32), counts)

        x_BTD, (aux_L, counts_LE) = jax.lax.scan(one_layer, x_BTD, p_L)
        return x_BTD, {"balance_loss": jnp.sum(aux_L), "expert_counts": counts_LE}

    return stage


def _pipelined_layers(stages, x_BTD, cos, sin, c: ModelConfig, moe_impl: str, microbatches: int):
    """The stacked decoder layers through the pp pipeline; returns (x_BTD, balance_loss, load_NE)."""
    B, T, _ = x_BTD.shape
    x_MBTD = constrain(pipeline.split_microbatches(x_BTD, microbatches), (None,) + ACTIVATION)
    y_MBTD, stats = pipeline.run_pipeline(_stage_fn(c, moe_impl), stages, x_MBTD, (cos, sin))
    x_BTD = constrain(pipeline.merge_microbatches(y_MBTD), ACTIVATION)
    # each microbatch's balance loss is a mean over its sequences: average them
    balance = jnp.sum(stats["balance_loss"]) / microbatches
    counts_SRLE = stats["expert_counts"]  # [S, R, L_g, E]: back to layer order
    load_NE = pipeline.layer_major(counts_SRLE) / (B * T * c.num_experts_per_tok)
    return x_BTD, balance, load_NE


def forward(
    params, tokens_BT, c: ModelConfig, *, with_mtp: bool = False, moe_impl: str = "auto", microbatches: int = 1,
    keep_hidden: bool = False,
):
    """Returns (logits_BTV fp32, aux); with keep_hidden, aux["hidden"] is h_BTD before the final norm.

    aux: balance_loss (sum over MoE layers, MTP included), expert_load [n_moe, E]
    (rows in `moe_layer_paths` order), and when `with_mtp`, mtp_logits [D, B, T, V]:
    module k (1-based) at position i predicts token i + k + 1; its last k positions
    see wrapped-around inputs and must be masked by the loss.

    When `params` holds pipeline stages (`meshes.pipeline.to_stages`, pp > 1),
    those layers run as `microbatches` microbatches through the pp pipeline.
    """
    h_BTD, aux = forward_hidden(
        params, tokens_BT, c, with_mtp=with_mtp, moe_impl=moe_impl, microbatches=microbatches
    )
    logits_BTV = logits_from_hidden(params, h_BTD, params["norm"]["scale"], c)
    if keep_hidden:
        aux["hidden"] = h_BTD
    if "mtp_hidden" in aux:
        mtp = params["mtp"]
        names = sorted(mtp, key=int)
        aux["mtp_logits"] = jnp.stack(
            [
                logits_from_hidden(params, h, mtp[name]["shared_head_norm"]["scale"], c)
                for name, h in zip(names, aux.pop("mtp_hidden"))
            ]
        )
    return logits_BTV, aux


def forward_hidden(
    params, tokens_BT, c: ModelConfig, *, with_mtp: bool = False, moe_impl: str = "auto", microbatches: int = 1
):
    """`forward` without the output head: (h_BTD before the final norm, aux).

    aux holds balance_loss and expert_load as in `forward`, and when `with_mtp`,
    mtp_hidden: one [B, T, D] hidden state per MTP module, before its shared_head_norm.
    The loss applies norm + head itself, in token chunks (`loss.chunked_head_nll`).
    """
    dtype = compute_dtype(c)
    B, T = tokens_BT.shape
    cos, sin = rope_cos_sin(c, jnp.arange(T)[None, :])
    x_BTD = constrain(embed(params, tokens_BT, dtype), ACTIVATION)
    layer = _layer_fn(c, moe_impl)
    total_aux = jnp.zeros((), jnp.float32)
    loads = []
    for name in layer_names(params):
        x_BTD, aux_loss, load = layer(params["layers"][name], x_BTD, cos, sin)
        total_aux = total_aux + aux_loss
        if load is not None:
            loads.append(load[None])
    if pipeline.STAGES_KEY in params:
        x_BTD, aux_loss, load_NE = _pipelined_layers(
            params[pipeline.STAGES_KEY], x_BTD, cos, sin, c, moe_impl, microbatches
        )
        total_aux = total_aux + aux_loss
        if load_NE.shape[-1]:
            loads.append(load_NE)
    aux: dict[str, Any] = {}
    if with_mtp and "mtp" in params:
        h_BTD = x_BTD
        mtp_hidden = []
        for k, name in enumerate(sorted(params["mtp"], key=int), start=1):
            m = params["mtp"][name]
            next_emb = embed(params, jnp.roll(tokens_BT, -k, axis=1), dtype)
            merged = jnp.concatenate(
                [
                    rms_norm(next_emb, m["enorm"]["scale"], c.rms_norm_eps),
                    rms_norm(h_BTD, m["hnorm"]["scale"], c.rms_norm_eps),
                ],
                axis=-1,
            )
            h_BTD = merged @ m["eh_proj"]["kernel"].astype(dtype)
            h_BTD, aux_loss, load = layer(m["block"], h_BTD, cos, sin)
            total_aux = total_aux + aux_loss
            if load is not None:
                loads.append(load[None])
            mtp_hidden.append(h_BTD)
        aux["mtp_hidden"] = mtp_hidden
    aux["balance_loss"] = total_aux
    aux["expert_load"] = jnp.concatenate(loads) if loads else jnp.zeros((0, max(c.n_routed_experts, 1)))
    return x_BTD, aux


def head_kernel(params, c: ModelConfig):
    """The output head [D, V] (the embedding's transpose when tied)."""
    return params["embed_tokens"]["embedding"].T if c.tie_word_embeddings else params["lm_head"]["kernel"]


def moe_layer_paths(c: ModelConfig, with_mtp: bool = True) -> list[tuple[str, ...]]:
    """Paths (into params) of every MoE feed-forward, in the order of aux['expert_load'] rows."""
    paths = [("layers", str(i), "mlp") for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
    if with_mtp and c.n_routed_experts > 0:
        paths += [("mtp", str(k), "block", "mlp") for k in range(c.num_nextn_predict_layers)]
    return paths


def apply_bias_updates(params, expert_load, c: ModelConfig, with_mtp: bool = True):
    """New params with each router's e_score_correction_bias nudged toward uniform load."""
    paths = moe_layer_paths(c, with_mtp)
    if not paths:
        return params
    params = jax.tree.map(lambda x: x, params)  # shallow-copy every dict level
    if pipeline.STAGES_KEY in params:
        # layers moved into pipeline stages: their rows are consecutive, in layer order
        staged = [row for row, path in enumerate(paths) if path[0] == "layers" and path[1] not in params["layers"]]
        gate = params[pipeline.STAGES_KEY]["mlp"]["gate"]
        bias_SRLE = gate["e_score_correction_bias"]
        load_SRLE = pipeline.stage_major_like(expert_load[staged[0] : staged[-1] + 1], bias_SRLE)
        gate["e_score_correction_bias"] = bias_update(bias_SRLE, load_SRLE, c.bias_update_speed)
        paths = [p if row not in staged else None for row, p in enumerate(paths)]
    for row, path in enumerate(paths):
        if path is None:
            continue
        node = params
        for key in path:
            node = node[key]
        gate = node["gate"]
        gate["e_score_correction_bias"] = bias_update(gate["e_score_correction_bias"], expert_load[row], c.bias_update_speed)
    return params


# --- cached decoding -----------------------------------------------------------------


def init_cache(c: ModelConfig, batch: int, max_len: int, dtype=None, layout: str | None = None) -> dict[str, tuple]:
    """Latent cache of `mla.decode_attention`, per layer: layout "fused" (GPU) one [batch, max_len,
    kv_lora_rank + qk_rope_head_dim] buffer of [latent | rope key] entries ({"latent": per layer});
    "split" (CPU) a latent and a rope-key buffer ({"ckv": ..., "kpe": ...}). `mla.decode_layout` says why.

    One array per layer (not one stacked [L, ...] array): each step then writes its token
    into each layer's buffer in place; a stacked cache was sliced and re-stacked (copied)
    at every token of a decode loop. Held in the compute dtype by default: the latents
    written are computed in it, so the values are the same as in fp32, and attention reads
    them without converting the whole cache at every token (8 of `tiny`'s 177 kernels
    per token on an H200 target, `benchmarks/gpu_kernels.py`-style count).
    """
    dtype = compute_dtype(c) if dtype is None else dtype
    L, C, R = c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim
    zeros = lambda width: tuple(jnp.zeros((batch, max_len, width), dtype) for _ in range(L))  # noqa: E731
    if (layout or mla.decode_layout()) == "fused":
        return {"latent": zeros(C + R)}
    return {"ckv": zeros(C), "kpe": zeros(R)}


DECODE_GATE_UP = "decode_gate_up_DX"


def _decode_mlp_weights(p):
    """A dense SwiGLU's params plus its gate and up weights side by side ([D, 2F])."""
    return {**p, DECODE_GATE_UP: jnp.concatenate([p["gate_proj"]["kernel"], p["up_proj"]["kernel"]], axis=1)}


def _decode_feed_forward(p, h_BTD, c: ModelConfig, moe_impl: str):
    if "gate" in p:
        return moe_decode(p, h_BTD, c, moe_impl)
    w = p if DECODE_GATE_UP in p else _decode_mlp_weights(p)
    return swiglu_side_by_side(h_BTD, w[DECODE_GATE_UP], p["down_proj"]["kernel"])


def with_decode_layouts(params, c: ModelConfig, layout: str | None = None):
    """params plus the side-by-side and absorbed matrices the decode path multiplies by, every
    weight matrix in the compute dtype: each attention's (`mla.decode_weights`), each MoE layer's
    (`moe.decode_weights`) and each dense MLP's gate and up.

    Decoding a token of a small model is bound by the number of kernels it launches on a GPU,
    not by FLOPs: side by side, the projections that read the same input are one product
    (`tiny`: 159 -> 96 kernels per token on an H200 target, `benchmarks/gpu_kernels.py --decode`).
    `layout`: the cache layout the attention matrices are for (`mla.decode_layout`).

    A sampler calls this once before decoding (`infer.sampler`), so the copies, products and
    casts are made once, not at every token (XLA kept the casts inside the decode loop: 7
    kernels per token for `tiny`, and each token read fp32 weights); `decode_step` takes
    either form and computes the same thing: it makes the matrices itself from plain params,
    and every use of a matrix casts it to the compute dtype first. Norm scales and routing
    biases (1-D) stay fp32.
    """
    dtype = compute_dtype(c)
    layers = {}
    for name, p in params["layers"].items():
        mlp = moe_decode_weights(p["mlp"]) if "gate" in p["mlp"] else _decode_mlp_weights(p["mlp"])
        layers[name] = {**p, "self_attn": mla.decode_weights(p["self_attn"], c, layout), "mlp": mlp}
    cast = lambda a: a.astype(dtype) if a.ndim >= 2 and jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return jax.tree.map(cast, {**params, "layers": layers})


def decode_step(params, tokens_BT, cache, start, c: ModelConfig, *, moe_impl: str = "auto"):
    """Run tokens at positions start..start+T-1 with the cache; returns (logits_BTV, cache)."""
    dtype = compute_dtype(c)
    B, T = tokens_BT.shape
    cos, sin = rope_cos_sin(c, (start + jnp.arange(T))[None, :])
    x_BTD = embed(params, tokens_BT, dtype)
    fused = "latent" in cache
    new_cache = []
    for i, name in enumerate(layer_names(params)):
        p = params["layers"][name]
        h = rms_norm(x_BTD, p["input_layernorm"]["scale"], c.rms_norm_eps)
        layer_cache = cache["latent"][i] if fused else (cache["ckv"][i], cache["kpe"][i])
        attn, layer_cache = mla.decode_attention(p["self_attn"], h, cos, sin, layer_cache, start, c)
        new_cache.append(layer_cache)
        x_BTD = x_BTD + attn
        h = rms_norm(x_BTD, p["post_attention_layernorm"]["scale"], c.rms_norm_eps)
        x_BTD = x_BTD + _decode_feed_forward(p["mlp"], h, c, moe_impl)
    logits_BTV = logits_from_hidden(params, x_BTD, params["norm"]["scale"], c)
    if fused:
        return logits_BTV, {"latent": tuple(new_cache)}
    return logits_BTV, {"ckv": tuple(ckv for ckv, _ in new_cache), "kpe": tuple(kpe for _, kpe in new_cache)}
