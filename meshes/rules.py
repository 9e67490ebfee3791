"""The one table that maps logical axis names to mesh axes, and the shardings it implies.

Parameters carry logical axes from `dsjax.model.params`; activations are
constrained by logical name inside the model (`constrain`). Both go through
`RULES`, so changing a layout means changing one line here.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("dp", "ep"),  # ep is extra data parallelism outside the MoE layers
    "sequence": "sp",
    "kv_sequence": None,  # keys/values see the whole sequence: SP gathers the small MLA latents
    "activation_embed": None,
    "activation_heads": "tp",
    "activation_vocab": "tp",
    "activation_mlp": "tp",
    # parameters
    "vocab": "tp",  # vocab-parallel embedding and output head
    "embed": None,
    "embed_concat": None,
    "heads": "tp",  # Megatron column-parallel q/kv_b, row-parallel o_proj
    "head_dim": None,
    "q_lora": None,
    "kv_lora": None,
    "mlp": "tp",  # column-parallel gate/up, row-parallel down (dense, shared and routed experts)
    "exp": "ep",
    "norm": None,
    "stage": "pp",  # pipeline stages: stacked decoder layers, one stage per pp index
    "stage_repeat": None,  # a stage's layer groups (circular schedule)
    "stage_layer": None,  # the layers within one group
}
# ZeRO: optimizer moments are further split over the data axis along their first free dimension
ZERO_AXIS = "dp"


def logical_spec(axes: tuple[str | None, ...]) -> PartitionSpec:
    return PartitionSpec(*(RULES.get(a) if a is not None else None for a in axes))


def _mesh_axes_in(spec: PartitionSpec) -> set[str]:
    used: set[str] = set()
    for entry in spec:
        if entry is None:
            continue
        used.update(entry if isinstance(entry, tuple) else (entry,))
    return used


def _axis_size(mesh, entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[n] for n in names]))


def fitted_spec(mesh, axes: tuple[str, ...], shape: tuple[int, ...]) -> PartitionSpec:
    """The rules' spec, with any dimension that does not divide its mesh axes left replicated."""
    spec = logical_spec(axes)
    return PartitionSpec(*(e if dim % _axis_size(mesh, e) == 0 else None for e, dim in zip(spec, shape)))


def param_shardings(mesh, axes_tree, shapes_tree):
    """NamedShardings for a params tree from its logical-axes tree."""
    return jax.tree.map(
        lambda axes, s: NamedSharding(mesh, fitted_spec(mesh, axes, s.shape)),
        axes_tree,
        shapes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def zero_sharding(mesh, sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """Split one more (the first free, divisible) dimension over the data axis, ZeRO-style."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    if ZERO_AXIS in _mesh_axes_in(PartitionSpec(*spec)) or mesh.shape[ZERO_AXIS] == 1:
        return sharding
    for i, (entry, dim) in enumerate(zip(spec, shape)):
        if entry is None and dim % mesh.shape[ZERO_AXIS] == 0:
            spec[i] = ZERO_AXIS
            return NamedSharding(mesh, PartitionSpec(*spec))
    return sharding


def state_shardings(mesh, abstract_state, axes_tree):
    """Shardings for a TrainState: params by the rules, optimizer moments by the rules + ZeRO, scalars replicated."""
    params = param_shardings(mesh, axes_tree, abstract_state.params)
    replicated = NamedSharding(mesh, PartitionSpec())
    params_def = jax.tree.structure(abstract_state.params)

    def for_subtree(subtree):
        # optimizer states hold trees shaped like params (mu, nu); everything else is replicated
        if jax.tree.structure(subtree) == params_def:
            return jax.tree.map(lambda sh, a: zero_sharding(mesh, sh, a.shape), params, subtree)
        return jax.tree.map(lambda _: replicated, subtree)

    opt = map_params_like(abstract_state.opt_state, params_def, for_subtree)
    return abstract_state.replace(step=replicated, params=params, opt_state=opt)


def map_params_like(tree, params_def, fn):
    """Apply fn to every subtree of `tree` shaped like the params (params, AdamW mu/nu); recurse elsewhere."""
    if jax.tree.structure(tree) == params_def:
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple optax states
        return type(tree)(*(map_params_like(x, params_def, fn) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_params_like(x, params_def, fn) for x in tree)
    if isinstance(tree, dict):
        return {k: map_params_like(v, params_def, fn) for k, v in tree.items()}
    return fn(tree)


def constrain(x, logical_axes: tuple[str | None, ...]):
    """Sharding constraint by logical names; a no-op outside a mesh context (single device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = PartitionSpec(
        *(e if e is not None and dim % _axis_size(mesh, e) == 0 else None
          for e, dim in zip(logical_spec(logical_axes), x.shape))
    )
    return jax.lax.with_sharding_constraint(x, spec)


def bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds for `tree` laid out by `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


def describe(mesh, abstract_state, shardings) -> dict[str, Any]:
    return {
        "mesh": dict(mesh.shape),
        "params_bytes_per_device": bytes_per_device(abstract_state.params, shardings.params),
        "optimizer_bytes_per_device": bytes_per_device(abstract_state.opt_state, shardings.opt_state),
    }
