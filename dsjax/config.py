"""Typed, validated configuration: the one place that defines defaults.

A config file is JSON with three blocks, as in the seed guide:

    {"model": {...}, "training": {...}, "distributed": {...}}

(`parallelism` with `tensor_parallel`, `pipeline_parallel`, `data_parallel`,
`expert_parallel`, `sequence_parallel` is accepted in place of `distributed`).

Model keys use Hugging Face `DeepseekV3Config` names where one exists; the seed
guide's short names are accepted as aliases (see `_ALIASES`). Everything is
validated before any JAX work: an unknown key names itself and the nearest valid
key, a wrong type or an impossible value gets one line each.

Resolution order (lowest to highest): dataclass defaults here -> the size preset
(`configs/<size>.json`) -> a user `--config FILE` -> command-line flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
MODEL_SIZES = ("nano", "tiny", "small", "medium")


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class YarnConfig:
    """DeepSeek's YaRN rope scaling (`rope_scaling` in the HF config)."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    type: str = "yarn"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 384
    moe_intermediate_size: int = 96
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_scaling: YarnConfig | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # dsjax's own keys
    num_nextn_predict_layers: int = 1  # MTP depth D (HF's name); 0 disables MTP
    mtp_loss_weight: float = 0.3  # lambda; each MTP module's loss is weighted lambda / D
    bias_update_speed: float = 1e-3  # aux-loss-free balancing step (gamma)
    aux_loss_alpha: float = 1e-4  # sequence-wise balance loss weight (alpha)
    compute_dtype: str = "auto"  # "auto" = bfloat16 on GPU/TPU, float32 on CPU
    # rematerialisation of each decoder block in the backward pass: none (save everything),
    # full (save only the block's input), save_dots (save weight-matmul outputs, recompute the rest)
    remat: str = "none"
    # the logits' gradient w * (softmax - onehot) that the output head's two backward matmuls take:
    # float32 (autodiff of fp32 logits; fp32, or TF32 on a GPU, GEMMs) or compute (rounded to the
    # compute dtype first: bf16 GEMMs with bf16 compute, as PyTorch's autocast does; no change in fp32)
    head_gradient_dtype: str = "float32"
    # compute paths (same function, different speed; free to change on --resume)
    moe_impl: str = "auto"  # auto | dense | ragged | blocked | pallas: how routed experts are computed
    attention_impl: str = "auto"  # auto | xla | blocked | cudnn | pallas: causal attention of the training path

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_index: int) -> bool:
        return self.n_routed_experts > 0 and layer_index >= self.first_k_dense_replace


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 16
    seq_len: int = 256
    gradient_accumulation_steps: int = 1
    # how the accumulation microbatches run (same gradient; free to change on --resume):
    # scan = one after another (memory of one microbatch), fold = as one batch (fewer, larger
    # kernels), auto = fold on an accelerator when the whole batch fits easily (dsjax.train.step)
    accumulation: str = "auto"
    max_steps: int = 300
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    lr_schedule: str = "cosine"  # cosine | wsd | constant
    wsd_decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 0  # 0 = the whole valid split
    checkpoint_interval: int = 100
    log_interval: int = 10
    max_to_keep: int = 3  # newest step_N/ checkpoints kept
    keep_every: int = 0  # also keep every step_N whose N is a multiple of this (0 = off)
    seed: int = 0
    run_name: str = ""  # empty: the model size's name
    data_dir: str = "data/stories"
    work_dir: str = "data"
    checkpoint_dir: str = "checkpoints"
    output_dir: str = "outputs"


