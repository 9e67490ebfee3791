"""The SFT stage: full fine-tuning on chat-formatted instructions, from the pretrain stage's final/.

Data: one instruction per train story (`instructions_from_stories`), or the records of a
TinyStoriesInstruct file (`sft.data`); one example per row of seq_len + 1 tokens, padded,
with loss weights on the response tokens only (`chat.training_row`). Validation: the same
on the valid split's stories, so val_loss / val_bpb are the response tokens' loss.

Everything else is pretraining's loop (`run_training`): metrics.csv, loss.png,
checkpoints, exact resume, final/, the mesh flags. The model config is the start
checkpoint's; `sft.max_steps`, `sft.learning_rate`, `sft.warmup_steps` and `sft.seq_len`
(default 512, capped at the model's positions) replace the training block's; batch
size and intervals are the training block's.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import grain
import jax
import numpy as np

from dsjax.config import Config
from dsjax.data import layout
from dsjax.data.layout import DataError
from dsjax.data.tokenizer import Tokenizer, check_vocab
from dsjax.posttrain.chat import ChatTokens, training_row
from dsjax.posttrain.instructions import Instruction, instructions_from_instruct_file, instructions_from_stories
from dsjax.train import checkpoint
from dsjax.train.loop import TrainingJob, run_training
from dsjax.train.step import sft_objective

log = logging.getLogger(__name__)


def sft_config(config: Config, start: Config) -> Config:
    """The config SFT trains with: the start checkpoint's model, the sft block's step count and learning rate."""
    s = config.sft
    # whole stories fit 512 tokens far more often than pretraining's windows; never past the model's positions
    seq_len = min(s.seq_len or config.training.seq_len, start.model.max_position_embeddings)
    training = dataclasses.replace(
        config.training, max_steps=s.max_steps, learning_rate=s.learning_rate, warmup_steps=s.warmup_steps,
        seq_len=seq_len,
    )
    return dataclasses.replace(config, model=start.model, training=training)


def load_instructions(config: Config, split: str) -> list[Instruction]:
    """The train (or valid) instructions: from `sft.data` for train when set, else made from the split's stories."""
    s, data_dir = config.sft, Path(config.training.data_dir)
    if split == "train" and s.data:
        instructions = instructions_from_instruct_file(Path(s.data))
        if not instructions:
            raise DataError(f"--sft-data {s.data}: no record with a Story: field (TinyStoriesInstruct format)")
        return instructions
    return instructions_from_stories(layout.split_file(data_dir, split), s.with_features, config.training.seed)


def encode_examples(instructions: list[Instruction], tokenizer: Tokenizer, seq_len: int):
    """(tokens [N, seq_len + 1] int32, weights [N, seq_len] float32, bytes [N, seq_len + 1] int32) per example.

    bytes: the UTF-8 bytes each response token stands for (for val bits per byte).
    """
    chat = ChatTokens(tokenizer)
    tokens = np.zeros((len(instructions), seq_len + 1), np.int32)
    weights = np.zeros((len(instructions), seq_len), np.float32)
    text_bytes = np.zeros((len(instructions), seq_len + 1), np.int32)
    prompts = tokenizer.encode_batch([i.prompt for i in instructions])
    answers = tokenizer.encode_batch([i.response for i in instructions])
    for n, (p, r) in enumerate(zip(prompts, answers)):
        prompt = [chat.bos, chat.user, *p, chat.end, chat.assistant]
        response = [*r, chat.end, chat.eos]
        tokens[n], weights[n] = training_row(prompt, response, seq_len, tokenizer.pad_id)
        counts = np.concatenate([tokenizer.story_byte_counts(r), [0, 0]])[: max(0, seq_len + 1 - len(prompt))]
        text_bytes[n, len(prompt) : len(prompt) + len(counts)] = counts
    return tokens, weights, text_bytes


