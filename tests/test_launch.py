"""The Modal launcher, offline: plan and validation, sync, and the container's body on temp-dir "volumes".

No test imports `modal` or touches the network: the remote body runs in-process on CPU with
temporary folders standing in for /data, /checkpoints and /outputs, and syncing runs against
`LocalDirVolume`, which implements the same small interface as the Modal volume adapter.
"""

import csv
import json
import signal
import time
from pathlib import Path

import pytest

import launch.modal_h100 as modal_h100
from dsjax.cli import main
from dsjax.train import checkpoint, signals
from launch import plan as plans
from launch import remote, sync
from launch.remote import Cluster, CommitWatcher, Mounts, RemoteRunFailed

LOSS_COLUMNS = ["step", "loss", "ce_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "expert_imbalance"]


def modal_run(*flags):
    return main(["run", "--backend", "modal", *map(str, flags)])


@pytest.fixture
def local_dirs(tmp_path, tinystories_dir):
    return ["--data-dir", tinystories_dir, "--checkpoint-dir", tmp_path / "ck", "--output-dir", tmp_path / "out"]


@pytest.fixture
def no_cloud(monkeypatch):
    """Any attempt to reach Modal fails the test."""

    def refuse():
        raise AssertionError("the launcher tried to reach Modal")

    monkeypatch.setattr(modal_h100, "require_modal", refuse)


# --- plan, validation, dry run -----------------------------------------------------------------


def test_dry_run_names_gpu_volumes_mesh_and_command(local_dirs, no_cloud, capsys):
    assert modal_h100.main(["--gpus", "3", "--pp-size", "3", "--max-steps", "3000", *map(str, local_dirs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "H100:3" in out and "pp=3 x dp=1" in out
    for name, mount, _ in plans.VOLUMES:
        assert f"{name} at {mount}" in out
    command = next(line for line in out.splitlines() if line.strip().startswith("command")).split("command", 1)[1].split()
    assert command[:4] == ["dsjax", "run", "--backend", "jax"]
    for flag, value in [("--max-steps", "3000"), ("--pp-size", "3"), ("--gpus", "3"), ("--data-dir", "/data/stories"),
                        ("--checkpoint-dir", "/checkpoints"), ("--output-dir", "/outputs"), ("--run-name", "nano")]:
        assert command[command.index(flag) + 1] == value, flag
    assert "$11.85/hour" in out  # 3 x the H100 list price in the documented table
    assert "keep " not in out  # nothing local of this run yet
    checkpoints = local_dirs[local_dirs.index("--checkpoint-dir") + 1]
    (Path(checkpoints) / "nano").mkdir(parents=True)  # an older local run of this name: the download keeps it aside
    assert modal_h100.main(["--gpus", "1", *map(str, local_dirs), "--dry-run"]) == 0
    assert f"keep      {Path(checkpoints) / 'nano'}/ is from an earlier run: renamed to nano.replaced-" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gpus", "3", "--pp-size", "2"], "which does not divide 3 devices"),
        (["--gpus", "12"], "holds at most 8 GPUs; use --nodes 2"),
        (["--gpu-type", "A10", "--gpus", "6"], "A10 container holds at most 4"),
        (["--nodes", "2", "--gpus", "12"], "pass --gpus 16"),
        (["--gpu-type", "H10"], "did you mean 'H100'"),
        (["--timeout", "2d"], "--timeout: expected seconds"),
        (["--coordinator", "h:1"], "set by the launcher from --nodes"),
        (["--stages", "sft", "--start-from", "checkpoints/x/final"], "the Modal container cannot see"),
        (["--compile-cache", "/tmp/mine"], "--compile-cache off is the only other choice"),
        (["--gpus", "8", "--tp-size", "8", "--dp-size", "1"], "num_attention_heads=4 is not divisible by tp_size=8"),
    ],
)
def test_bad_flags_fail_before_any_cloud_call(flags, message, local_dirs, no_cloud, capsys):
    assert modal_run(*flags, *local_dirs) == 2  # no --dry-run: only validation stands before Modal
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_modal_flags_need_the_modal_backend(capsys):
    assert main(["run", "--nodes", "2", "--max-steps", "1"]) == 2
    assert "only with --backend modal" in capsys.readouterr().err


def test_missing_credentials_is_one_line_hint(local_dirs, monkeypatch, capsys):
    monkeypatch.setattr(modal_h100, "has_credentials", lambda: False)
    assert modal_run("--gpus", "1", *local_dirs) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "modal setup" in err, err


def test_every_run_flag_passes_through():
    """Each `dsjax run` flag set on the laptop reaches the container's argv (new flags are covered automatically)."""
    parser = plans.run_parser()
    skipped = plans.LAUNCH_ONLY | plans.LOCAL_PATHS | set(plans.LOCAL_FILES) | {"help", "gpus", "model_size", "run_name"}
    actions = [a for a in parser._actions if a.option_strings and a.dest not in skipped]
    argv = []
    for action in actions:
        argv.append(action.option_strings[-1])
        if action.nargs != 0:
            argv.append(str(next(c for c in action.choices if c != action.default) if action.choices else 7))
    args = parser.parse_args(argv)
    flags = plans.pass_through_flags(args)
    for action in actions:
        option = next(o for o in action.option_strings if o.startswith("--"))
        assert option in flags, option
        if action.nargs != 0:
            assert flags[flags.index(option) + 1] == str(getattr(args, action.dest)), option


# --- sync ------------------------------------------------------------------------------------


def test_sync_uploads_only_what_changed(tmp_path):
    local = tmp_path / "stories"
    for split in ("train", "valid"):
        (local / split).mkdir(parents=True)
        (local / split / "stories.jsonl").write_text(f'{{"text": "{split} one"}}\n')
    volume = sync.LocalDirVolume(tmp_path / "volume")

    first = sync.sync_tree(local, "stories", volume)
    assert first.uploaded == ["stories/train/stories.jsonl", "stories/valid/stories.jsonl"] and volume.uploads == 3
    second = sync.sync_tree(local, "stories", volume)
    assert second.uploaded == [] and len(second.unchanged) == 2 and volume.uploads == 3

    (local / "train" / "stories.jsonl").write_text('{"text": "train two"}\n')  # same size: only the hash differs
    third = sync.sync_tree(local, "stories", volume)
    assert third.uploaded == ["stories/train/stories.jsonl"]
    assert (tmp_path / "volume/stories/train/stories.jsonl").read_text() == '{"text": "train two"}\n'

    (local / "valid" / "stories.jsonl").unlink()
    fourth = sync.sync_tree(local, "stories", volume)
    assert fourth.uploaded == [] and fourth.missing_locally == ["stories/valid/stories.jsonl"]
    assert (tmp_path / "volume/stories/valid/stories.jsonl").is_file()  # reported, never deleted
    assert "no longer here but kept on the volume" in fourth.summary("stories")

    (tmp_path / "volume/stories/train/stories.jsonl").unlink()  # lost on the volume: uploaded again
    assert sync.sync_tree(local, "stories", volume).uploaded == ["stories/train/stories.jsonl"]


def test_download_folder_swaps_in_whole(tmp_path):
    volume = sync.LocalDirVolume(tmp_path / "volume")
    volume.upload({"run/final/a.json": b"new", "run/final/sub/b.bin": b"\x00" * 10})
    dest = tmp_path / "laptop/run/final"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("old")
    assert sync.download_folder(volume, "run/final", dest) == dest
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == ["a.json", "sub/b.bin"]
    assert sync.download_folder(volume, "run/missing", tmp_path / "x") is None


# --- pieces of the container's body ----------------------------------------------------------


def test_cluster_coordinator_brackets_ipv6():
    cluster = Cluster(rank=1, addresses=("fdaa:0:1::2", "fdaa:0:1::3"))
    assert cluster.flags() == ["--coordinator", "[fdaa:0:1::2]:8476", "--num-processes", "2", "--process-id", "1"]
    assert Cluster(0, ("10.0.0.1",)).coordinator == "10.0.0.1:8476"


def make_step(run_dir, step, extras=False):
    folder = checkpoint.step_dir(run_dir, step)
    folder.mkdir(parents=True)
    (folder / "_CHECKPOINT_METADATA").write_text("{}")
    if extras:
        (folder / "training_state.json").write_text("{}")


def test_commit_watcher_commits_after_each_complete_step(tmp_path):
    commits = []
    watcher = CommitWatcher([tmp_path / "other", tmp_path / "run"], lambda: commits.append(1))
    assert not watcher.poll()
    (tmp_path / "run/step_2.orbax-checkpoint-tmp-1").mkdir(parents=True)  # an unfinished write: not yet
    assert not watcher.poll()
    make_step(tmp_path / "run", 2)
    assert watcher.poll() and not watcher.poll()
    (checkpoint.step_dir(tmp_path / "run", 2) / "training_state.json").write_text("{}")  # its JSON copies land
    assert watcher.poll()
    (tmp_path / "run/final").mkdir()
    (tmp_path / "run/final/config.json").write_text("{}")
    assert watcher.poll() and len(commits) == 3


def test_restart_resumes_when_a_step_is_complete_else_starts_over(tmp_path):
    flags = ["--max-steps", "9", "--overwrite"]
    assert remote.restart_flags(flags, [tmp_path / "run"]) == (["--max-steps", "9", "--overwrite"], False)
    make_step(tmp_path / "run", 4)
    assert remote.restart_flags([*flags, "--resume"], [tmp_path / "run"]) == (["--max-steps", "9", "--resume"], True)


def test_a_restart_after_the_last_final_has_nothing_left_to_do(tmp_path, monkeypatch):
    mounts = Mounts(tmp_path / "data", tmp_path / "ck", tmp_path / "out")
    (mounts.checkpoints / "run/final").mkdir(parents=True)
    (mounts.checkpoints / "run/final/config.json").write_text("{}")
    (mounts.checkpoints / ".launches").mkdir(parents=True)
    (mounts.checkpoints / ".launches/l.json").write_text('{"started": 0}')  # final/ written after the launch began
    monkeypatch.setattr("dsjax.cli.main", lambda argv: pytest.fail("must not train again"))
    assert remote.train(["--max-steps", "9"], ["run"], "l", mounts)["exit_code"] == 0

    (mounts.checkpoints / ".launches/l.json").write_text(json.dumps({"started": time.time() + 60}))  # an older final/
    monkeypatch.setattr("dsjax.cli.main", lambda argv: 0 if "--resume" in argv else pytest.fail(argv))
    assert remote.train(["--max-steps", "9"], ["run"], "l", mounts)["resumed"]


def test_matmul_tflops_reports_devices():
    report = remote.matmul_tflops(n=64, iters=2)
    assert report["devices"] and report["bf16_matmul_tflops"] > 0


# --- the container's body, in-process, on temp-dir volumes ---------------------------------------

# the smallest model that trains (one dense layer, no MTP): this file tests the launcher, not the model,
# and three runs compile three times
SMALL = {"model": {"num_hidden_layers": 1, "num_nextn_predict_layers": 0}}


def flags_for(name, max_steps=6):
    return [
        "--model-size", "nano", "--run-name", name, "--batch-size", "8", "--seq-len", "32", "--max-steps", str(max_steps),
        "--log-interval", "1", "--checkpoint-interval", "2", "--eval-interval", "1000", "--eval-batches", "1",
        "--warmup-steps", "2", "--gpus", "1",
    ]


def loss_rows(mounts, name):
    with open(mounts.outputs / name / "metrics.csv") as f:
        return [tuple(row[c] for c in LOSS_COLUMNS) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory, tinystories_dir):
    """Three temp dirs as the mounts, the small test sample synced in, and an uninterrupted 6-step run."""
    root = tmp_path_factory.mktemp("modal")
    mounts = Mounts(root / "data", root / "checkpoints", root / "outputs")
    report = sync.sync_tree(tinystories_dir, "stories", sync.LocalDirVolume(mounts.data))
    assert "stories/train/stories.jsonl" in report.uploaded
    commits = []
    result = remote.train(flags_for("straight"), ["straight"], "launch-a", mounts, config_json=json.dumps(SMALL),
                          commit=lambda: commits.append(1), poll_seconds=0.05)
    assert result["exit_code"] == 0 and result["final"] and not result["resumed"]
    return mounts, len(commits)


def test_body_writes_where_the_volumes_hold_it(volumes):
    mounts, commits = volumes
    assert (mounts.checkpoints / "straight/final/config.json").is_file()
    assert checkpoint.committed_steps(mounts.checkpoints / "straight")[-1] == 6
    for name in ("metrics.csv", "training_log.json", "training_config.json"):
        assert (mounts.outputs / "straight" / name).is_file(), name
    assert (mounts.data / "tokenizers").is_dir()  # tokenizer and token caches stay on the data volume
    assert json.loads((mounts.checkpoints / ".launches/launch-a.json").read_text())["run_names"] == ["straight"]
    assert json.loads((mounts.outputs / "straight/training_config.json").read_text())["model"]["num_hidden_layers"] == 1
    assert commits >= 2  # the marker, then at least the end of the run


def test_preempted_attempt_resumes_with_the_same_losses(volumes, monkeypatch, tmp_path):
    """SIGTERM (a preemption) at step 3: the attempt saves and raises; the retry resumes and matches the straight run."""
    mounts, _ = volumes
    import dsjax.train.loop as loop

    steps_run = [0]
    real = loop.make_train_step

    def counting(*args, **kwargs):
        step = real(*args, **kwargs)

        def run(state, batch):
            steps_run[0] += 1
            return step(state, batch)

        return run

    class PreemptAtStep3(signals.GracefulStop):
        @property
        def requested(self):
            if steps_run[0] >= 3 and self.signal_number is None:
                self.signal_number = signal.SIGTERM
            return self.signal_number is not None

    args = (flags_for("cut"), ["cut"], "launch-b", mounts)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "make_train_step", counting)
        patch.setattr(loop, "GracefulStop", PreemptAtStep3)
        with pytest.raises(RemoteRunFailed) as stopped:
            remote.train(*args, config_json=json.dumps(SMALL), poll_seconds=0.05)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert checkpoint.committed_steps(mounts.checkpoints / "cut")[-1] == 3

    result = remote.train(*args, config_json=json.dumps(SMALL), poll_seconds=0.05)  # Modal's restart: same arguments
    assert result["exit_code"] == 0 and result["resumed"]
    assert loss_rows(mounts, "cut") == loss_rows(mounts, "straight")

    # what the laptop does afterwards: final/ comes back whole and loads
    laptop = tmp_path / "checkpoints/cut/final"
    laptop.parent.mkdir(parents=True)
    sync.download_folder(sync.LocalDirVolume(mounts.checkpoints), "cut/final", laptop)
    assert checkpoint.read_final_config(laptop).model.num_hidden_layers == 1


def test_a_taken_run_name_is_refused_not_retried(volumes, capsys):
    mounts, _ = volumes
    result = remote.train(flags_for("straight"), ["straight"], "launch-c", mounts, config_json=json.dumps(SMALL))
    assert result["exit_code"] == 2 and "already exists" in capsys.readouterr().err


# --- the laptop's side of a launch, against a stand-in for the `modal` package ----------------------


class FakeModalVolume:
    """The part of `modal.Volume` the launcher uses (listdir, read_file, batch_upload), on a local folder."""

    def __init__(self, root):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def listdir(self, path, recursive=False):
        import types

        base = self.root / path.strip("/")
        if not base.exists():
            raise FileNotFoundError(path)
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        kind = types.SimpleNamespace(name="FILE")
        return [types.SimpleNamespace(path=p.relative_to(self.root).as_posix(), type=kind, size=p.stat().st_size) for p in files]

    def read_file(self, path):
        data = (self.root / path.strip("/")).read_bytes()  # FileNotFoundError when missing, as modal raises
        yield data[:5]
        yield data[5:]

    def batch_upload(self, force=False):
        import contextlib

        volume = self

        class Batch:
            def put_file(self, local, remote):
                dest = volume.root / str(remote).strip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(local.getvalue() if hasattr(local, "getvalue") else local.read_bytes())

        return contextlib.nullcontext(Batch())


@pytest.fixture
def fake_modal(monkeypatch, tmp_path, volumes):
    """`modal` and `launch.modal_app` stand-ins; the remote call copies the module's straight run onto the volumes."""
    import contextlib
    import shutil
    import sys
    import types

    import launch

    straight = volumes[0]
    modal = types.ModuleType("modal")
    modal.exception = types.ModuleType("modal.exception")
    modal.exception.AuthError = type("AuthError", (Exception,), {})
    modal.exception.NotFoundError = type("NotFoundError", (Exception,), {})
    modal.exception.ConnectionError = type("ConnectionError", (Exception,), {})
    modal.enable_output = contextlib.nullcontext
    monkeypatch.setitem(sys.modules, "modal", modal)
    monkeypatch.setitem(sys.modules, "modal.exception", modal.exception)
    monkeypatch.setattr(modal_h100, "has_credentials", lambda: True)

    app_module = types.ModuleType("launch.modal_app")
    app_module.volumes = {mount: FakeModalVolume(tmp_path / "volumes" / name) for name, mount, _ in plans.VOLUMES}
    calls = []

    def remote_call(flags, run_names, launch_id, config_json):
        calls.append((flags, run_names))
        for folder, mount in ((straight.checkpoints, "/checkpoints"), (straight.outputs, "/outputs")):
            shutil.copytree(folder / "straight", app_module.volumes[mount].root / run_names[0])
        return {"exit_code": 0}

    app_module.train = types.SimpleNamespace(remote=remote_call, spawn=lambda *a: types.SimpleNamespace(object_id="fc-1"))
    app_module.app = types.SimpleNamespace(run=lambda detach=False: contextlib.nullcontext())
    monkeypatch.setitem(sys.modules, "launch.modal_app", app_module)
    monkeypatch.setattr(launch, "modal_app", app_module, raising=False)
    return app_module, calls


def test_launch_syncs_runs_and_downloads(fake_modal, tmp_path, tinystories_dir, capsys):
    app_module, calls = fake_modal
    laptop = ["--data-dir", str(tinystories_dir), "--checkpoint-dir", str(tmp_path / "ck"), "--output-dir", str(tmp_path / "out")]
    (tmp_path / "out/e2e").mkdir(parents=True)  # a local folder of an older run of this name: kept aside
    assert modal_h100.main(["--gpus", "1", "--run-name", "e2e", *laptop]) == 0
    flags, run_names = calls[0]
    assert run_names == ["e2e"] and flags[flags.index("--gpus") + 1] == "1"
    data = app_module.volumes["/data"].root
    assert (data / "stories/train/stories.jsonl").read_bytes() == (tinystories_dir / "train/stories.jsonl").read_bytes()
    assert checkpoint.read_final_config(tmp_path / "ck/e2e/final").model.num_hidden_layers == 1
    assert (tmp_path / "out/e2e/metrics.csv").is_file()
    assert any(p.name.startswith("e2e.replaced-") for p in (tmp_path / "out").iterdir())
    assert "stories/: 3 uploaded, 0 unchanged" in capsys.readouterr().out  # train, valid and the README

    assert modal_h100.main(["--gpus", "1", "--run-name", "e2e2", "--detach", *laptop]) == 0
    out = capsys.readouterr().out
    assert "0 uploaded" in out and "fc-1" in out and "modal volume get" in out  # nothing changed; no download
    assert not (tmp_path / "ck/e2e2").exists()
