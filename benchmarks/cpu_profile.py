"""Where the time goes on XLA:CPU: the train step's ops, and batch-1 generation.

    uv run python benchmarks/cpu_profile.py [--model-size nano] [--top 25]
    uv run python benchmarks/cpu_profile.py --generate [--model-size nano] [--new-tokens 200] [--runs 15] [--top 0]

Train step: 3 steps under `jax.profiler` (XLA:CPU emits one trace event per thunk when
started with --xla_cpu_enable_xprof_traceme, which this script sets), summed per op
and grouped by the JAX operation that made it (forward or backward, einsum spec).
`dsjax bench --profile DIR` gives the same per-op table for any device, with busy
time per stream; this script keeps the CPU grouping by operation and the generation loop.
Op times overlap on two cores, so they add up to more than the wall time.

--generate: `sample_batch` of 200 new tokens after a 4-token prompt, random weights,
temperature 0.8, one row; the median of --runs calls (compile excluded), then the
ops of one call per token (--top 0 skips them; on a GPU, benchmarks/gpu_session.sh
uses it for the timing alone).
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time

from dsjax import trace_summary

trace_summary.enable_cpu_op_events()  # before JAX starts its CPU backend

import jax  # noqa: E402
import numpy as np  # noqa: E402


def trace_op_times(run, repeats: int) -> collections.Counter:
    """Microseconds per repeat of every op event `run()` produces."""
    with tempfile.TemporaryDirectory() as folder:
        path, _ = trace_summary.record(run, folder)
        events, _ = trace_summary.load_events(path)
    totals = collections.Counter()
    for e in events:
        if trace_summary.is_op(e):
            totals[e["name"]] += e["dur"] / repeats
    return totals


def profile_train_step(size: str, top: int) -> None:
    from dsjax.config import load_config
    from dsjax.train.step import init_state, make_train_step

    config = load_config(size)
    t, c = config.training, config.model
    state = jax.jit(init_state, static_argnums=(0, 2))(config, jax.random.key(0), 1)
    step = make_train_step(config)
    batch = jax.device_put(np.random.default_rng(0).integers(0, c.vocab_size, (1, t.batch_size, t.seq_len + 1), dtype=np.int32))
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    begin = time.perf_counter()
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    print(f"{size} train step: {(time.perf_counter() - begin) / 3 * 1e3:.0f} ms wall")

    def run():
        nonlocal state, metrics
        for _ in range(3):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)

    totals = trace_op_times(run, 3)
    sources = trace_summary.op_sources(getattr(step, "jitted", step).lower(state, batch).compile().as_text())
    groups = collections.Counter()
    for name, us in totals.items():
        groups[sources.get(name, "other")] += us
    print(f"ops: {sum(totals.values()) / 1e3:.0f} ms per step (overlapping on the cores)")
    for label, us in groups.most_common(top):
        print(f"{us / 1e3:8.2f} ms  {label}")


def profile_generation(size: str, new_tokens: int, runs: int, top: int) -> None:
    from dsjax import model
    from dsjax.config import load_config
    from dsjax.infer.generate import SamplingConfig
    from dsjax.infer.sampler import sample_batch

    c = load_config(size).model
    params = model.init(c, jax.random.key(0))  # random weights: no early end of text
    prompt = [1, 50, 60, 70]
    sampling = lambda seed: SamplingConfig(max_new_tokens=new_tokens, temperature=0.8, seed=seed)  # noqa: E731
    begin = time.perf_counter()
    sample_batch(params, c, [prompt], sampling(0))
    print(f"first call (compiles) {time.perf_counter() - begin:.1f} s")
    rates = []
    for seed in range(runs):
        begin = time.perf_counter()
        out = sample_batch(params, c, [prompt], sampling(seed))
        rates.append(len(out[0]) / (time.perf_counter() - begin))
    rates.sort()
    print(f"{size} batch 1, {new_tokens} tokens on {jax.devices()[0].device_kind}: median {rates[len(rates) // 2]:.0f} "
          f"tokens/s over {runs} calls (min {rates[0]:.0f}, max {rates[-1]:.0f})")
    if top:
        totals = trace_op_times(lambda: sample_batch(params, c, [prompt], sampling(0)), new_tokens)
        for name, us in totals.most_common(top):
            print(f"{us:8.1f} us/token  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="nano")
    parser.add_argument("--generate", action="store_true", help="profile batch-1 generation instead")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens per generation call (--generate)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.generate:
        profile_generation(args.model_size, args.new_tokens, args.runs, args.top)
    else:
        profile_train_step(args.model_size, args.top)


if __name__ == "__main__":
    main()
