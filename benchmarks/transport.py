"""Frame transports for the live view: encode time, size and quality of real frames per encoding.

    python benchmarks/transport.py --json out.json
    python benchmarks/transport.py --model shapes-tiny --chunks 5 --repeats 5

Real frames: ``--chunks`` chunks streamed from the model (``local_attn_size`` 6, as sf-serve
runs it; generation is not timed), uint8 ``[T, H, W, 3]``. Then, on this process's CPU:

* Per-frame images (what sf-serve sends is JPEG quality 90, with the server's own encoder):
  JPEG quality 90 and 75, WebP lossy quality 90, WebP lossless, PNG (Pillow defaults otherwise).
  ``encode_ms_p50`` / ``_p95``: per frame, the median of ``--repeats`` encodes, then the median /
  p95 over frames. ``bytes_p50`` / ``bytes_mean`` per frame; ``kbit_s`` at the video's FPS for one
  client; ``core_share``: the fraction of one core that encoding one client's frames in real time
  takes (encode seconds per frame x FPS); ``psnr_db`` against the raw frame (decoded with Pillow;
  mean over frames; null and ``lossless`` true when every frame comes back exact). Latency it
  adds: none (a frame is shown as soon as it arrives; nothing is held back).
* Fragmented MP4 (``sf_sdk.video.Mp4Writer``, H.264 with its defaults: crf 18, preset veryfast,
  tune zerolatency, one ``moof`` + ``mdat`` per frame), written chunk by chunk as the stream
  produces them: ``encode_s_p50`` per ``write()`` of a whole chunk and ``bytes_per_chunk_p50``
  (file growth per write), chunks after the first; the first chunk apart (it opens the encoder
  and writes the init segment). ``readable_after_write``: frames a reader finds in the file after
  each write (the muxer holds the newest frame until the next one). Latency it adds, inherent to
  sending a chunk's fragments together: the chunk is appended as a whole, and its last frame only
  leaves the muxer with the next chunk, so a smooth player lags the live edge by at least one
  chunk (12 frames = 0.75 s at 16 FPS for shapes-tiny).
* Out of scope: decoding in the browser (JPEG via ``createImageBitmap``, MP4 via Media Source
  Extensions), transfer and WebSocket framing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling latency.py
from latency import _cpu_name  # noqa: E402

from sf_sdk.stats import percentile  # noqa: E402

PROMPT = "a red circle moving right"
WINDOW = 6  # the rolling window sf-serve serves with (its default)
# name -> (Pillow format, save options). JPEG 90 is what sf-serve sends (timed with its own encoder).
IMAGE_CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "jpeg_q90": ("JPEG", {"quality": 90}),
    "jpeg_q75": ("JPEG", {"quality": 75}),
    "webp_q90": ("WEBP", {"quality": 90}),
    "webp_lossless": ("WEBP", {"lossless": True}),
    "png": ("PNG", {}),
}
DEFINITIONS = {
    "frames": "real frames from the model (streamed, not timed), uint8 [T, H, W, 3]",
    "encode_ms": "per frame: median of --repeats encodes; then p50 / p95 over frames (this process, one thread)",
    "bytes": "encoded bytes per frame: p50 and mean over frames; raw_bytes = H * W * 3",
    "kbit_s": "bytes_mean * 8 * fps / 1000: one client's stream at the video's frame rate",
    "core_share": "encode_ms_p50 / 1000 * fps: the fraction of one core that encoding one client in real time takes",
    "psnr_db": "PSNR (8-bit, all channels) of the decoded image against the raw frame, mean over frames; null "
               "(and lossless: true) when every frame decodes exactly",
    "mp4": "sf_sdk.video.Mp4Writer (H.264 crf 18, veryfast, zerolatency, one fragment per frame), one write() per "
           "chunk: encode_s and file growth per chunk (chunks after the first; the first apart: encoder open + init "
           "segment); readable_after_write = frames read_video finds after each write",
    "added_latency_s": "latency the transport itself adds before a frame can be shown: per-frame images 0 (each "
                       "frame is shown when it arrives); MP4 per chunk: chunk_frames / fps (the chunk is appended "
                       "whole and its last frame leaves the muxer with the next chunk, so a smooth player stays a "
                       "chunk behind)",
    "out_of_scope": "decode time in the browser (createImageBitmap / Media Source Extensions), transfer, WebSocket "
                    "framing",
}


def real_frames(model: str, chunks: int, seed: int) -> tuple[list[np.ndarray], int]:
    """``chunks`` chunks of uint8 frames [T, H, W, 3] from the model, and its FPS."""
    from sf_sdk import StreamingGenerator

    gen = StreamingGenerator.from_pretrained(model, streaming={"local_attn_size": WINDOW})
    out = []
    with gen.stream(PROMPT, seed=seed) as stream:
        for chunk in stream:
            out.append(np.asarray(chunk.frames))
            if len(out) == chunks:
                break
    return out, gen.fps


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def image_encoder(name: str):
    """bytes <- uint8 [H, W, 3] for one codec; JPEG 90 is sf-serve's own encoder."""
    from PIL import Image

    fmt, options = IMAGE_CODECS[name]
    if name == "jpeg_q90":
        from sf_sdk.serve.engine import encode_jpeg

        return lambda frame: encode_jpeg(frame, options["quality"])

    def encode(frame: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format=fmt, **options)
        return buf.getvalue()

    return encode