def sft_dataset(tokens, weights, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    """Infinite, seeded, per-epoch reshuffled batches {"tokens": [rows, T+1], "weights": [rows, T]} (this process's rows)."""
    if len(tokens) < batch_size:
        raise DataError(f"only {len(tokens)} SFT examples for a batch of {batch_size}; use more data or a smaller batch")
    local = batch_size // process_count
    first = process_index * local

    def rows(index_batch):
        picked = np.asarray(index_batch)[first : first + local]
        return {"tokens": tokens[picked], "weights": weights[picked]}

    dataset = (
        grain.MapDataset.source(np.arange(len(tokens)))
        .shuffle(seed=seed)
        .repeat(None)
        .batch(batch_size, drop_remainder=True)
        .map(rows)
    )
    return dataset.to_iter_dataset()


def example_eval_batches(tokens, weights, text_bytes, batch_size: int, max_batches: int = 0):
    """Every validation example in order as (windows_BT1, bytes_BT1, weight_BT); the last batch zero-padded."""
    n = len(tokens) if not max_batches else min(len(tokens), max_batches * batch_size)
    for start in range(0, n, batch_size):
        w, m, b = (np.asarray(a[start : min(start + batch_size, n)]) for a in (tokens, weights, text_bytes))
        if len(w) < batch_size:
            pad = ((0, batch_size - len(w)), (0, 0))
            w, m, b = np.pad(w, pad), np.pad(m, pad), np.pad(b, pad)
        yield w, b, m


def sft(
    config: Config, run_name: str, start_final: Path, resume: bool = False, device_count: int | None = None,
    allow_data_change: bool = False,
) -> dict:
    """Fine-tune the model in `start_final` into checkpoints/<run_name>; returns the training summary."""
    start = checkpoint.read_final_config(start_final)  # a clear error for a folder that is not a final/
    tokenizer_path = Path(start_final) / "tokenizer.model"
    config = sft_config(config, start)
    t = config.training
    tokenizer = Tokenizer(tokenizer_path)
    check_vocab(tokenizer, config.model.vocab_size)
    ChatTokens(tokenizer)  # a tokenizer from before the chat tokens were reserved is refused here
    train_examples = encode_examples(load_instructions(config, "train"), tokenizer, t.seq_len)
    valid_examples = encode_examples(load_instructions(config, "valid"), tokenizer, t.seq_len)
    whole = float(np.mean(np.any(train_examples[0] == tokenizer.eos_id, axis=1)))  # </s> closes only a whole response
    log.info(  # the valid examples are made from the stories, whatever --sft-data is
        "sft: %d train examples from %s and %d valid examples from %s (%.0f%% fit whole in seq_len=%d), starting from %s",
        len(train_examples[0]), config.sft.data or layout.split_file(Path(t.data_dir), "train"), len(valid_examples[0]),
        layout.split_file(Path(t.data_dir), "valid"), 100 * whole, t.seq_len, start_final,
    )
    data_record = {
        **layout.fingerprints(Path(t.data_dir)),
        "tokenizer_sha256": layout.file_digest(tokenizer.path),
        "start_params": str(Path(start_final).absolute()),
    }
    if config.sft.data:
        data_record["sft_data_sha256"] = layout.file_digest(Path(config.sft.data))
    params, _, _ = checkpoint.load_final(start_final)
    dataset = sft_dataset(
        train_examples[0], train_examples[1], t.batch_size * t.gradient_accumulation_steps, t.seed,
        jax.process_index(), jax.process_count(),
    )
    job = TrainingJob(
        tokenizer=tokenizer,
        data_iter=iter(dataset),
        eval_batches=lambda: example_eval_batches(*valid_examples, t.batch_size, t.eval_batches),
        data_record=data_record,
        objective=sft_objective,
        init_params=params,
        steps_flag="--sft-steps",
        stage="sft",
        title=f"dsjax {run_name} (SFT from {Path(start_final).parent.name})",
    )
    return run_training(config, run_name, job, resume, device_count, allow_data_change)

