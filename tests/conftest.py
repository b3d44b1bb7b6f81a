"""Shared fixtures: tiny configs, the golden folder, deterministic seeds."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("SF_SDK_GOLDEN", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden tensors not found at {GOLDEN}: put ../shared beside the repo or set SF_SDK_GOLDEN")
    return GOLDEN


# backend="auto" (the default) reads and writes an artifact cache: the suite's is a temporary folder,
# never the home cache, and builds nothing unless a test asks (tests/test_auto_backend.py does).
os.environ.setdefault("SF_SDK_ARTIFACT_CACHE", tempfile.mkdtemp(prefix="sf-sdk-test-artifacts-"))
os.environ.setdefault("SF_SDK_AUTO_BUILD", "never")

# One intra-op thread: the suite's ops are tiny, and on a 2-core machine a second OpenMP thread
# mostly waits at barriers (5-20x slower under any other load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
