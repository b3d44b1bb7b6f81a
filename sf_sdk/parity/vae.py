"""Golden parity of the Wan2.1 VAE against ``../shared/golden/vae.safetensors``.

The file holds the official module's weights (``weights.*``, base width 8), its constructor
config in the metadata, the latent statistics, and two checks (see the golden README):

* ``decode``: normalized latents ``z`` -> ``video``, the raw decoder output (not clamped).
* ``encode``: ``encode.video`` -> ``encode.mu``, the posterior mean after normalization.

``python -m sf_sdk.parity.vae [path] [--dtype float32]`` logs the errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from sf_sdk.config import VAEConfig, from_dict
from sf_sdk.models.vae import WanVAE

__all__ = ["check", "load_golden_vae", "default_path"]

log = logging.getLogger(__name__)

WEIGHT_PREFIX = "weights."
GOLDEN_FILE = "vae.safetensors"


def default_path() -> Path:
    """``$SF_SDK_GOLDEN/vae.safetensors``, by default ``../shared/golden`` next to the repo."""
    repo_root = Path(__file__).resolve().parents[2]
    golden = Path(os.environ.get("SF_SDK_GOLDEN", repo_root.parent / "shared" / "golden"))
    return golden / GOLDEN_FILE


def load_golden_vae(path: Path, dtype: torch.dtype = torch.float64) -> tuple[WanVAE, dict[str, Tensor]]:
    """The VAE described by a golden file (config, statistics, weights) and the file's tensors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"golden file {path} not found: set SF_SDK_GOLDEN to the golden folder")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["json"])
    tensors = load_file(str(path))
    config = from_dict(VAEConfig, {
        **meta["config"],
        "latents_mean": tuple(tensors["latents_mean"].tolist()),
        "latents_std": tuple(tensors["latents_std"].tolist()),
    })
    vae = WanVAE(config)
    weights = {k[len(WEIGHT_PREFIX):]: v for k, v in tensors.items() if k.startswith(WEIGHT_PREFIX)}
    vae.load_state_dict(weights, strict=True)
    return vae.to(dtype).eval(), tensors


def _error(ours: Tensor, reference: Tensor) -> tuple[float, float]:
    if ours.shape != reference.shape:
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)}, reference {tuple(reference.shape)}")
    reference = reference.to(ours.dtype)
    return (ours - reference).abs().max().item(), reference.abs().max().item()


def check(path: Path, dtype: torch.dtype = torch.float64) -> dict[str, tuple[float, float]]:
    """(max abs error, max |reference|) of our decode and encode against the golden file."""
    vae, golden = load_golden_vae(path, dtype)
    with torch.no_grad():
        video = vae.decode(golden["z"].to(dtype), clamp=False)
        mu = vae.normalize(vae.encode(golden["encode.video"].to(dtype)))
    return {"decode": _error(video, golden["video"]), "encode": _error(mu, golden["encode.mu"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=None)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = check(args.path or default_path(), getattr(torch, args.dtype))
    for name, (err, scale) in results.items():
        log.info("%s: max abs error %.3e, reference scale %.3e, relative %.3e",
                 name, err, scale, err / scale)


if __name__ == "__main__":
    main()
