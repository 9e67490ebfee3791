"""Checkpoint save cost per model size: `uv run python tests/bench_checkpoint.py [nano tiny ...]`.

Measures, for the full train state (params + AdamW moments + step):
- blocking: how long `save()` holds up training (device-to-host copy, then Orbax writes in the background);
- total: blocking + the wait for the background write to commit;
- restore: reading it back onto the device.
Prints one markdown table row per size.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax

from dsjax.config import load_config
from dsjax.model import count_params
from dsjax.train.checkpoint import CheckpointStore
from dsjax.train.step import abstract_state, init_state


def bench(size: str, repeats: int = 3) -> str:
    config = load_config(size)
    state = init_state(config, jax.random.key(0))
    jax.block_until_ready(state)
    folder = Path(tempfile.mkdtemp(prefix=f"ckbench-{size}-"))
    try:
        store = CheckpointStore(folder, max_to_keep=2)
        blocking, total = [], []
        for step in range(1, repeats + 1):
            start = time.perf_counter()
            store.save(step, state, {}, {"step": step}, config)
            blocking.append(time.perf_counter() - start)
            store.wait_until_finished()
            total.append(time.perf_counter() - start)
        size_mb = sum(f.stat().st_size for f in (folder / f"step_{repeats}").rglob("*") if f.is_file()) / 2**20
        start = time.perf_counter()
        step, restored = store.latest_restorable(abstract_state(config), config)
        jax.block_until_ready(restored[0])
        restore = time.perf_counter() - start
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    params = count_params(config.model)["total"] / 1e6
    return (
        f"| {size} | {params:.1f}M | {size_mb:.0f} MB | {min(blocking) * 1000:.0f} ms | "
        f"{min(total) * 1000:.0f} ms | {restore * 1000:.0f} ms |"
    )


if __name__ == "__main__":
    sizes = sys.argv[1:] or ["nano", "tiny"]
    print("| size | params | checkpoint | save blocks training | save total (committed) | restore |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        print(bench(size), flush=True)
