"""The 5D mesh: every tested layout gives the one-device loss and gradients; state is really sharded."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dsjax import model
from dsjax.cli import main
from dsjax.config import DistributedConfig, config_from_dict, load_config
from dsjax.train.step import init_state, state_shardings_for
from meshes import rules
from meshes.mesh import MeshError, MeshShape, build_mesh, resolve_shape, validate
from training_runs import twenty_steps

# Tolerance stated once: per-leaf relative error ||g_mesh - g_1|| / ||g_1|| in fp32.
GRAD_RTOL = 1e-5
# nano with its MTP module back on (the preset has none): the MTP head must match on every mesh too
BASE = config_from_dict(
    {"model": {"num_nextn_predict_layers": 1}, "training": {"batch_size": 8, "seq_len": 32}}, load_config("nano")
)
MESHES = {
    "dp8": {"dp": 8},
    "dp2_tp2_ep2": {"dp": 2, "tp": 2, "ep": 2},
    "dp2_ep2_sp2": {"dp": 2, "ep": 2, "sp": 2},
    "tp2_sp2_ep2": {"tp": 2, "sp": 2, "ep": 2},
    "dp2_ep4": {"dp": 2, "ep": 4},
    "tp2_sp4": {"tp": 2, "sp": 4},
    "tp2": {"tp": 2},
    "ep2": {"ep": 2},
    "sp4": {"sp": 4},
    "dp2_tp2": {"dp": 2, "tp": 2},
}


def mesh_config(sizes):
    dist = {f"{a}_size": sizes.get(a, 1) for a in ("pp", "dp", "ep", "sp", "tp")}
    return config_from_dict({"distributed": dist}, BASE)


@pytest.fixture(scope="module")
def reference():
    params = model.init(BASE.model, jax.random.key(0))
    window = jax.random.randint(jax.random.key(1), (8, 33), 0, BASE.model.vocab_size)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, w: model.loss_fn(p, w, BASE.model)[0]))(params, window)
    return params, window, float(loss), grads


def relative_error(a, b) -> float:
    return float(jnp.linalg.norm((a - b).ravel()) / (jnp.linalg.norm(b.ravel()) + 1e-30))


@pytest.mark.parametrize("name", list(MESHES))
def test_loss_and_every_gradient_match_one_device(name, reference):
    params, window, ref_loss, ref_grads = reference
    config = mesh_config(MESHES[name])
    n = int(np.prod(list(MESHES[name].values())))
    mesh, shape = build_mesh(config, jax.devices()[:n])
    shardings = rules.param_shardings(mesh, model.logical_axes(config.model), params)
    placed = jax.device_put(params, shardings)
    tokens = jax.device_put(window, NamedSharding(mesh, PartitionSpec(("dp", "ep"), None)))
    with jax.set_mesh(mesh):
        loss, grads = jax.jit(
            jax.value_and_grad(lambda p, w: model.loss_fn(p, w, config.model)[0]), out_shardings=(None, shardings)
        )(placed, tokens)
    assert abs(float(loss) - ref_loss) <= GRAD_RTOL * abs(ref_loss)
    flat_ref = jax.tree.leaves_with_path(ref_grads)
    for (path, g_ref), g in zip(flat_ref, jax.tree.leaves(grads)):
        err = relative_error(g, g_ref) if float(jnp.abs(g_ref).max()) > 0 else float(jnp.abs(g).max())
        assert err <= GRAD_RTOL, f"{name}: {jax.tree_util.keystr(path)} differs by {err:.2e}"


# tp2_sp2_ep2's curve runs with `-m slow` (CI budget); its loss and every gradient are checked above
@pytest.mark.parametrize("name", ["dp2_tp2_ep2", pytest.param("tp2_sp2_ep2", marks=pytest.mark.slow)])
def test_twenty_training_steps_match_one_device(name):
    config = mesh_config(MESHES[name])
    ref, _ = twenty_steps(BASE)
    mesh, _ = build_mesh(config)
    got, _ = twenty_steps(config, mesh)
    np.testing.assert_allclose(got, ref, rtol=GRAD_RTOL)
    assert ref[-1] < ref[0] - 1.0


def test_state_is_really_sharded():
    config = mesh_config(MESHES["dp2_tp2_ep2"])
    mesh, _ = build_mesh(config)
    shardings = state_shardings_for(config, mesh)
    state = jax.device_put(init_state(config, jax.random.key(0)), shardings)
    experts = state.params["layers"]["1"]["mlp"]["experts"]["gate_proj"]
    E, D, F = experts.shape
    assert experts.addressable_shards[0].data.shape == (E // 2, D, F // 2)  # ep and tp
    head = state.params["lm_head"]["kernel"]
    assert head.addressable_shards[0].data.shape == (128, 4096 // 2)  # vocab over tp
    adam = state.opt_state[1][0]  # (clip, adamw) -> adamw's ScaleByAdamState
    mu_head = adam.mu["lm_head"]["kernel"]
    assert mu_head.addressable_shards[0].data.shape == (128 // 2, 4096 // 2)  # + ZeRO over dp
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    per_device_params = rules.bytes_per_device(state.params, shardings.params)
    per_device_opt = rules.bytes_per_device(state.opt_state, shardings.opt_state)
    assert per_device_params < 0.6 * total
    assert per_device_opt < 0.35 * 2 * total  # two moments, split over dp as well
    # the arrays on the device are exactly what the sharding accounting says
    on_device0 = sum(
        s.data.nbytes for x in jax.tree.leaves(state.params) for s in x.addressable_shards if s.device == jax.devices()[0]
    )
    assert on_device0 == per_device_params


def test_mesh_validation_errors():
    nano = BASE
    with pytest.raises(MeshError, match=r"mesh pp=1 x dp=2 x ep=1 x sp=1 x tp=2 needs 4 devices but 8 are available"):
        resolve_shape(DistributedConfig(dp_size=2, tp_size=2), 8)
    with pytest.raises(MeshError, match=r"only one mesh size may be -1"):
        resolve_shape(DistributedConfig(dp_size=-1, tp_size=-1), 8)
    with pytest.raises(MeshError, match=r"cannot infer dp_size: the other sizes multiply to 3"):
        resolve_shape(DistributedConfig(dp_size=-1, tp_size=3), 8)
    assert resolve_shape(DistributedConfig(dp_size=-1, tp_size=2), 8) == MeshShape(dp=4, tp=2)
    cases = [
        (MeshShape(ep=3), r"n_routed_experts=8 is not divisible by ep_size=3"),
        (MeshShape(tp=3), r"num_attention_heads=4 is not divisible by tp_size=3"),
        (MeshShape(sp=3), r"seq_len=32 is not divisible by sp_size=3"),
        (MeshShape(dp=4, ep=4), r"batch_size=8 is not divisible by the data-parallel size dp\*ep=4\*4=16"),
        (MeshShape(pp=2), r"pp_size=2: the pipeline holds the 3 decoder layers .* do not split into 2 equal stages"),
    ]
    for shape, message in cases:
        with pytest.raises(MeshError, match=message):
            validate(shape, nano)
    wide = dataclasses.replace(nano, model=dataclasses.replace(nano.model, intermediate_size=390))
    with pytest.raises(MeshError, match=r"intermediate_size=390 is not divisible by tp_size=4"):
        validate(MeshShape(tp=4), wide)


def test_cli_reports_mesh_errors(capsys, tinystories_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default outputs/ and checkpoints/: a user's own run there is another error
    code = main(["run", "--stages", "pretrain", "--data-dir", str(tinystories_dir), "--tp-size", "3", "--dp-size", "1"])
    assert code == 2
    assert "num_attention_heads=4 is not divisible by tp_size=3" in capsys.readouterr().err
