"""The train state and the jitted train and eval steps (no host sync inside either)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from dsjax import model
from dsjax.config import Config
from dsjax.train.optimizer import lr_schedule, make_optimizer
from meshes import rules
from meshes.mesh import BATCH_AXES


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def init_state(config: Config, rng: jax.Array) -> TrainState:
    params = model.init(config.model, rng)
    opt_state = make_optimizer(config.training).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def abstract_state(config: Config) -> TrainState:
    return jax.eval_shape(lambda: init_state(config, jax.random.key(0)))


def make_train_step(config: Config, moe_impl: str = "auto", mesh=None):
    """train_step(state, batch_ABT1) -> (state, metrics); A = gradient-accumulation microbatches.

    With a mesh, the state is laid out by the logical-axis rules (optimizer moments
    ZeRO-split over dp) and the batch split over (dp, ep); the step runs under the
    mesh so the model's sharding constraints and expert-parallel shard_map apply.
    """
    c, t = config.model, config.training
    optimizer = make_optimizer(t)
    schedule = lr_schedule(t)
    grad_fn = jax.value_and_grad(lambda p, w: model.loss_fn(p, w, c, moe_impl=moe_impl), has_aux=True)

    def train_step(state: TrainState, batch_ABT1):
        A = batch_ABT1.shape[0]

        def accumulate(carry, window_BT1):
            (_, metrics), grads = grad_fn(state.params, window_BT1)
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            jax.eval_shape(lambda: (state.params, grad_fn(state.params, batch_ABT1[0])[0][1])),
        )
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, batch_ABT1)
        grads = jax.tree.map(lambda g: g / A, grads)
        metrics = jax.tree.map(lambda m: m / A, metrics)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        load = metrics.pop("expert_load")
        params = model.apply_bias_updates(params, load, c)
        if load.shape[0]:
            metrics["expert_imbalance"] = jnp.mean(jnp.max(load, axis=-1) / jnp.mean(load, axis=-1))
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if mesh is None:
        return jax.jit(train_step, donate_argnums=0)
    shardings = state_shardings_for(config, mesh)
    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )

    def sharded_step(state, batch_ABT1):
        with jax.set_mesh(mesh):
            return jitted(state, batch_ABT1)

    return sharded_step


def batch_sharding(mesh) -> NamedSharding:
    """Batches [A, B, T+1]: the B axis split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))


def state_shardings_for(config: Config, mesh):
    return rules.state_shardings(mesh, abstract_state(config), model.logical_axes(config.model))


def make_eval_step(config: Config, moe_impl: str = "auto", mesh=None):
    """eval_step(params, windows_BT1, bytes_BT1, weight_B) -> (nats, tokens, bytes) summed over the batch."""
    c = config.model

    def eval_step(params, windows_BT1, bytes_BT1, weight_B):
        logits_BTV, _ = model.forward(params, windows_BT1[:, :-1], c, moe_impl=moe_impl)
        nll_BT = model.token_cross_entropy(logits_BTV, windows_BT1[:, 1:])
        nats = jnp.sum(nll_BT * weight_B[:, None])
        tokens = jnp.sum(jnp.ones_like(nll_BT) * weight_B[:, None])
        text_bytes = jnp.sum(bytes_BT1[:, 1:].astype(jnp.float32) * weight_B[:, None])
        return nats, tokens, text_bytes

    if mesh is None:
        return jax.jit(eval_step)
    data = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))
    params = state_shardings_for(config, mesh).params
    jitted = jax.jit(eval_step, in_shardings=(params, data, data, NamedSharding(mesh, PartitionSpec(BATCH_AXES))))

    def sharded_eval(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    return sharded_eval
