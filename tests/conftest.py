"""Test set-up: 8 fake CPU devices (set before JAX is imported) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from dsjax import trace_summary  # noqa: E402 - imports no JAX

# per-op trace events on XLA:CPU, as `dsjax bench --profile` asks for before JAX starts (test_bench checks them)
trace_summary.enable_cpu_op_events()
# in-process runs keep no compiled programs on disk: JAX reads the cache folder once per process, so one
# test's folder would serve the rest; the subprocess runs of test_checkpoint use and check the default
os.environ.setdefault("DSJAX_COMPILE_CACHE", "off")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from dsjax.train.host_memory import keep_freed_host_memory  # noqa: E402

# as `dsjax` does first thing (CPU programs run on the calling thread and reuse its freed memory),
# so in-process tests run the way the CLI does whichever test starts JAX's backend
keep_freed_host_memory()

REPO = Path(__file__).resolve().parent.parent
# Real TinyStories (CDLA-Sharing-1.0) in the train/ + valid/ layout. The repository holds no data:
# the tests read the 2,316 + 1,000-story sample that sits beside this checkout on the project's
# machines (CI included), or any TinyStories folder in that layout named by DSJAX_TEST_DATA
# (`dsjax download --out DIR` makes one).
SOURCE_DATA = Path(os.environ.get("DSJAX_TEST_DATA") or REPO.parent / "shared" / "data" / "tinystories")
# most tests train on a small slice of it, the first stories of each split: enough to see every
# stage run in seconds, and the same text on every machine with the same source
SAMPLE_STORIES = {"train": 300, "valid": 100}


def _source_data() -> Path:
    if not (SOURCE_DATA / "train" / "stories.jsonl").is_file() or not (SOURCE_DATA / "valid" / "stories.jsonl").is_file():
        pytest.fail(
            f"no TinyStories for the tests at {SOURCE_DATA}: set DSJAX_TEST_DATA to a folder with "
            "train/stories.jsonl and valid/stories.jsonl (`dsjax download --out DIR` makes one)"
        )
    return SOURCE_DATA


@pytest.fixture(scope="session")
def tinystories_dir(tmp_path_factory) -> Path:
    """The small sample (SAMPLE_STORIES of each split), cut from the source into a session folder."""
    source = _source_data()
    sample = tmp_path_factory.mktemp("tinystories")
    for split, count in SAMPLE_STORIES.items():
        with open(source / split / "stories.jsonl", encoding="utf-8") as f:
            lines = [line for _, line in zip(range(count), f)]
        (sample / split).mkdir()
        (sample / split / "stories.jsonl").write_text("".join(lines), encoding="utf-8")
    notice = source / "README.md"
    (sample / "README.md").write_text(
        notice.read_text(encoding="utf-8") if notice.is_file() else "TinyStories (Eldan & Li, 2023), CDLA-Sharing-1.0.\n",
        encoding="utf-8",
    )
    return sample


@pytest.fixture(scope="session")
def tinystories_large_dir() -> Path:
    """The whole source, for checks that gain from more (and more varied) text."""
    return _source_data()


@pytest.fixture(scope="session")
def sample_tokenizer(tmp_path_factory, tinystories_dir):
    """A 512-piece tokenizer trained on the small sample (about a second), shared by the tests that need one."""
    from dsjax.data.tokenizer import load_or_train_tokenizer

    return load_or_train_tokenizer(tinystories_dir, tmp_path_factory.mktemp("sample_tokenizer"), 512)
