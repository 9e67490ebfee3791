"""Distillation: the KL term by hand, A = 0 is pretraining, the teacher is an input and never trained, tokenizers must match."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.cli import main
from dsjax.config import config_from_dict
from dsjax.distill import DistillError, check_same_tokenizer, distill_objective
from dsjax.model import loss as losses
from dsjax.train.step import init_state, make_train_step, pretrain_objective
from training_runs import host_init

MICRO = {
    "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "moe_intermediate_size": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
    "max_position_embeddings": 64, "num_nextn_predict_layers": 1,
}


def micro(**model):
    return config_from_dict({
        "model": {**MICRO, **model},
        "training": {"batch_size": 2, "seq_len": 16, "max_steps": 4, "warmup_steps": 1},
    })


@pytest.fixture(scope="module")
def setup():
    student = micro()
    teacher = micro(hidden_size=48, num_hidden_layers=3)  # wider and deeper: a different pytree
    s_params, t_params = host_init(student.model, 0), host_init(teacher.model, 1)
    window = jax.random.randint(jax.random.key(2), (2, 17), 0, 64)
    return student, teacher, s_params, t_params, window


def test_kl_term_equals_hand_computed_value():
    rng = np.random.default_rng(0)
    c = micro().model
    h, th = rng.normal(size=(2, 3, 32)).astype(np.float32), rng.normal(size=(2, 3, 48)).astype(np.float32)
    head, thead = rng.normal(size=(32, 64)).astype(np.float32), rng.normal(size=(48, 64)).astype(np.float32)
    scale, tscale = np.ones(32, np.float32), np.ones(48, np.float32)
    weight = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    T = 2.0

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    def normed(x):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps)

    ls, lt = log_softmax(normed(h) @ head / T), log_softmax(normed(th) @ thead / T)
    expected = float(np.sum((np.exp(lt) * (lt - ls)).sum(-1) * weight))
    for chunk in (None, 2):  # one chunk, and several (with padding)
        got = losses.chunked_head_kl(
            jnp.asarray(h), scale, jnp.asarray(head), jnp.asarray(th), tscale, jnp.asarray(thead),
            jnp.asarray(weight), T, c, c, chunk_tokens=chunk,
        )
        np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_alpha_zero_is_exactly_the_pretraining_loss(setup):
    student, teacher, s_params, t_params, window = setup
    plain, plain_metrics = jax.jit(pretrain_objective(student))(s_params, window, ())
    zero, zero_metrics = jax.jit(distill_objective(teacher, 2.0, 0.0)(student))(s_params, window, (t_params,))
    assert float(plain) == float(zero)
    assert float(plain_metrics["mtp_loss"]) == float(zero_metrics["mtp_loss"])


def test_distill_loss_combines_kl_and_ce(setup):
    student, teacher, s_params, t_params, window = setup
    A, T = 0.3, 2.0
    loss, metrics = jax.jit(distill_objective(teacher, T, A)(student))(s_params, window, (t_params,))
    expected = (
        A * T**2 * metrics["kl_loss"] + (1 - A) * metrics["ce_loss"] + metrics["balance_loss"]
        + student.model.mtp_loss_weight * metrics["mtp_loss"]
    )
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    assert float(metrics["kl_loss"]) > 0


def test_teacher_gets_no_gradient_and_no_optimizer_state(setup):
    student, teacher, s_params, t_params, window = setup
    objective = distill_objective(teacher, 2.0, 0.5)(student)
    teacher_grads = jax.jit(jax.grad(lambda t: objective(s_params, window, (t,))[0]))(t_params)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(teacher_grads))
    # the train step, traced (not compiled): the teacher is an input, and the new state holds
    # params-shaped moments of the student plus scalars, nothing of the teacher
    state = jax.eval_shape(lambda: init_state(student, jax.random.key(0)))
    step = make_train_step(student, objective=distill_objective(teacher, 2.0, 0.5))
    new_state, metrics = jax.eval_shape(step, state, window[None], t_params)
    student_def = jax.tree.structure(s_params)
    assert jax.tree.structure(new_state.params) == student_def
    parts = jax.tree.leaves(new_state.opt_state, is_leaf=lambda x: jax.tree.structure(x) == student_def)
    moments = [p for p in parts if jax.tree.structure(p) == student_def]
    assert len(moments) >= 2  # AdamW's mu and nu
    assert all(p.ndim == 0 for p in parts if jax.tree.structure(p) != student_def)
    assert "kl_loss" in metrics


def test_tokenizer_mismatch_is_refused(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "tokenizer.model").write_bytes(b"one tokenizer")
    (tmp_path / "student.model").write_bytes(b"another tokenizer")
    with pytest.raises(DistillError, match="must share the tokenizer"):
        check_same_tokenizer(tmp_path / "student.model", tmp_path / "teacher")
    check_same_tokenizer(tmp_path / "teacher" / "tokenizer.model", tmp_path / "teacher")  # the same file passes


def test_cli_refuses_a_teacher_with_another_vocabulary(tmp_path, tinystories_dir, capsys):
    final = tmp_path / "teacher" / "final"
    (final / "params").mkdir(parents=True)
    (final / "tokenizer.model").write_bytes(b"x")
    (final / "config.json").write_text(json.dumps({"model": {**MICRO, "vocab_size": 128, "max_position_embeddings": 512}}))
    code = main([
        "run", "--stages", "distill", "--teacher", str(final), "--data-dir", str(tinystories_dir),
        "--checkpoint-dir", str(tmp_path / "ck"), "--output-dir", str(tmp_path / "out"),
    ])
    assert code == 2
    assert "must share the tokenizer" in capsys.readouterr().err
    code = main(["run", "--stages", "distill", "--data-dir", str(tinystories_dir)])
    assert code == 2
    assert "needs --teacher" in capsys.readouterr().err


def test_distill_step_on_a_mesh_matches_one_device(setup):
    """dp x tp x ep: the teacher laid out like its own model, the KL over split logits; same step as one device."""
    from dsjax.config import config_from_dict
    from dsjax.train import distributed
    from dsjax.train.step import batch_sharding, state_shardings_for

    student, teacher, s_params, t_params, _ = setup
    student = config_from_dict({"training": {"batch_size": 4}}, student)
    windows = jax.random.randint(jax.random.key(5), (1, 4, 17), 0, 64)
    objective = distill_objective(teacher, 2.0, 0.5)
    one_state = init_state(student, jax.random.key(0))
    _, one = make_train_step(student, objective=objective)(one_state, windows, t_params)

    meshed = config_from_dict({"distributed": {"dp_size": 2, "tp_size": 2, "ep_size": 2}}, student)
    mesh, _ = distributed.setup_mesh(meshed, 8)
    teacher_shardings = (state_shardings_for(teacher, mesh, stages=1).params,)
    step = make_train_step(meshed, mesh=mesh, objective=objective, extras_shardings=teacher_shardings)
    placed_teacher = jax.device_put(jax.device_get((t_params,)), teacher_shardings)  # as the loop does
    assert any(len(set(a.sharding.spec) - {None}) for a in jax.tree.leaves(placed_teacher))  # really split
    state = jax.device_put(init_state(meshed, jax.random.key(0)), state_shardings_for(meshed, mesh))
    _, on_mesh = step(state, jax.device_put(windows, batch_sharding(mesh)), *placed_teacher)
    for key in ("loss", "kl_loss", "ce_loss", "mtp_loss", "grad_norm"):
        np.testing.assert_allclose(float(on_mesh[key]), float(one[key]), rtol=1e-5, err_msg=key)
