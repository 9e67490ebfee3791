"""The PRETRAIN loop: data -> jitted steps -> eval, metrics, checkpoints, final/ and loss.png."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import Config
from dsjax.data import layout
from dsjax.data.pipeline import eval_batches, tokenize_split, train_dataset
from dsjax.train.optimizer import make_optimizer
from dsjax.data.tokenizer import Tokenizer, check_vocab, load_or_train_tokenizer, stash_tokenizer
from dsjax.progress import StepClock, console, training_progress
from dsjax.train import checkpoint, runs
from dsjax.train.metrics import MetricsWriter, finite, plot_losses
from dsjax.train.runs import RunPaths
from dsjax.train.signals import GracefulStop, StopRequested
from dsjax.train import distributed, precompile
from dsjax.train.checkpoint import on_first_device, with_shardings
from dsjax.train.loop_timing import HostLoopTimer
from dsjax.train.step import (
    TrainState,
    abstract_state,
    batch_sharding,
    checkpoint_converters,
    init_state,
    make_eval_step,
    make_train_step,
    microbatches_for,
    pipeline_stages,
    state_shardings_for,
)
from meshes.pipeline import bubble_fraction

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf; the last good checkpoint is intact."""


def evaluate(eval_step, params, batches, mesh=None) -> dict[str, float]:
    """Weighted next-token loss (nats/token) and bits per byte over `batches` of (windows_BT1, bytes_BT1, weight_BT)."""
    totals = jnp.zeros(3, jnp.float32)
    for batch in batches:
        totals = totals + jnp.stack(eval_step(params, *_eval_inputs(batch, mesh)))
    nats, tokens, text_bytes = (float(x) for x in totals)
    return {"val_loss": nats / tokens, "val_bpb": nats / (math.log(2) * text_bytes), "val_tokens": tokens}


def _eval_inputs(batch, mesh) -> tuple:
    """(windows, bytes, weight) as the eval step takes them: this process's rows as global arrays under a mesh."""
    if mesh is None:
        return tuple(batch)
    rows = distributed.eval_data_shardings(mesh)
    return tuple(distributed.to_global(distributed.local_rows(a), rows) for a in batch)


def story_eval_batches(split, config: Config):
    """The valid split's windows in order, every target weighted 1 (0 in the last batch's padding rows)."""
    t = config.training
    for windows, byte_counts, weight_B in eval_batches(split, t.seq_len, t.batch_size, t.eval_batches):
        yield windows, byte_counts, np.repeat(weight_B[:, None], t.seq_len, axis=1)


@dataclasses.dataclass
class TrainingJob:
    """What a training stage (pretrain, SFT, distill) hands the shared loop.

    data_iter yields this process's rows of one optimizer step: an array [rows, T + 1]
    or a pytree of arrays with leading `rows` (SFT: tokens and per-token weights), and has
    Grain's get_state/set_state for exact resume. eval_batches() yields
    (windows_BT1, bytes_BT1, weight_BT) for `evaluate`.
    """

    tokenizer: Tokenizer
    data_iter: Any
    eval_batches: Callable[[], Iterable]
    data_record: dict
    objective: Callable | None = None  # make_train_step's objective (default: pretraining's)
    step_args: tuple = ()  # extra step inputs that are not trained (distillation's teacher params)
    # step_args_shardings(mesh) -> their layouts on a mesh (they are laid out once, before training)
    step_args_shardings: Callable[[Any], tuple] | None = None
    init_params: Any = None  # start from these weights (canonical layout) instead of a fresh init
    title: str = "dsjax"
    stage: str = "pretrain"  # recorded in training_state.json (generate suggests --chat after sft)
    metric_columns: list[str] | None = None  # metrics.csv columns (default: pretraining's)
    steps_flag: str = "--max-steps"  # the flag that sets this stage's step count (for messages)


@jax.jit
def _add_metrics(total: dict, metrics: dict) -> dict:
    return jax.tree.map(jnp.add, total, metrics)


