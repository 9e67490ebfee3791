"""Pipeline parallelism: every tested pp mesh gives the one-device loss and gradients; the schedule overlaps stages."""

import csv
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dsjax import model
from dsjax.cli import main
from dsjax.config import config_from_dict, load_config
from dsjax.train.optimizer import decay_mask
from dsjax.train.step import (
    abstract_state,
    canonical_state,
    init_state,
    logical_axes_for,
    staged_state,
    state_shardings_for,
)
from meshes import pipeline, rules
from meshes.mesh import MeshError, MeshShape, build_mesh, resolve_microbatches, validate
from training_runs import twenty_steps

# Tolerance stated once: per-leaf relative error ||g_pp - g_1|| / ||g_1|| in fp32 (as for the other mesh axes).
GRAD_RTOL = 1e-5
TRAINING = {"batch_size": 8, "seq_len": 32}
# MTP on (the nano preset has none), as it runs after the pipeline; nano keeps 1 dense layer before the pipeline, leaving 3 staged layers (pp3, the seed guide's shape);
# nano5 has 4 staged layers, for pp2 and pp4
VARIANTS = {
    "nano": config_from_dict({"model": {"num_nextn_predict_layers": 1}, "training": TRAINING}, load_config("nano")),
    "nano5": config_from_dict(
        {"model": {"num_hidden_layers": 5, "num_nextn_predict_layers": 1}, "training": TRAINING}, load_config("nano")
    ),
}
CASES = {  # name: (variant, mesh sizes, microbatches, layer groups per stage: 1 = GPipe, 2 = circular)
    "pp2_m2": ("nano5", {"pp": 2}, 2, 1),
    "pp2_m8": ("nano5", {"pp": 2}, 8, 1),
    "pp4_m4": ("nano5", {"pp": 4}, 4, 1),
    "pp2_dp2_tp2_m4": ("nano5", {"pp": 2, "dp": 2, "tp": 2}, 4, 1),
    "pp2_ep2_sp2_m2": ("nano5", {"pp": 2, "ep": 2, "sp": 2}, 2, 1),
    "pp4_dp2_m4": ("nano5", {"pp": 4, "dp": 2}, 4, 1),
    "pp3_m4": ("nano", {"pp": 3}, 4, 1),
    "pp2_r2_m2": ("nano5", {"pp": 2}, 2, 2),
    "pp2_r2_m8": ("nano5", {"pp": 2}, 8, 2),
    "pp2_dp2_tp2_r2_m4": ("nano5", {"pp": 2, "dp": 2, "tp": 2}, 4, 2),
    "pp2_ep2_sp2_r2_m2": ("nano5", {"pp": 2, "ep": 2, "sp": 2}, 2, 2),
}


def case_config(variant, sizes, microbatches, repeats=1):
    dist = {f"{a}_size": sizes.get(a, 1) for a in ("pp", "dp", "ep", "sp", "tp")}
    return config_from_dict(
        {"distributed": {**dist, "microbatches": microbatches, "pipeline_repeats": repeats}}, VARIANTS[variant]
    )


@pytest.fixture(scope="module")
def references():
    """One-device loss and gradients per model variant (sequential model, no pipeline code)."""
    out = {}
    for name, config in VARIANTS.items():
        params = model.init(config.model, jax.random.key(0))
        window = jax.random.randint(jax.random.key(1), (8, 33), 0, config.model.vocab_size)
        (loss, metrics), grads = jax.jit(
            jax.value_and_grad(lambda p, w, c=config.model: model.loss_fn(p, w, c), has_aux=True)
        )(params, window)
        out[name] = params, window, float(loss), metrics["expert_load"], grads
    return out


def relative_error(a, b) -> float:
    return float(jnp.linalg.norm((a - b).ravel()) / (jnp.linalg.norm(b.ravel()) + 1e-30))


