"""Why the vae stage trains the Wan encoder behind an auxiliary decoder: four autoencoders on
single shapes frames, side by side in one run, with the same data, loss and optimizer.

    python benchmarks/vae_training.py [--steps 300] [--every 100] [--dim 8] [--json]

Prints, every ``--every`` steps, the mean squared error per channel on the object's pixels of
held-out frames (2.0 = the object drawn black, 1.0 = drawn grey, lower is better) for:

* ``plain``: a plain conv encoder + the auxiliary plain conv decoder (GroupNorm, width ``dim``);
* ``wan``: the Wan encoder + the Wan decoder, trained together (the old recipe);
* ``wan_enc+plain_dec``: the Wan encoder + the auxiliary decoder (the ``vae`` stage now);
* ``frozen_plain_enc+wan_dec``: the Wan decoder on the latents of the trained ``plain`` encoder,
  frozen (what the ``vae_decoder`` stage does with the frozen Wan encoder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import Tensor, nn

from sf_sdk.config import VAEConfig
from sf_sdk.models.vae import WanVAE
from training.data.shapes import ShapesConfig, ShapesDataset
from training.stages.vae import FOREGROUND_LEVEL, AuxDecoder, reconstruction_loss

BATCH = 8
LR = 1e-3
FG_WEIGHT = 10.0
EVAL_FRAMES = 16


def plain_encoder(config: VAEConfig, dim: int) -> nn.Sequential:
    """Frame [B, 3, H, W] -> latent [B, z, H/8, W/8]: conv, GroupNorm, SiLU, stride-2 conv per level."""
    layers: list[nn.Module] = []
    c_in = 3
    levels = config.spatial_stride.bit_length() - 1
    for i in range(levels):
        c_out = dim * 2 ** i
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(1, c_out), nn.SiLU(),
                   nn.Conv2d(c_out, c_out, 3, stride=2, padding=1)]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, config.z_dim, 1))
    return nn.Sequential(*layers)


class Pair(nn.Module):
    """One autoencoder of the comparison: frames [B, 3, H, W] -> reconstruction [B, 3, H, W]."""

    def __init__(self, encode: nn.Module | WanVAE, decode: nn.Module | WanVAE, train_encoder: bool = True) -> None:
        super().__init__()
        self.enc, self.dec = encode, decode
        if not train_encoder:
            self.enc.requires_grad_(False)

    def latent(self, frames: Tensor) -> Tensor:
        if isinstance(self.enc, WanVAE):
            return self.enc.encode(frames[:, :, None])  # [B, z, 1, h, w]
        return self.enc(frames)[:, :, None]  # [B, z, 1, h, w]

    def forward(self, frames: Tensor) -> Tensor:
        z = self.latent(frames)
        if isinstance(self.dec, WanVAE):
            return self.dec.decode(z, clamp=False)[:, :, 0]  # [B, 3, H, W]
        return self.dec(z)[:, :, 0]  # [B, 3, H, W]


def object_error(model: Pair, frames: Tensor) -> float:
    with torch.no_grad():
        recon = model(frames)
    fg = (frames.amax(dim=1, keepdim=True) > FOREGROUND_LEVEL).to(frames.dtype)  # [B, 1, H, W]
    return float(((recon - frames).square() * fg).sum() / fg.sum() / 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--dim", type=int, default=8, help="width of the Wan VAE and the plain nets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.every <= 0:
        parser.error("--steps and --every must be positive")
    torch.set_num_threads(args.threads)
    config = VAEConfig(dim=args.dim, z_dim=16, num_res_blocks=1, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16)
    data = ShapesDataset(ShapesConfig(num_frames=1), seed=0)
    held_out = ShapesDataset(ShapesConfig(num_frames=1), seed=9)
    eval_frames = torch.stack([held_out[i]["video"][:, 0] for i in range(EVAL_FRAMES)])  # [N, 3, H, W]

    def batch(step: int) -> Tensor:
        return torch.stack([data[step * BATCH + j]["video"][:, 0] for j in range(BATCH)])  # [B, 3, H, W]

    def train(name: str, model: Pair, results: dict[str, dict[int, float]]) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.99), weight_decay=0.0)
        started = time.perf_counter()
        for step in range(1, args.steps + 1):
            frames = batch(step)
            loss, _ = reconstruction_loss(model(frames), frames, FG_WEIGHT, 1.0, 1.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % args.every == 0:
                results.setdefault(name, {})[step] = round(object_error(model, eval_frames), 3)
                if not args.json:
                    sys.stdout.write(f"{name:<26} step {step:>5}  object error {results[name][step]:.3f}  "
                                     f"({time.perf_counter() - started:.0f} s)\n")
                    sys.stdout.flush()

    torch.manual_seed(0)
    results: dict[str, dict[int, float]] = {}
    plain = Pair(plain_encoder(config, args.dim), AuxDecoder(config, args.dim))
    train("plain", plain, results)
    train("wan", Pair(WanVAE(config), WanVAE(config)), results)
    train("wan_enc+plain_dec", Pair(WanVAE(config), AuxDecoder(config, args.dim)), results)
    train("frozen_plain_enc+wan_dec", Pair(plain.enc, WanVAE(config), train_encoder=False), results)
    if args.json:
        sys.stdout.write(json.dumps({"steps": args.steps, "dim": args.dim, "object_error": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
