"""Training objective: next-token cross-entropy + weighted MTP losses + sequence-wise balance loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.layers import rms_norm
from dsjax.model.transformer import forward, forward_hidden, head_kernel

# fp32 logits a chunk may hold: 2**27 values = 512 MiB (4,096 tokens at a 32,000 vocabulary)
CHUNK_LOGITS = 2**27
# on CPU, chunks of 256 tokens whatever the vocabulary: a chunk's logits then stay in cache, and
# the remade head matmul costs less than the memory traffic of whole logits (2-core CPU, head +
# cross-entropy forward + backward of 4,096 tokens: 128 -> 83 ms at vocab 4,096, 389 -> 305 ms
# at 8,192, 975 -> 854 ms at 32,000; smaller chunks were slower at 8,192 and 32,000; BENCHMARKS.md).
# With the fp32 gradients made in the forward pass (below), chunks of 128, 256 and 512 tokens
# measured within the machine's spread of each other at vocab 4,096 (78-124 ms).
CPU_CHUNK_TOKENS = 256


def default_chunk_tokens(n_tokens: int, vocab: int, logits_per_token: int = 1) -> int:
    """Tokens per chunk of the chunked head: a memory budget on accelerators, cache-sized on CPU.

    The fewest chunks within that size, made as even as they go: 16,384 tokens at a 32,000
    vocabulary run as 4 chunks of 4,096, not 4 of 4,194 with 392 padded tokens' logits made
    for nothing."""
    if jax.default_backend() == "cpu":
        most = CPU_CHUNK_TOKENS
    else:
        most = CHUNK_LOGITS // (logits_per_token * vocab)
    most = max(1, min(n_tokens, most))
    chunks = -(-n_tokens // most)
    return -(-n_tokens // chunks)


def token_cross_entropy(logits_BTV, targets_BT):
    """Per-token negative log-likelihood in nats (fp32)."""
    logits = logits_BTV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    if jax.sharding.get_abstract_mesh().empty:
        target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    else:
        # a masked sum instead of a gather: with the vocabulary split over tp, each shard
        # sums its own slice and one all-reduce finishes it (no shard gathers the logits)
        vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        target_logit = jnp.sum(jnp.where(vocab_ids == targets_BT[..., None], logits, 0.0), axis=-1)
    return log_z - target_logit


def chunked_head_nll(h_BTD, norm_scale, head_DV, targets_BT, weight_BT, c: ModelConfig, chunk_tokens: int | None = None):
    """sum(weight * nll) of norm + head + cross-entropy, without ever holding [B*T, V] logits.

    Tokens are split into chunks of `chunk_tokens`; each chunk's logits are made,
    reduced to its weighted NLL and dropped. When the value is differentiated, each
    chunk's gradients are made in the forward pass while its logits exist, so the
    backward pass remakes nothing (`_nll_with_gradients_in_forward`). Chunk size:
    `default_chunk_tokens`. Same value and gradients as autodiff of `token_cross_entropy`
    over full logits, in fp32 and bf16 (summation order aside).
    """
    B, T, D = h_BTD.shape
    V = head_DV.shape[1]
    N = B * T
    C = chunk_tokens or default_chunk_tokens(N, V)
    n = -(-N // C)
    pad = n * C - N
    h_ND = jnp.pad(h_BTD.reshape(N, D), ((0, pad), (0, 0)))
    t_N = jnp.pad(targets_BT.reshape(N), (0, pad))
    w_N = jnp.pad(weight_BT.reshape(N).astype(jnp.float32), (0, pad))  # padded tokens weigh 0

    chunks = (h_ND.reshape(n, C, D), t_N.reshape(n, C), w_N.reshape(n, C))
    return _nll_with_gradients_in_forward(
        chunks, norm_scale, head_DV, c.rms_norm_eps, one_pass_softmax(), c.head_gradient_dtype == "compute",
    )


def _summed_chunk_nll(chunks, norm_scale, head_DV, eps: float, one_pass: bool):
    """sum(w * nll) over the chunks (h_nCD, t_nC, w_nC), one chunk's logits at a time."""
    head_cD = head_DV.astype(chunks[0].dtype)  # cast once, not per chunk

    def body(total, chunk):
        h_CD, t_C, w_C = chunk
        logits_CV = jnp.dot(rms_norm(h_CD, norm_scale, eps), head_cD, preferred_element_type=jnp.float32)
        nll_C, _, _ = _chunk_nll(logits_CV, t_C, one_pass)
        return total + jnp.sum(nll_C * w_C), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
    return total


