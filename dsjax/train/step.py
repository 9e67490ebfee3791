"""The train state and the jitted train and eval steps (no host sync inside either)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from dsjax import model
from dsjax.config import Config
from dsjax.model.loss import chunked_head_nll
from dsjax.model.transformer import forward_hidden, head_kernel
from dsjax.train.optimizer import global_norm, lr_schedule, make_optimizer
from meshes import pipeline, rules
from meshes.expert_parallel import with_scheme
from meshes.mesh import BATCH_AXES, MeshShape, resolve_microbatches


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def pipeline_stages(mesh) -> int:
    """Pipeline stages of a mesh (1 without a mesh or without pp)."""
    return 1 if mesh is None else int(dict(mesh.shape).get("pp", 1))


def microbatches_for(config: Config, mesh) -> int:
    if mesh is None:
        return 1
    return resolve_microbatches(MeshShape(**{a: int(n) for a, n in dict(mesh.shape).items()}), config)


# --- layouts: the canonical per-layer tree (checkpoints, one device) and pp stages (training) ---------


def _first_staged(config: Config) -> int:
    return min(config.model.first_k_dense_replace, config.model.num_hidden_layers)


def _repeats(config: Config) -> int:
    return config.distributed.pipeline_repeats


def staged_state(state: TrainState, config: Config, stages: int) -> TrainState:
    """Params and every params-shaped optimizer tree moved into the pp stage layout."""
    if stages == 1:
        return state
    return _relayout(state, lambda tree: pipeline.to_stages(tree, _first_staged(config), stages, _repeats(config)))


def canonical_state(state: TrainState, config: Config) -> TrainState:
    """The inverse of `staged_state`: what checkpoints hold, so they restore on any mesh."""
    if pipeline.STAGES_KEY not in state.params:
        return state
    return _relayout(state, lambda tree: pipeline.from_stages(tree, _first_staged(config)))


def _relayout(state: TrainState, fn) -> TrainState:
    """fn applied to the params and to each params-shaped optimizer tree (mu, nu); the rest kept."""
    params_def = jax.tree.structure(state.params)
    only_params_like = lambda tree: fn(tree) if jax.tree.structure(tree) == params_def else tree  # noqa: E731
    return TrainState(
        step=state.step,
        params=fn(state.params),
        opt_state=rules.map_params_like(state.opt_state, params_def, only_params_like),
    )


def logical_axes_for(config: Config, stages: int = 1):
    axes = model.logical_axes(config.model)
    return pipeline.stage_axes(axes, _first_staged(config), stages) if stages > 1 else axes


def init_state(config: Config, rng: jax.Array, stages: int = 1) -> TrainState:
    """Fresh state; with pp stages the same initial weights as one device, only laid out in stages."""
    params = model.init(config.model, rng)
    if stages > 1:
        params = pipeline.to_stages(params, _first_staged(config), stages, _repeats(config))
    opt_state = make_optimizer(config.training).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def abstract_state(config: Config, stages: int = 1) -> TrainState:
    return jax.eval_shape(lambda: init_state(config, jax.random.key(0), stages))


def accumulated_gradients(grad_fn, params, batch_ABT1):
    """(mean gradient, mean metrics) over the A microbatches of batch_ABT1, summed in a scan.

    grad_fn(params, window_BT1) -> ((loss, metrics), grads). The batch may be a pytree
    (SFT: tokens and per-token weights) whose leaves all lead with A. Equal-size
    microbatches whose losses are token means make this the gradient of the whole
    batch's mean loss (with per-token weights: the mean of the microbatches' weighted means).
    """
    A = jax.tree.leaves(batch_ABT1)[0].shape[0]

    def accumulate(grads_sum, window_BT1):
        (_, metrics), grads = grad_fn(params, window_BT1)
        return jax.tree.map(jnp.add, grads_sum, grads), metrics

    # the metrics leave the scan stacked [A, ...] rather than carried, so the carry's zeros
    # come from the params alone: finding the metrics' shapes first would trace the whole
    # forward and backward a second time (about a third of tracing the step)
    grads, metrics_A = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), batch_ABT1)
    return jax.tree.map(lambda g: g / A, grads), jax.tree.map(lambda m: jnp.sum(m, axis=0) / A, metrics_A)


def fold_microbatches(batch_ABT1):
    """[A, B, ...] -> [1, B * A, ...]: the accumulation microbatches as one batch.

    B stays the outer axis, so a B split over the data-parallel axes stays where it is.
    """
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(1, x.shape[0] * x.shape[1], *x.shape[2:]), batch_ABT1)


# `accumulation: auto` folds when the folded step's activations, estimated at this many bytes
# per token x hidden unit x block (decoder layers + MTP), take at most FOLD_MEMORY_SHARE of the
# device's memory. H200, bf16, `tiny`: folding its 4 x 4 x 256 batch raised the peak from
# 0.76 to 1.52 GiB, 3 x 1,024 more tokens at 256 hidden units x 5 blocks: 207 bytes (BENCHMARKS.md).
FOLD_ACTIVATION_BYTES = 256
FOLD_MEMORY_SHARE = 0.25


def resolve_accumulation(config: Config, mesh=None, foldable: bool = True) -> str:
    """"scan" or "fold": how `training.accumulation` runs this step's microbatches.

    Folding gives the same gradient when every microbatch's loss is a mean over the same
    number of tokens (pretraining, distillation); losses that are weighted means per
    microbatch (SFT) always scan, as do pipeline stages (they split the batch themselves).
    `auto` folds on an accelerator when `fold_fits`; CPU scans (not measured there).
    """
    t = config.training
    if t.gradient_accumulation_steps == 1 or not foldable or pipeline_stages(mesh) > 1:
        return "scan"
    if t.accumulation != "auto":
        return t.accumulation
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    if device.platform == "cpu":
        return "scan"
    data_parallel = 1 if mesh is None else int(np.prod([dict(mesh.shape).get(a, 1) for a in BATCH_AXES]))
    return "fold" if fold_fits(config, data_parallel, (device.memory_stats() or {}).get("bytes_limit")) else "scan"


def fold_fits(config: Config, data_parallel: int, device_memory: int | None) -> bool:
    """Whether the folded step's estimated activations take at most FOLD_MEMORY_SHARE of a device's memory."""
    if not device_memory:
        return False
    t, c = config.training, config.model
    tokens = t.gradient_accumulation_steps * t.batch_size * t.seq_len // data_parallel
    blocks = c.num_hidden_layers + c.num_nextn_predict_layers
    return tokens * c.hidden_size * blocks * FOLD_ACTIVATION_BYTES <= FOLD_MEMORY_SHARE * device_memory


def pretrain_objective(config: Config, moe_impl: str = "auto", microbatches: int = 1):
    """objective(params, window_BT1, extras) -> (loss, metrics): next-token CE + MTP + balance terms."""
    return lambda p, w, _extras: model.loss_fn(p, w, config.model, moe_impl=moe_impl, microbatches=microbatches)


pretrain_objective.foldable = True  # a token mean over equal microbatches: folding keeps the gradient


def sft_objective(config: Config, moe_impl: str = "auto", microbatches: int = 1):
    """The pretraining objective on batches {"tokens": [B, T+1], "weights": [B, T]}: loss on weighted targets only."""
    return lambda p, b, _extras: model.loss_fn(
        p, b["tokens"], config.model, moe_impl=moe_impl, microbatches=microbatches, weight_BT=b["weights"]
    )


# The train and eval steps compile with XLA:GPU's Triton GEMMs off, so every GEMM is a cuBLAS call
# and compiling skips autotuning Triton tilings. On an H200 this cut compiles from 14.6 to 9.4 s
# (`tiny`) and 22.2 to 16.6 s (`small`) at the same step times within 2-4%, and a 3,000-step `tiny`
# CLI run from 55.5 to 46.6 s (BENCHMARKS.md). XLA:CPU ignores xla_gpu_* options.
STEP_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def make_train_step(config: Config, moe_impl: str = "auto", mesh=None, objective=None, extras_shardings=None):
    """train_step(state, batch_ABT1, *extras) -> (state, metrics); A = gradient-accumulation microbatches.

    The A microbatches run one after another, or as one batch (`resolve_accumulation`);
    `train_step.accumulation` says which.

    `objective(config, moe_impl, microbatches)` builds the loss (default: pretraining's);
    `extras` are inputs the loss reads but does not train (distillation's teacher params),
    laid out by `extras_shardings` under a mesh. With a mesh, the state is laid out by the
    logical-axis rules (optimizer moments ZeRO-split over dp) and the batch split over
    (dp, ep); the step runs under the mesh so the model's sharding constraints and
    expert-parallel shard_map apply.
    """
    c, t = config.model, config.training
    optimizer = make_optimizer(t)
    schedule = lr_schedule(t)
    M = microbatches_for(config, mesh)
    objective = objective or pretrain_objective
    loss = objective(config, moe_impl, M)
    accumulation = resolve_accumulation(config, mesh, getattr(objective, "foldable", False))

    def train_step(state: TrainState, batch_ABT1, *extras):
        loss_fn = lambda p, w: loss(p, w, extras)  # noqa: E731
        grad_fn = jax.value_and_grad(with_scheme(config.distributed.ep_dispatch, loss_fn), has_aux=True)
        if accumulation == "fold":
            batch_ABT1 = fold_microbatches(batch_ABT1)
        grads, metrics = accumulated_gradients(grad_fn, state.params, batch_ABT1)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        load = metrics.pop("expert_load")
        params = model.apply_bias_updates(params, load, c)
        if load.shape[0]:
            metrics["expert_imbalance"] = jnp.mean(jnp.max(load, axis=-1) / jnp.mean(load, axis=-1))
        metrics["grad_norm"] = global_norm(grads)
        metrics["lr"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if mesh is None:
        jitted = jax.jit(train_step, donate_argnums=0, compiler_options=STEP_COMPILER_OPTIONS)
        jitted.accumulation = accumulation
        return jitted
    shardings = state_shardings_for(config, mesh)
    extras_in = () if extras_shardings is None else tuple(extras_shardings)
    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, batch_sharding(mesh), *extras_in),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
        compiler_options=STEP_COMPILER_OPTIONS,
    )

    sharded_step = under_mesh(mesh, jitted)
    sharded_step.accumulation = accumulation
    return sharded_step


def under_mesh(mesh, jitted):
    """`jitted`, called under `mesh` when there is one, so its tracing sees the mesh's axes (the model's sharding
    constraints, expert-parallel dispatch); `.jitted` keeps the jitted function for lowering and inspection."""
    if mesh is None:
        return jitted

    def call(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    call.jitted = jitted
    return call


def batch_sharding(mesh) -> NamedSharding:
    """Batches [A, B, T+1]: the B axis split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))


