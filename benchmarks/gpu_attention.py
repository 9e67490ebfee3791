"""Causal MLA attention, forward and forward + backward: xla vs cudnn vs pallas (one short GPU run).

    python benchmarks/gpu_attention.py            # on an H100/H200: bf16, tiny/small/medium heads, T 512/2048/8192
    python benchmarks/gpu_attention.py --quick    # CPU smoke test: tiny shapes, the Pallas kernel interpreted

Times one attention call as the model makes it (heads-first q [B,H,T,Kq], k [B,H,T,Kq],
v [B,H,T,Kv], bf16, the DeepSeek scale), with B chosen so B*T = 16k tokens. Each path is
called directly (no fallback): `attention_reference` (xla), `cudnn_attention`, `flash_attention`.
Inputs and the output cotangent are fresh random arrays (three sets, cycled); times are
medians of device-synchronised calls after warm-up. Floors: causal FLOPs (half of
2*B*H*T*T*(Kq+Kv) forward, 3x that forward + backward, no recompute) at PEAK_TFLOPS, and
the bytes of q, k, v, o (+ dO, dq, dk, dv) at PEAK_TBPS. Each case is in its own try/except;
cases past --total-s are skipped (most important first). Prints a table; writes
$OUT/attention.json when OUT is set.
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
from kernels_pallas.attention import attention_reference, cudnn_attention, flash_attention  # noqa: E402

PEAK_TFLOPS = 800.0  # dense bf16 a tuned kernel can reach on H100/H200
PEAK_TBPS = 4.0  # HBM3 (H100 3.35, H200 4.8)
TOKENS = 16_384


def head_shape(size: str) -> dict:
    c = load_config(size).model
    return dict(size=size, H=c.num_attention_heads, Kq=c.qk_nope_head_dim + c.qk_rope_head_dim, Kv=c.v_head_dim)


def cases(quick: bool, only: str = "") -> list[dict]:
    if only:  # e.g. "small:8192,tiny:512"
        picked = [(size, int(T)) for size, T in (item.split(":") for item in only.split(","))]
        return [dict(head_shape(size), T=T, B=max(1, TOKENS // T)) for size, T in picked]
    if quick:
        return [dict(head_shape("tiny"), T=64, B=2, H=2), dict(head_shape("small"), T=128, B=1, H=2)]
    order = [("small", 2048), ("small", 512), ("medium", 2048), ("tiny", 2048), ("small", 8192),
             ("tiny", 512), ("medium", 512), ("tiny", 8192), ("medium", 8192)]  # most important first
    return [dict(head_shape(size), T=T, B=max(1, TOKENS // T)) for size, T in order]


def floors(c: dict) -> dict:
    B, H, T, Kq, Kv = c["B"], c["H"], c["T"], c["Kq"], c["Kv"]
    fwd_flops = B * H * T * T * (Kq + Kv)  # two matmuls, causal half
    qkvo = 2 * B * H * T * (2 * Kq + 2 * Kv)  # bf16 q, k, v, o
    grads = 2 * B * H * T * (Kv + 2 * Kq + Kv)  # dO read, dq dk dv written
    return {
        "fwd": max(fwd_flops / (PEAK_TFLOPS * 1e9), qkvo / (PEAK_TBPS * 1e9)),
        "fwd_bwd": max(3 * fwd_flops / (PEAK_TFLOPS * 1e9), (qkvo + grads) / (PEAK_TBPS * 1e9)),
        "flop_ms": {"fwd": fwd_flops / (PEAK_TFLOPS * 1e9), "fwd_bwd": 3 * fwd_flops / (PEAK_TFLOPS * 1e9)},
        "byte_ms": {"fwd": qkvo / (PEAK_TBPS * 1e9), "fwd_bwd": (qkvo + grads) / (PEAK_TBPS * 1e9)},
    }


def inputs(c: dict, seed: int, dtype):
    k = jax.random.split(jax.random.key(seed), 4)
    B, H, T, Kq, Kv = c["B"], c["H"], c["T"], c["Kq"], c["Kv"]
    return tuple(
        jax.random.normal(key, shape, jnp.float32).astype(dtype)
        for key, shape in zip(k, ((B, H, T, Kq), (B, H, T, Kq), (B, H, T, Kv), (B, H, T, Kv)))
    )


def paths(interpret: bool) -> dict:
    return {
        "xla": attention_reference,
        "cudnn": cudnn_attention,
        "pallas": lambda q, k, v, scale: flash_attention(q, k, v, scale, interpret=interpret),
    }


def jitted(fn, scale: float, mode: str):
    if mode == "fwd":
        return jax.jit(lambda q, k, v, do: fn(q, k, v, scale))
    return jax.jit(lambda q, k, v, do: jax.vjp(lambda q, k, v: fn(q, k, v, scale), q, k, v)[1](do))


def compiled(fn, args):
    """(the compiled function, its temporary memory in MiB or None): compiled once, timed as is."""
    exe = fn.lower(*args).compile()
    try:
        temp = round(exe.memory_analysis().temp_size_in_bytes / 2**20, 1)
    except Exception:  # memory_analysis is best effort on some backends
        temp = None
    return exe, temp


def check(c: dict, scale: float, pallas_fwd, pallas_fwd_bwd, dtype) -> dict:
    """Max abs error of pallas (dtype) against the fp32 reference on the same inputs: output and grads."""
    q, k, v, do = inputs(c, 100, dtype)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    got = (pallas_fwd(q, k, v, do), *pallas_fwd_bwd(q, k, v, do))
    want = (jitted(attention_reference, scale, "fwd")(*f32), *jitted(attention_reference, scale, "fwd_bwd")(*f32))
    return {
        name: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)
    } | {"ref_out_max": float(jnp.max(jnp.abs(want[0])))}


# backward tile candidates: (dq block_q, block_k, warps, stages), (dkv block_q, block_k, warps, stages)
SWEEP = [
    ((128, 32, 4, 3), (32, 128, 4, 3)),  # the defaults before this sweep (Triton tutorial shapes)
    ((128, 32, 8, 3), (32, 128, 8, 3)),
    ((128, 32, 8, 2), (32, 128, 8, 2)),
    ((64, 64, 4, 3), (64, 64, 4, 3)),
    ((128, 64, 8, 2), (64, 128, 8, 2)),
    ((64, 32, 4, 3), (32, 64, 4, 3)),
    ((64, 64, 8, 2), (64, 64, 8, 2)),
]


def sweep(args, dtype) -> list[dict]:
    """fwd+bwd of `small`'s heads at T 2048 and 512 for each backward tiling (forward tiles fixed)."""
    from kernels_pallas.flash_attention import Tiles, default_tiles

    rows = []
    for B, T in ((1, 64),) if args.quick else ((8, 2048), (32, 512)):
        c = dict(size="small", B=B, T=T, H=8, Kq=96, Kv=64)
        sets = [inputs(c, seed, dtype) for seed in range(3)]
        fwd_tiles = default_tiles(T, T, 96)[0]
        for dq, dkv in SWEEP:
            tiles = (fwd_tiles, Tiles(*dq), Tiles(*dkv))
            fn = lambda q, k, v, scale, tiles=tiles: flash_attention(q, k, v, scale, tiles=tiles)  # noqa: E731
            row = dict(c, dq=dq, dkv=dkv)
            try:
                f, _ = compiled(jitted(fn, 96 ** -0.5, "fwd_bwd"), sets[0])
                row["ms"] = round(median_ms(f, sets, args.reps, args.budget_s), 4)
                print(f"sweep T{T} dq{dq} dkv{dkv}: {row['ms']:.3f} ms fwd+bwd", flush=True)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"sweep T{T} dq{dq} dkv{dkv}: FAILED {row['error'][:200]}", flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU, the kernel interpreted")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=0.5, help="timing budget per path after warm-up")
    ap.add_argument("--total-s", type=float, default=75.0, help="skip remaining cases after this many seconds")
    ap.add_argument("--check-t", type=int, default=2048, help="accuracy check of pallas at this T (0: every T)")
    ap.add_argument("--sweep", action="store_true", help="first time backward tilings for small's heads")
    ap.add_argument("--cases", default="", help="only these size:T cases, e.g. small:8192,tiny:512")
    args = ap.parse_args()
    if args.quick:
        jax.config.update("jax_platforms", "cpu")
        args.reps, args.budget_s, args.check_t = 3, 0.2, 0
    interpret = jax.default_backend() != "gpu"
    dtype = jnp.bfloat16
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, bf16, causal, heads-first; "
          f"floors at {PEAK_TFLOPS:.0f} TFLOP/s and {PEAK_TBPS:.1f} TB/s", flush=True)
    head = (f"{'size':>6} {'B':>3} {'T':>5} {'H':>3} {'Kq/Kv':>6} {'mode':>7} {'path':>6} {'ms':>9} "
            f"{'floor':>7} {'flop':>7} {'byte':>7} {'x xla':>6} {'/cudnn':>6} {'temp MiB':>9}")
    print(head, flush=True)
    began = time.perf_counter()
    rows, checks = [], {}
    swept = sweep(args, dtype) if args.sweep else []
    for c in cases(args.quick, args.cases):
        label = f"{c['size']}_T{c['T']}"
        if time.perf_counter() - began > args.total_s:
            rows.append(dict(c, skipped="time budget"))
            print(f"{label}: skipped (past --total-s {args.total_s:.0f} s)", flush=True)
            continue
        scale = c["Kq"] ** -0.5
        fl = floors(c)
        try:
            sets = [inputs(c, seed, dtype) for seed in range(3)]
        except Exception as e:
            rows.append(dict(c, error=f"inputs: {type(e).__name__}: {e}"[:2000]))
            print(f"{label}: inputs FAILED {e}", flush=True)
            continue
        executables = {}
        for mode in ("fwd", "fwd_bwd"):
            ms_by = {}
            for path, fn in paths(interpret).items():
                row = dict(c, mode=mode, path=path, floor_ms=round(fl[mode], 4),
                           flop_floor_ms=round(fl["flop_ms"][mode], 4), byte_floor_ms=round(fl["byte_ms"][mode], 4))
                try:
                    f, temp = compiled(jitted(fn, scale, mode), sets[0])
                    executables[mode, path] = f
                    ms = median_ms(f, sets, args.reps, args.budget_s)
                    ms_by[path] = ms
                    row.update(ms=round(ms, 4), temp_mib=temp,
                               speedup_vs_xla=round(ms_by["xla"] / ms, 2) if "xla" in ms_by else None,
                               ratio_vs_cudnn=round(ms / ms_by["cudnn"], 2) if "cudnn" in ms_by else None)
                    fmt = lambda x: f"{x:6.2f}" if x is not None else "     -"  # noqa: E731
                    print(f"{c['size']:>6} {c['B']:>3} {c['T']:>5} {c['H']:>3} {c['Kq']:>3}/{c['Kv']:<2} {mode:>7} "
                          f"{path:>6} {ms:9.3f} {fl[mode]:7.3f} {fl['flop_ms'][mode]:7.3f} {fl['byte_ms'][mode]:7.3f} "
                          f"{fmt(row['speedup_vs_xla'])} {fmt(row['ratio_vs_cudnn'])} "
                          f"{row['temp_mib'] if row['temp_mib'] is not None else '-':>9}", flush=True)
                except Exception as e:  # keep going: one short run must report every case it can
                    row["error"] = f"{type(e).__name__}: {e}"[:2000]
                    print(f"{label} {mode} {path}: FAILED {row['error'][:400]}", flush=True)
                    traceback.print_exc(limit=2)
                rows.append(row)
        del sets
        if args.check_t in (0, c["T"]) and ("fwd", "pallas") in executables and ("fwd_bwd", "pallas") in executables:
            try:
                checks[label] = check(c, scale, executables["fwd", "pallas"], executables["fwd_bwd", "pallas"], dtype)
                print(f"{label} pallas (bf16) vs fp32 reference, max abs error: "
                      + ", ".join(f"{k} {v:.2e}" for k, v in checks[label].items()), flush=True)
            except Exception as e:
                checks[label] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                print(f"{label} check: FAILED {checks[label]['error'][:400]}", flush=True)
        print(f"({time.perf_counter() - began:.1f} s so far)", flush=True)
    total_s = time.perf_counter() - began
    print(f"total {total_s:.1f} s")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "attention.json"
        out.write_text(json.dumps(dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                                       dtype="bfloat16", peak_tflops=PEAK_TFLOPS, peak_tbps=PEAK_TBPS,
                                       total_s=round(total_s, 1), cases=rows, checks=checks, sweep=swept), indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
