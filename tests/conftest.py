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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
