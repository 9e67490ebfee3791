"""Kernels per train step, or per decoded token, on an NVIDIA H100 or H200, counted on a machine without a GPU.

XLA compiles the step for a GPU target described by its device facts (JAX's deviceless
compilation: `jax.experimental.topologies.get_topology_desc`, no driver, no device), and
`dsjax.hlo_launches` counts the launches in the optimized program. The model makes its
choices as on a GPU (bf16 compute unless the config says otherwise, the kernels asked
for, head chunks sized for an accelerator). Nothing runs: counts, not times.

    UV_PROJECT_ENVIRONMENT=.venv-cuda uv sync --frozen --extra cuda    # once: JAX's CUDA plugin, its own environment
    .venv-cuda/bin/python benchmarks/gpu_kernels.py --model-size tiny --shape 4x4x256 --accumulation scan,fold
    .venv-cuda/bin/python benchmarks/gpu_kernels.py --model-size small --shape 32x1x512 --top 25
    .venv-cuda/bin/python benchmarks/gpu_kernels.py --model-size tiny --decode --top 25   # the sampler's loop, per token

Against the H200's profile (BENCHMARKS.md, run 3): `tiny` at 4 x 4 x 256 measured 2,717
GPU events per step where this counts 2,562 for the same code (`83af0f7`); at 16 x 1 x 256,
783 against 741. The counts run about 5% under the profile's (memsets and copies the
runtime adds are not in the program), so they predict how many kernels a change
removes, not their time.
For a train step it also prints the memory the step moves and its GEMM FLOPs, estimated
from the same program (`hlo_launches`: each kernel's operands and outputs read or written
whole once), and the times those take at the target's bandwidth and bf16 peak: floors.
Run 3 measured `small` 32 x 1 x 512 at 1.64x the sum of its kernels' floors (+2 us each).
The train step compiles with XLA's Triton GEMMs off (`train/step.py: STEP_COMPILER_OPTIONS`),
so its GEMMs are cuBLAS calls here as on the GPU: 569 kernels counted for `tiny` 4 x 4 x 256
folded against the H200's 568 (run 6). The decode loop keeps XLA's defaults: without a
device XLA cannot autotune, and its GEMMs keep a default Triton tiling, which can differ from
what the GPU picks by a kernel per GEMM (`gpu_session.sh tiny` saves the GPU's own choices
as `autotune_tiny.textproto`, which `XLA_FLAGS=--xla_gpu_load_autotune_results_from=FILE`
gives to this compile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the compile-only GPU devices need no CUDA client
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsjax.hlo_launches import count_launches  # noqa: E402

# public device facts XLA's GPU compiler reads (stream_executor GpuDeviceInfoProto); both Hopper, sm_90
HOPPER = {
    "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 49152,
    "shared_memory_per_core": 233472, "shared_memory_per_block_optin": 232448, "threads_per_core_limit": 2048,
    "core_count": 132, "fpus_per_core": 128, "block_dim_limit_x": 2147483647, "block_dim_limit_y": 65535,
    "block_dim_limit_z": 65535, "l2_cache_size": 52428800, "clock_rate_ghz": 1.98,
    "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
}
TARGETS = {
    "h100": ("NVIDIA H100 80GB HBM3", {**HOPPER, "memory_bandwidth": 3352320000000, "device_memory_size": 84942979072}),
    "h200": ("NVIDIA H200", {**HOPPER, "memory_bandwidth": 4800000000000, "device_memory_size": 151397597184}),
}


def target_config(target: str) -> str:
    """The GpuTargetConfigProto, in text format, of one of TARGETS."""
    name, facts = TARGETS[target]
    lines = "\n".join(f"  {k}: {v}" for k, v in facts.items())
    return (
        f"gpu_device_info {{\n{lines}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n"
        f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 10 patch: 0 }}\ndevice_description_str: "{name}"\n'
    )


def gpu_device(target: str):
    """A compile-only GPU device of `target`."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="cuda", target_config=target_config(target), topology="1x1x1").devices[0]


