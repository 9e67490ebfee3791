"""`python -m launch.modal_h100`: train on Modal GPUs from a laptop.

    python -m launch.modal_h100 --gpus 3 --pp-size 3 --max-steps 3000
    python -m launch.modal_h100 --gpus 3 --pp-size 3 --max-steps 3000 --dry-run   # the plan, no network

The flags are those of `dsjax run` (every one passes through to the container), plus
--nodes, --gpu-type, --timeout, --detach and --dry-run; `dsjax run --backend modal ...`
is the same command. The launch: check everything offline (`launch.plan`), upload the
data folder and its tokenizer where they changed (`launch.sync`), run `dsjax run` in the
container on the three volumes (`launch.remote`, resuming after preemption), stream its
logs, then download `final/` and `outputs/<run>/` into the local checkpoints/ and outputs/.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from launch import plan as plans
from launch.plan import LaunchError

SETUP_HINT = "run `modal setup` (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET)"


def main(argv: list[str] | None = None) -> int:
    from dsjax.cli import main as dsjax_main

    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print("python -m launch.modal_h100 [FLAGS] runs `dsjax run --backend modal [FLAGS]`:\n")
    return dsjax_main(["run", *argv, "--backend", "modal"])


def has_credentials() -> bool:
    from modal.config import config

    return bool(config.get("token_id") and config.get("token_secret"))


def require_modal():
    """The `modal` module, or LaunchError (exit 2, one line) saying how to install it or log in."""
    try:
        import modal
    except ImportError:
        raise LaunchError(f"the modal package is not installed: `uv sync --extra modal`, then {SETUP_HINT}") from None
    if not has_credentials():
        raise LaunchError(f"no Modal credentials found; {SETUP_HINT}")
    return modal


def launch(args: argparse.Namespace) -> int:
    """`dsjax run --backend modal`: plan, then (unless --dry-run) sync, run remotely, download."""
    plan = plans.make_plan(args)
    if args.dry_run:
        print(plans.format_plan(plan))
        return 0
    modal = require_modal()
    try:
        return _run(plan, modal)
    except modal.exception.AuthError as err:
        raise LaunchError(f"Modal refused the credentials ({err}); {SETUP_HINT}") from None
    except modal.exception.ConnectionError as err:
        raise LaunchError(f"cannot reach Modal ({err}); check the network and rerun (--resume if the run had started)") from None


def _say(message: str) -> None:
    print(f"launch: {message}", flush=True)


def _run(plan: plans.Plan, modal) -> int:
    from launch import sync
    from launch.remote import RemoteRunFailed

    if plan.download_data_first:
        from dsjax.data.download import download_from_hub

        _say(f"data_prep: downloading TinyStories into {plan.data_dir}")
        download_from_hub(plan.data_dir)
    # the app's definitions read these when launch.modal_app is imported (here and in the container)
    settings = {"DSJAX_MODAL_GPU": plan.gpu_spec, "DSJAX_MODAL_NODES": str(plan.nodes),
                "DSJAX_MODAL_TIMEOUT": str(plan.timeout_s)}
    os.environ.update(settings)
    from launch import modal_app

    if getattr(modal_app, "SETTINGS", settings) != settings:  # imported before with other settings
        modal_app = importlib.reload(modal_app)

    data_volume = sync.ModalVolume(modal_app.volumes[str(plans.MODAL_MOUNTS.data)])
    for local, prefix in plan.uploads():
        report = sync.sync_tree(local, prefix, data_volume)
        _say(report.summary(f"{local}/ -> {plans.DATA_VOLUME}:{prefix}/"))

    with modal.enable_output(), modal_app.app.run(detach=plan.detach):
        args = (plan.flags, plan.run_names, plan.launch_id, plan.config_json)
        if plan.detach:
            call = modal_app.train.spawn(*args)
            _say(f"started {plan.gpu_spec} x {plan.nodes} (call {call.object_id}); it keeps running after this exits")
            _say(f"logs: `modal app logs {plans.APP_NAME}`; results: " + "; ".join(
                f"`modal volume get {vol} {prefix} {local}`" for vol, prefix, local in plan.downloads()))
            return 0
        try:
            result = modal_app.train.remote(*args)
        except RemoteRunFailed as err:
            _say(f"every attempt failed (last exit code {err.exit_code}); the volumes keep the newest checkpoint: "
                 "rerun with --resume to continue")
            return err.exit_code
    code = result["exit_code"]
    if code == 0:
        _fetch(plan, modal_app, sync)
    return code


def _fetch(plan: plans.Plan, modal_app, sync) -> None:
    """Download each trained stage's final/ and outputs; local folders of another run are moved aside first."""
    from dsjax.train import runs

    by_name = {name: modal_app.volumes[mount] for name, mount, _ in plans.VOLUMES}
    # this launch started the run afresh: a local copy of an older one is kept aside (the dry run lists them)
    for old, new in runs.move_aside(plan.local_to_move()):
        _say(f"moved the local {old} aside to {new}")
    for volume, prefix, local in plan.downloads():
        local.parent.mkdir(parents=True, exist_ok=True)
        got = sync.download_folder(sync.ModalVolume(by_name[volume]), prefix, local)
        if got:
            _say(f"{volume}:{prefix}/ -> {got}/")


if __name__ == "__main__":
    sys.exit(main())
