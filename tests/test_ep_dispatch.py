"""Expert parallelism by all-to-all dispatch: equal to one device and to replicate-and-mask on every tested mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dsjax import model
from dsjax.cli import build_parser, resolve_run_config
from dsjax.config import ConfigError, config_from_dict, load_config
from dsjax.model import moe as moe_module
from dsjax.train.checkpoint import config_differences
from dsjax.train.step import logical_axes_for
from meshes import expert_parallel, pipeline, rules
from meshes.mesh import MeshShape, build_mesh, make_mesh, resolve_microbatches
from training_runs import twenty_steps

# Tolerance stated once: per-leaf relative error ||g_mesh - g_1|| / ||g_1|| in fp32.
GRAD_RTOL = 1e-5
# nano cut to 3 layers and no MTP module, to keep compiles short: 1 dense + 2 MoE layers of 8 experts
# (top-2), so ep8 holds one expert per shard and pp2 gets one MoE layer per stage
BASE = config_from_dict(
    {"model": {"num_hidden_layers": 3, "num_nextn_predict_layers": 0}, "training": {"batch_size": 8, "seq_len": 32}},
    load_config("nano"),
)
MESHES = {
    "ep2": {"ep": 2},
    "ep4": {"ep": 4},
    "ep8": {"ep": 8},
    "dp2_ep2_tp2": {"dp": 2, "ep": 2, "tp": 2},
    "pp2_ep2_sp2": {"pp": 2, "ep": 2, "sp": 2},  # dispatch inside the pipeline's shard_map (manual over pp)
}


def mesh_config(sizes):
    dist = {f"{a}_size": sizes.get(a, 1) for a in ("pp", "dp", "ep", "sp", "tp")}
    if sizes.get("pp", 1) > 1:
        dist["microbatches"] = 2
    return config_from_dict({"distributed": {**dist, "ep_dispatch": "all_to_all"}}, BASE)


def relative_error(a, b) -> float:
    return float(jnp.linalg.norm((a - b).ravel()) / (jnp.linalg.norm(b.ravel()) + 1e-30))


def assert_close_trees(got, ref, what):
    for (path, g_ref), g in zip(jax.tree.leaves_with_path(ref), jax.tree.leaves(got)):
        err = relative_error(g, g_ref) if float(jnp.abs(g_ref).max()) > 0 else float(jnp.abs(g).max())
        assert err <= GRAD_RTOL, f"{what}: {jax.tree_util.keystr(path)} differs by {err:.2e}"


@pytest.fixture(scope="module")
def reference():
    params = model.init(BASE.model, jax.random.key(0))
    window = jax.random.randint(jax.random.key(1), (8, 33), 0, BASE.model.vocab_size)
    (loss, metrics), grads = jax.jit(
        jax.value_and_grad(lambda p, w: model.loss_fn(p, w, BASE.model), has_aux=True)
    )(params, window)
    return params, window, float(loss), metrics["expert_load"], grads


def mesh_value_and_grad(config, params, window):
    """Loss, metrics and canonical-layout gradients on the config's mesh, under its ep_dispatch scheme."""
    n = int(np.prod([getattr(config.distributed, f"{a}_size") for a in ("pp", "dp", "ep", "sp", "tp")]))
    mesh, shape = build_mesh(config, jax.devices()[:n])
    first = config.model.first_k_dense_replace
    laid = pipeline.to_stages(params, first, shape.pp) if shape.pp > 1 else params
    shardings = rules.param_shardings(mesh, logical_axes_for(config, shape.pp), laid)
    tokens = jax.device_put(window, NamedSharding(mesh, PartitionSpec(("dp", "ep"), None)))
    M = resolve_microbatches(shape, config)
    loss_fn = expert_parallel.with_scheme(
        config.distributed.ep_dispatch, lambda p, w: model.loss_fn(p, w, config.model, microbatches=M)
    )
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), out_shardings=((None, None), shardings))
    with jax.set_mesh(mesh):
        (loss, metrics), grads = step(jax.device_put(laid, shardings), tokens)
    return loss, metrics, (pipeline.from_stages(grads, first) if shape.pp > 1 else grads)


@pytest.mark.parametrize("name", list(MESHES))
def test_dispatch_loss_gradients_and_loads_match_one_device(name, reference):
    params, window, ref_loss, ref_load, ref_grads = reference
    loss, metrics, grads = mesh_value_and_grad(mesh_config(MESHES[name]), params, window)
    assert abs(float(loss) - ref_loss) <= GRAD_RTOL * abs(ref_loss)
    np.testing.assert_array_equal(np.asarray(metrics["expert_load"]), np.asarray(ref_load))
    assert_close_trees(grads, ref_grads, name)


