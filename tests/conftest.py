"""Shared fixtures: tiny configs, the golden folder, deterministic seeds."""

from __future__ import annotations

import os
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


# One intra-op thread: the suite's ops are tiny, and on a 2-core machine a second OpenMP thread
# mostly waits at barriers (5-20x slower under any other load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