def measure_image(name: str, frames: np.ndarray, fps: int, repeats: int) -> dict[str, Any]:
    from PIL import Image

    encode = image_encoder(name)
    times, sizes, quality = [], [], []
    for frame in frames:
        per = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            data = encode(frame)
            per.append(time.perf_counter() - t0)
        times.append(statistics.median(per))
        sizes.append(len(data))
        quality.append(psnr(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), frame))
    enc_p50 = percentile(times, 50)
    mean_bytes = statistics.fmean(sizes)
    finite = [q for q in quality if math.isfinite(q)]  # identical frames: inf
    return {"format": IMAGE_CODECS[name][0], "options": IMAGE_CODECS[name][1], "frames": len(frames),
            "encode_ms_p50": round(enc_p50 * 1e3, 3), "encode_ms_p95": round(percentile(times, 95) * 1e3, 3),
            "bytes_p50": int(percentile(sizes, 50)), "bytes_mean": round(mean_bytes, 1),
            "kbit_s": round(mean_bytes * 8 * fps / 1e3, 1), "core_share": round(enc_p50 * fps, 4),
            "lossless": not finite, "psnr_db": round(statistics.fmean(finite), 2) if finite else None,
            "added_latency_s": 0.0}


def measure_mp4(chunks: list[np.ndarray], fps: int, tmp: Path) -> dict[str, Any]:
    from sf_sdk.video import Mp4Writer, read_video

    path = tmp / "stream.mp4"
    writer = Mp4Writer(path, fps=fps)
    encode_s, growth, readable = [], [], []
    size = 0
    try:
        for chunk in chunks:
            t0 = time.perf_counter()
            writer.write(chunk)
            encode_s.append(time.perf_counter() - t0)
            # The growing file is the writer's .part, renamed to path at close().
            new = writer.temp_path.stat().st_size
            growth.append(new - size)
            size = new
            readable.append(len(read_video(writer.temp_path, allow_truncated=True)))  # not timed
    finally:
        writer.close()
    decoded = read_video(path)
    raw = np.concatenate(chunks)
    chunk_frames = chunks[-1].shape[0]
    rest_s, rest_b = encode_s[1:] or encode_s, growth[1:] or growth
    bytes_chunk = percentile(rest_b, 50)
    return {"codec": "h264 (libx264)", "writer": {"crf": writer.crf, "preset": writer.preset, "tune": "zerolatency",
                                                   "keyframe_interval": writer.keyframe_interval},
            "chunks": len(chunks), "chunk_frames": chunk_frames, "frames_written": writer.frames_written,
            "encode_s_p50": round(percentile(rest_s, 50), 4), "encode_ms_per_frame": round(
                percentile(rest_s, 50) / chunk_frames * 1e3, 3),
            "bytes_per_chunk_p50": int(bytes_chunk), "bytes_per_frame": round(bytes_chunk / chunk_frames, 1),
            "first_chunk": {"frames": int(chunks[0].shape[0]), "encode_s": round(encode_s[0], 4),
                            "bytes": growth[0]},
            "file_bytes": path.stat().st_size,
            "readable_after_write": readable,
            "written_after_write": np.cumsum([c.shape[0] for c in chunks]).tolist(),
            "kbit_s": round(bytes_chunk / chunk_frames * 8 * fps / 1e3, 1),
            "core_share": round(percentile(rest_s, 50) / chunk_frames * fps, 4),
            "psnr_db": round(psnr(decoded[: len(raw)], raw), 2) if decoded.shape[1:] == raw.shape[1:] else None,
            "added_latency_s": chunk_frames / fps}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("sf-sdk", "torch", "numpy", "pillow", "av"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    from PIL import features

    out["libjpeg"] = features.version("jpg")
    out["libwebp"] = features.version("webp")
    out["zlib"] = features.version("zlib")
    return out


def _db(x: float | None) -> str:
    return "exact" if x is None else f"{x:.2f}"


def report(data: dict[str, Any]) -> str:
    c = data["config"]
    lines = [f"frame transports: {c['model']} {c['frame_size'][0]}x{c['frame_size'][1]} @ {c['fps']} FPS, "
             f"{c['frames']} frames ({c['chunks']} chunks), raw {c['raw_bytes']} B/frame",
             f"{'encoding':<16}{'enc ms p50':>11}{'enc ms p95':>11}{'B/frame':>9}{'kbit/s':>9}{'core %':>8}"
             f"{'PSNR dB':>9}{'+latency s':>11}"]
    for name, r in data["images"].items():
        lines.append(f"{name:<16}{r['encode_ms_p50']:>11.3f}{r['encode_ms_p95']:>11.3f}{r['bytes_p50']:>9}"
                     f"{r['kbit_s']:>9.1f}{r['core_share'] * 100:>8.2f}{_db(r['psnr_db']):>9}"
                     f"{r['added_latency_s']:>11.2f}")
    m = data["mp4"]
    lines.append(f"{'mp4 h264/chunk':<16}{m['encode_ms_per_frame']:>11.3f}{'-':>11}{m['bytes_per_frame']:>9.0f}"
                 f"{m['kbit_s']:>9.1f}{m['core_share'] * 100:>8.2f}{_db(m['psnr_db']):>9}"
                 f"{m['added_latency_s']:>11.2f}")
    lines.append(f"mp4 per chunk of {m['chunk_frames']}: encode {m['encode_s_p50'] * 1e3:.1f} ms, "
                 f"{m['bytes_per_chunk_p50']} B (first chunk of {m['first_chunk']['frames']}: "
                 f"{m['first_chunk']['encode_s'] * 1e3:.1f} ms, {m['first_chunk']['bytes']} B with the init "
                 f"segment); "
                 f"frames readable after each write {m['readable_after_write']} of {m['written_after_write']}")
    lines.append("mp4 row: ms and bytes per frame = per chunk / frames per chunk. Browser decode time: out of scope.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-tiny", help="model the frames come from (shapes-tiny)")
    p.add_argument("--chunks", type=int, default=5, help="chunks of real frames (5; at least 2)")
    p.add_argument("--repeats", type=int, default=5, help="encodes per frame and image codec (5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads for generating the frames (1; not timed)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.chunks < 2 or args.repeats < 1:
        raise SystemExit("--chunks must be >= 2 (the first chunk is reported apart) and --repeats >= 1")
    import torch

    torch.set_num_threads(args.threads)
    chunks, fps = real_frames(args.model, args.chunks, args.seed)
    frames = np.concatenate(chunks)  # [T, H, W, 3]
    images = {name: measure_image(name, frames, fps, args.repeats) for name in IMAGE_CODECS}
    with tempfile.TemporaryDirectory() as tmp:
        mp4 = measure_mp4(chunks, fps, Path(tmp))
    data = {
        "benchmark": "transport",
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions(),
        "config": {"model": args.model, "prompt": PROMPT, "seed": args.seed, "window": WINDOW, "chunks": args.chunks,
                   "chunk_sizes": [int(c.shape[0]) for c in chunks], "frames": int(frames.shape[0]),
                   "frame_size": list(frames.shape[1:3]), "raw_bytes": int(np.prod(frames.shape[1:])), "fps": fps,
                   "repeats": args.repeats},
        "definitions": DEFINITIONS,
        "images": images,
        "mp4": mp4,
    }
    sys.stdout.write(report(data) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
