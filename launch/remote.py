"""What runs inside the Modal container: `dsjax run` on the mounted volumes, resuming after preemption.

The body calls `dsjax.cli.main` (the same code path as on a laptop; no second training
loop) with the data, checkpoint and output folders pointed at the three mounts. Nothing
here imports `modal`: the Modal function passes in a `commit` callable and, on a cluster,
the rank and addresses, so the tests run this body in-process with temporary folders
standing in for the mounts.

A restart is told apart from a first start by a marker, `<checkpoints>/.launches/<id>.json`,
written (and committed) before training: Modal restarts a preempted or failed call with
the same arguments, so the same launch id finds its marker and continues from the newest
complete checkpoint (`--resume`), or, when the first attempt saved none, starts over with
`--overwrite` (its partial outputs are moved aside, not deleted).

Volumes are made durable by `commit`: a watcher thread calls it whenever a run folder
gains a complete step (or final/), and once more when the run ends.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# exit codes of `dsjax run` a restart cannot change (done, bad input, divergence, unusable
# checkpoint): returned as the result. Anything else (a crash, SIGTERM/SIGINT from a
# preemption) is raised, so Modal retries the call and the retry resumes.
FINAL_EXIT_CODES = (0, 2, 3, 4)
COORDINATOR_PORT = 8476
LAUNCHES = ".launches"


@dataclass(frozen=True)
class Mounts:
    data: Path
    checkpoints: Path
    outputs: Path

    def path_flags(self) -> list[str]:
        """`dsjax run` flags that put data, tokenizers, caches, checkpoints and outputs on the volumes."""
        return [
            "--data-dir", str(self.data / "stories"), "--work-dir", str(self.data),
            "--checkpoint-dir", str(self.checkpoints), "--output-dir", str(self.outputs),
        ]


MODAL_MOUNTS = Mounts(Path("/data"), Path("/checkpoints"), Path("/outputs"))


@dataclass(frozen=True)
class Cluster:
    """This container's place in a multi-node run (from Modal's cluster info)."""

    rank: int
    addresses: tuple[str, ...]  # one per container, rank order; IPv6 on Modal

    @property
    def coordinator(self) -> str:
        host = self.addresses[0]
        return f"[{host}]:{COORDINATOR_PORT}" if ":" in host else f"{host}:{COORDINATOR_PORT}"

    def flags(self) -> list[str]:
        return ["--coordinator", self.coordinator, "--num-processes", str(len(self.addresses)), "--process-id", str(self.rank)]


class RemoteRunFailed(RuntimeError):
    """`dsjax run` stopped with an exit code a restart may fix; raised so that Modal retries the call."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)  # args stay (exit_code,): the exception pickles back to the laptop as it is
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"dsjax run exited with code {self.exit_code}; the next attempt resumes from the newest checkpoint"


def command(flags: list[str], mounts: Mounts, config_file: str | None = None) -> list[str]:
    """The `dsjax run` argv the container executes (the dry run prints the same list)."""
    config = ["--config", config_file] if config_file else []
    return ["run", "--backend", "jax", *flags, *config, *mounts.path_flags()]


def _without(flags: list[str], *names: str) -> list[str]:
    return [f for f in flags if f not in names]


def restart_flags(flags: list[str], run_dirs: list[Path]) -> tuple[list[str], bool]:
    """Flags for a restart of the same launch: --resume when a stage saved anything, else --overwrite."""
    from dsjax.train import checkpoint

    had_data_change = "--allow-data-change" in flags and "--resume" in flags
    flags = _without(flags, "--resume", "--overwrite", "--allow-data-change")
    if any(checkpoint.committed_steps(d) or (d / checkpoint.FINAL).is_dir() for d in run_dirs):
        return [*flags, "--resume", *(["--allow-data-change"] if had_data_change else [])], True
    return [*flags, "--overwrite"], False


def finished(flags: list[str], run_dirs: list[Path], started: float) -> bool:
    """This launch already wrote the last training stage's final/ (a restart after it, e.g. preempted while returning).

    `started` is when the launch's first attempt began: a final/ from before it belongs to a run this launch continues.
    """
    stages = flags[flags.index("--stages") + 1] if "--stages" in flags else ""
    final = run_dirs[-1] / "final" / "config.json" if run_dirs else None
    return final is not None and "export" not in stages and final.is_file() and final.stat().st_mtime >= started


def _log(message: str) -> None:
    print(f"launch: {message}", flush=True)


