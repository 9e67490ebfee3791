"""The parameter tree: shapes, logical axis names, initialisation and closed-form counts.

Every parameter is declared once here as a `ParamSpec` (shape, logical axes,
initialiser). `init` materialises the specs, `logical_axes` returns the axes tree
that the mesh rules map to mesh axes, and `count_params` is the closed-form count
that tests compare against the materialised tree.

Mapping to Hugging Face DeepSeek-V3 tensors (prefix `model.` omitted; `kernel`
is the HF `weight` transposed to [in, out], with head dims split out):

| dsjax path                                         | shape                 | HF tensor                                   |
|----------------------------------------------------|-----------------------|---------------------------------------------|
| embed_tokens.embedding                             | [V, D]                | embed_tokens.weight                         |
| layers.i.input_layernorm.scale                     | [D]                   | layers.i.input_layernorm.weight             |
| layers.i.self_attn.q_proj.kernel (q_lora_rank=null)| [D, H, qk]            | layers.i.self_attn.q_proj.weight.T          |
| layers.i.self_attn.q_a_proj.kernel                 | [D, q_lora]           | layers.i.self_attn.q_a_proj.weight.T        |
| layers.i.self_attn.q_a_layernorm.scale             | [q_lora]              | layers.i.self_attn.q_a_layernorm.weight     |
| layers.i.self_attn.q_b_proj.kernel                 | [q_lora, H, qk]       | layers.i.self_attn.q_b_proj.weight.T        |
| layers.i.self_attn.kv_a_proj_with_mqa.kernel       | [D, kv_lora + rope]   | layers.i.self_attn.kv_a_proj_with_mqa.weight.T |
| layers.i.self_attn.kv_a_layernorm.scale            | [kv_lora]             | layers.i.self_attn.kv_a_layernorm.weight    |
| layers.i.self_attn.kv_b_proj.kernel                | [kv_lora, H, nope + v]| layers.i.self_attn.kv_b_proj.weight.T       |
| layers.i.self_attn.o_proj.kernel                   | [H, v, D]             | layers.i.self_attn.o_proj.weight.T          |
| layers.i.post_attention_layernorm.scale            | [D]                   | layers.i.post_attention_layernorm.weight    |
| layers.i.mlp.{gate,up}_proj.kernel (dense layer)   | [D, I]                | layers.i.mlp.{gate,up}_proj.weight.T        |
| layers.i.mlp.down_proj.kernel (dense layer)        | [I, D]                | layers.i.mlp.down_proj.weight.T             |
| layers.i.mlp.gate.kernel                           | [D, E]                | layers.i.mlp.gate.weight.T                  |
| layers.i.mlp.gate.e_score_correction_bias          | [E]                   | layers.i.mlp.gate.e_score_correction_bias   |
| layers.i.mlp.experts.{gate,up}_proj                | [E, D, F]             | layers.i.mlp.experts.N.{gate,up}_proj.weight.T, stacked over N |
| layers.i.mlp.experts.down_proj                     | [E, F, D]             | layers.i.mlp.experts.N.down_proj.weight.T, stacked |
| layers.i.mlp.shared_experts.{gate,up}_proj.kernel  | [D, S*F]              | layers.i.mlp.shared_experts.{gate,up}_proj.weight.T |
| layers.i.mlp.shared_experts.down_proj.kernel       | [S*F, D]              | layers.i.mlp.shared_experts.down_proj.weight.T |
| norm.scale                                         | [D]                   | norm.weight                                 |
| lm_head.kernel (absent when tied)                  | [D, V]                | lm_head.weight.T                            |
| mtp.k.enorm / hnorm / shared_head_norm .scale      | [D]                   | layers.(L+k).enorm / hnorm / shared_head.norm .weight |
| mtp.k.eh_proj.kernel                               | [2D, D]               | layers.(L+k).eh_proj.weight.T (input = [enorm(emb); hnorm(h)]) |
| mtp.k.block.*                                      | as a decoder layer    | layers.(L+k).* (MoE when experts exist)     |

The MTP modules share the embedding and output head with the main model, as in
DeepSeek-V3 (HF stores copies as layers.(L+k).embed_tokens / shared_head.head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str  # "normal" | "ones" | "zeros"

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def _dense(shape, axes):
    return ParamSpec(tuple(shape), tuple(axes), "normal")


def _norm(size):
    return ParamSpec((size,), ("norm",), "ones")


def attention_specs(c: ModelConfig) -> dict[str, Any]:
    D, H = c.hidden_size, c.num_attention_heads
    specs: dict[str, Any] = {}
    if c.q_lora_rank is None:
        specs["q_proj"] = {"kernel": _dense((D, H, c.qk_head_dim), ("embed", "heads", "head_dim"))}
    else:
        specs["q_a_proj"] = {"kernel": _dense((D, c.q_lora_rank), ("embed", "q_lora"))}
        specs["q_a_layernorm"] = {"scale": _norm(c.q_lora_rank)}
        specs["q_b_proj"] = {"kernel": _dense((c.q_lora_rank, H, c.qk_head_dim), ("q_lora", "heads", "head_dim"))}
    specs["kv_a_proj_with_mqa"] = {
        "kernel": _dense((D, c.kv_lora_rank + c.qk_rope_head_dim), ("embed", "kv_lora"))
    }
    specs["kv_a_layernorm"] = {"scale": _norm(c.kv_lora_rank)}
    specs["kv_b_proj"] = {
        "kernel": _dense((c.kv_lora_rank, H, c.qk_nope_head_dim + c.v_head_dim), ("kv_lora", "heads", "head_dim"))
    }
    specs["o_proj"] = {"kernel": _dense((H, c.v_head_dim, D), ("heads", "head_dim", "embed"))}
    return specs


def dense_mlp_specs(D: int, inner: int) -> dict[str, Any]:
    return {
        "gate_proj": {"kernel": _dense((D, inner), ("embed", "mlp"))},
        "up_proj": {"kernel": _dense((D, inner), ("embed", "mlp"))},
        "down_proj": {"kernel": _dense((inner, D), ("mlp", "embed"))},
    }


def moe_specs(c: ModelConfig) -> dict[str, Any]:
    D, E, F = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
    specs: dict[str, Any] = {
        "gate": {
            "kernel": _dense((D, E), ("embed", "exp")),
            "e_score_correction_bias": ParamSpec((E,), ("exp",), "zeros"),
        },
        "experts": {
            "gate_proj": _dense((E, D, F), ("exp", "embed", "mlp")),
            "up_proj": _dense((E, D, F), ("exp", "embed", "mlp")),
            "down_proj": _dense((E, F, D), ("exp", "mlp", "embed")),
        },
    }
    if c.n_shared_experts > 0:
        specs["shared_experts"] = dense_mlp_specs(D, c.n_shared_experts * F)
    return specs


def layer_specs(c: ModelConfig, moe: bool) -> dict[str, Any]:
    return {
        "input_layernorm": {"scale": _norm(c.hidden_size)},
        "self_attn": attention_specs(c),
        "post_attention_layernorm": {"scale": _norm(c.hidden_size)},
        "mlp": moe_specs(c) if moe else dense_mlp_specs(c.hidden_size, c.intermediate_size),
    }


def param_specs(c: ModelConfig) -> dict[str, Any]:
    D, V = c.hidden_size, c.vocab_size
    specs: dict[str, Any] = {
        "embed_tokens": {"embedding": _dense((V, D), ("vocab", "embed"))},
        "layers": {str(i): layer_specs(c, c.is_moe_layer(i)) for i in range(c.num_hidden_layers)},
        "norm": {"scale": _norm(D)},
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = {"kernel": _dense((D, V), ("embed", "vocab"))}
    if c.num_nextn_predict_layers > 0:
        specs["mtp"] = {
            str(k): {
                "enorm": {"scale": _norm(D)},
                "hnorm": {"scale": _norm(D)},
                "eh_proj": {"kernel": _dense((2 * D, D), ("embed_concat", "embed"))},
                "block": layer_specs(c, c.n_routed_experts > 0),
                "shared_head_norm": {"scale": _norm(D)},
            }
            for k in range(c.num_nextn_predict_layers)
        }
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def logical_axes(c: ModelConfig) -> dict[str, Any]:
    """The params tree with each leaf replaced by its tuple of logical axis names."""
    return jax.tree.map(lambda s: s.axes, param_specs(c), is_leaf=_is_spec)


def init(c: ModelConfig, rng: jax.Array) -> dict[str, Any]:
    """Materialise fp32 parameters: normal(0, initializer_range), norms at 1, biases at 0.

    Output projections (o_proj, down_proj) are scaled by 1/sqrt(2 * layers), as in
    GPT-2, so the residual stream's variance does not grow with depth.

    The normal weights are consecutive slices of one draw of `rng`, in the tree's leaf
    order: one random-number op compiles in about a quarter of the time of one per leaf
    (nano's init_state on the 2-core CPU: 4.6 s -> 1.1 s), and the values stay
    independent normals.
    """
    specs = param_specs(c)
    leaves, treedef = jax.tree.flatten_with_path(specs, is_leaf=_is_spec)
    drawn = [spec for _, spec in leaves if spec.init == "normal"]
    normals = jax.random.normal(rng, (sum(math.prod(s.shape) for s in drawn),), jnp.float32)
    residual_scale = 1.0 / np.sqrt(2.0 * (c.num_hidden_layers + c.num_nextn_predict_layers))
    out, offset = [], 0
    for path, spec in leaves:
        names = [getattr(p, "key", str(p)) for p in path]
        if spec.init == "ones":
            out.append(jnp.ones(spec.shape, jnp.float32))
        elif spec.init == "zeros":
            out.append(jnp.zeros(spec.shape, jnp.float32))
        else:
            std = c.initializer_range
            if "o_proj" in names or "down_proj" in names:
                std *= residual_scale
            size = math.prod(spec.shape)
            out.append(std * normals[offset : offset + size].reshape(spec.shape))
            offset += size
    return jax.tree.unflatten(treedef, out)


def abstract_params(c: ModelConfig) -> dict[str, Any]:
    """Shapes and dtypes only (nothing allocated)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), param_specs(c), is_leaf=_is_spec)


