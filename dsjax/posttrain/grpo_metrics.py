"""The GRPO stage's metrics.csv columns and its plot (reward terms, KL and clipping per step)."""

from __future__ import annotations

import os
from pathlib import Path

GRPO_COLUMNS = [
    "step",
    "loss",
    "reward",  # mean over the step's P x G samples
    "reward_std",  # over the step's P x G samples
    "coverage",
    "ending",
    "length",
    "repetition",
    "kl",  # token mean of the k3 estimator against the reference
    "entropy",  # token mean of the policy's entropy (nats)
    "clip_fraction",  # completion tokens whose clipped term was active
    "response_tokens",  # mean sampled tokens per completion (stop token included)
    "lr",
    "grad_norm",
    "eval_reward",  # on the fixed held-out eval prompts, one sample each
    "eval_coverage",
    "eval_ending",
    "eval_length",
    "eval_repetition",
    "tokens_per_sec",  # sampled tokens per second of sampling
    "elapsed_sec",
]


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def plot_grpo(rows: list[dict], path: Path, title: str) -> Path:
    """Two panels: rewards (train mean +- std, eval, each term); KL and clip fraction (entropy on a right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.4), dpi=120, sharex=True)
    reward, spread = _series(rows, "reward"), dict(_series(rows, "reward_std"))
    if reward:
        steps, values = zip(*reward)
        top.plot(steps, values, label="reward (train samples)", color="tab:blue")
        low = [v - spread.get(s, 0.0) for s, v in reward]
        high = [v + spread.get(s, 0.0) for s, v in reward]
        top.fill_between(steps, low, high, color="tab:blue", alpha=0.15)
    evals = _series(rows, "eval_reward")
    if evals:
        top.plot(*zip(*evals), "o-", label="reward (held-out prompts)", color="tab:orange")
    terms = (("coverage", "tab:green"), ("ending", "tab:purple"), ("length", "tab:brown"), ("repetition", "tab:red"))
    for key, color in terms:
        series = _series(rows, key)
        if series:
            top.plot(*zip(*series), "--", label=key, color=color, alpha=0.6)
    top.set_ylabel("reward / term")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(fontsize=7, ncol=2)
    for key, color in (("kl", "tab:red"), ("clip_fraction", "tab:gray")):
        series = _series(rows, key)
        if series:
            bottom.plot(*zip(*series), label=key, color=color)
    entropy = _series(rows, "entropy")
    if entropy:  # nats per token: another scale, on its own axis
        right = bottom.twinx()
        right.plot(*zip(*entropy), ":", label="entropy (right axis)", color="tab:cyan")
        right.set_ylabel("entropy (nats/token)")
        right.legend(fontsize=7, loc="upper right")
    bottom.set_xlabel("GRPO step")
    bottom.set_ylabel("KL to the reference / clip fraction")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
