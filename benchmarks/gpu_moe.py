"""Routed-expert MoE layer, forward + backward: dense vs ragged vs pallas (one short GPU run).

    python benchmarks/gpu_moe.py            # on an H100/H200: bf16, tiny/small/medium + a DeepSeek-like shape
    python benchmarks/gpu_moe.py --quick    # CPU smoke test: tiny shapes, kernels interpreted

Times only the routed experts (`_experts_dense`, `_experts_ragged`, `experts_pallas`:
permutation, expert matmuls, gate-weighted combine, and the fp32 -> bf16 weight casts
the model does): routing is excluded, as it is the same for every path. Each token's
K experts are the top-K of fresh uniform random scores (near-uniform load). Inputs and
the output cotangent are fresh random arrays (three sets, cycled); times are medians of
device-synchronised calls after warm-up. Useful FLOPs count only the chosen experts:
6 * tokens * K * 3 * D * F for forward + backward. Each case is in its own try/except.
Prints a table; writes $OUT/moe.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py beside this script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from timing import median_ms  # noqa: E402
from dsjax.config import load_config  # noqa: E402
from dsjax.model.moe import _experts_dense, _experts_ragged  # noqa: E402
from kernels_pallas.moe import experts_pallas  # noqa: E402

PEAK_TFLOPS = 989.0  # H100 SXM / H200 dense bf16


def preset_shape(name: str, tokens: int) -> dict:
    c = load_config(name).model
    return dict(name=name, tokens=tokens, E=c.n_routed_experts, K=c.num_experts_per_tok,
                D=c.hidden_size, F=c.moe_intermediate_size)


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [preset_shape("nano", 512), preset_shape("tiny", 256)]
    return [
        preset_shape("tiny", 16_384),
        preset_shape("small", 16_384),
        preset_shape("medium", 16_384),
        dict(name="deepseek_like", tokens=32_768, E=64, K=6, D=1024, F=512),
    ]


def inputs(s: dict, seed: int, dtype):
    k = jax.random.split(jax.random.key(seed), 7)
    T, E, K, D, F = s["tokens"], s["E"], s["K"], s["D"], s["F"]
    experts = {
        "gate_proj": jax.random.normal(k[0], (E, D, F), jnp.float32) / D**0.5,
        "up_proj": jax.random.normal(k[1], (E, D, F), jnp.float32) / D**0.5,
        "down_proj": jax.random.normal(k[2], (E, F, D), jnp.float32) / F**0.5,
    }
    x = jax.random.normal(k[3], (T, D), dtype)
    idx = jax.lax.top_k(jax.random.uniform(k[4], (T, E)), K)[1].astype(jnp.int32)
    gate = jax.random.uniform(k[5], (T, K), jnp.float32)
    cotangent = jax.random.normal(k[6], (T, D), dtype)
    return experts, x, idx, gate, cotangent


def fwd_bwd(experts_fn):
    """(out, grads of experts, x and gate) for the cotangent: one jitted forward + backward."""

    def run(experts, x, idx, gate, cotangent):
        out, vjp = jax.vjp(lambda e, x, g: experts_fn(e, x, idx, g), experts, x, gate)
        return out, vjp(cotangent)

    return jax.jit(run)


PATHS = {name: fwd_bwd(fn) for name, fn in [("dense", _experts_dense), ("ragged", _experts_ragged),
                                             ("pallas", experts_pallas)]}


# gmm tilings to compare: (block_m, max_k, max_n) for experts_pallas (None = its default)
SWEEP = [(None, 64, 128), (128, 64, 128), (64, 64, 128), (128, 32, 128), (128, 64, 64), (64, 32, 64)]


def sweep(args, dtype) -> list[dict]:
    import functools

    rows = []
    for s in shapes(args.quick)[:1] if args.quick else [x for x in shapes(False) if x["name"] in ("small", "deepseek_like")]:
        flops = 6 * s["tokens"] * s["K"] * 3 * s["D"] * s["F"]
        sets = [inputs(s, seed, dtype) for seed in range(3)]
        for block_m, max_k, max_n in SWEEP:
            fn = fwd_bwd(functools.partial(experts_pallas, block_m=block_m, max_k=max_k, max_n=max_n))
            row = dict(s, block_m=block_m, max_k=max_k, max_n=max_n)
            try:
                ms = median_ms(fn, sets, args.reps, args.budget_s)
                row.update(ms=round(ms, 3), useful_tflops=round(flops / (ms * 1e-3) / 1e12, 1))
                print(f"sweep {s['name']} block_m={block_m} max_k={max_k} max_n={max_n}: {ms:.3f} ms "
                      f"{row['useful_tflops']} TFLOP/s", flush=True)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"sweep {s['name']} {block_m}/{max_k}/{max_n}: FAILED {row['error'][:200]}", flush=True)
            rows.append(row)
    return rows


def rel_err(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def check(s: dict, dtype) -> dict:
    """Max relative error (vs the largest reference magnitude) of pallas against dense: output and every gradient."""
    args = inputs(s, 100, dtype)
    got, want = PATHS["pallas"](*args), PATHS["dense"](*args)
    names = ["out"] + [f"d_{p}" for p in ("gate_proj", "up_proj", "down_proj")] + ["d_x", "d_gate"]
    leaves_got = [got[0], *[got[1][0][p] for p in ("gate_proj", "up_proj", "down_proj")], got[1][1], got[1][2]]
    leaves_want = [want[0], *[want[1][0][p] for p in ("gate_proj", "up_proj", "down_proj")], want[1][1], want[1][2]]
    return {n: rel_err(a, b) for n, a, b in zip(names, leaves_got, leaves_want)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU, kernels interpreted")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=1.5, help="timing budget per case after warm-up")
    ap.add_argument("--shapes", help="comma-separated subset of tiny,small,medium,deepseek_like (default: all)")
    ap.add_argument("--sweep", action="store_true", help="also time gmm tilings for small and deepseek_like")
    args = ap.parse_args()
    if args.quick:
        jax.config.update("jax_platforms", "cpu")
        args.reps, args.budget_s = 3, 0.5
    dtype = jnp.bfloat16
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, bf16, routed experts only "
          f"(routing excluded), forward + backward")
    began = time.perf_counter()
    rows, checks = [], {}
    chosen = [s for s in shapes(args.quick) if not args.shapes or s["name"] in args.shapes.split(",")]
    for s in chosen:
        flops = 6 * s["tokens"] * s["K"] * 3 * s["D"] * s["F"]
        sets = [inputs(s, seed, dtype) for seed in range(3)]
        dense_ms = None
        for path, fn in PATHS.items():
            row = dict(s, path=path)
            try:
                ms = median_ms(fn, sets, args.reps, args.budget_s)
                tflops = flops / (ms * 1e-3) / 1e12
                dense_ms = ms if path == "dense" else dense_ms
                row.update(ms=round(ms, 3), useful_tflops=round(tflops, 1),
                           pct_peak=round(100 * tflops / PEAK_TFLOPS, 1),
                           speedup_vs_dense=round(dense_ms / ms, 2) if dense_ms else None)
                print(f"{s['name']:>14} T={s['tokens']:>6} E={s['E']:>3} K={s['K']} D={s['D']:>4} F={s['F']:>4} "
                      f"{path:>6}: {ms:9.3f} ms {tflops:7.1f} TFLOP/s {row['pct_peak']:5.1f}% of peak "
                      f"x{row['speedup_vs_dense'] or float('nan'):.2f} vs dense", flush=True)
            except Exception as e:  # keep going: one short run must report every case it can
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"{s['name']} {path}: FAILED {row['error'][:500]}", flush=True)
                traceback.print_exc(limit=3)
            rows.append(row)
        del sets
        try:
            checks[s["name"]] = check(s, dtype)
            print(f"{s['name']:>14} pallas vs dense (bf16), max relative error: "
                  + ", ".join(f"{k} {v:.2e}" for k, v in checks[s["name"]].items()), flush=True)
        except Exception as e:
            checks[s["name"]] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{s['name']} check: FAILED {checks[s['name']]['error'][:500]}", flush=True)
        print(f"({time.perf_counter() - began:.1f} s so far)", flush=True)
    try:  # fp32: the kernels multiply at IEEE precision; compare with a HIGHEST-precision dense path
        with jax.default_matmul_precision("highest"):
            checks["fp32_" + shapes(True)[0]["name"]] = check(shapes(True)[0], jnp.float32)
        print("fp32 pallas vs dense, max relative error: "
              + ", ".join(f"{k} {v:.2e}" for k, v in checks["fp32_" + shapes(True)[0]["name"]].items()), flush=True)
    except Exception as e:
        checks["fp32"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(f"fp32 check: FAILED {checks['fp32']['error'][:500]}", flush=True)
    total_s = time.perf_counter() - began
    swept = sweep(args, dtype) if args.sweep else []
    total_s = time.perf_counter() - began
    print(f"total {total_s:.1f} s")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "moe.json"
        out.write_text(json.dumps(dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                                       dtype="bfloat16", peak_tflops=PEAK_TFLOPS, routing_included=False,
                                       total_s=round(total_s, 1), cases=rows, checks=checks, sweep=swept), indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
