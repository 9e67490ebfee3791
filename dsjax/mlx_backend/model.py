"""The dsjax model in MLX, over the same nested-dict params tree (same names, same shapes).

This mirrors `dsjax/model/` function for function (it does not import it):
MLA with the expanded training path and the absorbed latent-cache decoding path,
DeepSeekMoE with bias-only selection, group-limited top-k, the sequence-wise
balance loss and expert loads, MTP modules, YaRN. MoE uses the masked path (all
experts as one wide matmul, weighted by the gates), like the JAX CPU default.
Computation is fp32 throughout.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from dsjax.config import ModelConfig
from dsjax.rope import cos_sin_scale, rope_inv_freq, softmax_scale

# --- conversion ------------------------------------------------------------------------


def to_mlx(tree):
    """A params tree of NumPy/JAX arrays -> MLX arrays (same structure)."""
    if isinstance(tree, dict):
        return {k: to_mlx(v) for k, v in tree.items()}
    return mx.array(np.asarray(tree))


def to_numpy(tree):
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    return np.array(tree, copy=False) if isinstance(tree, np.ndarray) else np.array(tree)


def tree_map(fn, *trees):
    first = trees[0]
    if isinstance(first, dict):
        return {k: tree_map(fn, *(t[k] for t in trees)) for k in first}
    return fn(*trees)


def tree_leaves(tree) -> list:
    """Leaves in sorted-key order (the order jax.tree.leaves uses for dicts)."""
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in tree_leaves(tree[k])]
    return [tree]


# --- layers ------------------------------------------------------------------------------


def rms_norm(x, scale, eps: float):
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def swiglu(x, gate, up, down):
    return (nn_silu(x @ gate) * (x @ up)) @ down


def nn_silu(x):
    return x * mx.sigmoid(x)


def rope_cos_sin(c: ModelConfig, positions):
    angles = positions.astype(mx.float32)[..., None] * mx.array(rope_inv_freq(c))
    scale = cos_sin_scale(c)
    return mx.cos(angles) * scale, mx.sin(angles) * scale


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs of the last axis; x [B,T,(H,)R], cos/sin [1,T,R/2]."""
    if x.ndim == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    return mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)


# --- attention ---------------------------------------------------------------------------


def _queries(p, x, c: ModelConfig):
    if c.q_lora_rank is None:
        w = p["q_proj"]["kernel"]
        q = (x @ w.reshape(w.shape[0], -1)).reshape(*x.shape[:2], c.num_attention_heads, c.qk_head_dim)
    else:
        cq = rms_norm(x @ p["q_a_proj"]["kernel"], p["q_a_layernorm"]["scale"], c.rms_norm_eps)
        w = p["q_b_proj"]["kernel"]
        q = (cq @ w.reshape(w.shape[0], -1)).reshape(*x.shape[:2], c.num_attention_heads, c.qk_head_dim)
    return q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]


def _latents(p, x, cos, sin, c: ModelConfig):
    kv_a = x @ p["kv_a_proj_with_mqa"]["kernel"]
    ckv = rms_norm(kv_a[..., : c.kv_lora_rank], p["kv_a_layernorm"]["scale"], c.rms_norm_eps)
    return ckv, apply_rope(kv_a[..., c.kv_lora_rank :], cos, sin)


def _o_proj(p, out_BTHV):
    w = p["o_proj"]["kernel"]  # [H, V, D]
    B, T = out_BTHV.shape[:2]
    return out_BTHV.reshape(B, T, -1) @ w.reshape(-1, w.shape[-1])


