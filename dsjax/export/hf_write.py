"""Write a dsjax model as a Hugging Face DeepSeek-V3 folder that transformers loads.

    config.json              DeepseekV3ForCausalLM (hf_config.py)
    generation_config.json   BOS/EOS/PAD and dsjax's default sampling
    model.safetensors        the Hub's tensor names (hf_names.py), MTP as layers L..L+D-1
    tokenizer.model          our SentencePiece model, unchanged
    tokenizer_config.json    LlamaTokenizer over it: BOS added, no EOS, chat tokens as
    special_tokens_map.json  added (non-special, like SentencePiece user-defined) tokens

The folder is written beside `out` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from dsjax.config import ModelConfig
from dsjax.export import safetensors_io
from dsjax.export.errors import ExportError
from dsjax.export.hf_config import DEFAULT_TEMPERATURE, STAGE_KEY, hf_config, hf_warnings
from dsjax.export.hf_names import to_hf
from dsjax.export.spm_vocab import read_spm

HF_DTYPES = {"f32": (np.float32, "float32"), "f16": (np.float16, "float16"), "bf16": (ml_dtypes.bfloat16, "bfloat16")}
# kept fp32 whatever --dtype says, as the Hub's DeepSeek-V3 keeps it: a bias added to
# sigmoid scores to choose experts, where half precision would change the choice
FP32_TENSORS = (".e_score_correction_bias",)


def _tokenizer_files(tokenizer_path: Path, c: ModelConfig) -> dict[str, dict]:
    vocab = read_spm(tokenizer_path)
    kinds = {2: "unk", 3: "control", 4: "user"}  # SentencePiece piece types worth an added-token entry
    added = {}
    for i, (piece, kind) in enumerate(zip(vocab.pieces, vocab.types)):
        if kind in kinds:
            added[str(i)] = {
                "content": piece, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": kind != 4,
            }
    special = {
        "bos_token": vocab.pieces[vocab.bos_id],
        "eos_token": vocab.pieces[vocab.eos_id],
        "unk_token": vocab.pieces[vocab.unk_id],
    }
    if vocab.pad_id >= 0:
        special["pad_token"] = vocab.pieces[vocab.pad_id]
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": vocab.add_dummy_prefix,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": c.max_position_embeddings,
        "added_tokens_decoder": added,
        **special,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def _special_ids(tokenizer_path: Path) -> tuple[int, int, int]:
    vocab = read_spm(tokenizer_path)
    return vocab.bos_id, vocab.eos_id, (vocab.pad_id if vocab.pad_id >= 0 else None)


def write_hf(
    params, c: ModelConfig, tokenizer_path: Path, out: Path, dtype: str = "f32", stage: str | None = None
) -> list[str]:
    """Write the folder `out`; returns the warnings (also worth showing the user).

    `stage` (the dsjax stage that trained it) goes in config.json as `dsjax_stage`, a key
    transformers keeps as an attribute and otherwise ignores; `dsjax import` reads it back.
    """
    if dtype not in HF_DTYPES:
        raise ExportError(f"--dtype {dtype!r} cannot be written for --format hf; choose one of {', '.join(HF_DTYPES)}")
    np_dtype, torch_name = HF_DTYPES[dtype]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = to_hf(params, c)
        tensors = {
            name: (a if name.endswith(FP32_TENSORS) else a.astype(np_dtype)) for name, a in state.items()
        }
        safetensors_io.save(tensors, tmp / "model.safetensors", {"format": "pt"})
        bos, eos, pad = _special_ids(tokenizer_path)
        config = hf_config(c, torch_name, (bos, eos, pad))
        if stage:
            config[STAGE_KEY] = stage
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": True,
            "temperature": DEFAULT_TEMPERATURE,
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        for name, content in _tokenizer_files(tokenizer_path, c).items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hf_warnings(c)
