"""The measurement behind ``dtype="auto"`` on the CPU: eager DiT chunks in float32 and bfloat16.

    PYTHONPATH=. python benchmarks/dtype_auto.py [--threads 1] [--rounds 2] [--json out.json]

For a ladder of 2-layer DiTs (dim 256 to 1024, latent 8x8 and 16x16) each dtype streams 12 latent
frames (4 chunks of 3, global cache, 4 steps + the cache pass, no decode) ``--rounds`` times;
a figure is the best round's mean CPU seconds per chunk over the chunks after the first two. The
``GFLOP per call`` column is :func:`sf_sdk.precision.dit_call_gflop`, the quantity the rule
thresholds (:data:`sf_sdk.precision.CPU_BF16_MIN_GFLOP`). Same random weights for both dtypes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from sf_sdk.config import DiTConfig, StreamingConfig
from sf_sdk.generator import StreamingGenerator
from sf_sdk.precision import CPU_BF16_MIN_GFLOP, cpu_has_amx_bf16, dit_call_gflop
from sf_sdk.results import video_frames_for_latents

LADDER = [(256, 1024, 4, 8), (256, 1024, 4, 16), (512, 2048, 8, 8), (512, 2048, 8, 16), (1024, 4096, 8, 16)]
LATENT_FRAMES = 12


def chunk_seconds(gen: StreamingGenerator, emb: torch.Tensor, rounds: int) -> float:
    best = float("inf")
    frames = video_frames_for_latents(LATENT_FRAMES, gen.temporal_stride)
    for _ in range(rounds):
        with gen.stream(prompt_embeds=emb, num_frames=frames, decode=False, seed=0) as s:
            marks = [time.process_time()]
            for _chunk in s:
                marks.append(time.process_time())
        steps = [b - a for a, b in zip(marks[2:], marks[3:])]  # chunks after the first two
        best = min(best, sum(steps) / len(steps))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"AMX bfloat16: {cpu_has_amx_bf16()}; rule threshold {CPU_BF16_MIN_GFLOP} GFLOP per call")
    print("| DiT (2 layers) | latent | GFLOP per call | float32 s/chunk | bfloat16 s/chunk | bfloat16 speed-up |")
    print("|---|---|---|---|---|---|")
    for dim, ffn, heads, lat in LADDER:
        cfg = DiTConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=2, text_len=32)
        stream = StreamingConfig(num_frame_per_block=3, latent_height=lat, latent_width=lat,
                                 global_cache_frames=LATENT_FRAMES, local_attn_size=-1)
        emb = torch.randn(16, cfg.text_dim, generator=torch.Generator().manual_seed(0))
        secs = {dt: chunk_seconds(StreamingGenerator.from_config(cfg, stream, seed=0, dtype=dt, backend="eager"),
                                  emb, args.rounds) for dt in ("float32", "bfloat16")}
        gflop = dit_call_gflop(cfg, stream)
        row = {"dim": dim, "ffn_dim": ffn, "heads": heads, "latent": lat, "gflop_per_call": gflop,
               "float32_s": secs["float32"], "bfloat16_s": secs["bfloat16"],
               "speedup": secs["float32"] / secs["bfloat16"]}
        rows.append(row)
        print(f"| dim {dim} | {lat}x{lat} | {gflop:.2f} | {secs['float32']:.3f} | {secs['bfloat16']:.3f} | "
              f"{row['speedup']:.2f}x |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "threads": args.threads, "amx_bf16": cpu_has_amx_bf16(),
                                         "torch": torch.__version__, "machine": platform.machine()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
