"""Pipeline parallelism over `pp`: the stacked-stage layout and a GPipe / circular schedule in `jax.shard_map`.

Layout. DeepSeek's first `first_k_dense_replace` layers are dense and shaped
differently from the MoE layers, so they stay outside the pipeline with the
embedding, the final norm, the head and the MTP modules. The remaining
decoder layers `first .. L-1` are uniform; under `pp > 1` their parameters are
stacked into `params["stages"]`, every leaf shaped `[S, R, L_g, ...]`: S stages,
each holding R groups ("repeats") of L_g consecutive layers, with logical axes
`("stage", "stage_repeat", "stage_layer", ...)`. Layer j sits in group
g = j // L_g, on stage g % S, repeat g // S. The rules table maps `stage` to
`pp`, so a stage's weights and optimizer moments live only on its devices.
Checkpoints keep the canonical per-layer tree (`to_stages` / `from_stages`
convert), so they restore on any mesh.

Schedule. Inside a `shard_map` that is manual over `pp` only (dp, ep, sp and tp
stay automatic, laid out by the rules table), a `lax.scan` runs R*M + S - 1
iterations. Stage s works in iteration t on item w = t - s, which is
microbatch w % M on its pass w // M around the ring, using that pass's layer
group. Stage 0 takes a microbatch's first pass from the input and later passes
from what the last stage sent round the ring (kept in a buffer of M slots);
every other stage takes what its predecessor sent in the previous iteration by
one `ppermute`. With R = 1 this is GPipe; with R > 1 it is the circular
(interleaved) schedule. Iterations where w is outside 0..R*M-1 are the bubble:
they compute on stale values masked out of every result, so a fraction
(S-1)/(R*M+S-1) of stage time is idle. Each iteration is rematerialised
(`jax.checkpoint`), so a stage keeps one input activation per iteration for the
backward pass instead of every layer's. The ring needs M >= S: a microbatch
leaving the last stage must not be needed by stage 0 before it arrives.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

STAGES_KEY = "stages"
AXIS = "pp"


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Share of each stage's iterations that are idle: (S - 1) / (R*M + S - 1); R = 1 is GPipe."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


# --- layout: canonical {"layers": {"0": ..., "1": ...}} <-> {"layers": dense, "stages": [S, R, L_g, ...]} ---


def _stage_major(x_N, stages: int, repeats: int):
    """Layers in order [N, ...] -> [S, R, L_g, ...] (layer j = (r*S + s)*L_g + l)."""
    per_group = x_N.shape[0] // (stages * repeats)
    return jnp.swapaxes(x_N.reshape((repeats, stages, per_group) + x_N.shape[1:]), 0, 1)


def layer_major(x_SRL):
    """The inverse of `_stage_major`: [S, R, L_g, ...] -> layers in order [N, ...]."""
    S, R, L = x_SRL.shape[:3]
    return jnp.swapaxes(x_SRL, 0, 1).reshape((S * R * L,) + x_SRL.shape[3:])


def stage_major_like(x_N, stacked_SRL):
    """Rows in layer order [N, ...] laid out like a stacked leaf [S, R, L_g, ...]."""
    S, R = stacked_SRL.shape[:2]
    return _stage_major(x_N, S, R)


def to_stages(params_like: dict[str, Any], first: int, stages: int, repeats: int = 1) -> dict[str, Any]:
    """Stack layers first..L-1 of a params-shaped tree (params, grads, moments) into `stages`."""
    layers = params_like["layers"]
    names = sorted(layers, key=int)
    moved = [layers[n] for n in names if int(n) >= first]
    out = {k: v for k, v in params_like.items() if k != "layers"}
    out["layers"] = {n: layers[n] for n in names if int(n) < first}
    out[STAGES_KEY] = jax.tree.map(lambda *leaves: _stage_major(jnp.stack(leaves), stages, repeats), *moved)
    return out


def from_stages(params_like: dict[str, Any], first: int) -> dict[str, Any]:
    """The inverse of `to_stages`: unstack `stages` back into numbered layers."""
    in_order = jax.tree.map(layer_major, params_like[STAGES_KEY])
    count = jax.tree.leaves(in_order)[0].shape[0]
    out = {k: v for k, v in params_like.items() if k != STAGES_KEY}
    layers = dict(params_like["layers"])
    for j in range(count):
        layers[str(first + j)] = jax.tree.map(lambda x: x[j], in_order)
    out["layers"] = layers
    return out


def stage_axes(axes_tree: dict[str, Any], first: int, stages: int) -> dict[str, Any]:
    """Logical axes for the staged layout: stacked leaves get ("stage", "stage_repeat", "stage_layer") in front."""
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731 - leaves of an axes tree are tuples of names
    layers = axes_tree["layers"]
    moved = [layers[n] for n in sorted(layers, key=int) if int(n) >= first]
    out = {k: v for k, v in axes_tree.items() if k != "layers"}
    out["layers"] = {n: v for n, v in layers.items() if int(n) < first}
    out[STAGES_KEY] = jax.tree.map(
        lambda axes: ("stage", "stage_repeat", "stage_layer") + axes, moved[0], is_leaf=is_axes
    )
    return out


# --- the schedule -----------------------------------------------------------------------------------


def run_pipeline(
    stage_fn: Callable[..., tuple[jax.Array, Any]],
    stage_params: Any,
    x_MBTD: jax.Array,
    consts: tuple[jax.Array, ...] = (),
    *,
    remat: bool = True,
):
    """Run M microbatches through the S stages R times; returns (y_MBTD, stats_SR).

    stage_params leaves are [S, R, L_g, ...]. stage_fn(group_params, x_BTD, *consts)
    -> (y_BTD, stats) applies one layer group (leaves [L_g, ...]); `stats` is a
    pytree of per-microbatch values (losses, counts) that the schedule sums over
    the microbatches each group really processed. Each stats leaf comes back as
    [S, R, ...]. Must run under a mesh with a `pp` axis.
    """
    mesh = jax.sharding.get_abstract_mesh()
    S = mesh.shape[AXIS]
    R = jax.tree.leaves(stage_params)[0].shape[1]
    M = x_MBTD.shape[0]
    iterations = R * M + S - 1
    body = jax.checkpoint(stage_fn) if remat else stage_fn
    stats_shape = jax.eval_shape(
        lambda p, x, *c: stage_fn(jax.tree.map(lambda a: a[0, 0], p), x[0], *c)[1], stage_params, x_MBTD, *consts
    )
    # GPipe sends along a chain; the circular schedule closes it into a ring (last stage -> stage 0)
    perm = [(j, (j + 1) % S) for j in range(S)] if R > 1 else [(j, j + 1) for j in range(S - 1)]

    def per_stage(params_1, x_mbtd, *cs):
        params = jax.tree.map(lambda a: a[0], params_1)  # this stage's [R, L_g, ...]
        stage = jax.lax.axis_index(AXIS)

        def step(carry, t):
            received, ring, outputs, stats_sum = carry
            work = t - stage  # item r*M + m: microbatch m on pass r
            valid = (work >= 0) & (work < R * M)
            r, m = jnp.clip(work, 0, R * M - 1) // M, jnp.clip(work, 0, R * M - 1) % M
            if R > 1:
                # stage 0: what the last stage finished last iteration (item t - S) waits for its next pass
                arrived = t - S
                slot = jnp.clip(arrived, 0, R * M - 1) % M
                parked = jax.lax.dynamic_index_in_dim(ring, slot, keepdims=False)
                ring = jax.lax.dynamic_update_index_in_dim(ring, jnp.where(arrived >= 0, received, parked), slot, 0)
            fresh = jax.lax.dynamic_index_in_dim(x_mbtd, m, keepdims=False)
            looped = jax.lax.dynamic_index_in_dim(ring, m, keepdims=False)
            x_in = jnp.where(stage == 0, jnp.where(r == 0, fresh, looped), received)
            group = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, r, keepdims=False), params)
            y, stats = body(group, x_in, *cs)

            def add(acc, v):
                current = jax.lax.dynamic_index_in_dim(acc, r, keepdims=False)
                return jax.lax.dynamic_update_index_in_dim(acc, current + jnp.where(valid, v, jnp.zeros_like(v)), r, 0)

            stats_sum = jax.tree.map(add, stats_sum, stats)
            # the last stage files a microbatch after its last pass; everyone else leaves `outputs` alone
            keep = valid & (stage == S - 1) & (r == R - 1)
            current = jax.lax.dynamic_index_in_dim(outputs, m, keepdims=False)
            outputs = jax.lax.dynamic_update_index_in_dim(outputs, jnp.where(keep, y, current), m, 0)
            sent = jax.lax.ppermute(y, AXIS, perm=perm)
            return (sent, ring, outputs, stats_sum), None

        zeros_stats = jax.tree.map(lambda s: jnp.zeros((R,) + s.shape, s.dtype), stats_shape)
        ring = jnp.zeros_like(x_mbtd) if R > 1 else jnp.zeros((1,) + x_mbtd.shape[1:], x_mbtd.dtype)
        init = (jnp.zeros_like(x_mbtd[0]), ring, jnp.zeros_like(x_mbtd), zeros_stats)
        (_, _, outputs, stats_sum), _ = jax.lax.scan(step, init, jnp.arange(iterations))
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
