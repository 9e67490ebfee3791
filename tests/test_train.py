import csv
import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import model, progress
from dsjax.cli import main
from dsjax.config import load_config
from dsjax.train.metrics import METRIC_COLUMNS
from dsjax.train.loop_timing import HostLoopTimer
from dsjax.train.optimizer import decay_mask, lr_schedule
from dsjax.train.step import (
    FOLD_ACTIVATION_BYTES,
    FOLD_MEMORY_SHARE,
    accumulated_gradients,
    fold_fits,
    fold_microbatches,
    init_state,
    make_train_step,
    resolve_accumulation,
)


def run_cli(*args) -> int:
    return main(["run", "--model-size", "nano", *map(str, args)])


BAR_UPDATES: list[dict] = []  # what the training loop told its progress bar, in order


def recording_progress():
    bar = progress.training_progress()
    update = bar.update

    def record(task, **fields):
        BAR_UPDATES.append(fields)
        return update(task, **fields)

    bar.update = record
    return bar


def run_flags(root, data_dir) -> list:
    return [
        "--data-dir", data_dir, "--work-dir", root / "data", "--checkpoint-dir", root / "checkpoints",
        "--output-dir", root / "outputs", "--run-name", "e2e", "--batch-size", 8, "--seq-len", 64,
        "--log-interval", 3, "--eval-interval", 6, "--checkpoint-interval", 6, "--eval-batches", 4,
        "--warmup-steps", 3, "--gpus", 1,  # one device here; meshes are tested in test_mesh/test_multihost
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tinystories_dir):
    """A short real-data nano run through the CLI: 12 steps of 8 x 64 tokens.

    The tests read it and leave it as it is (a test that continues it works on a copy), so they
    hold in any order and on any pytest-xdist worker.
    """
    root = tmp_path_factory.mktemp("run")
    common = run_flags(root, tinystories_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dsjax.train.loop.training_progress", recording_progress)
        assert run_cli(*common, "--max-steps", 12) == 0
    return root, common


def test_the_bar_advances_every_step_with_an_eta(trained):
    """Steps are logged every 3rd step, but the bar moves at each one (from the loop, not from fetched metrics)."""
    completed = [u for u in BAR_UPDATES if "completed" in u]
    assert [u["completed"] for u in completed] == list(range(1, 13))
    assert all("eta" in u for u in completed) and completed[-1]["eta"] == "0:00:00"


def test_host_loop_timer_splits_each_step():
    ticks = iter([0.0, 1.0, 3.0, 10.0, 10.0, 12.0, 15.0, 16.5, 20.0, 21.0])
    timer = HostLoopTimer(clock=lambda: next(ticks))
    timer.start()
    timer.lap("data", counted=False)  # the first step compiles
    timer.lap("call", counted=False)
    timer.lap("waiting", counted=False)
    timer.start()
    timer.lap("data")
    timer.lap("call")
    timer.step_timed()
    timer.lap("waiting")
    timer.start()
    timer.lap("metrics")
    assert timer.steps == 1
    assert timer.ms_per_step() == {"data": 2000.0, "call": 3000.0, "waiting": 1500.0, "metrics": 1000.0}
    assert timer.describe() == (
        "host loop, ms per step over 1 steps after the first: data 2000.00, step call 3000.00, "
        "waiting for the device 1500.00, metrics 1000.00"
    )


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_training_writes_documented_files(trained):
    root, _ = trained
    out, ck = root / "outputs/e2e", root / "checkpoints/e2e"
    for name in ("metrics.csv", "training_log.json", "training_config.json", "loss.png"):
        assert (out / name).is_file(), name
    with open(out / "metrics.csv") as f:
        assert next(csv.reader(f)) == METRIC_COLUMNS
    for name in ("config.json", "training_state.json", "tokenizer.model", "params"):
        assert (ck / "final" / name).exists(), name
    assert (ck / "step_6").is_dir() and (ck / "step_12").is_dir()
    resolved = json.loads((out / "training_config.json").read_text())
    assert resolved["training"]["batch_size"] == 8 and resolved["model"]["vocab_size"] == 4096
    state = json.loads((ck / "final/training_state.json").read_text())
    assert state["step"] == 12 and state["tokens_seen"] == 12 * 8 * 64
    # where the loop's host time went: steps 2-12 dispatched, steps 2-11 waited for
    assert set(state["host_loop_ms_per_step"]) == {"data", "call", "waiting", "metrics"}
    assert all(ms >= 0 for ms in state["host_loop_ms_per_step"].values())


def test_a_few_steps_lower_the_loss_on_real_data(trained):
    root, _ = trained
    rows = [r for r in read_rows(root / "outputs/e2e/metrics.csv") if int(r["step"]) <= 12]
    losses = [float(r["ce_loss"]) for r in rows if r["ce_loss"]]
    assert losses[-1] < losses[0] - 0.5, losses
    vals = [(int(r["step"]), float(r["val_loss"]), float(r["val_bpb"])) for r in rows if r["val_loss"]]
    assert [v[0] for v in vals] == [6, 12]
    assert vals[1][1] < vals[0][1]
    assert 0 < vals[1][2] < 4.0  # bits per byte, a sane range for a barely trained model
    assert all(float(r["tokens_per_sec"]) > 0 for r in rows if r["tokens_per_sec"])


def test_resume_continues_from_the_latest_checkpoint(trained, tinystories_dir, tmp_path):
    shutil.copytree(trained[0], tmp_path, dirs_exist_ok=True)
    root, common = tmp_path, run_flags(tmp_path, tinystories_dir)
    assert run_cli(*common, "--max-steps", 15, "--resume") == 0
    rows = read_rows(root / "outputs/e2e/metrics.csv")
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps[-1] == 15 and steps.count(12) == 1
    state = json.loads((root / "checkpoints/e2e/final/training_state.json").read_text())
    assert state["step"] == 15 and state["tokens_seen"] == 15 * 8 * 64


def test_generate_from_final(trained, capsys):
    root, _ = trained
    code = main(["generate", "--checkpoint", str(root / "checkpoints/e2e/final"), "--prompt", "Once upon a time",
                 "--max-new-tokens", "12", "--temperature", "0"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.startswith("Once upon a time") and len(captured.out.strip()) > len("Once upon a time")
    assert "tokens/s" in captured.err


def test_generate_batch_of_prompts_and_samples(trained, tmp_path, capsys):
    root, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe dog\n\n")  # blank lines are skipped
    code = main(["generate", "--checkpoint", str(root / "checkpoints/e2e/final"), "--prompts-file", str(prompts),
                 "--num-samples", "3", "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "5"])
    captured = capsys.readouterr()
    assert code == 0
    headers = [line for line in captured.out.splitlines() if line.startswith("--- prompt")]
    assert headers == [f"--- prompt {p}, sample {i} (seed {4 + i}) ---" for p in (1, 2) for i in (1, 2, 3)]
    assert "6 samples" in captured.err
    # 8 tokens a row all come with the compiling calls (chunks of 64): no rate is made up from them
    assert "with compilation; too few tokens after compiling to measure tokens/s" in captured.err


def test_divergence_stops_with_clear_message_and_keeps_checkpoint(tmp_path, tinystories_dir, trained, capsys):
    root, _ = trained
    code = run_cli(
        "--data-dir", tinystories_dir, "--work-dir", root / "data", "--checkpoint-dir", tmp_path / "ck",
        "--output-dir", tmp_path / "out", "--run-name", "boom", "--batch-size", 8, "--seq-len", 64,
        "--log-interval", 1, "--checkpoint-interval", 1, "--eval-interval", 100, "--warmup-steps", 0,
        "--learning-rate", 1e30, "--max-steps", 6, "--gpus", 1,
    )
    err = capsys.readouterr().err
    assert code == 3
    assert "training diverged by step 2" in err and "nan" in err.lower()
    assert "Last good checkpoint" in err
    saved = sorted(p.name for p in (tmp_path / "ck/boom").iterdir())
    assert "step_1" in saved and "final" not in saved


def test_gradient_accumulation_matches_one_big_batch():
    config = load_config("nano")
    small = dataclasses.replace(config.model, num_hidden_layers=2, num_nextn_predict_layers=1)
    config = dataclasses.replace(config, model=small)
    windows = np.asarray(jax.random.randint(jax.random.key(0), (8, 33), 0, small.vocab_size))
    params = init_state(config, jax.random.key(1)).params
    grad_fn = jax.value_and_grad(lambda p, w: model.loss_fn(p, w, small), has_aux=True)
    accumulate = jax.jit(lambda p, b: accumulated_gradients(grad_fn, p, b))
    g_one, m_one = accumulate(params, windows.reshape(1, 8, 33))
    g_two, m_two = accumulate(params, windows.reshape(2, 4, 33))
    for key in ("loss", "ce_loss", "mtp_loss", "balance_loss"):
        np.testing.assert_allclose(float(m_one[key]), float(m_two[key]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m_one["expert_load"]), np.asarray(m_two["expert_load"]), rtol=1e-6)
    # the gradient the optimizer receives; comparing parameters *after* AdamW would test
    # fp32 rounding instead: AdamW's first step is about lr * g / (|g| + 1e-8), so gradients
    # near 1e-8, made by cancellation, turn rounding noise into a visible share of lr
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g_one), jax.tree.leaves(g_one), jax.tree.leaves(g_two)):
        err = float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(a) + 1e-30))
        assert err <= 1e-5, (jax.tree_util.keystr(path[0]), err)


def test_lr_schedules():
    t = load_config("nano").training
    t = dataclasses.replace(t, learning_rate=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    cosine = lr_schedule(t)
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(9)) == pytest.approx(1.0)
    assert float(cosine(110)) == pytest.approx(0.1, abs=1e-6)
    assert float(cosine(60)) == pytest.approx(0.55, abs=1e-3)
    wsd = lr_schedule(dataclasses.replace(t, lr_schedule="wsd", wsd_decay_fraction=0.2))
    assert float(wsd(80)) == pytest.approx(1.0) and float(wsd(110)) == pytest.approx(0.1, abs=1e-6)


def test_weight_decay_skips_norms_and_biases():
    config = load_config("nano")
    mask = decay_mask(init_state(config, jax.random.key(0)).params)
    assert mask["layers"]["0"]["input_layernorm"]["scale"] is False
    assert mask["layers"]["1"]["mlp"]["gate"]["e_score_correction_bias"] is False
    assert mask["layers"]["0"]["self_attn"]["kv_b_proj"]["kernel"] is True


def test_global_norm_and_clipping_match_optax():
    """One reduction over the joined small leaves on one device (large ones alone), per leaf under a mesh:
    optax's value either way,
    and the clip scales exactly as optax.clip_by_global_norm (optimizer state of the same structure)."""
    import optax

    from dsjax.train import distributed
    from dsjax.train.optimizer import clip_by_global_norm, global_norm

    config = load_config("nano")
    params = model.abstract_params(config.model)
    # numpy draws and jitted optax: eager JAX compiled one small program per op and leaf shape (about 8 s)
    rng = np.random.default_rng(3)
    grads = jax.tree.map(lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape), a.dtype), params)
    want = float(jax.jit(optax.tree.norm)(grads))
    assert float(jax.jit(global_norm)(grads)) == pytest.approx(want, rel=1e-6)
    joined = jax.jit(global_norm).lower(grads).as_text()
    assert "concatenate" in joined  # the one-device path joins the leaves
    # leaves of JOIN_BELOW_ELEMENTS or more are reduced alone (nano has none that large at the default)
    from dsjax.train import optimizer

    sizes = [x.size for x in jax.tree.leaves(grads)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optimizer, "JOIN_BELOW_ELEMENTS", 1 << 16)
        fresh = jax.jit(lambda g: global_norm(g))  # global_norm's own trace is cached with the old limit
        assert float(fresh(grads)) == pytest.approx(want, rel=1e-6)
        text = fresh.lower(grads).as_text()
    joined_sizes = [int(m) for m in re.findall(r"concatenate.*-> tensor<(\d+)xf32>", text)]
    assert max(joined_sizes) == sum(n for n in sizes if n < 1 << 16)  # jnp joins long lists in stages
    assert 0 < sum(n >= 1 << 16 for n in sizes) < len(sizes)
    meshed = dataclasses.replace(config, distributed=dataclasses.replace(config.distributed, dp_size=2, tp_size=2))
    mesh, _ = distributed.setup_mesh(meshed, 4)
    with jax.set_mesh(mesh):
        split = jax.jit(global_norm).lower(grads)
        assert "concatenate" not in split.as_text()  # leaves reduced where they lie
        assert float(split.compile()(grads)) == pytest.approx(want, rel=1e-6)
    for limit in (want / 3, want * 3):  # clipped, and left alone
        ours, _ = jax.jit(clip_by_global_norm(limit).update)(grads, clip_by_global_norm(limit).init(params))
        reference = optax.clip_by_global_norm(limit)
        theirs, _ = jax.jit(reference.update)(grads, reference.init(params))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert jax.tree.structure(clip_by_global_norm(1.0).init(params)) == jax.tree.structure(
        optax.clip_by_global_norm(1.0).init(params))  # checkpoints written before still restore


