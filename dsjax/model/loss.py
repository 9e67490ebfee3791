"""Training objective: next-token cross-entropy + weighted MTP losses + sequence-wise balance loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.layers import rms_norm
from dsjax.model.transformer import forward, forward_hidden, head_kernel

# fp32 logits a chunk may hold: 2**27 values = 512 MiB (4,096 tokens at a 32,000 vocabulary)
CHUNK_LOGITS = 2**27


def token_cross_entropy(logits_BTV, targets_BT):
    """Per-token negative log-likelihood in nats (fp32)."""
    logits = logits_BTV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    if jax.sharding.get_abstract_mesh().empty:
        target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    else:
        # a masked sum instead of a gather: with the vocabulary split over tp, each shard
        # sums its own slice and one all-reduce finishes it (no shard gathers the logits)
        vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        target_logit = jnp.sum(jnp.where(vocab_ids == targets_BT[..., None], logits, 0.0), axis=-1)
    return log_z - target_logit


def chunked_head_nll(h_BTD, norm_scale, head_DV, targets_BT, weight_BT, c: ModelConfig, chunk_tokens: int | None = None):
    """sum(weight * nll) of norm + head + cross-entropy, without ever holding [B*T, V] logits.

    Tokens are split into chunks of `chunk_tokens`; each chunk's logits are made,
    reduced to its weighted NLL and dropped, and `jax.checkpoint` makes the backward
    pass remake them chunk by chunk instead of saving them (with a single chunk,
    nothing is remade: the logits are within budget and recomputing them costs a
    third more head FLOPs). Same value and gradients
    as `token_cross_entropy` over full logits (summation order aside).
    """
    B, T, D = h_BTD.shape
    V = head_DV.shape[1]
    N = B * T
    C = chunk_tokens or max(1, min(N, CHUNK_LOGITS // V))
    n = -(-N // C)
    pad = n * C - N
    h_ND = jnp.pad(h_BTD.reshape(N, D), ((0, pad), (0, 0)))
    t_N = jnp.pad(targets_BT.reshape(N), (0, pad))
    w_N = jnp.pad(weight_BT.reshape(N).astype(jnp.float32), (0, pad))  # padded tokens weigh 0

    def chunk_nll(h_CD, t_C, w_C):
        normed = rms_norm(h_CD, norm_scale, c.rms_norm_eps)
        logits_CV = jnp.dot(normed, head_DV.astype(normed.dtype), preferred_element_type=jnp.float32)
        nll_C = token_cross_entropy(logits_CV, t_C)
        return jnp.sum(nll_C * w_C)

    # one chunk (every token's logits fit the budget, as for nano on CPU): keep them for the
    # backward pass like the plain path; several: remake each chunk's logits there instead
    chunk_fn = jax.checkpoint(chunk_nll) if n > 1 else chunk_nll

    def body(total, chunk):
        return total + chunk_fn(*chunk), None

    chunks = (h_ND.reshape(n, C, D), t_N.reshape(n, C), w_N.reshape(n, C))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
    return total


def loss_fn(
    params, window_BT1, c: ModelConfig, *, with_mtp: bool = True, moe_impl: str = "auto", microbatches: int = 1,
    chunk_tokens: int | None = None,
):
    """window_BT1: packed token windows of length T + 1. Returns (loss, metrics).

    `microbatches` is the pipeline's microbatch count (used only when params hold pp stages).
    On one device the head and cross-entropy run in token chunks (`chunked_head_nll`), so
    the [tokens, vocab] fp32 logits never exist whole; under a mesh the logits are already
    split (vocab over tp, tokens over dp/sp) and the plain path keeps its sharding.
    """
    if not jax.sharding.get_abstract_mesh().empty:
        return _loss_from_logits(params, window_BT1, c, with_mtp=with_mtp, moe_impl=moe_impl, microbatches=microbatches)
    inputs_BT, targets_BT = window_BT1[:, :-1], window_BT1[:, 1:]
    B, T = inputs_BT.shape
    use_mtp = with_mtp and c.num_nextn_predict_layers > 0
    h_BTD, aux = forward_hidden(params, inputs_BT, c, with_mtp=use_mtp, moe_impl=moe_impl, microbatches=microbatches)
    head_DV = head_kernel(params, c)
    ones_BT = jnp.ones((B, T), jnp.float32)
    ce = chunked_head_nll(h_BTD, params["norm"]["scale"], head_DV, targets_BT, ones_BT, c, chunk_tokens) / (B * T)
    loss = ce + aux["balance_loss"]
    metrics = {"ce_loss": ce, "balance_loss": aux["balance_loss"], "expert_load": aux["expert_load"]}
    if use_mtp:
        mtp_losses = []
        for k, (name, h_k) in enumerate(zip(sorted(params["mtp"], key=int), aux["mtp_hidden"]), start=1):
            # module k at position i predicts token i + k + 1 = targets[i + k]; the last k positions have none
            shifted_BT = jnp.roll(targets_BT, -k, axis=1)
            valid_BT = jnp.broadcast_to((jnp.arange(T) < T - k).astype(jnp.float32), (B, T))
            norm_scale = params["mtp"][name]["shared_head_norm"]["scale"]
            nll = chunked_head_nll(h_k, norm_scale, head_DV, shifted_BT, valid_BT, c, chunk_tokens)
            mtp_losses.append(nll / (B * (T - k)) if T > k else jnp.zeros((), jnp.float32))
        mtp_loss = jnp.mean(jnp.stack(mtp_losses))  # = sum_k / D
        loss = loss + c.mtp_loss_weight * mtp_loss
        metrics["mtp_loss"] = mtp_loss
    metrics["loss"] = loss
    return loss, metrics


def _loss_from_logits(
    params, window_BT1, c: ModelConfig, *, with_mtp: bool = True, moe_impl: str = "auto", microbatches: int = 1
):
    """The objective over whole logits (the reference `chunked_head_nll` is tested against; mesh path)."""
    inputs_BT, targets_BT = window_BT1[:, :-1], window_BT1[:, 1:]
    use_mtp = with_mtp and c.num_nextn_predict_layers > 0
    logits_BTV, aux = forward(
        params, inputs_BT, c, with_mtp=use_mtp, moe_impl=moe_impl, microbatches=microbatches
    )
    ce = jnp.mean(token_cross_entropy(logits_BTV, targets_BT))
    loss = ce + aux["balance_loss"]
    metrics = {"ce_loss": ce, "balance_loss": aux["balance_loss"], "expert_load": aux["expert_load"]}
    if use_mtp:
        T = inputs_BT.shape[1]
        depth = c.num_nextn_predict_layers
        mtp_losses = []
        for k in range(1, depth + 1):
            # module k at position i predicts token i + k + 1 = targets[i + k]; the last k positions have none
            shifted_BT = jnp.roll(targets_BT, -k, axis=1)
            valid_T = (jnp.arange(T) < T - k).astype(jnp.float32)
            nll_BT = token_cross_entropy(aux["mtp_logits"][k - 1], shifted_BT)
            mtp_losses.append(jnp.sum(nll_BT * valid_T) / (nll_BT.shape[0] * jnp.sum(valid_T)))
        mtp_loss = jnp.mean(jnp.stack(mtp_losses))  # = sum_k / D
        loss = loss + c.mtp_loss_weight * mtp_loss
        metrics["mtp_loss"] = mtp_loss
    metrics["loss"] = loss
    return loss, metrics
