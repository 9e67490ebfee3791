"""On-device batched sampling: prefill, then a compiled `lax.while_loop` over tokens.

The Python loop in `generate.generate_tokens` goes back to the host for every
token; here a chunk of up to `chunk` tokens per row is decoded by one compiled
program, with sampling, EOS and length stops inside it. `generate` streams by
calling it chunk after chunk; GRPO calls it once for a whole batch of prompts.

Rows may have prompts of different lengths. Every row sits at the same cache
position at each step: the common prefix (the shortest prompt) is prefilled at
once, and a row whose prompt is longer is fed its own prompt tokens one step at a
time ("forced") before it starts sampling, so no row ever attends to padding.

Randomness is per row: row r of a call with seed s draws exactly what a
single-row call with seed s + r draws, and a row's key advances only on the steps
where it samples, so batched rows equal single rows and a single row equals the
step-by-step sampler (`generate.generate_tokens`) token for token.

`eos_id` may be one id or a tuple of stop ids (GRPO stops at <|end|> or </s>);
with `keep_stop=True` the stop token that ended a row is returned as its last
token, so the caller sees which one it was (default: not returned, as before).
A caller that samples many batches of varying prompts (GRPO) fixes the compiled
shapes with `prefill_len` (at most the shortest prompt: the rest is fed one step
at a time) and `cache_len` (the cache and the prompt buffer), so one compile
serves every batch of the same size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsjax import model
from dsjax.config import ModelConfig
from dsjax.infer.generate import SamplingConfig, SamplingError, sample_token


class DecodeState(NamedTuple):
    cache: Any  # one row: each buffer without its batch axis (`_carried`)
    token_B: jax.Array  # the input token at `position` for every row
    position: jax.Array  # int32 scalar: the cache position of token_B
    key_data_B: jax.Array  # [B, ...] raw per-row PRNG keys
    done_B: jax.Array  # bool: row finished (EOS, max_new_tokens or the cache end)
    count_B: jax.Array  # int32: tokens produced so far per row
    out_BN: jax.Array  # int32 [B, max_new_tokens]: produced tokens, -1 where none


def _next_tokens(logits_BV, state_pos, prompts_BP, prompt_len_B, key_data_B, s: SamplingConfig):
    """Next input token per row at position state_pos + 1: the prompt's own while it lasts, else a sample."""
    B = logits_BV.shape[0]
    next_pos = state_pos + 1
    forced_B = next_pos < prompt_len_B
    keys = jax.random.wrap_key_data(key_data_B)
    split = jax.vmap(jax.random.split)(keys)  # [B, 2]
    new_keys, subs = split[:, 0], split[:, 1]
    sampled_B = jax.vmap(lambda lg, k: sample_token(lg[None], k, s)[0])(logits_BV, subs)
    prompt_tok_B = jnp.take_along_axis(prompts_BP, jnp.minimum(next_pos, prompts_BP.shape[1] - 1)[None].repeat(B)[:, None], axis=1)[:, 0]
    token_B = jnp.where(forced_B, prompt_tok_B, sampled_B.astype(jnp.int32))
    # a row's key advances only when it samples, so batching never shifts its randomness
    key_data_B = jnp.where(
        forced_B.reshape((B,) + (1,) * (key_data_B.ndim - 1)), key_data_B, jax.random.key_data(new_keys)
    )
    return token_B, forced_B, key_data_B


def _record(state: DecodeState, token_B, forced_B, stop_ids: tuple[int, ...], keep_stop: bool, max_len: int) -> DecodeState:
    """Append sampled tokens to rows still running; finish rows on a stop id, max_new_tokens or the cache end."""
    N = state.out_BN.shape[1]
    produced_B = ~forced_B & ~state.done_B
    is_stop_B = jnp.zeros_like(produced_B)
    for stop in stop_ids:
        is_stop_B = is_stop_B | (token_B == stop)
    is_eos_B = produced_B & is_stop_B
    append_B = produced_B if keep_stop else produced_B & ~is_eos_B
    rows = jnp.arange(token_B.shape[0])
    slot_B = jnp.minimum(state.count_B, N - 1)
    out_BN = state.out_BN.at[rows, slot_B].set(jnp.where(append_B, token_B, state.out_BN[rows, slot_B]))
    count_B = state.count_B + append_B.astype(jnp.int32)
    next_pos = state.position + 1
    # the token for position max_len is produced but can no longer be fed to the cache
    done_B = state.done_B | is_eos_B | (count_B >= N) | (append_B & (next_pos >= max_len))
    return state._replace(token_B=token_B, position=next_pos, done_B=done_B, count_B=count_B, out_BN=out_BN)


