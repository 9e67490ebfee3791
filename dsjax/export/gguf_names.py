"""HF DeepSeek-V3 state dict <-> llama.cpp `deepseek2` GGUF tensors (names and layouts).

Follows llama.cpp's own converter (convert_hf_to_gguf.py, `DeepseekV2Model`, which
also converts DeepseekV3ForCausalLM) and its loader (src/models/deepseek2.cpp):

- names: `token_embd`, `output_norm`, `output`, per block `attn_norm`, `attn_q` or
  `attn_q_a` + `attn_q_a_norm` + `attn_q_b`, `attn_kv_a_mqa`, `attn_kv_a_norm`,
  `attn_k_b`, `attn_v_b`, `attn_output`, `ffn_norm`, dense `ffn_{gate,up,down}`,
  MoE `ffn_gate_inp`, `exp_probs_b.bias`, `ffn_{gate,up,down}_exps` (experts stacked
  on a leading axis) and `ffn_{gate,up,down}_shexp`;
- `kv_b_proj` [H*(nope+v), C] is split per head into `attn_k_b` [H, C, nope] (the key
  half, transposed so the query can be absorbed into the latent) and `attn_v_b`
  [H, v, C], llama.cpp's MLA layout;
- the MTP layers (model.layers.L..) are left out, as the converter does.

Shapes here are numpy order (slowest axis first); GGUF records them reversed.
"""

from __future__ import annotations

import numpy as np

from dsjax.config import ModelConfig

# the dsjax stage that trained an export (sft/grpo: answers in the chat template); llama.cpp ignores the key
GGUF_STAGE_KEY = "dsjax.stage"

_ATTN = {
    "q_proj": "attn_q",
    "q_a_proj": "attn_q_a",
    "q_a_layernorm": "attn_q_a_norm",
    "q_b_proj": "attn_q_b",
    "kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "kv_a_layernorm": "attn_kv_a_norm",
    "o_proj": "attn_output",
}
_DENSE = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_EXPS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
_SHEXP = {"gate_proj": "ffn_gate_shexp", "up_proj": "ffn_up_shexp", "down_proj": "ffn_down_shexp"}


def split_kv_b(kv_b: np.ndarray, c: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """HF kv_b_proj.weight [H*(nope+v), C] -> (attn_k_b [H, C, nope], attn_v_b [H, v, C])."""
    H, nope, v = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
    kv_b = kv_b.reshape(H, nope + v, -1)
    k_b = np.ascontiguousarray(kv_b[:, :nope, :].transpose(0, 2, 1))
    v_b = np.ascontiguousarray(kv_b[:, nope:, :])
    return k_b, v_b


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """The inverse of `split_kv_b`."""
    C = k_b.shape[1]
    return np.ascontiguousarray(np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, C))


def hf_to_gguf(state: dict[str, np.ndarray], c: ModelConfig) -> dict[str, np.ndarray]:
    """GGUF tensor name -> array, in llama.cpp's layout, for the main model (no MTP)."""
    out: dict[str, np.ndarray] = {"token_embd.weight": state["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[f"{b}attn_norm.weight"] = state[f"{p}input_layernorm.weight"]
        for hf, gg in _ATTN.items():
            name = f"{p}self_attn.{hf}.weight"
            if name in state:
                out[f"{b}{gg}.weight"] = state[name]
        k_b, v_b = split_kv_b(state[f"{p}self_attn.kv_b_proj.weight"], c)
        out[f"{b}attn_k_b.weight"], out[f"{b}attn_v_b.weight"] = k_b, v_b
        out[f"{b}ffn_norm.weight"] = state[f"{p}post_attention_layernorm.weight"]
        if not c.is_moe_layer(i):
            for hf, gg in _DENSE.items():
                out[f"{b}{gg}.weight"] = state[f"{p}mlp.{hf}.weight"]
            continue
        out[f"{b}ffn_gate_inp.weight"] = state[f"{p}mlp.gate.weight"]
        out[f"{b}exp_probs_b.bias"] = state[f"{p}mlp.gate.e_score_correction_bias"]
        for hf, gg in _EXPS.items():
            out[f"{b}{gg}.weight"] = np.stack(
                [state[f"{p}mlp.experts.{e}.{hf}.weight"] for e in range(c.n_routed_experts)]
            )
        if c.n_shared_experts > 0:
            for hf, gg in _SHEXP.items():
                out[f"{b}{gg}.weight"] = state[f"{p}mlp.shared_experts.{hf}.weight"]
    out["output_norm.weight"] = state["model.norm.weight"]
    if not c.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    return out


def gguf_to_hf(tensors: dict[str, np.ndarray], c: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_gguf`: an HF state dict (main model only) from GGUF tensors."""
    state: dict[str, np.ndarray] = {"model.embed_tokens.weight": tensors["token_embd.weight"]}
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        state[f"{p}input_layernorm.weight"] = tensors[f"{b}attn_norm.weight"]
        for hf, gg in _ATTN.items():
            if f"{b}{gg}.weight" in tensors:
                state[f"{p}self_attn.{hf}.weight"] = tensors[f"{b}{gg}.weight"]
        state[f"{p}self_attn.kv_b_proj.weight"] = join_kv_b(tensors[f"{b}attn_k_b.weight"], tensors[f"{b}attn_v_b.weight"])
        state[f"{p}post_attention_layernorm.weight"] = tensors[f"{b}ffn_norm.weight"]
        if not c.is_moe_layer(i):
            for hf, gg in _DENSE.items():
                state[f"{p}mlp.{hf}.weight"] = tensors[f"{b}{gg}.weight"]
            continue
        state[f"{p}mlp.gate.weight"] = tensors[f"{b}ffn_gate_inp.weight"]
        bias = tensors.get(f"{b}exp_probs_b.bias")
        state[f"{p}mlp.gate.e_score_correction_bias"] = (
            bias if bias is not None else np.zeros(c.n_routed_experts, np.float32)
        )
        for hf, gg in _EXPS.items():
            stacked = tensors[f"{b}{gg}.weight"]
            for e in range(c.n_routed_experts):
                state[f"{p}mlp.experts.{e}.{hf}.weight"] = stacked[e]
        if c.n_shared_experts > 0:
            for hf, gg in _SHEXP.items():
                state[f"{p}mlp.shared_experts.{hf}.weight"] = tensors[f"{b}{gg}.weight"]
    state["model.norm.weight"] = tensors["output_norm.weight"]
    if "output.weight" in tensors:
        state["lm_head.weight"] = tensors["output.weight"]
    return state