def count_params(c: ModelConfig) -> dict[str, int]:
    """Closed-form parameter counts (the formula the tests check the tree against).

    total:  every parameter, MTP modules included.
    main:   the model used at inference (MTP modules dropped).
    active: parameters touched per token at inference: main, with only
            `num_experts_per_tok` of the routed experts of each MoE layer.
    """
    D, H, V = c.hidden_size, c.num_attention_heads, c.vocab_size
    E, S, F, K = c.n_routed_experts, c.n_shared_experts, c.moe_intermediate_size, c.num_experts_per_tok
    if c.q_lora_rank is None:
        q = D * H * c.qk_head_dim
    else:
        q = D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
    attention = (
        q
        + D * (c.kv_lora_rank + c.qk_rope_head_dim)
        + c.kv_lora_rank
        + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
        + H * c.v_head_dim * D
    )
    norms = 2 * D
    dense_layer = attention + norms + 3 * D * c.intermediate_size
    router_and_shared = D * E + E + 3 * D * S * F
    moe_layer_total = attention + norms + router_and_shared + 3 * E * D * F
    moe_layer_active = attention + norms + router_and_shared + 3 * K * D * F
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    n_dense = c.num_hidden_layers - n_moe
    head = 0 if c.tie_word_embeddings else D * V
    outer = V * D + D + head
    main = outer + n_dense * dense_layer + n_moe * moe_layer_total
    active = outer + n_dense * dense_layer + n_moe * moe_layer_active
    mtp_block = moe_layer_total if E > 0 else dense_layer
    mtp = c.num_nextn_predict_layers * (3 * D + 2 * D * D + mtp_block)
    return {"total": main + mtp, "main": main, "active": active, "mtp": mtp}


def tree_size(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
