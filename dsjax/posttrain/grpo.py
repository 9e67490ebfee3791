"""GRPO's objective as pure JAX: group advantages, per-token log-probs, the clipped surrogate with a k3 KL.

For P prompts and G samples each (B = P * G rows), with per-token log-probs under the
policy (logp), the policy that sampled the batch (old) and the frozen reference (ref):

    A_i     = (r_i - mean_group(r)) / (std_group(r) + 1e-4)     (dr_grpo: no std division)
    ratio_t = exp(logp_t - old_t)
    pg_t    = -min(ratio_t * A_i, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A_i)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1         (k3: unbiased, >= 0)
    l_t     = pg_t + beta * kl_t

over each row's completion tokens (mask m_t = 1; prompt and padding 0), aggregated as

    grpo     mean over rows of (sum_t m_t l_t / sum_t m_t)             (DeepSeekMath)
    dr_grpo  sum_{i,t} m_t l_t / (B * max_new_tokens)                  (Dr. GRPO: constant normaliser)
    dapo     sum_{i,t} m_t l_t / sum_{i,t} m_t                         (DAPO: token-level mean)

With one update per batch (mu = 1) old = stop_gradient(logp), so ratio = 1 and the
gradient is A * grad logp; with mu > 1 the loop passes the log-probs of the sampling
policy. std is the population std of the group. Subtracting the group's first reward
before the mean makes a group of equal rewards give advantages of exactly 0 (a float
mean of equal values need not equal them), so such a group contributes exactly no
policy gradient. The MoE balance loss is not part of this objective and the routing
biases are not moved (they get no gradient; see dsjax.train.optimizer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from dsjax import model
from dsjax.config import Config, ModelConfig, TrainingConfig
from dsjax.model.layers import rms_norm
from dsjax.model.loss import default_chunk_tokens
from dsjax.model.transformer import forward_hidden, head_kernel
from dsjax.train.optimizer import global_norm, lr_schedule, make_optimizer
from dsjax.train.step import TrainState, state_shardings_for, under_mesh
from meshes.expert_parallel import with_scheme
from meshes.mesh import BATCH_AXES

AGGREGATIONS = ("grpo", "dr_grpo", "dapo")
STD_EPS = 1e-4


@dataclass(frozen=True)
class ObjectiveSpec:
    epsilon: float = 0.2
    epsilon_high: float = 0.0  # 0 = epsilon
    beta: float = 0.04
    aggregation: str = "grpo"
    max_new_tokens: int = 160  # dr_grpo's constant normaliser

    @classmethod
    def from_config(cls, g) -> "ObjectiveSpec":
        return cls(g.epsilon, g.epsilon_high, g.beta, g.loss_aggregation, g.max_new_tokens)

    @property
    def upper(self) -> float:
        return self.epsilon_high or self.epsilon


def group_advantages(rewards_PG, scale: bool = True):
    """Advantages [P, G]: each sample's reward against its group's mean (and std when `scale`)."""
    r = jnp.asarray(rewards_PG, jnp.float32)
    centered = r - r[:, :1]  # exact zeros for a group of equal rewards (see the module docstring)
    centered = centered - jnp.mean(centered, axis=1, keepdims=True)
    if not scale:
        return centered
    return centered / (jnp.std(centered, axis=1, keepdims=True) + STD_EPS)


def _chunk_logprobs(h_CD, t_C, norm_scale, head_DV, c: ModelConfig):
    """(log p(target), entropy) per token of one chunk; its fp32 logits live only inside."""
    normed = rms_norm(h_CD, norm_scale, c.rms_norm_eps)
    logits_CV = jnp.dot(normed, head_DV.astype(normed.dtype), preferred_element_type=jnp.float32)
    logp_CV = jax.nn.log_softmax(logits_CV, axis=-1)
    target_C = jnp.take_along_axis(logp_CV, t_C[:, None], axis=-1)[:, 0]
    probs = jax.lax.stop_gradient(jnp.exp(logp_CV))
    entropy_C = -jnp.sum(probs * jax.lax.stop_gradient(logp_CV), axis=-1)  # a metric: no gradient
    return target_C, entropy_C


def token_logprobs(params, tokens_BL, c: ModelConfig, chunk_tokens: int | None = None, moe_impl: str = "auto"):
    """(logp_BT, entropy_BT), T = L - 1: log p(tokens[:, t+1] | tokens[:, :t+1]) and the entropy there.

    The head runs in token chunks as in `loss.chunked_head_nll`: each chunk's [C, V] fp32
    logits are made, reduced and dropped, and with several chunks `jax.checkpoint` remakes
    them in the backward pass, so [B, T, V] logits never exist.
    """
    if not jax.sharding.get_abstract_mesh().empty:
        return _split_logprobs(params, tokens_BL, c, moe_impl)
    inputs_BT, targets_BT = tokens_BL[:, :-1], tokens_BL[:, 1:]
    B, T = inputs_BT.shape
    h_BTD, _ = forward_hidden(params, inputs_BT, c, moe_impl=moe_impl)
    head_DV = head_kernel(params, c)
    D, V = h_BTD.shape[-1], head_DV.shape[1]
    N = B * T
    C = chunk_tokens or default_chunk_tokens(N, V)
    n = -(-N // C)
    pad = n * C - N
    h_nCD = jnp.pad(h_BTD.reshape(N, D), ((0, pad), (0, 0))).reshape(n, C, D)
    t_nC = jnp.pad(targets_BT.reshape(N), (0, pad)).reshape(n, C)
    scale = params["norm"]["scale"]

    def chunk(args):
        return _chunk_logprobs(args[0], args[1], scale, head_DV, c)

    logp_nC, entropy_nC = jax.lax.map(jax.checkpoint(chunk) if n > 1 else chunk, (h_nCD, t_nC))
    return logp_nC.reshape(-1)[:N].reshape(B, T), entropy_nC.reshape(-1)[:N].reshape(B, T)


def _split_logprobs(params, tokens_BL, c: ModelConfig, moe_impl: str = "auto"):
    """`token_logprobs` under a mesh: the logits are already split (vocabulary over tp, rows over dp/ep,
    tokens over sp), so the whole-logits path keeps that layout, as the pretraining loss does there.
    The target's log-prob is a masked sum over each vocabulary shard (`token_cross_entropy`), not a gather."""
    logits_BTV, _ = model.forward(params, tokens_BL[:, :-1], c, moe_impl=moe_impl)
    logits_BTV = logits_BTV.astype(jnp.float32)
    logp_BT = -model.token_cross_entropy(logits_BTV, tokens_BL[:, 1:])
    logp_BTV = jax.lax.stop_gradient(logits_BTV - jax.nn.logsumexp(logits_BTV, axis=-1, keepdims=True))
    entropy_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)  # a metric: no gradient
    return logp_BT, entropy_BT


