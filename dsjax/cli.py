"""The `dsjax` command line: what users type.

    dsjax download  [--out data/stories] [--from PATH] [--max-stories N] [--version v1|v2]
    dsjax run       [--model-size nano|tiny|small|medium] [--config FILE] [--stages data_prep,pretrain|all|...] ...
    dsjax generate  --checkpoint checkpoints/<run>/final --prompt "Once upon a time"
    dsjax info      [--model-size ...] [--config FILE]
    dsjax export    --checkpoint checkpoints/<run>/final --format gguf|hf --out PATH [--dtype f32|f16|bf16|q8_0]
    dsjax import    --from-hf DIR | --from-gguf FILE --out checkpoints/<run>/final
    dsjax eval      --checkpoint checkpoints/<run>/final [--checkpoint ...] [--prompts 64] [--json]
    dsjax bench     [--model-size tiny,small] [--moe dense,pallas] [--attention xla,cudnn] [--json]

Flags override the config file, which overrides the size preset. Every failure is
one line on stderr with an exit code listed in `dsjax --help`; flags, config, mesh,
data folder and run name are all checked before any tokenizing or compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import sys
from pathlib import Path

from dsjax.config import MODEL_SIZES, ConfigError, config_choices, load_config
from dsjax.stages import TRAINING_STAGES, export_source, parse_stages, plan_stages
from dsjax.stages import describe as describe_stages

log = logging.getLogger("dsjax")

BACKENDS = ("jax", "mlx")
# flags that only a stage reads: refused when that stage is not in --stages
STAGE_FLAGS = {
    "sft": (("--sft-data", "sft_data"), ("--sft-steps", "sft_steps")),
    "grpo": (("--grpo-steps", "grpo_steps"), ("--group-size", "group_size")),
    "distill": (("--teacher", "teacher"), ("--distill-temperature", "distill_temperature"),
                ("--distill-alpha", "distill_alpha")),
}
RUN_BACKENDS = (*BACKENDS, "modal")  # modal: `dsjax run` on Modal GPUs (launch/modal_h100.py)
MODAL_FLAGS = ("nodes", "gpu_type", "timeout", "detach", "dry_run")  # flags only --backend modal takes

# flag dest -> (config block, key)
RUN_OVERRIDES = {
    "max_steps": ("training", "max_steps"),
    "batch_size": ("training", "batch_size"),
    "grad_accum": ("training", "gradient_accumulation_steps"),
    "seq_len": ("training", "seq_len"),
    "learning_rate": ("training", "learning_rate"),
    "warmup_steps": ("training", "warmup_steps"),
    "run_name": ("training", "run_name"),
    "eval_interval": ("training", "eval_interval"),
    "eval_batches": ("training", "eval_batches"),
    "checkpoint_interval": ("training", "checkpoint_interval"),
    "log_interval": ("training", "log_interval"),
    "data_dir": ("training", "data_dir"),
    "work_dir": ("training", "work_dir"),
    "checkpoint_dir": ("training", "checkpoint_dir"),
    "output_dir": ("training", "output_dir"),
    "seed": ("training", "seed"),
    "pp_size": ("distributed", "pp_size"),
    "dp_size": ("distributed", "dp_size"),
    "tp_size": ("distributed", "tp_size"),
    "ep_size": ("distributed", "ep_size"),
    "sp_size": ("distributed", "sp_size"),
    "microbatches": ("distributed", "microbatches"),
    "pipeline_repeats": ("distributed", "pipeline_repeats"),
    "ep_dispatch": ("distributed", "ep_dispatch"),
    "accumulation": ("training", "accumulation"),
    "moe": ("model", "moe_impl"),
    "attention": ("model", "attention_impl"),
    "sft_data": ("sft", "data"),
    "sft_steps": ("sft", "max_steps"),
    "grpo_steps": ("grpo", "max_steps"),
    "group_size": ("grpo", "group_size"),
    "teacher": ("distill", "teacher"),
    "distill_temperature": ("distill", "temperature"),
    "distill_alpha": ("distill", "alpha"),
}


EXIT_CODES = """exit codes:
  0    done
  1    unexpected internal error (one line; --verbose or LOG_LEVEL=DEBUG adds the traceback)
  2    bad flag, config, mesh, data folder or run name (found before training starts)
  3    training diverged (NaN/inf loss); the last good checkpoint is kept
  4    a checkpoint cannot be read, written or resumed from
  130  interrupted (Ctrl-C)
  141  output closed early (broken pipe, e.g. `dsjax generate ... | head`)
  143  stopped by SIGTERM after saving a checkpoint (continue with --resume)"""

# XLA aborts the process when a CPU collective waits longer than this (default 40 s) for
# every device thread to arrive; on a loaded machine, an 8-device CPU mesh on 2 cores gets
# there without being stuck. Raised for CPU meshes (the warning still comes after 2 minutes).
CPU_COLLECTIVE_FLAGS = {
    "xla_cpu_collective_call_terminate_timeout_seconds": 3600,
    "xla_cpu_collective_call_warn_stuck_timeout_seconds": 120,
}


class UsageError(ValueError):
    pass


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the usage block) and exit code 2."""

    def error(self, message: str):
        if message.startswith("the following arguments are required"):
            message = self._unknown_flag() or message  # `--fromat gguf` is the problem, not the missing --format
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def _known_flags(self) -> list[str]:
        return [o[2:] for action in self._actions for o in action.option_strings if o.startswith("--")]

    def _unknown_flag(self) -> str | None:
        """The first --flag given to this parser that it does not know, with the nearest known one."""
        names = self._known_flags()
        for arg in getattr(self, "_given", []):
            flag = arg.split("=")[0]
            if flag.startswith("--") and flag[2:] not in names:
                near = difflib.get_close_matches(flag[2:], names, n=1, cutoff=0.75)
                return f"unrecognized arguments: {flag}" + (f"; did you mean --{near[0]}?" if near else "")
        return None

    def parse_args(self, args=None, namespace=None):
        """Flags no parser knows are reported by the (sub)command they were given to, with the nearest known flag."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = self._chosen_subparser(parsed)
            names = chosen._known_flags()
            flags = [a.split("=")[0][2:] for a in extras if a.startswith("--")]
            near = difflib.get_close_matches(flags[0], names, n=1, cutoff=0.75) if flags else []
            chosen.error(f"unrecognized arguments: {' '.join(extras)}" + (f"; did you mean --{near[0]}?" if near else ""))
        return parsed

    def _chosen_subparser(self, parsed) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                name = getattr(parsed, action.dest, None)
                if name in action.choices:
                    return action.choices[name]._chosen_subparser(parsed)
        return self


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-size", choices=MODEL_SIZES, default="nano", help="size preset, configs/<size>.json (default nano)")
    parser.add_argument("--config", metavar="FILE", help="JSON config layered over the size preset")


def resolve_run_config(args: argparse.Namespace):
    overrides: dict[str, dict] = {"training": {}}
    for dest, (block, key) in RUN_OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.setdefault(block, {})[key] = value
    config = load_config(args.model_size, args.config, overrides)
    check_finite(config)
    return config


def check_finite(config) -> None:
    """NaN and inf pass every `> 0` check (a JSON config may hold NaN); refuse them by key."""
    for block in ("model", "training", "distributed", "sft", "grpo", "distill"):
        for f in dataclasses.fields(getattr(config, block)):
            value = getattr(getattr(config, block), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{block}.{f.name}: must be a finite number, got {value}")


def requested_devices(config, gpus: int | None) -> int | None:
    """Total devices the mesh flags ask for: --gpus, else the product of the given sizes (-1 counts as 1).

    None when no flag asks for more than one device (then a run uses what is there).
    """
    if gpus is not None:
        return gpus
    sizes = [getattr(config.distributed, f"{a}_size") for a in ("pp", "dp", "ep", "sp", "tp")]
    total = math.prod(s for s in sizes if s != -1)
    return total if total > 1 else None


def _xla_knows_flag(name: str) -> bool:
    """Whether the installed jaxlib defines an XLA flag (XLA aborts at start-up on an unknown one).

    Looks for the name in jaxlib's shared libraries without importing JAX (the flags
    must be set before JAX starts).
    """
    import importlib.util
    import mmap

    spec = importlib.util.find_spec("jaxlib")
    folders = list(spec.submodule_search_locations or []) if spec else []
    needle = name.encode()
    for folder in folders:
        for lib in sorted(Path(folder).glob("*.so"), key=lambda p: -p.stat().st_size):
            try:
                with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    if data.find(needle) >= 0:
                        return True
            except (OSError, ValueError):  # unreadable or empty file: look in the others
                continue
    return False


def ensure_host_devices(per_host: int) -> None:
    """On a CPU host, split the CPU into `per_host` devices so the same mesh flags work on a laptop,
    and lengthen XLA's CPU collective timeouts so a loaded machine does not abort the run.

    Must run before JAX creates its backends; XLA reads these flags only for the CPU platform.
    Flags the user already set in XLA_FLAGS are left alone.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if per_host <= 1:
        return
    added = []
    if "xla_force_host_platform_device_count" not in flags:
        added.append(f"--xla_force_host_platform_device_count={per_host}")
    for name, value in CPU_COLLECTIVE_FLAGS.items():
        if name not in flags and _xla_knows_flag(name):
            added.append(f"--{name}={value}")
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()