class CommitWatcher:
    """Calls `commit` each time a run folder gains a complete step or final/ (polled), and once at close."""

    def __init__(self, run_dirs: list[Path], commit: Callable[[], None], poll_seconds: float = 5.0):
        self.run_dirs, self.commit, self.poll_seconds = [Path(d) for d in run_dirs], commit, poll_seconds
        self.commits = 0
        self._seen = self.state()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="volume-commit", daemon=True)

    def state(self) -> tuple:
        """What makes a new commit worth it: complete steps (and whether their JSON copies landed), final/."""
        from dsjax.train import checkpoint

        return tuple(
            (
                tuple((s, (checkpoint.step_dir(d, s) / "training_state.json").is_file()) for s in checkpoint.committed_steps(d)),
                (d / checkpoint.FINAL / "config.json").is_file(),
            )
            for d in self.run_dirs
        )

    def poll(self) -> bool:
        current = self.state()
        if current == self._seen:
            return False
        self._seen = current
        changed = [
            f"{d.name}: steps {[s for s, _ in steps]}" + (", final" if final else "")
            for d, (steps, final) in zip(self.run_dirs, current) if steps or final
        ]
        self._commit("; ".join(changed))
        return True

    def _commit(self, why: str) -> None:
        start = time.perf_counter()
        self.commit()
        self.commits += 1
        _log(f"volumes committed ({why}) in {time.perf_counter() - start:.1f}s")

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception as err:  # noqa: BLE001 - a failed commit is retried at the next change or at close
                _log(f"volume commit failed ({err}); will retry")

    def __enter__(self) -> "CommitWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._seen = self.state()
        self._commit("run ended")


def train(
    flags: list[str],
    run_names: list[str],
    launch_id: str,
    mounts: Mounts = MODAL_MOUNTS,
    *,
    config_json: str | None = None,
    commit: Callable[[], None] = lambda: None,
    cluster: Cluster | None = None,
    poll_seconds: float = 5.0,
) -> dict:
    """One attempt of a launch: `dsjax run` on the mounts; returns its result or raises to be retried.

    `run_names` are the run folders the stages train, in order (`<run>`, `<run>-sft`, ...).
    """
    from dsjax.cli import main

    run_dirs = [mounts.checkpoints / name for name in run_names]
    marker = mounts.checkpoints / LAUNCHES / f"{launch_id}.json"
    primary = cluster is None or cluster.rank == 0
    # other ranks never move folders (dsjax leaves --overwrite to process 0) and resume what rank 0 resumes
    restart = marker.is_file() or not primary
    resumed = False
    result = {"run_names": run_names, "launch_id": launch_id}
    if restart:
        started = json.loads(marker.read_text()).get("started", 0.0) if marker.is_file() else time.time()
        if finished(flags, run_dirs, started):
            _log(f"restart of launch {launch_id}: {run_dirs[-1] / 'final'} is already written; nothing left to do")
            return {**result, "exit_code": 0, "resumed": True, "commits": 0, "final": True}
        flags, resumed = restart_flags(flags, run_dirs)
        if primary:
            _log(f"restart of launch {launch_id}: " + ("resuming from the newest complete checkpoint" if resumed
                 else "no checkpoint yet; starting over (partial outputs are moved aside)"))
    elif primary:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"launch_id": launch_id, "run_names": run_names, "started": time.time()}))
        commit()
    if cluster is not None:
        flags = [*flags, *cluster.flags()]
    with tempfile.TemporaryDirectory(prefix="dsjax-launch-") as tmp:
        config_file = None
        if config_json is not None:
            config_file = os.path.join(tmp, "config.json")
            Path(config_file).write_text(config_json)
        argv = command(flags, mounts, config_file)
        _log("dsjax " + " ".join(argv))
        with CommitWatcher(run_dirs, commit, poll_seconds) as watcher:
            code = main(argv)
    result.update(exit_code=code, resumed=resumed, commits=watcher.commits,
                  final=bool(run_dirs) and (run_dirs[-1] / "final" / "config.json").is_file())
    if code not in FINAL_EXIT_CODES:
        raise RemoteRunFailed(code)
    return result


def matmul_tflops(n: int = 8192, iters: int = 20) -> dict:
    """`jax.devices()` and the bf16 matmul rate of the first device, measured (what `test_gpu` prints)."""
    import jax
    import jax.numpy as jnp

    devices = jax.devices()
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()  # compile and warm up outside the timing
    start = time.perf_counter()
    for _ in range(iters):
        out = matmul(a, b)
    out.block_until_ready()
    seconds = time.perf_counter() - start
    return {
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "n": n,
        "iters": iters,
        "seconds": seconds,
        "bf16_matmul_tflops": 2 * n**3 * iters / seconds / 1e12,
    }
