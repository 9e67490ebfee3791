"""A run's folders, `outputs/<run>` and `checkpoints/<run>`: the promise a run name makes, and what `--resume` continues.

- A name whose folders hold anything is never reused silently. Without `--resume`
  the run refuses before any work; `--overwrite` first moves both folders aside to
  `<run>.replaced-<UTC time>/` (nothing is deleted).
- `--resume` continues the newest checkpoint only when it is the same run: the same
  model and batch layout (`checkpoint.config_differences`), the same data (the
  train/valid fingerprints the checkpoint records; `--allow-data-change` accepts
  other data, tokenized with the checkpoint's own tokenizer), and a `max_steps`
  above the checkpoint's step.

Everything here reads small JSON files and folder listings only, so the CLI checks
it before tokenizing or compiling anything. `dsjax.train.checkpoint` (Orbax, JAX) is
imported inside the functions that need it: refusing a reused run name must not
pay seconds of imports.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from dsjax.config import Config
from dsjax.data import layout

log = logging.getLogger(__name__)

REPLACED_INFIX = ".replaced-"


class RunError(ValueError):
    """A run that must not start as asked (its name is taken, or the resume does not match); the message says how on."""


@dataclass(frozen=True)
class RunPaths:
    checkpoints: Path
    outputs: Path

    @classmethod
    def for_run(cls, config: Config, run_name: str) -> "RunPaths":
        t = config.training
        return cls(Path(t.checkpoint_dir) / run_name, Path(t.output_dir) / run_name)

    @property
    def folders(self) -> tuple[Path, Path]:
        return self.outputs, self.checkpoints


def check_run_name(name: str) -> None:
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise RunError(f"--run-name {name!r}: a run name is one folder name (no '/', not starting with '.')")


def contents(folder: Path) -> list[str]:
    """Names inside `folder` (empty when it is missing or empty)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [folder.name] if folder.exists() else []
    return sorted(p.name for p in folder.iterdir())


