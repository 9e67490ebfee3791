"""Per-device memory and CPU steps/s of `nano` on each tested mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 uv run python tests/bench_mesh.py

On a CPU the 8 "devices" share the host's cores, so steps/s shows the cost of
the sharded program (collectives, layout changes), not a speed-up.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsjax.config import config_from_dict, load_config  # noqa: E402
from dsjax.train.step import abstract_state, batch_sharding, init_state, make_train_step, state_shardings_for  # noqa: E402
from meshes import rules  # noqa: E402
from meshes.mesh import build_mesh  # noqa: E402

MESHES = ["1", "dp8", "dp2,tp2,ep2", "dp2,ep2,sp2", "tp2,sp2,ep2", "dp2,ep4", "tp2,sp4", "tp2", "ep2", "sp4", "dp2,tp2"]


def parse(spec: str) -> dict[str, int]:
    if spec == "1":
        return {}
    return {part[:2]: int(part[2:]) for part in spec.split(",")}


def bench(spec: str, steps: int = 5) -> str:
    sizes = parse(spec)
    dist = {f"{a}_size": sizes.get(a, 1) for a in ("pp", "dp", "ep", "sp", "tp")}
    config = config_from_dict({"distributed": dist}, load_config("nano"))
    n = int(np.prod(list(sizes.values()) or [1]))
    t = config.training
    batch = np.asarray(jax.random.randint(jax.random.key(0), (1, t.batch_size, t.seq_len + 1), 0, config.model.vocab_size))
    if n == 1:
        step_fn = make_train_step(config)
        state = init_state(config, jax.random.key(1))
        params_b = sum(x.nbytes for x in jax.tree.leaves(state.params))
        opt_b = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
        place = lambda b: b  # noqa: E731
    else:
        mesh, _ = build_mesh(config, jax.devices()[:n])
        shardings = state_shardings_for(config, mesh)
        step_fn = make_train_step(config, mesh=mesh)
        state = jax.device_put(init_state(config, jax.random.key(1)), shardings)
        info = rules.describe(mesh, abstract_state(config), shardings)
        params_b, opt_b = info["params_bytes_per_device"], info["optimizer_bytes_per_device"]
        place = lambda b: jax.device_put(b, batch_sharding(mesh))  # noqa: E731
    start = time.perf_counter()
    state, m = step_fn(state, place(batch))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, m = step_fn(state, place(batch))
    jax.block_until_ready(m)
    per_step = (time.perf_counter() - start) / steps
    return (
        f"| {spec} | {n} | {params_b / 2**20:.2f} MiB | {opt_b / 2**20:.2f} MiB | "
        f"{1 / per_step:.2f} | {t.batch_size * t.seq_len / per_step:,.0f} | {compile_s:.1f} s |"
    )


if __name__ == "__main__":
    specs = sys.argv[1:] or MESHES
    print("| mesh | devices | params / device | optimizer / device | steps/s | tokens/s | first step (compile) |")
    print("|---|---|---|---|---|---|---|")
    for spec in specs:
        print(bench(spec), flush=True)
