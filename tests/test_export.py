"""Export to GGUF / Hugging Face and import back (dsjax/export/).

In CI (cheap: two-layer models, one 512-piece tokenizer, one forward compile per config):
every GGUF key and tensor read back with gguf.GGUFReader, dsjax -> HF -> dsjax and
dsjax -> GGUF(f32) -> dsjax giving identical params and logits, the q8_0 refusal and
the CLI's refusals. Marked `slow` (BUILD.md, "Export"): llama.cpp (llama-cpp-python) and
transformers run our files and agree with dsjax; they run their library in the
interpreter named by DSJAX_LLAMA_PYTHON / DSJAX_HF_PYTHON (default: this one) through
tests/export_runtimes.py, and skip when it lacks the library.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import model
from dsjax.cli import main
from dsjax.config import Config, ModelConfig, TrainingConfig, YarnConfig
from dsjax.data.tokenizer import Tokenizer, load_or_train_tokenizer
from dsjax.export import ExportError, export_checkpoint, import_checkpoint, safetensors_io
from dsjax.export.hf_config import DEFAULT_TEMPERATURE
from dsjax.export.spm_vocab import read_spm
from dsjax.model.params import ParamSpec, param_specs
from dsjax.train.checkpoint import load_final, save_final

BASE = ModelConfig(
    vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
    moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
    topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=32, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=128, num_nextn_predict_layers=1,
)
CONFIGS = {
    "base": BASE,
    # compressed queries, and an eps transformers cannot reproduce in the latent norms (a warning)
    "q_lora": dataclasses.replace(BASE, q_lora_rank=32, rms_norm_eps=1e-5),
    # YaRN, a tied head, unnormalised gates
    "yarn": dataclasses.replace(
        BASE, tie_word_embeddings=True, norm_topk_prob=False,
        rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=32, mscale=0.707, mscale_all_dim=0.707),
    ),
}
F32, F16, BF16, Q8_0 = (gguf.GGMLQuantizationType[n] for n in ("F32", "F16", "BF16", "Q8_0"))


def perturbed_params(c: ModelConfig, seed: int):
    """Random fp32 params (numpy: no JAX compiles) whose norms and router biases are not their init constants,
    so a swapped or lost one shows."""
    rng = np.random.default_rng(seed)

    def leaf(spec: ParamSpec) -> np.ndarray:
        if spec.init == "normal":
            return (c.initializer_range * rng.standard_normal(spec.shape)).astype(np.float32)
        return ((spec.init == "ones") + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)

    return jax.tree.map(leaf, param_specs(c), is_leaf=lambda x: isinstance(x, ParamSpec))


@pytest.fixture(scope="module")
def tokenizer(tinystories_dir, tmp_path_factory) -> Tokenizer:
    return load_or_train_tokenizer(tinystories_dir, tmp_path_factory.mktemp("work"), BASE.vocab_size)


@pytest.fixture(scope="module")
def finals(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """One dsjax final/ folder per config, as `dsjax run` leaves it."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for i, (name, c) in enumerate(CONFIGS.items()):
        config = Config(model=c, training=TrainingConfig(seq_len=32))
        out[name] = save_final(root / name, perturbed_params(c, i), config, {"step": 0}, tokenizer.path)
    return out


@pytest.fixture(scope="module")
def logits_fn():
    """One jitted forward per config (the config is static), reused by every round trip."""
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, BASE.vocab_size, (2, 24)), jnp.int32)
    cache = {}

    def logits(params, c: ModelConfig):
        c = dataclasses.replace(c, num_nextn_predict_layers=0)  # the main model: what llama.cpp and HF run
        if c not in cache:
            cache[c] = jax.jit(lambda p: model.forward(p, tokens, c)[0])
        main = {k: v for k, v in params.items() if k != "mtp"}
        return np.asarray(cache[c](main))

    return logits


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree.flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# --- GGUF ---------------------------------------------------------------------------------


def expected_gguf_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """llama.cpp's deepseek2 tensors and shapes in GGUF order (fastest axis first), as src/models/deepseek2.cpp creates them."""
    D, H, V, C, R = c.hidden_size, c.num_attention_heads, c.vocab_size, c.kv_lora_rank, c.qk_rope_head_dim
    E, F, nope, v = c.n_routed_experts, c.moe_intermediate_size, c.qk_nope_head_dim, c.v_head_dim
    out = {"token_embd.weight": (D, V), "output_norm.weight": (D,)}
    if not c.tie_word_embeddings:
        out["output.weight"] = (D, V)
    for i in range(c.num_hidden_layers):
        b = f"blk.{i}."
        out |= {f"{b}attn_norm.weight": (D,), f"{b}ffn_norm.weight": (D,), f"{b}attn_kv_a_norm.weight": (C,)}
        if c.q_lora_rank is None:
            out[f"{b}attn_q.weight"] = (D, H * (nope + R))
        else:
            Q = c.q_lora_rank
            out |= {f"{b}attn_q_a.weight": (D, Q), f"{b}attn_q_a_norm.weight": (Q,), f"{b}attn_q_b.weight": (Q, H * (nope + R))}
        out |= {
            f"{b}attn_kv_a_mqa.weight": (D, C + R),
            f"{b}attn_k_b.weight": (nope, C, H),
            f"{b}attn_v_b.weight": (C, v, H),
            f"{b}attn_output.weight": (H * v, D),
        }
        if i < c.first_k_dense_replace:
            N = c.intermediate_size
            out |= {f"{b}ffn_gate.weight": (D, N), f"{b}ffn_up.weight": (D, N), f"{b}ffn_down.weight": (N, D)}
        else:
            S = c.n_shared_experts * F
            out |= {
                f"{b}ffn_gate_inp.weight": (D, E), f"{b}exp_probs_b.bias": (E,),
                f"{b}ffn_gate_exps.weight": (D, F, E), f"{b}ffn_up_exps.weight": (D, F, E), f"{b}ffn_down_exps.weight": (F, D, E),
                f"{b}ffn_gate_shexp.weight": (D, S), f"{b}ffn_up_shexp.weight": (D, S), f"{b}ffn_down_shexp.weight": (S, D),
            }
    return out


def expected_gguf_keys(c: ModelConfig, file_type: int, name: str) -> dict[str, object]:
    a = "deepseek2"
    keys = {
        "general.architecture": a, "general.type": "model", "general.name": name,
        "general.sampling.temp": DEFAULT_TEMPERATURE, "general.file_type": file_type, "general.quantization_version": 2,
        f"{a}.block_count": c.num_hidden_layers, f"{a}.context_length": c.max_position_embeddings,
        f"{a}.embedding_length": c.hidden_size, f"{a}.feed_forward_length": c.intermediate_size,
        f"{a}.attention.head_count": c.num_attention_heads, f"{a}.attention.head_count_kv": 1,
        f"{a}.rope.freq_base": c.rope_theta, f"{a}.attention.layer_norm_rms_epsilon": c.rms_norm_eps,
        f"{a}.expert_count": c.n_routed_experts, f"{a}.expert_used_count": c.num_experts_per_tok,
        f"{a}.expert_group_count": c.n_group, f"{a}.expert_group_used_count": c.topk_group,
        f"{a}.expert_gating_func": 2,  # sigmoid, written explicitly
        f"{a}.leading_dense_block_count": c.first_k_dense_replace, f"{a}.vocab_size": c.vocab_size,
        f"{a}.attention.q_lora_rank": c.q_lora_rank or 0, f"{a}.attention.kv_lora_rank": c.kv_lora_rank,
        f"{a}.attention.key_length": c.kv_lora_rank + c.qk_rope_head_dim, f"{a}.attention.value_length": c.kv_lora_rank,
        f"{a}.attention.key_length_mla": c.qk_nope_head_dim + c.qk_rope_head_dim,
        f"{a}.attention.value_length_mla": c.v_head_dim,
        f"{a}.expert_feed_forward_length": c.moe_intermediate_size, f"{a}.expert_shared_count": c.n_shared_experts,
        f"{a}.expert_weights_scale": c.routed_scaling_factor, f"{a}.rope.dimension_count": c.qk_rope_head_dim,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 3, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
    }
    if c.norm_topk_prob:
        keys[f"{a}.expert_weights_norm"] = True
    if c.rope_scaling is not None:
        y = c.rope_scaling
        keys |= {
            f"{a}.rope.scaling.type": "yarn", f"{a}.rope.scaling.factor": y.factor,
            f"{a}.rope.scaling.original_context_length": y.original_max_position_embeddings,
            f"{a}.rope.scaling.yarn_beta_fast": y.beta_fast, f"{a}.rope.scaling.yarn_beta_slow": y.beta_slow,
            f"{a}.rope.scaling.yarn_log_multiplier": 0.1 * y.mscale_all_dim,
        }
    return keys


