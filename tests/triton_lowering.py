"""Lower a function for CUDA on a CPU-only machine and verify every Triton module it makes.

`jit(f).trace(...).lower(lowering_platforms=("cuda",))` runs Pallas' Triton lowering
without a GPU. The GPU plugin later parses each serialized module *with* MLIR
verification (on an H200 a mixed-type `scf.for` bound failed only there); running
the same verifier here catches that class of error before a GPU is ever used.
"""

from __future__ import annotations

import contextlib

from jax._src.pallas.triton import lowering as triton_lowering
from jax._src.pallas.triton import pallas_call_registration as registration


@contextlib.contextmanager
def verified_triton_modules():
    """Inside: every Triton module lowered is MLIR-verified; yields the list of modules seen."""
    original = triton_lowering.lower_jaxpr_to_triton_module
    seen = []

    def lower_and_verify(*args, **kwargs):
        result = original(*args, **kwargs)
        result.module.operation.verify()  # raises with the failing op on a malformed module
        seen.append(result.module)
        return result

    registration.lowering.lower_jaxpr_to_triton_module = lower_and_verify
    try:
        yield seen
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original


def lower_for_cuda(jitted, *args) -> str:
    """StableHLO text of `jitted` lowered for CUDA, every Triton module in it verified."""
    with verified_triton_modules() as seen:
        text = jitted.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert seen, "no Triton module was lowered"
    return text