class RunningMetrics:
    """The steps' metrics summed on the device as they come, so a log step fetches one value per metric.

    Fetching every step's scalars instead cost 0.5 ms per step on an H200 machine's host,
    in a loop whose whole step is about 5 ms.
    """

    def __init__(self):
        self._total: dict | None = None
        self._count = 0

    def add(self, metrics: dict) -> None:
        self._total = metrics if self._total is None else _add_metrics(self._total, metrics)
        self._count += 1

    def __bool__(self) -> bool:
        return self._count > 0

    def mean_and_reset(self) -> dict[str, float]:
        total, count = jax.device_get(self._total), self._count
        self._total, self._count = None, 0
        return {k: float(v) / count for k, v in total.items()}


def peek(data_iter):
    """The iterator's next item, leaving it where it was (Grain's get_state/set_state)."""
    position = data_iter.get_state()
    item = next(data_iter)
    data_iter.set_state(position)
    return item


def train_state_specs(config: Config, shardings, stages: int):
    """A fresh train state's shapes, dtypes and (under a mesh, `shardings`) layout, as its step's cache key sees them."""
    abstract = abstract_state(config, stages)
    if shardings is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    return with_shardings(abstract, shardings)


def run_tokenizer(config: Config, paths: RunPaths, resume: bool) -> Tokenizer:
    """The tokenizer this run uses: on --resume always the checkpoint's own, else the data's (trained on first use)."""
    t = config.training
    if resume:
        saved = runs.find_tokenizer(paths.checkpoints)
        if saved is not None:
            tokenizer = stash_tokenizer(saved, Path(t.work_dir))
            check_vocab(tokenizer, config.model.vocab_size)
            log.info("resume: tokenizing with the checkpoint's tokenizer (%s)", saved)
            return tokenizer
    return load_or_train_tokenizer(Path(t.data_dir), Path(t.work_dir), config.model.vocab_size)


def pretrain(
    config: Config, run_name: str, resume: bool = False, device_count: int | None = None, allow_data_change: bool = False
) -> dict:
    """Train per `config`; returns the summary written to training_log.json."""
    t = config.training
    paths = RunPaths.for_run(config, run_name)
    data_dir = Path(t.data_dir)
    data_prints = layout.fingerprints(data_dir)
    tokenizer = run_tokenizer(config, paths, resume)
    data_iter, valid_split = story_data(config, tokenizer)
    data_record = {**data_prints, "tokenizer_sha256": layout.file_digest(tokenizer.path)}
    job = TrainingJob(
        tokenizer=tokenizer,
        data_iter=data_iter,
        eval_batches=lambda: story_eval_batches(valid_split, config),
        data_record=data_record,
        title=f"dsjax {run_name}",
    )
    return run_training(config, run_name, job, resume, device_count, allow_data_change)


def run_training(
    config: Config, run_name: str, job: TrainingJob, resume: bool = False, device_count: int | None = None,
    allow_data_change: bool = False,
) -> dict:
    """The shared loop of every training stage: steps, evals, metrics, checkpoints, final/ and the plot."""
    paths = RunPaths.for_run(config, run_name)
    mesh, shape = distributed.setup_mesh(config, device_count)
    with checkpoint_store(config, paths) as store:
        return _train(config, run_name, resume, paths, job, store, mesh, shape, allow_data_change)


@contextlib.contextmanager
def checkpoint_store(config: Config, paths: RunPaths):
    """The run's CheckpointStore; every exit path (normal end, error, signal) waits for the in-flight async save."""
    store = checkpoint.CheckpointStore(paths.checkpoints, config.training.max_to_keep, config.training.keep_every)
    try:
        yield store
    except BaseException:
        try:
            store.close()
        except Exception as err:  # noqa: BLE001 - keep the original error in front
            log.warning("while stopping: %s", err)
        raise
    store.close()


def story_data(config: Config, tokenizer: Tokenizer):
    """(the train batches' iterator, the valid split) of the stories in training.data_dir, tokenized (cached)."""
    t = config.training
    data_dir = Path(t.data_dir)
    train_split = tokenize_split(layout.split_file(data_dir, "train"), tokenizer, Path(t.work_dir), "train")
    valid_split = tokenize_split(layout.split_file(data_dir, "valid"), tokenizer, Path(t.work_dir), "valid")
    valid_split.windows(t.seq_len)  # a valid split too short for one window fails now, not at the first eval
    log.info(
        "data: %d train stories (%d tokens), %d valid stories (%d tokens)",
        train_split.stories, len(train_split.tokens), valid_split.stories, len(valid_split.tokens),
    )
    dataset = train_dataset(
        train_split, t.seq_len, t.batch_size * t.gradient_accumulation_steps, t.seed,
        jax.process_index(), jax.process_count(),
    )
    return iter(dataset), valid_split


