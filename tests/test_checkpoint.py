"""Checkpoints: exact resume after SIGKILL/SIGTERM, corruption fallback, resharding, write failures."""

import csv
import dataclasses
import gc
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsjax import model
from dsjax.cli import main
from dsjax.config import config_from_dict, load_config
from dsjax.train import checkpoint
from dsjax.train.checkpoint import CheckpointError, CheckpointStore, with_shardings
from dsjax.train.step import abstract_state, init_state

SMALL = {"model": {"num_hidden_layers": 2}}
LOSS_COLUMNS = ["step", "loss", "ce_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "expert_imbalance"]


def small_config():
    return config_from_dict(SMALL, load_config("nano"))


# --- in-process: retention, corruption, config changes, resharding --------------------------


def saved_store(tmp_path, steps=(1, 2, 3), **kwargs):
    config = small_config()
    store = CheckpointStore(tmp_path / "run", max_to_keep=kwargs.pop("max_to_keep", 5), **kwargs)
    for step in steps:
        state = init_state(config, jax.random.key(step))
        store.save(step, state, {"next_index": step}, {"step": step, "val_loss": 5.0 - step}, config)
    store.wait_until_finished()
    return store, config


def test_retention_keeps_newest_and_every_nth(tmp_path):
    store, _ = saved_store(tmp_path, steps=range(1, 9), max_to_keep=2, keep_every=4)
    assert store.steps() == [4, 7, 8]
    assert (tmp_path / "run/step_8/config.json").is_file()
    assert json.loads((tmp_path / "run/step_8/training_state.json").read_text())["step"] == 8
    store.close()


def test_truncated_newest_falls_back_to_previous(tmp_path, caplog):
    store, config = saved_store(tmp_path)
    data_files = [f for f in (tmp_path / "run/step_3/state").rglob("*") if f.is_file() and f.stat().st_size > 1000]
    biggest = max(data_files, key=lambda f: f.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    step, (state, iter_state, saved, _) = store.latest_restorable(abstract_state(config), config)
    assert step == 2 and iter_state == {"next_index": 2} and saved["step"] == 2
    assert "step_3 is incomplete or corrupted" in caplog.text
    assert (tmp_path / "run/corrupt_step_3").is_dir()  # set aside, not deleted
    expected = init_state(config, jax.random.key(2))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    store.close()


def test_a_failed_read_reports_one_error_and_leaves_nothing_behind(tmp_path, monkeypatch, caplog):
    """Orbax abandons its other reads when one fails; their late reports ("Exception ignored in
    <coroutine>", "Event loop is closed", "Task exception was never retrieved") must not reach the user."""
    params = model.init(small_config().model, jax.random.key(0))
    ocp = checkpoint.ocp
    with ocp.StandardCheckpointer() as writer:
        writer.save(tmp_path / "params", params)
        writer.wait_until_finished()
    data_files = [f for f in (tmp_path / "params").rglob("*") if f.is_file()]
    biggest = max(data_files, key=lambda f: f.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    gc.collect()  # leftovers of earlier tests' failed reads go to the hook they were meant for
    reported, dropped = [], []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)  # pytest's own hook is put back after

    is_abandoned_read = checkpoint._is_abandoned_read

    def spy(unraisable):
        dropped.append(is_abandoned_read(unraisable))
        return dropped[-1]

    monkeypatch.setattr(checkpoint, "_is_abandoned_read", spy)
    # as in a process whose earlier read failed: an earlier test's abandoned reads can report at any
    # later time (TensorStore's threads finish them), and replacing the hook above removed their filter
    checkpoint._drop_reports_of_abandoned_reads()
    abstract = model.abstract_params(small_config().model)
    for _ in range(40):  # how many reads are still in flight when one fails varies from read to read
        with pytest.raises(checkpoint.UnreadableArrays, match=r"^Exception: Encountered error while reading array"):
            checkpoint.read_arrays(lambda: ocp.StandardCheckpointer().restore(tmp_path / "params", abstract))
        time.sleep(0.05)  # TensorStore's threads finish the abandoned reads
        gc.collect()
        if dropped:
            break
    time.sleep(0.5)
    gc.collect()
    assert reported == [] and "never retrieved" not in caplog.text
    assert any(dropped), "no leftovers were produced, so this test shows nothing"


def test_deleted_file_and_unfinished_write_are_skipped(tmp_path, caplog):
    store, config = saved_store(tmp_path)
    (tmp_path / "run/step_3/config/metadata").unlink()
    os.rename(tmp_path / "run/step_2", tmp_path / "run/step_2.orbax-checkpoint-tmp-123")  # a write that never committed
    store.manager.reload()
    step, _ = store.latest_restorable(abstract_state(config), config)
    assert step == 1
    assert "step_3" in caplog.text
    store.close()


def test_resume_refuses_a_config_that_changes_the_model(tmp_path):
    store, config = saved_store(tmp_path)
    changed = config_from_dict({"model": {"hidden_size": 64}, "training": {"max_steps": 999}}, config)
    with pytest.raises(CheckpointError, match=r"model.hidden_size \(128 -> 64\)") as err:
        store.latest_restorable(abstract_state(changed), changed)
    assert "max_steps" not in str(err.value)  # training-only keys may change
    assert store.steps() == [1, 2, 3]  # nothing was set aside
    store.close()


def _shard_first_divisible_axis(mesh, leaf):
    for axis, size in enumerate(leaf.shape):
        if size % 8 == 0:
            spec = [None] * len(leaf.shape)
            spec[axis] = "x"
            return NamedSharding(mesh, PartitionSpec(*spec))
    return NamedSharding(mesh, PartitionSpec())


def test_restore_onto_more_and_fewer_devices(tmp_path):
    assert jax.device_count() == 8
    config = small_config()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    window = jax.random.randint(jax.random.key(9), (8, 33), 0, config.model.vocab_size)
    loss = jax.jit(lambda p: model.loss_fn(p, window, config.model)[0])
    state = init_state(config, jax.random.key(0))
    reference = float(loss(state.params))

    one = CheckpointStore(tmp_path / "one", max_to_keep=2)
    one.save(1, state, {}, {"step": 1}, config)
    one.wait_until_finished()
    abstract = abstract_state(config)
    shardings = jax.tree.map(lambda a: _shard_first_divisible_axis(mesh, a), abstract)
    _, (on_eight, *_ ) = one.latest_restorable(with_shardings(abstract, shardings), config)
    embedding = on_eight.params["embed_tokens"]["embedding"]
    assert len(embedding.sharding.device_set) == 8
    assert embedding.addressable_shards[0].data.shape == (4096 // 8, 128)
    np.testing.assert_allclose(float(loss(on_eight.params)), reference, rtol=1e-6)

    eight = CheckpointStore(tmp_path / "eight", max_to_keep=2)
    eight.save(1, on_eight, {}, {"step": 1}, config)
    eight.wait_until_finished()
    single = jax.tree.map(lambda a: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    _, (back, *_ ) = eight.latest_restorable(with_shardings(abstract, single), config)
    assert len(back.params["embed_tokens"]["embedding"].sharding.device_set) == 1
    np.testing.assert_allclose(float(loss(back.params)), reference, rtol=1e-6)
    one.close()
    eight.close()


def test_a_final_written_on_eight_devices_loads_where_there_is_one(tmp_path):
    """A final/ saved from params split over 8 devices (a mesh run's) loads in a process that has one device
    (generate, export, eval, the next stage's start); Orbax would otherwise ask for the saved topology."""
    config = small_config()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    params = init_state(config, jax.random.key(0)).params
    split = jax.device_put(params, jax.tree.map(lambda a: _shard_first_divisible_axis(mesh, a), params))
    assert len(split["embed_tokens"]["embedding"].sharding.device_set) == 8
    (tmp_path / "tokenizer.model").write_bytes(b"a tokenizer")
    final = checkpoint.save_final(tmp_path / "run", split, config, {"step": 1}, tmp_path / "tokenizer.model")
    script = textwrap.dedent(
        """
        import sys
        import jax
        import numpy as np
        from dsjax.train.checkpoint import load_final
        assert jax.device_count() == 1
        params, _, _ = load_final(sys.argv[1])
        leaf = params["embed_tokens"]["embedding"]
        print("LOADED", len(leaf.sharding.device_set), float(np.asarray(leaf).sum()))
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script, str(final)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    devices, total = result.stdout.split("LOADED")[1].split()
    assert devices == "1"
    assert float(total) == pytest.approx(float(np.asarray(params["embed_tokens"]["embedding"]).sum()), rel=1e-6)


def test_write_failure_keeps_previous_checkpoint_and_says_so(tmp_path):
    """A real OS write failure (file-size limit, like a full disk) during an async save."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import jax
        from dsjax.config import config_from_dict, load_config
        from dsjax.train.checkpoint import CheckpointStore, CheckpointError
        from dsjax.train.step import init_state
        config = config_from_dict({SMALL!r}, load_config("nano"))
        store = CheckpointStore(sys.argv[1], max_to_keep=3)
        store.save(1, init_state(config, jax.random.key(1)), {{}}, {{"step": 1}}, config)
        store.wait_until_finished()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            store.save(2, init_state(config, jax.random.key(2)), {{}}, {{"step": 2}}, config)
            store.wait_until_finished()
        except CheckpointError as err:
            print("CHECKPOINT_ERROR", err)
            sys.exit(4)
        print("NO ERROR")
        """
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stdout + result.stderr[-3000:]
    assert "could not write checkpoint" in result.stdout and "step_1 is intact" in result.stdout
    config = small_config()
    store = CheckpointStore(tmp_path / "run", max_to_keep=3)
    step, (state, *_ ) = store.latest_restorable(abstract_state(config), config)
    assert step == 1
    np.testing.assert_array_equal(
        np.asarray(state.params["norm"]["scale"]), np.asarray(init_state(config, jax.random.key(1)).params["norm"]["scale"])
    )
    store.close()


# --- subprocess: kill a real training run and resume it --------------------------------------

MAX_STEPS = 24


@pytest.fixture(scope="module")
def run_env(tmp_path_factory, tinystories_dir):
    root = tmp_path_factory.mktemp("exact")
    config = root / "small.json"
    config.write_text(json.dumps(SMALL))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it
    # as a user runs it: compiled programs kept in <work-dir>/jax_cache, so the resumed runs load them
    for name in ("DSJAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR"):
        env.pop(name, None)
    return root, config, env, tinystories_dir


def run_args(root, config, data_dir, name, *extra):
    return [
        sys.executable, "-m", "dsjax", "run", "--model-size", "nano", "--config", str(config),
        "--data-dir", str(data_dir), "--work-dir", str(root / "data"), "--checkpoint-dir", str(root / "ck"),
        "--output-dir", str(root / "out"), "--run-name", name, "--batch-size", "8", "--seq-len", "64",
        "--log-interval", "1", "--checkpoint-interval", "4", "--eval-interval", "1000", "--eval-batches", "2",
        "--warmup-steps", "4", "--max-steps", str(MAX_STEPS), *extra,
    ]


def loss_rows(root, name):
    with open(root / "out" / name / "metrics.csv") as f:
        return [tuple(row[c] for c in LOSS_COLUMNS) for row in csv.DictReader(f)]


def final_params(root, name):
    params, _, _ = checkpoint.load_final(root / "ck" / name / "final")
    return params


@pytest.fixture(scope="module")
def straight(run_env):
    root, config, env, data = run_env
    result = subprocess.run(run_args(root, config, data, "straight"), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # the train step went to the default compile cache, where the resumed runs below find it
    assert any(p.name.startswith("jit_train_step") for p in (root / "data" / "jax_cache").iterdir())
    return loss_rows(root, "straight"), final_params(root, "straight")


def finished_checkpoints(folder: Path) -> list[str]:
    """step_N folders Orbax has finished writing (one still being written carries a tmp suffix)."""
    return [p.name for p in folder.glob("step_*") if p.name.split("_")[-1].isdigit()] if folder.is_dir() else []


def start_and_signal(run_env, name, signum, at_step, after_a_checkpoint=False):
    """Start a run, wait until metrics.csv shows `at_step` (and, if asked, a finished step_N), then send `signum`.

    Checkpoints are written in the background, so a step past the first checkpoint's step
    does not mean that checkpoint is complete yet.
    """
    root, config, env, data = run_env
    proc = subprocess.Popen(run_args(root, config, data, name), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv_path = root / "out" / name / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if csv_path.is_file() and len(csv_path.read_text().splitlines()) - 1 >= at_step:
            if not after_a_checkpoint or finished_checkpoints(root / "ck" / name):
                break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be signalled"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


def resume(run_env, name):
    root, config, env, data = run_env
    result = subprocess.run(run_args(root, config, data, name, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def assert_same_run(run_env, name, straight):
    root = run_env[0]
    rows, params = straight
    assert loss_rows(root, name) == rows  # every step's losses, bit for bit (as printed floats)
    for a, b in zip(jax.tree.leaves(final_params(root, name)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigkill_then_resume_is_bitwise_identical(run_env, straight):
    kill_at = random.Random().randint(5, MAX_STEPS - 6)  # after the first checkpoint (step 4)
    code, _ = start_and_signal(run_env, "killed", signal.SIGKILL, kill_at, after_a_checkpoint=True)
    assert code == -signal.SIGKILL
    log = resume(run_env, "killed")
    assert "resumed from" in log
    assert_same_run(run_env, "killed", straight)


def test_sigterm_saves_exits_and_resumes_bitwise_identical(run_env, straight):
    stop_at = random.Random().randint(2, MAX_STEPS - 6)
    code, err = start_and_signal(run_env, "termed", signal.SIGTERM, stop_at)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "received SIGTERM" in err and "continue with --resume" in err
    root = run_env[0]
    saved = [p.name for p in (root / "ck/termed").iterdir() if p.name.startswith("step_")]
    assert saved, "SIGTERM must leave a checkpoint"
    resume(run_env, "termed")
    assert_same_run(run_env, "termed", straight)


def test_checkpoints_ls_lists_steps(run_env, straight, capsys):
    root = run_env[0]
    assert main(["checkpoints", "ls", str(root / "ck/straight")]) == 0
    out = capsys.readouterr().out
    assert "step_24" in out and "final" in out and "yes" in out
    assert "step_4 " not in out  # max_to_keep=3 removed it


def test_asyncio_reports_of_abandoned_reads_are_dropped_and_others_kept():
    """The forms asyncio logs an abandoned read in (a task, a future, the gather of them: each seen in CI)."""
    keep = checkpoint._DropAbandonedReadLogs().filter

    def record(message):
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, message, None, None)

    assert not keep(record("Task exception was never retrieved\nfuture: <Task ... coro=<orbax ... read()>>"))
    assert not keep(record('_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished '
                           'exception=Exception("Encountered error while reading array index: (slice(0, 128, 1),)")>'))
    assert not keep(record("Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
                           "'OUT_OF_RANGE: Error reading \"lm_head.kernel/0.0\" in OCDBT database at local file')>"))
    assert keep(record("Task exception was never retrieved\nfuture: <Task coro=<my_own_task()>>"))
    assert keep(record("_GatheringFuture exception was never retrieved\nfuture: <... exception=KeyError('x')>"))
    assert keep(record("Unclosed event loop"))


def test_a_callback_into_the_closed_loop_counts_as_an_abandoned_read_whichever_call_made_it():
    """TensorStore's threads finishing abandoned reads call into Orbax's closed loop; asyncio raises from _check_closed."""
    import asyncio
    import types as pytypes

    loop = asyncio.new_event_loop()
    loop.close()

    def raised_by(call):
        try:
            call(lambda: None)
        except RuntimeError as err:
            return pytypes.SimpleNamespace(object=None, exc_type=RuntimeError, exc_value=err, exc_traceback=err.__traceback__)

    assert checkpoint._is_abandoned_read(raised_by(loop.call_soon_threadsafe))
    assert checkpoint._is_abandoned_read(raised_by(loop.call_soon))
    try:
        raise RuntimeError("Event loop is closed")  # the same words from elsewhere: reported
    except RuntimeError as err:
        own = pytypes.SimpleNamespace(object=None, exc_type=RuntimeError, exc_value=err, exc_traceback=err.__traceback__)
    assert not checkpoint._is_abandoned_read(own)
