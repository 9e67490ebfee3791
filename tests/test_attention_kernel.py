"""Causal flash attention (kernels_pallas): the Pallas kernel against the jnp reference,
its Triton lowering for every GPU shape we train, and the model with --attention pallas."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dsjax import model
from dsjax.config import config_from_dict, load_config
from kernels_pallas import attention as attn
from kernels_pallas.attention import attention_reference, causal_attention, flash_attention
from meshes import rules
from meshes.mesh import build_mesh
from triton_lowering import lower_for_cuda

# Tolerances stated once. Kernel vs reference: fp32 max abs diff; bf16 ||a - ref|| / ||ref||
# against the fp32 reference on the same (bf16-rounded) inputs. Model: per-leaf relative error.
FP32_ABS = 2e-5
BF16_REL = 1e-2
MODEL_RTOL = 1e-5

# (B, H, T, S, Kq, Kv, q_offset, dtype, (block_q, block_k) or None = the per-shape defaults)
CASES = {
    "T1": (1, 2, 1, 1, 48, 32, 0, jnp.float32, None),
    # queries at positions 23..39 of 64 keys: keys 40.. have no query (empty dK/dV blocks)
    "T17_offset": (2, 2, 17, 64, 96, 64, 23, jnp.float32, None),
    "T200_192_blocks32x16": (1, 1, 200, 200, 192, 128, 0, jnp.float32, (32, 16)),
    "T128_blocks16x32_bf16": (3, 2, 128, 128, 48, 32, 0, jnp.bfloat16, (16, 32)),
    "T200_bf16": (1, 2, 200, 200, 96, 64, 0, jnp.bfloat16, None),
    "T128_offset_bf16": (2, 1, 128, 160, 96, 64, 32, jnp.bfloat16, (32, 32)),
}


def _inputs(B, H, T, S, Kq, Kv, dtype, seed=0):
    kq, kk, kv, ko = jax.random.split(jax.random.key(seed), 4)
    return (
        jax.random.normal(kq, (B, H, T, Kq), jnp.float32).astype(dtype),
        jax.random.normal(kk, (B, H, S, Kq), jnp.float32).astype(dtype),
        jax.random.normal(kv, (B, H, S, Kv), jnp.float32).astype(dtype),
        jax.random.normal(ko, (B, H, T, Kv), jnp.float32).astype(dtype),
    )


def _value_and_vjp(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_output_and_grads_match_reference(name):
    B, H, T, S, Kq, Kv, off, dtype, blocks = CASES[name]
    q, k, v, do = _inputs(B, H, T, S, Kq, Kv, dtype)
    scale = Kq**-0.5
    block_q, block_k = blocks or (None, None)
    kernel = jax.jit(lambda *a: _value_and_vjp(
        lambda q, k, v: flash_attention(
            q, k, v, scale, off, block_q=block_q, block_k=block_k, interpret=True, debug_poison=True
        ), *a))
    _assert_matches_reference(name, kernel(q, k, v, do), (q, k, v, do), scale, off)


def _assert_matches_reference(name, results, inputs, scale, off=0):
    """(out, dq, dk, dv) of a fast path against the fp32 reference on the same inputs."""
    dtype = inputs[0].dtype
    f32 = [x.astype(jnp.float32) for x in inputs]
    reference = jax.jit(lambda *a: _value_and_vjp(lambda q, k, v: attention_reference(q, k, v, scale, off), *a))
    for label, got, want in zip(("out", "dq", "dk", "dv"), results, reference(*f32)):
        assert got.dtype == dtype and got.shape == want.shape, label
        got = got.astype(jnp.float32)
        assert not bool(jnp.isnan(got).any()), f"{name}: {label} has elements never written"
        if dtype == jnp.float32:
            err = float(jnp.max(jnp.abs(got - want)))
            assert err <= FP32_ABS, f"{name}: {label} max abs diff {err:.2e}"
        else:
            err = float(jnp.linalg.norm((got - want).ravel()) / jnp.linalg.norm(want.ravel()))
            assert err <= BF16_REL, f"{name}: {label} relative diff {err:.2e}"


# (B, H, T, Kq, Kv, dtype, block_q): T 256 in blocks of 64 (CPU's default), uneven head dims
BLOCKED_CASES = {
    "T256_q64": (2, 2, 256, 48, 32, jnp.float32, 64),
    "T96_q32": (1, 3, 96, 96, 64, jnp.float32, 32),
    "T128_q64_bf16": (2, 2, 128, 48, 32, jnp.bfloat16, 64),
}


@pytest.mark.parametrize("name", list(BLOCKED_CASES))
def test_blocked_output_and_grads_match_reference(name):
    B, H, T, Kq, Kv, dtype, block_q = BLOCKED_CASES[name]
    q, k, v, do = _inputs(B, H, T, T, Kq, Kv, dtype)
    scale = Kq**-0.5
    blocked = jax.jit(lambda *a: _value_and_vjp(lambda q, k, v: attn.blocked_causal_attention(q, k, v, scale, block_q), *a))
    _assert_matches_reference(name, blocked(q, k, v, do), (q, k, v, do), scale)


def test_blocked_takes_only_unshifted_whole_sequences():
    """A query offset runs the reference (blocks assume queries start at key 0)."""
    q, k, v, _ = _inputs(1, 2, 64, 96, 48, 32, jnp.float32)
    got = causal_attention(q, k, v, 0.2, q_offset=32, impl="blocked")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(attention_reference(q, k, v, 0.2, 32)))


def _gpu_head_shapes():
    """(heads, qk head dim, v head dim) of every size we train, deduplicated by head dims."""
    shapes = {}
    for size in ("nano", "tiny", "small", "medium"):
        c = load_config(size).model
        shapes.setdefault((c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim), c.num_attention_heads)
    return [(h, kq, kv) for (kq, kv), h in shapes.items()]


def _lower_for_cuda(B, H, T, S, Kq, Kv, dtype, **kw):
    """Trace forward + backward and run the Pallas -> Triton lowering for CUDA (no GPU, no compile)."""
    q, k, v = (jax.ShapeDtypeStruct(s, dtype) for s in ((B, H, T, Kq), (B, H, S, Kq), (B, H, S, Kv)))
    off = jax.ShapeDtypeStruct((), jnp.int32)

    def loss(q, k, v, off):
        out = flash_attention(q, k, v, Kq**-0.5, off, interpret=False, **kw)
        return jnp.sum(out.astype(jnp.float32))

    text = lower_for_cuda(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), q, k, v, off)
    for name in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"):
        assert name in text, f"{name} missing from the CUDA lowering"


LOWERINGS = [(H, T, T, Kq, Kv, jnp.bfloat16) for H, Kq, Kv in _gpu_head_shapes() for T in (512, 2048)] + [
    (2, 200, 200, 96, 64, jnp.bfloat16),  # sequence padding, masked key block
    (2, 384, 384, 96, 64, jnp.bfloat16),  # whole-sequence refs that are not a power of two
    (2, 17, 17, 48, 32, jnp.bfloat16),  # tiny blocks (2 warps)
    (2, 256, 512, 192, 128, jnp.bfloat16),  # qk 256 after padding; queries a slice of the keys
    (2, 512, 512, 96, 64, jnp.float32),
]


@pytest.mark.parametrize("H,T,S,Kq,Kv,dtype", LOWERINGS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_triton_lowering_for_cuda(H, T, S, Kq, Kv, dtype):
    _lower_for_cuda(2, H, T, S, Kq, Kv, dtype)


def test_dispatch_auto_and_fallbacks(caplog):
    assert attn.resolve_impl("auto", "cpu") == "blocked"  # measured fastest on CPU
    assert attn.resolve_impl("auto", "gpu") == attn.AUTO_IMPL["gpu"] in attn.IMPLS
    assert attn.resolve_impl("auto", "tpu") == "xla"
    with pytest.raises(ValueError, match="attention impl 'flash' is not one of"):
        attn.resolve_impl("flash")
    q, k, v, _ = _inputs(1, 2, 8, 8, 48, 32, jnp.float32)
    want = attention_reference(q, k, v, 0.1)
    attn._logged.clear()
    with caplog.at_level(logging.WARNING, logger="kernels_pallas.attention"):
        for _ in range(2):  # cuDNN on a CPU: the reference, and one log line for the reason
            np.testing.assert_array_equal(np.asarray(causal_attention(q, k, v, 0.1, impl="cudnn")), np.asarray(want))
    assert [r.getMessage() for r in caplog.records] == [
        "attention: cudnn cannot run here (cuDNN needs a GPU); using the xla reference"
    ]


# --- the model ---------------------------------------------------------------------------------------

# nano with 2 of its 4 layers (one dense, one MoE, and the MTP block: every attention site) to keep compiles small
BASE = config_from_dict(
    {"model": {"num_hidden_layers": 2}, "training": {"batch_size": 2, "seq_len": 16}}, load_config("nano")
)


def _loss_and_grads(c, params, window):
    return jax.jit(jax.value_and_grad(lambda p, w: model.loss_fn(p, w, c)[0]))(params, window)


def _assert_close(got, want, label):
    loss, grads = got
    ref_loss, ref_grads = want
    assert abs(float(loss) - float(ref_loss)) <= MODEL_RTOL * abs(float(ref_loss)), label
    for (path, g_ref), g in zip(jax.tree.leaves_with_path(ref_grads), jax.tree.leaves(grads)):
        scale = float(jnp.linalg.norm(g_ref.ravel()))
        err = float(jnp.linalg.norm((g - g_ref).ravel())) / scale if scale > 0 else float(jnp.abs(g).max())
        assert err <= MODEL_RTOL, f"{label}: {jax.tree_util.keystr(path)} differs by {err:.2e}"


@pytest.fixture(scope="module")
def xla_reference():
    c = dataclasses.replace(BASE.model, attention_impl="xla")
    params = model.init(c, jax.random.key(0))
    window = jax.random.randint(jax.random.key(1), (2, 17), 0, c.vocab_size)
    return params, window, _loss_and_grads(c, params, window)


def test_nano_loss_and_every_gradient_pallas_equals_xla(xla_reference):
    params, window, want = xla_reference
    c = dataclasses.replace(BASE.model, attention_impl="pallas")
    _assert_close(_loss_and_grads(c, params, window), want, "pallas")


def test_nano_loss_and_every_gradient_blocked_equals_xla():
    """CPU's default path on a sequence of two 64-row blocks, the whole model and MTP."""
    c = dataclasses.replace(BASE.model, attention_impl="xla")
    params = model.init(c, jax.random.key(0))
    window = jax.random.randint(jax.random.key(1), (2, 129), 0, c.vocab_size)
    want = _loss_and_grads(c, params, window)
    _assert_close(_loss_and_grads(dataclasses.replace(c, attention_impl="blocked"), params, window), want, "blocked")


def test_sp2_tp2_mesh_with_the_kernel_equals_one_device(xla_reference):
    params, window, want = xla_reference
    config = config_from_dict(
        {"model": {"attention_impl": "pallas"}, "distributed": {"sp_size": 2, "tp_size": 2, "dp_size": 1}}, BASE
    )
    mesh, _ = build_mesh(config, jax.devices()[:4])
    shardings = rules.param_shardings(mesh, model.logical_axes(config.model), params)
    placed = jax.device_put(params, shardings)
    tokens = jax.device_put(window, NamedSharding(mesh, PartitionSpec(("dp", "ep"), None)))
    grad_fn = jax.value_and_grad(lambda p, w: model.loss_fn(p, w, config.model)[0])
    with jax.set_mesh(mesh):
        traced = jax.jit(grad_fn, out_shardings=(None, shardings)).trace(placed, tokens)
        got = traced.lower().compile()(placed, tokens)
    jaxpr = str(traced.jaxpr)
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr  # the kernel ran per shard, not a fallback
    _assert_close(got, want, "sp2 x tp2 pallas")
