"""Orbax checkpoints: `checkpoints/<run>/step_N/` (full train state + data iterator) and `final/`.

step_N/ holds Orbax items `state` (params, optimizer state, step), `data_iter`
(the Grain iterator state), `training_state` and `config` (JSON). `final/` holds
the `params` item plus plain `config.json`, `training_state.json` and
`tokenizer.model`, so it alone is enough to generate.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsjax.config import Config, config_from_dict

log = logging.getLogger(__name__)

FINAL = "final"


def make_manager(run_dir: Path, max_to_keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, step_prefix="step", create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(Path(run_dir).absolute(), options=options)


def save_step(manager: ocp.CheckpointManager, step: int, state, data_iter_state: dict, training_state: dict, config: Config) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=ocp.args.JsonSave(data_iter_state),
            training_state=ocp.args.JsonSave(training_state),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
        force=True,
    )
    manager.wait_until_finished()


def restore_step(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict, dict]:
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=ocp.args.JsonRestore(),
            training_state=ocp.args.JsonRestore(),
        ),
    )
    return restored["state"], restored["data_iter"], restored["training_state"]


def save_final(run_dir: Path, params, config: Config, training_state: dict, tokenizer_path: Path) -> Path:
    """Write final/ to a temporary folder, then swap it in, so a crash never leaves half a final/."""
    run_dir = Path(run_dir).absolute()
    final, tmp = run_dir / FINAL, run_dir / f".{FINAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / "params", params)
    checkpointer.wait_until_finished()
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    (tmp / "training_state.json").write_text(json.dumps(training_state, indent=2))
    shutil.copy2(tokenizer_path, tmp / "tokenizer.model")
    old = run_dir / f".{FINAL}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_config_json(path: Path) -> Config:
    raw = json.loads(Path(path).read_text())
    model = dict(raw["model"])
    return config_from_dict({"model": model, "training": raw.get("training", {}), "distributed": raw.get("distributed", {})})


def load_final(final_dir: Path):
    """(params, config, tokenizer path) from a final/ folder."""
    from dsjax import model

    final_dir = Path(final_dir).absolute()
    if not (final_dir / "config.json").is_file() or not (final_dir / "params").is_dir():
        raise FileNotFoundError(f"{final_dir} is not a dsjax final/ checkpoint (needs config.json and params/)")
    config = load_config_json(final_dir / "config.json")
    abstract = model.abstract_params(config.model)
    params = ocp.StandardCheckpointer().restore(final_dir / "params", abstract)
    params = jax.tree.map(lambda x: x, params)
    return params, config, final_dir / "tokenizer.model"
