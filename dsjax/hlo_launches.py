"""What a compiled program launches per run, read from its optimized HLO text.

Each instruction that runs device work (a fusion, a library call such as cuBLAS or
cuDNN, a Pallas/Triton kernel, a copy, a collective, an op left unfused) counts as one
launch; parameters, tuples, bitcasts and the like count as none. While loops are
walked into, and their bodies count once per iteration where XLA knows the trip count
(`known_trip_count`, as for `lax.scan` and `lax.map`), so `per_run` is the launches of
one call of the program. Fusion bodies are not walked: a fusion is one kernel.

Each launch also carries an estimate of the memory it moves (the bytes of its operands
and outputs, each read or written whole once: no caching, and a kernel that reads a
slice of a buffer is charged the whole buffer) and, for GEMMs, its multiply-adds
(2 x output elements x contracted size of each `dot` it holds). Pallas and cuDNN calls
are charged bytes only. These bound a program that is memory- or compute-bound from
below; they are not times.

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


@dataclass(frozen=True)
class Launch:
    """One launching instruction: how often one run launches it, and what it moves and multiplies each time."""

    name: str  # the HLO instruction, as a GPU profile's `hlo_op` names it
    kind: str
    times: int
    bytes_moved: int
    gemm_flops: int
    source: str  # `folder/file.py:LINE function` of the Python line that made it ("" if unrecorded)
    fp32_gemm: bool = False  # a library GEMM of fp32 operands: TF32 on a GPU at DEFAULT precision, half bf16's rate

    def floor_seconds(self, bandwidth: float, peak_flops: float) -> float:
        """One launch's lower bound: its bytes at full bandwidth or its GEMM FLOPs at peak (bf16's; half
        of it for an fp32 GEMM, as TF32 runs on an H100 or H200), whichever is slower."""
        return max(self.bytes_moved / bandwidth, self.gemm_flops / (peak_flops / 2 if self.fp32_gemm else peak_flops))


@dataclass
class Launches:
    per_run: int = 0  # launches of one call, loop bodies times their trip counts
    static: int = 0  # launching instructions in the program text
    unknown_trip_loops: int = 0  # while loops whose trip count XLA does not know (their bodies counted once)
    per_unknown_iteration: int = 0  # launches one more iteration of those loops adds (body and condition)
    by_kind: collections.Counter = field(default_factory=collections.Counter)  # per run
    by_op: collections.Counter = field(default_factory=collections.Counter)  # per run, by the JAX op that made it
    bytes_moved: int = 0  # per run: operand + output bytes of every launch (see the module's docstring)
    gemm_flops: int = 0  # per run: 2 x M x N x K of the dots inside GEMM launches
    bytes_by_op: collections.Counter = field(default_factory=collections.Counter)  # per run, by JAX op
    launches: list[Launch] = field(default_factory=list)  # every launching instruction, in program order

    def top_ops(self, n: int = 15) -> list[tuple[str, int]]:
        return self.by_op.most_common(n)

    def by_source(self, bandwidth: float, peak_flops: float, per_launch_s: float = 2e-6) -> list[dict]:
        """Per Python line that made kernels, most first: kernels, bytes, GEMM FLOPs and an estimate of
        their time per run (each launch's `floor_seconds` plus `per_launch_s`; a lower bound's model,
        not a prediction). A GPU profile's `by_source` (`trace_summary`) is measured the same way."""
        rows: dict[str, dict] = {}
        for launch in self.launches:
            row = rows.setdefault(launch.source or "?", {"source": launch.source or "?", "kernels": 0,
                                                         "bytes_moved": 0, "gemm_flops": 0, "estimate_s": 0.0})
            row["kernels"] += launch.times
            row["bytes_moved"] += launch.bytes_moved * launch.times
            row["gemm_flops"] += launch.gemm_flops * launch.times
            row["estimate_s"] += launch.times * (launch.floor_seconds(bandwidth, peak_flops) + per_launch_s)
        return sorted(rows.values(), key=lambda r: -r["estimate_s"])


_FRAME_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def _where(path: str, line: str, function: str = "") -> str:
    """`model/loss.py:156 body`: the file's folder and name (enough to tell `model/` from `kernels_pallas/`)."""
    short = "/".join(path.replace("\\", "/").split("/")[-2:])
    return f"{short}:{line} {function}".rstrip()


