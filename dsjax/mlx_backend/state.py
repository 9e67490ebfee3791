"""MLX trainer state <-> the JAX TrainState that checkpoints hold, so step_N/ crosses backends.

AdamW's moments map one to one: optax's ScaleByAdamState (count, mu, nu) is MLX's
(step, m, v), per parameter path. Both backends therefore write and resume the
same Orbax checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mlx.core as mx
import numpy as np

from dsjax.config import Config
from dsjax.mlx_backend.train import MLXTrainer, flatten
from dsjax.train.step import TrainState, abstract_state


def _moment_path(path) -> tuple[str | None, str | None]:
    """('mu' | 'nu' | 'count' | None, params path) for a leaf of the optax state."""
    kinds = [getattr(p, "name", None) for p in path]
    for kind in ("mu", "nu"):
        if kind in kinds:
            rest = path[kinds.index(kind) + 1 :]
            return kind, "/".join(str(p.key) for p in rest)
    if kinds and kinds[-1] == "count":
        return "count", None
    return None, None


def _optimizer_for(trainer: MLXTrainer, key: str):
    return trainer.opt_decay if key in trainer.decayed else trainer.opt_plain


def _ensure_initialised(trainer: MLXTrainer) -> None:
    for opt, keys in ((trainer.opt_decay, trainer.decayed), (trainer.opt_plain, set(trainer.params) - trainer.decayed)):
        if not opt._initialized:  # noqa: SLF001 - MLX exposes no public flag
            opt.init({k: trainer.params[k] for k in keys})


def to_train_state(config: Config, trainer: MLXTrainer) -> TrainState:
    """The trainer's params and AdamW moments as a JAX TrainState (host arrays)."""
    _ensure_initialised(trainer)
    template = abstract_state(config)

    def fill(path, leaf):
        kind, key = _moment_path(path)
        if kind == "count":
            return jnp.asarray(trainer.step, leaf.dtype)
        if kind in ("mu", "nu"):
            value = _optimizer_for(trainer, key).state[key]["m" if kind == "mu" else "v"]
            return jnp.asarray(np.array(value))
        raise ValueError(f"unexpected optimizer state leaf {jax.tree_util.keystr(path)}")

    opt_state = jax.tree_util.tree_map_with_path(fill, template.opt_state)
    params = jax.tree.map(jnp.asarray, trainer.params_numpy())
    return TrainState(step=jnp.asarray(trainer.step, jnp.int32), params=params, opt_state=opt_state)


def load_train_state(trainer: MLXTrainer, state: TrainState) -> None:
    """Put a (restored) TrainState's params, moments and step into the trainer."""
    trainer.params = {p: mx.array(np.asarray(v)) for p, v in flatten(jax.device_get(state.params)).items()}
    _ensure_initialised(trainer)
    step = int(state.step)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        kind, key = _moment_path(path)
        if kind in ("mu", "nu"):
            _optimizer_for(trainer, key).state[key]["m" if kind == "mu" else "v"] = mx.array(np.asarray(leaf))
    for opt in (trainer.opt_decay, trainer.opt_plain):
        opt.state["step"] = mx.array(step, mx.uint64)
    trainer.step = step
