"""Rollouts: sample completions of chat prompts on the device, decode them and score them on the host.

Shared by the GRPO loop (training groups and its evals) and `dsjax eval`, so both sample
and score the same way. A completion stops at <|end|> or </s>; the stop token is kept
in `ids` (the policy is trained to emit it) and left out of `text`. Row seeds come from
NumPy's SeedSequence over (seed, stream), so every (step, row) draws its own stream and
a rerun draws the same completions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsjax.config import ModelConfig
from dsjax.data.tokenizer import Tokenizer
from dsjax.infer.generate import SamplingConfig
from dsjax.infer.sampler import sample_batch
from dsjax.posttrain.chat import ChatTokens, prompt_ids
from dsjax.posttrain.instructions import Instruction
from dsjax.posttrain.rewards import RewardSpec, reward_terms

EVAL_STREAM = 1 << 30  # the seed stream of evaluations (training steps use their step number)


@dataclass(frozen=True)
class Completion:
    ids: list[int]  # sampled tokens, the stop token included when the row stopped
    text: str  # decoded, without the stop token
    stopped: bool
    terms: dict[str, float]  # reward terms and the total "reward"


def row_seeds(seed: int, stream: int, count: int) -> list[int]:
    """`count` sampler seeds (< 2**31) for one (seed, stream)."""
    state = np.random.SeedSequence([seed, stream]).generate_state(count, np.uint32)
    return [int(s) & 0x7FFFFFFF for s in state]


def encode_prompts(tokenizer: Tokenizer, instructions: list[Instruction], chat: ChatTokens | None = None):
    """The chat-template prompt ids of each instruction."""
    chat = chat or ChatTokens(tokenizer)
    return [prompt_ids(tokenizer, ins.prompt, chat) for ins in instructions]


def rollouts(
    params, c: ModelConfig, tokenizer: Tokenizer, instructions: list[Instruction], prompts: list[list[int]],
    spec: RewardSpec, max_new_tokens: int, temperature: float, seeds: list[int], chat: ChatTokens | None = None,
    prefill_len: int | None = None, cache_len: int | None = None, rows=None,
) -> list[Completion]:
    """One completion per (instruction, prompt ids, seed) row, in order.

    `prefill_len` and `cache_len` fix the sampler's compiled shapes across batches (see dsjax.infer.sampler);
    `rows` splits the rows over devices.
    """
    chat = chat or ChatTokens(tokenizer)
    stops = (chat.end, chat.eos)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    outs = sample_batch(
        params, c, prompts, sampling, eos_id=stops, seeds=seeds, keep_stop=True, prefill_len=prefill_len,
        cache_len=cache_len, rows=rows,
    )
    completions = []
    for ins, ids in zip(instructions, outs):
        stopped = bool(ids) and ids[-1] in stops
        text = tokenizer.decode(ids[:-1] if stopped else ids)
        completions.append(Completion(ids, text, stopped, reward_terms(text, stopped, ins.words, spec)))
    return completions
