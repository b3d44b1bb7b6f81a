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

With ``--roundtrip`` it scores VAEs instead: rendered clips encoded and decoded, judged by the
strict shapes evaluator (``training.eval.shapes_bench``, ``--old`` for the lenient one), the
figure docs/vae.md tracks:

    python benchmarks/vae_training.py --roundtrip RUN_DIR|VAE_DIR|MODEL [...] [--prompts ...] [--old] [--json]

A run directory gives its newest VAE: its latest ``vae_decoder`` checkpoint (the decoder; the
last one is written at the end) on top of ``vae/final`` (the encoder and latent statistics), so a
run can be scored while it trains, else its finished ``vae`` stage; a folder holding ``vae.safetensors`` and
``vae_config.json`` (a stage's ``final/``) or a model name / folder give their VAE. Per VAE: the
score, its checks, the mean score of each shape, and the run's median seconds per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sf_sdk.config import VAEConfig
from sf_sdk.models.vae import WanVAE
from training.data.shapes import ShapesConfig, ShapesDataset
from training.stages.vae import FOREGROUND_LEVEL, VAE_CONFIG_FILE, AuxDecoder, reconstruction_loss

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


def load_any_vae(source: str) -> tuple[WanVAE, str]:
    """The VAE ``source`` names (see the module docstring) and a description of what was loaded."""
    from sf_sdk import StreamingGenerator
    from training.stages.vae import finished_vae_dir, load_vae_dir
    from training.utils.checkpoint import latest_step, module_state

    path = Path(source)
    if (path / VAE_CONFIG_FILE).is_file():
        return load_vae_dir(path, torch.device("cpu")), str(path)
    if (path / "vae" / "final" / VAE_CONFIG_FILE).is_file():
        ckpts = path / "vae_decoder" / "checkpoints"
        step = latest_step(ckpts)  # the last one is written at the end: the final weights
        if step is None:
            done = finished_vae_dir(path) or path / "vae" / "final"
            return load_vae_dir(done, torch.device("cpu")), str(done)
        vae = load_vae_dir(path / "vae" / "final", torch.device("cpu"))
        vae.load_state_dict(module_state(ckpts, "vae")[0])
        return vae, f"{ckpts} step {step}"
    vae = StreamingGenerator.from_pretrained(source, device="cpu").vae
    if vae is None:
        raise ValueError(f"{source!r} has no VAE")
    return vae, source


def median_sec_per_step(source: str) -> float | None:
    """Median ``sec_per_step`` of a run directory's ``vae_decoder`` (else ``vae``) metrics."""
    for stage in ("vae_decoder", "vae"):
        path = Path(source) / stage / "metrics.jsonl"
        if path.is_file():
            secs = [json.loads(line).get("sec_per_step") for line in path.read_text().splitlines() if line.strip()]
            secs = [s for s in secs if s]
            return round(statistics.median(secs), 3) if secs else None
    return None


def roundtrip_score(vae: WanVAE, prompts: list[str] | None = None, num_frames: int = 33, seeds: tuple[int, ...] = (0,),
                    strict: bool = True) -> dict[str, Any]:
    """Rendered clips through ``vae`` (encode, normalize, decode) scored by the shapes evaluator:
    what ``python -m training.eval.shapes_bench --reconstruct`` does for a model folder."""
    from training.data.shapes import all_captions, frames_to_tensor, make_clip, tensor_to_frames
    from training.eval.shapes_bench import BenchConfig, run_benchmark

    domain = BenchConfig().domain
    vae = vae.eval()

    def generate(prompt: str, frames: int, seed: int) -> Any:
        clip = make_clip(seed, all_captions().index(prompt), replace(domain, num_frames=frames), caption=prompt)
        video = frames_to_tensor(clip.frames)[None].to(vae.dtype)  # [1, 3, T, H, W]
        with torch.no_grad():
            recon = vae.decode(vae.normalize(vae.encode(video)))  # [1, 3, T, H, W]
        return tensor_to_frames(recon[0].float())

    result = run_benchmark(generate, prompts or all_captions(), num_frames=num_frames, seeds=list(seeds),
                           strict=strict)
    by_shape: dict[str, list[float]] = defaultdict(list)
    for prompt, entry in result["per_prompt"].items():
        by_shape[prompt.split()[2]].append(entry["score"])
    return {"score": round(result["mean_score"], 4), "checks": {k: round(v, 4) for k, v in result["checks"].items()},
            "shapes": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_shape.items())},
            "num_videos": result["num_videos"]}


def main_roundtrip(args: argparse.Namespace) -> int:
    rows = {}
    for source in args.roundtrip:
        started = time.perf_counter()
        vae, what = load_any_vae(source)
        row = {"loaded": what, "sec_per_step": median_sec_per_step(source)}
        row.update(roundtrip_score(vae, args.prompts, args.frames, strict=not args.old))
        row["eval_s"] = round(time.perf_counter() - started, 1)
        rows[source] = row
        if not args.json:
            shapes = "  ".join(f"{k} {v:.3f}" for k, v in row["shapes"].items())
            sys.stdout.write(f"{row['score']:.4f}  ({shapes}; shape {row['checks']['shape']:.3f}, sharpness "
                             f"{row['checks'].get('sharpness', float('nan')):.3f}; {row['sec_per_step']} s/step)  "
                             f"{what}\n")
            sys.stdout.flush()
    if args.json:
        sys.stdout.write(json.dumps({"strict": not args.old, "frames": args.frames, "vaes": rows}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--roundtrip", nargs="+", metavar="VAE",
                        help="score these VAEs' round trips on the strict evaluator instead (run dirs, VAE "
                             "folders or models)")
    parser.add_argument("--prompts", nargs="+", help="--roundtrip: a subset of the 72 captions (default: all)")
    parser.add_argument("--frames", type=int, default=33, help="--roundtrip: frames per clip")
    parser.add_argument("--old", action="store_true", help="--roundtrip: the old lenient evaluator")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--dim", type=int, default=8, help="width of the Wan VAE and the plain nets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.roundtrip:
        return main_roundtrip(args)
    if args.steps <= 0 or args.every <= 0:
        parser.error("--steps and --every must be positive")
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
