"""Single-clip VAE decode and encode on CPU: oneDNN for batch-1 convs against PyTorch's dispatch.

    python benchmarks/vae_decode.py [--model shapes-tiny] [--latent-frames 9] [--repeats 5] [--json]
    python benchmarks/vae_decode.py --preset wan2.1 --height 64 --width 64 --latent-frames 3 --repeats 2

PyTorch sends a batch-1 3D convolution on CPU to its slow reference kernel when
``channels * frames * height`` is small (its size rule ignores the width), which is what a
streaming decoder or a single clip's encode runs into. ``CausalConv3d`` calls oneDNN itself for
those (``CausalConv3d.onednn_single_clip``); this script times both ways in one process,
alternating repeats, and checks that they agree. Prints median seconds per decode of
``--latent-frames`` latent frames (one at a time through ``StreamingDecoder``, as streaming
does) and per encode of the matching video, for each way, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from sf_sdk.config import VAE_PRESETS
from sf_sdk.generator import video_frames_for_latents
from sf_sdk.models.vae import CausalConv3d, WanVAE


def load_vae(args: argparse.Namespace) -> tuple[WanVAE, int, int]:
    """The VAE and its latent height and width."""
    if args.preset:
        # A published VAE's widths, random weights (they time like trained ones).
        cfg = VAE_PRESETS[args.preset]
        lh, lw = args.height // cfg.spatial_stride, args.width // cfg.spatial_stride
        return WanVAE(cfg).eval(), lh, lw
    from sf_sdk import StreamingGenerator

    gen = StreamingGenerator.from_pretrained(args.model, device="cpu")
    if gen.vae is None:
        raise SystemExit(f"model {args.model!r} has no VAE")
    return gen.vae.eval(), gen.streaming.latent_height, gen.streaming.latent_width


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-tiny", help="a model name or folder (its VAE)")
    ap.add_argument("--preset", choices=sorted(VAE_PRESETS), help="random weights at a VAE preset's widths instead")
    ap.add_argument("--height", type=int, default=64, help="video height for --preset")
    ap.add_argument("--width", type=int, default=64, help="video width for --preset")
    ap.add_argument("--latent-frames", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    if args.latent_frames < 1 or args.repeats < 1:
        ap.error("--latent-frames and --repeats must be at least 1")
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch build has no oneDNN (mkldnn): nothing to compare")
    torch.set_num_threads(args.threads)
    vae, lh, lw = load_vae(args)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, vae.config.z_dim, args.latent_frames, lh, lw, generator=gen)
    num_frames = video_frames_for_latents(args.latent_frames, vae.config.temporal_stride)
    video = torch.rand(1, 3, num_frames, lh * vae.config.spatial_stride, lw * vae.config.spatial_stride,
                       generator=gen) * 2 - 1

    def decode() -> torch.Tensor:
        dec = vae.streaming_decoder()
        return torch.cat([dec.decode(z[:, :, i:i + 1]) for i in range(z.shape[2])], dim=2)

    times: dict[str, dict[str, list[float]]] = {way: {"decode": [], "encode": []} for way in ("dispatch", "onednn")}
    outputs: dict[str, dict[str, torch.Tensor]] = {"dispatch": {}, "onednn": {}}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # the first round warms up
            for way in ("dispatch", "onednn"):
                CausalConv3d.onednn_single_clip = way == "onednn"
                for what, fn in (("decode", decode), ("encode", lambda: vae.encode(video))):
                    sec, out = timed(fn)
                    if rep:
                        times[way][what].append(sec)
                    outputs[way][what] = out
    CausalConv3d.onednn_single_clip = True
    result = {
        "model": args.preset or args.model, "latent_frames": args.latent_frames, "video_frames": num_frames,
        "latent_hw": [lh, lw], "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    for what in ("decode", "encode"):
        med = {way: statistics.median(times[way][what]) for way in times}
        diff = (outputs["dispatch"][what] - outputs["onednn"][what]).abs().max().item()
        result[what] = {"dispatch_s": med["dispatch"], "onednn_s": med["onednn"],
                        "speedup": med["dispatch"] / med["onednn"], "max_abs_diff": diff}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']}: {args.latent_frames} latent frames = {num_frames} video frames at "
          f"{lh * vae.config.spatial_stride}x{lw * vae.config.spatial_stride}, batch 1, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"{'':8} {'dispatch s':>11} {'oneDNN s':>10} {'speed-up':>9} {'max |diff|':>11}")
    for what in ("decode", "encode"):
        r = result[what]
        print(f"{what:8} {r['dispatch_s']:11.3f} {r['onednn_s']:10.3f} {r['speedup']:8.1f}x {r['max_abs_diff']:11.1e}")


if __name__ == "__main__":
    main()
