"""Does a long stream stay fast and bounded? Stream a tiny model for hundreds of chunks with a
rolling KV cache and compare late chunks with early ones.

    python benchmarks/scaling.py --json
    python benchmarks/scaling.py --model shapes-tiny --chunks 500 --window 6 --json

Figures (JSON with ``--json``):

* ``late_over_early``: median end-to-end chunk latency (DiT + VAE decode + frames to the host)
  of the last ``--span`` chunks over that of the first ``--span`` chunks after the warm-up.
  About 1 when the per-chunk cost does not grow with the stream's length (the cache is a fixed
  ring; positions grow but cost nothing).
* ``rss_growth_mb``: median resident memory over the last ``--span`` chunks minus that over the
  first ``--span`` (medians: the allocator's caches make single readings jump by a few MB), and
  ``cuda_growth_mb`` (allocated memory after the last chunk minus after the warm-up, CUDA).
  About 0 when nothing accumulates.
* ``dit_late_over_early``: the same ratio for the DiT alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling latency.py
from latency import device_info, rss_mb, versions  # noqa: E402

from sf_sdk.config import StreamingConfig, to_dict  # noqa: E402
from sf_sdk.generator import StreamingGenerator  # noqa: E402

log = logging.getLogger("benchmarks.scaling")

PROMPT_ROWS = 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/scaling.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model folder or bundled name (default: the tiny preset, random weights)")
    p.add_argument("--chunks", type=int, default=300, help="measured chunks (default 300)")
    p.add_argument("--warmup", type=int, default=10, help="chunks before the first measurement (default 10)")
    p.add_argument("--span", type=int, default=50, help="chunks in the early and late medians (default 50)")
    p.add_argument("--window", type=int, default=6, help="local_attn_size in latent frames (default 6)")
    p.add_argument("--sink", type=int, default=0, help="sink frames (default 0)")
    p.add_argument("--latent", type=int, nargs=2, default=(4, 4), metavar=("H", "W"),
                   help="latent height and width (default 4 4)")
    p.add_argument("--no-decode", action="store_true", help="DiT only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON only")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.chunks < 2 * args.span:
        raise SystemExit(f"--chunks ({args.chunks}) must be at least 2 * --span ({args.span})")
    over = {"local_attn_size": args.window, "sink_size": args.sink, "latent_height": args.latent[0],
            "latent_width": args.latent[1]}
    if args.model is not None:
        gen = StreamingGenerator.from_pretrained(args.model, device=args.device, streaming=over,
                                                 load_text_encoder=False)
        model = str(args.model)
    else:
        gen = StreamingGenerator.from_config("tiny", StreamingConfig(**over), vae=None if args.no_decode else "tiny",
                                             device=args.device, seed=args.seed)
        model = "preset tiny (random weights)"
    embeds = torch.randn(PROMPT_ROWS, gen.dit.config.text_dim, generator=torch.Generator().manual_seed(args.seed))
    cuda = gen.device.type == "cuda"
    e2e: list[float] = []
    dit: list[float] = []
    rss: list[float | None] = []
    baseline: dict[str, float | None] = {}

    def snapshot() -> None:
        gc.collect()
        baseline["rss"] = rss_mb()
        baseline["cuda"] = torch.cuda.memory_allocated(gen.device) / 2**20 if cuda else None

    if args.warmup == 0:
        snapshot()
    last = None
    with gen.stream(prompt_embeds=embeds, seed=args.seed, decode=not args.no_decode) as stream:
        while len(e2e) < args.chunks:
            t0 = time.perf_counter()
            chunk = next(stream)
            if chunk.index >= args.warmup:
                e2e.append(time.perf_counter() - t0)
                dit.append(chunk.timing.dit_s)
                rss.append(rss_mb())
            if chunk.index + 1 == args.warmup:
                snapshot()
            last = chunk
    gc.collect()
    rss_end = rss_mb()
    rss_after_warmup = baseline["rss"]
    span = args.span
    early, late = statistics.median(e2e[:span]), statistics.median(e2e[-span:])
    out = {
        "benchmark": "scaling",
        "device": device_info(gen.device),
        "versions": versions(),
        "config": {"model": model, "chunks": args.chunks, "warmup": args.warmup, "span": span,
                   "decode": not args.no_decode, "streaming": to_dict(gen.streaming),
                   "final_start_frame": last.start_frame if last is not None else None},
        "early_median_s": early,
        "late_median_s": late,
        "late_over_early": late / early,
        "dit_late_over_early": statistics.median(dit[-span:]) / statistics.median(dit[:span]),
        "rss_after_warmup_mb": rss_after_warmup,
        "rss_end_mb": rss_end,
        "rss_growth_mb": (statistics.median(rss[-span:]) - statistics.median(rss[:span])) if None not in rss
        else None,
        "cuda_growth_mb": (torch.cuda.memory_allocated(gen.device) / 2**20 - baseline["cuda"]) if cuda else None,
        "kv_cache_mb": gen._solo.cache.nbytes() / 2**20 if gen._solo is not None else None,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(args)
    if args.json:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        sys.stdout.write(f"{out['config']['model']}: {args.chunks} chunks after {args.warmup} warm-up, window "
                         f"{args.window}; end-to-end chunk median early {out['early_median_s'] * 1e3:.1f} ms, late "
                         f"{out['late_median_s'] * 1e3:.1f} ms (late/early {out['late_over_early']:.3f}); "
                         f"RSS growth {out['rss_growth_mb']:.1f} MB\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
