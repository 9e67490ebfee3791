"""The Modal app: image, volumes and the `train` and `test_gpu` functions (needs the `modal` package).

Modal functions are defined when this module is imported, on the laptop and again in the
container. Their GPU spec, cluster size and timeout come from the DSJAX_MODAL_* environment
variables: the launcher sets them before importing this module and sends the same values
to the container (a `modal.Secret.from_dict`), so both sides define the same functions.
Building these objects makes no network call; `app.run()` does.

    modal run -m launch.modal_app::test_gpu                        # one H100
    DSJAX_MODAL_GPU=H100:8 modal run -m launch.modal_app::test_gpu  # eight
"""

from __future__ import annotations

import os

import modal

from launch import remote
from launch.plan import APP_NAME, DEFAULT_TIMEOUT_S, MAX_RETRIES, PYTHON_VERSION, REPO, SOURCE_PACKAGES, VOLUMES

GPU = os.environ.get("DSJAX_MODAL_GPU", "H100:1")
NODES = int(os.environ.get("DSJAX_MODAL_NODES", "1"))
TIMEOUT_S = int(os.environ.get("DSJAX_MODAL_TIMEOUT", str(DEFAULT_TIMEOUT_S)))
SETTINGS = {"DSJAX_MODAL_GPU": GPU, "DSJAX_MODAL_NODES": str(NODES), "DSJAX_MODAL_TIMEOUT": str(TIMEOUT_S)}

image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    # the locked dependencies with JAX's CUDA wheels; our packages are added as source below
    .uv_sync(str(REPO), extras=["cuda"], extra_options="--no-dev")
    .env({"PYTHONUNBUFFERED": "1"})
    .add_local_dir(REPO / "configs", "/root/configs")  # dsjax.config reads <package>/../configs
    .add_local_python_source(*SOURCE_PACKAGES)
)
volumes = {mount: modal.Volume.from_name(name, create_if_missing=True) for name, mount, _ in VOLUMES}
settings = modal.Secret.from_dict(SETTINGS)
app = modal.App(APP_NAME, image=image)


def commit_volumes() -> None:
    for volume in volumes.values():
        volume.commit()


def cluster_info() -> remote.Cluster | None:
    if NODES == 1:
        return None
    info = modal.experimental.get_cluster_info()
    return remote.Cluster(rank=info.rank, addresses=tuple(info.container_ips))


def train(flags: list[str], run_names: list[str], launch_id: str, config_json: str | None = None) -> dict:
    """One attempt of a launch (Modal retries it after a crash and restarts it after a preemption)."""
    return remote.train(
        flags, run_names, launch_id, remote.MODAL_MOUNTS, config_json=config_json, commit=commit_volumes,
        cluster=cluster_info(),
    )


_options = dict(
    gpu=GPU,
    timeout=TIMEOUT_S,
    retries=modal.Retries(max_retries=MAX_RETRIES, initial_delay=10.0, backoff_coefficient=2.0),
    volumes=volumes,
    secrets=[settings],
)
if NODES > 1:
    # modal.clustered in recent releases; modal.experimental.clustered before (deprecated since)
    clustered = getattr(modal, "clustered", None) or modal.experimental.clustered
    train = app.function(**_options)(clustered(size=NODES)(train))
else:
    train = app.function(**_options)(train)


@app.function(gpu=GPU, timeout=600, secrets=[settings])
def test_gpu(n: int = 8192) -> dict:
    """Print `jax.devices()` and a measured bf16 matmul rate (TFLOP/s) on the first GPU."""
    report = remote.matmul_tflops(n)
    print("jax.devices():", report["devices"])
    print(f"bf16 matmul {n}x{n}: {report['bf16_matmul_tflops']:.1f} TFLOP/s on {report['device_kind']}")
    return report
