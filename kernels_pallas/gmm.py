"""Grouped matmul (`gmm`) and its transpose (`tgmm`) as Pallas kernels, with the jnp reference.

The left operand is *expert-sorted and block-padded*: its rows are cut into row
blocks of `block_m` rows and every block belongs to exactly one expert (see
`kernels_pallas.moe.permute`). So the forward pass is a plain tiled matmul per
row block whose right operand is picked by the block's expert id:

    gmm:   out[rows of block b]  = lhs[rows of b] @ rhs[expert(b)]             [M, K] x [E, K, N] -> [M, N]
    tgmm:  d_rhs[e]              = sum over e's blocks b of lhs[b]^T @ dout[b]  -> [E, K, N]

`gmm` has a custom VJP: d_lhs is a gmm against the transposed weights (read
transposed inside the kernel, never copied) and d_rhs is a tgmm.

Lowering: NVIDIA GPUs through the Pallas *Triton* backend; `interpret=True` runs
the same kernels on CPU. Triton cannot read arrays inside BlockSpec index maps
(no scalar prefetch), so each program loads its block's expert id from a small
int32 ref and indexes the full weight ref dynamically. Triton also wants
power-of-two tiles: K and N are zero-padded to tile multiples in the wrapper
(zeros add nothing to the sums) and the output is sliced back. Blocks past the
last used one (expert id -1) skip the K loop and write zeros; experts with no
rows get a zero weight gradient. Accumulation is fp32; fp32 inputs multiply at
HIGHEST precision (IEEE on the GPU, not TF32).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


class Groups(NamedTuple):
    """Row-block layout of an expert-sorted, block-padded operand (int32 arrays).

    The row block size is implicit: rows / number of blocks.
    """

    block_expert: jax.Array  # [B] expert of each row block; -1 for unused trailing blocks
    block_start: jax.Array  # [E] first row block of each expert
    block_count: jax.Array  # [E] row blocks of each expert (0 when it has no rows)


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """Tiles (powers of two) and Triton launch parameters of one pallas_call."""

    rows: int  # rows per step: the row block (gmm), or the rows reduced per loop step (tgmm)
    k: int  # contraction tile (gmm); weight-row tile (tgmm)
    n: int  # output-column tile
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The three kernels of one differentiable gmm [M, K] x [E, K, N]."""

    fwd: KernelTiles  # out = lhs @ rhs: contracts K, tiles N
    dlhs: KernelTiles  # d_lhs = dout @ rhs^T: contracts N, tiles K
    tgmm: KernelTiles  # d_rhs: tiles K x N, reduces rows


@dataclasses.dataclass(frozen=True)
class _Static:
    tiles: Tiles
    interpret: bool
    poison: bool  # debug: start every output as NaN so blocks a kernel fails to write show up


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def padded_dim(dim: int) -> int:
    """dim rounded up to a multiple of the widest power-of-two tile (16 to 128) that pads
    at most 1/8 more than rounding up to 16 does (Triton's dot wants dims >= 16)."""
    least = _round_up(dim, 16)
    return next(_round_up(dim, t) for t in (128, 64, 32, 16) if _round_up(dim, t) <= 1.125 * least)


def _launch(out_elems: int, stage_bytes: int) -> tuple[int, int]:
    # warps grow with the output tile; pipeline stages fill up to ~128 KiB of shared memory
    num_warps = 8 if out_elems >= 128 * 128 else 4 if out_elems >= 64 * 64 else 2
    return num_warps, max(1, min(4, (128 * 1024) // stage_bytes))


def _pow2_divisor(x: int, cap: int) -> int:
    return min(x & -x, cap)


def choose_tiles(block_m: int, K: int, N: int, dtype, *, max_k: int = 64, max_n: int = 128) -> Tiles:
    """Tiles for a gmm with row block `block_m` over K and N padded by `padded_dim`:
    contraction steps of up to `max_k` and output tiles of up to `max_n` (the usual
    Triton matmul shape on Hopper), each the largest power of two dividing the padded size."""
    isz = jnp.dtype(dtype).itemsize
    Kp, Np = padded_dim(K), padded_dim(N)
    fk, fn = _pow2_divisor(Kp, max_k), _pow2_divisor(Np, max_n)
    dk, dn = _pow2_divisor(Np, max_k), _pow2_divisor(Kp, max_n)
    rows, tk, tn = min(block_m, 64), _pow2_divisor(Kp, max_n), _pow2_divisor(Np, max_n)
    return Tiles(
        fwd=KernelTiles(block_m, fk, fn, *_launch(block_m * fn, (block_m + fn) * fk * isz)),
        dlhs=KernelTiles(block_m, dk, dn, *_launch(block_m * dn, (block_m + dn) * dk * isz)),
        tgmm=KernelTiles(rows, tk, tn, *_launch(tk * tn, rows * (tk + tn) * isz)),
    )


def default_interpret() -> bool:
    """Interpret (run the kernels as jnp on the host) everywhere but NVIDIA GPUs."""
    return jax.default_backend() != "gpu"


def gmm_reference(lhs_MK, rhs_EKN, groups: Groups):
    """The same product by `jax.lax.ragged_dot`: experts' rows are contiguous, in expert order,
    and rows past the last group (unused blocks) come out zero."""
    block_m = lhs_MK.shape[0] // groups.block_expert.shape[0]
    out = jax.lax.ragged_dot(lhs_MK, rhs_EKN, groups.block_count * block_m,
                             precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return out.astype(lhs_MK.dtype)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, contract_a: int, contract_b: int):
    return jax.lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((), ())),
        precision=_precision(a.dtype), preferred_element_type=jnp.float32,
    )


