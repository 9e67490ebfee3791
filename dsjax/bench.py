"""`dsjax bench`: compile time, step time, tokens/s, MFU and peak memory of the train step.

Synthetic tokens (uniform over the vocabulary), so nothing is read from disk and
any size runs anywhere. One *case* is one (model size, MoE path, attention path,
batch, sequence length); comma lists on the command line give the cross product.

The FLOP count is one documented formula (`train_flops_per_token`):

    6 x (matmul parameters touched per token) + causal attention,

where the parameters touched are every matmul weight of the main model and the
MTP modules, with only `num_experts_per_tok` of the routed experts, the output
head once for the main model and once per MTP module (DeepSeek-V3's MTP shares
it), and no embedding lookup, norm or router bias. Causal attention adds, per
layer and per token, 6 x heads x (qk_head_dim + v_head_dim) x (T + 1) / 2: the
forward's two matmuls (scores, weighted values) over the (T + 1) / 2 keys a query
sees on average, times three for forward plus backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from dsjax.config import Config, ModelConfig
from dsjax.hlo_launches import count_launches

# bf16 dense peak TFLOP/s by device kind (vendors' datasheets, no sparsity); matched by substring
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe part is 756 (override with --peak-tflops)
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v4": 275.0,
}
# HBM bandwidth TB/s by device kind (datasheets), for the profile's per-line floors; matched by
# substring in this order (GH200 before H200)
MEMORY_TBPS: dict[str, float] = {"GH200": 4.0, "H200": 4.8, "H100": 3.35, "A100": 2.0, "L40S": 0.864, "A10G": 0.6, "L4": 0.3}
RESULTS_FILE = Path("benchmarks") / "results.jsonl"


# --- the FLOP formula --------------------------------------------------------------------------------


def _attention_matmul_params(c: ModelConfig) -> int:
    D, H = c.hidden_size, c.num_attention_heads
    q = D * H * c.qk_head_dim if c.q_lora_rank is None else D * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
    return (
        q
        + D * (c.kv_lora_rank + c.qk_rope_head_dim)
        + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
        + H * c.v_head_dim * D
    )


def _layer_matmul_params(c: ModelConfig, moe: bool) -> int:
    D = c.hidden_size
    if not moe:
        return _attention_matmul_params(c) + 3 * D * c.intermediate_size
    F = c.moe_intermediate_size
    router = D * c.n_routed_experts
    shared = 3 * D * c.n_shared_experts * F
    routed = 3 * c.num_experts_per_tok * D * F
    return _attention_matmul_params(c) + router + shared + routed


def matmul_params_per_token(c: ModelConfig) -> int:
    """Matmul weights one token touches in a training forward pass (main model and MTP modules)."""
    D, V = c.hidden_size, c.vocab_size
    layers = sum(_layer_matmul_params(c, c.is_moe_layer(i)) for i in range(c.num_hidden_layers))
    head = D * V
    mtp_module = 2 * D * D + _layer_matmul_params(c, c.n_routed_experts > 0) + head
    return layers + head + c.num_nextn_predict_layers * mtp_module


def attention_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of causal score and value matmuls, per token, all attention layers."""
    layers = c.num_hidden_layers + c.num_nextn_predict_layers
    per_layer = 6 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * (seq_len + 1) / 2
    return layers * per_layer


def train_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    return 6 * matmul_params_per_token(c) + attention_flops_per_token(c, seq_len)


def memory_tbps(device_kind: str) -> float | None:
    for name, tbps in MEMORY_TBPS.items():
        if name.lower() in device_kind.lower():
            return tbps
    return None


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    if override is not None:
        return override
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return tflops
    return None


# --- one case ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    model_size: str
    config: Config

    @property
    def label(self) -> str:
        t, m = self.config.training, self.config.model
        accumulation = f" accum={t.accumulation}" if t.gradient_accumulation_steps > 1 else ""
        head = f" head_grad={m.head_gradient_dtype}" if m.head_gradient_dtype != "float32" else ""
        return (
            f"{self.model_size} {t.batch_size}x{t.gradient_accumulation_steps}x{t.seq_len} "
            f"moe={m.moe_impl} attn={m.attention_impl} remat={m.remat}{accumulation}{head}"
        )