def attention(p, x, cos, sin, c: ModelConfig):
    B, T, _ = x.shape
    H = c.num_attention_heads
    q_nope, q_pe = _queries(p, x, c)
    q_pe = apply_rope(q_pe, cos, sin)
    ckv, kpe = _latents(p, x, cos, sin, c)
    w_kv = p["kv_b_proj"]["kernel"]
    kv = (ckv @ w_kv.reshape(w_kv.shape[0], -1)).reshape(B, T, H, -1)
    k_nope, v = kv[..., : c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim :]
    q = mx.concatenate([q_nope, q_pe], axis=-1).transpose(0, 2, 1, 3)
    k = mx.concatenate([k_nope, mx.broadcast_to(kpe[:, :, None, :], (B, T, H, c.qk_rope_head_dim))], axis=-1)
    scores = (q @ k.transpose(0, 2, 3, 1)) * softmax_scale(c)
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    scores = mx.where(causal, scores, -mx.inf)
    probs = mx.softmax(scores, axis=-1)
    out = (probs @ v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    return _o_proj(p, out)


def decode_attention(p, x, cos, sin, cache_ckv, cache_kpe, start: int, c: ModelConfig):
    """Absorbed-weight attention against the latent cache [B, S, C] / [B, S, R]."""
    B, T, _ = x.shape
    S = cache_ckv.shape[1]
    q_nope, q_pe = _queries(p, x, c)
    q_pe = apply_rope(q_pe, cos, sin)
    ckv, kpe = _latents(p, x, cos, sin, c)
    cache_ckv[:, start : start + T, :] = ckv
    cache_kpe[:, start : start + T, :] = kpe
    w_kv = p["kv_b_proj"]["kernel"]  # [C, H, nope + v]
    w_uk, w_uv = w_kv[..., : c.qk_nope_head_dim], w_kv[..., c.qk_nope_head_dim :]
    q_latent = mx.einsum("bthk,chk->bhtc", q_nope, w_uk)
    scores = (
        q_latent @ cache_ckv[:, None].transpose(0, 1, 3, 2)
        + q_pe.transpose(0, 2, 1, 3) @ cache_kpe[:, None].transpose(0, 1, 3, 2)
    ) * softmax_scale(c)
    visible = mx.arange(S)[None, :] <= (start + mx.arange(T))[:, None]
    scores = mx.where(visible, scores, -mx.inf)
    probs = mx.softmax(scores, axis=-1)
    out_latent = probs @ cache_ckv[:, None]  # [B, H, T, C]
    out = mx.einsum("bhtc,chv->bthv", out_latent, w_uv)
    return _o_proj(p, out), cache_ckv, cache_kpe


# --- MoE ---------------------------------------------------------------------------------


def _top_k_indices(x, k: int):
    return mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]


