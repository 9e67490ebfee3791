"""Orbax checkpoints that survive preemption, crashes and corruption.

Layout of `checkpoints/<run>/`:

    step_N/   Orbax items `state` (params incl. MoE routing biases, optimizer state,
              step), `data_iter` (Grain iterator state), `training_state` and
              `config` (JSON); plus plain copies `config.json`,
              `training_state.json` and `tokenizer.model`.
    final/    `params` + `config.json` + `training_state.json` + `tokenizer.model`:
              all that generation needs.

Saves are asynchronous: `save` blocks only while arrays are copied off the
device, and Orbax writes into a temporary folder that is renamed to `step_N`
when complete, so a crash mid-write never leaves a `step_N` that looks whole.
`latest_restorable` walks back from the newest step and skips (and sets aside
as `corrupt_step_N`, never deleting it) any step that fails to restore.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from dsjax.config import Config, config_from_dict

log = logging.getLogger(__name__)

FINAL = "final"
STEP_PREFIX = "step"
CORRUPT_PREFIX = "corrupt_"
# training keys that may change between a checkpoint and its resume
RESUMABLE_TRAINING_KEYS = {
    "max_steps", "eval_interval", "eval_batches", "checkpoint_interval", "log_interval", "max_to_keep",
    "keep_every", "run_name", "data_dir", "work_dir", "checkpoint_dir", "output_dir", "learning_rate",
    "min_lr_ratio", "warmup_steps", "lr_schedule", "wsd_decay_fraction", "weight_decay", "grad_clip",
    "accumulation",
}

# model keys that pick a compute path, not the function: free to change on resume
RESUMABLE_MODEL_KEYS = {"moe_impl", "attention_impl", "remat", "head_gradient_dtype"}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or used; the message says which and why."""


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{STEP_PREFIX}_{step}"


def short_error(err: BaseException) -> str:
    """One readable line for an error from Orbax/TensorStore (whose messages carry C++ binding fragments)."""
    if isinstance(err, UnreadableArrays):
        return str(err)  # already shortened
    text = (str(err).strip().splitlines() or [""])[0]
    text = text.split(" See full TensorStore details")[0]
    text = re.sub(r"<bound method [^>]*>?", "", text).strip().rstrip(".:")
    text = text[:200]
    return f"{err.__class__.__name__}: {text}" if text else err.__class__.__name__