def test_folded_accumulation_is_the_same_step():
    """training.accumulation=fold runs the A microbatches as one batch: same loss, metrics and gradient norm."""
    config = load_config("nano")
    small = dataclasses.replace(config.model, num_hidden_layers=2, num_nextn_predict_layers=1)
    config = dataclasses.replace(config, model=small)
    windows = np.asarray(jax.random.randint(jax.random.key(0), (4, 2, 33), 0, small.vocab_size))
    results = {}
    for mode in ("scan", "fold"):
        c = dataclasses.replace(
            config, training=dataclasses.replace(config.training, batch_size=2, gradient_accumulation_steps=4, accumulation=mode)
        )
        step = make_train_step(c)
        assert step.accumulation == mode
        _, results[mode] = step(init_state(c, jax.random.key(1)), windows)
    for key in ("loss", "ce_loss", "mtp_loss", "balance_loss", "grad_norm", "expert_imbalance"):
        np.testing.assert_allclose(float(results["fold"][key]), float(results["scan"][key]), rtol=1e-5, err_msg=key)
    folded = np.asarray(fold_microbatches(windows))
    assert folded.shape == (1, 8, 33)
    assert sorted(map(tuple, folded[0])) == sorted(map(tuple, windows.reshape(8, 33)))  # every row, once


def test_accumulation_auto_folds_only_what_fits():
    config = load_config("tiny")  # 4 x 4 x 256 tokens, 256 hidden units, 4 layers + 1 MTP block
    folded_bytes = 16 * 256 * 256 * 5 * FOLD_ACTIVATION_BYTES
    assert fold_fits(config, 1, int(folded_bytes / FOLD_MEMORY_SHARE))
    assert not fold_fits(config, 1, int(folded_bytes / FOLD_MEMORY_SHARE) - 1)
    assert fold_fits(config, 2, int(folded_bytes / FOLD_MEMORY_SHARE / 2))  # dp splits the batch
    assert not fold_fits(config, 1, None)  # a device that reports no memory limit
    assert resolve_accumulation(config) == "scan"  # CPU: auto scans
    fold = dataclasses.replace(config, training=dataclasses.replace(config.training, accumulation="fold"))
    assert resolve_accumulation(fold) == "fold"
    assert resolve_accumulation(fold, foldable=False) == "scan"  # per-microbatch weighted means (SFT)
    one = dataclasses.replace(fold, training=dataclasses.replace(fold.training, gradient_accumulation_steps=1))
    assert resolve_accumulation(one) == "scan"


def two_layer_nano():
    config = load_config("nano")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, num_hidden_layers=2, num_nextn_predict_layers=0))