def token_logprobs_reference(params, tokens_BL, c: ModelConfig):
    """The plain path over whole [B, T, V] logits (what `token_logprobs` is tested against)."""
    logits_BTV, _ = model.forward(params, tokens_BL[:, :-1], c)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logp_BTV, tokens_BL[:, 1:, None], axis=-1)[..., 0]
    return target_BT, -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)


def grpo_objective(logp_BT, old_logp_BT, ref_logp_BT, adv_B, mask_BT, spec: ObjectiveSpec):
    """(loss, metrics) of the clipped surrogate plus beta * k3 KL, aggregated per `spec.aggregation`."""
    if spec.aggregation not in AGGREGATIONS:
        raise ValueError(f"grpo.loss_aggregation must be one of {', '.join(AGGREGATIONS)}, got {spec.aggregation!r}")
    mask = mask_BT.astype(jnp.float32)
    adv = adv_B.astype(jnp.float32)[:, None]
    ratio = jnp.exp(logp_BT - old_logp_BT)
    clipped = jnp.clip(ratio, 1.0 - spec.epsilon, 1.0 + spec.upper)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    log_ref_ratio = ref_logp_BT - logp_BT
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
    per_token = pg + spec.beta * kl
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    if spec.aggregation == "grpo":
        per_row = jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        loss = jnp.mean(per_row)
    elif spec.aggregation == "dr_grpo":
        loss = jnp.sum(per_token * mask) / (mask.shape[0] * spec.max_new_tokens)
    else:
        loss = jnp.sum(per_token * mask) / tokens
    # the clip is active where min() picks the clipped term: above 1 + eps_high with A > 0, below 1 - eps with A < 0
    is_clipped = ((ratio > 1.0 + spec.upper) & (adv > 0)) | ((ratio < 1.0 - spec.epsilon) & (adv < 0))
    metrics = {
        "kl": jnp.sum(kl * mask) / tokens,
        "clip_fraction": jnp.sum(is_clipped * mask) / tokens,
        "policy_loss": jnp.sum(pg * mask) / tokens,
    }
    return loss, metrics


