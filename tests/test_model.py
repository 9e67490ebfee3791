import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import model
from dsjax.model import mla
from dsjax.config import YarnConfig, load_config

NANO = load_config("nano", overrides={"model": {"num_nextn_predict_layers": 1}}).model  # MTP on: the preset has none
VARIANTS = {
    "nano": NANO,
    "q_lora": dataclasses.replace(NANO, q_lora_rank=48),
    "yarn": dataclasses.replace(
        NANO, rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=64, mscale=0.7, mscale_all_dim=1.0)
    ),
    "dense_tied": dataclasses.replace(NANO, n_routed_experts=0, tie_word_embeddings=True, num_nextn_predict_layers=0),
    "mtp2_softmax": dataclasses.replace(NANO, num_nextn_predict_layers=2, scoring_func="softmax", n_group=1),
}


@pytest.fixture(scope="module")
def nano_params():
    return model.init(NANO, jax.random.key(0))


def test_nano_shape_fits_every_test_mesh():
    t = load_config("nano").training
    assert NANO.num_hidden_layers % 4 == 0
    assert NANO.num_attention_heads % 4 == 0 and NANO.n_routed_experts % 4 == 0
    assert t.seq_len % 8 == 0 and t.batch_size % 8 == 0
    assert NANO.intermediate_size % 4 == 0 and NANO.moe_intermediate_size % 4 == 0


def test_causality(nano_params):
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, NANO.vocab_size)
    changed = tokens.at[:, 20:].set((tokens[:, 20:] + 7) % NANO.vocab_size)
    fwd = jax.jit(lambda p, x: model.forward(p, x, NANO)[0])
    a, b = fwd(nano_params, tokens), fwd(nano_params, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :20]), np.asarray(b[:, :20]))
    assert not np.allclose(np.asarray(a[:, 20:]), np.asarray(b[:, 20:]))


@pytest.mark.parametrize("layout", ["split", "fused"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_absorbed_decoding_equals_full_forward(name, layout):
    """Both cache layouts (`mla.decode_layout`: split on CPU, fused on GPU), each from plain params."""
    c = VARIANTS[name]
    params = model.init(c, jax.random.key(2))
    T = 24
    tokens = jax.random.randint(jax.random.key(3), (2, T), 0, c.vocab_size)
    full, _ = jax.jit(lambda p, x: model.forward(p, x, c))(params, tokens)
    step = jax.jit(lambda p, x, cache, start: model.decode_step(p, x, cache, start, c))
    cache = model.init_cache(c, batch=2, max_len=32, layout=layout)
    prefill, cache = step(params, tokens[:, :10], cache, 0)
    pieces = [prefill]
    for t in range(10, T):
        logits, cache = step(params, tokens[:, t : t + 1], cache, t)
        pieces.append(logits)
    cached = jnp.concatenate(pieces, axis=1)
    assert float(jnp.max(jnp.abs(cached - full))) <= 1e-5
    C, R, L = c.kv_lora_rank, c.qk_rope_head_dim, c.num_hidden_layers
    if layout == "fused":
        assert [a.shape for a in cache["latent"]] == [(2, 32, C + R)] * L
    else:
        assert [a.shape for a in cache["ckv"]] == [(2, 32, C)] * L and [a.shape for a in cache["kpe"]] == [(2, 32, R)] * L


@pytest.mark.parametrize("layout", ["split", "fused"])
def test_decode_layouts_and_the_cache_in_the_compute_dtype(layout):
    """bf16 compute, token after token. The bf16 cache gives bit for bit the logits and latents of an fp32
    cache. The decode layouts are the decode path's matrices made once and cast once, bit for bit; decoding
    with them gives the plain params' logits to bf16's resolution: from fp32 params XLA may drop a cast to
    bf16 and back (its default excess precision) and multiply by the fp32 weight, so bit for bit held for
    some layouts and not others."""
    c = dataclasses.replace(NANO, compute_dtype="bfloat16", max_position_embeddings=32, num_hidden_layers=2,
                            num_nextn_predict_layers=0, vocab_size=512)  # one dense and one MoE layer: enough
    params = model.init(c, jax.random.key(4))
    tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, c.vocab_size)
    step = jax.jit(lambda p, x, cache, start: model.decode_step(p, x, cache, start, c))  # one token a call: one compile
    laid_out = jax.jit(model.with_decode_layouts, static_argnums=(1, 2))(params, c, layout)
    assert {a.dtype for a in jax.tree.leaves(laid_out) if a.ndim >= 2} == {jnp.dtype(jnp.bfloat16)}
    attention = laid_out["layers"]["0"]["self_attn"]
    made_here = jax.jit(lambda p: mla.decode_weights(p, c, layout))(params["layers"]["0"]["self_attn"])
    for key in (mla.DECODE_IN, mla.DECODE_OUT if layout == "fused" else mla.DECODE_UV):
        np.testing.assert_array_equal(np.asarray(attention[key]), np.asarray(made_here[key].astype(jnp.bfloat16)))

    def run(p, cache_dtype):
        cache = model.init_cache(c, batch=2, max_len=32, dtype=cache_dtype, layout=layout)
        pieces = []
        for t in range(8):
            logits, cache = step(p, tokens[:, t : t + 1], cache, t)
            pieces.append(logits)
        return jnp.concatenate(pieces, axis=1), cache

    (want, fp32_cache), (got, bf16_cache) = run(params, jnp.float32), run(params, None)
    assert {a.dtype for a in jax.tree.leaves(bf16_cache)} == {jnp.dtype(jnp.bfloat16)}  # the default: compute dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for a, b in zip(jax.tree.leaves(bf16_cache), jax.tree.leaves(fp32_cache)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b))
    laid_out_logits, _ = run(laid_out, None)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(laid_out_logits), np.asarray(want), rtol=0, atol=2**-8 * scale)


