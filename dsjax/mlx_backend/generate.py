"""Cached decoding on MLX with the latent cache; same sampling flags as the JAX path."""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
import numpy as np

from dsjax.config import ModelConfig
from dsjax.mlx_backend import model as xm


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(logits)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.sort(logits)[::-1]
        probs = np.exp(order - order.max())
        cumulative = np.cumsum(probs / probs.sum())
        cutoff = order[min(int(np.sum(cumulative < top_p)), len(order) - 1)]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def generate_tokens_mlx(
    params, c: ModelConfig, prompt_ids: list[int], sampling, eos_id: int | tuple[int, ...] | None = None
) -> Iterator[int]:
    """Same contract as dsjax.infer.generate.generate_tokens (greedy matches it token for token)."""
    sampling.validate()
    max_len = min(len(prompt_ids) + sampling.max_new_tokens, c.max_position_embeddings)
    cache = xm.init_cache(c, batch=1, max_len=max_len)
    rng = np.random.default_rng(sampling.seed)
    logits = xm.decode_step(params, mx.array([prompt_ids]), cache, 0, c)
    position, produced = len(prompt_ids), 0
    while True:
        token = _sample(np.array(logits[0, -1]), rng, sampling.temperature, sampling.top_k, sampling.top_p)
        if eos_id is not None and token in ((eos_id,) if isinstance(eos_id, int) else eos_id):
            return
        yield token
        produced += 1
        if produced >= sampling.max_new_tokens or position >= max_len:
            return
        logits = xm.decode_step(params, mx.array([[token]]), cache, position, c)
        position += 1