def state_shardings_for(config: Config, mesh, stages: int | None = None):
    """Shardings of the train state on `mesh`, in the pp stage layout unless `stages` says otherwise."""
    stages = pipeline_stages(mesh) if stages is None else stages
    return rules.state_shardings(mesh, abstract_state(config, stages), logical_axes_for(config, stages))


def checkpoint_converters(config: Config, mesh):
    """(to_saved, to_train): between the training layout and the canonical one checkpoints hold.

    Identity without pipeline stages. With them, jitted relayouts whose outputs land
    directly in the target shardings (the canonical copy is replicated over pp).
    """
    stages = pipeline_stages(mesh)
    if stages == 1:
        return (lambda state: state), (lambda state: state)
    to_saved = jax.jit(
        lambda st: canonical_state(st, config), out_shardings=state_shardings_for(config, mesh, stages=1)
    )
    to_train = jax.jit(
        lambda st: staged_state(st, config, stages), out_shardings=state_shardings_for(config, mesh)
    )
    return to_saved, to_train


def make_eval_step(config: Config, moe_impl: str = "auto", mesh=None):
    """eval_step(params, windows_BT1, bytes_BT1, weight_BT) -> (nats, tokens, bytes) summed over weighted targets.

    weight_BT weighs each target token: 1 for every token of a real window in pretraining
    (0 for the padding rows of the last batch), 1 on response tokens only for SFT.
    """
    c = config.model
    M = microbatches_for(config, mesh)

    def eval_step(params, windows_BT1, bytes_BT1, weight_BT):
        if mesh is None:
            # one device: the head in token chunks, as the training loss (faster on CPU; no [B, T, V] logits)
            h_BTD, _ = forward_hidden(params, windows_BT1[:, :-1], c, moe_impl=moe_impl)
            nats = chunked_head_nll(
                h_BTD, params["norm"]["scale"], head_kernel(params, c), windows_BT1[:, 1:], weight_BT, c
            )
        else:
            forward = with_scheme(config.distributed.ep_dispatch, model.forward)
            logits_BTV, _ = forward(params, windows_BT1[:, :-1], c, moe_impl=moe_impl, microbatches=M)
            nats = jnp.sum(model.token_cross_entropy(logits_BTV, windows_BT1[:, 1:]) * weight_BT)
        tokens = jnp.sum(weight_BT)
        text_bytes = jnp.sum(bytes_BT1[:, 1:].astype(jnp.float32) * weight_BT)
        return nats, tokens, text_bytes

    if mesh is None:
        return jax.jit(eval_step, compiler_options=STEP_COMPILER_OPTIONS)
    data = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))
    params = state_shardings_for(config, mesh).params
    # `.jitted`: compiled ahead by dsjax.train.precompile under the mesh
    jitted = jax.jit(eval_step, in_shardings=(params, data, data, data), compiler_options=STEP_COMPILER_OPTIONS)
    return under_mesh(mesh, jitted)
