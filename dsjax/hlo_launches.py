"""What a compiled program launches per run, read from its optimized HLO text.

Each instruction that runs device work (a fusion, a library call such as cuBLAS or
cuDNN, a Pallas/Triton kernel, a copy, a collective, an op left unfused) counts as one
launch; parameters, tuples, bitcasts and the like count as none. While loops are
walked into, and their bodies count once per iteration where XLA knows the trip count
(`known_trip_count`, as for `lax.scan` and `lax.map`), so `per_run` is the launches of
one call of the program. Fusion bodies are not walked: a fusion is one kernel.

`benchmarks/gpu_kernels.py` uses it on programs compiled for an NVIDIA GPU target on a
machine without one; `dsjax bench` records it for the device it runs on. On a GPU,
XLA may still group consecutive launches into CUDA graphs when the program loads;
that grouping is not in the HLO, so these counts are of kernels, not of graph launches.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
# instructions that launch nothing: data plumbing, metadata, and the second half of async pairs
_NO_LAUNCH = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "add-dependency",
    "opt-barrier", "partition-id", "replica-id", "domain", "copy-done", "send-done", "recv-done",
    "all-reduce-done", "all-gather-done", "collective-permute-done", "async-done", "async-update",
}
_COLLECTIVES = {
    "all-reduce", "all-reduce-start", "all-gather", "all-gather-start", "reduce-scatter", "all-to-all",
    "collective-permute", "collective-permute-start", "collective-broadcast", "ragged-all-to-all", "send", "recv",
}


@dataclass
class Launches:
    per_run: int = 0  # launches of one call, loop bodies times their trip counts
    static: int = 0  # launching instructions in the program text
    unknown_trip_loops: int = 0  # while loops whose trip count XLA does not know (their bodies counted once)
    per_unknown_iteration: int = 0  # launches one more iteration of those loops adds (body and condition)
    by_kind: collections.Counter = field(default_factory=collections.Counter)  # per run
    by_op: collections.Counter = field(default_factory=collections.Counter)  # per run, by the JAX op that made it

    def top_ops(self, n: int = 15) -> list[tuple[str, int]]:
        return self.by_op.most_common(n)


def computations(hlo_text: str) -> tuple[str | None, dict[str, list[str]]]:
    """(entry name, {computation name: its instruction lines})."""
    found: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                found[current] = []
                entry = current if m.group(1) else entry
            continue
        if line.strip() == "}":
            current = None
        else:
            found[current].append(line)
    return entry, found


def kind_of(op: str, rest: str) -> str | None:
    """The launch kind of an instruction (`fusion:kLoop`, `custom-call:__cudnn$fmhaSoftmax`, ...), None if it launches nothing."""
    if op in _NO_LAUNCH or op in ("while", "conditional", "call"):
        return None
    if op == "fusion":
        kind = re.search(r"kind=(\w+)", rest)
        backend = re.search(r'"fusion_backend_config":\{"kind":"([^"]+)"', rest)
        return "fusion:" + (kind.group(1) if kind else "?") + (":" + backend.group(1) if backend else "")
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        return "custom-call:" + (target.group(1) if target else "?")
    if op in _COLLECTIVES:
        return "collective:" + op
    return "op:" + op  # a copy, a sort, an rng or anything else left unfused


def op_group(rest: str, depth: int = 3) -> str:
    """The JAX op that made an instruction, from its metadata: e.g. `transpose(jvp())/dot_general`."""
    m = re.search(r'op_name="([^"]*)"', rest)
    if not m:
        return "?"
    parts = [p for p in m.group(1).split("/")[1:] if p not in ("while", "body", "cond", "closed_call", "checkpoint")]
    return "/".join(parts[:depth]) or "?"


def count_launches(hlo_text: str, group_depth: int = 3) -> Launches:
    """The launches of one run of an optimized HLO module (`compiled.as_text()`)."""
    entry, comps = computations(hlo_text)
    out = Launches()

    def walk(name: str, times: int, inside: tuple[str, ...], unknown: bool = False) -> None:
        if name in inside or name not in comps:
            return
        for line in comps[name]:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            _, op, rest = m.groups()
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                n = int(trips.group(1)) if trips else 1
                out.unknown_trip_loops += trips is None
                for part, k in (("condition", n + 1 if trips else 1), ("body", n)):
                    sub = re.search(part + r"=%?([\w.\-]+)", rest)
                    if sub:
                        walk(sub.group(1), times * k, inside + (name,), unknown or trips is None)
                continue
            if op in ("conditional", "call"):
                called = re.findall(r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+)|"
                                    r"false_computation=%?([\w.\-]+)|to_apply=%?([\w.\-]+))", rest)
                for names in called:
                    for sub in ",".join(n for n in names if n).split(","):
                        if sub.strip():
                            walk(sub.strip().lstrip("%"), times, inside + (name,), unknown)
                continue
            kind = kind_of(op, rest)
            if kind is None:
                continue
            out.static += 1
            out.per_run += times
            out.per_unknown_iteration += times if unknown else 0
            out.by_kind[kind] += times
            out.by_op[op_group(rest, group_depth)] += times

    if entry is not None:
        walk(entry, 1, ())
    return out
