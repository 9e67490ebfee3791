"""Helpers shared by tests: a short training run (one device against a mesh), params made on the host."""

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.model import abstract_params
from dsjax.train.step import batch_sharding, init_state, make_train_step, pipeline_stages, state_shardings_for


def twenty_steps(config, mesh=None):
    """(losses, final state) of 20 train steps on two batches in turn (seeded, batch 8 x 32).

    Alternating two batches lets the model memorise them, so the loss visibly falls.
    """
    pair = np.asarray(jax.random.randint(jax.random.key(2), (2, 1, 8, 33), 0, config.model.vocab_size))
    step = make_train_step(config, mesh=mesh)
    state = init_state(config, jax.random.key(3), pipeline_stages(mesh))
    place = (lambda b: b) if mesh is None else (lambda b: jax.device_put(b, batch_sharding(mesh)))  # noqa: E731
    if mesh is not None:
        state = jax.device_put(state, state_shardings_for(config, mesh))
    losses = []
    for i in range(20):
        state, metrics = step(state, place(pair[i % 2]))
        losses.append(float(metrics["loss"]))
    return losses, state


def host_init(c, seed):
    """Random params made on the host (no init program to compile): normal(0, 0.02), norm scales at 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        if getattr(path[-1], "key", None) == "scale":
            return jnp.ones(shape.shape, jnp.float32)
        return jnp.asarray(0.02 * rng.standard_normal(shape.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(c))
