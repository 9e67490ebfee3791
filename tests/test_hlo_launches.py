"""Counting a compiled program's launches from its HLO (`dsjax.hlo_launches`; benchmarks/gpu_kernels.py, bench)."""

import jax
import jax.numpy as jnp

from dsjax.hlo_launches import count_launches, source_locations

# an optimized XLA:GPU module in the form `compiled.as_text()` prints (abridged by hand): a loop of
# known trip count 3 around a GEMM and a cuDNN call, a fusion and a copy outside it
GPU_MODULE = """HloModule jit_step, is_scheduled=true

%fused_add (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %add = f32[8]{0} add(%p0, %p0)
}

%body (arg: (s32[], f32[8])) -> (s32[], f32[8]) {
  %arg = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[8]{0} get-tuple-element(%arg), index=1
  %gemm = f32[8]{0} fusion(%x), kind=kCustom, calls=%fused_add, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}, metadata={op_name="jit(step)/while/body/jvp()/dot_general"}
  %attn = f32[8]{0} custom-call(%gemm), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/while/body/jvp()/dot_product_attention_fwd"}
  %next = s32[] fusion(%i), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/while/body/add"}
  ROOT %out = (s32[], f32[8]{0}) tuple(%next, %attn)
}

%cond (arg: (s32[], f32[8])) -> pred[] {
  %arg = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  ROOT %lt = pred[] fusion(%i), kind=kLoop, calls=%fused_add
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %start = (s32[], f32[8]{0}) tuple(%zero, %x)
  %loop = (s32[], f32[8]{0}) while(%start), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %y = f32[8]{0} get-tuple-element(%loop), index=1
  %z = f32[8]{0} fusion(%y), kind=kInput, calls=%fused_add, metadata={op_name="jit(step)/reduce_sum"}
  ROOT %c = f32[8]{0} copy(%z)
}
"""


def test_a_gpu_module_by_hand():
    launches = count_launches(GPU_MODULE)
    assert launches.static == 6  # 3 in the body, 1 in the condition, 2 outside; parameters and tuples launch nothing
    assert launches.per_run == 3 * 3 + 4 * 1 + 2  # the body 3 times, the condition before each trip and once more
    assert launches.unknown_trip_loops == 0
    assert launches.by_kind == {
        "fusion:kCustom:__triton_nested_gemm_fusion": 3, "custom-call:__cudnn$fmhaSoftmax": 3,
        "fusion:kLoop": 3 + 4, "fusion:kInput": 1, "op:copy": 1,
    }
    assert launches.by_op["jvp()/dot_general"] == 3 and launches.by_op["reduce_sum"] == 1


# a Triton GEMM fusion and a cuBLAS call of the same [64, 32] x [32, 16] product
GEMM_MODULE = """HloModule jit_mm, is_scheduled=true

%gemm_body (p0: bf16[64,32], p1: bf16[32,16]) -> f32[64,16] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %p1 = bf16[32,16]{1,0} parameter(1)
  ROOT %d = f32[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: bf16[64,32], b: bf16[32,16]) -> (f32[64,16], f32[64,16]) {
  %a = bf16[64,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %g = f32[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_body, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}, metadata={op_name="jit(mm)/dot_general"}
  %c = (f32[64,16]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %c0 = f32[64,16]{1,0} get-tuple-element(%c), index=0
  ROOT %t = (f32[64,16]{1,0}, f32[64,16]{1,0}) tuple(%g, %c0)
}
"""


def test_memory_moved_and_gemm_flops_by_hand():
    loop = count_launches(GPU_MODULE)
    # per body trip: the GEMM and the cuDNN call each read and write f32[8] (32 + 32 bytes), the counter
    # s32[] (4 + 4); the condition reads s32[] and writes pred[] (4 + 1); outside, two f32[8] kernels
    assert loop.bytes_moved == 3 * (64 + 64 + 8) + 4 * 5 + 2 * 64
    assert loop.gemm_flops == 0  # the "GEMM" fusion holds no dot
    gemms = count_launches(GEMM_MODULE)
    a, b, out = 64 * 32 * 2, 32 * 16 * 2, 64 * 16 * 4
    assert gemms.bytes_moved == (a + b + out) + (a + b + out + 1024)  # cuBLAS's workspace is an output too
    assert gemms.gemm_flops == 2 * (2 * 64 * 16 * 32)
    assert gemms.bytes_by_op["dot_general"] == a + b + out
    # the same cuBLAS call on fp32 operands is floored at half the peak (TF32 on an H100 or H200)
    assert [x.fp32_gemm for x in gemms.launches] == [False, False]
    fp32 = count_launches(GEMM_MODULE.replace("%a = bf16", "%a = f32").replace("%b = bf16", "%b = f32"))
    cublas_bf16, cublas_fp32 = gemms.launches[1], fp32.launches[1]
    assert cublas_fp32.fp32_gemm and cublas_fp32.gemm_flops == cublas_bf16.gemm_flops
    huge = float("inf")  # bandwidth: only the FLOPs bound
    assert cublas_fp32.floor_seconds(huge, 1e6) == 2 * cublas_bf16.floor_seconds(huge, 1e6)


