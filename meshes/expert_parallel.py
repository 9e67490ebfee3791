"""Expert parallelism: experts split over `ep`, tokens replicated-and-masked inside `jax.shard_map`.

Routing runs outside (in the global view, so the balance loss and loads see whole
sequences). Inside a shard_map that is manual over the token axes (dp, ep, sp),
each ep shard all-gathers the tokens of its ep group, runs *its* experts on all
of them (masked by the gate values, so unchosen pairs add zero) and
reduce-scatters the partial outputs back. No token is dropped and no capacity
is needed; the cost is that every shard computes its experts on the whole ep
group's tokens (the dense CPU path does that anyway). An all_to_all dispatch
with fixed capacity would move less data per token at large ep; this scheme
moves tokens once each way and has no capacity to tune.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P


def ep_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "ep" not in mesh.axis_names:
        return 1
    return mesh.shape["ep"]


def expert_parallel(local_experts_fn, experts, x_BTD, combine_BTE):
    """out_BTD = sum over experts of combine * expert(x), with experts sharded over `ep`.

    local_experts_fn(experts_local, x_td, combine_te_local) -> out_td runs this
    shard's experts (the leading axis of every `experts` leaf) on its tokens.
    Tokens keep the activation layout (batch over dp and ep, sequence over sp),
    so entering and leaving the shard_map moves nothing.
    """
    mesh = jax.sharding.get_abstract_mesh()
    manual = {a for a in ("dp", "ep", "sp") if a in mesh.axis_names}
    batch_axes = tuple(a for a in ("dp", "ep") if a in manual)
    token_spec = P(batch_axes, "sp" if "sp" in manual else None)
    E = combine_BTE.shape[-1]
    n_local = E // mesh.shape["ep"]

    def local(experts_local, x_btd, combine_bte):
        x_group = jax.lax.all_gather(x_btd, "ep", axis=0, tiled=True)
        combine_group = jax.lax.all_gather(combine_bte, "ep", axis=0, tiled=True)
        first = jax.lax.axis_index("ep") * n_local
        combine_local = jax.lax.dynamic_slice_in_dim(combine_group, first, n_local, axis=2)
        b, t, d = x_group.shape
        partial = local_experts_fn(experts_local, x_group.reshape(b * t, d), combine_local.reshape(b * t, n_local))
        return jax.lax.psum_scatter(partial.reshape(b, t, d), "ep", scatter_dimension=0, tiled=True)

    expert_specs = jax.tree.map(lambda _: P("ep"), experts)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(expert_specs, token_spec, token_spec),
        out_specs=token_spec,
        axis_names=manual,
    )(experts, x_BTD, combine_BTE)