def pipelined_value_and_grad(config, params, window):
    mesh, shape = build_mesh(config, jax.devices()[: int(np.prod([s for s in config_sizes(config)]))])
    stages, first = shape.pp, config.model.first_k_dense_replace
    staged = pipeline.to_stages(params, first, stages, config.distributed.pipeline_repeats)
    shardings = rules.param_shardings(mesh, logical_axes_for(config, stages), staged)
    tokens = jax.device_put(window, NamedSharding(mesh, PartitionSpec(("dp", "ep"), None)))
    M = resolve_microbatches(shape, config)
    fn = jax.value_and_grad(lambda p, w: model.loss_fn(p, w, config.model, microbatches=M), has_aux=True)
    with jax.set_mesh(mesh):
        (loss, metrics), grads = jax.jit(fn, out_shardings=((None, None), shardings))(
            jax.device_put(staged, shardings), tokens
        )
    return loss, metrics, pipeline.from_stages(grads, first)


def config_sizes(config):
    d = config.distributed
    return [d.pp_size, max(d.dp_size, 1), d.ep_size, d.sp_size, d.tp_size]


# Kept for `-m slow` (CI budget): each repeats a layout a CI case already covers: pp2 with more
# microbatches, pp4 without dp (pp4_dp2_m4), circular with dp x tp or ep x sp (its GPipe twin, and
# the 20-step curve of pp2_ep2_sp2_r2_m2 below checks its loss at every step).
SLOW_CASES = {"pp2_m8", "pp2_r2_m8", "pp4_m4", "pp2_dp2_tp2_r2_m4", "pp2_ep2_sp2_r2_m2"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n for n in CASES]
)
def test_loss_and_every_gradient_match_one_device(name, references):
    variant, sizes, M, R = CASES[name]
    params, window, ref_loss, ref_load, ref_grads = references[variant]
    config = case_config(variant, sizes, M, R)
    loss, metrics, grads = pipelined_value_and_grad(config, params, window)
    assert abs(float(loss) - ref_loss) <= GRAD_RTOL * abs(ref_loss)
    # routed-slot counts are summed over microbatches, so the loads that drive the bias update are exact
    np.testing.assert_array_equal(np.asarray(metrics["expert_load"]), np.asarray(ref_load))
    for (path, g_ref), g in zip(jax.tree.leaves_with_path(ref_grads), jax.tree.leaves(grads)):
        err = relative_error(g, g_ref) if float(jnp.abs(g_ref).max()) > 0 else float(jnp.abs(g).max())
        assert err <= GRAD_RTOL, f"{name}: {jax.tree_util.keystr(path)} differs by {err:.2e}"


# pp4_dp2_m4's curve is kept for `-m slow` (CI budget): its every gradient is checked against one
# device above, and the CLI test below trains and resumes a pipeline end to end
@pytest.mark.parametrize("name", ["pp2_ep2_sp2_r2_m2", pytest.param("pp4_dp2_m4", marks=pytest.mark.slow)])
def test_twenty_training_steps_match_one_device(name):
    variant, sizes, M, R = CASES[name]
    base, config = VARIANTS[variant], case_config(variant, sizes, M, R)
    ref, reference_state = twenty_steps(base)
    reference_params = reference_state.params
    mesh, _ = build_mesh(config, jax.devices()[: int(np.prod(config_sizes(config)))])
    got, state = twenty_steps(config, mesh)
    np.testing.assert_allclose(got, ref, rtol=GRAD_RTOL)
    assert ref[-1] < ref[0] - 1.0
    # the aux-loss-free bias update moved the staged routers exactly as the sequential ones
    final = canonical_state(state, config).params
    for i in range(base.model.first_k_dense_replace, base.model.num_hidden_layers):
        bias = lambda p: np.asarray(p["layers"][str(i)]["mlp"]["gate"]["e_score_correction_bias"])  # noqa: E731
        np.testing.assert_allclose(bias(final), bias(reference_params), atol=1e-6)
        assert np.abs(bias(reference_params)).max() > 0