def _process_id(args: argparse.Namespace) -> int:
    if args.process_id is not None:
        return args.process_id
    return int(os.environ.get("JAX_PROCESS_ID", "0") or 0)


def check_run_flags(args: argparse.Namespace) -> None:
    if args.gpus is not None and args.gpus <= 0:
        raise UsageError(f"--gpus must be > 0, got {args.gpus}")
    if args.num_processes is not None and args.num_processes <= 0:
        raise UsageError(f"--num-processes must be > 0, got {args.num_processes}")
    if args.process_id is not None:
        count = args.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
        if args.process_id < 0 or (count and args.process_id >= count):
            raise UsageError(f"--process-id must be in 0..{max(count - 1, 0)}, got {args.process_id}")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues a run and --overwrite moves it aside; pass one of them")
    from dsjax.train.compile_cache import named_file

    cache_file = named_file(args.compile_cache)
    if cache_file:
        source = "--compile-cache" if args.compile_cache else "DSJAX_COMPILE_CACHE"
        raise UsageError(f"{source} {cache_file} is a file; give a folder for the compiled programs, or 'off'")
    if args.allow_data_change and not args.resume:
        raise UsageError("--allow-data-change applies to --resume (a new run simply uses the data it is given)")
    given = ["--" + f.replace("_", "-") for f in MODAL_FLAGS if getattr(args, f, None) not in (None, False)]
    if given and getattr(args, "backend", None) != "modal":
        raise UsageError(f"{', '.join(given)}: only with --backend modal (or python -m launch.modal_h100)")


def check_mesh(config, args: argparse.Namespace, stages: list[str] = ()) -> None:
    """Mesh sizes against the model, batch and devices: everything `build_mesh` would refuse, before any work."""
    import jax

    from meshes.mesh import MeshError, MeshShape, resolve_shape, validate

    d = config.distributed
    sizes = {a: getattr(d, f"{a}_size") for a in ("pp", "dp", "ep", "sp", "tp")}
    # first with an inferred size at its smallest (1): the same error on any machine, whatever its device count
    smallest = MeshShape(**{a: 1 if s == -1 else s for a, s in sizes.items()})
    checked = config
    if "grpo" in stages:
        from dsjax.posttrain.grpo_loop import check_grpo_mesh, mesh_view

        check_grpo_mesh(config, smallest, jax.process_count())
        if not {"pretrain", "sft", "distill"} & set(stages):  # GRPO alone: its rows are the batch, not --batch-size
            checked = mesh_view(config)
    validate(smallest, checked)
    available = len(jax.devices())
    if args.gpus is not None and args.gpus > available:
        raise MeshError(f"--gpus {args.gpus} asks for more devices than the {available} available")
    shape = resolve_shape(d, args.gpus or available)
    if "grpo" in stages:
        check_grpo_mesh(config, shape, jax.process_count())
    validate(shape, checked)
    if config.training.batch_size % jax.process_count():
        raise UsageError(
            f"batch_size={config.training.batch_size} does not divide over {jax.process_count()} processes"
        )


def check_folder_flag(flag: str, value) -> None:
    """A folder we will write into must be one, or not exist yet: a file there (or above it) is refused before any work."""
    path = Path(value).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, a file"
        raise UsageError(f"{flag} {value} {where}; give a folder")


def check_output_folders(config) -> None:
    """The work, checkpoint and output folders of a run."""
    for flag, key in (("--work-dir", "work_dir"), ("--checkpoint-dir", "checkpoint_dir"), ("--output-dir", "output_dir")):
        check_folder_flag(f"{flag} (training.{key})", getattr(config.training, key))