def recorded_compiles() -> list:
    """The XLA compiles from now on, as JAX reports them (one entry each)."""
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _secs, **_: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
    return compiles


def test_eval_step_compiled_ahead_is_not_compiled_again():
    """The loop's background compile of the eval step: its first call then compiles nothing, also on a mesh."""
    from dsjax.train import distributed, precompile
    from dsjax.train.loop import _eval_inputs
    from dsjax.train.step import make_eval_step, state_shardings_for

    config = two_layer_nano()
    B, T = 4, 32
    batch = (np.zeros((B, T + 1), np.int32), np.ones((B, T + 1), np.int32), np.ones((B, T), np.float32))
    compiles = recorded_compiles()
    for dp in (1, 2):
        c = dataclasses.replace(config, distributed=dataclasses.replace(config.distributed, dp_size=dp))
        mesh, _ = distributed.setup_mesh(c, dp)  # None on one device
        shardings = None if mesh is None else state_shardings_for(c, mesh).params
        params = jax.jit(lambda k: init_state(c, k).params, out_shardings=shardings)(jax.random.key(0))
        args = _eval_inputs(batch, mesh)  # as the loop's evals and its compile ahead pass the batch
        eval_step = make_eval_step(c, mesh=mesh)
        specs = (precompile.call_specs(params), *args)
        params = jax.tree.map(lambda a: a + 0, params)  # the loop's first train step donates the buffers the specs came from
        precompile.start(getattr(eval_step, "jitted", eval_step), specs, mesh).join()
        compiles.clear()
        jax.block_until_ready(eval_step(params, *args))
        assert compiles == [], f"the eval step compiled again ({'mesh' if mesh else 'one device'})"


