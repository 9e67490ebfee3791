"""The `dsjax` command line: what users type.

    dsjax download  [--out data/stories] [--from PATH] [--max-stories N] [--version v1|v2]
    dsjax run       [--model-size nano|tiny|small|medium] [--config FILE] [--stages data_prep,pretrain] ...
    dsjax generate  --checkpoint checkpoints/<run>/final --prompt "Once upon a time"
    dsjax info      [--model-size ...] [--config FILE]
    dsjax bench     [--model-size tiny,small] [--moe dense,pallas] [--attention xla,cudnn] [--json]

Flags override the config file, which overrides the size preset.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import sys
from pathlib import Path

from dsjax.config import MODEL_SIZES, ConfigError, load_config

log = logging.getLogger("dsjax")

STAGES = ("data_prep", "pretrain", "sft", "grpo", "export")
AVAILABLE_STAGES = ("data_prep", "pretrain")
BACKENDS = ("jax", "mlx")

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
    "moe": ("model", "moe_impl"),
    "attention": ("model", "attention_impl"),
}


class UsageError(ValueError):
    pass


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-size", choices=MODEL_SIZES, default="nano", help="size preset, configs/<size>.json (default nano)")
    parser.add_argument("--config", metavar="FILE", help="JSON config layered over the size preset")


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    if not stages:
        raise UsageError("--stages is empty; use e.g. data_prep,pretrain")
    for stage in stages:
        if stage not in STAGES:
            close = difflib.get_close_matches(stage, STAGES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"--stages: unknown stage '{stage}'{hint} (stages: {', '.join(STAGES)})")
        if stage not in AVAILABLE_STAGES:
            raise UsageError(
                f"--stages: stage '{stage}' is not implemented yet (available: {', '.join(AVAILABLE_STAGES)})"
            )
    return stages


def resolve_run_config(args: argparse.Namespace):
    overrides: dict[str, dict] = {"training": {}}
    for dest, (block, key) in RUN_OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.setdefault(block, {})[key] = value
    return load_config(args.model_size, args.config, overrides)


def requested_devices(config, gpus: int | None) -> int | None:
    """Total devices the mesh flags ask for (None when a size is inferred and --gpus is absent)."""
    if gpus is not None:
        return gpus
    sizes = [getattr(config.distributed, f"{a}_size") for a in ("pp", "dp", "ep", "sp", "tp")]
    return None if -1 in sizes else math.prod(sizes)


def ensure_host_devices(per_host: int) -> None:
    """On a CPU host, split the CPU into `per_host` devices so the same mesh flags work on a laptop.

    Must run before JAX creates its backends; XLA reads this flag only for the CPU platform.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if per_host > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={per_host}".strip()


