"""Test set-up: 8 fake CPU devices (set before JAX is imported) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "tinystories"


@pytest.fixture(scope="session")
def tinystories_dir() -> Path:
    if not (SHARED_DATA / "train" / "stories.jsonl").is_file():
        pytest.fail(f"real TinyStories sample missing at {SHARED_DATA} (tests need ../shared beside the repo)")
    return SHARED_DATA
