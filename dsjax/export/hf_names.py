"""dsjax params <-> a Hugging Face DeepSeek-V3 state dict (numpy, HF names and orientation).

The HF state dict is the hub every format goes through: GGUF is written from it
(`gguf_names`) and read back into it. Names are the Hub's DeepSeek-V3 names, one
tensor per routed expert (`model.layers.N.mlp.experts.E.gate_proj.weight`), and
the MTP modules as extra layers `model.layers.(L+k).*` with their own copies of the
embedding and head (`embed_tokens`, `shared_head.head`), as the Hub stores them.

Orientation: an HF `weight` is [out, in]; a dsjax `kernel` is [in, out] with the head
axes split out (see the table in dsjax/model/params.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dsjax.config import ModelConfig

PROJS = ("gate_proj", "up_proj", "down_proj")


def _t(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32).T)


def _mlp_to_hf(out: dict, prefix: str, p: dict) -> None:
    for proj in PROJS:
        out[f"{prefix}{proj}.weight"] = _t(p[proj]["kernel"])


def _layer_to_hf(out: dict, prefix: str, p: dict, c: ModelConfig) -> None:
    D, H = c.hidden_size, c.num_attention_heads
    a = p["self_attn"]
    out[f"{prefix}input_layernorm.weight"] = np.asarray(p["input_layernorm"]["scale"], np.float32)
    if "q_proj" in a:
        out[f"{prefix}self_attn.q_proj.weight"] = _t(np.asarray(a["q_proj"]["kernel"]).reshape(D, -1))
    else:
        out[f"{prefix}self_attn.q_a_proj.weight"] = _t(a["q_a_proj"]["kernel"])
        out[f"{prefix}self_attn.q_a_layernorm.weight"] = np.asarray(a["q_a_layernorm"]["scale"], np.float32)
        out[f"{prefix}self_attn.q_b_proj.weight"] = _t(np.asarray(a["q_b_proj"]["kernel"]).reshape(c.q_lora_rank, -1))
    out[f"{prefix}self_attn.kv_a_proj_with_mqa.weight"] = _t(a["kv_a_proj_with_mqa"]["kernel"])
    out[f"{prefix}self_attn.kv_a_layernorm.weight"] = np.asarray(a["kv_a_layernorm"]["scale"], np.float32)
    out[f"{prefix}self_attn.kv_b_proj.weight"] = _t(np.asarray(a["kv_b_proj"]["kernel"]).reshape(c.kv_lora_rank, -1))
    out[f"{prefix}self_attn.o_proj.weight"] = _t(np.asarray(a["o_proj"]["kernel"]).reshape(H * c.v_head_dim, D))
    out[f"{prefix}post_attention_layernorm.weight"] = np.asarray(p["post_attention_layernorm"]["scale"], np.float32)
    m = p["mlp"]
    if "gate" not in m:
        _mlp_to_hf(out, f"{prefix}mlp.", m)
        return
    out[f"{prefix}mlp.gate.weight"] = _t(m["gate"]["kernel"])
    out[f"{prefix}mlp.gate.e_score_correction_bias"] = np.asarray(m["gate"]["e_score_correction_bias"], np.float32)
    stacked = {proj: np.asarray(m["experts"][proj], np.float32) for proj in PROJS}
    for e in range(c.n_routed_experts):
        for proj in PROJS:
            out[f"{prefix}mlp.experts.{e}.{proj}.weight"] = _t(stacked[proj][e])
    if "shared_experts" in m:
        _mlp_to_hf(out, f"{prefix}mlp.shared_experts.", m["shared_experts"])


def to_hf(params: dict[str, Any], c: ModelConfig) -> dict[str, np.ndarray]:
    """The HF state dict (fp32) of a dsjax params tree, MTP modules included."""
    out: dict[str, np.ndarray] = {}
    embed = np.asarray(params["embed_tokens"]["embedding"], np.float32)
    out["model.embed_tokens.weight"] = embed
    for i in range(c.num_hidden_layers):
        _layer_to_hf(out, f"model.layers.{i}.", params["layers"][str(i)], c)
    out["model.norm.weight"] = np.asarray(params["norm"]["scale"], np.float32)
    head_VD = embed if c.tie_word_embeddings else _t(params["lm_head"]["kernel"])
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = head_VD
    for k in range(c.num_nextn_predict_layers):
        m = params["mtp"][str(k)]
        prefix = f"model.layers.{c.num_hidden_layers + k}."
        out[f"{prefix}embed_tokens.weight"] = embed
        out[f"{prefix}enorm.weight"] = np.asarray(m["enorm"]["scale"], np.float32)
        out[f"{prefix}hnorm.weight"] = np.asarray(m["hnorm"]["scale"], np.float32)
        out[f"{prefix}eh_proj.weight"] = _t(m["eh_proj"]["kernel"])
        _layer_to_hf(out, prefix, m["block"], c)
        out[f"{prefix}shared_head.norm.weight"] = np.asarray(m["shared_head_norm"]["scale"], np.float32)
        out[f"{prefix}shared_head.head.weight"] = head_VD
    return out


# --- back: HF state dict -> dsjax params ---------------------------------------------


class _Reader:
    """Takes tensors out of a state dict by name, checking each one's shape against the config."""

    def __init__(self, state: dict[str, Any], where: str):
        self.state, self.where, self.used = state, where, set()

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.state:
            raise KeyError(f"{self.where} has no tensor {name}")
        x = np.asarray(self.state[name], np.float32)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{self.where}: {name} has shape {list(x.shape)}, the config implies {list(shape)}")
        self.used.add(name)
        return x

    def kernel(self, name: str, out_in: tuple[int, int], kernel_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """An HF [out, in] weight as a dsjax [in, out] kernel, reshaped to `kernel_shape` when given."""
        k = np.ascontiguousarray(self.get(name, out_in).T)
        return k.reshape(kernel_shape) if kernel_shape is not None else k


def _mlp_from_hf(r: _Reader, prefix: str, D: int, inner: int) -> dict:
    return {
        "gate_proj": {"kernel": r.kernel(f"{prefix}gate_proj.weight", (inner, D))},
        "up_proj": {"kernel": r.kernel(f"{prefix}up_proj.weight", (inner, D))},
        "down_proj": {"kernel": r.kernel(f"{prefix}down_proj.weight", (D, inner))},
    }


def _layer_from_hf(r: _Reader, prefix: str, c: ModelConfig, moe: bool) -> dict:
    D, H, C, R = c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    qk, nope_v = c.qk_head_dim, c.qk_nope_head_dim + c.v_head_dim
    a: dict[str, Any] = {}
    s = f"{prefix}self_attn."
    if c.q_lora_rank is None:
        a["q_proj"] = {"kernel": r.kernel(f"{s}q_proj.weight", (H * qk, D), (D, H, qk))}
    else:
        Q = c.q_lora_rank
        a["q_a_proj"] = {"kernel": r.kernel(f"{s}q_a_proj.weight", (Q, D))}
        a["q_a_layernorm"] = {"scale": r.get(f"{s}q_a_layernorm.weight", (Q,))}
        a["q_b_proj"] = {"kernel": r.kernel(f"{s}q_b_proj.weight", (H * qk, Q), (Q, H, qk))}
    a["kv_a_proj_with_mqa"] = {"kernel": r.kernel(f"{s}kv_a_proj_with_mqa.weight", (C + R, D))}
    a["kv_a_layernorm"] = {"scale": r.get(f"{s}kv_a_layernorm.weight", (C,))}
    a["kv_b_proj"] = {"kernel": r.kernel(f"{s}kv_b_proj.weight", (H * nope_v, C), (C, H, nope_v))}
    a["o_proj"] = {"kernel": r.kernel(f"{s}o_proj.weight", (D, H * c.v_head_dim), (H, c.v_head_dim, D))}
    layer = {
        "input_layernorm": {"scale": r.get(f"{prefix}input_layernorm.weight", (D,))},
        "self_attn": a,
        "post_attention_layernorm": {"scale": r.get(f"{prefix}post_attention_layernorm.weight", (D,))},
    }
    m = f"{prefix}mlp."
    if not moe:
        layer["mlp"] = _mlp_from_hf(r, m, D, c.intermediate_size)
        return layer
    E, F = c.n_routed_experts, c.moe_intermediate_size
    experts = {
        proj: np.stack([
            r.kernel(f"{m}experts.{e}.{proj}.weight", (D, F) if proj == "down_proj" else (F, D)) for e in range(E)
        ])
        for proj in PROJS
    }
    mlp = {
        "gate": {
            "kernel": r.kernel(f"{m}gate.weight", (E, D)),
            "e_score_correction_bias": r.get(f"{m}gate.e_score_correction_bias", (E,)),
        },
        "experts": experts,
    }
    if c.n_shared_experts > 0:
        mlp["shared_experts"] = _mlp_from_hf(r, f"{m}shared_experts.", D, c.n_shared_experts * F)
    layer["mlp"] = mlp
    return layer


def from_hf(state: dict[str, Any], c: ModelConfig, where: str = "the checkpoint") -> tuple[dict[str, Any], list[str]]:
    """(dsjax params, names of tensors left unused) from an HF state dict; KeyError/ValueError name the tensor.

    The MTP modules' copies of the embedding and head are not read (dsjax shares them).
    """
    r = _Reader(state, where)
    D, V = c.hidden_size, c.vocab_size
    params: dict[str, Any] = {
        "embed_tokens": {"embedding": r.get("model.embed_tokens.weight", (V, D))},
        "layers": {
            str(i): _layer_from_hf(r, f"model.layers.{i}.", c, c.is_moe_layer(i)) for i in range(c.num_hidden_layers)
        },
        "norm": {"scale": r.get("model.norm.weight", (D,))},
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = {"kernel": r.kernel("lm_head.weight", (V, D))}
    if c.num_nextn_predict_layers > 0:
        params["mtp"] = {}
        for k in range(c.num_nextn_predict_layers):
            prefix = f"model.layers.{c.num_hidden_layers + k}."
            params["mtp"][str(k)] = {
                "enorm": {"scale": r.get(f"{prefix}enorm.weight", (D,))},
                "hnorm": {"scale": r.get(f"{prefix}hnorm.weight", (D,))},
                "eh_proj": {"kernel": r.kernel(f"{prefix}eh_proj.weight", (D, 2 * D))},
                "block": _layer_from_hf(r, prefix, c, c.n_routed_experts > 0),
                "shared_head_norm": {"scale": r.get(f"{prefix}shared_head.norm.weight", (D,))},
            }
            r.used.update({f"{prefix}embed_tokens.weight", f"{prefix}shared_head.head.weight"})
    unused = sorted(set(state) - r.used)
    return params, unused
