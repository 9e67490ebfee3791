"""Training objective: next-token cross-entropy + weighted MTP losses + sequence-wise balance loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.transformer import forward


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


def loss_fn(
    params, window_BT1, c: ModelConfig, *, with_mtp: bool = True, moe_impl: str = "auto", microbatches: int = 1
):
    """window_BT1: packed token windows of length T + 1. Returns (loss, metrics).

    `microbatches` is the pipeline's microbatch count (used only when params hold pp stages).
    """
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
