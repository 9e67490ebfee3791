"""Causal attention for MLA's training path: one entry point, four implementations.

`causal_attention(q, k, v, scale, q_offset, impl)` runs
- `xla`: `attention_reference`, plain jnp over a full [B, H, T, S] fp32 score tensor
  (the model's original code, and the reference every other path is tested against);
- `blocked`: `blocked_causal_attention`, plain jnp in query blocks that skip the keys
  above the diagonal (kernels_pallas/blocked_attention.py); CPU's default. It takes
  q_offset 0 and unsplit sequences; anything else runs the reference (same function);
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` with v zero-padded to
  the qk head dim (JAX refuses unequal head dims there) and the output sliced back;
- `pallas`: `flash_attention`, our Pallas kernel (kernels_pallas/flash_attention.py);
- `auto`: `AUTO_IMPL` for the platform (measured; see BUILD.md "Kernels").

Layout is heads-first: q [B, H, T, Kq], k [B, H, S, Kq], v [B, H, S, Kv]. Query row t
is at position t + q_offset and sees keys s <= t + q_offset. A case an implementation
cannot take falls back to the reference with one log line per reason, never a wrong
answer. Under a device mesh the custom calls cannot be auto-partitioned, so they run
inside `jax.shard_map` (batch and heads split as the caller's spec says, queries split
over the sequence axis with the matching q_offset, keys and values whole).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels_pallas import fallbacks
from kernels_pallas.blocked_attention import BLOCK_Q, blocked_causal_attention
from kernels_pallas.flash_attention import MAX_HEAD_DIM, flash_attention

__all__ = [
    "AUTO_IMPL", "attention_reference", "blocked_causal_attention", "causal_attention", "cudnn_attention",
    "flash_attention", "resolve_impl",
]

log = logging.getLogger(__name__)

IMPLS = ("xla", "blocked", "cudnn", "pallas")
# THE measured default per platform (jax.default_backend()); anything not listed uses the reference.
# gpu (H200, bf16, forward + backward, BENCHMARKS.md): small's heads at T 512, xla 1.62 ms, cudnn 0.55,
# pallas 0.43 (tiles tuned by the sweep); at T 2048, xla 4.30, cudnn 1.08, pallas 1.07. cudnn stays the
# default until a whole train step with the tuned pallas tiles has been measured (`dsjax bench
# --attention cudnn,pallas`): with them only the kernel alone was timed; cudnn's step was measured.
# cpu (2-core, fp32, nano's heads at T 256, forward + backward): xla 53.8 ms, blocked 30.4 ms.
AUTO_IMPL = {"cpu": "blocked", "gpu": "cudnn"}

_logged: set[tuple[str, str]] = set()


def resolve_impl(impl: str = "auto", platform: str | None = None) -> str:
    if impl == "auto":
        impl = AUTO_IMPL.get(platform or jax.default_backend(), "xla")
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of auto, {', '.join(IMPLS)}")
    return impl


def attention_reference(q_BHTK, k_BHSK, v_BHSV, scale, q_offset=0):
    """softmax(scale * q k^T) v with fp32 scores and softmax; probabilities cast to q's dtype."""
    dtype = q_BHTK.dtype
    T, S = q_BHTK.shape[2], k_BHSK.shape[2]
    scores_BHTS = jnp.einsum("bhtk,bhsk->bhts", q_BHTK, k_BHSK, preferred_element_type=jnp.float32)
    scores_BHTS = scores_BHTS * scale
    visible_TS = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + q_offset
    scores_BHTS = jnp.where(visible_TS, scores_BHTS, -jnp.inf)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(dtype)
    return jnp.einsum("bhts,bhsv->bhtv", probs_BHTS, v_BHSV)


def _is_zero(q_offset) -> bool:
    return isinstance(q_offset, int) and q_offset == 0


def cudnn_attention(q_BHTK, k_BHSK, v_BHSV, scale, q_offset=0):
    """cuDNN flash attention (GPU, bf16/fp16) for MLA's unequal head dims; no query offset."""
    if not _is_zero(q_offset):
        _log_once("cudnn", "no query offset (sequence parallel)")
        return attention_reference(q_BHTK, k_BHSK, v_BHSV, scale, q_offset)
    Kq, Kv = q_BHTK.shape[-1], v_BHSV.shape[-1]
    width = max(Kq, Kv)  # zero columns: extra q/k ones add nothing to scores, extra v ones are sliced off

    def to_BTHK(x):
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, width - x.shape[-1]))) if x.shape[-1] < width else x
        return x.transpose(0, 2, 1, 3)

    out_BTHK = jax.nn.dot_product_attention(
        to_BTHK(q_BHTK), to_BTHK(k_BHSK), to_BTHK(v_BHSV), scale=scale, is_causal=True, implementation="cudnn"
    )
    return out_BTHK[..., :Kv].transpose(0, 2, 1, 3)


