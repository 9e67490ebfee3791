"""A Modal launch, resolved and checked on the laptop before any network call.

`make_plan(args)` takes the parsed `dsjax run` flags (with `--backend modal`) and checks
everything that can be checked offline: the flags, stages, config, mesh against the GPU
count, the GPU type's per-container limit and the local data folder. Whether a run name
is free is decided where the runs live, on the checkpoint volume, by `dsjax run` in the
container (a refusal there is exit code 2, not retried). `format_plan` prints the plan for
`--dry-run`: the image, GPU spec, volumes and mounts, mesh, the exact remote command and a
cost per hour. Nothing here imports `modal` or JAX.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dsjax.cli import UsageError
from launch.remote import MODAL_MOUNTS, command

REPO = Path(__file__).resolve().parent.parent
APP_NAME = "dsjax"
PYTHON_VERSION = "3.11"  # the lock's JAX for 3.11 (0.10.x) is the one CI tests
SOURCE_PACKAGES = ("dsjax", "meshes", "kernels_pallas", "launch")
MAX_RETRIES = 3  # crashes; Modal restarts preempted calls on its own
MAX_TIMEOUT_S = 24 * 3600  # Modal's limit for one attempt
DEFAULT_TIMEOUT_S = 24 * 3600

# (name, mount, what it holds); names and mounts as in the seed guide
VOLUMES = (
    ("deepseek-training-vol", str(MODAL_MOUNTS.data), "stories/, tokenizers/, token caches"),
    ("deepseek-checkpoint-vol", str(MODAL_MOUNTS.checkpoints), "<run>/step_N/, <run>/final/"),
    ("deepseek-output-vol", str(MODAL_MOUNTS.outputs), "<run>/metrics.csv, training_log.json, loss.png"),
)
DATA_VOLUME, CHECKPOINT_VOLUME, OUTPUT_VOLUME = (v[0] for v in VOLUMES)

# GPUs per container: modal.com/docs/guide/gpu ("up to 8", A10 "up to 4"). USD per GPU-hour:
# Modal's per-second list prices (modal.com/pricing) x 3600, as quoted on PRICES_READ by
# PRICES_SOURCE; None = not in that table. CPU, memory and region multipliers are extra.
PRICES_READ = "2026-05-07"
PRICES_SOURCE = "techbytes.app/posts/serverless-gpu-pricing-matrix-modal-replicate-lambda-2026 (quoting modal.com/pricing)"
GPU_TYPES = {
    "H100": (8, 3.9492),
    "H100!": (8, 3.9492),  # exactly H100 (plain H100 may be upgraded to H200 at the H100 price)
    "H200": (8, None),
    "B200": (8, None),
    "A100-80GB": (8, 2.4984),
    "A100-40GB": (8, None),
    "L40S": (8, 1.9512),
    "L4": (8, 0.7992),
    "T4": (8, 0.5904),
    "A10": (4, None),
}
GPU_ALIASES = {"A100": "A100-40GB", "A10G": "A10"}

# flags only the laptop uses: never passed to the container's `dsjax run`
LAUNCH_ONLY = {"backend", "nodes", "gpu_type", "timeout", "detach", "dry_run", "coordinator", "num_processes", "process_id"}
LOCAL_PATHS = {"data_dir", "work_dir", "checkpoint_dir", "output_dir", "config"}  # replaced by the mounts
# flags naming a local file the container cannot see (nothing uploads them yet)
LOCAL_FILES = {"start_from": "--start-from", "sft_data": "--sft-data", "teacher": "--teacher"}
KEY_PACKAGES = ("jax", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "grain")


class LaunchError(UsageError):
    """A launch that cannot start as asked (exit code 2, one line)."""


def gpu_type(name: str) -> str:
    key = name.upper()
    key = GPU_ALIASES.get(key, key)
    if key not in GPU_TYPES:
        close = difflib.get_close_matches(key, GPU_TYPES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LaunchError(f"--gpu-type: unknown GPU '{name}'{hint} (Modal GPUs: {', '.join(GPU_TYPES)})")
    return key


def parse_timeout(text: str | None) -> int:
    """Seconds from '3600', '90m' or '6h'; at most Modal's 24 h per attempt."""
    if text is None:
        return DEFAULT_TIMEOUT_S
    match = re.fullmatch(r"\s*(\d+)\s*([smh]?)\s*", str(text))
    if not match:
        raise LaunchError(f"--timeout: expected seconds or a number with s/m/h (e.g. 6h), got {text!r}")
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if not 60 <= seconds <= MAX_TIMEOUT_S:
        raise LaunchError(f"--timeout must be between 1m and 24h (Modal's limit per attempt), got {text}")
    return seconds