def one_pass_softmax() -> bool:
    """Whether `_chunk_nll` reads each chunk's logits once (accelerators) or as XLA:CPU runs fastest."""
    return jax.default_backend() != "cpu"


def _chunk_nll(logits_CV, t_C, one_pass: bool):
    """(nll_C, log_z_C1, is_target_CV) of one chunk's fp32 logits. Not differentiated (the custom VJP below is).

    one_pass: the row's max, the softmax's sum (rescaled whenever the max grows, as online
    softmax does) and the target's logit (a masked sum: exact, the rest adds zeros) from one
    reduction, so a GPU reads the logits once where logsumexp and a gather read them three
    times. XLA:CPU runs that reduction unvectorized: `nano`'s head + cross-entropy, forward +
    backward, measured 137-160 ms against 81-95 ms for logsumexp and a gather (2-core CPU)."""
    is_target_CV = jax.lax.broadcasted_iota(jnp.int32, logits_CV.shape, 1) == t_C[:, None]
    if not one_pass:
        log_z_C1 = jax.nn.logsumexp(logits_CV, axis=-1, keepdims=True)
        return log_z_C1[:, 0] - jnp.take_along_axis(logits_CV, t_C[:, None], axis=-1)[:, 0], log_z_C1, is_target_CV

    def combine(a, b):
        top = jnp.maximum(a[0], b[0])

        def rescaled(row_max, total):  # a sum of exp(x - row_max), moved to exp(x - top)
            return jnp.where(row_max == top, total, total * jnp.exp(row_max - top))  # -inf == -inf: no NaN

        return top, rescaled(a[0], a[1]) + rescaled(b[0], b[1]), a[2] + b[2]

    max_C, sum_C, target_logit_C = jax.lax.reduce(
        (logits_CV, jnp.ones_like(logits_CV), jnp.where(is_target_CV, logits_CV, 0.0)), (-jnp.inf, 0.0, 0.0),
        combine, (1,),
    )
    log_z_C1 = (max_C + jnp.log(sum_C))[:, None]
    return log_z_C1[:, 0] - target_logit_C, log_z_C1, is_target_CV