def _layer_case():
    """Random experts and tokens for one MoE layer (E=8, top-2, batch rows one per device of dp2 x ep4).

    Rows 0-3 (the dp=0 devices) all pick experts 0 and 1, which sit on ep shard 0: every copy of
    those shards goes to one destination, the capacity's worst case, filled exactly. Rows 4-7 route
    at random, so copies spread over all destinations.
    """
    E, D, F, B, T, K = 8, 16, 8, 8, 4, 2
    keys = jax.random.split(jax.random.key(5), 6)
    shapes = {"gate_proj": (E, D, F), "up_proj": (E, D, F), "down_proj": (E, F, D)}
    experts = {name: jax.random.normal(k, shape) * 0.3 for k, (name, shape) in zip(keys, shapes.items())}
    x_BTD = jax.random.normal(keys[3], (B, T, D))
    gate_BTK = jax.random.uniform(keys[4], (B, T, K), minval=0.1, maxval=1.0)
    random_BTK = jax.lax.top_k(jax.random.normal(keys[5], (B, T, E)), K)[1]
    one_shard_BTK = jnp.broadcast_to(jnp.array([1, 0], jnp.int32), (B, T, K))
    idx_BTK = jnp.where(jnp.arange(B)[:, None, None] < B // 2, one_shard_BTK, random_BTK)
    return experts, x_BTD, idx_BTK, gate_BTK


def test_dispatch_layer_equals_mask_and_one_device():
    """One MoE layer on dp2 x ep4: dispatch (dense, ragged, pallas receivers) == replicate-and-mask == one device.

    Output and every gradient (experts, tokens, gates). Half the shards send every token copy to
    one shard, so a buffer smaller than the documented capacity would drop tokens here.
    """
    experts, x_BTD, idx_BTK, gate_BTK = _layer_case()
    B, T, K = idx_BTK.shape
    E, D = experts["gate_proj"].shape[0], x_BTD.shape[-1]
    probe_BTD = jax.random.normal(jax.random.key(9), x_BTD.shape)

    def loss(run):
        return lambda ex, x, g: jnp.sum(run(ex, x, g) * probe_BTD)

    def one_device(ex, x, g):
        out_TD = moe_module._experts_dense(ex, x.reshape(B * T, D), idx_BTK.reshape(B * T, K), g.reshape(B * T, K))
        return out_TD.reshape(B, T, D)

    def mask(ex, x, g):
        combine_BTE = moe_module.combine_weights(idx_BTK.reshape(B * T, K), g.reshape(B * T, K), E).reshape(B, T, E)
        return expert_parallel.expert_parallel(moe_module.experts_masked, ex, x, combine_BTE)

    def dispatch(local_fn):
        return lambda ex, x, g: expert_parallel.expert_parallel_dispatch(local_fn, ex, x, idx_BTK, g)

    args = (experts, x_BTD, gate_BTK)
    ref = jax.jit(jax.value_and_grad(loss(one_device), argnums=(0, 1, 2)))(*args)
    mesh = make_mesh(MeshShape(dp=2, ep=4))
    with jax.set_mesh(mesh):
        placed = (
            jax.device_put(experts, NamedSharding(mesh, PartitionSpec("ep"))),
            *jax.device_put((x_BTD, gate_BTK), NamedSharding(mesh, PartitionSpec(("dp", "ep")))),
        )
        runs = {
            "mask": mask,
            "dispatch_dense": dispatch(moe_module._experts_dense),
            "dispatch_ragged": dispatch(moe_module._experts_ragged),
            "dispatch_pallas": dispatch(moe_module._experts_pallas),  # interpreted gmm on CPU
        }
        for what, run in runs.items():
            got = jax.jit(jax.value_and_grad(loss(run), argnums=(0, 1, 2)))(*placed)
            assert_close_trees(got, ref, what)
        # the schemes really differ in their collectives: dispatch exchanges, mask gathers and scatters
        dispatch_jaxpr = str(jax.make_jaxpr(runs["dispatch_dense"])(*placed))
        mask_jaxpr = str(jax.make_jaxpr(mask)(*placed))
    assert "all_to_all" in dispatch_jaxpr and "all_gather" not in dispatch_jaxpr
    assert "all_gather" in mask_jaxpr and "all_to_all" not in mask_jaxpr


def test_capacity_is_the_worst_case():
    # a token's top-k experts are distinct, so at most min(K, E_local) of its copies reach one shard
    assert expert_parallel.dispatch_capacity(tokens=64, top_k=2, local_experts=1) == 64
    assert expert_parallel.dispatch_capacity(tokens=64, top_k=2, local_experts=4) == 128
    assert expert_parallel.dispatch_capacity(tokens=64, top_k=8, local_experts=4) == 256


def test_twenty_training_steps_match_one_device_through_the_config_key(monkeypatch):
    """`distributed.ep_dispatch: all_to_all` reaches the model through make_train_step; the curve is one device's."""
    calls = []
    real = moe_module.expert_parallel_dispatch
    monkeypatch.setattr(moe_module, "expert_parallel_dispatch", lambda *a: calls.append(1) or real(*a))
    config = mesh_config(MESHES["ep2"])  # 2 devices: the cheapest mesh to step 20 times on CPU
    ref, _ = twenty_steps(BASE)
    mesh, _ = build_mesh(config, jax.devices()[:2])
    got, _ = twenty_steps(config, mesh)
    assert calls, "the train step did not trace the dispatch path"
    np.testing.assert_allclose(got, ref, rtol=GRAD_RTOL)
    assert ref[-1] < ref[0] - 1.0


def test_config_key_and_flag():
    args = build_parser().parse_args(["run", "--ep-size", "2", "--ep-dispatch", "all_to_all"])
    config = resolve_run_config(args)
    assert config.distributed.ep_dispatch == "all_to_all"
    assert resolve_run_config(build_parser().parse_args(["run"])).distributed.ep_dispatch == "mask"
    with pytest.raises(ConfigError, match=r"distributed.ep_dispatch: 'ragged' is not allowed; choose one of mask, all_to_"):
        config_from_dict({"distributed": {"ep_dispatch": "ragged"}})
    # a compute choice, not a model change: free to change on --resume
    saved = config_from_dict({"distributed": {"ep_dispatch": "mask"}}).to_dict()
    assert config_differences(saved, config_from_dict({"distributed": {"ep_dispatch": "all_to_all"}})) == []
