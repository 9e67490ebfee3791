"""SFT: the chat template's loss mask on real stories, the weighted loss by hand, and the stage plan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import config_from_dict
from dsjax.model import forward, loss_fn, token_cross_entropy
from dsjax.posttrain.chat import ChatTokens
from dsjax.posttrain.instructions import instructions_from_stories
from dsjax.posttrain.sft import encode_examples, sft_dataset
from dsjax.stages import StageError, parse_stages, plan_stages
from dsjax.train.runs import RunError
from training_runs import host_init


def test_sft_rows_weigh_the_response_only(sample_tokenizer, tinystories_dir):
    instructions = instructions_from_stories(tinystories_dir / "valid" / "stories.jsonl")[:8]
    tokens, weights, text_bytes = encode_examples(instructions, sample_tokenizer, seq_len=2048)  # every story whole
    chat = ChatTokens(sample_tokenizer)
    for row, weight, nbytes, instruction in zip(tokens, weights, text_bytes, instructions):
        assistant = int(np.flatnonzero(row == chat.assistant)[0])
        prompt = sample_tokenizer.decode(row[2 : assistant - 1])
        assert row[0] == chat.bos and row[1] == chat.user and row[assistant - 1] == chat.end
        assert prompt == instruction.prompt
        targets = np.flatnonzero(weight)  # position i predicts token i + 1
        assert targets[0] == assistant  # the first weighted target is the response's first token
        response = row[targets + 1]
        assert list(response[-2:]) == [chat.end, chat.eos]  # it learns to stop
        assert sample_tokenizer.decode(response[:-2]) == instruction.response
        assert np.all(weight[:assistant] == 0) and np.all(weight[targets[-1] + 1 :] == 0)  # prompt and padding: no loss
        assert nbytes.sum() == len(instruction.response.encode("utf-8"))


def test_sft_batches_are_dicts_of_rows(sample_tokenizer, tinystories_dir):
    instructions = instructions_from_stories(tinystories_dir / "valid" / "stories.jsonl")[:10]
    tokens, weights, _ = encode_examples(instructions, sample_tokenizer, seq_len=64)
    batch = next(iter(sft_dataset(tokens, weights, batch_size=4, seed=0)))
    assert batch["tokens"].shape == (4, 65) and batch["weights"].shape == (4, 64)


def test_weighted_loss_is_the_mean_over_weighted_targets():
    c = config_from_dict({"model": {
        "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "moe_intermediate_size": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
        "n_routed_experts": 4, "n_group": 1, "topk_group": 1, "max_position_embeddings": 64, "num_nextn_predict_layers": 0,
    }, "training": {"seq_len": 8}}).model
    params = host_init(c, 0)
    window = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    weight = jnp.array([[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 1]], jnp.float32)
    @jax.jit
    def both(p, w, m):  # one compile: the weighted loss and the whole logits it must agree with
        _, metrics = loss_fn(p, w, c, weight_BT=m)
        logits, _ = forward(p, w[:, :-1], c)
        return metrics["ce_loss"], token_cross_entropy(logits, w[:, 1:])

    ce, nll = both(params, window, weight)
    np.testing.assert_allclose(float(ce), float(jnp.sum(nll * weight) / jnp.sum(weight)), rtol=1e-5)


def test_stage_lists():
    assert parse_stages("all") == ["data_prep", "pretrain", "sft", "grpo", "export"]
    assert parse_stages("sft, grpo") == ["sft", "grpo"]
    for text, message in (
        ("grpo,sft", "pipeline order; write sft,grpo"),
        ("sft,sft", "listed twice"),
        ("stf", "did you mean 'sft'"),
        ("all,export", "pass it alone"),
        ("pretrain,sft,distill", "its own `dsjax run`"),
    ):
        with pytest.raises(StageError, match=message):
            parse_stages(text)


def test_stage_plan_skips_a_finished_stage_a_later_one_reuses(tmp_path):
    config = config_from_dict({"training": {"checkpoint_dir": str(tmp_path / "ck"), "output_dir": str(tmp_path / "out")}})
    with pytest.raises(StageError, match="sft starts from .*ck/nano/final, which does not exist; add pretrain"):
        plan_stages(["sft"], config, "nano", resume=False, overwrite=False)
    plans = plan_stages(["pretrain", "sft", "grpo"], config, "nano", resume=False, overwrite=False)
    assert [(p.stage, p.run_name, p.action) for p in plans] == [
        ("pretrain", "nano", "run"), ("sft", "nano-sft", "run"), ("grpo", "nano-grpo", "run")]
    assert plans[2].start_final == tmp_path / "ck/nano-sft/final"
    (tmp_path / "ck/nano/final").mkdir(parents=True)
    (tmp_path / "out/nano").mkdir(parents=True)
    (tmp_path / "out/nano/metrics.csv").write_text("step\n")
    plans = plan_stages(["pretrain", "sft"], config, "nano", resume=False, overwrite=False)
    assert [p.action for p in plans] == ["skip", "run"]
    # the list's last stage keeps the run-name promise: a finished run is not silently redone
    with pytest.raises(RunError, match="run 'nano' already exists"):
        plan_stages(["pretrain"], config, "nano", resume=False, overwrite=False)
    plans = plan_stages(["pretrain", "sft"], config, "nano", resume=False, overwrite=True)
    assert plans[0].action == "run" and set(plans[0].to_move) == {tmp_path / "ck/nano", tmp_path / "out/nano"}
