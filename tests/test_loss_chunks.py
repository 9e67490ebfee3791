"""The memory-lean objective: head + cross-entropy in token chunks equals the full-logits one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import model
from dsjax.config import load_config
from dsjax.model.loss import _loss_from_logits, chunked_head_nll, loss_fn


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))


def test_chunked_loss_and_grads_equal_full_logits():
    config = load_config("nano", overrides={"model": {"compute_dtype": "float32", "vocab_size": 512, "num_nextn_predict_layers": 1}})
    c = config.model
    params = model.init(c, jax.random.key(0))
    windows = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (3, 21)), jnp.int32)

    # 60 tokens in chunks of 7: nine chunks, the last one padded
    chunked = jax.value_and_grad(lambda p: loss_fn(p, windows, c, chunk_tokens=7), has_aux=True)
    full = jax.value_and_grad(lambda p: _loss_from_logits(p, windows, c), has_aux=True)
    (loss_c, metrics_c), grads_c = jax.jit(chunked)(params)
    (loss_f, metrics_f), grads_f = jax.jit(full)(params)
    for key in ("loss", "ce_loss", "mtp_loss", "balance_loss"):
        assert abs(float(metrics_c[key]) - float(metrics_f[key])) <= 1e-6 * abs(float(metrics_f[key])), key
    for path, g_c, g_f in zip(
        jax.tree_util.tree_leaves_with_path(grads_c), jax.tree.leaves(grads_c), jax.tree.leaves(grads_f)
    ):
        assert _rel(g_c, g_f) <= 1e-6, jax.tree_util.keystr(path[0])


def test_chunked_loss_never_holds_whole_logits():
    # 1,024 tokens x 16,384 vocabulary: whole fp32 logits are 64 MiB (and their gradient as much again)
    config = load_config("nano", overrides={"model": {"compute_dtype": "float32", "vocab_size": 16384, "num_nextn_predict_layers": 1}})
    c = config.model
    params = jax.eval_shape(lambda: model.init(c, jax.random.key(0)))
    windows = jax.ShapeDtypeStruct((4, 257), jnp.int32)

    def temp_bytes(fn):
        compiled = jax.jit(jax.grad(lambda p, w: fn(p, w)[0])).lower(params, windows).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full = temp_bytes(lambda p, w: _loss_from_logits(p, w, c))
    chunked = temp_bytes(lambda p, w: loss_fn(p, w, c, chunk_tokens=128))
    assert chunked < full - 64 * 2**20, (chunked / 2**20, full / 2**20)


@pytest.mark.parametrize("one_pass", [False, True], ids=["cpu-softmax", "one-pass-softmax"])
def test_chunked_head_gradients_in_every_input_equal_autodiff_of_full_logits(one_pass, monkeypatch):
    # the gradients are made in the forward pass; every differentiable input is checked, the
    # per-token weights too (SFT's masks are inputs), with the CPU's softmax and the accelerators'
    from dsjax.model import loss
    from dsjax.model.layers import rms_norm
    from dsjax.model.loss import chunked_head_nll, token_cross_entropy

    monkeypatch.setattr(loss, "one_pass_softmax", lambda: one_pass)

    c = load_config("nano", overrides={"model": {"compute_dtype": "float32", "vocab_size": 300}}).model
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 13, c.hidden_size)), jnp.float32)
    scale = jnp.asarray(1 + 0.1 * rng.normal(size=c.hidden_size), jnp.float32)
    head = jnp.asarray(0.05 * rng.normal(size=(c.hidden_size, c.vocab_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, c.vocab_size, (2, 13)), jnp.int32)
    weight = jnp.asarray(rng.uniform(0, 2, (2, 13)), jnp.float32)

    def full(h, scale, head, weight):
        logits = jnp.dot(rms_norm(h, scale, c.rms_norm_eps), head, preferred_element_type=jnp.float32)
        return jnp.sum(token_cross_entropy(logits, targets) * weight)

    def chunked(h, scale, head, weight):
        return chunked_head_nll(h, scale, head, targets, weight, c, chunk_tokens=5)  # 6 chunks, the last padded

    value_f, grads_f = jax.value_and_grad(full, argnums=(0, 1, 2, 3))(h, scale, head, weight)
    value_c, grads_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3)))(h, scale, head, weight)
    assert abs(float(value_c) - float(value_f)) <= 1e-6 * abs(float(value_f))
    for name, g_c, g_f in zip(("hidden", "norm scale", "head", "weight"), grads_c, grads_f):
        assert _rel(g_c, g_f) <= 1e-6, name
    # not differentiated, the same value comes from the forward alone
    assert abs(float(jax.jit(chunked)(h, scale, head, weight)) - float(value_f)) <= 1e-6 * abs(float(value_f))


def test_bf16_head_chunk_by_chunk_matches_one_chunk_and_fp32():
    # bf16 heads take the same custom VJP as fp32 ones, with one chunk or several
    c = load_config("nano").model
    B, T, D, V = 3, 20, 128, 512
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (B, T, D), jnp.bfloat16)
    head = (jax.random.normal(k[1], (D, V)) * 0.05).astype(jnp.bfloat16)
    scale = (1 + 0.1 * jax.random.normal(k[2], (D,))).astype(jnp.bfloat16)
    targets = jax.random.randint(k[3], (B, T), 0, V)
    weights = jnp.ones((B, T)).at[0, :5].set(0.0)

    def value_and_grads(chunk_tokens, *inputs):
        nll = lambda h_, s_, w_: chunked_head_nll(h_, s_, w_, targets, weights, c, chunk_tokens=chunk_tokens)  # noqa: E731
        return jax.jit(jax.value_and_grad(nll, argnums=(0, 1, 2)))(*inputs)

    value_7, grads_7 = value_and_grads(7, h, scale, head)  # nine chunks, the last one padded
    value_1, grads_1 = value_and_grads(60, h, scale, head)  # one chunk
    _, grads_32 = value_and_grads(60, *(x.astype(jnp.float32) for x in (h, scale, head)))
    assert all(g.dtype == jnp.bfloat16 for g in grads_7)
    assert abs(float(value_7) - float(value_1)) <= 1e-6 * abs(float(value_1))
    # a token's d(hidden) comes from its own chunk: the same ops as one chunk
    assert _rel(grads_7[0].astype(jnp.float32), grads_1[0].astype(jnp.float32)) <= 1e-6
    # d(scale) and d(head) add nine partial sums and end in bf16: within two bf16 ulps (2^-7) of the fp32 gradient
    for g_7, g_32 in zip(grads_7[1:], grads_32[1:]):
        assert _rel(g_7.astype(jnp.float32), g_32) <= 2**-7


@pytest.mark.parametrize("head_gradient_dtype", ["float32", "compute"])
@pytest.mark.parametrize("one_pass", [False, True], ids=["cpu-softmax", "one-pass-softmax"])
def test_bf16_chunked_head_gradients_equal_autodiff_of_bf16_full_logits(one_pass, head_gradient_dtype, monkeypatch):
    # bf16 hidden states and head, fp32 logits: the same gradients as autodiff over whole logits,
    # here to the last bf16 bit of d(hidden) for most tokens. The logits' gradient is fp32 in both
    # (model.head_gradient_dtype float32), or rounded to bf16 before the head's backward matmuls in
    # both (compute: the reference rounds the logits' cotangent, as autodiff of bf16 logits does;
    # without that rounding in the reference, 75% of d(hidden) agree, not 99%)
    import dataclasses

    from dsjax.model import loss
    from dsjax.model.layers import rms_norm

    monkeypatch.setattr(loss, "one_pass_softmax", lambda: one_pass)
    c = dataclasses.replace(load_config("nano").model, head_gradient_dtype=head_gradient_dtype)

    @jax.custom_vjp
    def cotangent_in_compute_dtype(x):
        return x

    cotangent_in_compute_dtype.defvjp(lambda x: (x, None), lambda _, g: (g.astype(jnp.bfloat16).astype(g.dtype),))
    rounded = cotangent_in_compute_dtype if head_gradient_dtype == "compute" else (lambda x: x)
    B, T, D, V = 2, 24, 128, 384
    k = jax.random.split(jax.random.key(3), 4)
    h = jax.random.normal(k[0], (B, T, D), jnp.bfloat16)
    head = jax.random.normal(k[1], (D, V), jnp.float32) * 0.05  # fp32 parameters, bf16 compute
    scale = 1 + 0.1 * jax.random.normal(k[2], (D,), jnp.float32)
    targets = jax.random.randint(k[3], (B, T), 0, V)
    weights = jnp.ones((B, T), jnp.float32).at[1, :3].set(0.0)

    def full(h_, s_, w_):
        logits = jnp.dot(rms_norm(h_, s_, c.rms_norm_eps), w_.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return jnp.sum(loss.token_cross_entropy(rounded(logits), targets) * weights)

    def chunked(h_, s_, w_):
        return loss.chunked_head_nll(h_, s_, w_, targets, weights, c, chunk_tokens=10)  # 5 chunks, the last padded

    value_f, grads_f = jax.jit(jax.value_and_grad(full, argnums=(0, 1, 2)))(h, scale, head)
    value_c, grads_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(h, scale, head)
    assert abs(float(value_c) - float(value_f)) <= 1e-6 * abs(float(value_f))
    assert [g.dtype for g in grads_c] == [jnp.bfloat16, jnp.float32, jnp.float32]
    d_h_c, d_h_f = (g.astype(jnp.float32) for g in (grads_c[0], grads_f[0]))
    assert float(jnp.mean(d_h_c == d_h_f)) >= 0.99  # the same fp32 products, rounded to bf16 once
    assert _rel(d_h_c, d_h_f) <= 2**-9
    # autodiff rounds each chunk's d(head) to bf16 before adding (its cotangent's dtype); these add fp32
    for g_c, g_f in zip(grads_c[1:], grads_f[1:]):
        assert _rel(g_c, g_f) <= 2**-8


def test_default_chunks_are_even_within_the_budget(monkeypatch):
    from dsjax.model import loss

    monkeypatch.setattr(loss.jax, "default_backend", lambda: "gpu")
    assert loss.default_chunk_tokens(16384, 32000) == 4096  # 4 chunks of 4,096, not 4 of 4,194 and 392 padded
    for tokens, vocab, per_token in [(16384, 32000, 1), (65536, 32000, 1), (5000, 32000, 1), (4096, 8192, 1), (16384, 32000, 2), (1, 32000, 1)]:
        size = loss.default_chunk_tokens(tokens, vocab, per_token)
        chunks = -(-tokens // size)
        assert size * vocab * per_token <= loss.CHUNK_LOGITS or size == 1
        assert chunks == -(-tokens // min(tokens, loss.CHUNK_LOGITS // (vocab * per_token)))  # no more chunks than the budget needs
        assert chunks * size - tokens < chunks  # fewer padded tokens than chunks
    monkeypatch.setattr(loss.jax, "default_backend", lambda: "cpu")
    assert loss.default_chunk_tokens(4096, 4096) == 256 and loss.default_chunk_tokens(300, 4096) == 150