def run_parser() -> argparse.ArgumentParser:
    """The `dsjax run` parser (every flag the launcher passes through is defined there, once)."""
    from dsjax.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def pass_through_flags(args: argparse.Namespace) -> list[str]:
    """Every `dsjax run` flag the user set (not at its default), as argv; launcher-only and path flags left out."""
    flags = []
    for action in run_parser()._actions:
        dest = action.dest
        if not action.option_strings or dest in LAUNCH_ONLY | LOCAL_PATHS | set(LOCAL_FILES) | {"help", "gpus", "model_size", "run_name"}:
            continue
        value = getattr(args, dest, None)
        if value is None or value == action.default:
            continue
        option = next(o for o in action.option_strings if o.startswith("--"))
        if action.nargs == 0:  # store_true
            flags.append(option)
        else:
            flags += [option, str(value)]
    return flags


def locked_versions(names=KEY_PACKAGES, python: str = PYTHON_VERSION) -> dict[str, str]:
    """Versions uv.lock resolves for `names` on Linux with `python` (what the image installs)."""
    import tomllib

    try:
        from packaging.markers import Marker
    except ImportError:  # only the display needs it
        return {}
    try:
        lock = tomllib.loads((REPO / "uv.lock").read_text())
    except (OSError, ValueError):
        return {}
    env = {"python_full_version": f"{python}.0", "python_version": python, "sys_platform": "linux",
           "platform_machine": "x86_64", "platform_system": "Linux"}
    found = {}
    for package in lock.get("package", []):
        name = package.get("name")
        markers = package.get("resolution-markers")
        if name in names and (not markers or any(Marker(m).evaluate(env) for m in markers)):
            found[name] = package.get("version", "?")
    return {n: found[n] for n in names if n in found}


@dataclass
class Plan:
    run_name: str
    stages: list[str]
    run_names: list[str]  # the run folders the stages train: <run>, <run>-sft, ...
    gpu: str
    gpus_per_node: int
    nodes: int
    mesh: str
    microbatches: int
    timeout_s: int
    flags: list[str]  # `dsjax run` flags for the container, before the mount paths
    config_json: str | None
    data_dir: Path | None  # None when no stage reads data (e.g. export alone)
    download_data_first: bool
    tokenizer_dir: Path | None
    checkpoint_dir: Path  # local: final/ comes back here
    output_dir: Path
    resume: bool
    detach: bool
    launch_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def gpu_spec(self) -> str:
        return f"{self.gpu}:{self.gpus_per_node}"

    @property
    def price_per_hour(self) -> float | None:
        price = GPU_TYPES[self.gpu][1]
        return None if price is None else price * self.gpus

    def uploads(self) -> list[tuple[Path, str]]:
        """(local folder, prefix on the training volume) to sync."""
        items = [(self.data_dir, "stories")] if self.data_dir is not None else []
        if self.tokenizer_dir is not None:
            items.append((self.tokenizer_dir, f"tokenizers/{self.tokenizer_dir.name}"))
        return items

    def downloads(self) -> list[tuple[str, str, Path]]:
        """(volume, prefix, local folder) fetched after a successful run: each trained stage's final/ and outputs."""
        names = self.run_names or (export_candidates(self.run_name) if "export" in self.stages else [])
        return [
            item for name in names for item in (
                (CHECKPOINT_VOLUME, f"{name}/final", self.checkpoint_dir / name / "final"),
                (OUTPUT_VOLUME, name, self.output_dir / name),
            )
        ]

    def local_to_move(self) -> list[Path]:
        """Local folders of the runs the download writes, which a fresh (not --resume) launch moves aside first."""
        if self.resume or self.detach:
            return []
        from dsjax.train.runs import run_name_of

        names = {run_name_of(local) for _, _, local in self.downloads()}
        return [d / n for n in sorted(names) for d in (self.checkpoint_dir, self.output_dir) if (d / n).exists()]

    def remote_command(self) -> list[str]:
        config = "<--config file, sent with the call>" if self.config_json is not None else None
        argv = ["dsjax", *command(self.flags, MODAL_MOUNTS, config)]
        if self.nodes > 1:
            argv += ["--coordinator", "[<rank 0 IPv6>]:8476", "--num-processes", str(self.nodes), "--process-id", "<rank>"]
        return argv


