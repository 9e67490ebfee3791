"""`dsjax run --backend mlx`: the PRETRAIN loop on MLX, writing the same outputs/ and a JAX-loadable final/."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np

from dsjax.config import Config
from dsjax.data.pipeline import eval_batches, tokenize_split, train_dataset
from dsjax.data.tokenizer import load_or_train_tokenizer
from dsjax.mlx_backend.state import load_train_state, to_train_state
from dsjax.mlx_backend.train import MLXTrainer
from dsjax.progress import console, training_progress
from dsjax.train import checkpoint
from dsjax.train.metrics import MetricsWriter, finite, plot_losses
from dsjax.train.signals import GracefulStop, StopRequested
from dsjax.train.step import abstract_state

log = logging.getLogger(__name__)


def evaluate(trainer: MLXTrainer, split, config: Config) -> dict[str, float]:
    t = config.training
    nats = tokens = text_bytes = 0.0
    for windows, byte_counts, weight in eval_batches(split, t.seq_len, t.batch_size, t.eval_batches):
        n, k, b = trainer.eval_sums(windows, byte_counts, weight)
        nats, tokens, text_bytes = nats + n, tokens + k, text_bytes + b
    return {"val_loss": nats / tokens, "val_bpb": nats / (math.log(2) * text_bytes)}


def pretrain_mlx(config: Config, run_name: str, resume: bool = False) -> dict:
    from dsjax import model as jax_model  # the shared initialiser: both backends start from the same params
    from dsjax.mlx_backend import note_linux_speed

    note_linux_speed()

    t, c = config.training, config.model
    data_dir, work_dir = Path(t.data_dir), Path(t.work_dir)
    tokenizer = load_or_train_tokenizer(data_dir, work_dir, c.vocab_size)
    train_split = tokenize_split(data_dir / "train" / "stories.jsonl", tokenizer, work_dir, "train")
    valid_split = tokenize_split(data_dir / "valid" / "stories.jsonl", tokenizer, work_dir, "valid")
    accum, micro = t.gradient_accumulation_steps, t.batch_size
    data_iter = iter(train_dataset(train_split, t.seq_len, micro * accum, t.seed))
    params = jax.device_get(jax_model.init(c, jax.random.key(t.seed)))
    trainer = MLXTrainer(config, params)
    run_dir = Path(t.checkpoint_dir) / run_name
    store = checkpoint.CheckpointStore(run_dir, t.max_to_keep, t.keep_every)
    try:
        return _train(config, run_name, resume, tokenizer, valid_split, data_iter, trainer, store)
    finally:
        store.close()


def _train(config, run_name, resume, tokenizer, valid_split, data_iter, trainer, store) -> dict:
    t = config.training
    accum, micro = t.gradient_accumulation_steps, t.batch_size
    start_step = 0
    if resume:
        found = store.latest_restorable(abstract_state(config), config)
        if found is not None:
            step, (state, iter_state, _, _) = found
            load_train_state(trainer, state)
            data_iter.set_state(iter_state)
            start_step = step
            log.info("resumed from %s at step %d (mlx)", checkpoint.step_dir(store.run_dir, step), step)
    out_dir = Path(t.output_dir) / run_name
    writer = MetricsWriter(out_dir, resume=start_step > 0)
    if start_step:
        writer.truncate_after(start_step)
    (out_dir / "training_config.json").write_text(json.dumps({**config.to_dict(), "backend": "mlx"}, indent=2))
    tokens_per_step = micro * accum * t.seq_len
    pending: list[dict] = []
    start = time.perf_counter()
    interval_start, interval_steps, best_val, last_val = start, 0, math.inf, None
    def training_state(step: int) -> dict:
        return {"step": step, "tokens_seen": step * tokens_per_step, "best_val_loss": best_val if finite(best_val) else None,
                "val_loss": last_val, "wall_time_sec": time.perf_counter() - start, "backend": "mlx", "run_name": run_name}

    with training_progress() as progress, GracefulStop() as stop:
        task = progress.add_task("train", total=t.max_steps, completed=start_step, loss="-", lr="-", tps="-")
        for step in range(start_step + 1, t.max_steps + 1):
            batch = np.asarray(next(data_iter)).reshape(accum, micro, t.seq_len + 1)
            pending.append(trainer.train_step(batch))
            interval_steps += 1
            is_last = step == t.max_steps
            row: dict = {}
            if step % t.log_interval == 0 or is_last or stop.requested:
                mean = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
                pending = []
                if not (finite(mean["loss"]) and finite(mean["grad_norm"])):
                    raise RuntimeError(f"training diverged by step {step}: loss {mean['loss']}, grad norm {mean['grad_norm']}")
                now = time.perf_counter()
                tps = interval_steps * tokens_per_step / (now - interval_start)
                interval_start, interval_steps = now, 0
                row.update(mean, tokens_per_sec=tps)
                progress.update(task, loss=f"{mean['loss']:.4f}", lr=f"{mean['lr']:.2e}", tps=f"{tps:,.0f}")
                log.info("step %d | loss %.4f | ce %.4f | lr %.2e | %s tok/s (mlx)", step, mean["loss"], mean["ce_loss"], mean["lr"], f"{tps:,.0f}")
            if step % t.eval_interval == 0 or is_last:
                ev = evaluate(trainer, valid_split, config)
                best_val, last_val = min(best_val, ev["val_loss"]), ev["val_loss"]
                row.update(ev)
                log.info("step %d | val loss %.4f | val %.4f bits/byte (mlx)", step, ev["val_loss"], ev["val_bpb"])
                interval_start = time.perf_counter()
            if row:
                row.update(step=step, tokens_seen=step * tokens_per_step, elapsed_sec=time.perf_counter() - start)
                writer.write(row)
            if step % t.checkpoint_interval == 0 or is_last or stop.requested:
                state = to_train_state(config, trainer)
                store.save(step, state, data_iter.get_state(), training_state(step), config, tokenizer.path)
            progress.update(task, completed=step)
            if stop.requested:
                store.wait_until_finished()
                raise StopRequested(
                    stop.name, 128 + stop.signal_number,
                    f"received {stop.name}: finished step {step}, saved {checkpoint.step_dir(store.run_dir, step)}; "
                    "continue with --resume",
                )
    summary = training_state(t.max_steps)
    store.wait_until_finished()
    final_dir = checkpoint.save_final(store.run_dir, trainer.params_numpy(), config, summary, tokenizer.path)
    writer.write_log(summary)
    plot = plot_losses(writer.rows, out_dir / "loss.png", f"dsjax {run_name} (mlx)")
    console.print(f"[bold green]done[/] final checkpoint: {final_dir}  metrics: {writer.csv_path}  plot: {plot}")
    return summary
