"""JAX-CPU vs MLX steps/s for one training step of a size: `uv run python tests/bench_backends.py [nano]`."""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from dsjax.config import load_config
from dsjax.mlx_backend.train import MLXTrainer
from dsjax.train.step import init_state, make_train_step


def jax_steps_per_sec(step, state, batch, n: int = 3) -> float:
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(n):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return n / (time.perf_counter() - start)


if __name__ == "__main__":
    size = sys.argv[1] if len(sys.argv) > 1 else "nano"
    config = load_config(size)
    t = config.training
    batch = np.random.default_rng(0).integers(0, config.model.vocab_size, (t.gradient_accumulation_steps, t.batch_size, t.seq_len + 1)).astype(np.int32)
    state = init_state(config, jax.random.key(0))
    params = jax.device_get(state.params)
    jax_sps = jax_steps_per_sec(make_train_step(config), state, batch)
    trainer = MLXTrainer(config, params)
    trainer.train_step(batch)
    start = time.perf_counter()
    for _ in range(2):
        trainer.train_step(batch)
    mlx_sps = 2 / (time.perf_counter() - start)
    tokens = batch.shape[0] * batch.shape[1] * t.seq_len
    print(f"| {size} | JAX-CPU {jax_sps:.3f} steps/s ({jax_sps * tokens:,.0f} tok/s) | MLX-CPU {mlx_sps:.3f} steps/s ({mlx_sps * tokens:,.0f} tok/s) |")