def _log_once(impl: str, reason: str):
    fallbacks.note("attention", impl, "xla", reason)
    if (impl, reason) not in _logged:
        _logged.add((impl, reason))
        log.warning("attention: %s cannot run here (%s); using the xla reference", impl, reason)


def _unsupported(impl: str, q, k, v, q_offset, sequence_split: bool) -> str | None:
    """Why `impl` cannot take this call, or None."""
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if isinstance(q_offset, int) and q_offset < 0:
        return f"negative query offset {q_offset}"
    if impl == "pallas":
        if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
            return f"dtype {q.dtype}"
        if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
            return f"head dim over {MAX_HEAD_DIM}"
        if jax.default_backend() not in ("gpu", "cpu"):
            return f"no Triton on {jax.default_backend()}"
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            return "cuDNN needs a GPU"
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"cuDNN flash attention takes bf16/fp16, not {q.dtype}"
        if sequence_split or not _is_zero(q_offset):
            return "no query offset (sequence parallel)"
    return None


def _mesh_layout(q, spec):
    """(mesh, free axes, batch, heads, sequence entries) when a shard_map is needed, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    free = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    if all(mesh.shape[a] == 1 for a in free):
        return None

    def fitted(entry, dim):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        names = tuple(a for a in names if a in free)
        size = 1
        for a in names:
            size *= mesh.shape[a]
        return names if names and dim % size == 0 else None

    entries = tuple(spec or ()) + (None,) * 3
    return mesh, free, *(fitted(e, d) for e, d in zip(entries[:3], q.shape[:3]))


def _run_sharded(fn, q, k, v, scale, q_offset, layout):
    mesh, free, batch, heads, sequence = layout
    q_spec, kv_spec = P(batch, heads, sequence, None), P(batch, heads, None, None)
    # a traced offset enters as a replicated operand; a Python int stays static (cuDNN needs a literal 0)
    static = isinstance(q_offset, int)
    extra = () if static else (jnp.asarray(q_offset, jnp.int32),)

    def local(q_l, k_l, v_l, *traced):
        off = q_offset if static else traced[0]
        if sequence is not None:
            off = off + jax.lax.axis_index(sequence) * q_l.shape[2]
        return fn(q_l, k_l, v_l, scale, off)

    # check_vma=False: a pallas_call's outputs carry no varying-axes type; the specs above are exact
    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (P(),) * len(extra), out_specs=q_spec,
        axis_names=set(free), check_vma=False,
    )(q, k, v, *extra)


def causal_attention(q_BHTK, k_BHSK, v_BHSV, scale, q_offset=0, impl: str = "auto", *, spec=None):
    """Causal attention by `impl` (auto | xla | cudnn | pallas); output [B, H, T, Kv] in q's dtype.

    `spec`: the mesh axes of q's (batch, heads, sequence) dims, e.g. the rules table's
    layout; under a mesh the kernels run per shard with that layout (None: replicated).
    """
    impl = resolve_impl(impl)
    if impl == "xla":
        return attention_reference(q_BHTK, k_BHSK, v_BHSV, scale, q_offset)
    layout = _mesh_layout(q_BHTK, spec)
    if impl == "blocked":
        T, S = q_BHTK.shape[2], k_BHSK.shape[2]
        if T != S or not _is_zero(q_offset) or (layout is not None and layout[4]):
            # a query offset or a sequence split over devices: the same function, unblocked
            return attention_reference(q_BHTK, k_BHSK, v_BHSV, scale, q_offset)
        return blocked_causal_attention(q_BHTK, k_BHSK, v_BHSV, scale, BLOCK_Q if T % BLOCK_Q == 0 else T)
    reason = _unsupported(impl, q_BHTK, k_BHSK, v_BHSV, q_offset, sequence_split=bool(layout and layout[4]))
    if reason is not None:
        _log_once(impl, reason)
        return attention_reference(q_BHTK, k_BHSK, v_BHSV, scale, q_offset)
    fn = flash_attention if impl == "pallas" else cudnn_attention
    try:
        if layout is None:
            return fn(q_BHTK, k_BHSK, v_BHSV, scale, q_offset)
        return _run_sharded(fn, q_BHTK, k_BHSK, v_BHSV, scale, q_offset, layout)
    except (ValueError, NotImplementedError, RuntimeError) as error:
        if impl != "cudnn":  # our kernel's own checks ran above: anything else is a bug to surface
            raise
        _log_once(impl, str(error).splitlines()[0])  # JAX's cuDNN checks: shapes, versions, head dims
        return attention_reference(q_BHTK, k_BHSK, v_BHSV, scale, q_offset)
