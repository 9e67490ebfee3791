"""Compiled XLA programs kept on disk (JAX's persistent compilation cache), so a second run skips compiling.

`dsjax run` keeps them in `<work-dir>/jax_cache` by default, beside the tokenizer and the
tokenized data: derived files a run can always remake. On the 2-core CPU the README's
nano run had its first 10 steps done 12.8 s after the start instead of 18.6 s the second
time it ran (BENCHMARKS.md). JAX keys each entry by the program, the compile options, the devices
and the JAX/jaxlib versions, so a changed model, mesh or install compiles afresh.

`--compile-cache DIR` (or DSJAX_COMPILE_CACHE) puts the cache elsewhere, `off` turns it off,
and JAX's own JAX_COMPILATION_CACHE_DIR, when set, is left to JAX.
JAX reads the folder once per process, at its first compile after the folder is set.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_FOLDER = "jax_cache"
OFF = "off"


def _given(choice: str | None) -> str:
    return choice or os.environ.get("DSJAX_COMPILE_CACHE") or ""


def cache_dir_for(choice: str | None, work_dir: str | Path) -> Path | None:
    """Where a run keeps compiled programs: the flag's folder, `off` (None), or <work_dir>/jax_cache."""
    given = _given(choice)
    if given.lower() == OFF:
        return None
    return Path(given) if given else Path(work_dir) / CACHE_FOLDER


def named_file(choice: str | None) -> str | None:
    """The --compile-cache (or DSJAX_COMPILE_CACHE) value when it names an existing file (refused), else None."""
    given = _given(choice)
    return given if given.lower() != OFF and Path(given).is_file() else None


def use_compile_cache(choice: str | None, work_dir: str | Path) -> Path | None:
    """Point JAX's persistent compilation cache at the run's folder; returns the folder in use (None: off)."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # the user set JAX's own variable: JAX already uses it
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    folder = cache_dir_for(choice, work_dir)
    if folder is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder
