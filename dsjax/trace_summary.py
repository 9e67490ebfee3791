"""Where a jitted step's time goes, from a `jax.profiler` trace: `dsjax bench --profile DIR`.

The question it answers first is whether the device is busy: a small model's step can
take milliseconds while its kernels add up to a fraction of that, because each of
hundreds of kernels costs a launch. So the summary gives, per trace line (a GPU
stream, XLA's per-op line, a host thread), the events per step and the time the line
was busy per step (nested events merged, so nothing is counted twice), next to the
step's wall time; then the ops that took the most time, each with the JAX operation
that made it (from the compiled program's HLO metadata: forward or backward, einsum
spec, primitive) and the Python line that made it; then the time per Python line, every
kernel counted (`by_source`). `benchmarks/gpu_kernels.py --by-source` estimates the same
table without a GPU, so the two show which lines run far from their floors.

XLA:CPU writes one trace event per op only with --xla_cpu_enable_xprof_traceme, which
`enable_cpu_op_events` adds to XLA_FLAGS; it must run before JAX starts its CPU backend.
GPUs write per-kernel events without it.

The trace itself is kept (perfetto_trace.json.gz opens in ui.perfetto.dev; the
.xplane.pb in TensorBoard's or XProf's profile viewer).
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

CPU_OP_EVENTS_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# not ops: Python frames ($...), dispatch and waiting on the host, and XLA:CPU's control-flow
# ops, whose events enclose their bodies' ops (counting both would count the body twice)
_RUNTIME_EVENT = re.compile(
    r"^(\$|PjitFunction|ThunkExecutor|CommonPjRt|PjRt|ParseArguments|Handle input|AllocateOutput|Wait for|"
    r"ThreadpoolListener|SlinkyThreadPool|PythonRefManager|np\.asarray|TfrtCpu|ExecuteHelper|CreateOutputs|"
    r"(while|conditional|call)(\.\d+)?$)"
)


def enable_cpu_op_events() -> None:
    """Ask XLA:CPU for one trace event per op (read when the CPU backend starts)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_OP_EVENTS_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_OP_EVENTS_FLAG}".strip()


def record(run: Callable[[], Any], folder: Path) -> tuple[Path, float]:
    """Trace `run()` into folder; returns (the perfetto trace file, run's wall seconds)."""
    import jax

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.rglob("perfetto_trace.json.gz"))
    jax.profiler.start_trace(str(folder), create_perfetto_trace=True)
    try:
        begin = time.perf_counter()
        run()
        wall = time.perf_counter() - begin
    finally:
        jax.profiler.stop_trace()
    written = sorted(set(folder.rglob("perfetto_trace.json.gz")) - before)
    if not written:
        raise RuntimeError(f"jax.profiler wrote no perfetto trace under {folder}")
    return written[-1], wall


def load_events(path: Path) -> tuple[list[dict], dict[tuple[int, int], str]]:
    """(complete events, {(pid, tid): 'process / thread' name}) of a perfetto JSON trace."""
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    names = {}
    for e in complete:
        key = (e["pid"], e.get("tid", 0))
        if key not in names:
            names[key] = f"{processes.get(key[0], key[0])} / {threads.get(key, key[1])}"
    return complete, names


def busy_microseconds(events: list[dict]) -> float:
    """Time covered by the union of the events' intervals (nested or overlapping events count once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def is_op(event: dict) -> bool:
    return not _RUNTIME_EVENT.match(event["name"])


def op_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> 'fwd|bwd <einsum spec> <primitive>', from the compiled program's metadata."""
    sources = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if m:
            op = m.group(2)
            spec = re.findall(r"jvp\(([^()]*)\)", op)
            sources[m.group(1)] = f"{'bwd' if 'transpose(' in op else 'fwd'} {spec[-1] if spec else ''} {op.split('/')[-1]}"
    return sources


def _event_op(event: dict) -> str:
    """The HLO op an event ran: GPU kernel events name it in their args, XLA:CPU and XLA-op lines in their name."""
    args = event.get("args") or {}
    return str(args.get("hlo_op") or args.get("long_name") or event["name"]).split(" ")[0].lstrip("%")


SHORT_OP_US = 5.0


def summarize(
    path: Path, steps: int, wall_sec: float, sources: dict[str, str] | None = None, top: int = 20,
    locations: dict[str, str] | None = None, floors: dict[str, float] | None = None,
) -> dict:
    """Per-step lines and top ops of a trace of `steps` steps that took wall_sec.

    sources: op -> the JAX operation (`op_sources`); locations: op -> its Python line
    (`hlo_launches.source_locations`), which adds `by_source`: ms and kernels per step per line;
    floors: Python line -> its kernels' floor in seconds per step (`Launches.by_source`), set
    beside each line's measured time."""
    events, names = load_events(path)
    by_line: dict[tuple[int, int], list[dict]] = collections.defaultdict(list)
    for e in events:
        by_line[(e["pid"], e.get("tid", 0))].append(e)
    lines = []
    for key, line_events in by_line.items():
        ops = [e for e in line_events if is_op(e)]
        if not ops:
            continue
        lines.append({
            "line": names[key],
            "events_per_step": round(len(ops) / steps, 1),
            "busy_ms_per_step": round(busy_microseconds(ops) / steps / 1e3, 3),
        })
    lines.sort(key=lambda r: -r["busy_ms_per_step"])
    # the op table comes from the device line with the most events (kernels or XLA ops, not the
    # one-per-program "XLA Modules" line), or from every host line on CPU
    device_keys = [k for k in by_line if "/device:" in names[k] and any(is_op(e) for e in by_line[k])]
    chosen = max(device_keys, key=lambda k: len(by_line[k])) if device_keys else None
    op_events = [e for k in ([chosen] if chosen else by_line) for e in by_line[k] if is_op(e)]
    per_op: dict[str, list[float]] = collections.defaultdict(list)
    for e in op_events:
        per_op[_event_op(e)].append(e["dur"])
    ranked = sorted(per_op.items(), key=lambda kv: -sum(kv[1]))[:top]
    short = [e["dur"] for e in op_events if e["dur"] < SHORT_OP_US]
    by_source: dict[str, list[float]] = collections.defaultdict(list)
    for op, durs in per_op.items():
        by_source[(locations or {}).get(op) or "?"].extend(durs)
    located = sorted(by_source.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "trace": str(path),
        "wall_ms_per_step": round(wall_sec / steps * 1e3, 3),
        "ops_line": names[chosen] if chosen else "host (all threads)",
        "lines": lines[:8],
        # ops shorter than SHORT_OP_US: many of them means launch latency, not arithmetic, sets the pace
        "short_ops_per_step": round(len(short) / steps, 1),
        "short_ops_ms_per_step": round(sum(short) / steps / 1e3, 3),
        "top_ops": [
            {
                "op": op,
                "source": (sources or {}).get(op, ""),
                "where": (locations or {}).get(op, ""),
                "ms_per_step": round(sum(durs) / steps / 1e3, 3),
                "calls_per_step": round(len(durs) / steps, 1),
            }
            for op, durs in ranked
        ],
        # every kernel of the ops line, summed per Python line ("?": ops the program does not place)
        **({"by_source": [
            {"where": where, "ms_per_step": round(sum(durs) / steps / 1e3, 3),
             "kernels_per_step": round(len(durs) / steps, 1),
             **({"floor_ms_per_step": round(floors[where] * 1e3, 3)} if floors and where in floors else {})}
            for where, durs in located
        ]} if locations is not None else {}),
    }


def format_summary(case: str, summary: dict) -> str:
    out = [f"profile of {case}: {summary['wall_ms_per_step']:.2f} ms/step wall; trace {summary['trace']}"]
    out += [
        f"  {r['busy_ms_per_step']:9.3f} ms busy  {r['events_per_step']:8.1f} events/step  {r['line']}"
        for r in summary["lines"]
    ]
    if "short_ops_per_step" in summary:
        out.append(
            f"  {summary['short_ops_per_step']:.1f} ops/step under {SHORT_OP_US:g} us on {summary['ops_line']}, "
            f"{summary['short_ops_ms_per_step']:.3f} ms/step together"
        )
    out.append(f"  top ops on {summary['ops_line']} (ms/step, calls/step):")
    out += [
        f"  {r['ms_per_step']:9.3f} ms  {r['calls_per_step']:6.1f}x  {r['op']}  {r['source']}  {r.get('where', '')}".rstrip()
        for r in summary["top_ops"]
    ]
    if summary.get("by_source"):
        floored = any("floor_ms_per_step" in r for r in summary["by_source"])
        out.append(f"  time per Python line on {summary['ops_line']} (ms/step, kernels/step"
                   + (", the kernels' floor ms/step and measured / floor" if floored else "") + "):")
        for r in summary["by_source"]:
            floor = r.get("floor_ms_per_step")
            beside = f"  {floor:8.3f} {r['ms_per_step'] / floor:5.1f}x" if floor else ("  " + " " * 14 if floored else "")
            out.append(f"  {r['ms_per_step']:9.3f} ms  {r['kernels_per_step']:6.1f}{beside}   {r['where']}")
    return "\n".join(out)