def step_number(folder: Path) -> int | None:
    name = Path(folder).name
    prefix = f"{STEP_PREFIX}_"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def committed_steps(run_dir: Path) -> list[int]:
    """Steps whose folder Orbax finished writing (has its commit marker), oldest first; reads only the folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    steps = [step_number(f) for f in run_dir.iterdir() if f.is_dir() and (f / "_CHECKPOINT_METADATA").is_file()]
    return sorted(s for s in steps if s is not None)


def read_json_item(folder: Path, name: str) -> dict | None:
    """A step's small JSON item: the plain copy `<name>.json`, else Orbax's own `<name>/metadata`; None if unreadable."""
    for path in (Path(folder) / f"{name}.json", Path(folder) / name / "metadata"):
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            return value
    return None


class CheckpointStore:
    """One run's checkpoints: async saves with retention, verified restores."""

    def __init__(self, run_dir: Path, max_to_keep: int, keep_every: int = 0, async_save: bool = True):
        self.run_dir = Path(run_dir).absolute()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_every or None,
            step_prefix=STEP_PREFIX,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.run_dir, options=self._options)
        self._pending_extras: tuple[int, dict, dict, Path | None] | None = None
        self.blocking_seconds = 0.0
        self.saves = 0

    # --- saving ---------------------------------------------------------------------

    def save(self, step: int, state, data_iter_state: dict, training_state: dict, config: Config,
             tokenizer_path: Path | None = None) -> None:
        """Start an async save of step N (waits for the previous save first)."""
        start = time.perf_counter()
        self._finish_previous()
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data_iter=ocp.args.JsonSave(data_iter_state),
                    training_state=ocp.args.JsonSave(training_state),
                    config=ocp.args.JsonSave(config.to_dict()),
                ),
                force=True,
            )
        except Exception as err:  # noqa: BLE001 - any write failure becomes one clear error
            raise self._save_failed(step, err) from err
        self._pending_extras = (step, training_state, config.to_dict(), tokenizer_path)
        self.blocking_seconds += time.perf_counter() - start
        self.saves += 1

    def _save_failed(self, step: int, err: BaseException) -> CheckpointError:
        kept = [s for s in self.manager.all_steps() if s != step]
        previous = f"{step_dir(self.run_dir, max(kept)).name} is intact" if kept else "no earlier checkpoint exists"
        if err.__class__.__name__ == "StepAlreadyExistsError":  # not a disk problem: say what it is
            return CheckpointError(
                f"could not write checkpoint {step_dir(self.run_dir, step)}: it already exists (is another run "
                f"writing to {self.run_dir}?). Training stopped; {previous}."
            )
        return CheckpointError(
            f"could not write checkpoint {step_dir(self.run_dir, step)}: {short_error(err)}. "
            f"Training stopped; {previous}. Free disk space or fix permissions, then --resume."
        )

    def _finish_previous(self) -> None:
        step = self._pending_extras[0] if self._pending_extras else None
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            self._pending_extras = None
            raise self._save_failed(step if step is not None else -1, err) from err
        if self._pending_extras is None:
            return
        step, training_state, config_dict, tokenizer_path = self._pending_extras
        self._pending_extras = None
        folder = step_dir(self.run_dir, step)
        if folder.is_dir() and jax.process_index() == 0:  # retention may already have removed it
            (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
            (folder / "training_state.json").write_text(json.dumps(training_state, indent=2))
            if tokenizer_path is not None:
                shutil.copy2(tokenizer_path, folder / "tokenizer.model")

    def wait_until_finished(self) -> None:
        start = time.perf_counter()
        self._finish_previous()
        self.blocking_seconds += time.perf_counter() - start

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:
            self.manager.close()

    # --- restoring ------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict, dict]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data_iter=ocp.args.JsonRestore(),
                training_state=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data_iter"], restored["training_state"], restored["config"]

    def _set_aside(self, step: int, err: BaseException) -> None:
        folder = step_dir(self.run_dir, step)
        aside = folder.with_name(CORRUPT_PREFIX + folder.name)
        log.warning(
            "checkpoint %s is incomplete or corrupted (%s); moved to %s, falling back to the previous one",
            folder, short_error(err), aside.name,
        )
        from dsjax.train.distributed import barrier

        if folder.exists() and jax.process_index() == 0:
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
        barrier(f"dsjax-set-aside-{step}")
        self.manager.reload()

    def latest_restorable(self, abstract_state, config: Config):
        """(step, restored) for the newest step that restores cleanly, or None.

        A step whose files are missing, truncated or unreadable is set aside (renamed,
        not deleted) and the previous one is tried. A readable checkpoint whose config
        differs from `config` in keys that change the model is refused, not skipped.
        """
        for step in reversed(self.steps()):
            try:
                saved_config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
                if not isinstance(saved_config, dict) or "model" not in saved_config:
                    raise ValueError("config item holds no model block")
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is skipped
                self._set_aside(step, err)
                continue
            differences = config_differences(saved_config, config)
            if differences:
                raise CheckpointError(
                    f"cannot resume from {step_dir(self.run_dir, step)}: the config changed in keys that change the "
                    f"model or its training data: {', '.join(differences)}. Use a new --run-name, or restore these values."
                )
            try:
                return step, read_arrays(lambda: self.restore(step, abstract_state))
            except UnreadableArrays as err:
                self._set_aside(step, err)
        return None


def config_differences(saved: dict, config: Config) -> list[str]:
    """Keys whose change would make a resume wrong (model shape/behaviour, batch layout, seed)."""
    current = config.to_dict()
    differences = []
    for block in ("model", "training"):
        for key, value in current[block].items():
            if block == "training" and key in RESUMABLE_TRAINING_KEYS:
                continue
            if block == "model" and key in RESUMABLE_MODEL_KEYS:
                continue
            old = saved.get(block, {}).get(key, value)
            if old != value:
                differences.append(f"{block}.{key} ({old!r} -> {value!r})")
    return differences


def save_final(run_dir: Path, params, config: Config, training_state: dict, tokenizer_path: Path) -> Path:
    """Write final/ to a temporary folder, then swap it in, so a crash never leaves half a final/.

    Every process writes its shards of the params; the primary process writes the
    small files and does the swap.
    """
    from dsjax.train.distributed import barrier, is_primary

    run_dir = Path(run_dir).absolute()
    final, tmp = run_dir / FINAL, run_dir / f".{FINAL}.tmp"
    if is_primary():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier("dsjax-final-mkdir")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / "params", params)
    checkpointer.wait_until_finished()
    barrier("dsjax-final-saved")
    if not is_primary():
        barrier("dsjax-final-done")
        return final
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    (tmp / "training_state.json").write_text(json.dumps(training_state, indent=2))
    shutil.copy2(tokenizer_path, tmp / "tokenizer.model")
    old = run_dir / f".{FINAL}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    barrier("dsjax-final-done")
    return final


