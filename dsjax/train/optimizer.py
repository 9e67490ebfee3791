"""optax AdamW with warmup + cosine (or WSD) decay and global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dsjax.config import TrainingConfig


def lr_schedule(t: TrainingConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine / WSD / constant to `min_lr_ratio * learning_rate`."""
    peak, floor = t.learning_rate, t.learning_rate * t.min_lr_ratio
    warmup = min(t.warmup_steps, t.max_steps)
    rest = max(t.max_steps - warmup, 1)
    if t.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=t.min_lr_ratio)
    elif t.lr_schedule == "wsd":
        decay = max(int(round(rest * t.wsd_decay_fraction)), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [rest - decay]
        )
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(peak / warmup, peak, warmup - 1), after], [warmup])


NO_DECAY_LEAVES = ("scale", "e_score_correction_bias")  # RMSNorm scales and the routing bias


def decay_mask(params):
    """Weight decay on weight matrices only, never on norms or biases.

    By leaf name rather than by rank: in the pipeline layout a norm's scale is
    stacked to [stages, layers, D] but must still not be decayed.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) not in NO_DECAY_LEAVES, params)


# A leaf at least this large is reduced alone rather than joined to the others. Joining saves a
# launch per leaf, but costs a copy of the leaf and a slower reduction: XLA indexes each element
# of the joined array into its leaf, and on an H200 that reduction read about 0.45 TB/s (run 4,
# BENCHMARKS.md: `small`'s joined 75M gradients, 1.0 ms per step with the join). 2^20 elements
# keeps `tiny`'s kernels per step nearly as they are and takes `small`'s large leaves out.
JOIN_BELOW_ELEMENTS = 1 << 20


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of every leaf's squares (fp32): `optax.tree.norm`, in fewer kernels on one device.

    On one device the small leaves are joined end to end and reduced once: XLA fuses the join
    into the reduction, so it is one or two kernels where a reduction per leaf is one kernel
    per leaf (112 of the 742 kernels of `tiny`'s step on an H200 target,
    `benchmarks/gpu_kernels.py`). Leaves of JOIN_BELOW_ELEMENTS or more are reduced one by one:
    for them a launch costs less than the join. Under a mesh the leaves are laid out
    differently (split over tp, ep, dp), and joining them would gather them: there each leaf
    is reduced where it lies, as optax does. Same value up to summation order.
    """
    leaves = jax.tree.leaves(tree)
    if not jax.sharding.get_abstract_mesh().empty or len(leaves) < 2:
        return optax.tree.norm(tree)
    small = [x for x in leaves if x.size < JOIN_BELOW_ELEMENTS]
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves if x.size >= JOIN_BELOW_ELEMENTS]
    if small:
        joined = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in small])
        squares.append(jnp.sum(jnp.square(joined)))
    return jnp.sqrt(sum(squares[1:], squares[0]))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` with `global_norm`: updates scaled by max_norm / norm when the norm exceeds it."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        keep = norm < max_norm
        updates = jax.tree.map(lambda u: jax.lax.select(keep, u, (u / norm.astype(u.dtype)) * max_norm), updates)
        return updates, state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(t: TrainingConfig) -> optax.GradientTransformation:
    # The routing bias gets zero gradient and no decay, so AdamW leaves it exactly
    # unchanged; the trainer moves it with the aux-loss-free update instead.
    return optax.chain(
        clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
        optax.adamw(lr_schedule(t), b1=t.beta1, b2=t.beta2, eps=1e-8, weight_decay=t.weight_decay, mask=decay_mask),
    )