def test_a_scan_compiled_here_counts_its_body_per_trip():
    """On XLA:CPU's real output: a longer scan adds its body's launches per extra trip, the program stays the same."""

    def program(length):
        def f(x):
            y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ c) + 1.0, None), x, None, length=length)
            return jnp.sum(y)

        return count_launches(jax.jit(f).lower(jnp.ones((16, 16))).compile().as_text())

    three, seven = program(3), program(7)
    assert three.static == seven.static and three.unknown_trip_loops == seven.unknown_trip_loops == 0
    per_trip = (seven.per_run - three.per_run) / 4
    assert per_trip >= 1 and per_trip == int(per_trip)
    assert three.per_run == seven.per_run - 4 * per_trip > 3 * per_trip  # plus what runs outside the loop

    def data_dependent(x):  # a while loop whose length XLA cannot know
        return jax.lax.while_loop(lambda c: jnp.sum(c) < 100.0, lambda c: c * 2.0 + 1.0, x)

    unknown = count_launches(jax.jit(data_dependent).lower(jnp.ones((4,))).compile().as_text())
    assert unknown.unknown_trip_loops == 1 and unknown.per_run == unknown.static
    assert three.per_unknown_iteration == 0
    # an iteration of it launches its body and its condition; what runs after the loop does not count
    after = count_launches(jax.jit(lambda x: jnp.tanh(data_dependent(x)) @ x).lower(jnp.ones((4,))).compile().as_text())
    assert 1 <= unknown.per_unknown_iteration == after.per_unknown_iteration < after.per_run


# the frame tables newer modules print before their computations, and an instruction pointing into them
FRAMED_MODULE = """HloModule jit_f, is_scheduled=true

FileNames
1 "/repo/dsjax/model/loss.py"
2 "/repo/dsjax/model/layers.py"

FunctionNames
1 "_nll.<locals>.body"
2 "rms_norm"

FileLocations
1 {file_name_id=1 function_name_id=1 line=156 end_line=156 column=4 end_column=9}
2 {file_name_id=2 function_name_id=2 line=15 end_line=15 column=4 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}

%fused_add (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %add = f32[8]{0} add(%p0, %p0), metadata={op_name="jit(f)/add" stack_frame_id=2}
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %a = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/dot_general" stack_frame_id=1}
  %b = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/mul" stack_frame_id=2}
  %c = f32[8]{0} fusion(%b), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/mul" stack_frame_id=2}
  ROOT %d = f32[8]{0} fusion(%c), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/sub" source_file="/old/dsjax/train/step.py" source_line=7}
}
"""


def test_each_kernel_is_placed_on_its_python_line():
    """Both metadata forms: a stack frame into the module's tables, and an older inline file and line."""
    assert source_locations(FRAMED_MODULE) == {
        "add": "model/layers.py:15 rms_norm", "a": "model/loss.py:156 body", "b": "model/layers.py:15 rms_norm",
        "c": "model/layers.py:15 rms_norm", "d": "train/step.py:7",
    }
    launches = count_launches(FRAMED_MODULE)
    assert [(x.name, x.source) for x in launches.launches] == [
        ("a", "model/loss.py:156 body"), ("b", "model/layers.py:15 rms_norm"), ("c", "model/layers.py:15 rms_norm"),
        ("d", "train/step.py:7"),
    ]
    # each kernel moves 64 bytes: at 64 B/s a floor of one second, plus the launch charge
    rows = launches.by_source(bandwidth=64.0, peak_flops=1.0, per_launch_s=0.5)
    assert [(r["source"], r["kernels"], r["bytes_moved"], r["estimate_s"]) for r in rows] == [
        ("model/layers.py:15 rms_norm", 2, 128, 3.0), ("model/loss.py:156 body", 1, 64, 1.5), ("train/step.py:7", 1, 64, 1.5),
    ]


def test_a_program_compiled_here_names_the_lines_that_made_it():
    def f(x):
        y = jnp.tanh(x @ x)  # the line the dot's kernel should name
        return jnp.sum(y * 3.0)

    line = f.__code__.co_firstlineno + 1
    hlo = jax.jit(f).lower(jnp.ones((16, 16))).compile().as_text()
    where = set(source_locations(hlo).values())
    assert f"tests/test_hlo_launches.py:{line} f" in where, where