def load_config_json(path: Path) -> Config:
    """The config a checkpoint was written with; CheckpointError naming the file when it cannot be read or used."""
    from dsjax.config import ConfigError

    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds no config object")
    try:
        return config_from_dict({k: raw.get(k, {}) for k in ("model", "training", "distributed", "sft", "grpo", "distill")})
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_data_record(final_dir: Path) -> dict:
    """The data a final/ was trained on, as its training_state.json records it ({} when it records none)."""
    try:
        record = json.loads((Path(final_dir) / "training_state.json").read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return {}
    return record if isinstance(record, dict) else {}


def read_final_config(final_dir: Path) -> Config:
    """The config of a final/ folder, after checking the folder is one (no arrays are read)."""
    final_dir = Path(final_dir).absolute()
    if final_dir.exists() and not final_dir.is_dir():
        raise CheckpointError(f"{final_dir} is a file; pass a final/ folder such as checkpoints/<run>/final")
    if not final_dir.is_dir():
        raise CheckpointError(f"{final_dir} does not exist; pass a final/ folder such as checkpoints/<run>/final")
    if (final_dir / FINAL).is_dir():
        raise CheckpointError(f"{final_dir} is a run folder; pass its final/ checkpoint: {final_dir / FINAL}")
    if step_number(final_dir) is not None and (final_dir.parent / FINAL).is_dir():
        raise CheckpointError(
            f"{final_dir} is a training checkpoint; pass a final/ folder such as {final_dir.parent / FINAL}"
        )
    missing = [name for name in ("config.json", "params", "tokenizer.model") if not (final_dir / name).exists()]
    if missing:
        raise CheckpointError(
            f"{final_dir} is not a dsjax final/ checkpoint (missing {', '.join(missing)}); "
            "`dsjax run` writes one to checkpoints/<run>/final"
        )
    return load_config_json(final_dir / "config.json")


class UnreadableArrays(Exception):
    """An Orbax read failed; the message is already one line (short_error of the cause)."""


_UNRETRIEVED = re.compile(r"^\w+ exception was never retrieved")
# what names an array read in those reports: the orbax task, TensorStore's error, or its OCDBT store
_READ_MARKERS = ("orbax", "encountered error while reading array", "ocdbt database")


class _DropAbandonedReadLogs(logging.Filter):
    """asyncio's "<Task | Future | _GatheringFuture> exception was never retrieved" for an abandoned
    array read (each form has reached CI's log; which one depends on where the read was when its loop closed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not _UNRETRIEVED.match(message):
            return True
        lowered = message.lower()
        return not any(marker in lowered for marker in _READ_MARKERS)


def _is_abandoned_read(unraisable) -> bool:
    """The two reports a failed orbax restore leaves behind.

    Orbax runs the reads in a fresh event loop and closes it when the first read fails,
    without cancelling the others. Their suspended coroutines raise the read error again
    when the garbage collector closes them ("Exception ignored in <coroutine ...>"), and
    TensorStore's threads, finishing those reads, call back into the closed loop
    ("Event loop is closed"). Either can happen at any later time, exit included.
    """
    if isinstance(unraisable.object, types.CoroutineType):
        return "orbax" in unraisable.object.cr_code.co_filename
    return (
        unraisable.object is None
        and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
        # asyncio raises it from _check_closed, whichever call (call_soon_threadsafe, call_soon, ...) reached it
        and any(frame.name == "_check_closed" for frame in traceback.extract_tb(unraisable.exc_traceback))
    )


def _drop_reports_of_abandoned_reads() -> None:
    """Keep a failed restore to the one line we print: drop its leftovers' reports for the
    rest of the process (they may come at exit). Installed once, on the first failure."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedReadLogs) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropAbandonedReadLogs())
    if getattr(sys.unraisablehook, "drops_abandoned_orbax_reads", False):
        return
    report = sys.unraisablehook

    def drop_abandoned_reads(unraisable):
        if not _is_abandoned_read(unraisable):
            report(unraisable)

    drop_abandoned_reads.drops_abandoned_orbax_reads = True
    sys.unraisablehook = drop_abandoned_reads


def read_arrays(restore: Callable[[], Any]) -> Any:
    """restore(), or UnreadableArrays with one line when it fails, and nothing else printed, then or later."""
    try:
        return restore()
    except Exception as err:  # noqa: BLE001 - truncated, missing or mismatched arrays
        _drop_reports_of_abandoned_reads()
        raise UnreadableArrays(short_error(err)) from None


def load_final(final_dir: Path):
    """(params, config, tokenizer path) from a final/ folder; CheckpointError (one line) when it cannot be read."""
    from dsjax import model

    final_dir = Path(final_dir).absolute()
    config = read_final_config(final_dir)
    # onto this process's first device, whatever layout wrote it: Orbax would otherwise restore the
    # saved mesh's layout, which a machine (or run) with fewer devices cannot hold
    abstract = on_first_device(model.abstract_params(config.model))
    try:
        params = read_arrays(lambda: ocp.StandardCheckpointer().restore(final_dir / "params", abstract))
    except UnreadableArrays as err:
        raise CheckpointError(f"cannot read the parameters in {final_dir / 'params'} ({err})") from None
    return params, config, final_dir / "tokenizer.model"


def with_shardings(abstract_tree, shardings):
    """Attach target shardings to an abstract tree, so a restore lands directly in that layout."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def on_first_device(abstract_tree):
    """`with_shardings` onto this process's first device: a restore lands there whatever layout wrote it."""
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return with_shardings(abstract_tree, jax.tree.map(lambda _: single, abstract_tree))


@dataclasses.dataclass
class CheckpointInfo:
    name: str
    step: int | None
    bytes: int
    complete: bool
    val_loss: float | None
    note: str


def describe_run(run_dir: Path) -> list[CheckpointInfo]:
    """What `dsjax checkpoints ls` shows: every step folder (and final/), size, val loss, completeness."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise FileNotFoundError(f"{run_dir} is a file; pass a run's checkpoint folder, e.g. checkpoints/nano")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {run_dir}")
    infos = []
    for folder in sorted(run_dir.iterdir(), key=_sort_key):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        name = folder.name
        step, complete, note, val = None, False, "", None
        state_file = folder / "training_state.json"
        if state_file.is_file():
            try:
                info = json.loads(state_file.read_text())
                val, step = info.get("val_loss"), info.get("step")
                if "last_val_step" in info and info["last_val_step"] != step:
                    val = None  # no eval at this step (val_loss is the last eval's, kept for resume)
                reward = (info.get("last_eval") or {}).get("eval_reward")
                if isinstance(reward, (int, float)):  # GRPO: no val loss; it saves at its evals
                    note = f"held-out reward {reward:.3f}"
            except (json.JSONDecodeError, AttributeError):
                note = "training_state.json unreadable"
        if name.startswith(f"{STEP_PREFIX}_") and name[len(STEP_PREFIX) + 1:].isdigit():
            step = int(name[len(STEP_PREFIX) + 1:])
            missing = [item for item in ("state", "data_iter", "training_state", "config") if not (folder / item).is_dir()]
            committed = (folder / "_CHECKPOINT_METADATA").is_file()
            complete = committed and not missing
            note = note or ("" if complete else f"missing {', '.join(missing) or 'commit marker'}")
        elif name == FINAL:
            complete = (folder / "params").is_dir() and (folder / "config.json").is_file()
            note = note or ("" if complete else "missing params/ or config.json")
        elif name.startswith(CORRUPT_PREFIX):
            note = "set aside by --resume (failed to restore)"
        elif "tmp" in name:
            note = "unfinished write (ignored by --resume)"
        else:
            continue
        infos.append(CheckpointInfo(name, step, size, complete, val, note))
    return infos


def _sort_key(path: Path):
    digits = "".join(ch for ch in path.name if ch.isdigit())
    return (path.name == FINAL, int(digits) if digits else -1, path.name)
