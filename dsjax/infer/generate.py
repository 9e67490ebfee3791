"""Jitted sampling with the MLA latent cache: prefill once, then one token per step."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

from dsjax import model
from dsjax.config import ModelConfig


class SamplingError(ValueError):
    """Bad sampling flags or prompt."""


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise SamplingError(f"--max-new-tokens must be > 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SamplingError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also false for NaN
            raise SamplingError(f"--top-p must be in (0, 1], got {self.top_p}")

    def check_model(self, c: ModelConfig) -> None:
        """Flags that depend on the model: top-k cannot exceed the vocabulary (lax.top_k would fail mid-trace)."""
        if self.top_k > c.vocab_size:
            raise SamplingError(f"--top-k {self.top_k} exceeds the model's vocabulary of {c.vocab_size} tokens")


def check_prompt(prompt_tokens: int, c: ModelConfig) -> None:
    """A prompt must leave room for one new token under the model's context (the prompt itself is not echoed)."""
    if prompt_tokens < 1:
        raise SamplingError("the prompt must have at least one token")
    if prompt_tokens >= c.max_position_embeddings:
        raise SamplingError(
            f"the prompt is {prompt_tokens} tokens; the model's context is max_position_embeddings="
            f"{c.max_position_embeddings} tokens, so shorten the prompt below {c.max_position_embeddings} tokens"
        )


def sample_token(logits_BV, rng, s: SamplingConfig):
    """Greedy at temperature 0; otherwise temperature, then top-k and top-p filtering."""
    if s.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits = logits_BV / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cutoff_index = jnp.sum(cumulative < s.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return categorical_by_cdf(rng, logits)


def categorical_by_cdf(rng, logits_BV):
    """One draw per row from softmax(logits): the first token whose cumulative probability
    exceeds u * total, for one uniform u per row (inverse-CDF sampling).

    The same distribution as `jax.random.categorical`, which adds Gumbel noise to every
    logit: that costs one random number per vocabulary entry per token (threefry on CPU:
    about half of nano's decode step, BENCHMARKS.md); this costs one per row.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    # unnormalised: the draw compares against u times the total, so no division (and no sum: the total is
    # the cumulative sum's last entry); exp(-inf) (filtered) is exactly 0
    weights_BV = jnp.exp(logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True))
    cdf_BV = jnp.cumsum(weights_BV, axis=-1)
    # u in [tiny, 1): u * total > 0, so a leading zero-probability token is never drawn
    u_B1 = jax.random.uniform(rng, (logits_BV.shape[0], 1), minval=jnp.finfo(jnp.float32).tiny)
    drawn_B = jnp.sum(cdf_BV < u_B1 * cdf_BV[:, -1:], axis=-1)
    return jnp.minimum(drawn_B, logits_BV.shape[-1] - 1)


@functools.lru_cache(maxsize=8)
def _compiled(c: ModelConfig, s: SamplingConfig):
    @jax.jit
    def prefill(params, prompt_BT, cache, rng):
        logits, cache = model.decode_step(params, prompt_BT, cache, 0, c)
        return sample_token(logits[:, -1], rng, s), cache

    @jax.jit
    def step(params, token_B, cache, position, rng):
        logits, cache = model.decode_step(params, token_B[:, None], cache, position, c)
        return sample_token(logits[:, -1], rng, s), cache

    return prefill, step


def generate_tokens(params, c: ModelConfig, prompt_ids: list[int], s: SamplingConfig, eos_id: int | None = None) -> Iterator[int]:
    """Yields new token ids one at a time (stops at EOS, which is not yielded, or the length limit)."""
    s.validate()
    s.check_model(c)
    check_prompt(len(prompt_ids), c)
    max_len = min(len(prompt_ids) + s.max_new_tokens, c.max_position_embeddings)
    prefill, step = _compiled(c, s)
    cache = model.init_cache(c, batch=1, max_len=max_len)
    rng = jax.random.key(s.seed)
    rng, sub = jax.random.split(rng)
    token, cache = prefill(params, jnp.asarray([prompt_ids], jnp.int32), cache, sub)
    position, produced = len(prompt_ids), 0
    while True:
        value = int(token[0])
        if eos_id is not None and value == eos_id:
            return
        yield value
        produced += 1
        if produced >= s.max_new_tokens or position >= max_len:
            return
        rng, sub = jax.random.split(rng)
        token, cache = step(params, token, cache, jnp.int32(position), sub)
        position += 1


def generate_uncached_greedy(params, c: ModelConfig, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Reference path: full forward over a fixed-size buffer each step (causal, so padding is harmless)."""
    total = len(prompt_ids) + max_new_tokens
    buffer = jnp.zeros((1, total), jnp.int32).at[0, : len(prompt_ids)].set(jnp.asarray(prompt_ids))
    forward = jax.jit(lambda p, x: model.forward(p, x, c)[0])
    out = []
    for position in range(len(prompt_ids), total):
        logits = forward(params, buffer)
        token = int(jnp.argmax(logits[0, position - 1]))
        out.append(token)
        buffer = buffer.at[0, position].set(token)
    return out


class RateAfterCompiling:
    """Tokens per second once compiled: the first two arrivals compile (prefill, then the decode step
    or chunk), so the rate counts the tokens after the second arrival over the time after it."""

    def __init__(self):
        self.start = time.perf_counter()
        self.arrivals, self.steady_start, self.steady_from = 0, None, 0

    def arrived(self, tokens_so_far: int) -> None:
        self.arrivals += 1
        if self.arrivals == 2:
            self.steady_start, self.steady_from = time.perf_counter(), tokens_so_far

    def stats(self, tokens: int) -> dict:
        end = time.perf_counter()
        steady_tokens = tokens - self.steady_from
        steady = end - self.steady_start if self.steady_start is not None else 0.0
        return {
            "tokens": tokens,
            "seconds": end - self.start,
            "tokens_per_sec": steady_tokens / steady if steady_tokens > 0 and steady > 0 else 0.0,
        }


def stream_text(tokens: Iterator, decode: Callable[[list[int]], str], write: Callable[[str], None]) -> dict:
    """Write text as tokens arrive (decoding the whole suffix so multi-byte characters come out whole).

    `tokens` yields token ids, or lists of them (a chunk decoded on the device per call).
    Returns `RateAfterCompiling`'s stats and the text.
    """
    ids: list[int] = []
    shown = ""
    rate = RateAfterCompiling()
    for item in tokens:
        chunk = item if isinstance(item, list) else [item]
        if not chunk:
            continue
        ids.extend(chunk)
        rate.arrived(len(ids))
        text = decode(ids)
        if not text.endswith("\ufffd"):
            write(text[len(shown):])
            shown = text
    stats = rate.stats(len(ids))
    text = decode(ids)
    if len(text) > len(shown):
        write(text[len(shown):])
    return {**stats, "text": text}
