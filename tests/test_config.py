import json

import pytest

from dsjax.config import MODEL_SIZES, ConfigError, config_from_dict, load_config


@pytest.mark.parametrize("size", MODEL_SIZES)
def test_every_size_loads(size):
    config = load_config(size)
    assert config.model.n_routed_experts > 0 and config.model.kv_lora_rank > 0
    assert config.model.first_k_dense_replace >= 1


def test_tiny_matches_the_seed_guide():
    m, t = load_config("tiny").model, load_config("tiny").training
    assert (m.vocab_size, m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size) == (
        32000, 256, 4, 4, 512)
    assert (t.batch_size, t.learning_rate, t.max_steps, t.gradient_accumulation_steps) == (4, 3e-4, 1000, 4)


def test_tiny_mlx_quick_uses_guide_aliases():
    config = load_config(None, "configs/tiny_mlx_quick.json")
    assert config.model.num_hidden_layers == 4 and config.model.num_attention_heads == 4
    assert config.training.gradient_accumulation_steps == 4


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match=r"model: unknown key 'num_hiden_layers'; did you mean 'num_hidden_layers'"):
        config_from_dict({"model": {"num_hiden_layers": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'modle'; did you mean 'model'"):
        config_from_dict({"modle": {}})


def test_parallelism_block_alias():
    config = config_from_dict({"parallelism": {"tensor_parallel": 2, "expert_parallel": 4}})
    assert config.distributed.tp_size == 2 and config.distributed.ep_size == 4


@pytest.mark.parametrize(
    "model, message",
    [
        ({"num_experts_per_tok": 9}, r"num_experts_per_tok: top-k must be in 1..n_routed_experts=8, got 9"),
        ({"n_group": 3}, r"n_group: must divide n_routed_experts=8, got 3"),
        ({"qk_rope_head_dim": 15}, r"qk_rope_head_dim: rotary pairs need an even size, got 15"),
        ({"hidden_size": -4}, r"model.hidden_size: must be > 0, got -4"),
        ({"hidden_size": "big"}, r"model.hidden_size: expected an integer, got 'big'"),
        ({"hidden_size": 12.5}, r"model.hidden_size: expected an integer"),
        ({"tie_word_embeddings": 1}, r"tie_word_embeddings: expected true or false"),
        ({"scoring_func": "relu"}, r"scoring_func: 'relu' is not allowed; choose one of sigmoid, softmax"),
        ({"topk_group": 3}, r"topk_group: must be in 1..n_group=2, got 3"),
        ({"first_k_dense_replace": 7}, r"first_k_dense_replace: 7 dense layers exceed num_hidden_layers=4"),
        ({"q_lora_rank": 0}, r"q_lora_rank: must be > 0 or null"),
        ({"rope_scaling": {"factor": 0.5}}, r"rope_scaling.factor: must be >= 1"),
        ({"rope_scaling": {"factr": 2}}, r"did you mean 'factor'"),
    ],
)
def test_impossible_values_each_get_one_clear_error(model, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": model})


def test_training_and_distributed_errors():
    with pytest.raises(ConfigError, match=r"training.seq_len: 4096 exceeds model.max_position_embeddings=1024"):
        config_from_dict({"training": {"seq_len": 4096}})
    with pytest.raises(ConfigError, match=r"distributed.tp_size: must be >= 1 \(or -1 to infer\), got 0"):
        config_from_dict({"distributed": {"tp_size": 0}})
    with pytest.raises(ConfigError, match=r"given twice"):
        config_from_dict({"model": {"num_layers": 2, "num_hidden_layers": 2}})


def test_config_file_layering(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"num_layers": 2}, "training": {"lr": 1e-3}}))
    config = load_config("nano", path, overrides={"training": {"max_steps": 7}})
    assert config.model.num_hidden_layers == 2
    assert config.training.learning_rate == 1e-3 and config.training.max_steps == 7
    assert config.model.vocab_size == 4096  # from the nano preset
    with pytest.raises(ConfigError, match="did you mean 'nano'"):
        load_config("nanoo")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config("nano", bad)


def test_remat_policies_and_legacy_bools():
    from dsjax.config import ConfigError, load_config

    assert load_config("nano", overrides={"model": {"remat": "save_dots"}}).model.remat == "save_dots"
    # configs written before policies existed (checkpoints' config.json) said true/false
    assert load_config("nano", overrides={"model": {"remat": True}}).model.remat == "full"
    assert load_config("nano", overrides={"model": {"remat": False}}).model.remat == "none"
    import pytest

    with pytest.raises(ConfigError, match="model.remat: 'some' is not allowed"):
        load_config("nano", overrides={"model": {"remat": "some"}})