def _carried(cache, rows: int):
    """The cache as the loop carries it: a single row's buffers without their batch axis of one.

    Carried as [1, S, W], each buffer was copied three times per layer and token on XLA:CPU
    (`mla._write_cache` says why); as [S, W] the loop writes each token in place. `_uncarried`
    gives `decode_step` its [B, S, W] buffers back (views, no copies)."""
    return jax.tree.map(lambda x: x[0], cache) if rows == 1 else cache


def _uncarried(cache, rows: int):
    return jax.tree.map(lambda x: x[None], cache) if rows == 1 else cache


# the weights in the layouts the decode loop multiplies by, made once per sampling call
# (inside the loop XLA:CPU remade them for every token; per chunk they cost about 1.2 ms a call)
_decode_layouts = jax.jit(model.with_decode_layouts, static_argnums=1)


def _pinned(state: DecodeState, rows) -> DecodeState:
    """The state's per-row arrays held in `rows`' layout (rows split over its axes), so each device keeps its rows'
    cache, keys and tokens through the loop; without it XLA may gather the state onto every device."""
    if rows is None or state.token_B.shape[0] == 1:  # one row is not split (and its cache has no row axis)
        return state
    axis = rows.spec[0]

    def pin(x):
        return jax.lax.with_sharding_constraint(x, NamedSharding(rows.mesh, PartitionSpec(axis, *[None] * (x.ndim - 1))))

    position = state.position
    return jax.tree.map(pin, state._replace(position=None))._replace(position=position)


@functools.lru_cache(maxsize=16)
def _programs(
    c: ModelConfig, s: SamplingConfig, stop_ids: tuple[int, ...], max_len: int, chunk: int, keep_stop: bool = False,
    rows=None,
):
    """(prefill, decode_chunk) compiled for one config, sampling setting, cache length and chunk size
    (and the rows' layout over devices, `sample_chunks`)."""

    @functools.partial(jax.jit, static_argnums=(4,))
    def prefill(params, prompts_BP, prompt_len_B, key_data_B, prefix_len: int):
        B = prompts_BP.shape[0]
        N = s.max_new_tokens
        cache = model.init_cache(c, batch=B, max_len=max_len)
        logits_BTV, cache = model.decode_step(params, prompts_BP[:, :prefix_len], cache, 0, c)
        state = DecodeState(
            cache=_carried(cache, B),
            token_B=prompts_BP[:, prefix_len - 1],
            position=jnp.int32(prefix_len - 1),
            key_data_B=key_data_B,
            done_B=jnp.zeros((B,), bool),
            count_B=jnp.zeros((B,), jnp.int32),
            out_BN=jnp.full((B, N), -1, jnp.int32),
        )
        token_B, forced_B, key_data_B = _next_tokens(
            logits_BTV[:, -1], state.position, prompts_BP, prompt_len_B, key_data_B, s
        )
        return _pinned(_record(state._replace(key_data_B=key_data_B), token_B, forced_B, stop_ids, keep_stop, max_len), rows)

    @jax.jit
    def decode_chunk(params, state: DecodeState, prompts_BP, prompt_len_B):
        def running(carry):
            i, st = carry
            return (i < chunk) & ~jnp.all(st.done_B)

        def body(carry):
            i, st = carry
            B = st.token_B.shape[0]
            logits_BTV, cache = model.decode_step(params, st.token_B[:, None], _uncarried(st.cache, B), st.position, c)
            token_B, forced_B, key_data_B = _next_tokens(
                logits_BTV[:, -1], st.position, prompts_BP, prompt_len_B, st.key_data_B, s
            )
            st = st._replace(cache=_carried(cache, B), key_data_B=key_data_B)
            return i + 1, _pinned(_record(st, token_B, forced_B, stop_ids, keep_stop, max_len), rows)

        _, state = jax.lax.while_loop(running, body, (jnp.int32(0), state))
        return state

    return prefill, decode_chunk


# cache lengths are rounded up to a multiple of this: XLA:GPU's Triton GEMM tiles then take the cache as it
# is (at 1,004 positions it padded a copy of each layer's cache to 1,024 at every token: 4 of `tiny`'s 162
# kernels per token, counted for an H200), and prompts of nearby lengths share one compiled program
CACHE_MULTIPLE = 128