def _nll_with_gradients_in_forward(chunks, norm_scale, head_DV, eps: float, one_pass: bool, round_gradient: bool = False):
    """`chunked_head_nll`'s sum, its gradients made while each chunk's logits exist.

    The cross-entropy's gradient is known once a chunk's logits are: w * (softmax - onehot).
    So the forward pass also makes each chunk's d(hidden) and adds its d(head) and d(norm
    scale), and the backward pass only scales them by the incoming cotangent. Against
    autodiff, which remakes each chunk's logits in the backward pass, this saves one of the
    head's four matmuls and a second pass of softmax over the logits per chunk (nano's head +
    cross-entropy of 4,096 tokens, forward + backward, 2-core CPU: about 110 -> 87 ms).
    Used only when the value is differentiated (JAX runs `chunked_nll` alone otherwise).

    Logits, the softmax and the logits' gradient are fp32 in every dtype, and the two
    backward matmuls take that fp32 gradient, as autodiff of fp32 logits does: the same
    gradients as autodiff (bf16 hidden states and head included), without the remade
    logits (on the H200 target, with bf16 compute, the remade head moved about 57 of
    `small`'s 101 GB per step: BENCHMARKS.md). With round_gradient
    (`model.head_gradient_dtype: compute`) the gradient is rounded to the compute dtype
    before the two matmuls, as autodiff of compute-dtype logits upcast for the loss gives
    (PyTorch's autocast): bf16 GEMMs instead of TF32 ones on a GPU, and half the bytes.
    """

    @jax.custom_vjp
    def chunked_nll(h_nCD, t_nC, w_nC, norm_scale, head_DV):
        return _summed_chunk_nll((h_nCD, t_nC, w_nC), norm_scale, head_DV, eps, one_pass)

    def forward(h_nCD, t_nC, w_nC, norm_scale, head_DV):
        compute = h_nCD.dtype
        head_cD = head_DV.astype(compute)
        head_fD = head_cD.astype(jnp.float32)  # the compute dtype's values, for the fp32 backward matmuls

        def body(carry, chunk):
            total, d_head_DV, d_scale_D = carry
            h_CD, t_C, w_C = chunk
            normed_CD, norm_vjp = jax.vjp(lambda h, s: rms_norm(h, s, eps), h_CD, norm_scale)
            logits_CV = jnp.dot(normed_CD, head_cD, preferred_element_type=jnp.float32)
            nll_C, log_z_C1, is_target_CV = _chunk_nll(logits_CV, t_C, one_pass)
            # d(sum w * nll) / d logits = w * (softmax - onehot(target)), by default kept in fp32 for both
            # matmuls as autodiff keeps it (TF32 GEMMs on a GPU). Rounded to bf16 it adds little to bf16's
            # own gradient error (nano's README checkpoint: 2.070% against 2.064% for TF32) and to val
            # loss (+0.005 +- 0.007 after 100 bf16 steps, 14 seeds); its speed is unmeasured (BENCHMARKS.md)
            d_logits_CV = w_C[:, None] * (jnp.exp(logits_CV - log_z_C1) - is_target_CV)
            if round_gradient:  # compute-dtype GEMMs, fp32 sums
                d_logits_CV = d_logits_CV.astype(compute)
                d_h_CD = jnp.dot(d_logits_CV, head_cD.T, preferred_element_type=jnp.float32)
                d_head_chunk_DV = jnp.dot(normed_CD.T, d_logits_CV, preferred_element_type=jnp.float32)
            else:
                d_h_CD = jnp.dot(d_logits_CV, head_fD.T)
                d_head_chunk_DV = jnp.dot(normed_CD.astype(jnp.float32).T, d_logits_CV)
            d_h_CD, d_scale_D_chunk = norm_vjp(d_h_CD.astype(compute))
            carry = (total + jnp.sum(nll_C * w_C), d_head_DV + d_head_chunk_DV, d_scale_D + d_scale_D_chunk)
            return carry, (d_h_CD, nll_C)

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros(head_DV.shape, jnp.float32), jnp.zeros_like(norm_scale))
        (total, d_head_DV, d_scale_D), (d_h_nCD, nll_nC) = jax.lax.scan(body, zeros, (h_nCD, t_nC, w_nC))
        return total, (d_h_nCD, nll_nC, d_scale_D, d_head_DV.astype(head_DV.dtype), t_nC)

    def backward(saved, g):
        d_h_nCD, nll_nC, d_scale_D, d_head_DV, t_nC = saved
        no_gradient = np.zeros(t_nC.shape, jax.dtypes.float0)  # integer targets
        def scaled(d):
            return (g * d.astype(jnp.float32)).astype(d.dtype)

        return scaled(d_h_nCD), no_gradient, g * nll_nC, scaled(d_scale_D), scaled(d_head_DV)

    chunked_nll.defvjp(forward, backward)
    h_nCD, t_nC, w_nC = chunks
    return chunked_nll(h_nCD, t_nC, w_nC, norm_scale, head_DV)


