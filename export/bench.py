"""Per-chunk latency of the DiT on each backend, as ratios to eager measured in one run.

    python -m export.bench --model mid --random-init --backends eager,compile,aoti,onnxruntime
                           [--latent-hw H W] [--window N] [--chunks 8] [--warmup 2] [--out bench.json]

What a figure includes: one chunk of the stream = the few-step denoising (4 DiT calls) plus the
cache pass (1 call), through :func:`sf_sdk.sampling.denoise_chunk`, with the rolling window
evicting; it excludes the text encoder and the VAE decode. Backends run round-robin chunk by
chunk over the same stream (same noise), so a change in machine load hits all of them alike.
Export / compile time is measured apart (``setup_s``) and the first ``--warmup`` chunks are not
timed. Medians and 90th percentiles are reported, with the device, versions and configs, as JSON.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from export.cli import run_command_main, write_json
from export.manifest import versions
from export.settings import (
    AOTISettings,
    ExportModel,
    ExportSettings,
    ONNXSettings,
    attention_backend,
    load_export_model,
)
from sf_sdk.config import to_dict
from sf_sdk.exit_codes import CommandParser, UserError, check_output_folder
from sf_sdk.sampling import ChunkModel, ChunkSchedule, denoise_chunk
from sf_sdk.stats import percentile

__all__ = ["main", "build_chunk_model", "BENCH_BACKENDS"]

log = logging.getLogger(__name__)

BENCH_BACKENDS = ("eager", "compile", "aoti", "onnxruntime")


def build_chunk_model(name: str, model: ExportModel, work: Path, settings: ExportSettings) -> ChunkModel:
    """The chunk model of backend ``name`` for ``model`` (exporting into ``work`` when needed)."""
    if name == "eager":
        return model.dit
    if name == "compile":
        from export.compile import CompileSettings, compile_steps

        chunk, _ = compile_steps(model.dit, None, CompileSettings(attention=settings.attention))
        return chunk
    if name == "aoti":
        from export.aoti import export_aoti, load_aoti

        aoti = AOTISettings(batch_size=settings.batch_size, dtype=settings.dtype, include_vae=False)
        chunk, _ = load_aoti(export_aoti(model, work / "aoti", aoti), model.dit)
        return chunk
    if name == "onnxruntime":
        from export.onnx import export_onnx, load_onnxruntime

        onnx = ONNXSettings(batch_size=settings.batch_size, dtype=settings.dtype, include_vae=False)
        chunk, _ = load_onnxruntime(export_onnx(model, work / "onnx", onnx), model.dit)
        return chunk
    raise ValueError(f"unknown bench backend {name!r}; choose from {BENCH_BACKENDS}")


def run_bench(model: ExportModel, backends: Sequence[str], *, chunks: int, warmup: int, work: Path,
              seed: int = 0) -> dict[str, Any]:
    """Time every backend on the same stream; returns the JSON-ready report."""
    settings = ExportSettings(include_vae=False)
    dit, stream = model.dit, model.streaming
    shapes = model.chunk_shapes(settings)
    runners: dict[str, ChunkModel] = {}
    setup: dict[str, float] = {}
    for name in backends:
        t0 = time.perf_counter()
        runners[name] = build_chunk_model(name, model, work, settings)
        setup[name] = time.perf_counter() - t0
        log.info("%s ready in %.1f s", name, setup[name])
    steps = ChunkSchedule.from_config(stream)
    times: dict[str, list[float]] = {name: [] for name in backends}
    first_chunk: dict[str, float] = {}
    with torch.inference_mode(), attention_backend(settings.attention):
        emb = torch.randn(1, max(1, dit.config.text_len // 2), dit.config.text_dim,
                          generator=torch.Generator().manual_seed(seed))
        cross = dit.encode_context(emb.to(dit.dtype))
        caches = {name: dit.new_cache(stream, 1) for name in backends}
        gens = {name: torch.Generator().manual_seed(seed + 1) for name in backends}
        c = stream.num_frame_per_block
        for i in range(warmup + chunks):
            for name in backends:
                noise = torch.randn(shapes.latent_shape, generator=gens[name], dtype=shapes.dtype)
                t0 = time.perf_counter()
                denoise_chunk(runners[name], noise, cross, caches[name], i * c, steps, generator=gens[name])
                elapsed = time.perf_counter() - t0
                if i == 0:
                    first_chunk[name] = elapsed
                if i >= warmup:
                    times[name].append(elapsed)
    eager = statistics.median(times["eager"]) if "eager" in times else None
    results = {}
    for name in backends:
        med = statistics.median(times[name])
        results[name] = {"median_s": med, "p90_s": percentile(times[name], 90), "min_s": min(times[name]),
                         "setup_s": setup[name], "first_chunk_s": first_chunk[name],
                         "speedup_vs_eager": (eager / med) if eager else None, "samples": len(times[name])}
    return {
        "what": "DiT per chunk: 4 denoising calls + 1 cache pass (denoise_chunk); excludes text encoder and VAE; "
                "setup_s = export/compile/load time, first_chunk_s includes lazy compilation",
        "source": model.source,
        "dit": to_dict(dit.config),
        "streaming": to_dict(stream),
        "chunk_tokens": shapes.chunk_tokens,
        "cache_tokens": shapes.cache_capacity,
        "chunks_timed": chunks,
        "warmup_chunks": warmup,
        "device": {"type": "cpu", "processor": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": versions(),
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandParser(prog="python -m export.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mid", help="preset (with --random-init) or model folder")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--backends", default=",".join(BENCH_BACKENDS))
    p.add_argument("--latent-hw", nargs=2, type=int, metavar=("H", "W"))
    p.add_argument("--window", type=int)
    p.add_argument("--chunks", type=int, default=8, help="timed chunks per backend")
    p.add_argument("--warmup", type=int, default=2, help="untimed chunks first")
    p.add_argument("--work", type=Path, help="folder for exported artifacts (default: a temp folder)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    return run_command_main(p.prog, lambda: _bench(args), verbose=args.verbose)


def _bench(args: argparse.Namespace) -> int:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if unknown or not backends:
        raise UserError(f"--backends must be among {list(BENCH_BACKENDS)}, got {unknown or args.backends!r}")
    if args.chunks <= 0 or args.warmup < 0:
        raise UserError(f"--chunks must be > 0 and --warmup >= 0, got {args.chunks} and {args.warmup}")
    if args.work is not None:
        check_output_folder(args.work, "--work")
    if args.out is not None and args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder: give the JSON file to write")
    model = load_export_model(args.model, random_init=args.random_init, latent_hw=args.latent_hw,
                              window=args.window, include_vae=False)
    with tempfile.TemporaryDirectory(prefix="sf-bench-") as tmp:
        report = run_bench(model, backends, chunks=args.chunks, warmup=args.warmup, work=args.work or Path(tmp))
    for name, r in report["results"].items():
        log.info("%-12s median %.4f s/chunk  p90 %.4f  x%.2f vs eager  (setup %.1f s)", name, r["median_s"],
                 r["p90_s"], r["speedup_vs_eager"] or float("nan"), r["setup_s"])
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
