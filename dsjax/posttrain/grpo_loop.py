"""The GRPO stage: sample groups on the device, score them on the host, update with the clipped objective.

Each step takes `prompts_per_step` prompts from the held-out (valid) stories' instructions,
samples `group_size` completions of each at `grpo.temperature`, scores them
(`rewards`), turns rewards into group advantages and makes `updates_per_batch` (mu)
optimizer steps on the GRPO loss (`grpo`) against the frozen reference (the starting
final/'s params, never updated). Prompts come in a seeded order (a fresh permutation
per pass over the pool), and each (step, row) samples with its own seed, so a resumed
run draws exactly the batches an uninterrupted one would. Log-probs are the model's own
(temperature 1): at the default grpo.temperature of 1.0 the samples are on-policy.

Outputs, beside pretraining's: `outputs/<run>/metrics.csv` (one row per step,
`grpo_metrics.GRPO_COLUMNS`), `loss.png` (rewards and KL), `training_log.json`,
`samples.jsonl` (at each eval, `samples_per_eval` held-out completions with their
terms), and `checkpoints/<run>/step_N` (N = GRPO steps; saved at each eval, the last
step and on SIGTERM/Ctrl-C) and `final/`.

Meshes: dp, tp, ep and sp, as pretraining lays them out (`--gpus`, `--dp-size`, ...). The
state keeps pretraining's layout, each step's batch is split over dp x ep, and the
log-probs and the update run under the mesh; sampling runs on the same laid-out weights,
its rows split over dp x ep too where they divide (`sampling_rows`). Not pipeline
stages, and one process (`check_grpo_mesh`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import Config, ConfigError
from dsjax.data import layout
from dsjax.data.tokenizer import Tokenizer
from dsjax.posttrain import grpo as objective
from dsjax.posttrain.chat import ChatTokens
from dsjax.posttrain.grpo_metrics import GRPO_COLUMNS, plot_grpo
from dsjax.posttrain.instructions import heldout_split, instructions_from_stories
from dsjax.posttrain.rewards import TERMS, RewardSpec
from dsjax.posttrain.rollout import EVAL_STREAM, Completion, encode_prompts, rollouts, row_seeds
from dsjax.progress import console, training_progress
from dsjax.train import checkpoint, distributed, runs
from dsjax.train.checkpoint import CheckpointError, on_first_device, with_shardings
from dsjax.train.loop import TrainingDiverged, checkpoint_store
from dsjax.train.metrics import MetricsWriter
from dsjax.train.optimizer import make_optimizer
from dsjax.train.runs import RunPaths
from dsjax.train.signals import GracefulStop, StopRequested
from dsjax.train.step import TrainState, state_shardings_for
from meshes.mesh import BATCH_AXES, MeshError, MeshShape

log = logging.getLogger(__name__)

# grpo keys a resume must keep: they change which prompts and samples make each step's batch
RESUME_GRPO_KEYS = ("prompts_per_step", "group_size", "max_new_tokens", "eval_prompts", "temperature")


def check_grpo_mesh(config: Config, shape: MeshShape | None = None, processes: int = 1) -> None:
    """What GRPO's mesh cannot be, as one-line MeshErrors: pipeline stages, several processes,
    and (given the resolved `shape`) a step's prompts x group rows that do not split over dp x ep."""
    pp = config.distributed.pp_size
    if pp > 1:
        raise MeshError(f"the grpo stage runs on dp/tp/ep/sp meshes, not pipeline stages (pp_size={pp}); drop --pp-size")
    if processes > 1:
        raise MeshError(f"the grpo stage runs in one process (its samples are scored on that host), not {processes}")
    g = config.grpo
    if shape is not None and (g.prompts_per_step * g.group_size) % shape.data_parallel:
        raise MeshError(
            f"grpo: a step's {g.prompts_per_step} prompts x {g.group_size} samples = "
            f"{g.prompts_per_step * g.group_size} rows do not split over the data-parallel size dp*ep="
            f"{shape.dp}*{shape.ep}={shape.data_parallel}; change grpo.prompts_per_step or --group-size"
        )


def mesh_view(config: Config) -> Config:
    """The config the mesh checks see for GRPO: a step's prompts x group rows as the batch (the training
    block's batch_size is not GRPO's, and a refusal naming it would send the user the wrong way)."""
    g = config.grpo
    rows = g.prompts_per_step * g.group_size
    return dataclasses.replace(config, training=dataclasses.replace(config.training, batch_size=rows))


def sampling_rows(mesh, shape: MeshShape, count: int):
    """How `count` sampled rows lie on the mesh: split over dp x ep when they divide (each device decodes
    its own rows; the same tokens either way, since each row has its own seed), else whole on every device."""
    if mesh is None or shape.data_parallel == 1 or count % shape.data_parallel:
        return None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))


