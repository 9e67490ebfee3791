"""Causal flash attention in Pallas (Triton on GPU, interpreted on CPU): forward and backward.

Layout is heads-first, as `dsjax/model/mla.py` builds it: q [B, H, T, Kq], k [B, H, S, Kq],
v [B, H, S, Kv], out [B, H, T, Kv]. Query row t sits at position t + q_offset and
sees keys s <= t + q_offset (q_offset > 0 when the queries are a slice of the
sequence, as under sequence parallelism; it may be a traced int).

- Head dims: Triton tiles must be powers of two, so each ref's block is the next
  power of two (MLA's qk 96 -> 128) and loads/stores are masked: the padding lives
  only in registers, never in HBM. Zero q/k columns add nothing to the scores.
- Sequences: padded in the wrapper to a multiple of the blocks only when they are
  not one already; padded keys are masked, padded queries are sliced off.
- Forward: one program per (query block, batch, head); online softmax in fp32
  with exp2 (log2(e) folded into the scale); saves the per-row logsumexp. The key
  loop stops at the diagonal (causal costs half) and runs unmasked until the
  first key block that needs the mask.
- Backward (FlashAttention-2 split): delta = rowsum(dO * O) in XLA; one kernel
  per key block accumulates dK, dV over the query blocks that can see it; one
  per query block accumulates dQ over its visible key blocks. No atomics.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)
# finite, so a row whose first block is all masked can never make inf - inf = NaN
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
MAX_HEAD_DIM = 256  # beyond this the fp32 accumulators no longer fit in registers


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's tiling: block_q query rows x block_k key rows, and its launch shape."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call: sizes, padding and the three kernels' tiles."""

    scale: float
    T: int  # real query rows
    S: int  # real key rows
    T_pad: int
    S_pad: int
    Kq: int
    Kv: int
    fwd: Tiles
    dq: Tiles
    dkv: Tiles
    interpret: bool
    poison: bool  # fill outputs with NaN before the kernels run (tests: every element must be written)

    @property
    def Kq_pad(self) -> int:
        return pl.next_power_of_2(self.Kq)

    @property
    def Kv_pad(self) -> int:
        return pl.next_power_of_2(self.Kv)


def _warps(block_q: int, block_k: int, k_pad: int) -> int:
    # small tiles cannot keep 4+ warps busy; wide heads need 8 for the accumulators
    if block_q * block_k <= 32 * 32:
        return 2
    return 8 if block_q * block_k >= 64 * 128 and k_pad >= 128 else 4


def _tiles(block_q: int, block_k: int, T: int, S: int, k_pad: int, stages: int) -> Tiles:
    bq = min(block_q, max(16, pl.next_power_of_2(T)))  # 16: Triton's smallest dot tile
    bk = min(block_k, max(16, pl.next_power_of_2(S)))
    return Tiles(bq, bk, _warps(bq, bk, k_pad), stages)


def default_tiles(T: int, S: int, Kq: int, block_q=None, block_k=None, itemsize: int = 2):
    """(fwd, dq, dkv) tiles for this shape. THE place to tune block sizes.

    Forward: wide query blocks (each program keeps its queries in registers and
    streams keys). Backward: square 64 x 64 blocks with 4 warps for dQ and dK/dV,
    measured on an H200 (benchmarks/gpu_attention.py --sweep, small's heads qk 96 /
    v 64, bf16): 1.07 ms forward + backward at T 2048 and 0.43 ms at T 512, against
    3.40 and 1.33 ms for the Triton-tutorial shapes (dQ 128 x 32, dK/dV 32 x 128,
    4 warps), whose fp32 accumulators at a 128-wide head overflow the registers.
    Rows wider than 256 bytes (qk over 128 in bf16, over 64 in fp32; not measured)
    halve the blocks and pipeline 2 stages instead of 3, to stay inside shared
    memory. Explicit block_q / block_k apply to all three kernels.
    """
    k_pad = pl.next_power_of_2(Kq)
    wide_rows = k_pad * itemsize > 256
    wide, narrow, stages = (64, 32, 2) if wide_rows else (128, 64, 3)
    if block_q or block_k:
        bq, bk = block_q or 64, block_k or 64
        return tuple(_tiles(bq, bk, T, S, k_pad, 2) for _ in range(3))
    square = narrow if wide_rows else 64
    return (
        _tiles(wide, narrow, T, S, k_pad, stages),  # forward: queries x keys
        _tiles(square, square, T, S, k_pad, stages),  # dQ: queries (per program) x keys (inner loop)
        _tiles(square, square, T, S, k_pad, stages),  # dK/dV: queries (inner loop) x keys (per program)
    )