@pytest.mark.parametrize("size", ["nano", "tiny", "small", "medium"])
def test_param_count_matches_closed_form(size):
    c = load_config(size).model
    counted = model.count_params(c)
    assert model.tree_size(model.abstract_params(c)) == counted["total"]
    no_mtp = dataclasses.replace(c, num_nextn_predict_layers=0)
    assert model.tree_size(model.abstract_params(no_mtp)) == counted["main"]
    assert counted["active"] < counted["main"]


@pytest.mark.parametrize("name", ["q_lora", "dense_tied"])
def test_param_count_variants(name):
    c = VARIANTS[name]
    assert model.tree_size(model.abstract_params(c)) == model.count_params(c)["total"]


def test_logical_axes_cover_every_param():
    c = VARIANTS["q_lora"]
    axes = model.logical_axes(c)
    shapes = model.abstract_params(c)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_axes) == len(flat_shapes)
    for a, s in zip(flat_axes, flat_shapes):
        assert len(a) == len(s.shape)
    assert axes["layers"]["1"]["mlp"]["experts"]["gate_proj"] == ("exp", "embed", "mlp")
    assert axes["layers"]["0"]["self_attn"]["q_a_proj"]["kernel"] == ("embed", "q_lora")
    assert axes["embed_tokens"]["embedding"] == ("vocab", "embed")


def test_nano_grad_is_finite_and_fast(nano_params):
    t = load_config("nano").training
    window = jax.random.randint(jax.random.key(4), (t.batch_size, t.seq_len + 1), 0, NANO.vocab_size)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, w: model.loss_fn(p, w, NANO), has_aux=True))
    start = time.perf_counter()
    (loss, metrics), grads = grad_fn(nano_params, window)
    jax.block_until_ready(grads)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"nano forward+backward compile+run took {elapsed:.1f}s"
    assert np.isfinite(float(loss))
    assert abs(float(metrics["ce_loss"]) - np.log(NANO.vocab_size)) < 0.1  # near-uniform at init
    # checked in numpy: eager jnp compiled a small program per leaf shape
    assert all(np.isfinite(g).all() for g in jax.device_get(jax.tree.leaves(grads)))
    # the routing bias only chooses experts: it gets no gradient
    assert float(jnp.abs(grads["layers"]["1"]["mlp"]["gate"]["e_score_correction_bias"]).max()) == 0.0
    assert float(jnp.abs(grads["mtp"]["0"]["eh_proj"]["kernel"]).max()) > 0.0
    assert metrics["expert_load"].shape == (len(model.moe_layer_paths(NANO)), NANO.n_routed_experts)


def test_tiny_grad_is_finite():
    c = load_config("tiny").model
    params = model.init(c, jax.random.key(5))
    window = jax.random.randint(jax.random.key(6), (2, 33), 0, c.vocab_size)
    (loss, _), grads = jax.jit(jax.value_and_grad(lambda p, w: model.loss_fn(p, w, c), has_aux=True))(params, window)
    assert np.isfinite(float(loss))
    # checked in numpy: eager jnp compiled a small program per leaf shape
    assert all(np.isfinite(g).all() for g in jax.device_get(jax.tree.leaves(grads)))


@pytest.mark.parametrize("size", ["small", "medium"])
def test_large_sizes_trace_without_allocating(size):
    c = load_config(size).model
    params = jax.eval_shape(lambda: model.init(c, jax.random.key(0)))
    assert model.tree_size(params) == model.count_params(c)["total"]
    window = jax.ShapeDtypeStruct((2, 65), jnp.int32)
    loss, _ = jax.eval_shape(lambda p, w: model.loss_fn(p, w, c), params, window)
    assert loss.shape == () and loss.dtype == jnp.float32


def test_bf16_compute_keeps_fp32_logits(nano_params):
    c = dataclasses.replace(NANO, compute_dtype="bfloat16")
    tokens = jax.random.randint(jax.random.key(7), (2, 16), 0, c.vocab_size)
    logits, _ = jax.jit(lambda p, x: model.forward(p, x, c))(nano_params, tokens)
    ref, _ = jax.jit(lambda p, x: model.forward(p, x, NANO))(nano_params, tokens)
    assert logits.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.05


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_gives_the_same_gradients(nano_params, policy):
    c = dataclasses.replace(NANO, remat=policy)
    window = jax.random.randint(jax.random.key(8), (2, 17), 0, c.vocab_size)
    g_ref = jax.jit(jax.grad(lambda p: model.loss_fn(p, window, NANO)[0]))(nano_params)
    g_remat = jax.jit(jax.grad(lambda p: model.loss_fn(p, window, c)[0]))(nano_params)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