def grpo_training_config(config: Config):
    """The TrainingConfig the optimizer and schedule see: grpo's steps (x mu updates), learning rate and warmup."""
    g = config.grpo
    mu = g.updates_per_batch
    return dataclasses.replace(
        config.training, max_steps=g.max_steps * mu, learning_rate=g.learning_rate, warmup_steps=g.warmup_steps * mu
    )


@functools.lru_cache(maxsize=4)
def _pass_order(pool: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(pool)


def step_prompts(pool: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices into the prompt pool for GRPO step `step` (1-based): consecutive slices of per-pass permutations."""
    out = []
    for k in range((step - 1) * per_step, step * per_step):
        epoch, i = divmod(k, pool)
        out.append(int(_pass_order(pool, seed, epoch)[i]))
    return out


def build_batch(prompts: list[list[int]], completions: list[list[int]], length: int, pad_id: int):
    """(tokens [B, length] int32, mask [B, length - 1] float32): mask[t] = 1 where tokens[t + 1] was sampled."""
    B = len(prompts)
    tokens = np.full((B, length), pad_id, np.int32)
    mask = np.zeros((B, length - 1), np.float32)
    for r, (p, ids) in enumerate(zip(prompts, completions)):
        row = p + ids
        tokens[r, : len(row)] = row
        mask[r, len(p) - 1 : len(row) - 1] = 1.0
    return tokens, mask


def _model_config(final_config: Config, config: Config):
    """The starting final/'s model, with the compute-path keys of this run's config."""
    m = config.model
    return dataclasses.replace(final_config.model, moe_impl=m.moe_impl, attention_impl=m.attention_impl, remat=m.remat,
                               head_gradient_dtype=m.head_gradient_dtype)


def _term_means(completions: list[Completion], prefix: str = "") -> dict[str, float]:
    keys = ("reward", *TERMS)
    return {prefix + k: float(np.mean([c.terms[k] for c in completions])) for k in keys}


def grpo(
    config: Config, run_name: str, start_final_dir: Path, resume: bool = False, device_count: int | None = None
) -> dict:
    """Run the GRPO stage from `start_final_dir` (the SFT stage's final/); returns the training_log summary.

    `device_count`: devices for the mesh (all by default, as pretraining); the mesh flags shape it.
    """
    check_grpo_mesh(config, processes=jax.process_count())
    ref_params, final_config, tokenizer_path = checkpoint.load_final(Path(start_final_dir))
    config = dataclasses.replace(config, model=_model_config(final_config, config))
    mesh, shape = distributed.setup_mesh(mesh_view(config), device_count)
    check_grpo_mesh(config, shape, jax.process_count())
    paths = RunPaths.for_run(config, run_name)
    with checkpoint_store(config, paths) as store:
        return _run(config, run_name, Path(start_final_dir), resume, paths, store, ref_params, tokenizer_path, mesh, shape)


def _run(config: Config, run_name: str, start_final: Path, resume: bool, paths: RunPaths, store, ref_params,
         tokenizer_path: Path, mesh, shape: MeshShape) -> dict:
    g, t, c = config.grpo, config.training, config.model
    G, P, N, mu = g.group_size, g.prompts_per_step, g.max_new_tokens, g.updates_per_batch
    tokenizer = Tokenizer(tokenizer_path)
    chat = ChatTokens(tokenizer)
    spec = RewardSpec.from_config(g)
    valid_file = layout.split_file(Path(t.data_dir), "valid")
    layout.require_stories(valid_file)
    instructions = instructions_from_stories(valid_file, config.sft.with_features, t.seed)
    eval_set, pool = heldout_split(instructions, g.eval_prompts, t.seed)
    if len(pool) < P:
        raise layout.DataError(
            f"{valid_file}: {len(pool)} prompts left after grpo.eval_prompts={g.eval_prompts} for "
            f"grpo.prompts_per_step={P}; use more valid stories or fewer prompts"
        )
    pool_ids, eval_ids = encode_prompts(tokenizer, pool, chat), encode_prompts(tokenizer, eval_set, chat)
    # one shape for every batch (tokens, the sampler's cache and prefill): one compile per batch size
    length = max(map(len, pool_ids + eval_ids)) + N
    length += -(length - 1) % shape.sp  # the step's L - 1 positions split over sp
    shortest = min(map(len, pool_ids + eval_ids))
    if length > c.max_position_embeddings:
        raise ConfigError(
            f"grpo.max_new_tokens: the longest prompt ({length - N} tokens) plus {N} new tokens exceeds "
            f"model.max_position_embeddings={c.max_position_embeddings}; lower grpo.max_new_tokens"
        )
    log.info("grpo: %d prompts to train on, %d held out for evals; %d x %d samples per step", len(pool), len(eval_set), P, G)

    tcfg = grpo_training_config(config)
    optimizer = make_optimizer(tcfg)
    make_state = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p))  # noqa: E731
    abstract = jax.eval_shape(make_state, ref_params)
    shardings = None  # one device: where the reference was loaded
    if mesh is None:
        abstract = on_first_device(abstract)
    else:
        shardings = state_shardings_for(dataclasses.replace(config, training=tcfg), mesh, stages=1)
        log.info(distributed.describe(mesh, shape, config, abstract, shardings))
        ref_params = jax.device_put(ref_params, shardings.params)
        abstract = with_shardings(abstract, shardings)

    state, start_step, wall_before, last_eval = None, 0, 0.0, {}
    if resume:
        found = store.latest_restorable(abstract, config)
        if found is None:
            runs.check_nothing_to_lose(paths, run_name)
            log.warning("--resume: no checkpoint in %s; starting GRPO from %s", paths.checkpoints, start_final)
        else:
            start_step, (state, _, saved, saved_config) = found
            folder = checkpoint.step_dir(paths.checkpoints, start_step)
            _check_resume(folder, start_step, saved_config, config)
            wall_before = float(saved.get("wall_time_sec", 0.0))
            last_eval = saved.get("last_eval") or {}
            log.info("resumed GRPO from %s at step %d", folder, start_step)
    if state is None:
        # a copy: the step donates its state, and the reference must outlive it
        state = jax.jit(make_state, out_shardings=shardings)(jax.tree.map(jnp.copy, ref_params))

    writer = MetricsWriter(paths.outputs, resume=start_step > 0, columns=GRPO_COLUMNS)
    if start_step > 0:
        writer.truncate_after(start_step)
    samples_path = paths.outputs / "samples.jsonl"
    _truncate_samples(samples_path, start_step)
    (paths.outputs / "training_config.json").write_text(json.dumps(config.to_dict(), indent=2))

    ep_dispatch = config.distributed.ep_dispatch
    step_fn = objective.make_grpo_step(c, objective.ObjectiveSpec.from_config(g), tcfg, mesh=mesh, ep_dispatch=ep_dispatch)
    logprobs = objective.make_logprobs(c, mesh=mesh, ep_dispatch=ep_dispatch)
    place = (lambda b: b) if mesh is None else (lambda b: jax.device_put(b, objective.batch_shardings(b, mesh)))  # noqa: E731
    step_rows = sampling_rows(mesh, shape, P * G)
    eval_rows = sampling_rows(mesh, shape, len(eval_set))
    scale = g.loss_aggregation != "dr_grpo"  # Dr. GRPO drops the std division
    eval_seeds = row_seeds(t.seed, EVAL_STREAM, len(eval_set))
    run_start = time.perf_counter()

    def training_state(step: int) -> dict:
        return {
            "stage": "grpo",
            "step": step,
            "optimizer_steps": step * mu,
            "start_final": str(start_final),
            "last_eval": last_eval,
            "wall_time_sec": wall_before + time.perf_counter() - run_start,
            "jax_version": jax.__version__,
            "run_name": run_name,
        }

    def evaluate_now(step: int) -> dict:
        completions = rollouts(
            state.params, c, tokenizer, eval_set, eval_ids, spec, N, g.temperature, eval_seeds, chat, shortest, length,
            eval_rows,
        )
        with open(samples_path, "a") as f:
            for ins, comp in zip(eval_set[: g.samples_per_eval], completions):
                record = {"step": step, "prompt": ins.prompt, "words": list(ins.words), "completion": comp.text,
                          "stopped": comp.stopped, **comp.terms}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return _term_means(completions, "eval_")

    last_saved = start_step or None
    with training_progress() as progress, GracefulStop() as stop:
        task = progress.add_task("grpo", total=g.max_steps, completed=start_step, loss="-", lr="-", tps="-", eta=None)
        for step in range(start_step + 1, g.max_steps + 1):
            chosen = step_prompts(len(pool), step, P, t.seed)
            instructions = [pool[i] for i in chosen for _ in range(G)]
            prompts = [pool_ids[i] for i in chosen for _ in range(G)]
            started = time.perf_counter()
            completions = rollouts(
                state.params, c, tokenizer, instructions, prompts, spec, N, g.temperature,
                row_seeds(t.seed, step, P * G), chat, shortest, length, step_rows,
            )
            sample_sec = time.perf_counter() - started
            rewards = np.asarray([comp.terms["reward"] for comp in completions], np.float32).reshape(P, G)
            adv = objective.group_advantages(rewards, scale).reshape(-1)
            tokens, mask = build_batch(prompts, [comp.ids for comp in completions], length, tokenizer.pad_id)
            batch = place({"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask), "adv": adv})
            if mu > 1:
                batch["old"] = logprobs(state.params, batch["tokens"])
            if g.beta > 0:
                batch["ref"] = logprobs(ref_params, batch["tokens"])
            batch = place(batch)
            pending = []
            for _ in range(mu):
                state, metrics = step_fn(state, batch)
                pending.append(metrics)
            mean = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
            if not (math.isfinite(mean["loss"]) and math.isfinite(mean["grad_norm"])):
                kept = store.steps()
                where = str(checkpoint.step_dir(paths.checkpoints, kept[-1])) if kept else "none saved yet"
                raise TrainingDiverged(
                    f"GRPO diverged at step {step}: loss {mean['loss']:.4g}, grad norm {mean['grad_norm']:.4g} "
                    f"(NaN/inf); stopped. Last good checkpoint: {where}. Lower grpo.learning_rate."
                )
            sampled = sum(len(comp.ids) for comp in completions)
            row = {
                **{k: mean[k] for k in ("loss", "kl", "entropy", "clip_fraction", "lr", "grad_norm")},
                **_term_means(completions),
                "reward_std": float(rewards.std()),
                "response_tokens": sampled / len(completions),
                "tokens_per_sec": sampled / max(sample_sec, 1e-9),
            }
            is_last = step == g.max_steps
            # the step's own line first, then its held-out eval (as pretraining logs a step, then its val loss)
            log.info(
                "grpo step %d | reward %.3f +- %.3f | coverage %.3f | ending %.3f | kl %.4f | clip %.3f | %d tok/s",
                step, row["reward"], row["reward_std"], row["coverage"], row["ending"], row["kl"],
                row["clip_fraction"], row["tokens_per_sec"],
            )
            if step % g.eval_interval == 0 or is_last:
                last_eval = evaluate_now(step)
                row.update(last_eval)
                log.info("grpo step %d | held-out reward %.3f | coverage %.3f | ending %.3f",
                         step, last_eval["eval_reward"], last_eval["eval_coverage"], last_eval["eval_ending"])
            row.update(step=step, elapsed_sec=wall_before + time.perf_counter() - run_start)
            writer.write(row)
            progress.update(task, completed=step, loss=f"{row['loss']:.4f} reward {row['reward']:.3f}",
                            lr=f"{row['lr']:.2e}", tps=f"{row['tokens_per_sec']:,.0f}")
            if step % g.eval_interval == 0 or is_last or stop.requested:
                store.save(step, state, {"grpo_step": step}, training_state(step), config, tokenizer.path)
                last_saved = step
            if stop.requested:
                store.wait_until_finished()
                raise StopRequested(
                    stop.name, 128 + stop.signal_number,
                    f"received {stop.name}: finished GRPO step {step}, saved "
                    f"{checkpoint.step_dir(paths.checkpoints, last_saved)}; continue with --resume",
                )

    summary = training_state(g.max_steps)
    store.wait_until_finished()
    final_dir = checkpoint.save_final(paths.checkpoints, state.params, config, summary, tokenizer.path)
    plot = paths.outputs / "loss.png"
    if writer.complete or not (writer.log_path.exists() or plot.exists()):
        writer.write_log(summary)
        plot_grpo(writer.rows, plot, f"dsjax {run_name} (GRPO)")
    console.print(f"[bold green]done[/] final checkpoint: {final_dir}  metrics: {writer.csv_path}  samples: {samples_path}")
    return summary


def _check_resume(folder: Path, step: int, saved_config: dict, config: Config) -> None:
    runs.check_max_steps(step, folder, config.grpo.max_steps, "--grpo-steps")
    saved = (saved_config or {}).get("grpo", {})
    current = config.to_dict()["grpo"]
    changed = [
        f"grpo.{k} ({saved[k]!r} -> {current[k]!r})" for k in RESUME_GRPO_KEYS if k in saved and saved[k] != current[k]
    ]
    if changed:
        raise CheckpointError(
            f"cannot resume from {folder}: the config changed in keys that change GRPO's batches: {', '.join(changed)}. "
            "Use a new --run-name, or restore these values."
        )


def _truncate_samples(path: Path, step: int) -> None:
    """Fresh run: an empty samples.jsonl; resume: keep only the samples of steps up to the checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if step > 0 and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", math.inf) <= step:
                    kept.append(line)
            except ValueError:
                continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
