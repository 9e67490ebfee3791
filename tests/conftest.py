"""Test set-up: 8 fake CPU devices (set before JAX is imported) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# in-process runs keep no compiled programs on disk: JAX reads the cache folder once per process, so one
# test's folder would serve the rest; the subprocess runs of test_checkpoint use and check the default
os.environ.setdefault("DSJAX_COMPILE_CACHE", "off")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# 300 train + 100 valid TinyStories, committed with the tests (CDLA-Sharing-1.0, see its README.md):
# every clone has it, so the suite runs anywhere and gives the same results everywhere
SAMPLE_DATA = REPO / "tests" / "data" / "tinystories"
# the 2,316 + 1,000-story sample that sits beside this checkout on the project's machines only
LARGE_DATA = REPO.parent / "shared" / "data" / "tinystories"


@pytest.fixture(scope="session")
def tinystories_dir() -> Path:
    """Real TinyStories in the train/ + valid/ layout: the committed sample."""
    if not (SAMPLE_DATA / "train" / "stories.jsonl").is_file():
        pytest.fail(f"the committed TinyStories sample is missing at {SAMPLE_DATA}")
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def tinystories_large_dir() -> Path:
    """The larger sample in ../shared, for checks that gain from more (and more varied) text; skipped without it."""
    if not (LARGE_DATA / "train" / "stories.jsonl").is_file():
        pytest.skip(f"the larger TinyStories sample is not beside this checkout ({LARGE_DATA})")
    return LARGE_DATA


@pytest.fixture(scope="session")
def sample_tokenizer(tmp_path_factory, tinystories_dir):
    """A 512-piece tokenizer trained on the committed sample (about a second), shared by the tests that need one."""
    from dsjax.data.tokenizer import load_or_train_tokenizer

    return load_or_train_tokenizer(tinystories_dir, tmp_path_factory.mktemp("sample_tokenizer"), 512)