def start_state(config: Config, params, mesh):
    """A fresh train state (step 0, new optimizer moments) around given weights, in the mesh's layout."""
    shardings = state_shardings_for(config, mesh, stages=1) if mesh is not None else None
    make = jax.jit(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=make_optimizer(config.training).init(p)),
        out_shardings=shardings,
    )
    return make(params)


def _train(config, run_name, resume, paths, job: TrainingJob, store, mesh, shape, allow_data_change) -> dict:
    t = config.training
    tokenizer, data_iter, data_record = job.tokenizer, job.data_iter, job.data_record
    accum, micro = t.gradient_accumulation_steps, t.batch_size
    stages = pipeline_stages(mesh)
    # checkpoints hold the canonical layout; with pp stages training holds a staged one
    abstract = abstract_state(config)
    shardings = state_shardings_for(config, mesh) if mesh is not None else None
    to_saved, to_train = checkpoint_converters(config, mesh)
    if mesh is not None:
        log.info(distributed.describe(mesh, shape, config, abstract_state(config, stages), shardings))
        if stages > 1:
            M, R = microbatches_for(config, mesh), config.distributed.pipeline_repeats
            log.info(
                "pipeline: %d stages x %d layer group(s) (%s), %d microbatches per step, bubble %.0f%%",
                stages, R, "GPipe" if R == 1 else "circular", M, 100 * bubble_fraction(stages, M, R),
            )
        abstract = with_shardings(abstract, state_shardings_for(config, mesh, stages=1))
    else:
        abstract = on_first_device(abstract)  # so a checkpoint written by a mesh restores onto one device
    extras_shardings = job.step_args_shardings(mesh) if mesh is not None and job.step_args_shardings else None
    train_step = make_train_step(config, mesh=mesh, objective=job.objective, extras_shardings=extras_shardings)
    step_args = job.step_args
    if extras_shardings is not None:
        # through the host: they may sit on one device, and every process holds the whole value
        step_args = jax.device_put(jax.device_get(tuple(step_args)), tuple(extras_shardings))
    batch_layout = batch_sharding(mesh) if mesh is not None else None
    local_micro = micro // jax.process_count()

    def step_batch(rows):
        """One optimizer step's batch [A, B, T+1] (or a pytree of such) from this process's rows, laid out."""
        local = jax.tree.map(lambda r: np.asarray(r).reshape(accum, local_micro, *np.shape(r)[1:]), rows)
        return distributed.to_global(local, batch_layout)

    state = None
    start_step, tokens_seen, wall_before = 0, 0, 0.0
    best_val, last_val, last_val_step = math.inf, None, None
    if resume:
        found = store.latest_restorable(abstract, config)
        if found is None:
            runs.check_nothing_to_lose(paths, run_name)
            log.warning("--resume: no checkpoint in %s; starting from scratch", paths.checkpoints)
        else:
            step, (state, iter_state, saved, _) = found
            folder = checkpoint.step_dir(paths.checkpoints, step)
            runs.check_max_steps(step, folder, t.max_steps, job.steps_flag)
            changed = runs.check_same_data(saved, folder, data_record, allow_data_change)
            _check_same_tokenizer(saved, folder, data_record)
            state = to_train(state)
            if changed:
                log.warning(
                    "--allow-data-change: %s was trained on %s; continuing on %s with the checkpoint's tokenizer, "
                    "from the new data's first batch",
                    folder, layout.describe_fingerprints(saved["data"]), layout.describe_fingerprints(data_record),
                )
            else:
                data_iter.set_state(iter_state)
            start_step = int(state.step)
            tokens_seen = int(saved.get("tokens_seen", 0))
            wall_before = float(saved.get("wall_time_sec", 0.0))
            best_val = saved.get("best_val_loss") or math.inf
            last_val = saved.get("val_loss")
            last_val_step = saved.get("last_val_step")
            log.info("resumed from %s at step %d", folder, start_step)
    # the train step compiles on a background thread while a fresh state is initialised (after a
    # resume's checks, so a refused resume does not wait for it); the loop waits for it before the
    # first step, so it never compiles twice
    step_specs = (
        train_state_specs(config, shardings, stages) if state is None else precompile.call_specs(state),
        precompile.call_specs(step_batch(peek(data_iter))),
        *precompile.call_specs(tuple(step_args)),
    )
    step_compile = precompile.start(getattr(train_step, "jitted", train_step), step_specs, mesh)
    if state is None and job.init_params is not None:
        state = to_train(start_state(config, job.init_params, mesh))
    elif state is None:
        init = jax.jit(init_state, static_argnums=(0, 2), out_shardings=shardings)
        state = init(config, jax.random.key(t.seed), stages)

    primary = distributed.is_primary()
    writer = MetricsWriter(paths.outputs, resume=start_step > 0, enabled=primary, columns=job.metric_columns)
    if start_step > 0:
        writer.truncate_after(start_step)
    if primary:
        (paths.outputs / "training_config.json").write_text(json.dumps(config.to_dict(), indent=2))

    if accum > 1:
        log.info(
            "gradient accumulation: %d microbatches of %d %s (training.accumulation=%s)", accum, micro,
            "run as one batch" if train_step.accumulation == "fold" else "one after another", t.accumulation,
        )
    eval_step = make_eval_step(config, mesh=mesh)
    # the first eval's compile, made on a background thread once training runs (the state's
    # buffers are donated by the first step, so their specs are taken now)
    eval_specs = (precompile.call_specs(state.params), *_eval_inputs(next(iter(job.eval_batches())), mesh))
    tokens_per_step = micro * accum * t.seq_len
    pending = RunningMetrics()
    run_start = time.perf_counter()
    interval_start, interval_steps = run_start, 0

    def training_state(step: int) -> dict:
        return {
            "step": step,
            "tokens_seen": tokens_seen,
            "best_val_loss": best_val if finite(best_val) else None,
            "val_loss": last_val,  # the latest eval's; last_val_step says which step ran it
            "last_val_step": last_val_step,
            "checkpoint_blocking_sec": store.blocking_seconds,
            "wall_time_sec": wall_before + time.perf_counter() - run_start,
            "jax_version": jax.__version__,
            "run_name": run_name,
            "stage": job.stage,
            "data": data_record,  # what --resume checks: the data's and the tokenizer's fingerprints
        }

    def flush(step: int) -> dict[str, float]:
        if not pending:
            return {}
        host.start()
        mean = pending.mean_and_reset()
        host.lap("metrics")
        if not (finite(mean["loss"]) and finite(mean["grad_norm"])):
            store.wait_until_finished()
            kept = store.steps()
            where = str(checkpoint.step_dir(paths.checkpoints, kept[-1])) if kept else "none saved yet"
            raise TrainingDiverged(
                f"training diverged by step {step}: loss {mean['loss']:.4g}, grad norm {mean['grad_norm']:.4g} "
                f"(NaN/inf); stopped. Last good checkpoint: {where}. Lower --learning-rate or raise warmup_steps."
            )
        return mean

    last_saved = start_step if start_step else None
    clock = StepClock()
    host = HostLoopTimer()
    done_step, in_flight = start_step, None
    with training_progress() as progress, GracefulStop() as stop:
        task = progress.add_task(
            "train", total=t.max_steps, completed=start_step, loss="-", lr="-", tps="-", eta=clock.eta(0)
        )

        def step_done(step: int) -> None:
            """Advance the bar as the device finishes each step (in loop order; no metrics are fetched)."""
            nonlocal done_step
            if step > done_step:
                done_step = step
                clock.step_done()
                progress.update(task, completed=step, eta=clock.eta(t.max_steps - step))

        for step in range(start_step + 1, t.max_steps + 1):
            timed = step > start_step + 1  # the first step compiles
            host.start()
            batch = step_batch(next(data_iter))
            host.lap("data", counted=timed)
            if not timed:
                step_compile.join()
            state, metrics = train_step(state, batch, *step_args)
            host.lap("call", counted=timed)
            if timed:
                host.step_timed()
            pending.add(metrics)
            host.lap("metrics", counted=timed)
            if step == start_step + 1:
                precompile.start(getattr(eval_step, "jitted", eval_step), eval_specs, mesh)
            # keep one step queued behind the running one: wait (no transfer) for the previous step,
            # so the Python loop, and the bar, run at most one step ahead of the device
            if in_flight is not None:
                jax.block_until_ready(in_flight)
                host.lap("waiting", counted=step > start_step + 2)  # step 1's wait is its compile's run
                step_done(step - 1)
            in_flight = metrics["loss"]
            tokens_seen += tokens_per_step
            interval_steps += 1
            is_last = step == t.max_steps
            row: dict = {}
            if step % t.log_interval == 0 or is_last or stop.requested:
                mean = flush(step)
                step_done(step)
                now = time.perf_counter()
                tps = interval_steps * tokens_per_step / (now - interval_start)
                interval_start, interval_steps = now, 0
                row.update(mean, tokens_per_sec=tps)
                progress.update(task, loss=f"{mean['loss']:.4f}", lr=f"{mean['lr']:.2e}", tps=f"{tps:,.0f}")
                log.info(
                    "step %d | loss %.4f | ce %.4f | lr %.2e | grad %.3f | %s tok/s",
                    step, mean["loss"], mean["ce_loss"], mean["lr"], mean["grad_norm"], f"{tps:,.0f}",
                )
            if step % t.eval_interval == 0 or is_last:
                flush(step)
                step_done(step)
                ev = evaluate(eval_step, state.params, job.eval_batches(), mesh)
                best_val, last_val, last_val_step = min(best_val, ev["val_loss"]), ev["val_loss"], step
                row.update(val_loss=ev["val_loss"], val_bpb=ev["val_bpb"])
                log.info("step %d | val loss %.4f | val %.4f bits/byte", step, ev["val_loss"], ev["val_bpb"])
                interval_start = time.perf_counter()  # eval time is not training throughput
                clock.restart()  # nor is it in the ETA
            if row:
                row.update(step=step, tokens_seen=tokens_seen, elapsed_sec=wall_before + time.perf_counter() - run_start)
                writer.write(row)
            if step % t.checkpoint_interval == 0 or is_last or stop.requested:
                flush(step)
                step_done(step)
                store.save(step, to_saved(state), data_iter.get_state(), training_state(step), config, tokenizer.path)
                last_saved = step
                log.debug("saving %s", checkpoint.step_dir(paths.checkpoints, step))
                clock.restart()
            if done_step == step:
                in_flight = None
            if stop.requested:
                store.wait_until_finished()
                where = checkpoint.step_dir(paths.checkpoints, last_saved)
                raise StopRequested(
                    stop.name, 128 + stop.signal_number,
                    f"received {stop.name}: finished step {step}, saved {where}; continue with --resume",
                )

    summary = training_state(t.max_steps)
    store.wait_until_finished()
    summary["checkpoint_blocking_sec"] = store.blocking_seconds
    if host.steps:
        summary["host_loop_ms_per_step"] = host.ms_per_step()
        log.info("%s", host.describe())
    final_dir = checkpoint.save_final(paths.checkpoints, to_saved(state).params, config, summary, tokenizer.path)
    log.info("checkpointing blocked training for %.2fs over %d saves", store.blocking_seconds, store.saves)
    if primary:
        plot = paths.outputs / "loss.png"
        if writer.complete or not (writer.log_path.exists() or plot.exists()):
            writer.write_log(summary)
            plot_losses(writer.rows, plot, job.title)
        else:
            log.warning(
                "%s has no rows before step %d, so %s and %s were left as they were (they are rewritten only "
                "from the whole history)", writer.csv_path, writer.first_step, writer.log_path.name, plot.name,
            )
        console.print(f"[bold green]done[/] final checkpoint: {final_dir}  metrics: {writer.csv_path}  plot: {plot}")
    return summary


def _check_same_tokenizer(saved: dict, folder: Path, data_record: dict) -> None:
    recorded = (saved.get("data") or {}).get("tokenizer_sha256")
    if recorded and recorded != data_record["tokenizer_sha256"]:
        raise checkpoint.CheckpointError(
            f"cannot resume from {folder}: it was trained with tokenizer {recorded}, but this run's tokenizer is "
            f"{data_record['tokenizer_sha256']} (the run's step folders disagree); use a new --run-name"
        )