@dataclass(frozen=True)
class DistributedConfig:
    pp_size: int = 1
    dp_size: int = -1  # -1: infer from the device count
    tp_size: int = 1
    ep_size: int = 1
    sp_size: int = 1
    microbatches: int = -1  # pipeline microbatches per step; -1: automatic (>= 2 * pp_size when the batch allows)
    pipeline_repeats: int = 1  # layer groups per stage: 1 = GPipe, > 1 = circular schedule
    # how tokens reach experts under ep > 1 (same result; free to change on --resume):
    # mask = replicate-and-mask, all_to_all = dispatch each token copy to its expert's shard
    ep_dispatch: str = "mask"


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning: starts from the pretrain stage's final/; batch, seq_len, intervals from `training`."""

    max_steps: int = 200
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    seq_len: int = 512  # tokens per example (prompt + story), at most model.max_position_embeddings; 0 = training.seq_len
    data: str = ""  # TinyStoriesInstruct-format file (Words:/Features:/Summary:/Story:); empty = made from the stories
    with_features: bool = True  # also ask for a feature the story has (dialogue, a happy or sad ending)


@dataclass(frozen=True)
class GRPOConfig:
    """Group-relative policy optimisation from the SFT stage's final/ (DeepSeekMath's GRPO)."""

    max_steps: int = 60
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    prompts_per_step: int = 8
    group_size: int = 8  # G samples per prompt
    max_new_tokens: int = 160
    temperature: float = 1.0
    epsilon: float = 0.2  # clip range of the probability ratio
    epsilon_high: float = 0.0  # upper clip (DAPO's clip-higher); 0 = same as epsilon
    updates_per_batch: int = 1  # mu: optimizer steps on each sampled batch
    beta: float = 0.04  # weight of the k3 KL to the frozen SFT reference
    loss_aggregation: str = "grpo"  # grpo | dr_grpo | dapo
    coverage_weight: float = 1.0
    ending_weight: float = 0.5
    length_weight: float = 0.5
    repetition_weight: float = 0.5
    min_words: int = 40  # length window (words) of a full reward
    max_words: int = 180
    eval_interval: int = 20
    eval_prompts: int = 64
    samples_per_eval: int = 4  # completions written to samples.jsonl at each eval


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""  # a final/ folder; required by the distill stage
    temperature: float = 2.0
    alpha: float = 0.5  # loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ALIASES: dict[str, dict[str, str]] = {
    "model": {
        "num_layers": "num_hidden_layers",
        "n_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "n_heads": "num_attention_heads",
        "dim": "hidden_size",
        "d_model": "hidden_size",
        "mtp_depth": "num_nextn_predict_layers",
        "num_experts": "n_routed_experts",
        "top_k": "num_experts_per_tok",
        "max_seq_len": "max_position_embeddings",
    },
    "training": {
        "grad_accum": "gradient_accumulation_steps",
        "grad_accum_steps": "gradient_accumulation_steps",
        "lr": "learning_rate",
        "max_seq_len": "seq_len",
        "seq_length": "seq_len",
        "warmup": "warmup_steps",
    },
    "distributed": {
        "tensor_parallel": "tp_size",
        "pipeline_parallel": "pp_size",
        "data_parallel": "dp_size",
        "expert_parallel": "ep_size",
        "sequence_parallel": "sp_size",
        "num_microbatches": "microbatches",
        "pipeline_microbatches": "microbatches",
        "num_pipeline_repeats": "pipeline_repeats",
    },
    "sft": {"lr": "learning_rate", "warmup": "warmup_steps"},
    "grpo": {"lr": "learning_rate", "warmup": "warmup_steps", "G": "group_size", "mu": "updates_per_batch"},
    "distill": {"T": "temperature"},
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.scoring_func": ("sigmoid", "softmax"),
    "model.compute_dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.moe_impl": ("auto", "dense", "ragged", "blocked", "pallas"),
    "model.remat": ("none", "full", "save_dots"),
    "model.head_gradient_dtype": ("float32", "compute"),
    "model.attention_impl": ("auto", "xla", "blocked", "cudnn", "pallas"),
    "model.rope_scaling.type": ("yarn",),
    "training.lr_schedule": ("cosine", "wsd", "constant"),
    "training.accumulation": ("auto", "scan", "fold"),
    "distributed.ep_dispatch": ("mask", "all_to_all"),
    "grpo.loss_aggregation": ("grpo", "dr_grpo", "dapo"),
}