def trained_run_names(stages: list[str], run_name: str) -> list[str]:
    from dsjax.stages import TRAINING_STAGES, stage_run_name

    return [stage_run_name(run_name, s) for s in stages if s in TRAINING_STAGES]


def export_candidates(run_name: str) -> list[str]:
    """An export-only launch exports the newest existing final/ of the run; any of these may hold its export/."""
    from dsjax.stages import RUN_SUFFIX

    return [run_name + suffix for suffix in RUN_SUFFIX.values()]


def _total_gpus(args, config, gpu: str, nodes: int) -> int:
    from dsjax.cli import requested_devices

    per_container = GPU_TYPES[gpu][0]
    total = args.gpus if args.gpus is not None else (
        nodes * per_container if nodes > 1 else (requested_devices(config, None) or 1)
    )
    if nodes == 1 and total > per_container:
        raise LaunchError(
            f"--gpus {total}: a Modal {gpu} container holds at most {per_container} GPUs; "
            f"use --nodes {math.ceil(total / per_container)} with {per_container} GPUs each"
        )
    if nodes > 1 and total != nodes * per_container:
        raise LaunchError(
            f"--nodes {nodes} --gpus {total}: Modal clusters use whole hosts, {per_container} {gpu} per node; "
            f"pass --gpus {nodes * per_container} (or leave it out)"
        )
    return total


def make_plan(args: argparse.Namespace) -> Plan:
    """Everything about the launch, checked offline; LaunchError / ConfigError / MeshError / DataError / RunError else."""
    from dsjax import cli
    from dsjax.data import layout
    from dsjax.data.tokenizer import tokenizer_dir
    from dsjax.train import runs
    from meshes.mesh import resolve_microbatches, resolve_shape, validate

    local = [flag for dest, flag in LOCAL_FILES.items() if getattr(args, dest, None)]
    if local:
        raise LaunchError(
            f"{', '.join(local)} names a file on this machine, which the Modal container cannot see (the launcher "
            "uploads only --data-dir and its tokenizer); run that stage locally"
        )

    cache = getattr(args, "compile_cache", None)
    if cache and cache.lower() != "off":
        raise LaunchError(
            f"--compile-cache {cache} is a folder on this machine; on Modal the compiled programs stay on the data "
            "volume (its jax_cache folder), and --compile-cache off is the only other choice"
        )

    if args.coordinator or args.num_processes is not None or args.process_id is not None:
        raise LaunchError("--coordinator, --num-processes and --process-id are set by the launcher from --nodes; drop them")
    if args.nodes is not None and args.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {args.nodes}")
    nodes = args.nodes or 1
    gpu = gpu_type(args.gpu_type or "H100")
    timeout_s = parse_timeout(args.timeout)
    stages = cli.parse_stages(args.stages)
    config = cli.resolve_run_config(args)
    run_name = config.training.run_name or args.model_size
    runs.check_run_name(run_name)

    total = _total_gpus(args, config, gpu, nodes)
    shape = resolve_shape(config.distributed, total)
    validate(shape, config)
    if hasattr(cli, "check_stage_flags"):
        cli.check_stage_flags(stages, config, args, total)
    if config.training.batch_size % nodes:
        raise LaunchError(f"batch_size={config.training.batch_size} does not divide over the {nodes} nodes (one process each)")

    t = config.training
    data_dir = Path(t.data_dir)
    from dsjax.stages import TRAINING_STAGES

    needs_data = any(s in stages for s in ("data_prep", *TRAINING_STAGES))
    download_first = needs_data and layout.check_data_dir(data_dir, may_download="data_prep" in stages)
    tok_dir = None
    if needs_data and not download_first:
        candidate = tokenizer_dir(Path(t.work_dir), layout.split_file(data_dir, "train"), config.model.vocab_size)
        tok_dir = candidate if (candidate / "tokenizer.model").is_file() else None

    config_json = None
    if args.config:
        config_json = Path(args.config).read_text()  # already read and validated by resolve_run_config
    return Plan(
        run_name=run_name, stages=stages, run_names=trained_run_names(stages, run_name), gpu=gpu,
        gpus_per_node=total // nodes, nodes=nodes, mesh=str(shape), microbatches=resolve_microbatches(shape, config),
        timeout_s=timeout_s,
        flags=["--model-size", args.model_size, "--run-name", run_name, *pass_through_flags(args), "--gpus", str(total)],
        config_json=config_json, data_dir=data_dir if needs_data else None, download_data_first=download_first,
        tokenizer_dir=tok_dir,
        checkpoint_dir=Path(t.checkpoint_dir), output_dir=Path(t.output_dir),
        resume=args.resume, detach=args.detach,
    )


