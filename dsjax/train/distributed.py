"""Runs on a mesh and across hosts: mesh set-up, multi-host start-up, host data -> global arrays."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsjax.config import Config
from meshes import rules
from meshes.mesh import BATCH_AXES, MeshError, MeshShape, build_mesh

log = logging.getLogger(__name__)


def initialize_multihost(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize from flags, or from the usual environment variables.

    Flags win; otherwise JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    (or a cluster JAX detects by itself, e.g. SLURM) are used. On CPU the
    collectives go through gloo, so several processes on one machine form one mesh.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator is None and num_processes is None:
        return
    if num_processes is not None and num_processes > 1 and coordinator is None:
        raise MeshError("--num-processes > 1 needs --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    log.info("process %d of %d joined %s", jax.process_index(), jax.process_count(), coordinator)


def setup_mesh(config: Config, device_count: int | None = None):
    """(mesh, shape) over the first `device_count` devices (all by default); mesh is None on one device."""
    devices = jax.devices()
    if device_count is not None:
        if device_count > len(devices):
            raise MeshError(f"--gpus {device_count} asks for more devices than the {len(devices)} available")
        devices = devices[:device_count]
    mesh, shape = build_mesh(config, devices)
    if config.training.batch_size % jax.process_count():
        raise MeshError(f"batch_size={config.training.batch_size} does not divide over {jax.process_count()} processes")
    if shape.devices == 1:
        return None, shape
    return mesh, shape


def describe(mesh, shape: MeshShape, config: Config, abstract_state, shardings) -> str:
    info = rules.describe(mesh, abstract_state, shardings)
    return (
        f"mesh {shape} on {shape.devices} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es): per device {info['params_bytes_per_device'] / 2**20:.2f} MiB params, "
        f"{info['optimizer_bytes_per_device'] / 2**20:.2f} MiB optimizer state"
    )


def to_global(local, sharding: NamedSharding | None):
    """This process's rows (an array or a pytree of them) -> global arrays laid out by `sharding` (as-is without a mesh)."""
    if sharding is None:
        return local
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)


def local_rows(global_rows: np.ndarray, axis: int = 0) -> np.ndarray:
    """The slice of a host-replicated batch that this process feeds."""
    n = global_rows.shape[axis] // jax.process_count()
    start = jax.process_index() * n
    return np.take(global_rows, np.arange(start, start + n), axis=axis)


def eval_data_shardings(mesh):
    """Eval batches [B, T(+1)]: rows split over the data-parallel axes (None without a mesh)."""
    if mesh is None:
        return None
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait for every process (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
