"""Import: a Hugging Face DeepSeek-V3 folder or a llama.cpp `deepseek2` GGUF -> a dsjax final/ folder.

The result is what `dsjax run` writes at the end of training (params, config.json,
training_state.json, tokenizer.model), so `generate`, fine-tuning and export accept it.
A GGUF holds no MTP modules, so its import has none (num_nextn_predict_layers = 0);
an HF folder keeps them when its layers L.. are present.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dsjax.config import Config, YarnConfig, config_from_dict
from dsjax.export import safetensors_io
from dsjax.export.errors import ExportError
from dsjax.export.gguf_names import GGUF_STAGE_KEY, gguf_to_hf
from dsjax.export.hf_config import STAGE_KEY, config_from_hf
from dsjax.export.hf_names import from_hf
from dsjax.export.spm_vocab import SpmVocab, write_spm

log = logging.getLogger(__name__)


def save_as_final(params, config: Config, tokenizer_path: Path, out: Path, source: str, stage: str | None = None) -> Path:
    """Write a final/ folder at `out` (any name) through checkpoint.save_final, swapped in when complete.

    `stage`: the dsjax stage the export came from (sft/grpo models answer in the chat template), when it said.
    """
    from dsjax.data.tokenizer import Tokenizer
    from dsjax.train.checkpoint import save_final

    pieces = Tokenizer(tokenizer_path).vocab_size
    if pieces != config.model.vocab_size:
        raise ExportError(
            f"the tokenizer has {pieces} pieces but the model's vocab_size is {config.model.vocab_size}; "
            "dsjax needs one embedding row per tokenizer piece"
        )
    out = Path(out).absolute()
    staging = out.with_name(f".{out.name}.import-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        state = {"step": 0, "imported_from": source, **({"stage": stage} if isinstance(stage, str) and stage else {})}
        written = save_final(staging, params, config, state, tokenizer_path)
        written.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# --- Hugging Face -------------------------------------------------------------------


def read_safetensors_folder(folder: Path) -> dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ExportError(f"{index} is not a safetensors index (a JSON object with a weight_map): {err}") from None
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ExportError(f"{folder} holds no model.safetensors (or model.safetensors.index.json)")
    state: dict[str, np.ndarray] = {}
    for shard in shards:
        state.update(safetensors_io.load(folder / shard))
    return state


def import_hf(folder: Path, out: Path) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise ExportError(f"--from-hf {folder}: no such folder")
    if not folder.is_dir():
        raise ExportError(f"--from-hf {folder} is a file; pass a Hugging Face model folder (config.json, model.safetensors)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{folder} has no config.json; pass a Hugging Face model folder")
    try:
        hf_config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{config_file} is not valid JSON ({err})") from None
    if not isinstance(hf_config, dict):
        raise ExportError(f"{config_file} holds no JSON object")
    config = config_from_hf(hf_config, str(config_file))
    tokenizer = folder / "tokenizer.model"
    if not tokenizer.is_file():
        raise ExportError(f"{folder} has no tokenizer.model; dsjax needs the SentencePiece model beside the weights")
    state = read_safetensors_folder(folder)
    m = config.model
    if m.num_nextn_predict_layers and f"model.layers.{m.num_hidden_layers}.eh_proj.weight" not in state:
        log.info("%s has no MTP layers; importing without them", folder)
        config = dataclasses.replace(config, model=dataclasses.replace(m, num_nextn_predict_layers=0))
    try:
        params, unused = from_hf(state, config.model, str(folder))
    except KeyError as err:
        raise _missing(err, str(folder)) from None
    except ValueError as err:
        raise ExportError(str(err)) from None
    if unused:
        log.warning("%d tensor(s) of %s were not used (first: %s)", len(unused), folder, unused[0])
    return save_as_final(params, config, tokenizer, out, f"hf:{folder.absolute()}", hf_config.get(STAGE_KEY))


# --- GGUF -----------------------------------------------------------------------------


def _missing(err: KeyError, where: str) -> ExportError:
    """One line for a tensor that is not there (from_hf's own KeyErrors already say so)."""
    text = str(err.args[0]) if err.args else ""
    return ExportError(text if " " in text else f"{where} has no tensor {text}")


def _fields(reader) -> dict:
    return {name: _shortest(field.contents()) for name, field in reader.fields.items()}


def _shortest(value):
    """GGUF stores floats as float32: read 1e-06 back as 1e-06, not 9.999999974752427e-07."""
    if isinstance(value, float):
        return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))
    return value


def _tensors(reader) -> dict[str, np.ndarray]:
    import gguf

    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest axis first
        out[t.name] = np.asarray(data, np.float32).reshape(shape)
    return out


