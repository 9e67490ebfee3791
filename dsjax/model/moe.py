"""DeepSeekMoE: shared experts plus fine-grained routed SwiGLU experts.

Routing (DeepSeek-V3):
- affinities s = sigmoid(x @ W_gate) (softmax selectable for V2-style models);
- the per-expert bias b (`e_score_correction_bias`) is added only to *choose*
  experts: groups are ranked by the sum of their top-2 biased scores, the best
  `topk_group` of `n_group` groups are kept, and the top `num_experts_per_tok`
  experts are taken from those;
- gate values come from the unbiased s of the chosen experts, normalised over
  them when `norm_topk_prob`, times `routed_scaling_factor`. No token is dropped.

Balancing: the aux-loss-free bias update (b += speed * sign(mean load - load))
is applied by the trainer from the `expert_load` this module returns; the small
sequence-wise balance loss alpha * sum_i f_i P_i is returned as `balance_loss`.

Two compute paths give the same result: `dense` runs every expert on every token
and masks with the gate values (fastest on CPU for few experts), `ragged` sorts
token copies by expert and uses `jax.lax.ragged_dot` (no wasted FLOPs; for GPU).
A third, `pallas`, runs the grouped-matmul kernels of `kernels_pallas/moe.py`; where
they cannot take a call (a multi-device mesh, another dtype) it falls back to
`dense` with a one-time log line.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.layers import swiglu
from meshes.expert_parallel import current_scheme, ep_size, expert_parallel, expert_parallel_dispatch


def top_k_mask(values_TN, k: int):
    """[T, N] bool: each row's k largest values, ties to the lower index: the entries `lax.top_k` picks.

    Ranks by pairwise comparison ([T, N, N]), for the few experts or groups of a router: where
    `lax.top_k` is a kernel of its own on a GPU (three per MoE layer and token when decoding),
    this fuses with the ops around it.
    """
    N = values_TN.shape[-1]
    above_TNN = values_TN[..., None, :] > values_TN[..., :, None]  # [t, i, j]: j beats i
    tied_before_TNN = (values_TN[..., None, :] == values_TN[..., :, None]) & (jnp.arange(N)[None, :] < jnp.arange(N)[:, None])
    rank_TN = jnp.sum(above_TNN | tied_before_TNN, axis=-1)
    return rank_TN < k


def keep_best_groups(choice_TE, c: ModelConfig):
    """choice_TE with the experts outside each token's `topk_group` best groups at -inf; a group's score
    is the sum of its two best choices. By ranks (`top_k_mask`): the groups `lax.top_k` would pick,
    the same scores, and no scatter."""
    T, E = choice_TE.shape
    grouped_TGe = choice_TE.reshape(T, c.n_group, E // c.n_group)
    group_score_TG = jnp.sum(jnp.where(top_k_mask(grouped_TGe, 2), grouped_TGe, 0.0), axis=-1)
    keep_TE = jnp.repeat(top_k_mask(group_score_TG, c.topk_group), E // c.n_group, axis=1)
    return jnp.where(keep_TE, choice_TE, -jnp.inf)


def route(logits_TE, bias_E, c: ModelConfig):
    """Returns (expert_idx_TK, gate_TK, scores_TE) from fp32 router logits."""
    if c.scoring_func == "sigmoid":
        scores_TE = jax.nn.sigmoid(logits_TE)
    else:
        scores_TE = jax.nn.softmax(logits_TE, axis=-1)
    choice_TE = jax.lax.stop_gradient(scores_TE) + jax.lax.stop_gradient(bias_E)
    if c.n_group > 1:
        choice_TE = keep_best_groups(choice_TE, c)
    _, expert_idx_TK = jax.lax.top_k(choice_TE, c.num_experts_per_tok)
    gate_TK = jnp.take_along_axis(scores_TE, expert_idx_TK, axis=-1)
    if c.norm_topk_prob:
        gate_TK = gate_TK / (gate_TK.sum(-1, keepdims=True) + 1e-20)
    return expert_idx_TK, gate_TK * c.routed_scaling_factor, scores_TE


def balance_loss(scores_BTE, expert_idx_BTK, c: ModelConfig):
    """Sequence-wise balance loss of DeepSeek-V3 (eqs. 17-20), averaged over sequences."""
    E, K = c.n_routed_experts, c.num_experts_per_tok
    T = scores_BTE.shape[1]
    normed_BTE = scores_BTE / (scores_BTE.sum(-1, keepdims=True) + 1e-20)
    p_BE = normed_BTE.mean(axis=1)
    counts_BE = jax.nn.one_hot(expert_idx_BTK, E, dtype=jnp.float32).sum(axis=(1, 2))
    f_BE = counts_BE * E / (K * T)
    return c.aux_loss_alpha * jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))


def combine_weights(expert_idx_TK, gate_TK, E: int):
    """[T, E] gate value of each (token, expert) pair; zero where the expert was not chosen."""
    return jnp.sum(jax.nn.one_hot(expert_idx_TK, E, dtype=jnp.float32) * gate_TK[..., None], axis=1)


def wide_expert_weights(experts):
    """The experts' gate and up weights as [D, E*F] matrices, the layout experts_masked multiplies by."""
    E, D, F = experts["gate_proj"].shape
    return experts["gate_proj"].transpose(1, 0, 2).reshape(D, E * F), experts["up_proj"].transpose(1, 0, 2).reshape(D, E * F)