def _hours(seconds: int) -> str:
    return f"{seconds // 3600}h" + (f"{seconds % 3600 // 60:02d}m" if seconds % 3600 else "")


def format_plan(plan: Plan) -> str:
    versions = locked_versions()
    packages = ", ".join(f"{n} {v}" for n, v in versions.items()) or "see uv.lock"
    containers = f"{plan.nodes} containers (modal.clustered, one JAX process each)" if plan.nodes > 1 else "1 container"
    pp = f", {plan.microbatches} pipeline microbatches" if plan.microbatches > 1 else ""
    price = plan.price_per_hour
    cost = (
        f"~${price:.2f}/hour while running ({plan.gpus} x {plan.gpu} at ${GPU_TYPES[plan.gpu][1]:.4f}/GPU-hour, "
        f"Modal list price read {PRICES_READ} via {PRICES_SOURCE}; CPU, memory and region multipliers extra; "
        "nothing while idle)" if price is not None else f"no price for {plan.gpu} in the table (see BUILD.md); nothing while idle"
    )
    lines = [
        "Modal launch plan (dry run: nothing uploaded, nothing started, no network used)",
        f"  app       {APP_NAME}, launch id {plan.launch_id}",
        f"  image     debian-slim + Python {PYTHON_VERSION}; `uv sync --frozen --no-dev --extra cuda` from pyproject.toml + uv.lock "
        f"({packages}); our source: {', '.join(SOURCE_PACKAGES)}, configs/",
        f"  gpu       {plan.gpu_spec} x {containers}: {plan.gpus} GPUs; timeout {_hours(plan.timeout_s)} per attempt, "
        f"{MAX_RETRIES} retries after a crash (Modal restarts preempted calls itself)",
        f"  mesh      {plan.mesh} over {plan.gpus} GPUs{pp}",
        "  volumes   " + "\n            ".join(f"{name} at {mount}  ({what})" for name, mount, what in VOLUMES),
    ]
    if plan.download_data_first:
        lines.append(f"  data      {plan.data_dir} is empty: data_prep downloads TinyStories there first (on this machine)")
    uploads = [f"{local}/ -> {DATA_VOLUME}:{prefix}/ (changed files only)" for local, prefix in plan.uploads()]
    lines.append("  upload    " + ("\n            ".join(uploads) or "nothing (no stage reads data)"))
    lines.append("  command   " + " ".join(plan.remote_command()))
    lines.append(
        "  resume    a restarted attempt continues from the newest complete checkpoint in "
        f"{CHECKPOINT_VOLUME}:{', '.join(n + '/' for n in plan.run_names) or '-'} (volumes committed after each save)"
    )
    if plan.detach:
        lines.append("  download  --detach: nothing; fetch later with `modal volume get` (BUILD.md, Modal)")
    else:
        lines.append("  download  " + ("\n            ".join(
            f"{vol}:{prefix}/ -> {local}/" for vol, prefix, local in plan.downloads()) or "nothing (no training or export stage)"))
        for old in plan.local_to_move():
            lines.append(f"  keep      {old}/ is from an earlier run: renamed to {old.name}.replaced-<UTC time>/ (not deleted) "
                         "before the download")
    lines.append(f"  cost      {cost}")
    if plan.nodes > 1:
        lines.append("  note      multi-node has not run on Modal yet; checkpoints from several containers are untested (BUILD.md)")
    return "\n".join(lines)