def config_choices(key: str) -> tuple[str, ...]:
    """The allowed values of a string setting ("section.field"), for command-line flags."""
    return _CHOICES[key]

_BLOCKS: dict[str, type] = {
    "model": ModelConfig,
    "training": TrainingConfig,
    "distributed": DistributedConfig,
    "sft": SFTConfig,
    "grpo": GRPOConfig,
    "distill": DistillConfig,
}
_BLOCK_ALIASES = {"parallelism": "distributed"}


def _unknown_key(where: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return f"{where}: unknown key '{key}'{hint}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check `value` against annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)][0]
        return _coerce(path, value, inner)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected an object (or null), got {value!r}")
        return _build(path, tp, value, aliases={})
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _build(where: str, cls: type, raw: dict[str, Any], aliases: dict[str, str], base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = aliases.get(key, key)
        if name not in hints:
            raise ConfigError(_unknown_key(where, key, valid + list(aliases)))
        if name in values:
            raise ConfigError(f"{where}: '{name}' is given twice (once through an alias)")
        path = f"{where}.{name}"
        if path == "model.remat" and isinstance(value, bool):
            value = "full" if value else "none"  # configs written before remat policies had a bool
        coerced = _coerce(path, value, hints[name])
        if path in _CHOICES and coerced not in _CHOICES[path]:
            raise ConfigError(f"{path}: '{coerced}' is not allowed; choose one of {', '.join(_CHOICES[path])}")
        values[name] = coerced
    if base is not None:
        return dataclasses.replace(base, **values)
    return cls(**values)


def config_from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    """Build and validate a Config from a JSON-shaped dict, on top of `base`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a JSON object with blocks {', '.join(_BLOCKS)}")
    base = base or Config()
    blocks: dict[str, Any] = {}
    for block_key, block_raw in raw.items():
        name = _BLOCK_ALIASES.get(block_key, block_key)
        if name not in _BLOCKS:
            raise ConfigError(_unknown_key("config", block_key, list(_BLOCKS) + list(_BLOCK_ALIASES)))
        if name in blocks:
            raise ConfigError("config: both 'distributed' and 'parallelism' are given; use one")
        if not isinstance(block_raw, dict):
            raise ConfigError(f"{name}: expected an object, got {block_raw!r}")
        blocks[name] = _build(name, _BLOCKS[name], block_raw, _ALIASES[name], getattr(base, name))
    config = dataclasses.replace(base, **blocks)
    validate(config)
    return config


def _check_signs(positive: dict[str, float], non_negative: dict[str, float]) -> None:
    """ConfigError naming the first key of `positive` that is <= 0, or of `non_negative` that is < 0."""
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")


def validate(config: Config) -> None:
    """Raise ConfigError for the first impossible value, naming the key."""
    m, t, d = config.model, config.training, config.distributed
    positive = {
        "model.vocab_size": m.vocab_size,
        "model.hidden_size": m.hidden_size,
        "model.num_hidden_layers": m.num_hidden_layers,
        "model.num_attention_heads": m.num_attention_heads,
        "model.intermediate_size": m.intermediate_size,
        "model.kv_lora_rank": m.kv_lora_rank,
        "model.qk_nope_head_dim": m.qk_nope_head_dim,
        "model.qk_rope_head_dim": m.qk_rope_head_dim,
        "model.v_head_dim": m.v_head_dim,
        "model.max_position_embeddings": m.max_position_embeddings,
        "model.rope_theta": m.rope_theta,
        "model.rms_norm_eps": m.rms_norm_eps,
        "model.initializer_range": m.initializer_range,
        "training.batch_size": t.batch_size,
        "training.seq_len": t.seq_len,
        "training.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "training.max_steps": t.max_steps,
        "training.learning_rate": t.learning_rate,
        "training.eval_interval": t.eval_interval,
        "training.checkpoint_interval": t.checkpoint_interval,
        "training.log_interval": t.log_interval,
        "training.max_to_keep": t.max_to_keep,
    }
    non_negative = {
        "model.n_routed_experts": m.n_routed_experts,
        "model.n_shared_experts": m.n_shared_experts,
        "model.first_k_dense_replace": m.first_k_dense_replace,
        "model.num_nextn_predict_layers": m.num_nextn_predict_layers,
        "model.mtp_loss_weight": m.mtp_loss_weight,
        "model.bias_update_speed": m.bias_update_speed,
        "model.aux_loss_alpha": m.aux_loss_alpha,
        "training.warmup_steps": t.warmup_steps,
        "training.weight_decay": t.weight_decay,
        "training.grad_clip": t.grad_clip,
        "training.eval_batches": t.eval_batches,
        "training.keep_every": t.keep_every,
        "training.seed": t.seed,
    }
    _check_signs(positive, non_negative)
    if m.q_lora_rank is not None and m.q_lora_rank <= 0:
        raise ConfigError(f"model.q_lora_rank: must be > 0 or null (no query compression), got {m.q_lora_rank}")
    if m.qk_rope_head_dim % 2:
        raise ConfigError(f"model.qk_rope_head_dim: rotary pairs need an even size, got {m.qk_rope_head_dim}")
    if m.first_k_dense_replace > m.num_hidden_layers:
        raise ConfigError(
            f"model.first_k_dense_replace: {m.first_k_dense_replace} dense layers exceed "
            f"num_hidden_layers={m.num_hidden_layers}"
        )
    if m.n_routed_experts > 0:
        if m.moe_intermediate_size <= 0:
            raise ConfigError(f"model.moe_intermediate_size: must be > 0 with experts, got {m.moe_intermediate_size}")
        if not 0 < m.num_experts_per_tok <= m.n_routed_experts:
            raise ConfigError(
                f"model.num_experts_per_tok: top-k must be in 1..n_routed_experts={m.n_routed_experts}, "
                f"got {m.num_experts_per_tok}"
            )
        if m.n_group <= 0 or m.n_routed_experts % m.n_group:
            raise ConfigError(
                f"model.n_group: must divide n_routed_experts={m.n_routed_experts}, got {m.n_group}"
            )
        if not 0 < m.topk_group <= m.n_group:
            raise ConfigError(f"model.topk_group: must be in 1..n_group={m.n_group}, got {m.topk_group}")
        per_group = m.n_routed_experts // m.n_group
        if m.n_group > 1 and per_group < 2:
            raise ConfigError(
                f"model.n_group: groups are scored by their top-2 experts, so each group needs >= 2 experts; "
                f"{m.n_routed_experts} experts in {m.n_group} groups gives {per_group}"
            )
        if m.topk_group * per_group < m.num_experts_per_tok:
            raise ConfigError(
                f"model.topk_group: {m.topk_group} groups of {per_group} experts cannot supply "
                f"num_experts_per_tok={m.num_experts_per_tok}"
            )
        if m.routed_scaling_factor <= 0:
            raise ConfigError(f"model.routed_scaling_factor: must be > 0, got {m.routed_scaling_factor}")
    if m.rope_scaling is not None:
        y = m.rope_scaling
        if y.factor < 1.0:
            raise ConfigError(f"model.rope_scaling.factor: must be >= 1, got {y.factor}")
        if y.original_max_position_embeddings <= 0:
            raise ConfigError("model.rope_scaling.original_max_position_embeddings: must be > 0")
        if y.beta_fast <= y.beta_slow:
            raise ConfigError(
                f"model.rope_scaling.beta_fast: must exceed beta_slow={y.beta_slow}, got {y.beta_fast}"
            )
    if t.seq_len > m.max_position_embeddings:
        raise ConfigError(
            f"training.seq_len: {t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}"
        )
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"training.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if not 0.0 < t.wsd_decay_fraction <= 1.0:
        raise ConfigError(f"training.wsd_decay_fraction: must be in (0, 1], got {t.wsd_decay_fraction}")
    for key in ("beta1", "beta2"):
        value = getattr(t, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"training.{key}: must be in [0, 1), got {value}")
    if d.pipeline_repeats < 1:
        raise ConfigError(f"distributed.pipeline_repeats: must be >= 1 (1 = GPipe), got {d.pipeline_repeats}")
    for f in dataclasses.fields(d):
        value = getattr(d, f.name)
        if isinstance(value, int) and (value == 0 or value < -1):
            raise ConfigError(f"distributed.{f.name}: must be >= 1 (or -1 to infer), got {value}")
    _validate_post_training(config)


def _validate_post_training(config: Config) -> None:
    s, g, k = config.sft, config.grpo, config.distill
    positive = {
        "sft.max_steps": s.max_steps,
        "sft.learning_rate": s.learning_rate,
        "grpo.max_steps": g.max_steps,
        "grpo.learning_rate": g.learning_rate,
        "grpo.prompts_per_step": g.prompts_per_step,
        "grpo.max_new_tokens": g.max_new_tokens,
        "grpo.temperature": g.temperature,
        "grpo.epsilon": g.epsilon,
        "grpo.updates_per_batch": g.updates_per_batch,
        "grpo.max_words": g.max_words,
        "grpo.eval_interval": g.eval_interval,
        "grpo.eval_prompts": g.eval_prompts,
        "distill.temperature": k.temperature,
    }
    non_negative = {
        "sft.warmup_steps": s.warmup_steps,
        "sft.seq_len": s.seq_len,
        "grpo.warmup_steps": g.warmup_steps,
        "grpo.epsilon_high": g.epsilon_high,
        "grpo.beta": g.beta,
        "grpo.coverage_weight": g.coverage_weight,
        "grpo.ending_weight": g.ending_weight,
        "grpo.length_weight": g.length_weight,
        "grpo.repetition_weight": g.repetition_weight,
        "grpo.min_words": g.min_words,
        "grpo.samples_per_eval": g.samples_per_eval,
    }
    _check_signs(positive, non_negative)
    if g.group_size < 2:
        raise ConfigError(f"grpo.group_size: advantages are relative to the group, so it needs >= 2 samples, got {g.group_size}")
    if g.min_words > g.max_words:
        raise ConfigError(f"grpo.min_words: {g.min_words} exceeds grpo.max_words={g.max_words}")
    if not 0.0 <= k.alpha <= 1.0:
        raise ConfigError(f"distill.alpha: must be in [0, 1], got {k.alpha}")


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a JSON file such as configs/nano.json")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def size_config_path(size: str) -> Path:
    if size not in MODEL_SIZES:
        close = difflib.get_close_matches(size, MODEL_SIZES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model size '{size}' is unknown{hint} (choose one of {', '.join(MODEL_SIZES)})")
    return CONFIGS_DIR / f"{size}.json"


def load_config(
    size: str | None = "nano",
    config_file: str | Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Defaults -> size preset -> config file -> overrides; validated at each layer's end."""
    config = Config()
    if size is not None:
        config = config_from_dict(load_json(size_config_path(size)), config)
    if config_file is not None:
        config = config_from_dict(load_json(config_file), config)
    if overrides:
        config = config_from_dict({k: v for k, v in overrides.items() if v}, config)
    return config


def resolve_compute_dtype(model: ModelConfig, platform: str) -> str:
    if model.compute_dtype != "auto":
        return model.compute_dtype
    return "float32" if platform == "cpu" else "bfloat16"