@pytest.mark.parametrize("sizes, M, R", [({"pp": 4}, 4, 1), ({"pp": 2}, 4, 2)], ids=["gpipe_pp4_m4", "circular_pp2_r2_m4"])
def test_schedule_runs_r_m_plus_s_minus_1_overlapping_iterations(sizes, M, R):
    """One scan of R*M+S-1 iterations inside the pp shard_map, each with exactly one ppermute; no host round trips."""
    config = case_config("nano5", sizes, M, R)
    mesh, shape = build_mesh(config, jax.devices()[: sizes["pp"]])
    S = shape.pp
    assert resolve_microbatches(shape, config) == M
    params = jax.eval_shape(lambda: pipeline.to_stages(model.init(config.model, jax.random.key(0)), 1, S, R))
    window = jax.ShapeDtypeStruct((8, 33), jnp.int32)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda p, w: model.loss_fn(p, w, config.model, microbatches=M)[0])(params, window)

    all_eqns = list(_walk(jaxpr.jaxpr))
    assert not [e for e in all_eqns if "callback" in e.primitive.name], "the schedule must not go through the host"
    pipelines = [
        e for e in all_eqns if e.primitive.name == "shard_map" and set(e.params["newly_manual_axes"]) == {"pp"}
    ]
    assert len(pipelines) == 1
    scans = [e for e in _walk(pipelines[0].params["jaxpr"]) if e.primitive.name == "scan"]
    schedule = [e for e in scans if e.params["length"] == R * M + S - 1]
    assert len(schedule) == 1, [e.params["length"] for e in scans]
    # every stage runs the same body on its own weights at once, and the body's only exchange between
    # stages is one ppermute: stage s works on item t - s while stage s + 1 works on item t - s - 1
    body = [e.primitive.name for e in _walk(schedule[0].params["jaxpr"].jaxpr)]
    assert body.count("ppermute") == 1
    assert [e.primitive.name for e in _walk(pipelines[0].params["jaxpr"])].count("ppermute") == 1
    assert pipeline.bubble_fraction(S, M, R) == pytest.approx((S - 1) / (R * M + S - 1))


