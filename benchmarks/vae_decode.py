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

    python benchmarks/vae_decode.py --tiny [--model shapes-tiny] [--chunks 8] [--streams 8] [--onnx] [--json]

``--tiny``: the tiny streaming decoder (TAEHV, ``decoder="tiny"``) against the Wan decoder (as the
generator runs it, ``decode_latents_per_pass`` latent frames per pass, and one frame per pass, the
official decode), side by side in one run, on latents the model generates (8 prompts, ``--chunks`` chunks each): seconds per
chunk of one stream (the median over every chunk after each stream's first and over the repeats;
eager PyTorch in the generator's dtype (``--dtype``, default ``auto`` as ``sf-generate``: bfloat16
on a CPU with AMX where the DiT runs on AOTInductor), and with ``--onnx`` both decoders' decode steps
exported to ONNX in float32 and run on ONNX Runtime), seconds per chunk of ``--streams`` streams decoded in one batched pass (a pool's decode),
and the PSNR of the tiny decoder's frames against the Wan decoder's (uint8 frames, peak 255, over
all frames). Decode only: no DiT, no uint8 conversion in the times.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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


# Captions of the shapes domain ("a {colour} {shape} moving {direction}"), all three shapes.
PROMPTS = ("a red circle moving left", "a blue square moving up", "a green triangle moving right",
           "a yellow circle moving down", "a cyan square moving left", "a magenta triangle moving up",
           "a red square moving right", "a blue triangle moving down")


def _median_chunk_seconds(make, chunks: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """Decode one stream's chunks; (seconds of each chunk after the first, the frames)."""
    dec = make()
    out, secs = [], []
    for i, chunk in enumerate(chunks):
        sec, frames = timed(lambda chunk=chunk: dec.decode(chunk))
        out.append(frames)
        if i:
            secs.append(sec)
    return secs, out


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] videos as uint8 frames (peak 255)."""
    def u8(x: torch.Tensor) -> torch.Tensor:
        return ((x.clamp(-1, 1) + 1) * 127.5).round()

    mse = (u8(a) - u8(b)).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _onnx_decoder(step_graphs, shapes, folder):
    """Export (first, later) decode steps to ONNX in ``folder``; a StepDecoder factory on ONNX Runtime."""
    from export.onnx import OrtDecodeStep, OrtStep, export_step_onnx
    from export.runtime import StepDecoder
    from export.settings import ONNXSettings

    runners = []
    for graph, first in zip(step_graphs, (True, False)):
        path = folder / f"{graph.name}.onnx"
        export_step_onnx(graph, path, ONNXSettings())
        runners.append(OrtDecodeStep(OrtStep(path, shapes.inputs(), shapes.outputs(first), device=torch.device("cpu"),
                                             threads=torch.get_num_threads()), shapes, first))
    return lambda: StepDecoder(shapes, runners[0], runners[1], device="cpu")


def tiny_main(args: argparse.Namespace) -> None:
    """Tiny decoder against the Wan decoder: seconds per chunk and PSNR (see the module docstring)."""
    import tempfile
    from pathlib import Path

    from sf_sdk import StreamingGenerator
    from sf_sdk.models.taehv import decode_tiny_streams
    from sf_sdk.models.vae import decode_streams

    torch.set_num_threads(args.threads)
    gen = StreamingGenerator.from_pretrained(args.model, decoder="tiny", dtype=args.dtype)
    vae, tiny = gen.vae.eval(), gen.tiny_decoder.eval()
    c = gen.streaming.num_frame_per_block
    frames = video_frames_for_latents(c * args.chunks, gen.temporal_stride)
    latents = [gen.generate(PROMPTS[i % len(PROMPTS)], num_frames=frames, seed=i, decode=False).latents
               for i in range(max(args.streams, 2))]  # each [F, z, h, w]
    streams = [[lat.transpose(0, 1)[None, :, j:j + c] for j in range(0, lat.shape[0], c)] for lat in latents]
    per_pass = gen.decode_latents_per_pass  # what the generator decodes with (a chunk per pass on the CPU)
    makers = {"wan": lambda: vae.streaming_decoder(latents_per_pass=per_pass), "tiny": tiny.streaming_decoder,
              "wan_frame_passes": vae.streaming_decoder}  # the official one latent frame per pass
    tmp = None
    if args.onnx:
        from export.settings import DecodeShapes, ExportModel, ExportSettings
        from export.steps import decode_step_graphs
        from export.tiny import tiny_decode_shapes, tiny_step_graphs

        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
        settings = ExportSettings()  # float32: what ONNX Runtime runs on the CPU (float32 copies of both decoders)
        vae32, tiny32 = copy.deepcopy(vae).float(), copy.deepcopy(tiny).float()
        wan_graphs = decode_step_graphs(ExportModel(dit=None, streaming=gen.streaming, vae=vae32), settings)
        makers["wan_onnxruntime"] = _onnx_decoder(wan_graphs, DecodeShapes.from_vae(vae32, gen.streaming), folder)
        makers["tiny_onnxruntime"] = _onnx_decoder(tiny_step_graphs(tiny32, gen.streaming),
                                                   tiny_decode_shapes(tiny32, gen.streaming), folder)
    onnx_streams = [[z.float() for z in chunks] for chunks in streams[:2]] if args.onnx else []
    batched = {"wan": decode_streams, "tiny": decode_tiny_streams}
    times: dict[str, list[float]] = {name: [] for name in makers}
    pool_times: dict[str, list[float]] = {name: [] for name in batched}
    decoded: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # the first round warms up
            for name, make in makers.items():
                for s, chunks in enumerate(onnx_streams if name.endswith("_onnxruntime") else streams[:2]):
                    secs, out = _median_chunk_seconds(make, chunks)
                    if rep:
                        times[name] += secs
                    if rep == 0 and s == 0 and name in ("wan", "tiny"):
                        decoded[name] = [torch.cat(out, dim=2)]
            for name, decode_many in batched.items():
                decs = [makers[name]() for _ in range(args.streams)]
                for j in range(args.chunks):
                    z = torch.cat([streams[s][j] for s in range(args.streams)])
                    sec, _ = timed(lambda f=decode_many, d=decs, z=z: f(d, z))
                    if rep and j:
                        pool_times[name].append(sec)
        for s in range(1, len(streams)):  # the PSNR over every generated stream
            for name in ("wan", "tiny"):
                decoded[name].append(makers[name]().decode(torch.cat(streams[s], dim=2)))
    if tmp is not None:
        tmp.cleanup()
    psnr = statistics.mean(_psnr(t, w) for t, w in zip(decoded["tiny"], decoded["wan"]))
    med = {name: statistics.median(v) for name, v in times.items()}
    pool_med = {name: statistics.median(v) for name, v in pool_times.items()}
    result = {
        "model": args.model, "dtype": str(gen.dtype).removeprefix("torch."),
        "onnxruntime_dtype": "float32" if args.onnx else None, "chunk_latent_frames": c, "chunk_video_frames": c * gen.temporal_stride,
        "latent_hw": [gen.streaming.latent_height, gen.streaming.latent_width], "chunks": args.chunks,
        "streams": args.streams, "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "tiny_widths": list(tiny.config.widths),
        "params": {"wan_decoder": sum(p.numel() for p in (*vae.decoder.parameters(), *vae.conv2.parameters())),
                   "tiny_decoder": sum(p.numel() for p in tiny.parameters())},
        "seconds_per_chunk": med, "pool_seconds_per_chunk": pool_med,
        "wan_latents_per_pass": per_pass,
        "speedup_tiny_vs_wan": med["wan"] / med["tiny"],
        "speedup_tiny_vs_wan_frame_passes": med["wan_frame_passes"] / med["tiny"],
        "pool_speedup_tiny_vs_wan": pool_med["wan"] / pool_med["tiny"],
        "psnr_tiny_vs_wan_db": psnr, "psnr_streams": len(streams),
    }
    if "tiny_onnxruntime" in med:
        result["speedup_tiny_onnxruntime_vs_wan_onnxruntime"] = med["wan_onnxruntime"] / med["tiny_onnxruntime"]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}: chunks of {c} latent frames = {result['chunk_video_frames']} video frames at "
          f"{gen.frame_size[0]}x{gen.frame_size[1]}, {result['dtype']} (ONNX Runtime: float32), {args.threads} "
          f"thread(s), median over {len(times['wan'])} chunks")
    print(f"{'decoder':18} {'s / chunk':>10} {'vs wan':>8}")
    for name, sec in med.items():
        print(f"{name:18} {sec:10.4f} {med['wan'] / sec:7.2f}x")
    for name, sec in pool_med.items():
        print(f"{name + ' x' + str(args.streams):18} {sec:10.4f} {pool_med['wan'] / sec:7.2f}x  (batched streams)")
    print(f"PSNR tiny vs wan frames: {psnr:.2f} dB over {len(streams)} generated streams")


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
    ap.add_argument("--tiny", action="store_true", help="the tiny decoder against the Wan decoder (see above)")
    ap.add_argument("--chunks", type=int, default=8, help="--tiny: chunks per stream")
    ap.add_argument("--streams", type=int, default=8, help="--tiny: streams of the batched (pool) decode")
    ap.add_argument("--onnx", action="store_true", help="--tiny: also both decoders' steps on ONNX Runtime (float32)")
    ap.add_argument("--dtype", default="auto", help="--tiny: the generator's dtype (auto: its default, as sf-generate)")
    args = ap.parse_args()
    if args.tiny:
        if args.chunks < 2 or args.streams < 1 or args.repeats < 1:
            ap.error("--tiny needs --chunks >= 2, --streams >= 1 and --repeats >= 1")
        tiny_main(args)
        return
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
