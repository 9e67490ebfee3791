"""`dsjax run --stages all` end to end on a tiny budget: pretrain -> sft -> grpo -> export, each from the last one's final/."""

import contextlib
import io
import json

import pytest

from dsjax.cli import main

# a micro model and a budget of a few steps per stage: the point is the plumbing, not the learning
MICRO = {
    "model": {
        "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "moe_intermediate_size": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
        "max_position_embeddings": 256, "num_nextn_predict_layers": 0,
    },
    "training": {
        "batch_size": 4, "seq_len": 64, "max_steps": 2, "log_interval": 1, "eval_interval": 2,
        "checkpoint_interval": 2, "eval_batches": 1, "warmup_steps": 1,
    },
    "sft": {"max_steps": 2, "warmup_steps": 1, "seq_len": 96},
    "grpo": {
        "max_steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8, "eval_interval": 2,
        "eval_prompts": 4, "samples_per_eval": 1,
    },
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tinystories_dir):
    root = tmp_path_factory.mktemp("stages_all")
    (root / "micro.json").write_text(json.dumps(MICRO))
    flags = [
        "--config", str(root / "micro.json"), "--data-dir", str(tinystories_dir), "--work-dir", str(root / "data"),
        "--checkpoint-dir", str(root / "ck"), "--output-dir", str(root / "out"), "--run-name", "micro", "--gpus", "1",
    ]
    # the whole pipeline runs here, once, so each test below holds on its own: pytest-xdist may give them to
    # different workers, or run either one alone
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exit_code = main(["run", "--stages", "all", *flags])
    return root, flags, exit_code, stdout.getvalue()


def test_stages_all_runs_every_stage_from_the_last_ones_final(pipeline):
    root, flags, exit_code, out = pipeline
    assert exit_code == 0
    for run in ("micro", "micro-sft", "micro-grpo"):
        assert (root / "ck" / run / "final" / "params").is_dir(), run
        assert (root / "out" / run / "metrics.csv").is_file(), run
        assert (root / "out" / run / "loss.png").is_file(), run
    assert (root / "out/micro-grpo/samples.jsonl").is_file()
    assert (root / "out/micro-grpo/export/model.gguf").is_file()
    assert (root / "out/micro-grpo/export/hf/config.json").is_file()
    from dsjax.train.checkpoint import describe_run

    assert all(i.note.startswith("held-out reward ") for i in describe_run(root / "ck/micro-grpo"))  # GRPO has no val loss
    sft_state = json.loads((root / "ck/micro-sft/final/training_state.json").read_text())
    assert sft_state["step"] == 2 and sft_state["data"]["start_params"].endswith("ck/micro/final")
    # the closing table scores every stage and the differences between consecutive ones
    assert "sft - pretrain" in out and "grpo - sft" in out
    table = out[out.index("checkpoint "):]
    for stage in ("pretrain", "sft", "grpo"):
        assert any(line.startswith(stage + " ") for line in table.splitlines()), stage


def test_rerun_skips_the_finished_stages_a_later_one_reuses(pipeline, capsys):
    root, flags, exit_code, _ = pipeline
    assert exit_code == 0
    # pretrain and sft are done and grpo starts from them; grpo, the last, keeps the run-name promise
    assert main(["run", "--stages", "pretrain,sft,grpo", *flags]) == 2
    assert "run 'micro-grpo' already exists" in capsys.readouterr().err
    # export alone takes the newest final/ there is
    assert main(["run", "--stages", "export", "--export-format", "gguf", *flags]) == 0
    assert "export: skipped" in capsys.readouterr().err  # model.gguf is there: not overwritten
    # another --export-dtype is not skipped: the f16 file is moved aside and bf16 written
    assert main(["run", "--stages", "export", "--export-format", "gguf", "--export-dtype", "bf16", *flags]) == 0
    err = capsys.readouterr().err
    assert "it holds f16, not bf16" in err and "export: skipped" not in err
    from dsjax.export import existing_dtype

    export = root / "out/micro-grpo"
    assert existing_dtype(export / "export/model.gguf", "gguf") == "bf16"
    assert [existing_dtype(p, "gguf") for p in (export / "export").glob("model.gguf.replaced-*")] == ["f16"]


def test_generate_chat_asks_a_post_trained_model_in_its_template(pipeline, capsys):
    """`generate --chat`: the prompt goes in the template SFT trained on, the answer stops at <|end|> and prints alone."""
    from dsjax.data.tokenizer import Tokenizer
    from dsjax.infer.generate import SamplingConfig
    from dsjax.infer.sampler import sample_batch
    from dsjax.posttrain.chat import ChatTokens, prompt_ids
    from dsjax.train.checkpoint import load_final

    root, _, exit_code, _ = pipeline
    assert exit_code == 0
    final = root / "ck/micro-sft/final"
    assert json.loads((final / "training_state.json").read_text())["stage"] == "sft"
    question = "Write a story about a dog."
    args = ["generate", "--checkpoint", str(final), "--prompt", question, "--max-new-tokens", "12", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert plain.out.startswith(question) and "add --chat to give it an instruction" in plain.err
    assert main([*args, "--chat"]) == 0
    chat = capsys.readouterr()
    assert "--chat" not in chat.err
    params, config, tokenizer_path = load_final(final)
    tokenizer = Tokenizer(tokenizer_path)
    marks = ChatTokens(tokenizer)
    [expected] = sample_batch(
        params, config.model, [prompt_ids(tokenizer, question, marks)], SamplingConfig(12, 0.0), eos_id=(marks.end, marks.eos)
    )
    assert chat.out == tokenizer.decode(expected) + "\n"
    pretrained = ["generate", "--checkpoint", str(root / "ck/micro/final"), "--chat", "--max-new-tokens", "2"]
    assert main(pretrained) == 0
    assert "was not post-trained (pretrain only)" in capsys.readouterr().err
    assert main([*args, "--chat", "--num-samples", "2"]) == 0  # batched: each answer alone under its header
    batch = capsys.readouterr().out.splitlines()
    assert batch[0].startswith("--- prompt 1, sample 1") and batch[1] == tokenizer.decode(expected)


def test_sft_from_another_final_scores_it_against_its_start(pipeline, capsys):
    """--stages sft --start-from FINAL: the closing table scores the start checkpoint and the SFT model."""
    root, flags, exit_code, _ = pipeline
    assert exit_code == 0
    other = [f if f != "micro" else "other" for f in flags]  # another run name, the same folders
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["run", "--stages", "sft", "--start-from", str(root / "ck/micro/final"), "--sft-steps", "1", *other]) == 0
    table = stdout.getvalue()
    assert "sft - start" in table
    assert any(line.startswith("start ") for line in table.splitlines()), table