@pytest.mark.parametrize("name", ["base", "q_lora", "yarn"])
def test_gguf_every_key_and_tensor(name, finals, tokenizer, tmp_path):
    c = CONFIGS[name]
    out, _ = export_checkpoint(finals[name], "gguf", tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    vocab = read_spm(tokenizer.path)
    assert fields.pop("tokenizer.ggml.tokens") == vocab.pieces
    np.testing.assert_array_equal(np.float32(fields.pop("tokenizer.ggml.scores")), np.float32(vocab.scores))
    types = fields.pop("tokenizer.ggml.token_type")
    assert types[:4] == [2, 3, 3, 3]  # unk, then bos/eos/pad as control
    assert types[4:7] == [4, 4, 4]  # the chat tokens, user-defined
    assert types[7:7 + 256] == [6] * 256 and vocab.pieces[7] == "<0x00>"  # byte fallback
    assert types == vocab.types
    assert fields.pop("general.size_label")
    expected = expected_gguf_keys(c, 0, name)
    assert set(fields) == set(expected)
    for key, value in expected.items():
        if isinstance(value, float):
            assert fields[key] == pytest.approx(value, rel=1e-7), key  # stored as float32
        else:
            assert fields[key] == value and type(fields[key]) is type(value), key
    tensors = {t.name: t for t in reader.tensors}
    shapes = expected_gguf_tensors(c)
    assert set(tensors) == set(shapes)
    for tensor_name, shape in shapes.items():
        t = tensors[tensor_name]
        assert tuple(int(n) for n in t.shape) == shape, tensor_name
        assert t.tensor_type == F32, tensor_name


def test_gguf_dtypes_follow_the_converter(finals, tmp_path):
    """1-D tensors, norms, the router and its bias stay F32; the rest takes --dtype."""
    kept_f32 = ("_norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias")
    for dtype, qtype, file_type in (("f16", F16, 1), ("bf16", BF16, 32), ("q8_0", Q8_0, 7)):
        reader = gguf.GGUFReader(export_checkpoint(finals["base"], "gguf", tmp_path / f"{dtype}.gguf", dtype)[0])
        assert reader.fields["general.file_type"].contents() == file_type
        for t in reader.tensors:
            assert t.tensor_type == (F32 if t.name.endswith(kept_f32) else qtype), (dtype, t.name)


def test_q8_0_refuses_rows_not_divisible_by_32(tokenizer, tmp_path):
    c = dataclasses.replace(BASE, moe_intermediate_size=24)
    final = save_final(tmp_path / "run", perturbed_params(c, 0), Config(model=c, training=TrainingConfig(seq_len=32)),
                       {"step": 0}, tokenizer.path)
    with pytest.raises(ExportError, match=r"blk\.1\.ffn_down_exps\.weight has rows of 24 values"):
        export_checkpoint(final, "gguf", tmp_path / "m.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing half-written


@pytest.mark.parametrize("name", ["base", "q_lora", "yarn"])
def test_round_trip_through_gguf_f32(name, finals, logits_fn, tmp_path):
    c = CONFIGS[name]
    gguf_file, _ = export_checkpoint(finals[name], "gguf", tmp_path / "m.gguf", "f32")
    back = import_checkpoint(gguf_file, tmp_path / "final", "gguf")
    params, config, _ = load_final(finals[name])
    params_back, config_back, tokenizer_back = load_final(back)
    # a GGUF holds no MTP modules (llama.cpp's converter drops them too); everything else comes back exactly
    assert config_back.model == dataclasses.replace(c, num_nextn_predict_layers=0)
    main_params = {k: v for k, v in params.items() if k != "mtp"}
    assert_trees_equal(main_params, params_back)
    np.testing.assert_array_equal(logits_fn(params, c), logits_fn(params_back, config_back.model))
    # the SentencePiece model rebuilt from the GGUF vocabulary tokenizes as ours does
    ours, rebuilt = Tokenizer(finals[name] / "tokenizer.model"), Tokenizer(tokenizer_back)
    for text in ("Once upon a time, Tom  saw 12 cats.\n\tThe end!", "<|user|>hi<|end|><|assistant|>ok", "é漢🙂"):
        assert rebuilt.encode(text) == ours.encode(text), text
        assert rebuilt.decode(ours.encode(text)) == text


# --- Hugging Face --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "q_lora", "yarn"])
def test_round_trip_through_hf(name, finals, logits_fn, tmp_path):
    c = CONFIGS[name]
    folder, warnings = export_checkpoint(finals[name], "hf", tmp_path / "hf", "f32")
    assert bool(warnings) == (c.rms_norm_eps != 1e-6)
    back = import_checkpoint(folder, tmp_path / "final", "hf")
    params, _, _ = load_final(finals[name])
    params_back, config_back, _ = load_final(back)
    assert config_back.model == c
    assert_trees_equal(params, params_back)  # MTP modules included
    np.testing.assert_array_equal(logits_fn(params, c), logits_fn(params_back, c))


def test_a_post_trained_stage_survives_export_and_import(tokenizer, tmp_path):
    """An SFT final exported to HF or GGUF and imported back still says it was post-trained (generate --chat's notes)."""
    from dsjax.train.checkpoint import read_json_item

    c = CONFIGS["base"]
    final = save_final(tmp_path / "run-sft", perturbed_params(c, 0), Config(model=c, training=TrainingConfig(seq_len=32)),
                       {"step": 5, "stage": "sft"}, tokenizer.path)
    folder, _ = export_checkpoint(final, "hf", tmp_path / "hf", "f32")
    assert json.loads((folder / "config.json").read_text())["dsjax_stage"] == "sft"
    gguf_file, _ = export_checkpoint(final, "gguf", tmp_path / "m.gguf", "f32")
    assert gguf.GGUFReader(gguf_file).fields["dsjax.stage"].contents() == "sft"
    for source, fmt in ((folder, "hf"), (gguf_file, "gguf")):
        back = import_checkpoint(source, tmp_path / f"back-{fmt}", fmt)
        assert read_json_item(back, "training_state")["stage"] == "sft", fmt


def test_hf_folder_is_the_hubs_layout(finals, tmp_path):
    c = CONFIGS["base"]
    folder, _ = export_checkpoint(finals["base"], "hf", tmp_path / "hf", "bf16")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.model", "tokenizer_config.json",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    assert config["num_key_value_heads"] == c.num_attention_heads and config["rope_interleave"] is True
    assert config["torch_dtype"] == "bfloat16" and config["num_nextn_predict_layers"] == 1
    assert config["scoring_func"] == "sigmoid" and config["topk_method"] == "noaux_tc"
    tensors = safetensors_io.load(folder / "model.safetensors")
    L = c.num_hidden_layers
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (c.hidden_size, c.moe_intermediate_size)
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype.name == "bfloat16"
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32  # kept fp32, as the Hub does
    for part in ("enorm", "hnorm", "eh_proj", "embed_tokens", "shared_head.norm", "shared_head.head",
                 "self_attn.kv_b_proj", "mlp.experts.0.up_proj"):
        assert f"model.layers.{L}.{part}.weight" in tensors, part
    assert not any(n.startswith(f"model.layers.{L + 1}.") for n in tensors)
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok["add_bos_token"] is True and tok["add_eos_token"] is False
    assert tok["added_tokens_decoder"]["4"] == {
        "content": "<|user|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": False,
    }
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 3)


def test_default_temperature_is_generates():
    from dsjax.infer.generate import SamplingConfig

    assert DEFAULT_TEMPERATURE == SamplingConfig().temperature


# --- CLI -----------------------------------------------------------------------------------


def test_cli_exports_and_refuses(finals, tmp_path, capsys):
    final = str(finals["base"])
    out = tmp_path / "m.gguf"
    assert main(["export", "--checkpoint", final, "--format", "gguf", "--out", str(out), "--dtype", "q8_0"]) == 0
    size = out.stat().st_size
    cases = [
        (["export", "--checkpoint", final, "--format", "gguf", "--out", str(out)], 2, "already exists"),
        (["export", "--checkpoint", final, "--format", "hf", "--out", str(tmp_path / "h"), "--dtype", "q8_0"], 2,
         "--dtype q8_0 cannot be written for --format hf"),
        (["export", "--checkpoint", final, "--format", "gguf", "--out", str(tmp_path / "x"), "--dtype", "q4"], 2,
         "invalid choice"),
        (["export", "--checkpoint", final, "--format", "onnx", "--out", str(tmp_path / "x")], 2, "invalid choice"),
        (["export", "--checkpoint", str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "h")], 4, "does not exist"),
        (["export", "--checkpoint", final, "--format", "hf", "--out", str(out / "h")], 2, "is a file, not a folder"),
        (["import", "--from-gguf", str(out), "--out", final], 2, "already exists"),
        (["import", "--from-hf", str(tmp_path), "--out", str(tmp_path / "f")], 2, "has no config.json"),
        (["import", "--from-gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "f")], 2, "does not exist"),
        (["import", "--out", str(tmp_path / "f")], 2, "one of the arguments --from-hf --from-gguf is required"),
    ]
    # broken Hugging Face folders: one line each, exit 2 (not an internal error)
    hf = tmp_path / "hf"
    assert main(["export", "--checkpoint", final, "--format", "hf", "--out", str(hf)]) == 0
    for name, damage in (
        ("bad_config", lambda d: (d / "config.json").write_text("{not json")),
        ("truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-4096])),
        ("bad_index", lambda d: (d / "model.safetensors.index.json").write_text("[]")),
    ):
        shutil.copytree(hf, tmp_path / name)
        damage(tmp_path / name)
    cases += [
        (["import", "--from-hf", str(tmp_path / "bad_config"), "--out", str(tmp_path / "f")], 2, "config.json is not valid JSON"),
        (["import", "--from-hf", str(tmp_path / "truncated"), "--out", str(tmp_path / "f")], 2,
         "the file is truncated or damaged"),
        (["import", "--from-hf", str(tmp_path / "bad_index"), "--out", str(tmp_path / "f")], 2, "is not a safetensors index"),
        (["import", "--from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "f")], 2, "nowhere: no such folder"),
    ]
    for argv, code, message in cases:
        capsys.readouterr()
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert out.stat().st_size == size  # the refused export left the file alone
    assert not (tmp_path / "h").exists() and not (tmp_path / "f").exists()
    assert main(["import", "--from-gguf", str(out), "--out", str(tmp_path / "new" / "run" / "final")]) == 0  # makes its folder
    assert main(["import", "--from-gguf", str(out), "--out", str(tmp_path / "f")]) == 0
    assert "dsjax generate --checkpoint" in capsys.readouterr().out
    assert load_final(tmp_path / "f")[1].model.num_nextn_predict_layers == 0
    # an imported final/ under another name: `checkpoints ls` says what it is, not to list a parent that holds no run
    capsys.readouterr()
    assert main(["checkpoints", "ls", str(tmp_path / "f")]) == 2
    assert "is a final/ checkpoint itself" in capsys.readouterr().err


# --- marked: llama.cpp and transformers run our files ------------------------------------------

RUNTIMES = Path(__file__).with_name("export_runtimes.py")
PROMPTS = ["Once upon a time", "Tom and his dog went to the park. They", "Lily wanted to"]


def runtime_python(env_var: str, module: str) -> str:
    """The interpreter that has `module` (DSJAX_*_PYTHON, else this one); skips the test when it has not."""
    python = os.environ.get(env_var, sys.executable)
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"{module} is not importable by {python} (install the dependency group, or set {env_var})")
    return python


def run_runtime(python: str, *args: str) -> dict:
    done = subprocess.run([python, str(RUNTIMES), *args], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained_nano(tinystories_dir, tmp_path_factory) -> Path:
    """DSJAX_EXPORT_CHECKPOINT (a final/ folder), else a nano trained here for 150 steps on the small test sample."""
    given = os.environ.get("DSJAX_EXPORT_CHECKPOINT")
    if given:
        return Path(given)
    root = tmp_path_factory.mktemp("nano")
    argv = [
        "run", "--model-size", "nano", "--max-steps", "150", "--data-dir", str(tinystories_dir), "--run-name", "nano",
        "--checkpoint-dir", str(root / "ckpt"), "--output-dir", str(root / "out"), "--work-dir", str(root / "work"),
        "--eval-interval", "150", "--checkpoint-interval", "150",
    ]
    assert main(argv) == 0
    return root / "ckpt" / "nano" / "final"


def dsjax_greedy(final: Path, prompts: list[str], n: int) -> tuple[list[list[int]], list[list[int]]]:
    from dsjax.infer.generate import SamplingConfig, generate_tokens

    params, config, tokenizer_path = load_final(final)
    tok = Tokenizer(tokenizer_path)
    prompt_ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    greedy = SamplingConfig(max_new_tokens=n, temperature=0.0)
    return prompt_ids, [list(generate_tokens(params, config.model, ids, greedy, tok.eos_id)) for ids in prompt_ids]


@pytest.mark.slow
def test_llama_cpp_runs_our_gguf(trained_nano, tmp_path):
    python = runtime_python("DSJAX_LLAMA_PYTHON", "llama_cpp")
    f32, _ = export_checkpoint(trained_nano, "gguf", tmp_path / "nano-f32.gguf", "f32")
    q8, _ = export_checkpoint(trained_nano, "gguf", tmp_path / "nano-q8_0.gguf", "q8_0")
    prompt_ids, ours = dsjax_greedy(trained_nano, PROMPTS, 32)
    theirs = run_runtime(python, "llama", str(f32), json.dumps(PROMPTS), "32")
    print("llama.cpp", theirs["version"])
    assert theirs["prompt_ids"] == prompt_ids  # llama.cpp's SPM tokenizer agrees with SentencePiece
    assert theirs["tokens"] == ours  # 32 greedy tokens from each prompt, token for token
    quantized = run_runtime(python, "llama", str(q8), json.dumps(PROMPTS), "32")
    tok = Tokenizer(trained_nano / "tokenizer.model")
    stories = (Path(__file__).parent / "data" / "tinystories" / "train" / "stories.jsonl").read_text()
    known = {w.strip(".,!?\"'").lower() for w in stories.split()}
    words = [w.strip(".,!?\"'").lower() for text in quantized["texts"] for w in text.split()]
    print("q8_0:", quantized["texts"])
    agree = np.mean([a == b for x, y in zip(quantized["tokens"], ours) for a, b in zip(x, y)])
    print(f"q8_0 greedy tokens equal to f32's: {agree:.0%}")
    # fluent: story words (not byte soup or one token repeated), from every prompt
    assert all(len(t) == 32 for t in quantized["tokens"])
    assert np.mean([w in known for w in words]) >= 0.9 and len(set(words)) >= 10, quantized["texts"]
    assert tok.decode(quantized["tokens"][0]) == quantized["texts"][0]


def synthetic_spm(vocab_size: int, path: Path) -> Path:
    """A valid SentencePiece model of any size (for presets whose 32k vocabulary we do not train here)."""
    from dsjax.export.spm_vocab import SpmVocab, write_spm

    pieces = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
    types = [2, 3, 3, 3, 4, 4, 4]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    filler = vocab_size - len(pieces)
    pieces += [f"\u2581w{i}" for i in range(filler)]
    types += [1] * filler
    scores = [0.0] * (vocab_size - filler) + [-float(i) for i in range(filler)]
    return write_spm(SpmVocab(pieces, scores, types, 0, 1, 2, 3, True), path)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["nano", "tiny", "small"])
def test_transformers_runs_our_hf_export(size, tmp_path):
    from dsjax.config import load_config
    from dsjax.infer.generate import SamplingConfig, generate_tokens

    python = runtime_python("DSJAX_HF_PYTHON", "transformers")
    config = load_config(size)
    c = config.model
    params = perturbed_params(c, 0)
    final = save_final(tmp_path / "run", params, config, {"step": 0}, synthetic_spm(c.vocab_size, tmp_path / "sp.model"))
    folder, warnings = export_checkpoint(final, "hf", tmp_path / "hf", "f32")
    assert not warnings
    ids = np.random.RandomState(0).randint(0, c.vocab_size, (2, 64))
    np.save(tmp_path / "ids.npy", ids)
    prompts = [[1, 17, 400, 93, 5], [1, 250, 12]]
    theirs = run_runtime(python, "hf", str(folder), str(tmp_path / "ids.npy"), str(tmp_path / "hf_logits.npy"),
                         json.dumps(prompts), "16")
    print(size, "torch", theirs["torch"], "transformers", theirs["transformers"])
    main_c = dataclasses.replace(c, num_nextn_predict_layers=0)
    main_params = {k: v for k, v in params.items() if k != "mtp"}
    ours = np.asarray(model.forward(main_params, jnp.asarray(ids, jnp.int32), main_c)[0])
    diff = float(np.abs(np.load(tmp_path / "hf_logits.npy") - ours).max())
    print(f"{size}: max abs logit difference {diff:.2e} (logits up to {np.abs(ours).max():.1f})")
    assert diff <= 1e-4
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    assert theirs["greedy"] == [list(generate_tokens(params, c, p, greedy, eos_id=2)) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("size", ["nano", "small"])
def test_llama_cpp_logits_equal_dsjax(size, tmp_path):
    """Every position's logits from llama.cpp (f32 GGUF, f32 KV cache) against dsjax; small covers the q_lora path."""
    from dsjax.config import load_config

    python = runtime_python("DSJAX_LLAMA_PYTHON", "llama_cpp")
    config = load_config(size)
    c = config.model
    params = perturbed_params(c, 0)
    final = save_final(tmp_path / "run", params, config, {"step": 0}, synthetic_spm(c.vocab_size, tmp_path / "sp.model"))
    gguf_file, _ = export_checkpoint(final, "gguf", tmp_path / "m.gguf", "f32")
    ids = [1] + [int(i) for i in np.random.RandomState(0).randint(7, c.vocab_size, 63)]
    run_runtime(python, "llama_logits", str(gguf_file), json.dumps(ids), str(tmp_path / "logits.npy"))
    main_c = dataclasses.replace(c, num_nextn_predict_layers=0)
    main_params = {k: v for k, v in params.items() if k != "mtp"}
    ours = np.asarray(model.forward(main_params, jnp.asarray([ids], jnp.int32), main_c)[0][0])
    diff = float(np.abs(np.load(tmp_path / "logits.npy") - ours).max())
    print(f"{size}: llama.cpp max abs logit difference {diff:.2e} (logits up to {np.abs(ours).max():.1f})")
    assert diff <= 1e-4


@pytest.mark.slow
def test_transformers_tokenizes_as_sentencepiece(trained_nano, tmp_path):
    """AutoTokenizer over our tokenizer files gives dsjax's ids (BOS first), so HF generation starts from the same prompt."""
    python = runtime_python("DSJAX_HF_PYTHON", "transformers")
    folder, _ = export_checkpoint(trained_nano, "hf", tmp_path / "hf", "f32")
    texts = PROMPTS + ["Tom and Sue  went\nto the park. 42!", "She said, \"Wow!\" é 漢字 🙂"]
    theirs = run_runtime(python, "hf_tokenize", str(folder), json.dumps(texts))
    tok = Tokenizer(trained_nano / "tokenizer.model")
    assert theirs["ids"] == [[tok.bos_id] + tok.encode(t) for t in texts]
    assert theirs["decoded"] == texts