def source_locations(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the Python line that made it, as `folder/file.py:LINE function`.

    JAX records, per instruction, the innermost frame of the user's code that traced it.
    Older modules print it in the metadata (`source_file=... source_line=N`); newer ones print a
    `stack_frame_id` into tables at the top of the module (FileNames, FunctionNames,
    FileLocations, StackFrames), which this reads. Instructions without either are left out.
    """
    tables: dict[str, dict[int, str]] = {t: {} for t in _FRAME_TABLES}
    table = None
    for line in hlo_text.splitlines():
        text = line.strip()
        if text in _FRAME_TABLES:
            table = text
            continue
        m = re.match(r"^(\d+) (.+)$", text) if table else None
        if not m:
            if table and (text.startswith(("%", "ENTRY", "HloModule")) or text.endswith("{")):
                break  # the computations start: no more tables
            continue
        tables[table][int(m.group(1))] = m.group(2)
    names = {i: v.strip('"') for i, v in tables["FileNames"].items()}
    functions = {i: v.strip('"').split(".")[-1] for i, v in tables["FunctionNames"].items()}
    places = {}
    for i, v in tables["FileLocations"].items():
        f = dict(re.findall(r"(\w+)=(\d+)", v))
        places[i] = _where(names.get(int(f.get("file_name_id", 0)), "?"), f.get("line", "?"),
                           functions.get(int(f.get("function_name_id", 0)), ""))
    frames = {i: places.get(int(dict(re.findall(r"(\w+)=(\d+)", v)).get("file_location_id", 0)), "")
              for i, v in tables["StackFrames"].items()}
    found = {}
    for line in hlo_text.splitlines():
        name = _NAME.match(line)
        if not name or "metadata={" not in line:
            continue
        frame = re.search(r"stack_frame_id=(\d+)", line)
        if frame and frames.get(int(frame.group(1))):
            found[name.group(1)] = frames[int(frame.group(1))]
            continue
        file, lineno = re.search(r'source_file="([^"]*)"', line), re.search(r"source_line=(\d+)", line)
        if file and lineno:
            found[name.group(1)] = _where(file.group(1), lineno.group(1))
    return found


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


_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (`f32[4,8]{1,0}`, or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = 8 if dtype == "pred" or dtype.startswith("f8") else 16 if dtype == "bf16" else int(dtype[1:])
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * bits // 8
    return total


def operand_names(rest: str) -> list[str]:
    """The operands of an instruction, from the text after its opcode's `(`."""
    depth, end = 1, 0
    while end < len(rest) and depth:
        depth += (rest[end] == "(") - (rest[end] == ")")
        end += 1
    return re.findall(r"%([\w.\-]+)", rest[:end])


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in filter(None, m.group(2).split(","))] if m else []


def _dot_flops(name: str, comps: dict[str, list[str]], shapes: dict[str, str], seen=()) -> int:
    """2 x M x N x K summed over the dots of computation `name` and the fusions it calls."""
    flops = 0
    for line in comps.get(name, ()) if name not in seen else ():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        shape, op, rest = m.groups()
        if op == "dot":
            contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
            flops += _matmul_flops(shape, rest, shapes, contracted.group(1) if contracted else "")
        elif op == "fusion":
            sub = re.search(r"calls=%?([\w.\-]+)", rest)
            flops += _dot_flops(sub.group(1), comps, shapes, seen + (name,)) if sub else 0
    return flops


def _cublas_flops(shape: str, rest: str, shapes: dict[str, str]) -> int:
    """2 x M x N x K of a cuBLAS custom call (output first in its tuple, then the workspace)."""
    contracted = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
    return _matmul_flops(shape, rest, shapes, contracted.group(1) if contracted else "")


def _matmul_flops(shape: str, rest: str, shapes: dict[str, str], contracted: str) -> int:
    """2 x output elements x the lhs's contracted size; `contracted` lists the lhs dims ("1" or '"1","2"')."""
    lhs = _dims(shapes.get((operand_names(rest) or [""])[0], ""))
    k = 1
    for d in map(int, re.findall(r"\d+", contracted)):
        k *= lhs[d] if d < len(lhs) else 1
    out = 1
    for d in _dims(shape):
        out *= d
    return 2 * out * k


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
    sources = source_locations(hlo_text)
    out = Launches()
    shapes = {}  # instruction name -> its shape string (names are unique in an optimized module)
    for lines in comps.values():
        for line in lines:
            name, m = _NAME.match(line), _INSTRUCTION.match(line)
            if name and m:
                shapes[name.group(1)] = m.group(1)

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
            group = op_group(rest, group_depth)
            out.by_op[group] += times
            moved = shape_bytes(m.group(1)) + sum(shape_bytes(shapes.get(o, "")) for o in operand_names(rest))
            out.bytes_moved += moved * times
            out.bytes_by_op[group] += moved * times
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            flops, fp32 = 0, False
            if called and "gemm" in kind:
                flops = _dot_flops(called.group(1), comps, shapes)
            elif "cublas" in kind:  # a library GEMM: its dimensions are in the backend config
                flops = _cublas_flops(m.group(1), rest, shapes)
                fp32 = shapes.get((operand_names(rest) or [""])[0], "").startswith("f32[")
            out.gemm_flops += flops * times
            instruction = _NAME.match(line).group(1)
            out.launches.append(Launch(instruction, kind, times, moved, flops, sources.get(instruction, ""), fp32))

    if entry is not None:
        walk(entry, 1, ())
    return out