def _peak_memory_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may not implement it
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def _compiled_memory_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


PROFILED_STEPS = 3
PROFILED_TOP = 30  # ops and Python lines listed: the rows past a step's head and its biggest layers


def profile_folder(root: Path, case: Case) -> Path:
    return Path(root) / re.sub(r"[^\w.=-]+", "_", case.label).strip("_")


def run_case(
    case: Case, steps: int, warmup: int, device_count: int | None, peak_override: float | None,
    profile_root: Path | None = None,
) -> dict:
    """Compile and time the train step of one case; returns the result row.

    With profile_root, PROFILED_STEPS more steps run under jax.profiler afterwards (the timed
    steps are not traced); the row's "profile" summarises them (dsjax/trace_summary.py)."""
    import jax

    from dsjax.train import distributed
    from dsjax.train.step import batch_sharding, init_state, make_train_step, pipeline_stages, state_shardings_for

    config = case.config
    t, c = config.training, config.model
    mesh, shape = distributed.setup_mesh(config, device_count)
    stages = pipeline_stages(mesh)
    shardings = state_shardings_for(config, mesh) if mesh is not None else None
    init = jax.jit(init_state, static_argnums=(0, 2), out_shardings=shardings)
    state = init(config, jax.random.key(t.seed), stages)
    rng = np.random.default_rng(t.seed)
    shape_ABT1 = (t.gradient_accumulation_steps, t.batch_size, t.seq_len + 1)

    def fresh_batch():
        tokens = rng.integers(0, c.vocab_size, shape_ABT1, dtype=np.int32)
        return jax.device_put(tokens, batch_sharding(mesh)) if mesh is not None else jax.device_put(tokens)

    step_fn = make_train_step(config, mesh=mesh)
    jitted = getattr(step_fn, "jitted", step_fn)
    batch = fresh_batch()
    from kernels_pallas import fallbacks

    start = time.perf_counter()
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(), fallbacks.recorded() as fell_back:
        lowered = jitted.lower(state, batch)
        lower_sec = time.perf_counter() - start  # Python tracing + lowering to StableHLO
        compiled = lowered.compile()
    compile_sec = time.perf_counter() - start
    hlo = compiled.as_text()  # the optimized program: its launches per step, and the profile's op sources
    launches = count_launches(hlo)

    def run(state, batch):
        if mesh is not None:
            with jax.set_mesh(mesh):
                return compiled(state, batch)
        return compiled(state, batch)

    batches = [fresh_batch() for _ in range(min(4, steps + warmup))]
    for i in range(warmup):
        state, metrics = run(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics)) if warmup else None
    times = []
    for i in range(steps):
        begin = time.perf_counter()
        state, metrics = run(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - begin)
    # the same steps dispatched back to back, as the training loop runs them (it waits for a
    # step only once the next is queued): per-step host work and launch overlap the device's work
    begin = time.perf_counter()
    for i in range(steps):
        state, metrics = run(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    back_to_back_ms = round(1e3 * (time.perf_counter() - begin) / steps, 3)
    loss = float(metrics["loss"])
    profile = None
    if profile_root is not None:
        from dsjax import trace_summary

        def traced_steps():
            nonlocal state, metrics
            for i in range(PROFILED_STEPS):
                state, metrics = run(state, batches[i % len(batches)])
            jax.block_until_ready(metrics)

        trace, wall = trace_summary.record(traced_steps, profile_folder(profile_root, case))
        # each line's floor beside its measured time: the kernels' bytes at the device's bandwidth or
        # their GEMM FLOPs at its peak, whichever is slower, + 2 us each (Launches.by_source)
        kind = jax.devices()[0].device_kind
        bandwidth, flops_peak = memory_tbps(kind), peak_tflops(kind, peak_override)
        floors = None
        if bandwidth and flops_peak:
            floors = {r["source"]: r["estimate_s"] for r in launches.by_source(bandwidth * 1e12, flops_peak * 1e12)}
        profile = trace_summary.summarize(
            trace, PROFILED_STEPS, wall, trace_summary.op_sources(hlo), top=PROFILED_TOP,
            locations={x.name: x.source for x in launches.launches if x.source}, floors=floors,
        )

    device = jax.devices()[0]
    tokens_per_step = t.gradient_accumulation_steps * t.batch_size * t.seq_len
    accumulation = step_fn.accumulation
    microbatch_tokens = t.batch_size * t.seq_len * (t.gradient_accumulation_steps if accumulation == "fold" else 1)
    paths = dict(zip(("moe", "attention"), _resolved_paths(c, microbatch_tokens, mesh)))
    for fallback in fell_back:  # the row names what ran where a path could not take the case, not what was asked
        if paths.get(fallback.part) == fallback.asked:
            paths[fallback.part] = fallback.ran
    moe_path, attention_path = paths["moe"], paths["attention"]
    flops_token = train_flops_per_token(c, t.seq_len)
    peak = peak_tflops(device.device_kind, peak_override)
    n_devices = shape.devices
    return {
        "case": case.label.replace(f"moe={c.moe_impl}", f"moe={c.moe_impl}({moe_path})" if c.moe_impl != moe_path else f"moe={c.moe_impl}")
        .replace(f"attn={c.attention_impl}", f"attn={c.attention_impl}({attention_path})" if c.attention_impl != attention_path else f"attn={c.attention_impl}")
        .replace("accum=auto", f"accum=auto({accumulation})"),
        "model_size": case.model_size,
        "moe_path": moe_path,
        "fallbacks": [str(f) for f in fell_back],
        "attention_path": attention_path,
        "moe_impl": c.moe_impl,
        "attention_impl": c.attention_impl,
        "remat": c.remat,
        "head_gradient_dtype": c.head_gradient_dtype,
        "accumulation": accumulation,
        "batch_size": t.batch_size,
        "grad_accum": t.gradient_accumulation_steps,
        "seq_len": t.seq_len,
        "mesh": str(shape),
        "devices": n_devices,
        "compile_sec": round(compile_sec, 3),
        "lower_sec": round(lower_sec, 3),
        **timing_fields(times, tokens_per_step, flops_token, peak, n_devices),
        "back_to_back_ms_per_step": back_to_back_ms,
        "peak_memory_gib": _gib(_peak_memory_bytes(device)),
        "compiled_memory_gib": _gib(_compiled_memory_bytes(compiled)),
        # kernels (GPU) or thunks (CPU) one step launches, from the compiled program (dsjax.hlo_launches)
        "launches_per_step": launches.per_run,
        "loss": loss,
        "steps": steps,
        "warmup": warmup,
        **({"profile": profile} if profile else {}),
    }


def run_case_mlx(case: Case, steps: int, warmup: int, peak_override: float | None) -> dict:
    """The same measurement for the MLX backend (`MLXTrainer`, one device; its step returns host floats)."""
    import jax

    from dsjax.mlx_backend import note_linux_speed, require_mlx

    require_mlx()
    note_linux_speed()
    from dsjax.mlx_backend.train import MLXTrainer
    from dsjax.model import init

    config = case.config
    t, c = config.training, config.model
    params = jax.device_get(init(c, jax.random.key(t.seed)))
    rng = np.random.default_rng(t.seed)
    shape_ABT1 = (t.gradient_accumulation_steps, t.batch_size, t.seq_len + 1)
    batches = [rng.integers(0, c.vocab_size, shape_ABT1, dtype=np.int32) for _ in range(min(4, steps + warmup + 1))]
    trainer = MLXTrainer(config, params)
    start = time.perf_counter()
    trainer.train_step(batches[0])  # MLX traces and compiles lazily: the first step carries it
    first_step_sec = time.perf_counter() - start
    for i in range(warmup):
        trainer.train_step(batches[(i + 1) % len(batches)])
    times = []
    for i in range(steps):
        begin = time.perf_counter()
        metrics = trainer.train_step(batches[i % len(batches)])
        times.append(time.perf_counter() - begin)
    tokens_per_step = t.gradient_accumulation_steps * t.batch_size * t.seq_len
    median = statistics.median(times)
    flops_token = train_flops_per_token(c, t.seq_len)
    return {
        "case": case.label + " backend=mlx", "model_size": case.model_size, "backend": "mlx",
        "moe_impl": "mlx", "attention_impl": "mlx", "remat": "none",
        "batch_size": t.batch_size, "grad_accum": t.gradient_accumulation_steps, "seq_len": t.seq_len,
        "mesh": "1 device", "devices": 1,
        "compile_sec": round(first_step_sec - median, 3),  # first step minus a steady one
        **timing_fields(times, tokens_per_step, flops_token, peak_override, 1),
        "peak_memory_gib": None, "compiled_memory_gib": None,
        "loss": float(metrics["loss"]), "steps": steps, "warmup": warmup,
    }


def timing_fields(times: list[float], tokens_per_step: int, flops_token: float, peak: float | None, devices: int) -> dict:
    """Step-time statistics, throughput and MFU of one case (MFU over all its devices' peak)."""
    median = statistics.median(times)
    achieved = flops_token * tokens_per_step / median
    return {
        "step_ms_median": round(1e3 * median, 3),
        "step_ms_p10": round(1e3 * float(np.percentile(times, 10)), 3),
        "step_ms_p90": round(1e3 * float(np.percentile(times, 90)), 3),
        "steps_per_sec": round(1.0 / median, 3),
        "tokens_per_sec": round(tokens_per_step / median, 1),
        "flops_per_token": flops_token,
        "model_tflops_per_sec": round(achieved / 1e12, 3),
        "peak_tflops_per_device": peak,
        "mfu": round(achieved / (peak * 1e12 * devices), 4) if peak else None,
    }


def _resolved_paths(c: ModelConfig, tokens: int, mesh) -> tuple[str, str]:
    """What `auto` (or an explicit choice) resolves to for this case's shapes and mesh."""
    import jax

    from dsjax.model.moe import resolve_impl as moe_impl
    from kernels_pallas.attention import resolve_impl as attention_impl

    if mesh is not None:
        with jax.set_mesh(mesh):
            moe = moe_impl(c.moe_impl, c, tokens)
    else:
        moe = moe_impl(c.moe_impl, c, tokens)
    return moe, attention_impl(c.attention_impl)


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


# --- the command ------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import jax

    from dsjax.train import host_memory

    device = jax.devices()[0]
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "device": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "host_memory": "kept" if host_memory.kept() else "system",  # dsjax/train/host_memory.py
        "git_commit": commit or None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_table(rows: list[dict]) -> str:
    head = ("| case | compile s | ms/step (p10-p90) | back to back ms | steps/s | tokens/s | TFLOP/s | MFU | memory GiB "
            "| launches/step |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} |||||||||")
            continue
        launches = f"{r['launches_per_step']:,}" if r.get("launches_per_step") is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        b2b = f"{r['back_to_back_ms_per_step']:.2f}" if r.get("back_to_back_ms_per_step") is not None else "-"
        mem = r["peak_memory_gib"]
        mem = f"{mem:.2f}" if mem is not None else (
            f"{r['compiled_memory_gib']:.2f}*" if r.get("compiled_memory_gib") is not None else None
        )
        lines.append(
            f"| {r['case']} | {r['compile_sec']:.1f} | {r['step_ms_median']:.2f} "
            f"({r['step_ms_p10']:.2f}-{r['step_ms_p90']:.2f}) | {b2b} | {r['steps_per_sec']:.1f} | "
            f"{r['tokens_per_sec']:,.0f} | {r['model_tflops_per_sec']:.1f} | {mfu} | "
            f"{'-' if mem is None else mem} | {launches} |"
        )
    lines.append("\nms/step: each step waited for; back to back: steps queued as training runs them, waited for once; "
                 "launches/step: kernels (GPU) or thunks (CPU) in one step of the compiled program")
    if any(r.get("peak_memory_gib") is None and r.get("compiled_memory_gib") is not None for r in rows):
        lines.append("\nmemory: the device's peak in use; * = the compiled step's arguments + outputs + "
                     "temporaries, where the device reports no peak (CPU)")
    return "\n".join(lines)


def append_results(rows: list[dict], path: Path = RESULTS_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
