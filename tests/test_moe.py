import dataclasses

import jax
import pytest
import jax.numpy as jnp
import numpy as np

from dsjax import model
from dsjax.config import load_config
from dsjax.model.moe import balance_loss, bias_update, moe, route

NANO = load_config("nano").model
# 8 experts in 4 groups of 2; 2 groups kept; top-3
GROUPED = dataclasses.replace(NANO, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)


def test_chosen_experts_respect_group_limits():
    logits = jax.random.normal(jax.random.key(0), (512, 8)) * 3
    bias = jax.random.normal(jax.random.key(1), (8,))
    idx, _, _ = route(logits, bias, GROUPED)
    groups = np.asarray(idx) // 2
    assert max(len(set(row)) for row in groups) <= GROUPED.topk_group
    # the kept groups are the ones with the best top-2 biased sums
    choice = np.asarray(jax.nn.sigmoid(logits) + bias).reshape(512, 4, 2)
    best = np.argsort(-np.sort(choice, axis=-1)[..., -2:].sum(-1), axis=-1)[:, :2]
    for row_groups, row_best in zip(groups, best):
        assert set(row_groups) <= set(row_best)


def test_bias_changes_selection_but_not_gate_values():
    logits = jax.random.normal(jax.random.key(2), (256, 8))
    idx0, gate0, _ = route(logits, jnp.zeros(8), GROUPED)
    bias = jnp.zeros(8).at[0].set(10.0)  # expert 0 now always wins selection
    idx1, gate1, scores = route(logits, bias, GROUPED)
    assert bool(jnp.all(jnp.any(idx1 == 0, axis=-1)))
    assert not np.array_equal(np.asarray(idx0), np.asarray(idx1))
    chosen = jnp.take_along_axis(jax.nn.sigmoid(logits), idx1, axis=-1)
    expected = chosen / chosen.sum(-1, keepdims=True) * GROUPED.routed_scaling_factor
    np.testing.assert_allclose(np.asarray(gate1), np.asarray(expected), rtol=1e-6)


def test_normalised_gates_sum_to_scaling_factor():
    logits = jax.random.normal(jax.random.key(3), (128, 8))
    _, gate, _ = route(logits, jnp.zeros(8), GROUPED)
    np.testing.assert_allclose(np.asarray(gate.sum(-1)), 2.5, rtol=1e-6)
    unnormed = dataclasses.replace(GROUPED, norm_topk_prob=False, routed_scaling_factor=1.0)
    _, gate_raw, _ = route(logits, jnp.zeros(8), unnormed)
    assert float(jnp.max(gate_raw.sum(-1))) < 3.0 and not np.allclose(np.asarray(gate_raw.sum(-1)), 1.0)


def test_balance_loss_matches_hand_computation():
    c = dataclasses.replace(NANO, n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1, aux_loss_alpha=0.5)
    # one sequence, 2 tokens, 2 experts
    scores = jnp.array([[[0.6, 0.2], [0.3, 0.3]]])
    idx = jnp.array([[[0], [1]]])
    # s' = [[.75,.25],[.5,.5]] -> P = [.625, .375]; counts [1,1] -> f = E/(K T) * counts = [1, 1]
    expected = 0.5 * (1 * 0.625 + 1 * 0.375)
    np.testing.assert_allclose(float(balance_loss(scores, idx, c)), expected, rtol=1e-6)
    idx_skewed = jnp.array([[[0], [0]]])  # f = [2, 0]
    np.testing.assert_allclose(float(balance_loss(scores, idx_skewed, c)), 0.5 * 2 * 0.625, rtol=1e-6)


def test_bias_update_moves_load_toward_uniform():
    c = NANO
    params = model.init(c, jax.random.key(4))
    p = params["layers"]["1"]["mlp"]
    # skew the router so a few experts take most tokens: inputs with a positive mean
    # meet columns with growing means, so logits rise with the expert index
    p["gate"]["kernel"] = p["gate"]["kernel"] + jnp.linspace(0, 0.01, 8)[None, :]
    x = 1.0 + jax.random.normal(jax.random.key(5), (4, 64, c.hidden_size))
    run = jax.jit(lambda p: moe(p, x, c)[2])
    loads = [run(p)]
    for _ in range(40):
        p["gate"]["e_score_correction_bias"] = bias_update(p["gate"]["e_score_correction_bias"], loads[-1], 0.01)
        loads.append(run(p))
    spread = [float(jnp.max(l) - jnp.min(l)) for l in loads]
    # sign updates oscillate around balance, so compare the settled average with the start
    assert np.mean(spread[-10:]) < 0.5 * spread[0], spread


def test_apply_bias_updates_touches_every_router_and_nothing_else():
    params = model.init(NANO, jax.random.key(6))
    paths = model.moe_layer_paths(NANO)
    load = jnp.tile(jnp.array([0.5, 0.5, 0, 0, 0, 0, 0, 0]), (len(paths), 1))
    new = model.apply_bias_updates(params, load, NANO)
    for path in paths:
        node = new
        for k in path:
            node = node[k]
        b = np.asarray(node["gate"]["e_score_correction_bias"])
        assert b[0] < 0 and b[2] > 0
    assert float(jnp.abs(params["layers"]["1"]["mlp"]["gate"]["e_score_correction_bias"]).max()) == 0.0
    np.testing.assert_array_equal(new["layers"]["0"]["mlp"]["gate_proj"]["kernel"], params["layers"]["0"]["mlp"]["gate_proj"]["kernel"])


@pytest.mark.parametrize("impl", ["ragged", "blocked"])
def test_dense_and_sparse_expert_paths_agree(impl):
    c = GROUPED
    params = model.init(c, jax.random.key(7))["layers"]["2"]["mlp"]
    x = jax.random.normal(jax.random.key(8), (2, 16, c.hidden_size))

    def loss(impl):
        return lambda p: jnp.sum(moe(p, x, c, impl)[0] ** 2)

    out_d, _, load_d = moe(params, x, c, "dense")
    out_r, _, load_r = moe(params, x, c, impl)
    np.testing.assert_allclose(np.asarray(out_d), np.asarray(out_r), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(load_d), np.asarray(load_r))
    g_d, g_r = jax.grad(loss("dense"))(params), jax.grad(loss(impl))(params)
    for a, b in zip(jax.tree.leaves(g_d), jax.tree.leaves(g_r)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