def experts_masked(experts, x_TD, combine_TE):
    # Every expert as one wide matmul over [D, E*F]: on CPU this is ~3x faster than a
    # per-expert einsum, and for few experts faster than computing only the chosen ones.
    dtype = x_TD.dtype
    E, D, F = experts["gate_proj"].shape
    gate_DX, up_DX = (w.astype(dtype) for w in wide_expert_weights(experts))
    hidden_TX = jax.nn.silu(x_TD @ gate_DX) * (x_TD @ up_DX)
    hidden_TX = (hidden_TX.reshape(-1, E, F) * combine_TE.astype(dtype)[..., None]).reshape(-1, E * F)
    return hidden_TX @ experts["down_proj"].astype(dtype).reshape(E * F, D)


def _experts_dense(experts, x_TD, expert_idx_TK, gate_TK):
    combine_TE = combine_weights(expert_idx_TK, gate_TK, experts["gate_proj"].shape[0])
    return experts_masked(experts, x_TD, combine_TE)


def _experts_ragged(experts, x_TD, expert_idx_TK, gate_TK):
    dtype = x_TD.dtype
    T, K = expert_idx_TK.shape
    E = experts["gate_proj"].shape[0]
    flat_expert_N = expert_idx_TK.reshape(-1)
    order_N = jnp.argsort(flat_expert_N, stable=True)
    token_N = order_N // K
    group_sizes_E = jnp.bincount(flat_expert_N, length=E).astype(jnp.int32)
    x_ND = x_TD[token_N]
    hidden_NF = jax.nn.silu(
        jax.lax.ragged_dot(x_ND, experts["gate_proj"].astype(dtype), group_sizes_E)
    ) * jax.lax.ragged_dot(x_ND, experts["up_proj"].astype(dtype), group_sizes_E)
    out_ND = jax.lax.ragged_dot(hidden_NF, experts["down_proj"].astype(dtype), group_sizes_E)
    out_ND = out_ND * gate_TK.reshape(-1)[order_N].astype(dtype)[:, None]
    return jnp.zeros_like(x_TD).at[token_N].add(out_ND)


@functools.cache
def _log_once(message: str) -> None:
    logging.getLogger(__name__).info(message)


def _experts_pallas(experts, x_TD, expert_idx_TK, gate_TK):
    from kernels_pallas import fallbacks, moe as kernels  # Pallas is imported only when this path is chosen

    reason = kernels.unsupported_reason(x_TD)
    if reason is not None:
        fallbacks.note("moe", "pallas", "dense", reason)
        _log_once(f"--moe pallas: {reason}; using the dense path")
        return _experts_dense(experts, x_TD, expert_idx_TK, gate_TK)
    if kernels.default_interpret():
        fallbacks.note("moe", "pallas", "pallas", f"interpreted on {jax.default_backend()}")
        _log_once(f"--moe pallas: interpreting the kernels on {jax.default_backend()} (slow; they compile for NVIDIA GPUs)")
    return kernels.experts_pallas(experts, x_TD, expert_idx_TK, gate_TK)