def route(logits_TE, bias_E, c: ModelConfig):
    scores = mx.sigmoid(logits_TE) if c.scoring_func == "sigmoid" else mx.softmax(logits_TE, axis=-1)
    choice = mx.stop_gradient(scores) + mx.stop_gradient(bias_E)
    T, E = choice.shape
    if c.n_group > 1:
        grouped = choice.reshape(T, c.n_group, E // c.n_group)
        group_score = mx.topk(grouped, 2, axis=-1).sum(-1)
        best = _top_k_indices(group_score, c.topk_group)
        keep_group = (mx.arange(c.n_group)[None, None, :] == best[..., None]).any(axis=1)
        keep = mx.repeat(keep_group, E // c.n_group, axis=1)
        choice = mx.where(keep, choice, -mx.inf)
    idx = _top_k_indices(choice, c.num_experts_per_tok)
    gate = mx.take_along_axis(scores, idx, axis=-1)
    if c.norm_topk_prob:
        gate = gate / (gate.sum(-1, keepdims=True) + 1e-20)
    return idx, gate * c.routed_scaling_factor, scores


def moe(p, x_BTD, c: ModelConfig):
    B, T, D = x_BTD.shape
    E, K = c.n_routed_experts, c.num_experts_per_tok
    x = x_BTD.reshape(B * T, D)
    logits = x @ p["gate"]["kernel"]
    idx, gate, scores = route(logits, p["gate"]["e_score_correction_bias"], c)
    one_hot = (idx[..., None] == mx.arange(E)).astype(mx.float32)  # [T, K, E]
    combine = (one_hot * gate[..., None]).sum(axis=1)
    ex = p["experts"]
    F = ex["gate_proj"].shape[-1]
    gate_w = ex["gate_proj"].transpose(1, 0, 2).reshape(D, E * F)
    up_w = ex["up_proj"].transpose(1, 0, 2).reshape(D, E * F)
    hidden = nn_silu(x @ gate_w) * (x @ up_w)
    hidden = (hidden.reshape(-1, E, F) * combine[..., None]).reshape(-1, E * F)
    out = hidden @ ex["down_proj"].reshape(E * F, D)
    if "shared_experts" in p:
        s = p["shared_experts"]
        out = out + swiglu(x, s["gate_proj"]["kernel"], s["up_proj"]["kernel"], s["down_proj"]["kernel"])
    # sequence-wise balance loss
    normed = scores.reshape(B, T, E)
    normed = normed / (normed.sum(-1, keepdims=True) + 1e-20)
    counts = one_hot.reshape(B, T * K, E).sum(axis=1)
    f = counts * E / (K * T)
    aux = c.aux_loss_alpha * mx.mean(mx.sum(f * normed.mean(axis=1), axis=-1))
    load = one_hot.sum(axis=(0, 1)) / (B * T * K)
    return out.reshape(B, T, D), aux, load


def _feed_forward(p, h, c: ModelConfig):
    if "gate" in p:
        return moe(p, h, c)
    return swiglu(h, p["gate_proj"]["kernel"], p["up_proj"]["kernel"], p["down_proj"]["kernel"]), 0.0, None


# --- decoder -----------------------------------------------------------------------------


def decoder_layer(p, x, cos, sin, c: ModelConfig):
    h = rms_norm(x, p["input_layernorm"]["scale"], c.rms_norm_eps)
    x = x + attention(p["self_attn"], h, cos, sin, c)
    h = rms_norm(x, p["post_attention_layernorm"]["scale"], c.rms_norm_eps)
    out, aux, load = _feed_forward(p["mlp"], h, c)
    return x + out, aux, load


def logits_from_hidden(params, h, norm_scale, c: ModelConfig):
    h = rms_norm(h, norm_scale, c.rms_norm_eps)
    head = params["embed_tokens"]["embedding"].T if c.tie_word_embeddings else params["lm_head"]["kernel"]
    return h @ head


def _names(tree) -> list[str]:
    return sorted(tree, key=int)


def forward(params, tokens, c: ModelConfig, with_mtp: bool = False):
    """Returns (logits [B,T,V], aux) exactly as dsjax.model.forward does."""
    B, T = tokens.shape
    cos, sin = rope_cos_sin(c, mx.arange(T)[None, :])
    x = params["embed_tokens"]["embedding"][tokens]
    total_aux = mx.array(0.0)
    loads = []
    for name in _names(params["layers"]):
        x, aux, load = decoder_layer(params["layers"][name], x, cos, sin, c)
        total_aux = total_aux + aux
        if load is not None:
            loads.append(load)
    logits = logits_from_hidden(params, x, params["norm"]["scale"], c)
    out: dict[str, Any] = {}
    if with_mtp and "mtp" in params:
        h = x
        mtp_logits = []
        for k, name in enumerate(_names(params["mtp"]), start=1):
            m = params["mtp"][name]
            next_emb = params["embed_tokens"]["embedding"][mx.roll(tokens, -k, axis=1)]
            merged = mx.concatenate(
                [rms_norm(next_emb, m["enorm"]["scale"], c.rms_norm_eps), rms_norm(h, m["hnorm"]["scale"], c.rms_norm_eps)],
                axis=-1,
            )
            h = merged @ m["eh_proj"]["kernel"]
            h, aux, load = decoder_layer(m["block"], h, cos, sin, c)
            total_aux = total_aux + aux
            if load is not None:
                loads.append(load)
            mtp_logits.append(logits_from_hidden(params, h, m["shared_head_norm"]["scale"], c))
        out["mtp_logits"] = mx.stack(mtp_logits)
    out["balance_loss"] = total_aux
    out["expert_load"] = mx.stack(loads) if loads else mx.zeros((0, max(c.n_routed_experts, 1)))
    return logits, out


def token_cross_entropy(logits, targets):
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def loss_fn(params, window, c: ModelConfig, with_mtp: bool = True):
    """Same objective as dsjax.model.loss_fn: CE + balance loss + (lambda / D) * MTP losses."""
    inputs, targets = window[:, :-1], window[:, 1:]
    use_mtp = with_mtp and c.num_nextn_predict_layers > 0
    logits, aux = forward(params, inputs, c, with_mtp=use_mtp)
    ce = mx.mean(token_cross_entropy(logits, targets))
    loss = ce + aux["balance_loss"]
    metrics = {"ce_loss": ce, "balance_loss": aux["balance_loss"], "expert_load": aux["expert_load"]}
    if use_mtp:
        T = inputs.shape[1]
        losses = []
        for k in range(1, c.num_nextn_predict_layers + 1):
            shifted = mx.roll(targets, -k, axis=1)
            valid = (mx.arange(T) < T - k).astype(mx.float32)
            nll = token_cross_entropy(aux["mtp_logits"][k - 1], shifted)
            losses.append(mx.sum(nll * valid) / (nll.shape[0] * mx.sum(valid)))
        mtp_loss = mx.mean(mx.stack(losses))
        loss = loss + c.mtp_loss_weight * mtp_loss
        metrics["mtp_loss"] = mtp_loss
    metrics["loss"] = loss
    return loss, metrics


def moe_layer_paths(c: ModelConfig, with_mtp: bool = True) -> list[tuple[str, ...]]:
    paths = [("layers", str(i), "mlp") for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
    if with_mtp and c.n_routed_experts > 0:
        paths += [("mtp", str(k), "block", "mlp") for k in range(c.num_nextn_predict_layers)]
    return paths


def apply_bias_updates(params, expert_load, c: ModelConfig):
    """In place: each router's bias += speed * sign(mean load - load)."""
    for row, path in enumerate(moe_layer_paths(c)):
        node = params
        for key in path:
            node = node[key]
        load = expert_load[row]
        node["gate"]["e_score_correction_bias"] = node["gate"]["e_score_correction_bias"] + c.bias_update_speed * mx.sign(
            mx.mean(load) - load
        )
    return params


# --- cached decoding ---------------------------------------------------------------------


def init_cache(c: ModelConfig, batch: int, max_len: int) -> dict[str, list]:
    L = c.num_hidden_layers
    return {
        "ckv": [mx.zeros((batch, max_len, c.kv_lora_rank)) for _ in range(L)],
        "kpe": [mx.zeros((batch, max_len, c.qk_rope_head_dim)) for _ in range(L)],
    }


def decode_step(params, tokens, cache, start: int, c: ModelConfig):
    """Tokens at positions start..start+T-1 against the cache (updated in place); returns logits."""
    B, T = tokens.shape
    cos, sin = rope_cos_sin(c, (start + mx.arange(T))[None, :])
    x = params["embed_tokens"]["embedding"][tokens]
    for i, name in enumerate(_names(params["layers"])):
        p = params["layers"][name]
        h = rms_norm(x, p["input_layernorm"]["scale"], c.rms_norm_eps)
        attn, cache["ckv"][i], cache["kpe"][i] = decode_attention(
            p["self_attn"], h, cos, sin, cache["ckv"][i], cache["kpe"][i], start, c
        )
        x = x + attn
        h = rms_norm(x, p["post_attention_layernorm"]["scale"], c.rms_norm_eps)
        x = x + _feed_forward(p["mlp"], h, c)[0]
    return logits_from_hidden(params, x, params["norm"]["scale"], c)
