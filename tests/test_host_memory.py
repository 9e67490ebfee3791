"""The CPU step's memory is reused between runs of a program (dsjax/train/host_memory.py).

Each check runs in a fresh process: the malloc options and JAX's dispatch mode must be set
before JAX starts its CPU backend, and this test process started it long ago. The program
materialises a 96 MiB temporary (24,576 pages); with glibc's defaults every call maps it
afresh and page-faults on every page, with the options set the calls reuse it. The fewest
faults of eight calls is compared: on a busy machine an odd call of the kept setting has
faulted on part of the block (the README run: 1,400 faults per step on average, not 92,700).
"""

import os
import subprocess
import sys

import pytest

from dsjax import cli
from dsjax.train import host_memory


PROGRAM = """
import resource
from dsjax.train.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory()
import jax, jax.numpy as jnp
x = jax.device_put(jnp.ones((24 * 2**20,), jnp.float32))
f = jax.jit(lambda x: jnp.sum(jax.lax.optimization_barrier(jnp.sin(x)) * 2.0))
for _ in range(2):
    f(x).block_until_ready()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, jax.config.read("jax_cpu_enable_async_dispatch"), min(faults))
"""


def _fewest_faults_per_call(malloc: str | None) -> tuple[str, str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", host_memory.ENV)}  # one CPU device, as `dsjax` runs
    if malloc is not None:
        env[host_memory.ENV] = malloc
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300, check=True)
    kept, async_dispatch, faults = out.stdout.split()
    return kept, async_dispatch, int(faults)


def test_kept_memory_takes_no_page_faults_per_call():
    kept, async_dispatch, faults = _fewest_faults_per_call(None)
    if host_memory.glibc() is None:  # macOS, musl: nothing is changed, JAX keeps its default
        assert (kept, async_dispatch) == ("False", "True")
        return
    assert (kept, async_dispatch) == ("True", "False")
    assert faults < 1_000, faults


def test_system_malloc_faults_on_every_page():
    kept, async_dispatch, faults = _fewest_faults_per_call("system")
    assert (kept, async_dispatch) == ("False", "True")
    if host_memory.glibc() is not None:  # the count is glibc's behaviour; other allocators may reuse the block
        assert faults > 12_000, faults  # the 24,576 pages of the temporary, give or take


def test_the_cli_keeps_memory_for_training_commands_only(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_host_memory", lambda: calls.append("kept"))
    assert cli.main(["run", "--help"]) == 0  # ends in the parser, before any command
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "final"), "--prompt", "x"]) != 0  # sampling: JAX's default
    assert calls == []
    assert cli.main(["bench", "--seq-len", "abc"]) == 2
    assert cli.main(["run", "--model-size", "nano", "--data-dir", str(tmp_path / "none"), "--work-dir", str(tmp_path)]) != 0
    assert calls == ["kept", "kept"]
    monkeypatch.setenv(host_memory.ENV, "sytem")  # a typo is refused in one line, before any work
    assert cli.main(["bench"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "dsjax: error: DSJAX_MALLOC='sytem' is not one of keep (the default), system"
    assert calls == ["kept", "kept"]