def step_hlo(config, device, accumulation: str) -> tuple[str, str, float]:
    """(optimized HLO, accumulation used, compile seconds) of the train step compiled for `device`."""
    import dataclasses

    from dsjax.train import step as train_step

    t = config.training
    if accumulation == "auto":  # as `resolve_accumulation` decides on that device
        fits = train_step.fold_fits(config, 1, TARGETS_MEMORY[device.device_kind])
        accumulation = "fold" if t.gradient_accumulation_steps > 1 and fits else "scan"
    config = dataclasses.replace(config, training=dataclasses.replace(t, accumulation=accumulation))
    placed = jax.sharding.SingleDeviceSharding(device)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed), train_step.abstract_state(config))
    batch = jax.ShapeDtypeStruct((t.gradient_accumulation_steps, t.batch_size, t.seq_len + 1), jnp.int32, sharding=placed)
    step = train_step.make_train_step(config, moe_impl=config.model.moe_impl)
    started = time.perf_counter()
    hlo = step.lower(state, batch).compile().as_text()
    return hlo, step.accumulation, time.perf_counter() - started


TARGETS_MEMORY = {name: facts["device_memory_size"] for name, facts in TARGETS.values()}


def decode_hlo(config, device, rows: int, new_tokens: int, prompt: int = 4) -> tuple[str, int, float]:
    """(optimized HLO, cache length, compile seconds) of the sampler's decode loop (`dsjax generate`'s
    program: temperature 0.8, rows prompts of `prompt` tokens) compiled for `device`."""
    from dsjax import model
    from dsjax.infer import sampler
    from dsjax.infer.generate import SamplingConfig

    c = config.model
    cache_len = sampler._cache_length(c, prompt, new_tokens)
    prefill, decode_chunk = sampler._programs(c, SamplingConfig(max_new_tokens=new_tokens), (), cache_len, 1 << 20)
    placed = jax.sharding.SingleDeviceSharding(device)
    prompts = jax.ShapeDtypeStruct((rows, prompt), jnp.int32)
    lengths = jax.ShapeDtypeStruct((rows,), jnp.int32)
    keys = jax.ShapeDtypeStruct((rows, 2), jnp.uint32)
    plain = model.abstract_params(c)
    state = jax.eval_shape(lambda *args: prefill(*args, prompt), plain, prompts, lengths, keys)
    params = jax.eval_shape(lambda p: model.with_decode_layouts(p, c), plain)
    on_device = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed), tree)
                 for tree in (params, state, prompts, lengths)]
    started = time.perf_counter()
    hlo = decode_chunk.lower(*on_device).compile().as_text()
    return hlo, cache_len, time.perf_counter() - started


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as dsjax's own commands (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


NO_OP = "? (no JAX op recorded: what XLA rewrote or added, e.g. copies, a cumulative sum's passes)"


def _named(top_ops):
    return {NO_OP if op == "?" else op: n for op, n in top_ops}


def _print_top(row: dict, what: str) -> None:
    if "top_ops" in row:
        print(f"  the {len(row['top_ops'])} JAX ops that make the most kernels{what}:")
        for op, n in row["top_ops"].items():
            print(f"    {n:6,}  {op}")


def floors(launches, target: str) -> dict:
    """The program's memory traffic and GEMM FLOPs per run (`hlo_launches`' estimates) and the
    times they take at the target's bandwidth and bf16 peak: lower bounds, not predictions."""
    from dsjax.bench import peak_tflops

    name, facts = TARGETS[target]
    bandwidth, peak = facts["memory_bandwidth"], peak_tflops(name) * 1e12
    return {
        "gb_moved": round(launches.bytes_moved / 1e9, 3), "gemm_tflop": round(launches.gemm_flops / 1e12, 3),
        "memory_floor_ms": round(1e3 * launches.bytes_moved / bandwidth, 3),
        "gemm_floor_ms": round(1e3 * launches.gemm_flops / peak, 3),
        "gb_by_op": {NO_OP if op == "?" else op: round(b / 1e9, 3) for op, b in launches.bytes_by_op.most_common(8)},
    }


PER_KERNEL_S = 2e-6  # what each kernel is charged beyond its floor in the estimate: about a launch


