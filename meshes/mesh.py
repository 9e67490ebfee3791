"""The 5D device mesh: resolution from config/flags, validation, construction and a summary.

Axes, outermost to innermost: pp, dp, ep, sp, tp. Devices that talk most
(tensor parallelism all-reduces every layer) sit innermost, on neighbouring
devices; pipeline stages, which exchange one activation per microbatch, outermost.
`pp` stays 1 until the pipeline schedule lands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsjax.config import Config, DistributedConfig

AXES = ("pp", "dp", "ep", "sp", "tp")
# the axes a batch is split over: ep acts as extra data parallelism outside MoE layers
BATCH_AXES = ("dp", "ep")


class MeshError(ValueError):
    """A mesh that cannot run this config; the message names the numbers."""


@dataclass(frozen=True)
class MeshShape:
    pp: int = 1
    dp: int = 1
    ep: int = 1
    sp: int = 1
    tp: int = 1

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @property
    def devices(self) -> int:
        return math.prod(self.sizes)

    @property
    def data_parallel(self) -> int:
        return self.dp * self.ep

    def __str__(self) -> str:
        return " x ".join(f"{a}={getattr(self, a)}" for a in AXES)


def resolve_shape(dist: DistributedConfig, device_count: int) -> MeshShape:
    """Fill in the one size given as -1 so the product equals `device_count`."""
    sizes = {a: getattr(dist, f"{a}_size") for a in AXES}
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise MeshError(f"only one mesh size may be -1 (inferred); got -1 for {', '.join(unknown)}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if device_count % known:
            raise MeshError(
                f"cannot infer {unknown[0]}_size: the other sizes multiply to {known}, "
                f"which does not divide {device_count} devices"
            )
        sizes[unknown[0]] = device_count // known
    shape = MeshShape(**sizes)
    if shape.devices != device_count:
        raise MeshError(f"mesh {shape} needs {shape.devices} devices but {device_count} are available")
    return shape


def resolve_microbatches(shape: MeshShape, config: Config) -> int:
    """Pipeline microbatches per step: the configured count, or an automatic one.

    Automatic: the smallest count >= 2 * pp that divides the per-replica batch
    (bubble at most (S-1)/(3S-1), about a third), else the largest count >= pp
    that does; validation reports a batch too small for either.
    """
    if shape.pp == 1:
        return 1
    if config.distributed.microbatches != -1:
        return config.distributed.microbatches
    per_replica = max(config.training.batch_size // shape.data_parallel, 1)
    divisors = [d for d in range(1, per_replica + 1) if per_replica % d == 0]
    roomy = [d for d in divisors if d >= 2 * shape.pp]
    if roomy:
        return min(roomy)
    enough = [d for d in divisors if d >= shape.pp]
    return max(enough) if enough else shape.pp


def _validate_pipeline(shape: MeshShape, config: Config) -> None:
    m, t, d = config.model, config.training, config.distributed
    if shape.pp == 1:
        if d.microbatches > 1:
            raise MeshError(
                f"microbatches={d.microbatches} applies to pipeline parallelism (pp_size > 1); "
                "with pp_size=1 use --grad-accum to split a step"
            )
        if d.pipeline_repeats > 1:
            raise MeshError(f"pipeline_repeats={d.pipeline_repeats} applies to pipeline parallelism (pp_size > 1)")
        return
    first = min(m.first_k_dense_replace, m.num_hidden_layers)
    staged = m.num_hidden_layers - first
    if staged == 0 or staged % shape.pp:
        raise MeshError(
            f"pp_size={shape.pp}: the pipeline holds the {staged} decoder layers after the first "
            f"{first} dense layer(s) (num_hidden_layers={m.num_hidden_layers}, first_k_dense_replace={first}), "
            f"which do not split into {shape.pp} equal stages; choose a pp_size that divides {staged}"
        )
    if staged % (shape.pp * d.pipeline_repeats):
        raise MeshError(
            f"pipeline_repeats={d.pipeline_repeats}: the {staged} pipelined layers do not split into "
            f"pp_size={shape.pp} stages x {d.pipeline_repeats} groups of equal size; "
            f"pp_size x pipeline_repeats must divide {staged}"
        )
    M = resolve_microbatches(shape, config)
    if M < shape.pp:
        raise MeshError(
            f"microbatches={M} is fewer than the pp_size={shape.pp} stages: every stage needs a microbatch "
            f"in flight; use --microbatches >= {shape.pp} (the bubble (S-1)/(R*M+S-1) shrinks as M grows)"
        )
    if t.batch_size % (M * shape.data_parallel):
        raise MeshError(
            f"batch_size={t.batch_size} does not split into microbatches={M} of equal size over the "
            f"data-parallel size dp*ep={shape.data_parallel}: it must be divisible by {M * shape.data_parallel}"
        )


def validate(shape: MeshShape, config: Config) -> None:
    """Every divisibility the sharding rules and the pipeline need, checked before anything compiles."""
    m, t = config.model, config.training
    if m.n_routed_experts % shape.ep:
        raise MeshError(f"n_routed_experts={m.n_routed_experts} is not divisible by ep_size={shape.ep}")
    checks = [
        ("num_attention_heads", m.num_attention_heads),
        ("intermediate_size", m.intermediate_size),
        ("vocab_size", m.vocab_size),
    ]
    if m.n_routed_experts:
        checks.append(("moe_intermediate_size", m.moe_intermediate_size))
    for name, value in checks:
        if value % shape.tp:
            raise MeshError(f"{name}={value} is not divisible by tp_size={shape.tp}")
    if t.seq_len % shape.sp:
        raise MeshError(f"seq_len={t.seq_len} is not divisible by sp_size={shape.sp}")
    if t.batch_size % shape.data_parallel:
        raise MeshError(
            f"batch_size={t.batch_size} is not divisible by the data-parallel size dp*ep="
            f"{shape.dp}*{shape.ep}={shape.data_parallel}"
        )
    _validate_pipeline(shape, config)


def make_mesh(shape: MeshShape, devices=None):
    import jax
    from jax.sharding import AxisType

    return jax.make_mesh(shape.sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def build_mesh(config: Config, devices=None):
    """Resolve, validate and build the mesh for `config` over all (or the given) devices."""
    import jax

    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_shape(config.distributed, len(devices))
    validate(shape, config)
    return make_mesh(shape, devices), shape
