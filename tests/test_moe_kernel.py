"""The grouped-matmul MoE path (kernels_pallas/gmm.py, kernels_pallas/moe.py) against its references.

Kernels run interpreted on CPU with every output NaN-poisoned first, so a block a
kernel fails to write fails the comparison. The GPU lowering (Pallas -> Triton)
is checked without a GPU by lowering for "cuda".
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import model
from dsjax.config import load_config
from dsjax.model import moe as moe_module
from dsjax.model.moe import combine_weights, experts_masked
from kernels_pallas.gmm import gmm, gmm_reference
from kernels_pallas.moe import (
    experts_pallas,
    experts_reference,
    permute,
    permuted_rows,
    route_to_blocks,
    unpermute,
    unsupported_reason,
)
from triton_lowering import lower_for_cuda

# relative to the largest reference magnitude; stated once, never loosened
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def assert_close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual)), "non-finite values: a block was left unwritten"
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x {scale:.3g}"


def expert_ids(kind: str, T: int, K: int, E: int, seed: int):
    """[T, K] distinct experts per token: random over all but the last expert (which gets no
    tokens), or every token's first choice on expert 1 (one expert takes all tokens)."""
    scores = jax.random.uniform(jax.random.key(seed), (T, E))
    if kind == "skip_last":
        scores = scores.at[:, E - 1].set(-1.0)
    elif kind == "one_takes_all":
        scores = scores.at[:, 1].set(2.0)
    return jax.lax.top_k(scores, K)[1].astype(jnp.int32)


GMM_CASES = {
    # name: (T, K, E, block_m, D, N, dtype, routing)
    "fp32_ragged_empty_expert": (37, 2, 5, 16, 40, 24, jnp.float32, "skip_last"),
    "fp32_one_expert_takes_all": (29, 1, 3, 32, 48, 72, jnp.float32, "one_takes_all"),
    "bf16_ragged_empty_expert": (45, 3, 6, 16, 24, 40, jnp.bfloat16, "skip_last"),
}


@pytest.mark.parametrize("case", GMM_CASES)
def test_gmm_forward_and_gradients_match_ragged_dot(case):
    T, K, E, block_m, D, N, dtype, kind = GMM_CASES[case]
    routing = route_to_blocks(expert_ids(kind, T, K, E, seed=1), E, block_m)
    k0, k1, k2 = jax.random.split(jax.random.key(2), 3)
    x_MD = permute(jax.random.normal(k0, (T, D), dtype), routing)
    w_EDN = jax.random.normal(k1, (E, D, N), dtype)
    dout_MN = jax.random.normal(k2, (x_MD.shape[0], N), dtype)

    def out_and_grads(matmul):
        out, vjp = jax.vjp(lambda x, w: matmul(x, w, routing.groups), x_MD, w_EDN)
        return out, *vjp(dout_MN)

    got = jax.jit(lambda: out_and_grads(lambda x, w, g: gmm(x, w, g, poison=True)))()
    want = jax.jit(lambda: out_and_grads(gmm_reference))()
    for name, a, b in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert a.dtype == dtype, name
        assert_close(a, b, TOL[dtype])
    if kind == "skip_last":  # the expert with no rows gets an exactly zero weight gradient
        assert float(jnp.abs(got[2][E - 1]).max()) == 0.0


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("kind", ["skip_last", "one_takes_all"])
def test_permutation_round_trip_is_exact(block_m, kind):
    T, K, E, D = 53, 3, 7, 5
    idx = expert_ids(kind, T, K, E, seed=3)
    x = jax.random.normal(jax.random.key(4), (T, D))
    routing = route_to_blocks(idx, E, block_m)
    x_MD = permute(x, routing)
    M = permuted_rows(T, K, E, block_m)
    assert x_MD.shape == (M, D) and M % block_m == 0
    rows = np.asarray(routing.row_TK)
    # every copy lands on its own row, in a block of its expert, holding its token exactly
    assert len(set(rows.reshape(-1).tolist())) == T * K
    np.testing.assert_array_equal(np.asarray(routing.groups.block_expert)[rows // block_m], np.asarray(idx))
    np.testing.assert_array_equal(np.asarray(x_MD)[rows], np.repeat(np.asarray(x)[:, None], K, axis=1))
    padding = np.setdiff1d(np.arange(M), rows.reshape(-1))
    assert np.all(np.asarray(x_MD)[padding] == 0)
    assert np.all(np.asarray(routing.slot_M)[padding] == T * K)
    np.testing.assert_array_equal(np.asarray(routing.slot_M)[rows], np.arange(T * K).reshape(T, K))
    # blocks: each expert's run starts where the previous ends; counts cover its rows
    counts = np.bincount(np.asarray(idx).reshape(-1), minlength=E)
    np.testing.assert_array_equal(np.asarray(routing.groups.block_count), -(-counts // block_m))
    starts = np.concatenate([[0], np.cumsum(np.asarray(routing.groups.block_count))[:-1]])
    np.testing.assert_array_equal(np.asarray(routing.groups.block_start), starts)
    # the inverse: one-hot gates give back x exactly
    first_only = jnp.zeros((T, K)).at[:, 0].set(1.0)
    np.testing.assert_array_equal(np.asarray(unpermute(x_MD, routing, first_only)), np.asarray(x))


def test_experts_pallas_and_gradients_equal_the_dense_masked_path():
    T, K, E, D, F = 41, 2, 5, 24, 40
    k = jax.random.split(jax.random.key(5), 6)
    experts = {
        "gate_proj": jax.random.normal(k[0], (E, D, F)) / np.sqrt(D),
        "up_proj": jax.random.normal(k[1], (E, D, F)) / np.sqrt(D),
        "down_proj": jax.random.normal(k[2], (E, F, D)) / np.sqrt(F),
    }
    x = jax.random.normal(k[3], (T, D))
    idx = expert_ids("skip_last", T, K, E, seed=6)
    gate = jax.random.uniform(k[4], (T, K))
    cotangent = jax.random.normal(k[5], (T, D))

    def out_and_grads(experts_fn):
        out, vjp = jax.vjp(lambda e, x, g: experts_fn(e, x, idx, g), experts, x, gate)
        return out, vjp(cotangent)

    got = jax.jit(lambda: out_and_grads(lambda e, x, i, g: experts_pallas(e, x, i, g, block_m=16, poison=True)))()
    dense = jax.jit(lambda: out_and_grads(lambda e, x, i, g: experts_masked(e, x, combine_weights(i, g, E))))()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(dense)):
        assert_close(a, b, TOL[jnp.float32])
    assert_close(experts_reference(experts, x, idx, gate), dense[0], TOL[jnp.float32])


NANO = load_config("nano").model


@pytest.fixture(scope="module")
def nano_params():
    return model.init(NANO, jax.random.key(7))


def test_nano_loss_and_gradients_pallas_equal_dense(nano_params):
    nano, params = NANO, nano_params
    window = jax.random.randint(jax.random.key(8), (2, 17), 0, nano.vocab_size)

    def loss_and_grads(impl):
        c = dataclasses.replace(nano, moe_impl=impl)
        return jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, window, c)[0]))(params)

    (loss_p, grads_p), (loss_d, grads_d) = loss_and_grads("pallas"), loss_and_grads("dense")
    assert_close(loss_p, loss_d, TOL[jnp.float32])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_p), jax.tree.leaves(grads_d)):
        if float(jnp.abs(b).max()) > 0:
            assert_close(a, b, TOL[jnp.float32]), jax.tree_util.keystr(path)
        else:
            assert float(jnp.abs(a).max()) == 0.0, jax.tree_util.keystr(path)


