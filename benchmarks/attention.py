"""Cache attention side by side: the sf_sdk kernel against three PyTorch schemes, on one machine,
in one run, interleaved, with the machine's measured GEMM peak.

    python benchmarks/attention.py                  # human-readable table
    python benchmarks/attention.py --json           # JSON on stdout
    python benchmarks/attention.py --out bench.json --mid-latent 60x104   # full 1560-token frames

Shapes (from sf_sdk.config): the "tiny" DiT (dim 96, 4 heads x 24, 24 tokens per latent frame)
and the "mid" DiT (dim 1536, 12 heads x 128). Streaming: a 6-frame window (the cache holds 6
frames, the chunk's own 3 included: the steady state after the first chunk) and 3-frame chunks.
The mid preset defaults to 30x52 latent frames (390 tokens, a quarter of Wan's 1560) so that the
run stays short on 2 CPU cores; the output says which was used. Batch 1.

Every method computes the same attention of one denoising call: the chunk's keys/values enter
the cache, then the chunk's queries attend over the whole window. What each timing includes:

* ``kernel``: ``ops.cache_write`` of the chunk into its ring slots + ``ops.cache_attention`` on
  the buffer in place (``sf_sdk::`` ops, compiled kernels).
* ``inplace_sdpa``: ``index_copy_`` of the chunk into its slots + SDPA on the sliced cache view
  (``sf_sdk.attention.reference_cache_attention``; the reference backend).
* ``concat_sdpa``: ``torch.cat`` of the cached frames and the chunk, then SDPA (copies the cache).
* ``shift_sdpa``: the official scheme on an eviction call: shift the cached frames left by one
  chunk (a copy), write the chunk at the end, SDPA on the window.
Rounds run every method once, in rotating order, plus a float32 GEMM (``torch.matmul`` of two
N x N matrices) whose median gives the peak the attention figures are a fraction of. Attention
FLOPs are 4 * B * H * Lq * kv_len * D (QK^T and PV). Times are wall-clock medians and p90 over
the rounds, after warm-up rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling latency.py
from latency import device_info, versions  # noqa: E402

from sf_sdk import ops  # noqa: E402
from sf_sdk.attention import reference_cache_attention  # noqa: E402
from sf_sdk.config import DIT_PRESETS, StreamingConfig  # noqa: E402
from sf_sdk.stats import percentile  # noqa: E402

log = logging.getLogger("benchmarks.attention")

WINDOW_FRAMES = 6  # cache window in latent frames, the chunk included
CHUNK_FRAMES = 3
PRESET_LATENT = {"tiny": (8, 12), "mid": (30, 52)}  # latent (height, width) per DiT preset
WAN_LATENT = (60, 104)  # 480x832 video
METHODS = ("kernel", "inplace_sdpa", "concat_sdpa", "shift_sdpa")
BASELINES = ("inplace_sdpa", "concat_sdpa", "shift_sdpa")


@dataclass(frozen=True)
class Shape:
    """One benchmarked call: batch, heads, head dim, chunk queries and the window's keys."""

    preset: str
    batch: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    q_len: int
    kv_len: int
    capacity: int

    @property
    def flop(self) -> float:
        return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim


def make_shape(preset: str, latent_hw: tuple[int, int], batch: int) -> Shape:
    dit = DIT_PRESETS[preset]
    stream = StreamingConfig(num_frame_per_block=CHUNK_FRAMES, local_attn_size=WINDOW_FRAMES,
                             latent_height=latent_hw[0], latent_width=latent_hw[1])
    _, ph, pw = dit.patch_size
    if stream.latent_height % ph or stream.latent_width % pw:
        raise ValueError(f"latent {latent_hw} is not divisible by the patch {dit.patch_size[1:]}")
    tokens = (stream.latent_height // ph) * (stream.latent_width // pw)
    capacity = stream.local_attn_size * tokens
    return Shape(preset=preset, batch=batch, heads=dit.num_heads, head_dim=dit.head_dim, tokens_per_frame=tokens,
                 q_len=stream.num_frame_per_block * tokens, kv_len=capacity, capacity=capacity)


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


def make_methods(shape: Shape, dtype: torch.dtype, seed: int) -> tuple[dict[str, Callable[[], torch.Tensor]],
                                                                      Callable[[], None]]:
    """The four methods over one shared input, and a function that resets their caches."""
    gen = torch.Generator().manual_seed(seed)
    b, h, d, cap, lq = shape.batch, shape.heads, shape.head_dim, shape.capacity, shape.q_len

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(dtype)

    q = rand(b, lq, h, d)  # [B, Lq, H, D]
    k_chunk, v_chunk = rand(b, lq, h, d), rand(b, lq, h, d)  # [B, Lq, H, D]
    k_past, v_past = rand(b, cap - lq, h, d), rand(b, cap - lq, h, d)  # [B, cap - Lq, H, D]
    # Ring caches: the past frames fill every slot but the chunk's; the chunk's slots wrap around
    # the end of the ring (its first frame is the ring's last slot), as in a long stream.
    t = shape.tokens_per_frame
    chunk_slots = torch.cat([torch.arange(cap - t, cap), torch.arange(0, lq - t)])  # [Lq]
    past_slots = torch.arange(lq - t, cap - t)  # [cap - Lq]
    k_ring, v_ring = torch.empty(b, cap, h, d, dtype=dtype), torch.empty(b, cap, h, d, dtype=dtype)
    k_ref, v_ref = torch.empty_like(k_ring), torch.empty_like(v_ring)
    # The official cache: frames in time order, the oldest first; the last chunk's slots are
    # refilled by the shift (they hold the evicted chunk's predecessor here).
    k_lin, v_lin = torch.empty_like(k_ring), torch.empty_like(v_ring)
    kv_len = torch.tensor(shape.kv_len, dtype=torch.int64)

    def reset() -> None:
        for ring in (k_ring, k_ref):
            ring.index_copy_(1, past_slots, k_past)
        for ring in (v_ring, v_ref):
            ring.index_copy_(1, past_slots, v_past)
        k_lin[:, lq:], v_lin[:, lq:] = k_past[:, : cap - lq], v_past[:, : cap - lq]
        k_lin[:, :lq], v_lin[:, :lq] = k_past[:, :lq], v_past[:, :lq]

    def kernel() -> torch.Tensor:
        ops.cache_write(k_ring, v_ring, k_chunk, v_chunk, chunk_slots)
        return ops.cache_attention(q, k_ring, v_ring, kv_len)

    def inplace_sdpa() -> torch.Tensor:
        k_ref.index_copy_(1, chunk_slots, k_chunk)
        v_ref.index_copy_(1, chunk_slots, v_chunk)
        return reference_cache_attention(q, k_ref, v_ref, shape.kv_len)

    def concat_sdpa() -> torch.Tensor:
        keys = torch.cat([k_past, k_chunk], dim=1)  # [B, cap, H, D]
        values = torch.cat([v_past, v_chunk], dim=1)  # [B, cap, H, D]
        return reference_cache_attention(q, keys, values, shape.kv_len)

    def shift_sdpa() -> torch.Tensor:
        # Evict the oldest chunk: shift the rest left (overlapping ranges: copy through a clone).
        k_lin[:, : cap - lq] = k_lin[:, lq:].clone()
        v_lin[:, : cap - lq] = v_lin[:, lq:].clone()
        k_lin[:, cap - lq:] = k_chunk
        v_lin[:, cap - lq:] = v_chunk
        return reference_cache_attention(q, k_lin, v_lin, shape.kv_len)

    return {"kernel": kernel, "inplace_sdpa": inplace_sdpa, "concat_sdpa": concat_sdpa,
            "shift_sdpa": shift_sdpa}, reset


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def summarize(times: list[float], flop: float, peak_gflops: float | None) -> dict[str, float | None]:
    median = statistics.median(times)
    gflops = flop / median / 1e9
    return {"median_ms": median * 1e3, "p90_ms": percentile(times, 90) * 1e3, "gflops": gflops,
            "fraction_of_peak": gflops / peak_gflops if peak_gflops else None}


def run_rounds(fns: dict[str, Callable[[], Any]], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Times every function once per round, in rotating order; returns wall times per name."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def check_agreement(methods: dict[str, Callable[[], torch.Tensor]], reset: Callable[[], None],
                    dtype: torch.dtype) -> float:
    """Runs every method once from a fresh cache; returns the largest difference to inplace_sdpa."""
    reset()
    outs = {name: fn().float() for name, fn in methods.items()}
    ref = outs["inplace_sdpa"]
    worst = max((out - ref).abs().max().item() for out in outs.values())
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    if worst > tol:
        raise RuntimeError(f"methods disagree by {worst:.3g} (> {tol}); the benchmark would compare different "
                           "computations")
    return worst


def bench_case(shape: Shape, dtype: torch.dtype, args: argparse.Namespace, gemm: Callable[[], Any],
               gemm_flop: float) -> dict[str, Any]:
    methods, reset = make_methods(shape, dtype, args.seed)
    max_diff = check_agreement(methods, reset, dtype)
    reset()
    times = run_rounds({**methods, "gemm": gemm}, args.warmup, args.rounds)
    peak = summarize(times.pop("gemm"), gemm_flop, None)["gflops"]
    results = {name: summarize(times[name], shape.flop, peak) for name in METHODS}
    kernel_ms = results["kernel"]["median_ms"]
    return {
        "preset": shape.preset,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": asdict(shape),
        "gflop_per_call": shape.flop / 1e9,
        "max_abs_diff_vs_inplace_sdpa": max_diff,
        "gemm_peak_gflops": peak,
        "methods": results,
        "speedup_of_kernel": {name: results[name]["median_ms"] / kernel_ms for name in BASELINES},
    }


# --------------------------------------------------------------------------------------------
# Report and CLI
# --------------------------------------------------------------------------------------------


def report(data: dict[str, Any]) -> str:
    lines = [f"device: {data['device']}", f"threads: {torch.get_num_threads()}  kernels: {data['kernels']}"]
    lines += [f"note: {note}" for note in data["notes"]]
    for case in data["cases"]:
        s = case["shape"]
        lines.append("")
        lines.append(f"{case['preset']} {case['dtype']}: B={s['batch']} H={s['heads']} D={s['head_dim']} "
                     f"Lq={s['q_len']} kv_len={s['kv_len']} ({s['tokens_per_frame']} tokens/frame), "
                     f"{case['gflop_per_call']:.3f} GFLOP/call, GEMM peak {case['gemm_peak_gflops']:.1f} GFLOP/s")
        lines.append(f"  {'method':14s} {'median ms':>10s} {'p90 ms':>10s} {'GFLOP/s':>9s} {'of peak':>8s} "
                     f"{'kernel speedup':>15s}")
        for name, r in case["methods"].items():
            speedup = case["speedup_of_kernel"].get(name)
            lines.append(f"  {name:14s} {r['median_ms']:10.3f} {r['p90_ms']:10.3f} {r['gflops']:9.1f} "
                         f"{r['fraction_of_peak']:8.1%} {f'{speedup:.2f}x' if speedup else '':>15s}")
    return "\n".join(lines)


def parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH latent size, got {text!r}") from exc
    return h, w


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--presets", default="tiny,mid", help="comma-separated DiT presets (tiny, mid)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--mid-latent", type=parse_hw, default=PRESET_LATENT["mid"],
                        help="latent HxW of the mid preset (default 30x52 = 390 tokens; Wan is 60x104)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up rounds")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds")
    parser.add_argument("--tiny-rounds", type=int, default=200, help="timed rounds of the tiny preset")
    parser.add_argument("--gemm-size", type=int, default=1536, help="N of the N x N float32 GEMM")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kernels = ops.build(("cpu",))
    if kernels["cpu"] is None:
        log.error("the CPU kernels are unavailable: the 'kernel' column would time the reference")
        return 1

    n = args.gemm_size
    a, b = torch.randn(n, n), torch.randn(n, n)
    notes = []
    cases = []
    for preset in args.presets.split(","):
        latent = args.mid_latent if preset == "mid" else PRESET_LATENT[preset]
        shape = make_shape(preset, latent, args.batch)
        if preset == "mid" and latent != WAN_LATENT:
            notes.append(f"mid preset at {latent[0]}x{latent[1]} latent frames ({shape.tokens_per_frame} tokens per "
                         f"frame) instead of Wan's {WAN_LATENT[0]}x{WAN_LATENT[1]} (1560) to keep the run short; "
                         "pass --mid-latent 60x104 for the full size")
        for dtype_name in args.dtypes.split(","):
            run_args = argparse.Namespace(**vars(args))
            if preset == "tiny":
                run_args.rounds = args.tiny_rounds
                run_args.warmup = max(args.warmup, 10)
            log.info("benchmarking %s %s", preset, dtype_name)
            cases.append(bench_case(shape, getattr(torch, dtype_name), run_args, lambda: torch.matmul(a, b),
                                    2.0 * n**3))

    data = {
        "benchmark": "cache_attention",
        "device": device_info(torch.device("cpu")),
        "versions": versions(),
        "kernels": kernels,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "window_frames": WINDOW_FRAMES,
        "chunk_frames": CHUNK_FRAMES,
        "definitions": {name: line.split(": ", 1)[1] for name, line in zip(METHODS, [
            "kernel: ops.cache_write into the ring slots + ops.cache_attention in place",
            "inplace_sdpa: index_copy_ into the slots + SDPA on the sliced cache view",
            "concat_sdpa: torch.cat(cached frames, chunk) + SDPA",
            "shift_sdpa: official eviction call: shift-left copy + write at the end + SDPA",
        ])},
        "notes": notes,
        "cases": cases,
    }
    if args.out:
        args.out.write_text(json.dumps(data, indent=2))
    sys.stdout.write((json.dumps(data, indent=2) if args.json else report(data)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