def _cache_length(c: ModelConfig, longest_prompt: int, max_new: int) -> int:
    wanted = longest_prompt + max_new
    return min(-(-wanted // CACHE_MULTIPLE) * CACHE_MULTIPLE, c.max_position_embeddings)


def _stop_ids(eos_id) -> tuple[int, ...]:
    """None -> no stop id; one id or several -> a tuple (hashable: part of the compiled programs' key)."""
    if eos_id is None:
        return ()
    if isinstance(eos_id, (int, np.integer)):
        return (int(eos_id),)
    return tuple(int(i) for i in eos_id)


def sample_chunks(
    params, c: ModelConfig, prompts: list[list[int]], s: SamplingConfig, eos_id: int | tuple[int, ...] | None = None,
    chunk: int = 32, seeds: list[int] | None = None, keep_stop: bool = False,
    prefill_len: int | None = None, cache_len: int | None = None, rows=None,
):
    """Yields, after each compiled chunk, the [B, max_new_tokens] tokens so far (-1 = none yet) and counts.

    Stops when every row is done. Row r samples with seeds[r], by default s.seed + r.
    `rows`: a sharding that splits the prompts' rows over devices (e.g. a mesh's data-parallel
    axes); each device then decodes its own rows, with the same tokens as unsplit.
    """
    s.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SamplingError("every prompt must have at least one token")
    longest, shortest = max(map(len, prompts)), min(map(len, prompts))
    max_len = _cache_length(c, longest, s.max_new_tokens) if cache_len is None else cache_len
    if longest >= max_len or max_len > c.max_position_embeddings:
        raise SamplingError(
            f"prompt of {longest} tokens leaves no room in a cache of {max_len} positions "
            f"(max_position_embeddings={c.max_position_embeddings})"
        )
    prefix_len = shortest if prefill_len is None else prefill_len
    if not 1 <= prefix_len <= shortest:
        raise SamplingError(f"prefill_len {prefix_len} must be in 1..{shortest} (the shortest prompt)")
    B = len(prompts)
    prompts_BP = np.zeros((B, longest if cache_len is None else max_len), np.int32)
    for r, p in enumerate(prompts):
        prompts_BP[r, : len(p)] = p
    prompt_len_B = jnp.asarray([len(p) for p in prompts], jnp.int32)
    if seeds is None:
        seeds = [s.seed + r for r in range(B)]
    if len(seeds) != B:
        raise SamplingError(f"{len(seeds)} seeds for {B} prompts")
    key_data_B = jnp.stack([jax.random.key_data(jax.random.key(seed)) for seed in seeds])
    # the programs do not depend on the seed (keys are inputs): one compile serves every seed
    prefill, decode_chunk = _programs(
        c, dataclasses.replace(s, seed=0), _stop_ids(eos_id), max_len, chunk, keep_stop, rows
    )
    prompts_BP = jnp.asarray(prompts_BP)
    if rows is not None:  # the programs follow their inputs' layout: each row's cache and state stay on its device
        prompts_BP, prompt_len_B, key_data_B = jax.device_put((prompts_BP, prompt_len_B, key_data_B), rows)
    state = prefill(params, prompts_BP, prompt_len_B, key_data_B, prefix_len)
    decode_params = _decode_layouts(params, c)  # once per call here, not per chunk or token
    while True:
        out, counts, done = jax.device_get((state.out_BN, state.count_B, state.done_B))
        yield out, counts
        if done.all():
            return
        state = decode_chunk(decode_params, state, prompts_BP, prompt_len_B)


def sample_batch(
    params, c: ModelConfig, prompts: list[list[int]], s: SamplingConfig, eos_id: int | tuple[int, ...] | None = None,
    chunk: int = 1 << 20, seeds: list[int] | None = None, keep_stop: bool = False,
    prefill_len: int | None = None, cache_len: int | None = None, rows=None,
) -> list[list[int]]:
    """New tokens for each prompt, decoded on device in as few calls as `chunk` allows.

    The stop token (EOS, or any of a tuple of stop ids) is not included unless `keep_stop`.
    `rows` splits the rows over devices (`sample_chunks`).
    """
    out, counts = None, None
    for out, counts in sample_chunks(
        params, c, prompts, s, eos_id, chunk, seeds, keep_stop, prefill_len, cache_len, rows
    ):
        pass
    return [list(map(int, out[r, : counts[r]])) for r in range(len(prompts))]


def stream_tokens(params, c: ModelConfig, prompt_ids: list[int], s: SamplingConfig, eos_id: int | None = None, chunk: int = 16):
    """One prompt, yielding each compiled chunk's new token ids as a list (for `dsjax generate`)."""
    shown = 0
    for out, counts in sample_chunks(params, c, [prompt_ids], s, eos_id, chunk):
        new = [int(t) for t in out[0, shown : counts[0]]]
        shown = int(counts[0])
        if new:
            yield new