def _summary(folder: Path, names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (f", ... {len(names) - 4} more" if len(names) > 4 else "")
    return f"{folder} ({shown})"


def check_name_free(paths: RunPaths, run_name: str, overwrite: bool) -> list[Path]:
    """The folders `--overwrite` will move aside; RunError when the name is taken and --overwrite is absent."""
    taken = [(folder, contents(folder)) for folder in paths.folders]
    taken = [(folder, names) for folder, names in taken if names]
    if taken and not overwrite:
        held = " and ".join(_summary(folder, names) for folder, names in taken)
        raise RunError(
            f"run '{run_name}' already exists: {held}; continue it with --resume, pick a new --run-name, "
            f"or pass --overwrite to move it aside to {run_name}{REPLACED_INFIX}<UTC time>/ (nothing is deleted)"
        )
    return [folder for folder, _ in taken]


def run_name_of(folder: Path) -> str:
    """The run a folder belongs to: checkpoints/<run>/final and outputs/<run> by <run>; any other folder by its own name."""
    folder = Path(folder).absolute()
    return folder.parent.name if folder.name == "final" else folder.name


def move_aside(folders: list[Path], now: float | None = None) -> list[tuple[Path, Path]]:
    """Rename each folder to `<name>.replaced-<UTC time>` beside it (same stamp for all); returns (old, new) pairs."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    suffix = f"{REPLACED_INFIX}{stamp}"
    n = 1
    while any(folder.with_name(folder.name + suffix).exists() for folder in folders):
        n += 1
        suffix = f"{REPLACED_INFIX}{stamp}-{n}"
    moved = []
    for folder in folders:
        target = folder.with_name(folder.name + suffix)
        folder.rename(target)
        moved.append((folder, target))
    return moved


@dataclass(frozen=True)
class ResumePoint:
    """The newest committed step of a run, as its small files describe it (no arrays read)."""

    step: int
    folder: Path
    training_state: dict
    config: dict | None
    tokenizer: Path | None


def latest_resume_point(run_dir: Path) -> ResumePoint | None:
    from dsjax.train import checkpoint

    steps = checkpoint.committed_steps(run_dir)
    if not steps:
        return None
    folder = checkpoint.step_dir(run_dir, steps[-1])
    state = checkpoint.read_json_item(folder, "training_state") or {}
    return ResumePoint(steps[-1], folder, state, checkpoint.read_json_item(folder, "config"), find_tokenizer(run_dir))


def find_tokenizer(run_dir: Path) -> Path | None:
    """The run's tokenizer.model: every step of a run carries the same one; newest first, then final/."""
    from dsjax.train import checkpoint

    run_dir = Path(run_dir)
    candidates = [checkpoint.step_dir(run_dir, s) for s in reversed(checkpoint.committed_steps(run_dir))]
    for folder in [*candidates, run_dir / checkpoint.FINAL]:
        if (folder / "tokenizer.model").is_file():
            return folder / "tokenizer.model"
    return None


def check_nothing_to_lose(paths: RunPaths, run_name: str) -> None:
    """`--resume` found no checkpoint: starting over is fine only if the run's folders hold nothing to lose."""
    held = [(folder, contents(folder)) for folder in paths.folders]
    held = [(folder, names) for folder, names in held if names and not _left_before_first_step(folder, names)]
    if held:
        raise RunError(
            f"--resume: {paths.checkpoints} holds no step_N checkpoint to continue, but "
            f"{' and '.join(_summary(f, n) for f, n in held)} exist; pass --overwrite (without --resume) to move "
            f"them aside and start over, or pick a new --run-name"
        )


def _left_before_first_step(folder: Path, names: list[str]) -> bool:
    """What a run stopped before its first logged step leaves: its config and a header-only metrics.csv."""
    if not set(names) <= {"metrics.csv", "training_config.json"}:
        return False
    metrics = Path(folder) / "metrics.csv"
    return not metrics.is_file() or len(metrics.read_text().splitlines()) <= 1


def check_max_steps(step: int, folder: Path, max_steps: int, flag: str = "--max-steps") -> None:
    """`flag` is the stage's step-count flag (--max-steps, --sft-steps, --grpo-steps)."""
    if max_steps <= step:
        raise RunError(
            f"--resume: {folder} is at step {step} and the stage's step count is {max_steps}; nothing to train. "
            f"Raise {flag} above {step} to continue (or generate from {Path(folder).parent / 'final'})"
        )


def check_same_data(step_state: dict, folder: Path, current: dict, allow_data_change: bool, warn: bool = True) -> bool:
    """True when the data changed and --allow-data-change accepts it; RunError when it changed without it."""
    recorded = step_state.get("data")
    if not isinstance(recorded, dict):
        if warn:
            log.warning("%s records no data fingerprints (written by an older dsjax); the data is not checked", folder)
        return False
    if layout.same_data(recorded, current):
        return False
    if not allow_data_change:
        raise RunError(
            f"--resume: {folder} was trained on {layout.describe_fingerprints(recorded)} but the data folder is "
            f"{layout.describe_fingerprints(current)}; use the original data, or pass --allow-data-change to continue "
            "on this data with the checkpoint's tokenizer"
        )
    return True


def check_resume(point: ResumePoint, config: Config, current_data: dict | None, allow_data_change: bool) -> bool:
    """Every resume check that needs no arrays; returns whether the data changed (and was allowed to).

    `current_data` is None when the data is not there yet (the default folder, downloaded next);
    the loop checks it again after the restore.
    """
    from dsjax.train import checkpoint

    if point.config is not None:
        differences = checkpoint.config_differences(point.config, config)
        if differences:
            raise checkpoint.CheckpointError(
                f"cannot resume from {point.folder}: the config changed in keys that change the model or its "
                f"training data: {', '.join(differences)}. Use a new --run-name, or restore these values."
            )
    check_max_steps(point.step, point.folder, config.training.max_steps)
    if current_data is None:
        return False
    return check_same_data(point.training_state, point.folder, current_data, allow_data_change, warn=False)
