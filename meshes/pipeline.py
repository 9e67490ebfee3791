"""Pipeline parallelism over `pp`: the stacked-stage layout and a GPipe schedule in `jax.shard_map`.

Layout. DeepSeek's first `first_k_dense_replace` layers are dense and shaped
differently from the MoE layers, so they stay outside the pipeline with the
embedding, the final norm, the head and the MTP modules. The remaining
decoder layers `first .. L-1` are uniform; under `pp > 1` their parameters are
stacked into `params["stages"]`, every leaf shaped `[S, L_s, ...]` (S stages of
L_s consecutive layers) with logical axes `("stage", "stage_layer", ...)`. The
rules table maps `stage` to `pp`, so a stage's weights and optimizer moments
live only on that stage's devices. Checkpoints keep the canonical per-layer
tree (`to_stages` / `from_stages` convert), so they restore on any mesh.

Schedule (GPipe). Inside a `shard_map` that is manual over `pp` only (dp, ep,
sp and tp stay automatic, laid out by the rules table), a `lax.scan` runs
M + S - 1 iterations. In iteration i stage s works on microbatch i - s: stage 0
reads it from the input, the others from what their predecessor sent in the
previous iteration by one `ppermute`. Iterations where i - s is outside
0..M-1 are the bubble: they compute on stale values that are masked out of
every result, so a fraction (S-1)/(M+S-1) of stage time is idle. Each
iteration is rematerialised (`jax.checkpoint`), so a stage keeps one input
activation per iteration for the backward pass instead of every layer's.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

STAGES_KEY = "stages"
AXIS = "pp"


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Share of each stage's iterations that are idle in GPipe: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def pipelined_layers(num_layers: int, first: int) -> int:
    """How many decoder layers go into the pipeline (all but the leading dense ones)."""
    return num_layers - first


# --- layout: canonical {"layers": {"0": ..., "1": ...}} <-> {"layers": dense, "stages": [S, L_s, ...]} ------


def to_stages(params_like: dict[str, Any], first: int, stages: int) -> dict[str, Any]:
    """Stack layers first..L-1 of a params-shaped tree (params, grads, moments) into `stages`."""
    layers = params_like["layers"]
    names = sorted(layers, key=int)
    moved = [layers[n] for n in names if int(n) >= first]
    per_stage = len(moved) // stages

    def stack(*leaves):
        stacked = jnp.stack(leaves)
        return stacked.reshape((stages, per_stage) + stacked.shape[1:])

    out = {k: v for k, v in params_like.items() if k != "layers"}
    out["layers"] = {n: layers[n] for n in names if int(n) < first}
    out[STAGES_KEY] = jax.tree.map(stack, *moved)
    return out


def from_stages(params_like: dict[str, Any], first: int) -> dict[str, Any]:
    """The inverse of `to_stages`: unstack `stages` back into numbered layers."""
    stacked = params_like[STAGES_KEY]
    S, per_stage = jax.tree.leaves(stacked)[0].shape[:2]
    out = {k: v for k, v in params_like.items() if k != STAGES_KEY}
    layers = dict(params_like["layers"])
    for j in range(S * per_stage):
        s, l = divmod(j, per_stage)
        layers[str(first + j)] = jax.tree.map(lambda x: x[s, l], stacked)
    out["layers"] = layers
    return out


def stage_axes(axes_tree: dict[str, Any], first: int, stages: int) -> dict[str, Any]:
    """Logical axes for the staged layout: stacked leaves get ("stage", "stage_layer") in front."""
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731 - leaves of an axes tree are tuples of names
    layers = axes_tree["layers"]
    moved = [layers[n] for n in sorted(layers, key=int) if int(n) >= first]
    out = {k: v for k, v in axes_tree.items() if k != "layers"}
    out["layers"] = {n: v for n, v in layers.items() if int(n) < first}
    out[STAGES_KEY] = jax.tree.map(lambda axes: ("stage", "stage_layer") + axes, moved[0], is_leaf=is_axes)
    return out


# --- the schedule -----------------------------------------------------------------------------------


def gpipe(
    stage_fn: Callable[..., tuple[jax.Array, Any]],
    stage_params: Any,
    x_MBTD: jax.Array,
    consts: tuple[jax.Array, ...] = (),
    *,
    remat: bool = True,
):
    """Run M microbatches through S pipeline stages; returns (y_MBTD, stats_S).

    stage_fn(params_of_one_stage, x_BTD, *consts) -> (y_BTD, stats) applies one
    stage (its leaves have the [L_s, ...] of one stage); `stats` is a pytree of
    per-microbatch values (losses, counts) that the schedule sums over the
    microbatches each stage really processed. Each stats leaf comes back with a
    leading stage axis [S, ...]. Must run under a mesh with a `pp` axis.
    """
    mesh = jax.sharding.get_abstract_mesh()
    S = mesh.shape[AXIS]
    M = x_MBTD.shape[0]
    iterations = M + S - 1
    body = jax.checkpoint(stage_fn) if remat else stage_fn
    stats_shape = jax.eval_shape(
        lambda p, x, *c: stage_fn(jax.tree.map(lambda a: a[0], p), x[0], *c)[1], stage_params, x_MBTD, *consts
    )

    def per_stage(params_1, x_mbtd, *cs):
        params = jax.tree.map(lambda a: a[0], params_1)  # this stage's [L_s, ...]
        stage = jax.lax.axis_index(AXIS)

        def step(carry, i):
            received, outputs, stats_sum = carry
            micro = i - stage
            valid = (micro >= 0) & (micro < M)
            fresh = jax.lax.dynamic_index_in_dim(x_mbtd, jnp.clip(i, 0, M - 1), keepdims=False)
            x_in = jnp.where(stage == 0, fresh, received)
            y, stats = body(params, x_in, *cs)
            stats_sum = jax.tree.map(lambda acc, v: acc + jnp.where(valid, v, jnp.zeros_like(v)), stats_sum, stats)
            # the last stage files its finished microbatch; the others leave `outputs` alone
            slot = jnp.clip(micro, 0, M - 1)
            keep = valid & (stage == S - 1)
            current = jax.lax.dynamic_index_in_dim(outputs, slot, keepdims=False)
            outputs = jax.lax.dynamic_update_index_in_dim(outputs, jnp.where(keep, y, current), slot, 0)
            sent = jax.lax.ppermute(y, AXIS, perm=[(j, j + 1) for j in range(S - 1)])
            return (sent, outputs, stats_sum), None

        zeros_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
        init = (jnp.zeros_like(x_mbtd[0]), jnp.zeros_like(x_mbtd), zeros_stats)
        (_, outputs, stats_sum), _ = jax.lax.scan(step, init, jnp.arange(iterations))
        # only the last stage holds the results: one all-reduce hands them to every stage
        y = jax.lax.psum(jnp.where(stage == S - 1, outputs, jnp.zeros_like(outputs)), AXIS)
        return y, jax.tree.map(lambda a: a[None], stats_sum)

    param_specs = jax.tree.map(lambda _: P(AXIS), stage_params)
    stats_specs = jax.tree.map(lambda _: P(AXIS), stats_shape)
    return jax.shard_map(
        per_stage,
        mesh=mesh,
        in_specs=(param_specs, P()) + tuple(P() for _ in consts),
        out_specs=(P(), stats_specs),
        axis_names={AXIS},
        # JAX 0.10 cannot transpose the expert-parallel shard_map nested inside this one while
        # it tracks varying-ness ("axis pp already bound by a parent"); without the check the
        # gradients are right, which tests/test_pipeline.py proves against one device.
        check_vma=False,
    )(stage_params, x_MBTD, *consts)


def split_microbatches(x_BTD: jax.Array, microbatches: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...] taking rows m, m+M, m+2M, ... into microbatch m.

    Strided rather than contiguous, so each microbatch keeps the batch's split over
    the data axes (a contiguous block would sit on a subset of the data shards).
    """
    B = x_BTD.shape[0]
    x = x_BTD.reshape((B // microbatches, microbatches) + x_BTD.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def merge_microbatches(x_MBTD: jax.Array) -> jax.Array:
    """The inverse of `split_microbatches`."""
    x = jnp.swapaxes(x_MBTD, 0, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
