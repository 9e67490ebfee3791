import dataclasses

import jax
import pytest
import jax.numpy as jnp
import numpy as np

from dsjax import model
from dsjax.config import load_config
from dsjax.model.moe import (
    DECODE_IN, DECODE_OUT, balance_loss, bias_update, combine_weights, decode_weights, moe, moe_decode, route, route_combine,
    top_k_mask,
)

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


def test_top_k_mask_picks_what_lax_top_k_picks_ties_included():
    # small integers: many ties, which lax.top_k breaks toward the lower index
    values = jax.random.randint(jax.random.key(9), (400, 8), 0, 4).astype(jnp.float32)
    values = values.at[:50, :3].set(-jnp.inf)  # masked entries (dropped groups) tie too
    for k in (1, 2, 3, 8):
        _, idx = jax.lax.top_k(values, k)
        want = np.zeros(values.shape, bool)
        np.put_along_axis(want, np.asarray(idx), True, axis=-1)
        np.testing.assert_array_equal(np.asarray(top_k_mask(values, k)), want)


def _route_by_sorts(logits_TE, bias_E, c):
    """The reference routing, by lax.top_k and a scatter (as `route` was written first)."""
    scores_TE = jax.nn.sigmoid(logits_TE) if c.scoring_func == "sigmoid" else jax.nn.softmax(logits_TE, axis=-1)
    choice_TE = scores_TE + bias_E
    T, E = choice_TE.shape
    if c.n_group > 1:
        grouped_TGe = choice_TE.reshape(T, c.n_group, E // c.n_group)
        _, best_groups = jax.lax.top_k(jax.lax.top_k(grouped_TGe, 2)[0].sum(-1), c.topk_group)
        keep_TG = jnp.zeros((T, c.n_group), bool).at[jnp.arange(T)[:, None], best_groups].set(True)
        choice_TE = jnp.where(jnp.repeat(keep_TG, E // c.n_group, axis=1), choice_TE, -jnp.inf)
    _, idx_TK = jax.lax.top_k(choice_TE, c.num_experts_per_tok)
    gate_TK = jnp.take_along_axis(scores_TE, idx_TK, axis=-1)
    if c.norm_topk_prob:
        gate_TK = gate_TK / (gate_TK.sum(-1, keepdims=True) + 1e-20)
    return idx_TK, gate_TK * c.routed_scaling_factor


@pytest.mark.parametrize("variant", ["grouped", "softmax_ungrouped", "unnormalised"])
def test_sort_free_routing_equals_routing_by_sorts(variant):
    c = {
        "grouped": GROUPED,
        "softmax_ungrouped": dataclasses.replace(NANO, scoring_func="softmax", n_group=1, topk_group=1),
        "unnormalised": dataclasses.replace(GROUPED, norm_topk_prob=False),
    }[variant]
    logits = jax.random.normal(jax.random.key(10), (512, 8)) * 2
    logits = logits.at[:64, 4:].set(logits[:64, :4])  # tied choices across groups in 64 rows
    half = jax.random.normal(jax.random.key(11), (4,)) * 0.1
    bias = jnp.concatenate([half, half])
    want_idx, want_gate = _route_by_sorts(logits, bias, c)
    # training's route: the same experts in the same order and the same gates, bit for bit
    idx, gate, _ = route(logits, bias, c)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
    np.testing.assert_array_equal(np.asarray(gate), np.asarray(want_gate))
    # decoding's: the same experts; the gates' normalising sum runs over experts in index order, not top-k order
    want = combine_weights(want_idx, want_gate, 8)
    got = route_combine(logits, bias, c)
    np.testing.assert_array_equal(np.asarray(got) != 0, np.asarray(want) != 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=0)


def test_decoding_moe_equals_the_dense_path_from_plain_and_laid_out_params():
    c = GROUPED
    p = model.init(c, jax.random.key(12))["layers"]["2"]["mlp"]
    x = jax.random.normal(jax.random.key(13), (3, 1, c.hidden_size))
    want = moe(p, x, c, "dense")[0]
    np.testing.assert_allclose(np.asarray(moe_decode(p, x, c)), np.asarray(want), rtol=1e-5, atol=1e-6)
    laid_out = decode_weights(p)
    E, D, F = p["experts"]["gate_proj"].shape
    Fs = p["shared_experts"]["gate_proj"]["kernel"].shape[1]
    assert laid_out[DECODE_IN].shape == (D, E + 2 * Fs + 2 * E * F)
    assert laid_out[DECODE_OUT].shape == (Fs + E * F, D)
    np.testing.assert_array_equal(np.asarray(moe_decode(laid_out, x, c)), np.asarray(moe_decode(p, x, c)))
    # many tokens, or a chosen path: moe's own path
    many = jax.random.normal(jax.random.key(14), (2, 512, c.hidden_size))
    np.testing.assert_array_equal(np.asarray(moe_decode(p, many, c)), np.asarray(moe(p, many, c)[0]))