def chunked_head_kl(
    h_BTD, norm_scale, head_DV, teacher_h_BTD, teacher_norm_scale, teacher_head_DV, weight_BT, temperature: float,
    c: ModelConfig, teacher_c: ModelConfig, chunk_tokens: int | None = None,
):
    """sum(weight * KL(teacher_T || student_T)) per token, in token chunks like `chunked_head_nll`.

    Both heads' logits are divided by the temperature; the teacher's are cut off from the
    gradient. Neither model's [tokens, vocab] logits ever exist whole: each chunk's are
    made, reduced to its weighted KL and dropped (and remade in the backward pass).
    """
    B, T, D = h_BTD.shape
    V = head_DV.shape[1]
    N = B * T
    C = chunk_tokens or default_chunk_tokens(N, V, logits_per_token=2)  # two models' logits per chunk
    n = -(-N // C)
    pad = n * C - N
    h_ND = jnp.pad(h_BTD.reshape(N, D), ((0, pad), (0, 0)))
    th_ND = jnp.pad(teacher_h_BTD.reshape(N, teacher_h_BTD.shape[-1]), ((0, pad), (0, 0)))
    w_N = jnp.pad(weight_BT.reshape(N).astype(jnp.float32), (0, pad))

    def chunk_kl(h_CD, th_CD, w_C):
        student = jnp.dot(
            rms_norm(h_CD, norm_scale, c.rms_norm_eps), head_DV.astype(h_CD.dtype), preferred_element_type=jnp.float32
        )
        teacher = jnp.dot(
            rms_norm(th_CD, teacher_norm_scale, teacher_c.rms_norm_eps), teacher_head_DV.astype(th_CD.dtype),
            preferred_element_type=jnp.float32,
        )
        log_p_student = jax.nn.log_softmax(student / temperature, axis=-1)
        log_p_teacher = jax.lax.stop_gradient(jax.nn.log_softmax(teacher / temperature, axis=-1))
        kl_C = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
        return jnp.sum(kl_C * w_C)

    chunk_fn = jax.checkpoint(chunk_kl) if n > 1 else chunk_kl

    def body(total, chunk):
        return total + chunk_fn(*chunk), None

    chunks = (h_ND.reshape(n, C, D), th_ND.reshape(n, C, th_ND.shape[-1]), w_N.reshape(n, C))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
    return total


def loss_fn(
    params, window_BT1, c: ModelConfig, *, with_mtp: bool = True, moe_impl: str = "auto", microbatches: int = 1,
    chunk_tokens: int | None = None, weight_BT=None, extra_term=None,
):
    """window_BT1: packed token windows of length T + 1. Returns (loss, metrics).

    weight_BT (optional): per-target weights, e.g. 1 on response tokens and 0 on the prompt
    and padding for SFT; each loss is then the weighted mean over the tokens it predicts.
    None (pretraining) = every token, the plain mean.

    extra_term (optional): extra_term(h_BTD, head_DV, inputs_BT, weight_BT, ce)
    -> (value added to the loss, metrics); distillation's KL term (dsjax.distill).

    `microbatches` is the pipeline's microbatch count (used only when params hold pp stages).
    On one device the head and cross-entropy run in token chunks (`chunked_head_nll`), so
    the [tokens, vocab] fp32 logits never exist whole; under a mesh the logits are already
    split (vocab over tp, tokens over dp/sp) and the plain path keeps its sharding.
    """
    if not jax.sharding.get_abstract_mesh().empty:
        return _loss_from_logits(
            params, window_BT1, c, with_mtp=with_mtp, moe_impl=moe_impl, microbatches=microbatches, weight_BT=weight_BT,
            extra_term=extra_term,
        )
    inputs_BT, targets_BT = window_BT1[:, :-1], window_BT1[:, 1:]
    B, T = inputs_BT.shape
    use_mtp = with_mtp and c.num_nextn_predict_layers > 0
    h_BTD, aux = forward_hidden(params, inputs_BT, c, with_mtp=use_mtp, moe_impl=moe_impl, microbatches=microbatches)
    head_DV = head_kernel(params, c)
    weight_BT = jnp.ones((B, T), jnp.float32) if weight_BT is None else weight_BT.astype(jnp.float32)
    nll = chunked_head_nll(h_BTD, params["norm"]["scale"], head_DV, targets_BT, weight_BT, c, chunk_tokens)
    ce = nll / _weight_total(weight_BT)
    loss = ce + aux["balance_loss"]
    metrics = {"ce_loss": ce, "balance_loss": aux["balance_loss"], "expert_load": aux["expert_load"]}
    if extra_term is not None:
        added, extra_metrics = extra_term(h_BTD, head_DV, inputs_BT, weight_BT, ce)
        loss = loss + added
        metrics.update(extra_metrics)
    if use_mtp:
        mtp_losses = []
        for k, (name, h_k) in enumerate(zip(sorted(params["mtp"], key=int), aux["mtp_hidden"]), start=1):
            shifted_BT, valid_BT = mtp_targets(targets_BT, weight_BT, k)
            norm_scale = params["mtp"][name]["shared_head_norm"]["scale"]
            nll = chunked_head_nll(h_k, norm_scale, head_DV, shifted_BT, valid_BT, c, chunk_tokens)
            mtp_losses.append(nll / _weight_total(valid_BT) if T > k else jnp.zeros((), jnp.float32))
        mtp_loss = jnp.mean(jnp.stack(mtp_losses))  # = sum_k / D
        loss = loss + c.mtp_loss_weight * mtp_loss
        metrics["mtp_loss"] = mtp_loss
    metrics["loss"] = loss
    return loss, metrics


def _weight_total(weight_BT):
    """The normaliser of a weighted mean (at least 1, so a batch without a weighted token gives 0, not NaN)."""
    return jnp.maximum(jnp.sum(weight_BT), 1.0)


def mtp_targets(targets_BT, weight_BT, k: int):
    """(targets, weights) of MTP module k: at position i it predicts token i + k + 1 = targets[i + k].

    The last k positions have no such token (weight 0); elsewhere the weight is that target's own.
    """
    T = targets_BT.shape[1]
    shifted_BT = jnp.roll(targets_BT, -k, axis=1)
    valid_BT = jnp.roll(weight_BT, -k, axis=1) * (jnp.arange(T) < T - k).astype(jnp.float32)
    return shifted_BT, valid_BT


def _loss_from_logits(
    params, window_BT1, c: ModelConfig, *, with_mtp: bool = True, moe_impl: str = "auto", microbatches: int = 1,
    weight_BT=None, extra_term=None,
):
    """The objective over whole logits (the reference `chunked_head_nll` is tested against; mesh path)."""
    inputs_BT, targets_BT = window_BT1[:, :-1], window_BT1[:, 1:]
    use_mtp = with_mtp and c.num_nextn_predict_layers > 0
    logits_BTV, aux = forward(
        params, inputs_BT, c, with_mtp=use_mtp, moe_impl=moe_impl, microbatches=microbatches,
        keep_hidden=extra_term is not None,
    )
    nll_BT = token_cross_entropy(logits_BTV, targets_BT)
    if weight_BT is None:
        ce = jnp.mean(nll_BT)
        weight_BT = jnp.ones(nll_BT.shape, jnp.float32)
    else:
        weight_BT = weight_BT.astype(jnp.float32)
        ce = jnp.sum(nll_BT * weight_BT) / _weight_total(weight_BT)
    loss = ce + aux["balance_loss"]
    metrics = {"ce_loss": ce, "balance_loss": aux["balance_loss"], "expert_load": aux["expert_load"]}
    if extra_term is not None:
        added, extra_metrics = extra_term(aux["hidden"], head_kernel(params, c), inputs_BT, weight_BT, ce)
        loss = loss + added
        metrics.update(extra_metrics)
    if use_mtp:
        depth = c.num_nextn_predict_layers
        mtp_losses = []
        for k in range(1, depth + 1):
            shifted_BT, valid_BT = mtp_targets(targets_BT, weight_BT, k)
            nll_BT = token_cross_entropy(aux["mtp_logits"][k - 1], shifted_BT)
            mtp_losses.append(jnp.sum(nll_BT * valid_BT) / _weight_total(valid_BT))
        mtp_loss = jnp.mean(jnp.stack(mtp_losses))  # = sum_k / D
        loss = loss + c.mtp_loss_weight * mtp_loss
        metrics["mtp_loss"] = mtp_loss
    metrics["loss"] = loss
    return loss, metrics
