"""The `dsjax` command line: what users type."""

from __future__ import annotations

import argparse
import json
import sys

from dsjax.config import MODEL_SIZES, ConfigError, load_config


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-size", choices=MODEL_SIZES, default="nano", help="size preset (configs/<size>.json)")
    parser.add_argument("--config", metavar="FILE", help="JSON config layered over the size preset")


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
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"dsjax: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
