"""Write a dsjax model as a llama.cpp `deepseek2` GGUF, the way llama.cpp's converter does.

Metadata keys and their order follow convert_hf_to_gguf.py (`TextModel.set_gguf_parameters`
then `DeepseekV2Model.set_gguf_parameters`); tensor types follow its rules: 1-D tensors,
`*_norm.weight`, the router `ffn_gate_inp` and the bias `exp_probs_b.bias` stay F32,
everything else takes --dtype. Two places differ from the converter on purpose, because
llama.cpp's loader would refuse or crash otherwise (both documented in BUILD.md):

- `attention.q_lora_rank` is written as 0 when queries are not compressed (the loader
  requires the key for any model whose layer count is not one of DeepSeek-V2-Lite's);
- `expert_group_count`/`expert_group_used_count` are left out when every group is
  used (topk_group == n_group > 1, where grouping changes nothing and the loader asserts
  used < count).

The vocabulary keeps SentencePiece's own token types (spm_vocab.py), so the chat tokens
are user-defined, not control tokens.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import gguf
import numpy as np

from dsjax.config import ModelConfig
from dsjax.export.errors import ExportError
from dsjax.export.gguf_names import GGUF_STAGE_KEY, hf_to_gguf
from dsjax.export.hf_config import DEFAULT_TEMPERATURE
from dsjax.export.hf_names import to_hf
from dsjax.export.spm_vocab import read_spm

ARCH = "deepseek2"
QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
Q8_BLOCK = 32


def tensor_qtype(name: str, ndim: int, dtype: str) -> gguf.GGMLQuantizationType:
    """The converter's rule: vectors, norms, the router and biases stay F32; the rest takes `dtype`."""
    if ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return QTYPES[dtype]


def check_model(c: ModelConfig) -> None:
    """Models llama.cpp's deepseek2 graph cannot run, refused before anything is written."""
    if c.n_routed_experts > 0 and c.n_shared_experts == 0:
        raise ExportError(
            "model.n_shared_experts=0: llama.cpp's deepseek2 needs shared-expert tensors in every MoE layer"
        )
    if c.scoring_func not in ("sigmoid", "softmax"):
        raise ExportError(f"model.scoring_func={c.scoring_func!r} has no llama.cpp gating function")


def planned_tensors(params, c: ModelConfig, dtype: str) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """(name, fp32 array, GGUF type) for every tensor, checked for `dtype` before any byte is written."""
    state = to_hf(params, _without_mtp(c))
    planned = []
    for name, array in hf_to_gguf(state, c).items():
        qtype = tensor_qtype(name, array.ndim, dtype)
        if qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % Q8_BLOCK:
            raise ExportError(
                f"--dtype q8_0: tensor {name} has rows of {array.shape[-1]} values, not a multiple of {Q8_BLOCK}; "
                "export it with --dtype f16, bf16 or f32"
            )
        planned.append((name, np.ascontiguousarray(array, np.float32), qtype))
    return planned


def _without_mtp(c: ModelConfig) -> ModelConfig:
    return dataclasses.replace(c, num_nextn_predict_layers=0)


def _add_hparams(w: gguf.GGUFWriter, c: ModelConfig, dtype: str) -> None:
    """The model keys, in the converter's order."""
    moe = c.n_routed_experts > 0
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs in llama.cpp as MQA over the latent (one shared "head")
    y = c.rope_scaling
    if y is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(y.factor)
        w.add_rope_scaling_orig_ctx_len(y.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(y.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(y.beta_slow)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if moe:
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        if not (c.n_group > 1 and c.topk_group == c.n_group):
            w.add_expert_group_count(c.n_group)
            w.add_expert_group_used_count(c.topk_group)
        # written explicitly: llama.cpp assumes softmax (DeepSeek-V2) when the key is missing
        w.add_expert_gating_func(
            gguf.ExpertGatingFuncType.SIGMOID if c.scoring_func == "sigmoid" else gguf.ExpertGatingFuncType.SOFTMAX
        )
    w.add_file_type(FILE_TYPES[dtype])
    w.add_leading_dense_block_count(c.first_k_dense_replace if moe else c.num_hidden_layers)
    w.add_vocab_size(c.vocab_size)
    w.add_q_lora_rank(c.q_lora_rank or 0)
    w.add_kv_lora_rank(c.kv_lora_rank)
    # the absorbed (MQA) view: keys are latent + rope, values the latent ...
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    w.add_value_length(c.kv_lora_rank)
    # ... and the per-head sizes after decompression
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    w.add_value_length_mla(c.v_head_dim)
    w.add_expert_feed_forward_length(c.moe_intermediate_size if moe else c.intermediate_size)
    w.add_expert_shared_count(c.n_shared_experts if moe else 0)
    if moe:
        w.add_expert_weights_scale(c.routed_scaling_factor)
        if c.norm_topk_prob:
            w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    if y is not None:
        # llama.cpp divides this by 0.1 again when loading (its TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
        w.add_rope_scaling_yarn_log_mul(0.1 * y.mscale_all_dim)


def _add_vocab(w: gguf.GGUFWriter, tokenizer_path: Path, c: ModelConfig) -> None:
    vocab = read_spm(tokenizer_path)
    if len(vocab.pieces) != c.vocab_size:
        raise ExportError(
            f"{tokenizer_path} has {len(vocab.pieces)} pieces but model.vocab_size={c.vocab_size}"
        )
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p.encode("utf-8") for p in vocab.pieces])
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id >= 0:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(True)  # dsjax prompts start with BOS, as training sequences do
    w.add_add_eos_token(False)
    if not vocab.add_dummy_prefix:
        w.add_add_space_prefix(False)  # llama.cpp's SPM default is True, as SentencePiece's


def _encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    return gguf.quants.quantize(array, qtype)


def write_gguf(
    params, c: ModelConfig, tokenizer_path: Path, out: Path, dtype: str = "f32", name: str = "dsjax",
    stage: str | None = None,
) -> Path:
    """Write `out` (via a temporary file renamed into place, so a failure leaves no partial file).

    `stage` (the dsjax stage that trained it) is kept as the `dsjax.stage` string, a key
    llama.cpp ignores; `dsjax import` reads it back.
    """
    if dtype not in QTYPES:
        raise ExportError(f"--dtype {dtype!r} is not a GGUF type here; choose one of {', '.join(QTYPES)}")
    check_model(c)
    planned = planned_tensors(params, c, dtype)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        for tensor_name, array, qtype in planned:
            data = _encode(array, qtype)
            # quantized and bf16 data arrive as raw bytes, which need their GGUF type named
            w.add_tensor(tensor_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_sampling_temp(DEFAULT_TEMPERATURE)  # what the converter copies from generation_config.json
        w.add_name(name)
        if stage:
            w.add_string(GGUF_STAGE_KEY, stage)
        total, shared, expert, count = w.get_total_parameter_count()
        if total > 0:
            w.add_size_label(gguf.size_label(total, shared, expert, count))
        _add_hparams(w, c, dtype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(w, tokenizer_path, c)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out