def by_source(launches, target: str) -> list[dict]:
    """The step's kernels summed per Python line: kernels, GB, GEMM TFLOP and the estimate in ms."""
    from dsjax.bench import peak_tflops

    name, facts = TARGETS[target]
    rows = launches.by_source(facts["memory_bandwidth"], peak_tflops(name) * 1e12, PER_KERNEL_S)
    return [{"where": r["source"], "estimate_ms": round(r["estimate_s"] * 1e3, 3), "kernels": r["kernels"],
             "gb_moved": round(r["bytes_moved"] / 1e9, 3), "gemm_tflop": round(r["gemm_flops"] / 1e12, 3)}
            for r in rows]


def _print_by_source(row: dict) -> None:
    if "by_source" in row:
        total = sum(r["estimate_ms"] for r in row["by_source"])
        print(f"  the {len(row['by_source'])} Python lines whose kernels take the longest by the floors "
              f"(ms estimated per step, {total:.2f} ms together; kernels, GB, GEMM TFLOP):")
        for r in row["by_source"]:
            print(f"    {r['estimate_ms']:8.3f} ms {r['kernels']:6,} {r['gb_moved']:8.2f} GB {r['gemm_tflop']:7.3f} TF  {r['where']}")


def _print_floors(f: dict, target: str, top: bool) -> None:
    bandwidth = TARGETS[target][1]["memory_bandwidth"]
    print(f"  memory moved {f['gb_moved']:,.3f} GB per step ({f['memory_floor_ms']:.3f} ms at {bandwidth / 1e12:.1f} TB/s); "
          f"GEMMs {f['gemm_tflop']:,.3f} TFLOP ({f['gemm_floor_ms']:.3f} ms at bf16 peak): estimates, each buffer read whole once")
    if top:
        print("  the JAX ops that move the most memory:")
        for op, gb in f["gb_by_op"].items():
            print(f"    {gb:9,.3f} GB  {op}")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """`4x4x256,16x1x256` -> [(4, 4, 256), (16, 1, 256)]; ValueError naming the bad one."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shape {item!r}: expected batch x accumulation x seq_len, e.g. 4x4x256")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def main(argv=None) -> int:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    p.add_argument("--target", choices=sorted(TARGETS), default="h200", help="the GPU compiled for")
    p.add_argument("--model-size", default="tiny", help="a size preset (configs/)")
    p.add_argument("--config", metavar="FILE", help="JSON config layered over the size preset, as `dsjax run --config`")
    p.add_argument("--shape", default="4x4x256", help="batch x accumulation x seq_len, comma list")
    p.add_argument("--accumulation", default="auto", help="auto, scan, fold or a comma list")
    p.add_argument("--moe", default="pallas", help="the MoE path (pallas: as run 3 measured)")
    p.add_argument("--attention", default="cudnn", help="the attention path")
    p.add_argument("--decode", action="store_true",
                   help="count the sampler's decode loop per token instead of the train step (--shape, --accumulation, "
                        "--moe and --attention then do not apply)")
    p.add_argument("--rows", type=int, default=1, help="with --decode: prompts decoded together")
    p.add_argument("--new-tokens", type=int, default=1000, help="with --decode: tokens per row (sets the cache length)")
    p.add_argument("--top", type=int, default=0, help="also list the N JAX ops that make the most kernels")
    p.add_argument("--by-source", type=int, default=0, metavar="N",
                   help="also list the N Python lines whose kernels take the longest by the floors' estimate (each "
                        "kernel's bytes at full bandwidth or GEMM FLOPs at peak, whichever is slower, + 2 us): the "
                        "table `dsjax bench --profile` measures on a GPU")
    p.add_argument("--json", action="store_true", help="one JSON object per case (with the top ops when --top)")
    args = p.parse_args(argv)
    try:
        shapes = parse_shapes(args.shape)
    except ValueError as err:
        p.error(str(err))
    accumulations = [a.strip() for a in args.accumulation.split(",")]
    wrong = [a for a in accumulations if a not in ("auto", "scan", "fold")]
    if wrong:
        p.error(f"--accumulation {wrong[0]!r}: choose auto, scan or fold (or a comma list)")
    for flag, value in (("--top", args.top), ("--by-source", args.by_source)):
        if value < 0:
            p.error(f"{flag} must be >= 0, got {value}")
    if args.rows < 1 or args.new_tokens < 1:
        p.error(f"--rows and --new-tokens must be >= 1, got {args.rows} and {args.new_tokens}")

    import jax_cuda12_plugin  # noqa: F401 - the GPU compiler; a clear error below when it is missing

    from dsjax.config import ConfigError, load_config

    jax.default_backend = lambda: "gpu"  # the model's GPU choices (dtype, kernels, chunks): the compile targets one
    device = gpu_device(args.target)
    if args.decode:
        return count_decode(p, args, device)
    for B, A, T in shapes:
        shape = f"{B}x{A}x{T}"
        for accumulation in accumulations:
            training = {"batch_size": B, "gradient_accumulation_steps": A, "seq_len": T}
            model = {"moe_impl": args.moe, "attention_impl": args.attention}
            try:
                config = load_config(args.model_size, args.config, overrides={"model": model, "training": training})
            except (ConfigError, FileNotFoundError, ValueError) as err:
                p.error(str(err).splitlines()[0])
            hlo, used, seconds = step_hlo(config, device, accumulation)
            launches = count_launches(hlo)
            row = {
                "target": device.device_kind, "model": args.model_size, "shape": shape, "accumulation": used,
                "moe": args.moe, "attention": args.attention, "kernels_per_step": launches.per_run,
                "kernels_in_program": launches.static, "loops_of_unknown_length": launches.unknown_trip_loops,
                "compile_sec": round(seconds, 1), "by_kind": dict(launches.by_kind.most_common()),
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
            }
            row.update(floors(launches, args.target))
            if args.top:
                row["top_ops"] = _named(launches.top_ops(args.top))
            if args.by_source:
                row["by_source"] = by_source(launches, args.target)[:args.by_source]
            if args.json:
                print(json.dumps(row))
                continue
            print(f"{args.model_size} {shape} {used}, moe={args.moe} attn={args.attention} on {device.device_kind}: "
                  f"{launches.per_run:,} kernels per step ({launches.static:,} in the program; compiled in {seconds:.1f} s)")
            print("  by kind:")
            for kind, n in launches.by_kind.most_common():
                print(f"    {n:6,}  {kind}")
            _print_floors(row, args.target, bool(args.top))
            _print_top(row, "")
            _print_by_source(row)
    return 0


def count_decode(p, args, device) -> int:
    from dsjax.config import ConfigError, load_config

    try:
        config = load_config(args.model_size, args.config)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        p.error(str(err).splitlines()[0])
    hlo, cache_len, seconds = decode_hlo(config, device, args.rows, args.new_tokens)
    launches = count_launches(hlo)
    row = {
        "target": device.device_kind, "model": args.model_size, "decode_rows": args.rows, "new_tokens": args.new_tokens,
        "cache_len": cache_len, "kernels_per_token": launches.per_unknown_iteration,
        "kernels_outside_the_loop": launches.per_run - launches.per_unknown_iteration,
        "compile_sec": round(seconds, 1), "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if args.top:
        row["top_ops"] = _named(launches.top_ops(args.top))
    if args.json:
        print(json.dumps(row))
        return 0
    print(f"{args.model_size} decoding {args.rows} row(s), cache {cache_len}, on {device.device_kind}: "
          f"{launches.per_unknown_iteration:,} kernels per token (the loop's body and condition; "
          f"{row['kernels_outside_the_loop']:,} more per call; compiled in {seconds:.1f} s)")
    _print_top(row, " (one token, plus the call's)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ModuleNotFoundError as err:
        if err.name != "jax_cuda12_plugin":
            raise
        sys.exit("benchmarks/gpu_kernels.py needs JAX's CUDA plugin (no GPU needed): "
                 "UV_PROJECT_ENVIRONMENT=.venv-cuda uv sync --frozen --extra cuda, then run it with .venv-cuda/bin/python")