def cmd_run(args: argparse.Namespace) -> int:
    from dsjax.data import layout
    from dsjax.progress import console, setup_logging
    from dsjax.train import runs

    setup_logging(args.verbose)
    check_run_flags(args)
    if args.backend == "modal":
        from launch.modal_h100 import launch

        return launch(args)
    if args.backend == "mlx":
        from dsjax.mlx_backend import require_mlx

        require_mlx()
    stages = parse_stages(args.stages)
    config = resolve_run_config(args)
    run_name = config.training.run_name or args.model_size
    runs.check_run_name(run_name)
    total = requested_devices(config, args.gpus)
    mesh_total = max(total or 1, requested_devices(config, None) or 1)
    check_stage_flags(stages, config, args, mesh_total)

    # before any work: the data is there (or is the default, to download), the run names are free
    check_output_folders(config)
    data_dir = Path(config.training.data_dir)
    needs_data = any(s in stages for s in ("data_prep", *TRAINING_STAGES))
    start_from = Path(args.start_from) if args.start_from else None
    try:
        must_download = layout.check_data_dir(data_dir, may_download="data_prep" in stages) if needs_data else False
    except layout.DataError as err:
        raise layout.DataError(f"{err}{_start_data_hint(stages, config, run_name, start_from)}") from None
    plans = plan_stages(stages, config, run_name, resume=args.resume, overwrite=args.overwrite, start_from=start_from)
    to_move: list[Path] = []
    for plan in plans:
        if plan.action == "run" and not (args.overwrite and _process_id(args) != 0):  # process 0 moves the folders
            to_move += plan.to_move
        if plan.action == "resume" and plan.stage == "pretrain":
            check_resume(config, plan.paths, plan.run_name, data_dir, must_download, args)
        elif plan.action == "resume" and runs.latest_resume_point(plan.paths.checkpoints) is None:
            runs.check_nothing_to_lose(plan.paths, plan.run_name)
    if "export" in stages:
        export_from = export_source(stages, plans, config, run_name)
        export_dir = Path(config.training.output_dir) / export_from.parent.name / "export"
    trains_jax = args.backend == "jax" and any(p.action != "skip" for p in plans)

    if total:
        ensure_host_devices(total // max(args.num_processes or 1, 1))
    if trains_jax:
        from dsjax.train.distributed import initialize_multihost

        initialize_multihost(args.coordinator, args.num_processes, args.process_id)
        check_mesh(config, args, stages)
        from dsjax.train.compile_cache import use_compile_cache

        cache = use_compile_cache(args.compile_cache, config.training.work_dir)
        log.debug("compiled programs: %s", cache or "not kept (--compile-cache off)")

    if to_move:
        for old, new in runs.move_aside(to_move):
            log.warning("--overwrite: moved %s to %s", old, new)
    console.print_json(json.dumps({"run_name": run_name, "stages": stages, **config.to_dict()}))
    for line in describe_stages([p for p in plans if p.action != "skip"]):
        log.info(line)
    if "data_prep" in stages:
        if must_download:
            from dsjax.data.download import download_from_hub

            from dsjax.data.download import DownloadError

            log.info("data_prep: downloading TinyStories into %s", data_dir)
            try:
                download_from_hub(data_dir)
            except DownloadError as err:
                # `run` has no --from: point at what it does have
                message = str(err).split("; pass local files with --from")[0]
                raise DownloadError(
                    f"{message}; offline, make a data folder with `dsjax download --out DIR --from PATH` "
                    f"and pass --data-dir DIR"
                ) from None
        else:
            log.info("data_prep: %s already holds train/ and valid/; not downloading", data_dir)
    for plan in plans:
        if plan.action == "skip":
            log.info("%s: skipped, %s exists (--overwrite trains it again)", plan.stage, plan.final)
            continue
        run_stage(plan, config, args)
    if "export" in stages:
        run_export(export_from, export_dir, args)
    if {"sft", "grpo"} & set(stages) and args.backend == "jax":
        compare_stages(plans, config, args)
    return 0


def check_stage_flags(stages: list[str], config, args: argparse.Namespace, mesh_total: int) -> None:
    """What a stage list cannot run with: all before any work."""
    if args.backend == "mlx":
        if mesh_total > 1:
            raise UsageError(f"--backend mlx runs on one device, but the mesh flags ask for {mesh_total}; drop them")
        other = [s for s in stages if s in ("sft", "grpo", "distill")]
        if other:
            raise UsageError(f"--backend mlx runs data_prep and pretrain; run {','.join(other)} on the JAX backend")
        if config.training.accumulation == "fold":
            raise UsageError("--backend mlx runs its microbatches one after another; drop --accumulation fold "
                             "(training.accumulation)")
    if "sft" in stages and config.sft.data:
        sft_data = Path(config.sft.data)
        if not sft_data.is_file():
            problem = "is a folder; give a file" if sft_data.is_dir() else "no such file"
            raise UsageError(f"--sft-data (sft.data) {config.sft.data}: {problem} (TinyStoriesInstruct format)")
    if "grpo" in stages:
        from dsjax.posttrain.grpo_loop import check_grpo_mesh

        check_grpo_mesh(config, processes=args.num_processes or 1)
    if "grpo" in stages and config.grpo.max_new_tokens >= config.model.max_position_embeddings:
        raise ConfigError(
            f"grpo.max_new_tokens: {config.grpo.max_new_tokens} leaves no room for a prompt within "
            f"model.max_position_embeddings={config.model.max_position_embeddings}"
        )
    if "distill" in stages and config.distributed.pp_size > 1:
        raise UsageError(
            f"the distill stage runs on dp/tp/ep/sp meshes, not pipeline stages (pp_size={config.distributed.pp_size}); "
            "drop --pp-size"
        )
    for stage, flags in STAGE_FLAGS.items():
        given = [flag for flag, dest in flags if getattr(args, dest, None) is not None]
        if given and stage not in stages:
            raise UsageError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to the {stage} stage; add {stage} to --stages")
    if "distill" in stages:
        from dsjax.train.checkpoint import read_final_config

        teacher = config.distill.teacher
        if not teacher:
            raise UsageError("the distill stage needs --teacher checkpoints/<run>/final (or distill.teacher in the config)")
        teacher_config = read_final_config(Path(teacher))
        if teacher_config.model.vocab_size != config.model.vocab_size:
            raise UsageError(
                f"--teacher {teacher} has vocab_size={teacher_config.model.vocab_size} but the student has "
                f"{config.model.vocab_size}: teacher and student must share the tokenizer"
            )
        check_teacher_data(Path(teacher), Path(config.training.data_dir))
    formats = _csv(args.export_format)
    for fmt in formats:
        if fmt not in ("gguf", "hf"):
            raise UsageError(f"--export-format: unknown format '{fmt}' (gguf, hf, or gguf,hf)")
    if len(set(formats)) != len(formats):
        raise UsageError(f"--export-format: a format is listed twice ({args.export_format})")
    if ("export" not in stages) and (args.export_format or args.export_dtype):
        raise UsageError("--export-format and --export-dtype apply to the export stage; add export to --stages")
    if args.export_dtype == "q8_0" and "hf" in (formats or ["gguf", "hf"]):
        raise UsageError("--export-dtype q8_0 is a GGUF type; add --export-format gguf, or pick f32, f16 or bf16")


def _start_data_hint(stages: list[str], config, run_name: str, start_from: Path | None) -> str:
    """Post-training only: where the checkpoint it starts from was trained, when that folder is still there."""
    from dsjax.data import layout
    from dsjax.train.checkpoint import read_data_record

    if any(s in stages for s in ("data_prep", "pretrain")) or not any(s in stages for s in TRAINING_STAGES):
        return ""
    start, whose = start_from or Path(config.training.checkpoint_dir) / run_name / "final", "the start checkpoint"
    if "distill" in stages and config.distill.teacher:
        start, whose = Path(config.distill.teacher), "the teacher"
    recorded = read_data_record(start).get("data_dir")
    if not recorded or not layout.dataset_ready(Path(recorded)):
        return ""
    return f" ({whose} trained on --data-dir {recorded})"


def check_teacher_data(teacher: Path, data_dir: Path) -> None:
    """The student trains its tokenizer on data_dir's train split; on other data than the teacher's it
    cannot be the teacher's tokenizer. Refused before that tokenizer is trained (distill checks the files too)."""
    from dsjax.data import layout
    from dsjax.train.checkpoint import read_data_record

    recorded = read_data_record(teacher)  # {} from an older final/: distill compares the tokenizer files themselves
    if not recorded.get("train_sha256") or not layout.dataset_ready(data_dir):
        return
    current = layout.fingerprints(data_dir)
    if current["train_sha256"] != recorded["train_sha256"]:
        raise UsageError(
            f"--teacher {teacher} was trained on {layout.describe_fingerprints(recorded)} but the student's data is "
            f"{layout.describe_fingerprints(current)}: teacher and student must share the tokenizer, which is trained "
            f"on the train split; pass the teacher's --data-dir"
        )


def run_stage(plan, config, args: argparse.Namespace) -> None:
    resume = plan.action == "resume"
    if plan.stage == "pretrain":
        if args.backend == "mlx":
            from dsjax.mlx_backend.loop import pretrain_mlx

            pretrain_mlx(config, plan.run_name, resume=resume)
            return
        from dsjax.train.loop import pretrain

        pretrain(config, plan.run_name, resume=resume, device_count=args.gpus, allow_data_change=args.allow_data_change)
    elif plan.stage == "sft":
        from dsjax.posttrain.sft import sft

        sft(config, plan.run_name, plan.start_final, resume=resume, device_count=args.gpus,
            allow_data_change=args.allow_data_change)
    elif plan.stage == "grpo":
        from dsjax.posttrain.grpo_loop import grpo

        grpo(config, plan.run_name, plan.start_final, resume=resume, device_count=args.gpus)
    elif plan.stage == "distill":
        from dsjax.distill import distill

        distill(config, plan.run_name, Path(config.distill.teacher), resume=resume, device_count=args.gpus,
                allow_data_change=args.allow_data_change)


def run_export(final_dir: Path, out_dir: Path, args: argparse.Namespace) -> None:
    """The EXPORT stage: the chosen final/ as GGUF and/or Hugging Face files under outputs/<run>/export/."""
    from dsjax.export import existing_dtype, export_checkpoint

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file at INFO
    formats = _csv(args.export_format) or ["gguf", "hf"]
    targets = {"gguf": out_dir / "model.gguf", "hf": out_dir / "hf"}
    for fmt in formats:
        target = targets[fmt]
        dtype = args.export_dtype or ("f16" if fmt == "gguf" else "f32")
        newer = target.exists() and target.stat().st_mtime >= final_dir.stat().st_mtime
        held = existing_dtype(target, fmt) if newer else None
        if newer and not args.overwrite and held == dtype:
            log.info("export: skipped, %s (%s) exists and is newer than %s (--overwrite writes it again)", target, dtype, final_dir)
            continue
        if target.exists():  # moved aside, never deleted
            from dsjax.train import runs

            why = (
                "--overwrite" if args.overwrite
                else f"it is older than {final_dir}" if not newer
                else f"it holds {held or 'another dtype'}, not {dtype}"
            )
            for old, new in runs.move_aside([target]):
                log.warning("export: moved %s to %s (%s)", old, new, why)
        out_dir.mkdir(parents=True, exist_ok=True)
        export_checkpoint(final_dir, fmt, target, dtype)
        log.info("export: %s -> %s", final_dir, target)


def compare_stages(plans, config, args: argparse.Namespace) -> None:
    """The table at the end of post-training: each stage's final/ on the same held-out prompts (`dsjax eval`)."""
    from dsjax.posttrain.evaluate import EvalSettings, compare

    finals = []
    pretrain_final = Path(config.training.checkpoint_dir) / (config.training.run_name or args.model_size) / "final"
    first = next((plan for plan in plans if plan.stage in ("sft", "grpo")), None)
    if first is not None and args.start_from and first.start_final is not None and first.start_final.is_dir():
        finals.append(("start", first.start_final))  # --start-from: what the first post-training stage began with
    elif pretrain_final.is_dir():
        finals.append(("pretrain", pretrain_final))
    for plan in plans:
        if plan.stage in ("sft", "grpo") and plan.final.is_dir():
            finals.append((plan.stage, plan.final))
    if len(finals) > 1:
        log.info("scoring %s on the same held-out prompts", ", ".join(label for label, _ in finals))
        settings = EvalSettings.from_config(config, prompts=config.grpo.eval_prompts)  # GRPO never trains on these
        try:
            compare(finals, settings, Path(config.training.data_dir), Path(config.training.work_dir))
        except KeyboardInterrupt:
            from dsjax.train.signals import StopRequested

            again = " ".join(f"--checkpoint {folder}" for _, folder in finals)
            raise StopRequested(
                "SIGINT", 130,
                f"interrupted while scoring the stages; their final/ folders are saved; the table: dsjax eval {again}",
            ) from None


def check_resume(config, paths, run_name: str, data_dir: Path, must_download: bool, args: argparse.Namespace) -> None:
    """What --resume will continue, checked from the checkpoint's small files before any work."""
    from dsjax.data import layout
    from dsjax.train import runs

    point = runs.latest_resume_point(paths.checkpoints)
    if point is None:
        runs.check_nothing_to_lose(paths, run_name)
        return
    current = None if must_download else layout.fingerprints(data_dir)
    runs.check_resume(point, config, current, args.allow_data_change)
    if args.backend == "mlx":
        check_mlx_tokenizer(config, point, data_dir, args)


def check_mlx_tokenizer(config, point, data_dir: Path, args: argparse.Namespace) -> None:
    """The MLX loop tokenizes with the work folder's tokenizer for this data; it must be the checkpoint's."""
    from dsjax.data import layout
    from dsjax.data.tokenizer import TOKENIZER_FILE, tokenizer_dir

    if args.allow_data_change:
        raise UsageError("--allow-data-change is not supported with --backend mlx; resume on the JAX backend")
    if point.tokenizer is None or not layout.dataset_ready(data_dir):
        return
    t = config.training
    expected = tokenizer_dir(Path(t.work_dir), layout.split_file(data_dir, "train"), config.model.vocab_size)
    expected = expected / TOKENIZER_FILE
    if not expected.is_file() or layout.file_digest(expected) != layout.file_digest(point.tokenizer):
        raise UsageError(
            f"--backend mlx --resume tokenizes with {expected}, which is not the checkpoint's tokenizer "
            f"({point.tokenizer}); pass the original run's --work-dir, or resume on the JAX backend"
        )


def cmd_download(args: argparse.Namespace) -> int:
    from dsjax.data.download import DownloadError, check_max_stories, download_from_hub, prepare_from_local
    from dsjax.data.layout import SPLITS, split_file
    from dsjax.progress import setup_logging

    setup_logging(False)
    check_max_stories(args.max_stories)
    out = Path(args.out)
    check_folder_flag("--out", out)  # train/ and valid/ are written inside
    existing = [str(split_file(out, s)) for s in SPLITS if split_file(out, s).exists()]
    if existing:
        raise DownloadError(
            f"--out {out} already holds {' and '.join(existing)}; download never replaces data: choose another --out, "
            "or move that folder away first"
        )
    if args.source:
        stats = prepare_from_local(Path(args.source), out, args.max_stories, version=args.version)
    else:
        stats = download_from_hub(out, args.version or "v1", args.max_stories)
    for split, s in stats.items():
        print(
            f"{split}: {s.stories} stories -> {out / split / 'stories.jsonl'} "
            f"(dropped {s.dropped_empty} empty, skipped {s.malformed} malformed, repaired {s.repaired} mojibake)"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dsjax.data.tokenizer import Tokenizer, TokenizerError
    from dsjax.infer.generate import SamplingConfig, check_prompt, generate_tokens, stream_text
    from dsjax.progress import setup_logging
    from dsjax.train.checkpoint import CheckpointError, load_final, read_final_config, read_json_item

    setup_logging(False)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    sampling.validate()
    final_dir = Path(args.checkpoint)
    config = read_final_config(final_dir)  # flags against the model before any array is read
    sampling.check_model(config.model)
    try:
        tokenizer = Tokenizer(final_dir / "tokenizer.model")
    except TokenizerError as err:
        raise CheckpointError(str(err)) from None
    if tokenizer.vocab_size != config.model.vocab_size:
        raise CheckpointError(
            f"{tokenizer.path} has {tokenizer.vocab_size} pieces but {final_dir / 'config.json'} says "
            f"vocab_size={config.model.vocab_size}; this final/ folder is inconsistent"
        )
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.prompts_file is not None:
        try:
            prompts = [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise UsageError(f"--prompts-file {args.prompts_file}: cannot read it ({reason})") from None
        if not prompts:
            raise UsageError(f"--prompts-file {args.prompts_file} holds no prompt (one per line)")
    else:
        prompts = [args.prompt]
    if args.chat:
        from dsjax.posttrain.chat import ChatTokens, prompt_ids as chat_prompt_ids

        try:
            chat = ChatTokens(tokenizer)
        except TokenizerError as err:
            raise CheckpointError(str(err)) from None
        # the template SFT and GRPO train on; the answer ends at <|end|> (or </s>)
        prompts_ids = [chat_prompt_ids(tokenizer, p, chat) for p in prompts]
        stop_ids: int | tuple[int, ...] = (chat.end, chat.eos)
    else:
        prompts_ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
        stop_ids = tokenizer.eos_id
    for ids in prompts_ids:
        check_prompt(len(ids), config.model)  # before anything is echoed
    batched = args.prompts_file is not None or args.num_samples > 1
    if batched and args.backend == "mlx":
        raise UsageError("--num-samples and --prompts-file run on the JAX backend; drop --backend mlx")
    params, config, _ = load_final(final_dir)
    stage = (read_json_item(final_dir, "training_state") or {}).get("stage")
    if stage in ("sft", "grpo") and not args.chat:
        _say(f"dsjax: note: this checkpoint was post-trained ({stage}) on the chat template; add --chat to give it "
             "an instruction, as it was trained")
    if stage in ("pretrain", "distill") and args.chat:
        _say(f"dsjax: note: this checkpoint was not post-trained ({stage} only), so the chat template is new to it; "
             "run the sft stage first, or drop --chat to continue the prompt as text")
    # the last position's logits still give one token, which is not fed back: the context's room + 1
    room = config.model.max_position_embeddings - max(len(ids) for ids in prompts_ids) + 1
    if sampling.max_new_tokens > room:  # said once the checkpoint has loaded, so an error stays the only line
        _say(f"dsjax: note: --max-new-tokens {sampling.max_new_tokens} is more than the {room} tokens the model's "
             f"{config.model.max_position_embeddings}-token context leaves after the prompt; generation stops there")
    if batched:
        return _generate_batch(params, config, tokenizer, prompts_ids, sampling, args.num_samples, stop_ids, args.chat)
    prompt_ids = prompts_ids[0]
    if args.backend == "mlx":
        from dsjax.mlx_backend import require_mlx

        require_mlx()
        import jax

        from dsjax.mlx_backend import note_linux_speed
        from dsjax.mlx_backend.generate import generate_tokens_mlx
        from dsjax.mlx_backend.model import to_mlx

        note_linux_speed()
        params = to_mlx(jax.device_get(params))
        generate = generate_tokens_mlx
    else:
        from dsjax.infer.sampler import stream_tokens

        # decoded on the device 64 tokens per call, printed as each chunk arrives: each call costs
        # about 0.4 ms besides its tokens on the 2-core CPU (2.6 ms before the decode layouts moved
        # out of it; BENCHMARKS.md), and 64 tokens take about 20 ms there, still a stream to the eye
        generate = functools.partial(stream_tokens, chunk=64)
    # plain: the prompt, then its continuation; --chat: the answer alone (the prompt is the question)
    prompt_text = "" if args.chat else tokenizer.decode(prompt_ids)
    shown_ids = [] if args.chat else prompt_ids
    sys.stdout.write(prompt_text)
    sys.stdout.flush()

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stats = stream_text(
        generate(params, config.model, prompt_ids, sampling, eos_id=stop_ids),
        lambda ids: tokenizer.decode(shown_ids + ids)[len(prompt_text):],
        write,
    )
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"[{_rate_line(stats)}]", file=sys.stderr)
    return 0


def _rate_line(stats: dict, rows: str = "") -> str:
    """`generate`'s closing line from `RateAfterCompiling` stats."""
    after = (
        f"{stats['tokens_per_sec']:.1f} tokens/s after it{rows}" if stats["tokens_per_sec"] > 0
        else "too few tokens after compiling to measure tokens/s"  # every token came with the compiling calls
    )
    return f"{stats['tokens']} tokens in {stats['seconds']:.2f}s with compilation; {after}"


def _generate_batch(params, config, tokenizer, prompts_ids, sampling, num_samples: int, stop_ids, chat: bool) -> int:
    """Every prompt x num_samples as one batch on the device; sample i of each prompt uses seed + i.

    Plain prompts print with their continuation; --chat prints each answer alone.
    """
    from dsjax.infer.generate import RateAfterCompiling
    from dsjax.infer.sampler import sample_chunks

    rows = [ids for ids in prompts_ids for _ in range(num_samples)]
    seeds = [sampling.seed + i for _ in prompts_ids for i in range(num_samples)]
    # in compiled chunks of 64 tokens per row (the same tokens as one call), so the rate after the
    # compiling calls is the decoding's own
    rate = RateAfterCompiling()
    for out, counts in sample_chunks(params, config.model, rows, sampling, eos_id=stop_ids, seeds=seeds, chunk=64):
        rate.arrived(int(counts.sum()))
    stats = rate.stats(int(counts.sum()))
    outputs = [[int(t) for t in out[r, : counts[r]]] for r in range(len(rows))]
    for r, (ids, out) in enumerate(zip(rows, outputs)):
        p, i = divmod(r, num_samples)
        sys.stdout.write(f"--- prompt {p + 1}, sample {i + 1} (seed {seeds[r]}) ---\n")
        sys.stdout.write(tokenizer.decode(out if chat else ids + out) + "\n")
    sys.stdout.flush()
    print(f"[{len(rows)} samples, {_rate_line(stats, ' (all rows together)')}]", file=sys.stderr)
    return 0


def cmd_checkpoints_ls(args: argparse.Namespace) -> int:
    from dsjax.train.checkpoint import describe_run, step_number

    run_dir = Path(args.run_dir)
    infos = describe_run(run_dir)
    if not infos:
        if step_number(run_dir) is not None and (run_dir / "_CHECKPOINT_METADATA").is_file():
            raise UsageError(f"{args.run_dir} is one step's checkpoint; list its run folder: dsjax checkpoints ls {run_dir.parent}")
        if (run_dir / "params").is_dir() and (run_dir / "config.json").is_file():
            if run_dir.name != "final":  # e.g. `dsjax import --out checkpoints/x`: not inside a run folder
                raise UsageError(
                    f"{args.run_dir} is a final/ checkpoint itself (params + config.json), not a run folder of step_N/ "
                    f"and final/: pass it to generate, eval or export as --checkpoint {args.run_dir}"
                )
            raise UsageError(f"{args.run_dir} is a final/ checkpoint; list its run folder: dsjax checkpoints ls {run_dir.parent}")
        runs = sorted(d.name for d in run_dir.iterdir() if d.is_dir() and describe_run(d))
        if runs:
            shown = ", ".join(runs[:5]) + (f", ... {len(runs) - 5} more" if len(runs) > 5 else "")
            raise UsageError(
                f"{args.run_dir} holds runs ({shown}), not checkpoints; list one: dsjax checkpoints ls {run_dir / runs[0]}"
            )
        if (run_dir / "metrics.csv").is_file():  # an outputs/<run>/ folder
            raise UsageError(
                f"{args.run_dir} holds a run's metrics, not its checkpoints; those are under --checkpoint-dir, "
                f"e.g. dsjax checkpoints ls checkpoints/{run_dir.name}"
            )
        print(f"{args.run_dir}: no checkpoints")
        return 0
    print(f"{'checkpoint':<22} {'step':>8} {'size':>10} {'val_loss':>9}  complete  note")
    for i in infos:
        val = f"{i.val_loss:.4f}" if isinstance(i.val_loss, (int, float)) else "-"
        step = str(i.step) if i.step is not None else "-"
        print(f"{i.name:<22} {step:>8} {i.bytes / 2**20:>8.1f}MB {val:>9}  {'yes' if i.complete else 'NO':<8}  {i.note}")
    return 0


def _csv(text: str | None, cast=str) -> list:
    return [cast(v.strip()) for v in text.split(",") if v.strip()] if text else []


def cmd_bench(args: argparse.Namespace) -> int:
    """Synthetic-token benchmark of the train step: one row per case (cross product of the lists)."""
    import itertools

    from dsjax import bench

    sizes = _csv(args.model_size) or ["nano"]
    for size in sizes:
        if size not in MODEL_SIZES:
            raise UsageError(f"--model-size: unknown size '{size}' (sizes: {', '.join(MODEL_SIZES)})")
    try:
        batches, accums, seqs = _csv(args.batch_size, int), _csv(args.grad_accum, int), _csv(args.seq_len, int)
    except ValueError as err:
        raise UsageError(f"--batch-size/--grad-accum/--seq-len take integers or comma lists: {err}") from None
    moes, attns, remats, folds = _csv(args.moe), _csv(args.attention), _csv(args.remat), _csv(args.accumulation)
    for flag, key, values in (
        ("--moe", "model.moe_impl", moes), ("--attention", "model.attention_impl", attns), ("--remat", "model.remat", remats),
        ("--accumulation", "training.accumulation", folds),
    ):
        allowed = config_choices(key)
        for value in values:
            if value not in allowed:
                raise UsageError(f"{flag}: unknown value '{value}' ({', '.join(allowed)})")
    if args.steps <= 0 or args.warmup < 0:
        raise UsageError(f"--steps must be > 0 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UsageError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.results is not None and not args.json:
        raise UsageError("--results names the file --json appends to; add --json")
    results = Path(args.results or bench.RESULTS_FILE)
    if results.suffix != ".jsonl" or results.is_dir():
        raise UsageError(f"--results {results}: give a .jsonl file (rows are appended to it), such as {bench.RESULTS_FILE}")
    profile_root = None
    if args.profile is not None:
        profile_root = Path(args.profile).absolute()
        if profile_root.exists() and not profile_root.is_dir():
            raise UsageError(f"--profile {args.profile} is a file; give a folder for the traces")
        if args.backend == "mlx":
            raise UsageError("--profile traces JAX programs; drop it with --backend mlx")
        from dsjax import trace_summary

        trace_summary.enable_cpu_op_events()  # before JAX starts its CPU backend
    cases = []
    for size, moe, attn, remat, b, a, t, fold in itertools.product(
        sizes, moes or [None], attns or [None], remats or [None], batches or [None], accums or [None], seqs or [None],
        folds or [None],
    ):
        overrides = {
            "model": {
                k: v for k, v in (("moe_impl", moe), ("attention_impl", attn), ("remat", remat)) if v is not None
            },
            "training": {
                k: v
                for k, v in (("batch_size", b), ("gradient_accumulation_steps", a), ("seq_len", t), ("accumulation", fold))
                if v is not None
            },
            "distributed": {
                a_: getattr(args, a_) for a_ in ("pp_size", "dp_size", "tp_size", "ep_size", "sp_size") if getattr(args, a_) is not None
            },
        }
        cases.append(bench.Case(size, load_config(size, args.config, overrides)))  # every case validated up front
    if args.backend == "mlx":
        from dsjax.mlx_backend import require_mlx

        require_mlx()
        d = cases[0].config.distributed
        if (args.gpus or 1) > 1 or any(getattr(d, f"{a}_size") not in (1, -1) for a in ("pp", "tp", "ep", "sp", "dp")):
            raise UsageError("dsjax bench --backend mlx runs on one device; drop the mesh flags")
        if moes or attns or remats or folds:
            raise UsageError(
                "--moe, --attention, --remat and --accumulation pick JAX compute paths; drop them with --backend mlx"
            )
    total = requested_devices(cases[0].config, args.gpus)  # -1 counts as 1, as for `dsjax run`
    if total and total > 1:
        ensure_host_devices(total)
    env = bench.environment()
    if args.backend == "mlx":
        import mlx.core as mx

        env.update(device=f"mlx {mx.default_device()}", platform="mlx", device_count=1)
    rows = []
    for case in cases:
        try:
            if args.backend == "mlx":
                row = bench.run_case_mlx(case, args.steps, args.warmup, args.peak_tflops)
            else:
                row = bench.run_case(case, args.steps, args.warmup, args.gpus, args.peak_tflops, profile_root)
        except Exception as err:  # noqa: BLE001 - one failing case must not hide the others
            if not args.keep_going:
                raise
            row = {"case": case.label, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        row = {**env, **row}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['case']}: " + (row["error"] if "error" in row else f"{row['step_ms_median']:.2f} ms/step"), file=sys.stderr, flush=True)
    if args.json:
        where = bench.append_results(rows, results)
        print(f"appended {len(rows)} row(s) to {where}", file=sys.stderr)
    else:
        print(f"{env['device']} x{env['device_count']}, jax {env['jax']}, host memory {env['host_memory']}, commit {env['git_commit']}")
        print(bench.format_table(rows))
    if profile_root is not None:
        from dsjax import trace_summary

        for row in rows:
            if "profile" in row:
                print(trace_summary.format_summary(row["case"], row["profile"]), file=sys.stderr if args.json else sys.stdout)
    return 1 if any("error" in r for r in rows) else 0


def cmd_export(args: argparse.Namespace) -> int:
    from dsjax.export import check_export, export_checkpoint
    from dsjax.progress import setup_logging

    setup_logging(False)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file at INFO
    check_export(args.format, Path(args.out), args.dtype)  # flags and --out before any array is read
    out, _ = export_checkpoint(Path(args.checkpoint), args.format, Path(args.out), args.dtype)
    print(f"wrote {out} ({args.format}, {args.dtype})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from dsjax.export import check_out, import_checkpoint
    from dsjax.progress import setup_logging

    setup_logging(False)
    check_out(Path(args.out))
    fmt, source = ("hf", args.from_hf) if args.from_hf is not None else ("gguf", args.from_gguf)
    out = import_checkpoint(Path(source), Path(args.out), fmt)
    from dsjax.train.checkpoint import read_json_item

    chat = " --chat" if (read_json_item(out, "training_state") or {}).get("stage") in ("sft", "grpo") else ""
    print(f"wrote {out}; try: dsjax generate --checkpoint {out}{chat}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dsjax.data import layout
    from dsjax.posttrain.evaluate import EvalSettings, compare
    from dsjax.progress import setup_logging
    from dsjax.train.checkpoint import read_final_config

    setup_logging(False)
    for flag, value, low in (("--prompts", args.prompts, 1), ("--samples", args.samples, 1), ("--seed", args.seed, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.work_dir:
        check_folder_flag("--work-dir", args.work_dir)
    configs = [read_final_config(Path(folder)) for folder in args.checkpoint]  # every folder before any work
    data_dir = Path(args.data_dir or configs[0].training.data_dir)
    layout.check_data_dir(data_dir, may_download=False, has_data_prep=False)
    changes = {"prompts": args.prompts, "samples": args.samples, "temperature": args.temperature}
    for key in ("seed", "max_new_tokens"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    settings = EvalSettings.from_config(configs[0], **changes)
    from dsjax.train.runs import run_name_of

    items = [(run_name_of(Path(folder)), Path(folder)) for folder in args.checkpoint]
    result = compare(items, settings, data_dir, Path(args.work_dir) if args.work_dir else None, out=None if args.json else print)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dsjax.model.params import count_params

    config = load_config(args.model_size, args.config)
    counts = count_params(config.model)
    if args.json:
        print(json.dumps({"config": config.to_dict(), "params": counts}, indent=2))
        return 0
    print(f"model size: {args.model_size}" + (f" + {args.config}" if args.config else ""))
    for key, value in counts.items():
        print(f"  {key:>6} params: {value:>14,}  ({value / 1e6:.2f}M)")
    return 0


RUN_EPILOG = """a run name is a promise:
  outputs/<run> and checkpoints/<run> are never reused silently. If either holds
  anything, `run` refuses before any work unless --resume (continue it), a new
  --run-name, or --overwrite (move both aside to <run>.replaced-<UTC time>/; nothing
  is deleted). --resume continues the newest checkpoint with its own tokenizer, and
  refuses other data (unless --allow-data-change), a config that changes the model,
  or a --max-steps at or below the checkpoint's step.

stages:
  all = data_prep,pretrain,sft,grpo,export. Each training stage has its own folders:
  <run> (pretrain), <run>-sft (from <run>/final), <run>-grpo (from <run>-sft/final),
  <run>-distill (a fresh student taught by --teacher). A stage whose final/ exists is
  skipped when a later stage of the list starts from it (--overwrite trains it again);
  the list's last training stage keeps the promise above. export writes the last
  stage's final/ to outputs/<that run>/export/ (model.gguf, hf/).

data:
  --data-dir DIR must hold train/stories.jsonl and valid/stories.jsonl (make them with
  `dsjax download --out DIR [--from PATH]`). Only the default data/stories is ever
  downloaded into, and only when it holds neither file.

host memory (CPU):
  `run` and `bench` keep the memory a step frees for the next step (glibc malloc options
  and JAX's synchronous CPU dispatch) instead of page-faulting on fresh memory every step;
  DSJAX_MALLOC=system keeps the system's defaults (BUILD.md, Speed and memory)."""


@functools.cache
def _size_presets() -> dict:
    return {size: load_config(size) for size in MODEL_SIZES}


def preset_defaults(training_key: str) -> str:
    """What each size preset sets `training.<key>` to, for --help: "nano 100, tiny 500, ..."."""
    values = ", ".join(f"{size} {getattr(c.training, training_key):,}" for size, c in _size_presets().items())
    return f"default per size: {values}"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dsjax",
        allow_abbrev=False,
        description="Train small DeepSeek-V3-style models (MLA, DeepSeekMoE, MTP) on TinyStories with JAX.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", allow_abbrev=False, help="run pipeline stages (data_prep, pretrain, sft, grpo, distill, export)", epilog=RUN_EPILOG + "\n\n" + EXIT_CODES,
        description="Run pipeline stages.", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--backend", choices=RUN_BACKENDS, default="jax", help="modal: run on Modal GPUs (BUILD.md, Modal)")
    _add_config_flags(run)
    run.add_argument(
        "--stages", default="data_prep,pretrain",
        help="comma-separated stages in order: data_prep, pretrain, sft, grpo, distill, export; all = "
        "data_prep,pretrain,sft,grpo,export (default data_prep,pretrain)",
    )
    run.add_argument("--max-steps", type=int,
                     help=f"optimizer steps to train, the learning rate decaying over them ({preset_defaults('max_steps')})")
    run.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    run.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    run.add_argument("--accumulation", choices=config_choices("training.accumulation"),
                     help="how the micro-batches run (training.accumulation; the same gradient up to rounding): scan = one after another, "
                     "fold = as one batch, auto (default) = fold on a GPU when the batch fits easily")
    run.add_argument("--seq-len", type=int, help=f"tokens per training sequence ({preset_defaults('seq_len')})")
    run.add_argument("--learning-rate", type=finite_float,
                     help=f"peak learning rate after warmup ({preset_defaults('learning_rate')})")
    run.add_argument("--warmup-steps", type=int,
                     help=f"steps of linear warmup to the peak rate ({preset_defaults('warmup_steps')})")
    run.add_argument("--run-name", help="name under checkpoints/ and outputs/ (default: the model size)")
    run.add_argument("--eval-interval", type=int,
                     help=f"steps between evals on the valid split ({preset_defaults('eval_interval')})")
    run.add_argument("--eval-batches", type=int, help="valid batches per eval (0 = the whole valid split)")
    run.add_argument("--checkpoint-interval", type=int,
                     help=f"steps between checkpoints ({preset_defaults('checkpoint_interval')})")
    run.add_argument("--log-interval", type=int,
                     help=f"steps between log lines and metrics.csv rows ({preset_defaults('log_interval')})")
    run.add_argument("--data-dir", help="folder with train/ and valid/ stories.jsonl (default data/stories)")
    run.add_argument("--work-dir", help="where tokenizers and token caches go (default data)")
    run.add_argument(
        "--compile-cache", metavar="DIR",
        help="where compiled XLA programs are kept so a second run skips compiling (default <work-dir>/jax_cache, "
        "or DSJAX_COMPILE_CACHE; 'off' turns it off; JAX_COMPILATION_CACHE_DIR, when set, wins)",
    )
    run.add_argument("--checkpoint-dir", help="default checkpoints")
    run.add_argument("--output-dir", help="default outputs")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this run")
    run.add_argument(
        "--overwrite", action="store_true",
        help="reuse a run name that holds a run: its folders are first moved aside to <run>.replaced-<UTC time>/",
    )
    run.add_argument(
        "--allow-data-change", action="store_true",
        help="with --resume: continue on a different data folder (tokenized with the checkpoint's tokenizer)",
    )
    run.add_argument("--seed", type=int, help="seed of the initial weights and the data order (default 0)")
    run.add_argument(
        "--moe", choices=config_choices("model.moe_impl"),
        help="routed-expert compute path (model.moe_impl; default auto = the measured fastest: pallas on GPU, blocked on CPU)",
    )
    run.add_argument(
        "--attention", choices=config_choices("model.attention_impl"),
        help="training attention path (model.attention_impl): xla = jnp reference, blocked = jnp in "
        "causal query blocks, cudnn = cuDNN flash attention (GPU, bf16), pallas = our flash kernel "
        "(Triton on GPU, interpreted on CPU); default auto = the measured fastest (blocked on CPU, cudnn on GPU)",
    )
    run.add_argument("--verbose", action="store_true", help="debug logging (or set LOG_LEVEL)")
    post = run.add_argument_group("post-training, distillation and export stages")
    post.add_argument("--start-from", metavar="FINAL",
                      help="final/ folder the first of sft/grpo starts from (default: the previous stage's, checkpoints/<run>[-sft]/final)")
    post.add_argument("--sft-data", metavar="FILE", help="TinyStoriesInstruct-format file for sft (default: instructions made from the stories)")
    post.add_argument("--sft-steps", type=int, help="sft optimizer steps (sft.max_steps)")
    post.add_argument("--grpo-steps", type=int, help="grpo steps, each on a fresh sampled batch (grpo.max_steps)")
    post.add_argument("--group-size", type=int, metavar="G", help="grpo samples per prompt (grpo.group_size)")
    post.add_argument("--teacher", metavar="FINAL", help="distill: the teacher's final/ folder (same tokenizer as the student)")
    post.add_argument("--distill-temperature", type=finite_float, metavar="T", help="distill: softmax temperature (default 2)")
    post.add_argument("--distill-alpha", type=finite_float, metavar="A",
                      help="distill: loss = A*T^2*KL(teacher||student) + (1-A)*CE (default 0.5)")
    post.add_argument("--export-format", help="export: gguf, hf or gguf,hf (default both)")
    post.add_argument("--export-dtype", choices=("f32", "f16", "bf16", "q8_0"), help="export: weight type (default f16 for GGUF, f32 for hf)")
    mesh = run.add_argument_group("device mesh (sizes multiply to the device count; one may be -1 = infer)")
    mesh.add_argument("--gpus", type=int, help="total devices to use (default: all)")
    for axis, what in (("pp", "pipeline"), ("dp", "data (default -1)"), ("tp", "tensor"), ("ep", "expert"), ("sp", "sequence")):
        mesh.add_argument(f"--{axis}-size", type=int, help=f"{what} parallel size")
    mesh.add_argument(
        "--microbatches", type=int, metavar="M",
        help="pipeline microbatches per step, >= pp size (default: the smallest count >= 2 x pp that divides the batch)",
    )
    mesh.add_argument(
        "--pipeline-repeats", type=int, metavar="R",
        help="layer groups per pipeline stage: 1 = GPipe (default), R > 1 = circular schedule, bubble / R",
    )
    mesh.add_argument(
        "--ep-dispatch", choices=("mask", "all_to_all"),
        help="how tokens reach experts under --ep-size > 1 (distributed.ep_dispatch): mask = replicate-and-mask "
        "(default), all_to_all = send each token copy to its expert's shard; same result, BUILD.md compares traffic",
    )
    hosts = run.add_argument_group("several hosts (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    hosts.add_argument("--coordinator", help="HOST:PORT of process 0")
    hosts.add_argument("--num-processes", type=int)
    hosts.add_argument("--process-id", type=int)
    cloud = run.add_argument_group("Modal (--backend modal, or python -m launch.modal_h100)")
    cloud.add_argument("--nodes", type=int, help="containers in a Modal cluster, whole hosts of 8 GPUs each (default 1)")
    cloud.add_argument("--gpu-type", help="Modal GPU: H100 (default), H100!, H200, B200, A100-80GB, L40S, ...")
    cloud.add_argument("--timeout", help="per attempt: seconds or 90m / 6h (default and Modal's limit: 24h)")
    cloud.add_argument("--detach", action="store_true", help="start the run and return; it keeps going on Modal")
    cloud.add_argument("--dry-run", action="store_true", help="print the launch plan (GPUs, volumes, mesh, command, cost) and exit")
    run.set_defaults(func=cmd_run)

    download = sub.add_parser("download", allow_abbrev=False, help="fetch TinyStories (or convert local files) into train/ + valid/ JSONL",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    download.add_argument("--out", default="data/stories", help="output folder (default data/stories)")
    download.add_argument("--from", dest="source", metavar="PATH", help="local .txt/.jsonl file or folder instead of the hub")
    download.add_argument("--max-stories", type=int, help="stop after N stories per split (from one file: N in all, "
                          "of which 5%% become the valid split)")
    download.add_argument("--version", choices=("v1", "v2"), help="v1 (default) or v2 (GPT-4 only); with --from a folder "
                          "holding the hub's official .txt files of both, which to read")
    download.set_defaults(func=cmd_download)

    gen = sub.add_parser("generate", allow_abbrev=False, help="continue a prompt with a trained checkpoint",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--checkpoint", required=True, help="a final/ folder, e.g. checkpoints/nano/final")
    gen.add_argument("--backend", choices=BACKENDS, default="jax")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="Once upon a time", help="the text to continue (default: %(default)s)")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="default %(default)s")
    gen.add_argument("--temperature", type=finite_float, default=0.8, help="0 = greedy (default %(default)s)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    gen.add_argument("--top-p", type=finite_float, default=1.0, help="1.0 = off (default)")
    gen.add_argument("--seed", type=int, default=0, help="sample i (of --num-samples) uses seed + i (default %(default)s)")
    gen.add_argument("--num-samples", type=int, default=1, metavar="N",
                     help="samples per prompt, decoded together on the device (default 1: streamed)")
    prompt.add_argument("--prompts-file", metavar="FILE",
                        help="one prompt per line instead of --prompt; every prompt x --num-samples in one batch")
    gen.add_argument("--chat", action="store_true",
                     help="ask a post-trained (sft/grpo) model: each prompt goes in the chat template it was trained "
                     "on (<s><|user|> prompt <|end|><|assistant|>), and the answer, up to <|end|>, is printed alone")
    gen.set_defaults(func=cmd_generate)

    ckpts = sub.add_parser("checkpoints", allow_abbrev=False, help="inspect a run's checkpoints")
    ckpts_sub = ckpts.add_subparsers(dest="checkpoints_command", metavar="ACTION", required=True)
    ls = ckpts_sub.add_parser("ls", allow_abbrev=False, help="list steps, sizes, val loss and completeness")
    ls.add_argument("run_dir", help="e.g. checkpoints/nano")
    ls.set_defaults(func=cmd_checkpoints_ls)

    bn = sub.add_parser("bench", allow_abbrev=False, help="time the train step on synthetic tokens: compile, ms/step, tokens/s, MFU, memory",
        description="Time the train step on synthetic tokens. Comma lists (e.g. --moe dense,pallas) run every "
        "combination as a case. FLOPs per token = 6 x matmul parameters touched (routed experts at top-k, MTP "
        "and its head included, embedding lookup excluded) + causal attention; see dsjax/bench.py. On CPU the "
        "step reuses the memory it frees, as `run` does (DSJAX_MALLOC=system turns that off; rows record "
        "host_memory).",
    )
    bn.add_argument("--model-size", default="nano", help="size preset(s), comma list (default nano)")
    bn.add_argument("--config", metavar="FILE", help="JSON config layered over the size preset")
    bn.add_argument("--backend", choices=BACKENDS, default="jax")
    bn.add_argument("--moe", help=f"MoE path(s): {','.join(config_choices('model.moe_impl'))} (comma list)")
    bn.add_argument("--attention", help=f"attention path(s): {','.join(config_choices('model.attention_impl'))} (comma list)")
    bn.add_argument("--remat", help=f"rematerialisation policy(ies): {','.join(config_choices('model.remat'))} (model.remat; comma list)")
    bn.add_argument("--batch-size", help="sequences per micro-batch (comma list)")
    bn.add_argument("--grad-accum", help="micro-batches per optimizer step (comma list)")
    bn.add_argument("--accumulation", help="how the micro-batches run: "
                    f"{','.join(config_choices('training.accumulation'))} (training.accumulation; comma list)")
    bn.add_argument("--seq-len", help="tokens per sequence (comma list)")
    bn.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    bn.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling (default 3)")
    bn.add_argument("--peak-tflops", type=float, help="device bf16 peak for MFU (default: a table of known devices)")
    bn.add_argument("--json", action="store_true", help="one JSON object per case on stdout, appended to --results")
    bn.add_argument("--results", metavar="FILE.jsonl", help="the file --json appends to (default benchmarks/results.jsonl)")
    bn.add_argument("--keep-going", action="store_true", help="record a failing case as an error row and go on")
    bn.add_argument("--profile", metavar="DIR", help="after timing, trace 3 more steps per case into DIR/<case>/ with "
                    "jax.profiler and print where the time went: events and busy ms per step on each device stream "
                    "or thread against the wall time; the top ops with the JAX operation and Python line that made "
                    "each; then the time per Python line, every kernel counted (on an H100/H200 beside each line's "
                    "floor: its bytes at full bandwidth or GEMM FLOPs at peak, and measured / floor). Kernels whose "
                    "line the program does not record (XLA's copies, loop plumbing) are summed under '?'")
    bmesh = bn.add_argument_group("device mesh")
    bmesh.add_argument("--gpus", type=int, help="total devices to use (default: all)")
    for axis in ("pp", "dp", "tp", "ep", "sp"):
        bmesh.add_argument(f"--{axis}-size", type=int)
    bn.set_defaults(func=cmd_bench)

    info = sub.add_parser("info", allow_abbrev=False, help="show the resolved config's parameter counts")
    _add_config_flags(info)
    info.add_argument("--json", action="store_true", help="print the resolved config and counts as JSON")
    info.set_defaults(func=cmd_info)

    ex = sub.add_parser("export", allow_abbrev=False, help="write a final/ checkpoint as GGUF (llama.cpp) or a Hugging Face folder",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("--checkpoint", required=True, help="a final/ folder, e.g. checkpoints/nano/final")
    ex.add_argument("--format", required=True, choices=("gguf", "hf"),
                    help="gguf: one llama.cpp file (arch deepseek2); hf: a DeepseekV3ForCausalLM folder for transformers")
    ex.add_argument("--out", required=True, help="the .gguf file or the HF folder to write (never overwritten)")
    ex.add_argument("--dtype", choices=("f32", "f16", "bf16", "q8_0"), default="f32",
                    help="weight type (default f32); q8_0 is GGUF only and needs rows divisible by 32")
    ex.set_defaults(func=cmd_export)

    im = sub.add_parser("import", allow_abbrev=False, help="make a final/ checkpoint from a Hugging Face DeepSeek-V3 folder or a GGUF",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = im.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="folder with config.json, model.safetensors and tokenizer.model")
    source.add_argument("--from-gguf", metavar="FILE", help="a llama.cpp deepseek2 GGUF with a SentencePiece (llama) vocabulary")
    im.add_argument("--out", required=True, help="the final/ folder to write, e.g. checkpoints/<run>/final (never overwritten)")
    im.set_defaults(func=cmd_import)

    ev = sub.add_parser("eval", allow_abbrev=False,
        help="score final/ checkpoints on held-out instruction prompts: word coverage, clean endings, reward, val bits/byte",
        description="Score final/ checkpoints on the same held-out prompts (the valid stories' instructions) with 95% "
        "bootstrap intervals; with several --checkpoint, each is compared with the one before (paired intervals). "
        "See dsjax/posttrain/evaluate.py.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("--checkpoint", action="append", required=True, metavar="DIR",
                    help="a final/ folder; repeat to compare (e.g. pretrain, then SFT, then GRPO)")
    ev.add_argument("--prompts", type=int, default=64, help="held-out prompts (default 64)")
    ev.add_argument("--samples", type=int, default=4, help="completions per prompt (default 4)")
    ev.add_argument("--seed", type=int,
                    help="picks the held-out prompts and the sampling seeds (default: the first checkpoint's training.seed, "
                    "so the prompts are GRPO's held-out eval prompts)")
    ev.add_argument("--temperature", type=finite_float, default=1.0, help="sampling temperature (default 1.0)")
    ev.add_argument("--max-new-tokens", type=int, help="default: the first checkpoint's grpo.max_new_tokens")
    ev.add_argument("--data-dir", help="data folder (train/ and valid/stories.jsonl; the valid split is read) "
                    "(default: the first checkpoint's training.data_dir)")
    ev.add_argument("--work-dir", help="where the valid split's token cache goes (default: the checkpoint's training.work_dir)")
    ev.add_argument("--json", action="store_true", help="print the table as JSON on stdout")
    ev.set_defaults(func=cmd_eval)
    return parser


# (module, exception class, exit code, prefix): looked up in sys.modules, so that classifying an
# error never imports JAX or Orbax (a refused run must answer in well under a second of imports)
ERROR_KINDS = (
    ("dsjax.config", "ConfigError", 2, "config error"),
    ("dsjax.train.runs", "RunError", 2, "error"),
    ("dsjax.stages", "StageError", 2, "error"),
    ("dsjax.distill", "DistillError", 2, "error"),
    ("dsjax.data.layout", "DataError", 2, "error"),
    ("dsjax.data.download", "DownloadError", 2, "error"),
    ("dsjax.data.tokenizer", "TokenizerError", 2, "error"),
    ("dsjax.infer.generate", "SamplingError", 2, "error"),
    ("meshes.mesh", "MeshError", 2, "error"),
    ("dsjax.mlx_backend", "MLXUnavailable", 2, "error"),
    ("dsjax.train.checkpoint", "CheckpointError", 4, "checkpoint error"),
    ("dsjax.export.errors", "ExportError", 2, "error"),
    ("dsjax.train.loop", "TrainingDiverged", 3, ""),
)


def classify(err: BaseException) -> tuple[int, str] | None:
    if isinstance(err, UsageError):
        return 2, "error"
    for module_name, class_name, code, prefix in ERROR_KINDS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(err, cls):
            return code, prefix
    return None


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError, OSError):  # stderr closed too: nothing left to tell
        pass


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # captured or replaced stdout (tests): nothing to redirect
        pass


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "verbose", False)) or os.environ.get("LOG_LEVEL", "").upper() == "DEBUG"


# commands whose CPU programs free large temporaries every call (train steps): they keep that memory
# for the next call (dsjax/train/host_memory.py). Sampling's small decode calls (`generate`, `eval`)
# ran 10-20% slower with the synchronous dispatch this needs (2-core CPU), so they keep JAX's default.
KEEP_HOST_MEMORY_COMMANDS = ("run", "bench")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad flag (2, one line already printed)
        return exit_.code if isinstance(exit_.code, int) else 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from dsjax.train import host_memory, signals
    from dsjax.train.signals import StopRequested

    previous_handler = signals.install_interrupt_handler()
    try:
        if args.command in KEEP_HOST_MEMORY_COMMANDS:
            bad_env = host_memory.env_error()
            if bad_env:
                _say(f"dsjax: error: {bad_env}")
                return 2
            with signals.deferred_interrupts():  # a Ctrl-C inside JAX's import can abort the process
                import jax  # noqa: F401

                host_memory.keep_freed_host_memory()  # before JAX starts its CPU backend
        return args.func(args)
    except BrokenPipeError:
        _quiet_stdout()
        _say("dsjax: output closed early (broken pipe); stopped")
        return 141
    except StopRequested as stop:
        _say(f"dsjax: {one_line(stop)}")
        return stop.exit_code
    except KeyboardInterrupt:
        _say("dsjax: interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends as one line and a documented exit code
        kind = classify(err)
        if kind is not None:
            code, prefix = kind
            _say(f"dsjax: {prefix + ': ' if prefix else ''}{one_line(err)}")
            return code
        if isinstance(err, OSError):
            _say(f"dsjax: error: {one_line(err)}")
            return 2
        if _debug(args):
            import traceback

            traceback.print_exc()
        _say(
            f"dsjax: internal error: {err.__class__.__name__}: {one_line(err)[:300]} "
            "(rerun with --verbose or LOG_LEVEL=DEBUG for the traceback)"
        )
        return 1
    finally:
        signals.restore_interrupt_handler(previous_handler)


if __name__ == "__main__":
    sys.exit(main())