def policy_loss(params, batch: dict, c: ModelConfig, spec: ObjectiveSpec, chunk_tokens: int | None = None):
    """The GRPO loss of `params` on a batch {tokens [B, L], mask [B, L-1], adv [B], old? [B, L-1], ref? [B, L-1]}.

    A missing `old` means mu = 1 (old = stop_gradient(logp)); a missing `ref` means beta = 0
    (ref = stop_gradient(logp): KL exactly 0, no reference forward pass).
    """
    logp, entropy = token_logprobs(params, batch["tokens"], c, chunk_tokens)
    fixed = jax.lax.stop_gradient(logp)
    old = batch.get("old", fixed)
    ref = batch.get("ref", fixed)
    loss, metrics = grpo_objective(logp, old, ref, batch["adv"], batch["mask"], spec)
    mask = batch["mask"].astype(jnp.float32)
    metrics["entropy"] = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    metrics["loss"] = loss
    return loss, metrics


# cached on their (hashable) arguments: a resumed or repeated stage in one process reuses the compiled programs
@functools.lru_cache(maxsize=4)
def make_logprobs(c: ModelConfig, chunk_tokens: int | None = None, mesh=None, ep_dispatch: str = "mask"):
    """Jitted logp_BT of a batch's tokens under some params (the sampling policy's, or the reference's).

    With a mesh it runs under it (the model's sharding constraints and expert-parallel dispatch
    apply) on params and tokens laid out as the step lays them out (`batch_shardings`).
    """
    fn = with_scheme(ep_dispatch, lambda params, tokens_BL: token_logprobs(params, tokens_BL, c, chunk_tokens)[0])
    return under_mesh(mesh, jax.jit(fn))


@functools.lru_cache(maxsize=4)
def make_grpo_step(
    c: ModelConfig, spec: ObjectiveSpec, t: TrainingConfig, chunk_tokens: int | None = None, mesh=None,
    ep_dispatch: str = "mask",
):
    """step(state, batch) -> (state, metrics): one `make_optimizer(t)` update on the GRPO loss (jitted, state donated).

    With a mesh the state keeps pretraining's layout (`state_shardings_for`: weights by the
    logical-axis rules, optimizer moments split over dp) and the batch comes split over the
    data-parallel axes (`batch_shardings`).
    """
    optimizer, schedule = make_optimizer(t), lr_schedule(t)
    loss_fn = with_scheme(ep_dispatch, lambda p, b: policy_loss(p, b, c, spec, chunk_tokens))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict):
        (_, metrics), grads = grad_fn(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = global_norm(grads)
        metrics["lr"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    shardings = state_shardings_for(Config(model=c, training=t), mesh, stages=1)
    return under_mesh(mesh, jax.jit(step, out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0))


def batch_shardings(batch: dict, mesh) -> dict:
    """Each batch array ([B, ...]: tokens, mask, adv, old, ref) with its rows split over the data-parallel axes."""
    return {k: NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (v.ndim - 1)))) for k, v in batch.items()}