def make_plan(
    T, S, Kq, Kv, scale, *, itemsize=2, block_q=None, block_k=None, tiles=None, interpret=False, poison=False
) -> Plan:
    """`tiles`: explicit (fwd, dq, dkv) Tiles, for tuning sweeps; otherwise `default_tiles`."""
    if tiles is not None:
        fwd, dq, dkv = (_tiles(t.block_q, t.block_k, T, S, pl.next_power_of_2(Kq), t.num_stages) for t in tiles)
        fwd, dq, dkv = (dataclasses.replace(a, num_warps=t.num_warps) for a, t in zip((fwd, dq, dkv), tiles))
    else:
        fwd, dq, dkv = default_tiles(T, S, Kq, block_q, block_k, itemsize)
    q_multiple = max(t.block_q for t in (fwd, dq, dkv))
    k_multiple = max(t.block_k for t in (fwd, dq, dkv))
    return Plan(
        scale=float(scale), T=T, S=S,
        T_pad=-(-T // q_multiple) * q_multiple, S_pad=-(-S // k_multiple) * k_multiple,
        Kq=Kq, Kv=Kv, fwd=fwd, dq=dq, dkv=dkv, interpret=interpret, poison=poison,
    )


# --- in-kernel helpers -------------------------------------------------------------------------------


def _load(ref, width: int):
    """Load a [rows, width_pad] tile whose columns past `width` are outside the array: zeros there."""
    if ref.shape[-1] == width:
        return ref[...]
    return pltriton.load(ref, mask=(jnp.arange(ref.shape[-1]) < width)[None, :], other=0.0)


def _store(ref, value, width: int):
    if ref.shape[-1] == width:
        ref[...] = value.astype(ref.dtype)
    else:
        pltriton.store(ref, value.astype(ref.dtype), mask=(jnp.arange(ref.shape[-1]) < width)[None, :])


def _dot(a, b, contract=(1, 0)):
    """fp32-accumulated a @ b; contract=(1, 1) is a @ b.T, (0, 0) is a.T @ b."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _mask(s, q_pos, k_pos, plan: Plan):
    visible = k_pos[None, :] <= q_pos[:, None]
    if plan.S_pad != plan.S:
        visible = visible & (k_pos[None, :] < plan.S)
    return jnp.where(visible, s, MASK_VALUE)


def _key_blocks(off, i, block_q: int, block_k: int, plan: Plan):
    """For query block i: key blocks [0, full) need no mask, [full, end) hold the diagonal (or padding)."""
    first_q = off + i * block_q
    full = jnp.minimum(jax.lax.div(first_q + 1, block_k), plan.S // block_k)
    end = jnp.minimum(jax.lax.div(first_q + block_q + block_k - 1, block_k), plan.S_pad // block_k)
    return full, end


def _query_blocks(off, j, block_q: int, block_k: int, plan: Plan):
    """For key block j: query blocks [start, full) hold the diagonal, [full, n) see the whole key block."""
    n = plan.T_pad // block_q
    start = jax.lax.div(jnp.maximum(j * block_k - off, 0), block_q)
    full = jax.lax.div(jnp.maximum((j + 1) * block_k - 1 - off, 0) + block_q - 1, block_q)
    if plan.S_pad != plan.S:
        full = jnp.where((j + 1) * block_k > plan.S, n, full)  # padded keys: mask every block
    return start, jnp.minimum(jnp.maximum(full, start), n), n


# --- kernels -----------------------------------------------------------------------------------------


def _forward_kernel(off_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, plan: Plan):
    bq, bk = plan.fwd.block_q, plan.fwd.block_k
    i, off = pl.program_id(0), off_ref[0]
    q = _load(q_ref, plan.Kq)
    q_pos = off + i * bq + jnp.arange(bq)
    qk_scale = plan.scale * LOG2E

    def step(j, carry, masked):
        acc, m, l = carry
        k = _load(k_ref.at[pl.ds(j * bk, bk), :], plan.Kq)
        v = _load(v_ref.at[pl.ds(j * bk, bk), :], plan.Kv)
        s = _dot(q, k, (1, 1)) * qk_scale
        if masked:
            s = _mask(s, q_pos, j * bk + jnp.arange(bk), plan)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * correction + jnp.sum(p, axis=1)
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (
        jnp.zeros((bq, plan.Kv_pad), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    full, end = _key_blocks(off, i, bq, bk, plan)
    carry = jax.lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
    acc, m, l = jax.lax.fori_loop(full, end, functools.partial(step, masked=True), carry)
    _store(o_ref, acc / l[:, None], plan.Kv)
    lse_ref[...] = m + jnp.log2(l)  # base 2: the backward recomputes p = exp2(s * log2e - lse)


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan: Plan):
    bq, bk = plan.dq.block_q, plan.dq.block_k
    i, off = pl.program_id(0), off_ref[0]
    q, do = _load(q_ref, plan.Kq), _load(do_ref, plan.Kv)
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = off + i * bq + jnp.arange(bq)
    qk_scale = plan.scale * LOG2E

    def step(j, dq, masked):
        k = _load(k_ref.at[pl.ds(j * bk, bk), :], plan.Kq)
        v = _load(v_ref.at[pl.ds(j * bk, bk), :], plan.Kv)
        s = _dot(q, k, (1, 1)) * qk_scale
        if masked:
            s = _mask(s, q_pos, j * bk + jnp.arange(bk), plan)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    full, end = _key_blocks(off, i, bq, bk, plan)
    dq = jnp.zeros((bq, plan.Kq_pad), jnp.float32)
    dq = jax.lax.fori_loop(0, full, functools.partial(step, masked=False), dq)
    dq = jax.lax.fori_loop(full, end, functools.partial(step, masked=True), dq)
    _store(dq_ref, dq * plan.scale, plan.Kq)


def _dkv_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, plan: Plan):
    bq, bk = plan.dkv.block_q, plan.dkv.block_k
    j, off = pl.program_id(0), off_ref[0]
    k, v = _load(k_ref, plan.Kq), _load(v_ref, plan.Kv)
    k_pos = j * bk + jnp.arange(bk)
    qk_scale = plan.scale * LOG2E

    def step(i, carry, masked):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = _load(q_ref.at[rows, :], plan.Kq), _load(do_ref.at[rows, :], plan.Kv)
        lse, delta = lse_ref[rows], delta_ref[rows]
        s = _dot(q, k, (1, 1)) * qk_scale
        if masked:
            s = _mask(s, off + i * bq + jnp.arange(bq), k_pos, plan)
        p = jnp.exp2(s - lse[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
        ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
        return dk, dv

    start, full, n = _query_blocks(off, j, bq, bk, plan)
    carry = (jnp.zeros((bk, plan.Kq_pad), jnp.float32), jnp.zeros((bk, plan.Kv_pad), jnp.float32))
    carry = jax.lax.fori_loop(start, full, functools.partial(step, masked=True), carry)
    dk, dv = jax.lax.fori_loop(full, n, functools.partial(step, masked=False), carry)
    _store(dk_ref, dk * plan.scale, plan.Kq)
    _store(dv_ref, dv, plan.Kv)


# --- pallas_call wrappers ------------------------------------------------------------------------------


def _tile_spec(rows: int, width: int):
    """[B, H, L, W] -> one [rows, width] tile per program (program_id(0) picks the row block)."""
    return pl.BlockSpec((None, None, rows, width), lambda r, b, h: (b, h, r, 0))


def _row_spec(rows: int):
    """[B, H, L] per-row statistics (logsumexp, delta) -> one block of `rows` per program."""
    return pl.BlockSpec((None, None, rows), lambda r, b, h: (b, h, r))


def _whole_spec(length: int, width: int | None = None):
    """[B, H, L(, W)] -> the whole sequence of this (batch, head), for kernels that loop over it."""
    if width is None:
        return pl.BlockSpec((None, None, length), lambda r, b, h: (b, h, 0))
    return pl.BlockSpec((None, None, length, width), lambda r, b, h: (b, h, 0, 0))


_OFFSET_SPEC = pl.BlockSpec((1,), lambda r, b, h: (0,))


def _call(kernel, plan: Plan, tiles: Tiles, grid, in_specs, out_specs, out_shapes, args, name):
    """One pallas_call; with plan.poison the outputs start as NaN arrays aliased in, so unwritten elements show."""
    aliases = {}
    if plan.poison:
        args = args + tuple(jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shapes)
        in_specs = in_specs + out_specs
        aliases = {len(args) - len(out_shapes) + n: n for n in range(len(out_shapes))}
        kernel = _ignoring_poison_inputs(kernel, len(in_specs) - len(out_specs), len(out_shapes))
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shapes,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=plan.interpret,
        name=name,
    )(*args)


def _ignoring_poison_inputs(kernel, n_inputs: int, n_poison: int):
    def wrapped(*refs, plan):
        return kernel(*refs[:n_inputs], *refs[n_inputs + n_poison :], plan=plan)

    return wrapped


def _forward(q, k, v, off, plan: Plan):
    B, H = q.shape[:2]
    t = plan.fwd
    return _call(
        _forward_kernel, plan, t,
        grid=(plan.T_pad // t.block_q, B, H),
        in_specs=(_OFFSET_SPEC, _tile_spec(t.block_q, plan.Kq_pad),
                  _whole_spec(plan.S_pad, plan.Kq_pad), _whole_spec(plan.S_pad, plan.Kv_pad)),
        out_specs=(_tile_spec(t.block_q, plan.Kv_pad), _row_spec(t.block_q)),
        out_shapes=(jax.ShapeDtypeStruct((B, H, plan.T_pad, plan.Kv), q.dtype),
                    jax.ShapeDtypeStruct((B, H, plan.T_pad), jnp.float32)),
        args=(off, q, k, v), name="flash_attention_fwd",
    )


def _backward(q, k, v, off, o, lse, do, plan: Plan):
    B, H = q.shape[:2]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, T_pad]
    t = plan.dq
    (dq,) = _call(
        _dq_kernel, plan, t,
        grid=(plan.T_pad // t.block_q, B, H),
        in_specs=(_OFFSET_SPEC, _tile_spec(t.block_q, plan.Kq_pad),
                  _whole_spec(plan.S_pad, plan.Kq_pad), _whole_spec(plan.S_pad, plan.Kv_pad),
                  _tile_spec(t.block_q, plan.Kv_pad), _row_spec(t.block_q), _row_spec(t.block_q)),
        out_specs=(_tile_spec(t.block_q, plan.Kq_pad),),
        out_shapes=(jax.ShapeDtypeStruct(q.shape, q.dtype),),
        args=(off, q, k, v, do, lse, delta), name="flash_attention_dq",
    )
    t = plan.dkv
    dk, dv = _call(
        _dkv_kernel, plan, t,
        grid=(plan.S_pad // t.block_k, B, H),
        in_specs=(_OFFSET_SPEC, _whole_spec(plan.T_pad, plan.Kq_pad),
                  _tile_spec(t.block_k, plan.Kq_pad), _tile_spec(t.block_k, plan.Kv_pad),
                  _whole_spec(plan.T_pad, plan.Kv_pad), _whole_spec(plan.T_pad), _whole_spec(plan.T_pad)),
        out_specs=(_tile_spec(t.block_k, plan.Kq_pad), _tile_spec(t.block_k, plan.Kv_pad)),
        out_shapes=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        args=(off, q, k, v, do, lse, delta), name="flash_attention_dkv",
    )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, off, plan: Plan):
    return _forward(q, k, v, off, plan)[0]


def _flash_fwd(q, k, v, off, plan: Plan):
    o, lse = _forward(q, k, v, off, plan)
    return o, (q, k, v, off, o, lse)


def _flash_bwd(plan: Plan, residuals, do):
    q, k, v, off, o, lse = residuals
    dq, dk, dv = _backward(q, k, v, off, o, lse, do, plan)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_rows(x, length: int):
    if x.shape[2] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def flash_attention(
    q_BHTK, k_BHSK, v_BHSV, scale: float, q_offset=0, *,
    block_q: int | None = None, block_k: int | None = None, interpret: bool | None = None, debug_poison: bool = False,
    tiles: tuple[Tiles, Tiles, Tiles] | None = None,
):
    """Causal attention softmax(scale * q k^T) v, differentiable; output [B, H, T, V] in q's dtype.

    interpret=None interprets on CPU and compiles through Triton on GPU.
    debug_poison=True fills every output with NaN before its kernel runs, so a test
    sees any element a kernel forgot to write.
    """
    B, H, T, Kq = q_BHTK.shape
    S, Kv = k_BHSK.shape[2], v_BHSV.shape[-1]
    if k_BHSK.shape != (B, H, S, Kq) or v_BHSV.shape[:3] != (B, H, S):
        raise ValueError(
            f"flash_attention: q {q_BHTK.shape}, k {k_BHSK.shape}, v {v_BHSV.shape}"
            " are not [B,H,T,K], [B,H,S,K], [B,H,S,V]"
        )
    if not q_BHTK.dtype == k_BHSK.dtype == v_BHSV.dtype:
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q_BHTK.dtype}, {k_BHSK.dtype}, {v_BHSV.dtype})")
    if max(Kq, Kv) > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dims {Kq}/{Kv} exceed {MAX_HEAD_DIM}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    plan = make_plan(
        T, S, Kq, Kv, scale, itemsize=q_BHTK.dtype.itemsize, block_q=block_q, block_k=block_k, tiles=tiles,
        interpret=interpret, poison=debug_poison,
    )
    off = jnp.asarray(q_offset, jnp.int32).reshape(1)
    o = _flash(_pad_rows(q_BHTK, plan.T_pad), _pad_rows(k_BHSK, plan.S_pad), _pad_rows(v_BHSV, plan.S_pad), off, plan)
    return o[:, :, :T] if plan.T_pad != T else o