def layer_shape(name: str, tokens: int):
    c = load_config(name).model
    return tokens, c.n_routed_experts, c.num_experts_per_tok, c.hidden_size, c.moe_intermediate_size


# (tokens, experts, top-k, D, F): the presets' MoE layers and a DeepSeek-like one; nano's
# few tokens take 64-row blocks, the others 128
LOWERING_SHAPES = {
    **{name: layer_shape(name, 4096) for name in ("tiny", "small", "medium")},
    "deepseek_like": (4096, 64, 6, 1024, 512),
    "nano_few_tokens": layer_shape("nano", 512),
}


@pytest.mark.parametrize("shape", LOWERING_SHAPES)
def test_experts_pallas_lowers_to_triton_forward_and_backward(shape):
    T, E, K, D, F = LOWERING_SHAPES[shape]
    f32 = jnp.float32
    experts = {
        "gate_proj": jax.ShapeDtypeStruct((E, D, F), f32),
        "up_proj": jax.ShapeDtypeStruct((E, D, F), f32),
        "down_proj": jax.ShapeDtypeStruct((E, F, D), f32),
    }
    idx = jax.ShapeDtypeStruct((T, K), jnp.int32)
    gate = jax.ShapeDtypeStruct((T, K), f32)

    def loss(experts, x, idx, gate):
        return jnp.sum(experts_pallas(experts, x, idx, gate, interpret=False).astype(f32) ** 2)

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3)))
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jax.ShapeDtypeStruct((T, D), dtype)
        text = lower_for_cuda(fwd_bwd, experts, x, idx, gate)
        # two forward gmms; a transposed gmm and a tgmm for each in the backward pass
        assert text.count("xla.gpu.triton") == 6, (shape, dtype)


def test_pallas_falls_back_to_dense_under_a_multi_device_mesh(nano_params, caplog):
    p = nano_params["layers"]["1"]["mlp"]
    x = jax.random.normal(jax.random.key(10), (2, 8, NANO.hidden_size))
    moe_module._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="dsjax.model.moe"), jax.set_mesh(jax.make_mesh((2,), ("dp",))):
        assert "multi-device mesh" in unsupported_reason(x)
        out_p = jax.jit(lambda p, x: moe_module.moe(p, x, NANO, "pallas")[0])(p, x)
        jax.jit(lambda p, x: moe_module.moe(p, x, NANO, "pallas")[0]).trace(p, x)  # traced again: no new line
        out_d = jax.jit(lambda p, x: moe_module.moe(p, x, NANO, "dense")[0])(p, x)
    np.testing.assert_array_equal(np.asarray(out_p), np.asarray(out_d))
    assert sum("using the dense path" in r.getMessage() for r in caplog.records) == 1
