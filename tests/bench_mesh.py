"""Per-device memory and CPU steps/s of `nano` on each tested mesh, pipeline meshes included.

    uv run python tests/bench_mesh.py                         # the mesh table in BENCHMARKS.md
    uv run python tests/bench_mesh.py --layers 5 1 pp2 pp2,m8 pp2,r2 pp4 pp4,m8 pp2,dp2,tp2
    uv run python tests/bench_mesh.py 1 pp3 pp3,m16           # nano itself: 3 layers after its dense one

A mesh is written like `dp2,tp2,ep2`; `mK` sets the pipeline's microbatch count
(default: automatic) and `rK` its layer groups per stage (circular schedule). `--layers N` overrides num_hidden_layers (nano's 3 staged
layers divide only by 3). On a CPU the 8 "devices" share the host's cores, so
steps/s shows the cost of the sharded program (collectives, layout changes, the
pipeline's bubble), not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsjax.config import config_from_dict, load_config  # noqa: E402
from dsjax.train.step import (  # noqa: E402
    abstract_state,
    batch_sharding,
    init_state,
    make_train_step,
    microbatches_for,
    state_shardings_for,
)
from meshes import rules  # noqa: E402
from meshes.mesh import build_mesh  # noqa: E402
from meshes.pipeline import bubble_fraction  # noqa: E402

MESHES = ["1", "dp8", "dp2,tp2,ep2", "dp2,ep2,sp2", "tp2,sp2,ep2", "dp2,ep4", "tp2,sp4", "tp2", "ep2", "sp4", "dp2,tp2"]


def parse(spec: str) -> tuple[dict[str, int], int, int]:
    sizes, microbatches, repeats = {}, -1, 1
    for part in [] if spec == "1" else spec.split(","):
        if part.startswith("m"):
            microbatches = int(part[1:])
        elif part.startswith("r"):
            repeats = int(part[1:])
        else:
            sizes[part[:2]] = int(part[2:])
    return sizes, microbatches, repeats


def bench(spec: str, layers: int | None = None, steps: int = 5) -> str:
    sizes, microbatches, repeats = parse(spec)
    dist = {f"{a}_size": sizes.get(a, 1) for a in ("pp", "dp", "ep", "sp", "tp")}
    raw = {"distributed": {**dist, "microbatches": microbatches, "pipeline_repeats": repeats}}
    if layers:
        raw["model"] = {"num_hidden_layers": layers}
    config = config_from_dict(raw, load_config("nano"))
    n = int(np.prod(list(sizes.values()) or [1]))
    t = config.training
    batch = np.asarray(jax.random.randint(jax.random.key(0), (1, t.batch_size, t.seq_len + 1), 0, config.model.vocab_size))
    if n == 1:
        mesh, stages = None, 1
        step_fn = make_train_step(config)
        state = init_state(config, jax.random.key(1))
        params_b = sum(x.nbytes for x in jax.tree.leaves(state.params))
        opt_b = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
        place = lambda b: b  # noqa: E731
        compiled = step_fn.lower(state, batch).compile()
    else:
        mesh, shape = build_mesh(config, jax.devices()[:n])
        stages = shape.pp
        shardings = state_shardings_for(config, mesh)
        step_fn = make_train_step(config, mesh=mesh)
        state = jax.device_put(init_state(config, jax.random.key(1), stages), shardings)
        info = rules.describe(mesh, abstract_state(config, stages), shardings)
        params_b, opt_b = info["params_bytes_per_device"], info["optimizer_bytes_per_device"]
        place = lambda b: jax.device_put(b, batch_sharding(mesh))  # noqa: E731
        with jax.set_mesh(mesh):
            compiled = step_fn.jitted.lower(state, place(batch)).compile()
    memory = compiled.memory_analysis()
    temp = f"{memory.temp_size_in_bytes / 2**20:.1f} MiB" if memory is not None else "n/a"
    start = time.perf_counter()
    state, m = step_fn(state, place(batch))
    jax.block_until_ready(m)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, m = step_fn(state, place(batch))
    jax.block_until_ready(m)
    per_step = (time.perf_counter() - start) / steps
    M = microbatches_for(config, mesh)
    pipe = f"{M} / {100 * bubble_fraction(stages, M, repeats):.0f}%" if stages > 1 else "-"
    return (
        f"| {spec} | {n} | {params_b / 2**20:.2f} MiB | {opt_b / 2**20:.2f} MiB | {temp} | {pipe} | "
        f"{1 / per_step:.2f} | {t.batch_size * t.seq_len / per_step:,.0f} | {first_s:.1f} s |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("meshes", nargs="*", default=MESHES)
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    args = parser.parse_args()
    print(
        "| mesh | devices | params / device | optimizer / device | temp (activations) / device | "
        "microbatches / bubble | steps/s | tokens/s | first step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.meshes:
        print(bench(spec, args.layers), flush=True)
