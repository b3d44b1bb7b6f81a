"""Shared fixtures: tiny configs, the golden folder, deterministic seeds."""

from __future__ import annotations

import atexit
import os
import shutil
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
if "SF_SDK_ARTIFACT_CACHE" not in os.environ:
    os.environ["SF_SDK_ARTIFACT_CACHE"] = tempfile.mkdtemp(prefix="sf-sdk-test-artifacts-")
    atexit.register(shutil.rmtree, os.environ["SF_SDK_ARTIFACT_CACHE"], True)
os.environ.setdefault("SF_SDK_AUTO_BUILD", "never")

# One intra-op thread: the suite's ops are tiny, and on a 2-core machine a second OpenMP thread
# mostly waits at barriers (5-20x slower under any other load).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cpu_kernels() -> str:
    """The compiled CPU kernels' library path (built once, cached); skips under SF_SDK_NO_CPU_KERNELS."""
    from sf_sdk import ops

    if os.environ.get("SF_SDK_NO_CPU_KERNELS", "") not in ("", "0"):
        pytest.skip("SF_SDK_NO_CPU_KERNELS is set")
    path = ops.build(("cpu",))["cpu"]
    assert path is not None, f"the CPU kernels did not build: {ops.unavailable_reason('cpu')}"
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# The vocabulary of the tiny model below: prompts with other words are partly unknown to it.
TINY_WORDS = ("a", "red", "blue", "circle", "square", "moving", "left", "right")
TINY_FPS = 8


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny model folder with a word-level text encoder: 2x2 latents (16x16 pixels), a rolling
    window of 6 latent frames, 8 fps (random weights, seed 0), written by save_pretrained."""
    from sf_sdk.checkpoint import save_pretrained
    from sf_sdk.config import DIT_PRESETS, TEXT_PRESETS, VAE_PRESETS, StreamingConfig
    from sf_sdk.models.dit import WanDiT
    from sf_sdk.models.text import UMT5Encoder, build_word_tokenizer
    from sf_sdk.models.vae import WanVAE

    root = tmp_path_factory.mktemp("tiny_model")
    tok = build_word_tokenizer(list(TINY_WORDS), root / "tok")
    torch.manual_seed(0)
    dit, vae, text = DIT_PRESETS["tiny"], VAE_PRESETS["tiny"], TEXT_PRESETS["tiny"]
    stream = StreamingConfig(latent_height=2, latent_width=2, local_attn_size=6)
    return save_pretrained(root / "model", dit=WanDiT(dit), dit_config=dit, streaming=stream, vae=WanVAE(vae),
                           vae_config=vae, text_encoder=UMT5Encoder(text), text_config=text, tokenizer_dir=tok,
                           extra={"fps": TINY_FPS})


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    its tensors are tiny, so a second thread only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
