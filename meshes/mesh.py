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


def validate(shape: MeshShape, config: Config) -> None:
    """Every divisibility the sharding rules need, checked before anything compiles."""
    m, t = config.model, config.training
    if shape.pp != 1:
        raise MeshError(f"pp_size={shape.pp}: pipeline parallelism is not implemented yet; use pp_size 1")
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