def _gmm_kernel(expert_ref, lhs_ref, rhs_ref, *rest, tile_k: int, transpose_rhs: bool):
    # lhs_ref [block_m, K] (this program's row block); rhs_ref the whole [E, K, N]
    # ([E, N, K] when transpose_rhs); out_ref [block_m, tile_n]
    out_ref = rest[-1]
    n, b = pl.program_id(0), pl.program_id(1)
    e = expert_ref[b]
    tile_n = out_ref.shape[1]
    cols = pl.ds(n * tile_n, tile_n)

    def step(k, acc_mn):
        ks = pl.ds(k * tile_k, tile_k)
        a = lhs_ref[:, ks]
        if transpose_rhs:
            return acc_mn + _dot(a, rhs_ref[jnp.maximum(e, 0), cols, ks], 1, 1)
        return acc_mn + _dot(a, rhs_ref[jnp.maximum(e, 0), ks, cols], 1, 0)

    # unused blocks (e == -1) run no K steps and store zeros
    # loop bounds all int32: Triton's scf.for rejects mixed bound types (a weak-typed where gives i1/i64 mixes)
    num_k = jnp.where(e >= 0, jnp.int32(lhs_ref.shape[1] // tile_k), jnp.int32(0)).astype(jnp.int32)
    acc_mn = jax.lax.fori_loop(jnp.int32(0), num_k, step, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc_mn.astype(out_ref.dtype)


def _gmm_call(lhs_MK, rhs, groups: Groups, s: _Static, t: KernelTiles, *, transpose_rhs: bool):
    """The pallas_call; shapes already tile multiples. rhs is [E, K, N], or [E, N, K] if transpose_rhs."""
    M, K = lhs_MK.shape
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    B = groups.block_expert.shape[0]
    block_m = M // B
    in_specs = [
        pl.BlockSpec((B,), lambda n, b: (0,)),
        pl.BlockSpec((block_m, K), lambda n, b: (b, 0)),
        pl.BlockSpec(rhs.shape, lambda n, b: (0, 0, 0)),
    ]
    args = [groups.block_expert, lhs_MK, rhs]
    aliases = {}
    if s.poison:
        in_specs.append(pl.BlockSpec((block_m, t.n), lambda n, b: (b, n)))
        args.append(jnp.full((M, N), jnp.nan, lhs_MK.dtype))
        aliases = {3: 0}
    return pl.pallas_call(
        functools.partial(_gmm_kernel, tile_k=t.k, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((M, N), lhs_MK.dtype),
        grid=(N // t.n, B),  # N tiles vary fastest: a row block is reused from L2
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, t.n), lambda n, b: (b, n)),
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
        interpret=s.interpret,
        name="gmm_transposed" if transpose_rhs else "gmm",
    )(*args)


def _tgmm_kernel(start_ref, count_ref, lhs_ref, dout_ref, *rest, block_m: int, rows: int):
    # lhs_ref [M, K] and dout_ref [M, N] whole; out_ref [tile_k, tile_n] of d_rhs[e]
    out_ref = rest[-1]
    n, k, e = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tile_k, tile_n = out_ref.shape
    first = start_ref[e] * (block_m // rows)
    last = first + count_ref[e] * (block_m // rows)

    def step(c, acc_kn):
        rs = pl.ds(c * rows, rows)
        a = lhs_ref[rs, pl.ds(k * tile_k, tile_k)]
        g = dout_ref[rs, pl.ds(n * tile_n, tile_n)]
        return acc_kn + _dot(a, g, 0, 0)

    # an expert with no rows loops zero times and stores zeros
    acc_kn = jax.lax.fori_loop(first, last, step, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc_kn.astype(out_ref.dtype)


def _tgmm_call(lhs_MK, dout_MN, groups: Groups, num_experts: int, s: _Static, dtype):
    """d_rhs [E, K, N] = per expert, the sum over its row blocks of lhs^T @ dout."""
    M, K = lhs_MK.shape
    N = dout_MN.shape[1]
    E, t = num_experts, s.tiles.tgmm
    block_m = M // groups.block_expert.shape[0]
    in_specs = [
        pl.BlockSpec((E,), lambda n, k, e: (0,)),
        pl.BlockSpec((E,), lambda n, k, e: (0,)),
        pl.BlockSpec((M, K), lambda n, k, e: (0, 0)),
        pl.BlockSpec((M, N), lambda n, k, e: (0, 0)),
    ]
    args = [groups.block_start, groups.block_count, lhs_MK, dout_MN]
    aliases = {}
    if s.poison:
        in_specs.append(pl.BlockSpec((None, t.k, t.n), lambda n, k, e: (e, k, n)))
        args.append(jnp.full((E, K, N), jnp.nan, dtype))
        aliases = {4: 0}
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, block_m=block_m, rows=min(t.rows, block_m)),
        out_shape=jax.ShapeDtypeStruct((E, K, N), dtype),
        grid=(N // t.n, K // t.k, E),  # one expert's tiles run together and share its rows in L2
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, t.k, t.n), lambda n, k, e: (e, k, n)),
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
        interpret=s.interpret,
        name="tgmm",
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm_padded(s: _Static, lhs_MK, rhs_EKN, groups: Groups):
    return _gmm_call(lhs_MK, rhs_EKN, groups, s, s.tiles.fwd, transpose_rhs=False)


def _gmm_fwd(s, lhs_MK, rhs_EKN, groups):
    return _gmm_padded(s, lhs_MK, rhs_EKN, groups), (lhs_MK, rhs_EKN, groups)


def _gmm_bwd(s, res, dout_MN):
    lhs_MK, rhs_EKN, groups = res
    # d_lhs = dout @ rhs[e]^T: the forward kernel reading rhs transposed (no copy), N contracted
    d_lhs = _gmm_call(dout_MN, rhs_EKN, groups, s, s.tiles.dlhs, transpose_rhs=True)
    d_rhs = _tgmm_call(lhs_MK, dout_MN, groups, rhs_EKN.shape[0], s, rhs_EKN.dtype)
    return d_lhs, d_rhs, None


_gmm_padded.defvjp(_gmm_fwd, _gmm_bwd)


def _is_pow2(x: int) -> bool:
    return x >= 16 and x & (x - 1) == 0


def gmm(lhs_MK, rhs_EKN, groups: Groups, *, tiles: Tiles | None = None, interpret: bool | None = None,
        poison: bool = False):
    """[M, K] x [E, K, N] -> [M, N]: each row block times its expert's weights (see the module doc).

    Differentiable in lhs and rhs. The row block (M / number of blocks) must be a power
    of two >= 16. `tiles` defaults to `choose_tiles`; `interpret` to True off NVIDIA
    GPUs; `poison` (tests) fills outputs with NaN before the kernels write them.
    """
    M, K = lhs_MK.shape
    E, K2, N = rhs_EKN.shape
    B = groups.block_expert.shape[0]
    if K2 != K or M % B or lhs_MK.dtype != rhs_EKN.dtype:
        raise ValueError(f"gmm: lhs {lhs_MK.shape} {lhs_MK.dtype} and rhs {rhs_EKN.shape} {rhs_EKN.dtype} "
                         f"do not fit {B} row blocks")
    block_m = M // B
    if not _is_pow2(block_m):
        raise ValueError(f"gmm: row block {block_m} (= {M} rows / {B} blocks) must be a power of two >= 16")
    tiles = tiles or choose_tiles(block_m, K, N, lhs_MK.dtype)
    s = _Static(tiles=tiles, interpret=default_interpret() if interpret is None else interpret, poison=poison)
    Kp, Np = padded_dim(K), padded_dim(N)
    for name, t, contracted, out in (("fwd", tiles.fwd, Kp, Np), ("dlhs", tiles.dlhs, Np, Kp),
                                     ("tgmm", tiles.tgmm, Kp, Np)):
        if not (_is_pow2(t.k) and _is_pow2(t.n) and _is_pow2(t.rows) and contracted % t.k == 0 and out % t.n == 0):
            raise ValueError(f"gmm: {name} tiles {t} must be powers of two >= 16 dividing {contracted} x {out}")
    if Kp != K:
        lhs_MK = jnp.pad(lhs_MK, ((0, 0), (0, Kp - K)))
    if (Kp, Np) != (K, N):
        rhs_EKN = jnp.pad(rhs_EKN, ((0, 0), (0, Kp - K), (0, Np - N)))
    out = _gmm_padded(s, lhs_MK, rhs_EKN, groups)
    return out[:, :N] if Np != N else out