def config_from_gguf(kv: dict, has_output: bool, where: str) -> Config:
    arch = kv.get("general.architecture")
    if arch != "deepseek2":
        raise ExportError(f"{where}: architecture is {arch!r}; dsjax imports llama.cpp deepseek2 GGUFs")

    def key(name, default=None, required=True):
        full = f"deepseek2.{name}"
        if full not in kv:
            if required:
                raise ExportError(f"{where} has no {full}")
            return default
        return kv[full]

    if "deepseek2.attention.key_length_mla" not in kv:
        raise ExportError(f"{where} is a legacy deepseek2 GGUF (no attention.key_length_mla, unsplit attn_kv_b); re-convert it")
    rope = key("rope.dimension_count")
    experts = key("expert_count", 0, required=False)
    yarn = None
    if key("rope.scaling.type", None, required=False) == "yarn":
        mscale_all_dim = _shortest(key("rope.scaling.yarn_log_multiplier", 0.0, required=False) / 0.1)
        yarn = YarnConfig(
            factor=key("rope.scaling.factor"),
            original_max_position_embeddings=key("rope.scaling.original_context_length"),
            beta_fast=key("rope.scaling.yarn_beta_fast", 32.0, required=False),
            beta_slow=key("rope.scaling.yarn_beta_slow", 1.0, required=False),
            # GGUF keeps only mscale_all_dim; DeepSeek's configs set both to the same value
            mscale=mscale_all_dim,
            mscale_all_dim=mscale_all_dim,
        )
    gating = key("expert_gating_func", 1, required=False)  # llama.cpp reads a missing key as softmax
    layers = key("block_count")
    q_lora = key("attention.q_lora_rank", 0, required=False)
    model = {
        "vocab_size": key("vocab_size", len(kv.get("tokenizer.ggml.tokens", [])), required=False),
        "hidden_size": key("embedding_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": key("attention.head_count"),
        "intermediate_size": key("feed_forward_length"),
        "moe_intermediate_size": key("expert_feed_forward_length"),
        "n_routed_experts": experts,
        "n_shared_experts": key("expert_shared_count", 0, required=False),
        "num_experts_per_tok": key("expert_used_count", 1, required=False) if experts else 1,
        "n_group": key("expert_group_count", 1, required=False) if experts else 1,
        "topk_group": key("expert_group_used_count", 1, required=False) if experts else 1,
        "first_k_dense_replace": key("leading_dense_block_count", 0, required=False) if experts else layers,
        "routed_scaling_factor": key("expert_weights_scale", 1.0, required=False),
        "norm_topk_prob": bool(key("expert_weights_norm", False, required=False)),
        "scoring_func": "sigmoid" if gating == 2 else "softmax",
        "q_lora_rank": q_lora or None,
        "kv_lora_rank": key("attention.kv_lora_rank"),
        "qk_nope_head_dim": key("attention.key_length_mla") - rope,
        "qk_rope_head_dim": rope,
        "v_head_dim": key("attention.value_length_mla"),
        "rope_theta": key("rope.freq_base", 10000.0, required=False),
        "rope_scaling": None if yarn is None else dataclasses.asdict(yarn),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": not has_output,
        "num_nextn_predict_layers": 0,
    }
    seq_len = min(256, model["max_position_embeddings"])
    try:
        return config_from_dict({"model": model, "training": {"seq_len": seq_len}})
    except ValueError as err:
        raise ExportError(f"{where}: {err}") from None


def vocab_from_gguf(kv: dict, where: str) -> SpmVocab:
    model = kv.get("tokenizer.ggml.model")
    if model != "llama":
        raise ExportError(f"{where}: tokenizer.ggml.model is {model!r}; dsjax imports SentencePiece (llama) vocabularies")
    return SpmVocab(
        pieces=list(kv["tokenizer.ggml.tokens"]),
        scores=[float(s) for s in kv["tokenizer.ggml.scores"]],
        types=[int(t) for t in kv["tokenizer.ggml.token_type"]],
        unk_id=int(kv.get("tokenizer.ggml.unknown_token_id", 0)),
        bos_id=int(kv.get("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(kv.get("tokenizer.ggml.eos_token_id", 2)),
        pad_id=int(kv.get("tokenizer.ggml.padding_token_id", -1)),
        add_dummy_prefix=bool(kv.get("tokenizer.ggml.add_space_prefix", True)),
    )


def import_gguf(path: Path, out: Path) -> Path:
    from gguf import GGUFReader

    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a folder; --from-gguf takes a .gguf file (--from-hf takes a folder)")
    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ExportError(f"{path} is not a readable GGUF file ({err})") from None
    kv = _fields(reader)
    tensors = _tensors(reader)
    config = config_from_gguf(kv, "output.weight" in tensors, str(path))
    try:
        state = gguf_to_hf(tensors, config.model)
        params, _ = from_hf(state, config.model, str(path))
    except KeyError as err:
        raise _missing(err, str(path)) from None
    except ValueError as err:
        raise ExportError(str(err)) from None
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_spm(vocab_from_gguf(kv, str(path)), Path(tmp) / "tokenizer.model")
        return save_as_final(params, config, tokenizer, out, f"gguf:{path.absolute()}", kv.get(GGUF_STAGE_KEY))