def _experts_blocked(experts, x_TD, expert_idx_TK, gate_TK):
    from kernels_pallas.moe import experts_blocked

    return experts_blocked(experts, x_TD, expert_idx_TK, gate_TK)


EXPERT_PATHS = {"dense": _experts_dense, "ragged": _experts_ragged, "blocked": _experts_blocked, "pallas": _experts_pallas}


def _multi_device_mesh() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


def resolve_impl(impl: str, c: ModelConfig | None = None, tokens: int | None = None) -> str:
    """The compute path: an explicit `impl` wins, then `model.moe_impl`, then the measured default.

    `auto` is measured (BENCHMARKS.md, H200, bf16): on GPU the Pallas grouped matmul
    (small's train step 42.7 ms against 50.1 ms dense; its MoE layer 1.06 vs 1.55 ms,
    medium's 1.86 vs 5.07 ms; equal for tiny), never `ragged` (`ragged_dot` ran 8-13x
    slower than dense there); on CPU `blocked`, the same grouped layout in plain jnp
    (nano's train step 1.3x faster than dense on 2 cores). `auto` keeps the dense path
    under a multi-device mesh (its matmuls shard by the rules table, where a sort over
    sharded tokens would gather them) and for too few tokens to fill the row blocks
    (generation).
    """
    if impl == "auto" and c is not None:
        impl = c.moe_impl
    if impl == "auto":
        if _multi_device_mesh() or (c is not None and tokens is not None and not _fills_blocks(c, tokens)):
            return "dense"
        return "pallas" if jax.default_backend() == "gpu" else "blocked"
    return impl


def _fills_blocks(c: ModelConfig, tokens: int) -> bool:
    """Whether the sorted paths pay: each expert's rows are padded to a block (64-128 rows),
    so with few tokens (decoding one token per row) they would compute mostly padding."""
    return tokens * c.num_experts_per_tok >= 2 * 64 * c.n_routed_experts


def moe(p, x_BTD, c: ModelConfig, impl: str = "auto"):
    """Returns (out_BTD, balance_loss, expert_load_E) where load is each expert's share of routed slots."""
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    logits_TE = jnp.dot(x_TD, p["gate"]["kernel"].astype(x_TD.dtype), preferred_element_type=jnp.float32)
    expert_idx_TK, gate_TK, scores_TE = route(logits_TE, p["gate"]["e_score_correction_bias"], c)
    K, E = c.num_experts_per_tok, c.n_routed_experts
    if ep_size() > 1:
        if current_scheme() == "all_to_all":
            # each (token, expert) copy goes to its expert's ep shard, which runs the one-device
            # path chosen by `impl` on the rows it receives; results come back and are gate-combined
            local_fn = EXPERT_PATHS[resolve_impl(impl, c, B * T)]
            out_BTD = expert_parallel_dispatch(
                local_fn, p["experts"], x_BTD, expert_idx_TK.reshape(B, T, K), gate_TK.reshape(B, T, K)
            )
        else:
            # replicate-and-mask, the reference scheme
            combine_BTE = combine_weights(expert_idx_TK, gate_TK, E).reshape(B, T, E)
            out_BTD = expert_parallel(experts_masked, p["experts"], x_BTD, combine_BTE)
        out_TD = out_BTD.reshape(B * T, D)
    else:
        experts_fn = EXPERT_PATHS[resolve_impl(impl, c, B * T)]
        out_TD = experts_fn(p["experts"], x_TD, expert_idx_TK, gate_TK)
    if "shared_experts" in p:
        s = p["shared_experts"]
        out_TD = out_TD + swiglu(x_TD, s["gate_proj"]["kernel"], s["up_proj"]["kernel"], s["down_proj"]["kernel"])
    aux_loss = balance_loss(scores_TE.reshape(B, T, E), expert_idx_TK.reshape(B, T, K), c)
    load_E = jnp.bincount(expert_idx_TK.reshape(-1), length=E).astype(jnp.float32) / (B * T * K)
    return out_TD.reshape(B, T, D), aux_loss, load_E


# --- decoding a few tokens ------------------------------------------------------------

