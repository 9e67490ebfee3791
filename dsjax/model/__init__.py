"""The DeepSeek-V3-style model as pure functions over a nested-dict params pytree."""

from dsjax.model.loss import loss_fn, token_cross_entropy
from dsjax.model.params import abstract_params, count_params, init, logical_axes, param_specs, tree_size
from dsjax.model.transformer import (
    apply_bias_updates,
    decode_step,
    forward,
    init_cache,
    moe_layer_paths,
    with_decode_layouts,
)

__all__ = [
    "abstract_params",
    "apply_bias_updates",
    "count_params",
    "decode_step",
    "forward",
    "init",
    "init_cache",
    "logical_axes",
    "loss_fn",
    "moe_layer_paths",
    "param_specs",
    "token_cross_entropy",
    "tree_size",
    "with_decode_layouts",
]