def _walk(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _subjaxprs(eqn):
            yield from _walk(sub)


def _subjaxprs(eqn):
    out = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                out.append(v.jaxpr)
            elif isinstance(v, jax.extend.core.Jaxpr):
                out.append(v)
    return out


def test_layouts_round_trip_and_bias_update_matches():
    config = case_config("nano5", {"pp": 2}, 2)
    params = model.init(config.model, jax.random.key(0))
    kernel = lambda p, i: p["layers"][str(i)]["self_attn"]["o_proj"]["kernel"]  # noqa: E731
    for R in (1, 2):
        staged = pipeline.to_stages(params, 1, 2, R)
        assert staged["stages"]["mlp"]["experts"]["gate_proj"].shape == (2, R, 2 // R, 8, 128, 96)
        assert sorted(staged["layers"]) == ["0"]
        # layer 1 + (r*S + s)*L_g + l sits at [s, r, l]: with R = 2, stage 0 holds layers 1 and 3
        for s in range(2):
            for r in range(R):
                for l in range(2 // R):
                    layer = 1 + (r * 2 + s) * (2 // R) + l
                    np.testing.assert_array_equal(staged["stages"]["self_attn"]["o_proj"]["kernel"][s, r, l], kernel(params, layer))
        back = pipeline.from_stages(staged, 1)
        assert jax.tree.structure(back) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)
        # the same bias update through either layout (rows: 4 staged layers, then the MTP block)
        load = jax.random.uniform(jax.random.key(5), (5, 8))
        direct = model.apply_bias_updates(params, load, config.model)
        via_stages = pipeline.from_stages(model.apply_bias_updates(staged, load, config.model), 1)
        for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(via_stages)):
            np.testing.assert_array_equal(a, b)
    staged = pipeline.to_stages(params, 1, 2)
    # weight decay by name: exactly the matrices, in either layout (stacked norms are 3-D but not decayed)
    mask = decay_mask(params)
    assert jax.tree.leaves(mask) == [np.ndim(p) >= 2 for p in jax.tree.leaves(params)]
    staged_mask = decay_mask(staged)
    assert staged_mask["stages"]["input_layernorm"]["scale"] is False
    assert staged_mask["stages"]["mlp"]["gate"]["e_score_correction_bias"] is False
    # the whole train state converts both ways, optimizer moments included
    state = init_state(config, jax.random.key(0))
    round_trip = canonical_state(staged_state(state, config, 2), config)
    assert jax.tree.structure(round_trip) == jax.tree.structure(state)


def test_stage_weights_and_moments_live_only_on_their_stage():
    config = case_config("nano5", {"pp": 2, "dp": 2, "tp": 2}, 4)
    mesh, _ = build_mesh(config)
    shardings = state_shardings_for(config, mesh)
    state = jax.device_put(init_state(config, jax.random.key(0), 2), shardings)
    experts = state.params["stages"]["mlp"]["experts"]["gate_proj"]  # [S, R, L_g, E, D, F]
    assert experts.addressable_shards[0].data.shape == (1, 1, 2, 8, 128, 96 // 2)  # one stage, F over tp
    mu = state.opt_state[1][0].mu["stages"]["mlp"]["experts"]["gate_proj"]
    assert np.prod(mu.addressable_shards[0].data.shape) == np.prod(experts.shape) // 8  # pp, tp and ZeRO over dp
    # against the same mesh without stages (every pp device holding every layer): 4 of nano5's 7 blocks
    # (5 layers + MTP + embedding/head) are split in two
    unstaged = rules.bytes_per_device(abstract_state(config).params, state_shardings_for(config, mesh, stages=1).params)
    staged = rules.bytes_per_device(state.params, shardings.params)
    assert staged < 0.8 * unstaged


def test_pipeline_validation_errors():
    nano, nano5 = VARIANTS["nano"], VARIANTS["nano5"]
    with pytest.raises(MeshError, match=r"pp_size=2: the pipeline holds the 3 decoder layers after the first 1 dense"):
        validate(MeshShape(pp=2), nano)
    with pytest.raises(MeshError, match=r"microbatches=2 is fewer than the pp_size=4 stages"):
        validate(MeshShape(pp=4), case_config("nano5", {"pp": 4}, 2))
    small_batch = config_from_dict({"training": {"batch_size": 4}}, case_config("nano5", {"pp": 2, "dp": 2}, 4))
    with pytest.raises(MeshError, match=r"batch_size=4 does not split into microbatches=4 .* divisible by 8"):
        validate(MeshShape(pp=2, dp=2), small_batch)
    with pytest.raises(MeshError, match=r"microbatches=4 applies to pipeline parallelism"):
        validate(MeshShape(dp=2), case_config("nano5", {}, 4))
    with pytest.raises(MeshError, match=r"pipeline_repeats=2 applies to pipeline parallelism"):
        validate(MeshShape(dp=2), case_config("nano5", {}, -1, 2))
    with pytest.raises(MeshError, match=r"pipeline_repeats=2: the 4 pipelined layers do not split into pp_size=4 stages x 2"):
        validate(MeshShape(pp=4), case_config("nano5", {"pp": 4}, 4, 2))
    # automatic microbatches: the smallest divisor of the per-replica batch >= 2 * pp, else the largest >= pp
    assert resolve_microbatches(MeshShape(pp=2), nano5) == 4
    assert resolve_microbatches(MeshShape(pp=3), nano) == 8
    assert resolve_microbatches(MeshShape(pp=4, dp=2), nano5) == 4


def test_cli_pp3_on_three_devices_then_resume_on_one(tmp_path, tinystories_dir):
    """The seed guide's `--gpus 3 --pp-size 3`, and its checkpoint continuing on one device with the same losses."""
    common = [
        "run", "--stages", "pretrain", "--model-size", "nano", "--data-dir", str(tinystories_dir),
        "--work-dir", str(tmp_path / "work"), "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--output-dir", str(tmp_path / "out"), "--max-steps", "4", "--batch-size", "6", "--seq-len", "64",
        "--log-interval", "1", "--eval-interval", "4", "--eval-batches", "1", "--checkpoint-interval", "2",
    ]
    assert main(common + ["--run-name", "pp3", "--gpus", "3", "--pp-size", "3"]) == 0
    (tmp_path / "ckpt" / "one").mkdir()
    shutil.copytree(tmp_path / "ckpt" / "pp3" / "step_2", tmp_path / "ckpt" / "one" / "step_2")
    assert main(common + ["--run-name", "one", "--gpus", "1", "--resume"]) == 0

    def losses(run):
        with open(tmp_path / "out" / run / "metrics.csv") as f:
            return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}

    pp3, one = losses("pp3"), losses("one")
    assert sorted(one) == [3, 4]
    np.testing.assert_allclose([one[3], one[4]], [pp3[3], pp3[4]], rtol=GRAD_RTOL)
    assert (tmp_path / "ckpt" / "pp3" / "final" / "params").is_dir()
