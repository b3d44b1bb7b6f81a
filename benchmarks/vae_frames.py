"""How well a causal VAE reconstructs each latent frame of long shapes clips.

    python benchmarks/vae_frames.py --model shapes-tiny|VAE_DIR|RUN_DIR [--frames 33] [--clips 24] [--json]
    python benchmarks/vae_frames.py --run RUN_DIR [--frames 129]

``--model`` passes clips through a VAE (encode, decode): a model's, a VAE folder's (a stage's
``final/``) or a run directory's newest (its latest ``vae_decoder`` checkpoint on ``vae/final``,
as ``benchmarks/vae_training.py --roundtrip`` reads it); ``--run`` through the newest
checkpoint of a run's ``vae`` stage and its auxiliary decoder (the encoder phase of the recipe,
before the Wan decoder is trained). Prints the mean squared error per channel on the object's
pixels (2.0 = the object drawn black, lower is better) of frame 0 and of each later group of
``temporal_stride`` frames, i.e. one figure per latent frame: a VAE trained on short clips only
reconstructs the latent frames past its training length much worse than the first ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from sf_sdk.config import VAEConfig, from_dict
from sf_sdk.models.vae import WanVAE
from training.data.shapes import ShapesConfig, ShapesDataset
from training.stages.vae import FOREGROUND_LEVEL, AuxDecoder
from training.utils.checkpoint import latest_step

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling vae_training.py

SEED = 777  # clips far from any training seed's stream
Roundtrip = Callable[[Tensor], Tensor]


def model_roundtrip(model: str) -> tuple[Roundtrip, int]:
    """encode -> decode through the VAE ``model`` names (a model name or folder, a VAE folder such
    as a stage's ``final/``, or a run directory's newest VAE: its latest ``vae_decoder``
    checkpoint, so a run can be measured while it trains); also the VAE's temporal stride."""
    from vae_training import load_any_vae

    try:
        vae, what = load_any_vae(model)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    print(f"{what}: encoder + Wan decoder", file=sys.stderr)
    vae = vae.eval()
    return (lambda video: vae.decode(vae.normalize(vae.encode(video)))), vae.config.temporal_stride


def run_roundtrip(run_dir: Path) -> tuple[Roundtrip, int]:
    """encode -> auxiliary decoder through the newest checkpoint of ``run_dir``'s vae stage."""
    from safetensors import safe_open

    ckpt_dir = run_dir / "vae" / "checkpoints"
    step = latest_step(ckpt_dir)
    if step is None:
        raise SystemExit(f"{ckpt_dir} holds no checkpoint: run the vae stage first")
    path = ckpt_dir / f"ckpt-{step:08d}.safetensors"
    with safe_open(path, "pt") as f:
        saved = json.loads(f.metadata()["config"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    aux_dim = saved["vae"]["aux_decoder_dim"]
    if not aux_dim:
        raise SystemExit(f"{path}: this vae stage has no auxiliary decoder; use --model on an export")
    z = saved["vae_model"]["z_dim"]
    # The stage trains with identity latent statistics (the measured ones come at its end).
    cfg = from_dict(VAEConfig, {**saved["vae_model"], "latents_mean": [0.0] * z, "latents_std": [1.0] * z})
    vae, aux = WanVAE(cfg).eval(), AuxDecoder(cfg, aux_dim).eval()
    vae.load_state_dict({k[len("model.vae."):]: v for k, v in state.items() if k.startswith("model.vae.")})
    aux.load_state_dict({k[len("model.aux_decoder."):]: v for k, v in state.items()
                         if k.startswith("model.aux_decoder.")})
    print(f"{path.name}: encoder + auxiliary decoder", file=sys.stderr)
    return (lambda video: aux(vae.encode(video)).clamp(-1, 1)), cfg.temporal_stride


@torch.no_grad()
def per_latent_frame_error(roundtrip: Roundtrip, stride: int, frames: int, clips: int) -> list[float]:
    """Object-pixel MSE per channel: [frame 0, frames 1..stride, ...], averaged over clips."""
    ds = ShapesDataset(ShapesConfig(num_frames=frames), seed=SEED)
    total = torch.zeros(frames, dtype=torch.float64)
    for i in range(clips):
        video = ds[i]["video"][None]  # [1, 3, T, H, W]
        recon = roundtrip(video).float()
        fg = (video.amax(dim=1, keepdim=True) > FOREGROUND_LEVEL).float()  # [1, 1, T, H, W]
        err = ((recon - video).square() * fg).sum(dim=(0, 1, 3, 4))  # [T]
        total += (err / (video.shape[1] * fg.sum(dim=(0, 1, 3, 4)).clamp_min(1))).double()
    per_frame = total / clips
    groups = [per_frame[:1]] + [per_frame[t:t + stride] for t in range(1, frames, stride)]
    return [round(float(g.mean()), 4) for g in groups]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model name or folder, VAE folder or run directory (its newest VAE)")
    source.add_argument("--run", type=Path, help="training run folder (its vae stage's newest checkpoint)")
    parser.add_argument("--frames", type=int, default=33, help="frames per clip: 1 + 4k")
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.clips <= 0:
        parser.error(f"--clips must be positive, got {args.clips}")
    torch.set_num_threads(args.threads)
    roundtrip, stride = model_roundtrip(args.model) if args.model else run_roundtrip(args.run)
    if args.frames < 1 or (args.frames - 1) % stride:
        parser.error(f"--frames must be 1 + {stride}k for this VAE, got {args.frames}")
    errors = per_latent_frame_error(roundtrip, stride, args.frames, args.clips)
    result = {"source": str(args.model or args.run), "frames": args.frames, "clips": args.clips,
              "error_per_latent_frame": errors}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"object-pixel MSE per latent frame ({args.clips} clips of {args.frames} frames; 2.0 = black):")
        print("  " + " ".join(f"{e:.3f}" for e in errors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
