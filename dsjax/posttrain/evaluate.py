"""`dsjax eval`: instruction following and plain-story modelling of final/ checkpoints, with 95% intervals.

For a checkpoint, on the first `prompts` held-out prompts (`instructions.heldout_split`
of the valid stories with `seed`: the set GRPO evaluates on and never trains on when
prompts <= grpo.eval_prompts):

- `samples` completions per prompt, sampled at temperature 1.0 (GRPO's sampling
  distribution) with fixed per-row seeds, so every checkpoint is scored on the same
  prompts with the same random streams. Sampling rather than greedy decoding: small
  models decode greedily into loops, which would score every checkpoint alike and hide
  what training changed.
- word coverage, clean-ending rate, mean reward (and the length and repetition terms,
  and words per completion): each a mean over prompts of the prompt's mean over its samples.
- val bits/byte on plain valid stories: every seq_len window of the valid split (or the
  first training.eval_batches batches), next-token nats summed over the UTF-8 bytes.

Each number carries a 95% percentile-bootstrap interval (1000 resamples, fixed seed) over
prompts (bits/byte: over windows, as a ratio of sums). `compare` scores several
checkpoints on the same prompts and windows and gives paired bootstrap intervals of
each difference (the same resampled prompts for both), marking those that exclude 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import model
from dsjax.config import ModelConfig
from dsjax.data import layout
from dsjax.data.pipeline import tokenize_split
from dsjax.data.tokenizer import Tokenizer
from dsjax.posttrain.chat import ChatTokens
from dsjax.posttrain.instructions import heldout_split, instructions_from_stories
from dsjax.posttrain.rewards import TERMS, RewardSpec
from dsjax.posttrain.rollout import EVAL_STREAM, encode_prompts, rollouts, row_seeds
from dsjax.train.checkpoint import load_final

RESAMPLES = 1000
BOOTSTRAP_SEED = 0
METRICS = ("coverage", "ending", "reward", "length", "repetition", "words")
LABELS = {"coverage": "word coverage", "ending": "clean ending", "reward": "mean reward", "val_bpb": "val bits/byte"}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    prompts: int = 64
    samples: int = 4  # completions per prompt
    seed: int = 0  # picks the held-out prompts and the sampling streams (GRPO's evals: training.seed)
    temperature: float = 1.0
    max_new_tokens: int = 160
    reward: RewardSpec = RewardSpec()
    with_features: bool = True
    # val bits/byte windows: one length for every checkpoint compared (an SFT final records its own, longer
    # seq_len), so their windows pair up; 0 = each checkpoint's training.seq_len
    seq_len: int = 0

    @classmethod
    def from_config(cls, config, **changes) -> "EvalSettings":
        """GRPO's eval settings of a run config (its held-out prompts: seed = training.seed), with `changes`."""
        g = config.grpo
        base = cls(
            seed=config.training.seed, max_new_tokens=g.max_new_tokens, reward=RewardSpec.from_config(g),
            with_features=config.sft.with_features, seq_len=config.training.seq_len,
        )
        return dataclasses.replace(base, **changes)


@dataclasses.dataclass
class CheckpointScores:
    label: str
    path: str
    per_prompt: dict[str, np.ndarray]  # metric -> [prompts]
    nats: np.ndarray  # [windows] summed next-token nats
    bytes: np.ndarray  # [windows] UTF-8 bytes covered

    def summary(self) -> dict:
        out = {k: _interval(v.mean(), bootstrap(v, np.mean)) for k, v in self.per_prompt.items()}
        out["val_bpb"] = _interval(bits_per_byte(self.nats, self.bytes), bootstrap_ratio(self.nats, self.bytes))
        return out


def _interval(value: float, ci: tuple[float, float]) -> dict:
    return {"mean": float(value), "low": float(ci[0]), "high": float(ci[1])}


