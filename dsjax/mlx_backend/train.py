"""Training with MLX: the same data pipeline, objective, schedule, clipping, accumulation and bias update.

Parameters live as a flat dict path -> mx.array during training (paths join the
params tree's keys with '/'), so the decayed and non-decayed parameters can go to
two `mlx.optimizers.AdamW` instances (weight decay on matrices only, as on the
JAX side).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from dsjax.config import Config
from dsjax.mlx_backend import model as xm
from dsjax.schedule import learning_rate


def flatten(tree, prefix: str = "") -> dict[str, mx.array]:
    out = {}
    for key in sorted(tree):
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(tree[key], dict):
            out.update(flatten(tree[key], path))
        else:
            out[path] = tree[key]
    return out


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


class MLXTrainer:
    """One optimizer step = A micro-batches of gradients, clip, AdamW, MoE bias update."""

    def __init__(self, config: Config, params):
        self.config = config
        t = config.training
        self.params = flatten(xm.to_mlx(params))
        self.decayed = {k for k, v in self.params.items() if v.ndim >= 2}
        kwargs = dict(learning_rate=t.learning_rate, betas=[t.beta1, t.beta2], eps=1e-8, bias_correction=True)
        self.opt_decay = optim.AdamW(weight_decay=t.weight_decay, **kwargs)
        self.opt_plain = optim.AdamW(weight_decay=0.0, **kwargs)
        self.step = 0
        c = config.model

        def loss(flat, window):
            return xm.loss_fn(unflatten(flat), window, c)

        self._loss_and_grad = mx.value_and_grad(loss)

    def train_step(self, batch_ABT1: np.ndarray) -> dict[str, float]:
        t, c = self.config.training, self.config.model
        A = batch_ABT1.shape[0]
        grads_sum, metrics_sum = None, None
        for window in batch_ABT1:
            (_, metrics), grads = self._loss_and_grad(self.params, mx.array(window))
            grads_sum = grads if grads_sum is None else {k: grads_sum[k] + grads[k] for k in grads}
            metrics_sum = metrics if metrics_sum is None else {k: metrics_sum[k] + metrics[k] for k in metrics}
        grads = {k: g / A for k, g in grads_sum.items()}
        metrics = {k: m / A for k, m in metrics_sum.items()}
        # sum squares row by row first: one long fp32 reduction loses ~1e-4 on the embedding
        grad_norm = mx.sqrt(sum(mx.sum(mx.sum(g * g, axis=-1)) for g in grads.values()))
        if t.grad_clip > 0:  # optax.clip_by_global_norm: scale only when the norm exceeds the limit
            scale = mx.where(grad_norm < t.grad_clip, 1.0, t.grad_clip / grad_norm)
            grads = {k: g * scale for k, g in grads.items()}
        lr = learning_rate(t, self.step)
        self.opt_decay.learning_rate = lr
        self.opt_plain.learning_rate = lr
        decayed = {k: grads[k] for k in grads if k in self.decayed}
        plain = {k: grads[k] for k in grads if k not in self.decayed}
        new = dict(self.params)
        new.update(self.opt_decay.apply_gradients(decayed, {k: self.params[k] for k in decayed}))
        new.update(self.opt_plain.apply_gradients(plain, {k: self.params[k] for k in plain}))
        load = metrics.pop("expert_load")
        tree = xm.apply_bias_updates(unflatten(new), load, c)
        self.params = flatten(tree)
        out = {k: v for k, v in metrics.items()}
        if load.shape[0]:
            out["expert_imbalance"] = mx.mean(mx.max(load, axis=-1) / mx.mean(load, axis=-1))
        out["grad_norm"] = grad_norm
        out["lr"] = mx.array(lr)
        mx.eval(self.params, self.opt_decay.state, self.opt_plain.state, out)
        self.step += 1
        return {k: float(v) for k, v in out.items()}

    def params_numpy(self) -> dict:
        return unflatten({k: np.array(v) for k, v in self.params.items()})

    def eval_sums(self, windows: np.ndarray, byte_counts: np.ndarray, weight: np.ndarray) -> tuple[float, float, float]:
        c = self.config.model
        w = mx.array(windows)
        logits, _ = xm.forward(unflatten(self.params), w[:, :-1], c)
        nll = xm.token_cross_entropy(logits, w[:, 1:])
        wt = mx.array(weight)[:, None]
        nats = mx.sum(nll * wt)
        tokens = mx.sum(mx.ones_like(nll) * wt)
        text_bytes = mx.sum(mx.array(byte_counts[:, 1:].astype(np.float32)) * wt)
        mx.eval(nats, tokens, text_bytes)
        return float(nats), float(tokens), float(text_bytes)