def test_train_step_compiled_ahead_is_not_compiled_again():
    """The loop compiles the train step on a background thread from specs (a fresh state's from its config, a restored
    one's from its arrays, the batch's from a peek at the data); the first step then compiles nothing, also on a mesh."""
    from dsjax.train import distributed, precompile
    from dsjax.train.loop import peek, train_state_specs
    from dsjax.train.step import batch_sharding, state_shardings_for

    config = two_layer_nano()
    config = dataclasses.replace(config, training=dataclasses.replace(config.training, batch_size=4, seq_len=32))
    compiles = recorded_compiles()
    for dp in (1, 2):
        c = dataclasses.replace(config, distributed=dataclasses.replace(config.distributed, dp_size=dp))
        mesh, _ = distributed.setup_mesh(c, dp)  # None on one device
        data = _ListIterator([np.full((4, 33), i, np.int32) for i in range(3)])
        first = peek(data)
        assert first[0, 0] == 0 and next(data)[0, 0] == 0  # peeking does not consume
        batch = distributed.to_global(first.reshape(1, 4, 33), None if mesh is None else batch_sharding(mesh))
        train_step = make_train_step(c, mesh=mesh)
        shardings = None if mesh is None else state_shardings_for(c, mesh)
        specs = (train_state_specs(c, shardings, 1), precompile.call_specs(batch))
        precompile.start(getattr(train_step, "jitted", train_step), specs, mesh).join()
        state = jax.jit(init_state, static_argnums=(0, 2), out_shardings=shardings)(c, jax.random.key(0), 1)
        compiles.clear()
        jax.block_until_ready(train_step(state, batch))
        assert compiles == [], f"the train step compiled again ({'mesh' if mesh else 'one device'})"
    # a restored state is committed to its device, and its specs say so
    restored = jax.device_put(init_state(config, jax.random.key(1)), jax.devices()[0])
    train_step = make_train_step(config)
    precompile.start(train_step, (precompile.call_specs(restored), np.zeros((1, 4, 33), np.int32))).join()
    compiles.clear()
    jax.block_until_ready(train_step(restored, np.zeros((1, 4, 33), np.int32)))
    assert compiles == [], "the train step compiled again for a restored state"


class _ListIterator:
    """A list as an iterator with Grain's get_state/set_state."""

    def __init__(self, items):
        self.items, self.position = items, 0

    def __next__(self):
        self.position += 1
        return self.items[self.position - 1]

    def get_state(self):
        return {"next_index": self.position}

    def set_state(self, state):
        self.position = state["next_index"]
