"""dsjax ModelConfig <-> Hugging Face `DeepseekV3Config` (config.json), both directions.

Written as the Hub's deepseek-ai/DeepSeek-V3 config.json is: `rope_scaling` with
`type: yarn` (or null), `scoring_func`, `topk_method: noaux_tc`, `num_nextn_predict_layers`,
`num_key_value_heads` = heads (MLA has no grouped keys), `rope_interleave` (DeepSeek
rotates interleaved pairs, as dsjax does). transformers 5 reads either spelling of rope
settings (`rope_scaling` + `rope_theta`, or its own `rope_parameters`); so does import.
"""

from __future__ import annotations

from typing import Any

from dsjax.config import Config, ConfigError, ModelConfig, YarnConfig, config_from_dict
from dsjax.export.errors import ExportError

# transformers builds q_a_layernorm and kv_a_layernorm with its RMSNorm default, not config.rms_norm_eps
HF_LATENT_NORM_EPS = 1e-6
BOS_ID, EOS_ID, PAD_ID = 1, 2, 3
# `dsjax generate`'s default (SamplingConfig.temperature): generation_config.json and GGUF's general.sampling.temp
DEFAULT_TEMPERATURE = 0.8
# the dsjax stage that trained an export (sft/grpo: answers in the chat template), in config.json
STAGE_KEY = "dsjax_stage"


def hf_config(
    c: ModelConfig, torch_dtype: str = "float32", special_ids: tuple[int, int, int | None] = (BOS_ID, EOS_ID, PAD_ID)
) -> dict[str, Any]:
    moe = c.n_routed_experts > 0
    rope_scaling = None
    if c.rope_scaling is not None:
        y = c.rope_scaling
        rope_scaling = {
            "type": "yarn",
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
        }
    bos, eos, pad = special_ids
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "moe_intermediate_size": c.moe_intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_nextn_predict_layers": c.num_nextn_predict_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_attention_heads,
        "n_shared_experts": c.n_shared_experts,
        "n_routed_experts": c.n_routed_experts,
        "ep_size": 1,
        "routed_scaling_factor": c.routed_scaling_factor,
        "kv_lora_rank": c.kv_lora_rank,
        "q_lora_rank": c.q_lora_rank,
        "qk_rope_head_dim": c.qk_rope_head_dim,
        "v_head_dim": c.v_head_dim,
        "qk_nope_head_dim": c.qk_nope_head_dim,
        "topk_method": "noaux_tc",
        "n_group": c.n_group,
        "topk_group": c.topk_group,
        "num_experts_per_tok": c.num_experts_per_tok,
        # no routed experts: every layer dense, which transformers expresses this way
        "first_k_dense_replace": c.first_k_dense_replace if moe else c.num_hidden_layers,
        "moe_layer_freq": 1,
        "norm_topk_prob": c.norm_topk_prob,
        "scoring_func": c.scoring_func,
        "aux_loss_alpha": c.aux_loss_alpha,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range,
        "rms_norm_eps": c.rms_norm_eps,
        "use_cache": True,
        "pad_token_id": pad,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pretraining_tp": 1,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
    }


def hf_warnings(c: ModelConfig) -> list[str]:
    """Where transformers' DeepseekV3 will not reproduce this model exactly."""
    notes = []
    if c.rms_norm_eps != HF_LATENT_NORM_EPS:
        notes.append(
            f"model.rms_norm_eps={c.rms_norm_eps:g}: transformers fixes the eps of q_a_layernorm and kv_a_layernorm "
            f"at {HF_LATENT_NORM_EPS:g}, so its logits will differ slightly from dsjax's"
        )
    if c.scoring_func != "sigmoid":
        notes.append(f"model.scoring_func={c.scoring_func}: transformers' DeepseekV3 always routes with sigmoid")
    if c.n_routed_experts > 0 and c.n_shared_experts == 0:
        notes.append("model.n_shared_experts=0: transformers' DeepseekV3 always builds a shared expert")
    return notes


def _rope(hf: dict[str, Any]) -> tuple[float, YarnConfig | None]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    spec = scaling or params
    kind = spec.get("rope_type", spec.get("type", "default")) if spec else "default"
    if kind in ("default", None):
        return float(theta), None
    if kind != "yarn":
        raise ExportError(f"rope type {kind!r} is not supported (dsjax has DeepSeek's YaRN only)")
    keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
    yarn = {k: spec[k] for k in keys if spec.get(k) is not None}
    return float(theta), YarnConfig(**yarn)


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> Config:
    """A dsjax Config for a DeepSeek-V3-shaped HF config; ExportError names what cannot be represented."""
    model_type = hf.get("model_type")
    if model_type != "deepseek_v3":
        raise ExportError(f"{where}: model_type is {model_type!r}; dsjax imports DeepSeek-V3 checkpoints (deepseek_v3)")
    H = hf["num_attention_heads"]
    checks = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "rope_interleave": (hf.get("rope_interleave", True), True),
        "num_key_value_heads": (hf.get("num_key_value_heads") or H, H),
        "topk_method": (hf.get("topk_method", "noaux_tc"), "noaux_tc"),
        "moe_layer_freq": (hf.get("moe_layer_freq", 1), 1),
    }
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise ExportError(f"{where}: {key}={value!r} is not supported (dsjax needs {wanted!r})")
    theta, yarn = _rope(hf)
    moe = hf.get("n_routed_experts") or 0
    layers = hf["num_hidden_layers"]
    model = {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_hidden_layers": layers,
        "num_attention_heads": H,
        "intermediate_size": hf["intermediate_size"],
        "moe_intermediate_size": hf.get("moe_intermediate_size", 1),
        "n_routed_experts": moe,
        "n_shared_experts": hf.get("n_shared_experts") or 0,
        "num_experts_per_tok": hf.get("num_experts_per_tok") or 1,
        "n_group": hf.get("n_group") or 1,
        "topk_group": hf.get("topk_group") or 1,
        "first_k_dense_replace": min(hf.get("first_k_dense_replace") or 0, layers),
        "routed_scaling_factor": hf.get("routed_scaling_factor", 1.0),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
        "scoring_func": hf.get("scoring_func", "sigmoid"),
        "q_lora_rank": hf.get("q_lora_rank"),
        "kv_lora_rank": hf["kv_lora_rank"],
        "qk_nope_head_dim": hf["qk_nope_head_dim"],
        "qk_rope_head_dim": hf["qk_rope_head_dim"],
        "v_head_dim": hf["v_head_dim"],
        "rope_theta": theta,
        "rope_scaling": None if yarn is None else {f: getattr(yarn, f) for f in YarnConfig.__dataclass_fields__},
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        "max_position_embeddings": hf["max_position_embeddings"],
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "initializer_range": hf.get("initializer_range", 0.02),
        "num_nextn_predict_layers": hf.get("num_nextn_predict_layers", 0) or 0,
    }
    if moe == 0:
        model.update(n_group=1, topk_group=1, num_experts_per_tok=1, first_k_dense_replace=layers)
    seq_len = min(256, model["max_position_embeddings"])
    try:
        return config_from_dict({"model": model, "training": {"seq_len": seq_len}})
    except ConfigError as err:
        raise ExportError(f"{where}: {err}") from None