DECODE_IN, DECODE_OUT = "decode_in_DX", "decode_out_XD"


def route_combine(logits_TE, bias_E, c: ModelConfig):
    """`combine_weights(*route(...)[:2])` without a sort: the same experts (ties as `lax.top_k`) and gates."""
    scores_TE = jax.nn.sigmoid(logits_TE) if c.scoring_func == "sigmoid" else jax.nn.softmax(logits_TE, axis=-1)
    choice_TE = scores_TE + bias_E
    if c.n_group > 1:
        choice_TE = keep_best_groups(choice_TE, c)
    gate_TE = jnp.where(top_k_mask(choice_TE, c.num_experts_per_tok), scores_TE, 0.0)
    if c.norm_topk_prob:
        gate_TE = gate_TE / (gate_TE.sum(-1, keepdims=True) + 1e-20)
    return gate_TE * c.routed_scaling_factor


def decode_weights(p):
    """The MoE params `p` plus two matrices, so a decoded token takes one product in and one out:
    `decode_in_DX`, the router, the shared experts' gate and up and every routed expert's gate and
    up side by side ([D, E + 2*Fs + 2*E*F]), and `decode_out_XD`, the shared and routed down
    projections stacked ([Fs + E*F, D]). `transformer.with_decode_layouts` makes them once per
    sampling call; `moe_decode` makes them itself from plain params."""
    experts = p["experts"]
    E, D, F = experts["gate_proj"].shape
    ins, outs = [p["gate"]["kernel"]], []
    if "shared_experts" in p:
        s = p["shared_experts"]
        ins += [s["gate_proj"]["kernel"], s["up_proj"]["kernel"]]
        outs.append(s["down_proj"]["kernel"])
    ins += list(wide_expert_weights(experts))
    outs.append(experts["down_proj"].reshape(E * F, D))
    return {**p, DECODE_IN: jnp.concatenate(ins, axis=1), DECODE_OUT: jnp.concatenate(outs, axis=0)}


def moe_decode(p, x_BTD, c: ModelConfig, impl: str = "auto"):
    """`moe`'s output for a few tokens (decoding), every expert computed and masked as `dense` does,
    with one product into the layer and one out of it (`decode_weights`) and routing without sorts.

    Where `moe` would take another path (many tokens, a chosen `moe_impl`, expert parallelism),
    it is `moe`.
    """
    B, T, D = x_BTD.shape
    if ep_size() > 1 or resolve_impl(impl, c, B * T) != "dense":
        return moe(p, x_BTD, c, impl)[0]
    dtype = x_BTD.dtype
    E, _, F = p["experts"]["gate_proj"].shape
    w = p if DECODE_IN in p else decode_weights(p)
    proj_TX = jnp.dot(x_BTD.reshape(B * T, D), w[DECODE_IN].astype(dtype), preferred_element_type=jnp.float32)
    combine_TE = route_combine(proj_TX[:, :E], p["gate"]["e_score_correction_bias"], c)
    hidden = []
    at = E
    if "shared_experts" in p:
        Fs = p["shared_experts"]["gate_proj"]["kernel"].shape[1]
        gate_TF, up_TF = proj_TX[:, at : at + Fs].astype(dtype), proj_TX[:, at + Fs : at + 2 * Fs].astype(dtype)
        hidden.append(jax.nn.silu(gate_TF) * up_TF)
        at += 2 * Fs
    gate_TX, up_TX = proj_TX[:, at : at + E * F].astype(dtype), proj_TX[:, at + E * F :].astype(dtype)
    routed_TEF = (jax.nn.silu(gate_TX) * up_TX).reshape(-1, E, F) * combine_TE.astype(dtype)[..., None]
    hidden.append(routed_TEF.reshape(-1, E * F))
    out_TD = jnp.concatenate(hidden, axis=-1) @ w[DECODE_OUT].astype(dtype)
    return out_TD.reshape(B, T, D)


def bias_update(bias_E, load_E, speed: float):
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.

    Leading axes (stacked pipeline layers [S, L_s, E]) are separate routers: each compares
    its experts with its own mean load.
    """
    return bias_E + speed * jnp.sign(jnp.mean(load_E, axis=-1, keepdims=True) - load_E)