def _indices(n: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap(values: np.ndarray, stat: Callable = np.mean, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED):
    """95% percentile-bootstrap interval of stat(values)."""
    values = np.asarray(values, np.float64)
    stats = stat(values[_indices(len(values), resamples, seed)], axis=1)
    return tuple(np.percentile(stats, [2.5, 97.5]))


def bits_per_byte(nats, text_bytes) -> float:
    return float(np.sum(nats) / (math.log(2) * np.sum(text_bytes)))


def bootstrap_ratio(nats, text_bytes, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED):
    idx = _indices(len(nats), resamples, seed)
    stats = np.asarray(nats)[idx].sum(1) / (math.log(2) * np.asarray(text_bytes)[idx].sum(1))
    return tuple(np.percentile(stats, [2.5, 97.5]))


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """mean(b) - mean(a) with a paired bootstrap interval (the same resampled units for both)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    idx = _indices(len(a), resamples, seed)
    diffs = b[idx].mean(1) - a[idx].mean(1)
    return _interval(b.mean() - a.mean(), tuple(np.percentile(diffs, [2.5, 97.5])))


def paired_bpb_difference(a: CheckpointScores, b: CheckpointScores) -> dict:
    """Bits/byte of b minus a over the same windows (resampled jointly); unpaired if their windows differ."""
    if len(a.nats) == len(b.nats) and np.array_equal(a.bytes, b.bytes):
        idx_a = idx_b = _indices(len(a.nats))
    else:  # another tokenizer cuts other windows: independent resamples
        idx_a, idx_b = _indices(len(a.nats)), _indices(len(b.nats), seed=BOOTSTRAP_SEED + 1)
    ratio = lambda s, idx: s.nats[idx].sum(1) / (math.log(2) * s.bytes[idx].sum(1))  # noqa: E731
    diffs = ratio(b, idx_b) - ratio(a, idx_a)
    value = bits_per_byte(b.nats, b.bytes) - bits_per_byte(a.nats, a.bytes)
    return _interval(value, tuple(np.percentile(diffs, [2.5, 97.5])))


@functools.lru_cache(maxsize=4)
def _window_nats(c: ModelConfig):
    """Jitted per-window (summed nats, summed bytes) of next-token prediction (the eval step, kept per window)."""

    @jax.jit
    def fn(params, windows_BT1, bytes_BT1):
        logits_BTV, _ = model.forward(params, windows_BT1[:, :-1], c)
        nll_BT = model.token_cross_entropy(logits_BTV, windows_BT1[:, 1:])
        return jnp.sum(nll_BT, axis=1), jnp.sum(bytes_BT1[:, 1:].astype(jnp.float32), axis=1)

    return fn


def window_scores(
    params, config, tokenizer: Tokenizer, data_dir: Path, work_dir: Path, seq_len: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(nats, bytes) per valid window of `seq_len` tokens (0: training.seq_len; at most the model's positions),
    the first training.eval_batches batches when set."""
    t = config.training
    seq_len = min(seq_len or t.seq_len, config.model.max_position_embeddings)
    split = tokenize_split(layout.split_file(data_dir, "valid"), tokenizer, work_dir, "valid")
    windows, counts = split.windows(seq_len)
    n = min(len(windows), t.eval_batches * t.batch_size) if t.eval_batches else len(windows)
    fn = _window_nats(config.model)
    nats, text_bytes = [], []
    for start in range(0, n, t.batch_size):
        w = np.asarray(windows[start : min(start + t.batch_size, n)], np.int32)
        b = np.asarray(counts[start : min(start + t.batch_size, n)], np.int32)
        real = len(w)
        if real < t.batch_size:  # pad to one shape: one compile
            w = np.concatenate([w, np.zeros((t.batch_size - real, w.shape[1]), np.int32)])
            b = np.concatenate([b, np.zeros((t.batch_size - real, b.shape[1]), np.int32)])
        got_nats, got_bytes = jax.device_get(fn(params, w, b))
        nats.append(got_nats[:real])
        text_bytes.append(got_bytes[:real])
    return np.concatenate(nats).astype(np.float64), np.concatenate(text_bytes).astype(np.float64)


def heldout_instructions(data_dir: Path, settings: EvalSettings):
    valid = layout.split_file(data_dir, "valid")
    layout.require_stories(valid)
    instructions, _ = heldout_split(
        instructions_from_stories(valid, settings.with_features, settings.seed), settings.prompts, settings.seed
    )
    if len(instructions) < settings.prompts:
        raise layout.DataError(f"--prompts {settings.prompts}: {valid} has only {len(instructions)} stories")
    return instructions


def score_checkpoint(final_dir: Path, settings: EvalSettings, data_dir: Path | None = None,
                     work_dir: Path | None = None, label: str | None = None) -> CheckpointScores:
    """Sample, score and measure bits/byte for one final/ folder."""
    params, config, tokenizer_path = load_final(Path(final_dir))
    data_dir = Path(data_dir or config.training.data_dir)
    work_dir = Path(work_dir or config.training.work_dir)
    tokenizer = Tokenizer(tokenizer_path)
    chat = ChatTokens(tokenizer)
    instructions = heldout_instructions(data_dir, settings)
    S = settings.samples
    rows = [ins for ins in instructions for _ in range(S)]
    # row (prompt i, sample j) draws stream EVAL_STREAM + j: sample 0 is what GRPO's evals draw
    streams = [row_seeds(settings.seed, EVAL_STREAM + j, len(instructions)) for j in range(S)]
    seeds = [streams[j][i] for i in range(len(instructions)) for j in range(S)]
    completions = rollouts(
        params, config.model, tokenizer, rows, encode_prompts(tokenizer, rows, chat), settings.reward,
        settings.max_new_tokens, settings.temperature, seeds, chat,
    )
    per_prompt = {
        k: np.asarray([c.terms[k] for c in completions], np.float64).reshape(len(instructions), S).mean(1)
        for k in ("reward", *TERMS)
    }
    per_prompt["words"] = np.asarray([len(c.text.split()) for c in completions], np.float64).reshape(-1, S).mean(1)
    nats, text_bytes = window_scores(params, config, tokenizer, data_dir, work_dir, settings.seq_len)
    label = label or Path(final_dir).absolute().parent.name
    return CheckpointScores(label, str(final_dir), {k: per_prompt[k] for k in METRICS}, nats, text_bytes)


def _fmt(entry: dict, signed: bool = False, digits: int = 3) -> str:
    sign = "+" if signed else ""
    return f"{entry['mean']:{sign}.{digits}f} [{entry['low']:{sign}.{digits}f}, {entry['high']:{sign}.{digits}f}]"


def format_table(result: dict) -> str:
    """The comparison as text: one row per checkpoint, then one per consecutive difference (* = excludes 0)."""
    columns = ("coverage", "ending", "reward", "val_bpb")
    names = list(result["checkpoints"]) + list(result["differences"])
    width = max(12, *(len(n) for n in names)) + 2
    head = f"{'checkpoint':<{width}}" + "".join(f"{LABELS[c]:<27}" for c in columns)
    lines = [head]
    for name, summary in result["checkpoints"].items():
        lines.append(f"{name:<{width}}" + "".join(f"{_fmt(summary[c]):<27}" for c in columns))
    if result["differences"]:
        lines.append("differences (paired 95% bootstrap; * = the interval excludes 0)")
        for name, diff in result["differences"].items():
            cells = []
            for c in columns:
                mark = "*" if diff[c]["low"] > 0 or diff[c]["high"] < 0 else " "
                cells.append(f"{_fmt(diff[c], signed=True) + mark:<27}")
            lines.append(f"{name:<{width}}" + "".join(cells))
    s = result["settings"]
    lines.append(
        f"({s['prompts']} held-out prompts x {s['samples']} samples at temperature {s['temperature']}, seed {s['seed']}, "
        f"up to {s['max_new_tokens']} new tokens; val bits/byte over {result['windows']} valid windows)"
    )
    return "\n".join(lines)


def compare(checkpoints, settings: EvalSettings | None = None, data_dir: Path | None = None,
            work_dir: Path | None = None, out: Callable[[str], None] | None = print) -> dict:
    """Score several final/ folders on the same prompts and windows; print (via `out`) and return the table.

    `checkpoints`: {label: final_dir} or [(label, final_dir), ...] in pipeline order (e.g.
    pretrain, sft, grpo); differences are each checkpoint minus the one before it.
    `settings` defaults to EvalSettings.from_config(the first checkpoint's config).
    """
    items = list(checkpoints.items()) if isinstance(checkpoints, dict) else list(checkpoints)
    labels = [label for label, _ in items]
    items = [(f"{label} ({i + 1})" if labels.count(label) > 1 else label, path) for i, (label, path) in enumerate(items)]
    if settings is None:
        from dsjax.train.checkpoint import read_final_config

        settings = EvalSettings.from_config(read_final_config(Path(items[0][1])))
    scores = [score_checkpoint(Path(path), settings, data_dir, work_dir, label) for label, path in items]
    result = {
        "settings": {**dataclasses.asdict(settings), "reward": dataclasses.asdict(settings.reward)},
        "windows": int(len(scores[0].nats)),
        "checkpoints": {s.label: {"path": s.path, **s.summary()} for s in scores},
        "differences": {},
    }
    for a, b in zip(scores, scores[1:]):
        diff = {k: paired_difference(a.per_prompt[k], b.per_prompt[k]) for k in METRICS}
        diff["val_bpb"] = paired_bpb_difference(a, b)
        result["differences"][f"{b.label} - {a.label}"] = diff
    if out is not None:
        out(format_table(result))
    return result
