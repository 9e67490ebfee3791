"""Expert parallelism: experts split over `ep`, by replicate-and-mask or by all-to-all dispatch.

Routing runs outside (in the global view, so the balance loss and loads see whole
sequences). Inside a shard_map that is manual over the token axes (dp, ep, sp)
each ep shard holds E / ep experts and its own tokens. Two schemes, the same
result (`distributed.ep_dispatch`; BUILD.md compares their traffic):

- `mask` (the reference): each ep shard all-gathers the tokens of its ep group,
  runs *its* experts on all of them (masked by the gate values, so unchosen pairs
  add zero) and reduce-scatters the partial outputs back.
- `all_to_all`: each shard sends every (token, chosen expert) copy to the shard
  holding that expert, which runs the same per-expert computation on the rows it
  receives and sends the results back; the sender combines them with the gates.
  XLA:CPU has no `ragged_all_to_all`, so the exchange is an `all_to_all` of
  fixed-capacity buffers sized for the worst case, never dropping a token.

The scheme is ambient, like the mesh: `dispatch_scheme(...)` sets it for the
code traced inside (the train and eval steps do, from the config).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

SCHEMES = ("mask", "all_to_all")
_scheme = contextvars.ContextVar("ep_dispatch", default="mask")


def ep_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "ep" not in mesh.axis_names:
        return 1
    return mesh.shape["ep"]


def current_scheme() -> str:
    return _scheme.get()


@contextlib.contextmanager
def dispatch_scheme(scheme: str):
    """Trace the code inside with this EP scheme (`mask` or `all_to_all`)."""
    if scheme not in SCHEMES:
        raise ValueError(f"ep_dispatch: '{scheme}' is not a scheme; choose one of {', '.join(SCHEMES)}")
    token = _scheme.set(scheme)
    try:
        yield
    finally:
        _scheme.reset(token)


def with_scheme(scheme: str, fn):
    """fn, traced under `dispatch_scheme(scheme)` whenever it is called (and so whenever jit traces it)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with dispatch_scheme(scheme):
            return fn(*args, **kwargs)

    return wrapped


def _token_layout():
    """(mesh, manual axes, token spec): tokens keep the activation layout (batch over dp and ep, sequence over sp)."""
    mesh = jax.sharding.get_abstract_mesh()
    manual = {a for a in ("dp", "ep", "sp") if a in mesh.axis_names}
    batch_axes = tuple(a for a in ("dp", "ep") if a in manual)
    return mesh, manual, P(batch_axes, "sp" if "sp" in manual else None)


def expert_parallel(local_experts_fn, experts, x_BTD, combine_BTE):
    """Replicate-and-mask: out_BTD = sum over experts of combine * expert(x), experts sharded over `ep`.

    local_experts_fn(experts_local, x_td, combine_te_local) -> out_td runs this
    shard's experts (the leading axis of every `experts` leaf) on its tokens.
    Entering and leaving the shard_map moves nothing.
    """
    mesh, manual, token_spec = _token_layout()
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


def dispatch_capacity(tokens: int, top_k: int, local_experts: int) -> int:
    """Rows each shard reserves per destination shard: the most copies that can ever go to one.

    A token's top-k experts are distinct, so at most min(K, E_local) of its copies
    land on one shard. A smaller capacity (a "capacity factor" < this) would drop
    tokens whenever routing is uneven; we do not drop.
    """
    return tokens * min(top_k, local_experts)


def _slots(dest_N, shards: int):
    """Each copy's row in its destination's buffer: its rank among the copies sent to that shard."""
    order_N = jnp.argsort(dest_N, stable=True)
    counts_S = jnp.bincount(dest_N, length=shards)
    starts_S = jnp.cumsum(counts_S) - counts_S
    rank_sorted_N = jnp.arange(dest_N.shape[0]) - starts_S[dest_N[order_N]]
    return jnp.zeros_like(dest_N).at[order_N].set(rank_sorted_N, unique_indices=True)


def expert_parallel_dispatch(experts_fn, experts, x_BTD, expert_idx_BTK, gate_BTK):
    """All-to-all dispatch: out_BTD = sum_k gate * expert_k(x), experts sharded over `ep`.

    experts_fn(experts_local, x_RD, expert_idx_RK, gate_RK) -> out_RD is the
    one-device routed-expert computation (dense, ragged or pallas); it runs on the
    rows a shard receives, each with its one local expert and weight 1 (0 for the
    empty rows of the fixed-size buffers).

    Per shard, with T_l local tokens, ep shards and capacity C = T_l * min(K, E/ep):
    send buffer [ep, C, D] -> all_to_all -> experts on ep * C rows -> all_to_all back
    -> gather each copy's result -> weight by its gate and sum over k.
    """
    mesh, manual, token_spec = _token_layout()
    shards = mesh.shape["ep"]
    n_local = jax.tree.leaves(experts)[0].shape[0] // shards

    def local(experts_local, x_btd, idx_btk, gate_btk):
        b, t, D = x_btd.shape
        K = idx_btk.shape[-1]
        T, N = b * t, b * t * K
        C = dispatch_capacity(T, K, n_local)
        x_TD = x_btd.reshape(T, D)
        expert_N = idx_btk.reshape(N)
        dest_N = expert_N // n_local
        row_N = dest_N * C + _slots(dest_N, shards)  # unique place in the flattened [ep * C] send buffer
        # which copy fills each buffer row (N: none), then the rows themselves
        copy_R = jnp.full((shards * C,), N, jnp.int32).at[row_N].set(
            jnp.arange(N, dtype=jnp.int32), unique_indices=True
        )
        filled_R = copy_R < N
        send_RD = jnp.where(filled_R[:, None], x_TD[jnp.where(filled_R, copy_R // K, 0)], 0)
        # each row's expert on its destination shard; n_local marks an empty row
        send_local_R = jnp.where(filled_R, expert_N[jnp.minimum(copy_R, N - 1)] % n_local, n_local)

        def exchange(a):  # [ep * C, ...]: block s goes to shard s; block s comes back from shard s
            return jax.lax.all_to_all(a.reshape((shards, C) + a.shape[1:]), "ep", 0, 0, tiled=True).reshape(a.shape)

        recv_RD = exchange(send_RD)
        recv_local_R = exchange(send_local_R)
        received_R = recv_local_R < n_local
        # empty rows go to local expert 0 with weight 0: zero output, but a grouped-matmul receiver
        # still computes them (ep * C rows in all, about K * T_l of them real)
        y_RD = experts_fn(
            experts_local,
            recv_RD,
            jnp.where(received_R, recv_local_R, 0)[:, None],
            received_R.astype(jnp.float32)[:, None],
        )
        back_RD = exchange(y_RD)
        y_TKD = back_RD[row_N].reshape(T, K, D)
        gate_TK = gate_btk.reshape(T, K).astype(y_TKD.dtype)
        out_TD = jnp.einsum("tkd,tk->td", y_TKD, gate_TK, preferred_element_type=jnp.float32)  # fp32 sum over k
        return out_TD.astype(y_TKD.dtype).reshape(b, t, D)

    expert_specs = jax.tree.map(lambda _: P("ep"), experts)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(expert_specs, token_spec, token_spec, token_spec),
        out_specs=token_spec,
        axis_names=manual,
        # a Pallas receiver (`--moe pallas`) cannot declare how its outputs vary over the manual axes;
        # the output is sharded over every manual axis, so there is no replication for the check to prove
        check_vma=False,
    )(experts, x_BTD, expert_idx_BTK, gate_BTK)