def cmd_run(args: argparse.Namespace) -> int:
    from dsjax.progress import console, setup_logging

    setup_logging(args.verbose)
    if args.backend == "mlx":
        from dsjax.mlx_backend import require_mlx

        require_mlx()
    stages = parse_stages(args.stages)
    config = resolve_run_config(args)
    if args.gpus is not None and args.gpus <= 0:
        raise UsageError(f"--gpus must be > 0, got {args.gpus}")
    total = requested_devices(config, args.gpus)
    if args.backend == "mlx" and total and total > 1:
        raise UsageError(f"--backend mlx runs on one device, but the mesh flags ask for {total}; drop them")
    if total:
        ensure_host_devices(total // max(args.num_processes or 1, 1))
    run_name = config.training.run_name or args.model_size
    console.print_json(json.dumps({"run_name": run_name, "stages": stages, **config.to_dict()}))

    data_dir = Path(config.training.data_dir)
    if "data_prep" in stages:
        from dsjax.data.download import dataset_ready, download_from_hub

        if dataset_ready(data_dir):
            log.info("data_prep: %s already holds train/ and valid/; not downloading", data_dir)
        else:
            log.info("data_prep: downloading TinyStories into %s", data_dir)
            download_from_hub(data_dir)
    if "pretrain" in stages:
        from dsjax.data.download import dataset_ready
        from dsjax.train.loop import pretrain

        if not dataset_ready(data_dir):
            raise UsageError(
                f"no data at {data_dir} (needs train/stories.jsonl and valid/stories.jsonl); "
                "add the data_prep stage, run `dsjax download`, or pass --data-dir"
            )
        if args.backend == "mlx":
            from dsjax.mlx_backend.loop import pretrain_mlx

            pretrain_mlx(config, run_name, resume=args.resume)
            return 0
        from dsjax.train.distributed import initialize_multihost

        initialize_multihost(args.coordinator, args.num_processes, args.process_id)
        pretrain(config, run_name, resume=args.resume, device_count=args.gpus)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from dsjax.data.download import download_from_hub, prepare_from_local
    from dsjax.progress import setup_logging

    setup_logging(False)
    out = Path(args.out)
    if args.source:
        stats = prepare_from_local(Path(args.source), out, args.max_stories)
    else:
        stats = download_from_hub(out, args.version, args.max_stories)
    for split, s in stats.items():
        print(
            f"{split}: {s.stories} stories -> {out / split / 'stories.jsonl'} "
            f"(dropped {s.dropped_empty} empty, skipped {s.malformed} malformed, repaired {s.repaired} mojibake)"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dsjax.data.tokenizer import Tokenizer
    from dsjax.infer.generate import SamplingConfig, generate_tokens, stream_text
    from dsjax.train.checkpoint import load_final

    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    sampling.validate()
    params, config, tokenizer_path = load_final(Path(args.checkpoint))
    tokenizer = Tokenizer(tokenizer_path)
    if args.backend == "mlx":
        from dsjax.mlx_backend import require_mlx

        require_mlx()
        import jax

        from dsjax.mlx_backend.generate import generate_tokens_mlx
        from dsjax.mlx_backend.model import to_mlx

        params = to_mlx(jax.device_get(params))
        generate = generate_tokens_mlx
    else:
        generate = generate_tokens
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(args.prompt)
    prompt_text = tokenizer.decode(prompt_ids)
    sys.stdout.write(prompt_text)
    sys.stdout.flush()

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stats = stream_text(
        generate(params, config.model, prompt_ids, sampling, eos_id=tokenizer.eos_id),
        lambda ids: tokenizer.decode(prompt_ids + ids)[len(prompt_text):],
        write,
    )
    sys.stdout.write("\n")
    print(
        f"[{stats['tokens']} tokens in {stats['seconds']:.2f}s, {stats['tokens_per_sec']:.1f} tokens/s after compile]",
        file=sys.stderr,
    )
    return 0


def cmd_checkpoints_ls(args: argparse.Namespace) -> int:
    from dsjax.train.checkpoint import describe_run

    infos = describe_run(Path(args.run_dir))
    if not infos:
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
    moes, attns = _csv(args.moe), _csv(args.attention)
    for value in moes:
        if value not in ("auto", "dense", "ragged", "pallas"):
            raise UsageError(f"--moe: unknown path '{value}' (auto, dense, ragged, pallas)")
    for value in attns:
        if value not in ("auto", "xla", "cudnn", "pallas"):
            raise UsageError(f"--attention: unknown path '{value}' (auto, xla, cudnn, pallas)")
    if args.steps <= 0 or args.warmup < 0:
        raise UsageError(f"--steps must be > 0 and --warmup >= 0, got {args.steps} and {args.warmup}")
    cases = []
    for size, moe, attn, b, a, t in itertools.product(
        sizes, moes or [None], attns or [None], batches or [None], accums or [None], seqs or [None]
    ):
        overrides = {
            "model": {k: v for k, v in (("moe_impl", moe), ("attention_impl", attn)) if v is not None},
            "training": {
                k: v for k, v in (("batch_size", b), ("gradient_accumulation_steps", a), ("seq_len", t)) if v is not None
            },
            "distributed": {
                a_: getattr(args, a_) for a_ in ("pp_size", "dp_size", "tp_size", "ep_size", "sp_size") if getattr(args, a_) is not None
            },
        }
        if args.remat is not None:
            overrides["model"]["remat"] = args.remat == "on"
        cases.append(bench.Case(size, load_config(size, args.config, overrides)))  # every case validated up front
    if args.backend == "mlx":
        raise UsageError("dsjax bench --backend mlx: not supported yet; tests/bench_backends.py times MLX against JAX on CPU")
    total = args.gpus
    if total is None:
        d = cases[0].config.distributed
        sizes_ = [d.pp_size, d.dp_size, d.tp_size, d.ep_size, d.sp_size]
        total = None if -1 in sizes_ else math.prod(sizes_)
    if total and total > 1:
        ensure_host_devices(total)
    env = bench.environment()
    rows = []
    for case in cases:
        try:
            row = bench.run_case(case, args.steps, args.warmup, args.gpus, args.peak_tflops)
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
        where = bench.append_results(rows, Path(args.results))
        print(f"appended {len(rows)} row(s) to {where}", file=sys.stderr)
    else:
        print(f"{env['device']} x{env['device_count']}, jax {env['jax']}, commit {env['git_commit']}")
        print(bench.format_table(rows))
    return 1 if any("error" in r for r in rows) else 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsjax",
        description="Train small DeepSeek-V3-style models (MLA, DeepSeekMoE, MTP) on TinyStories with JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run pipeline stages (data_prep, pretrain)", description="Run pipeline stages.")
    run.add_argument("--backend", choices=BACKENDS, default="jax")
    _add_config_flags(run)
    run.add_argument("--stages", default="data_prep,pretrain", help="comma-separated stages (default data_prep,pretrain)")
    run.add_argument("--max-steps", type=int)
    run.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    run.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    run.add_argument("--seq-len", type=int)
    run.add_argument("--learning-rate", type=float)
    run.add_argument("--warmup-steps", type=int)
    run.add_argument("--run-name", help="name under checkpoints/ and outputs/ (default: the model size)")
    run.add_argument("--eval-interval", type=int)
    run.add_argument("--eval-batches", type=int, help="valid batches per eval (0 = the whole valid split)")
    run.add_argument("--checkpoint-interval", type=int)
    run.add_argument("--log-interval", type=int)
    run.add_argument("--data-dir", help="folder with train/ and valid/ stories.jsonl (default data/stories)")
    run.add_argument("--work-dir", help="where tokenizers and token caches go (default data)")
    run.add_argument("--checkpoint-dir", help="default checkpoints")
    run.add_argument("--output-dir", help="default outputs")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this run")
    run.add_argument("--seed", type=int)
    run.add_argument(
        "--moe", choices=("auto", "dense", "ragged", "pallas"),
        help="routed-expert compute path (model.moe_impl; default auto = the measured fastest: dense)",
    )
    run.add_argument(
        "--attention", choices=("auto", "xla", "cudnn", "pallas"),
        help="training attention path (model.attention_impl; default auto = the measured fastest)",
    )
    run.add_argument("--verbose", action="store_true", help="debug logging (or set LOG_LEVEL)")
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
    hosts = run.add_argument_group("several hosts (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    hosts.add_argument("--coordinator", help="HOST:PORT of process 0")
    hosts.add_argument("--num-processes", type=int)
    hosts.add_argument("--process-id", type=int)
    run.set_defaults(func=cmd_run)

    download = sub.add_parser("download", help="fetch TinyStories (or convert local files) into train/ + valid/ JSONL")
    download.add_argument("--out", default="data/stories", help="output folder (default data/stories)")
    download.add_argument("--from", dest="source", metavar="PATH", help="local .txt/.jsonl file or folder instead of the hub")
    download.add_argument("--max-stories", type=int, help="stop after N stories per split")
    download.add_argument("--version", choices=("v1", "v2"), default="v1", help="v1 (default) or v2 (GPT-4 only)")
    download.set_defaults(func=cmd_download)

    gen = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    gen.add_argument("--checkpoint", required=True, help="a final/ folder, e.g. checkpoints/nano/final")
    gen.add_argument("--backend", choices=BACKENDS, default="jax")
    gen.add_argument("--prompt", default="Once upon a time")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    ckpts = sub.add_parser("checkpoints", help="inspect a run's checkpoints")
    ckpts_sub = ckpts.add_subparsers(dest="checkpoints_command", metavar="ACTION", required=True)
    ls = ckpts_sub.add_parser("ls", help="list steps, sizes, val loss and completeness")
    ls.add_argument("run_dir", help="e.g. checkpoints/nano")
    ls.set_defaults(func=cmd_checkpoints_ls)

    bn = sub.add_parser(
        "bench", help="time the train step on synthetic tokens: compile, ms/step, tokens/s, MFU, memory",
        description="Time the train step on synthetic tokens. Comma lists (e.g. --moe dense,pallas) run every "
        "combination as a case. FLOPs per token = 6 x matmul parameters touched (routed experts at top-k, MTP "
        "and its head included, embedding lookup excluded) + causal attention; see dsjax/bench.py.",
    )
    bn.add_argument("--model-size", default="nano", help="size preset(s), comma list (default nano)")
    bn.add_argument("--config", metavar="FILE", help="JSON config layered over the size preset")
    bn.add_argument("--backend", choices=BACKENDS, default="jax")
    bn.add_argument("--moe", help="MoE path(s): auto,dense,ragged,pallas (comma list)")
    bn.add_argument("--attention", help="attention path(s): auto,xla,cudnn,pallas (comma list)")
    bn.add_argument("--remat", choices=("on", "off"), help="rematerialise decoder blocks (model.remat)")
    bn.add_argument("--batch-size", help="sequences per micro-batch (comma list)")
    bn.add_argument("--grad-accum", help="micro-batches per optimizer step (comma list)")
    bn.add_argument("--seq-len", help="tokens per sequence (comma list)")
    bn.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    bn.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling (default 3)")
    bn.add_argument("--peak-tflops", type=float, help="device bf16 peak for MFU (default: a table of known devices)")
    bn.add_argument("--json", action="store_true", help="one JSON object per case on stdout, appended to --results")
    bn.add_argument("--results", default=str(Path("benchmarks") / "results.jsonl"), help="JSONL file --json appends to")
    bn.add_argument("--keep-going", action="store_true", help="record a failing case as an error row and go on")
    bmesh = bn.add_argument_group("device mesh")
    bmesh.add_argument("--gpus", type=int, help="total devices to use (default: all)")
    for axis in ("pp", "dp", "tp", "ep", "sp"):
        bmesh.add_argument(f"--{axis}-size", type=int)
    bn.set_defaults(func=cmd_bench)

    info = sub.add_parser("info", help="show the resolved config's parameter counts")
    _add_config_flags(info)
    info.add_argument("--json", action="store_true", help="print the resolved config and counts as JSON")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from dsjax.data.download import DownloadError
    from dsjax.data.pipeline import DataError
    from dsjax.data.tokenizer import TokenizerError
    from dsjax.infer.generate import SamplingError
    from dsjax.train.checkpoint import CheckpointError
    from dsjax.train.signals import StopRequested
    from dsjax.mlx_backend import MLXUnavailable
    from meshes.mesh import MeshError

    try:
        return args.func(args)
    except ConfigError as err:
        print(f"dsjax: config error: {err}", file=sys.stderr)
        return 2
    except (UsageError, DownloadError, TokenizerError, DataError, SamplingError, FileNotFoundError, MeshError) as err:
        print(f"dsjax: error: {err}", file=sys.stderr)
        return 2
    except MLXUnavailable as err:
        print(f"dsjax: error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"dsjax: checkpoint error: {err}", file=sys.stderr)
        return 4
    except StopRequested as stop:
        print(f"dsjax: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("dsjax: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        if err.__class__.__name__ == "TrainingDiverged":
            print(f"dsjax: {err}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
