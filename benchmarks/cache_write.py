"""The fused rotary cache write against PyTorch, side by side, on one machine, in one run.

    python benchmarks/cache_write.py                 # human-readable table
    python benchmarks/cache_write.py --json          # JSON on stdout
    python benchmarks/cache_write.py --threads 1 --out cache_write.json

Both methods do the same thing: one chunk's keys are rotated (Wan's complex-pair rotary, tables
[n, D/2]) and written, with the chunk's values, into its token slots of preallocated
[B, capacity, H, D] caches. What each timing includes:

* ``pytorch``: ``k_rot = apply_rotary(k, cos, sin)`` (``sf_sdk.models.dit``), then
  ``k_cache.index_copy_(1, slots, k_rot)`` and ``v_cache.index_copy_(1, slots, v)``.
* ``kernel``: ``torch.ops.sf_sdk.cache_write_rope(k_cache, v_cache, k, v, slots, cos, sin)`` with
  the compiled CPU kernel loaded (``csrc/cpu/cache_write.cpp``; the op's dispatch included).

Cases (float32 by default, 3-frame chunks):

* ``tiny``: B=1, n = 3 x 16 tokens, H=4, D=64, a 6-frame ring (capacity 96 tokens);
* ``wan-1.3b``: the Wan2.1-T2V-1.3B DiT at 480x832 (60x104 latents, 1560 tokens per frame),
  B=1, n = 3 x 1560, H=12, D=128, the global cache of 21 frames (capacity 32760 tokens);
* ``tiny-b8``: ``tiny`` with a batch of 8 streams.

Ring writes wrap around the end of the ring (the chunk's first frame in the ring's last slot), as
in a long stream; the Wan chunk fills the last 3 frames of its global cache. Before timing, both
methods write from the same inputs and their cache contents are compared. Rounds run the two
methods once each, in alternating order; times are wall-clock medians and p90 over the rounds,
after warm-up rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling latency.py
from attention import run_rounds  # noqa: E402  (the attention benchmark's timing loop)
from latency import device_info, versions  # noqa: E402

from sf_sdk import ops  # noqa: E402
from sf_sdk.config import DIT_PRESETS, StreamingConfig  # noqa: E402
from sf_sdk.models.dit import apply_rotary  # noqa: E402
from sf_sdk.stats import percentile  # noqa: E402

log = logging.getLogger("benchmarks.cache_write")

METHODS = ("pytorch", "kernel")


@dataclass(frozen=True)
class Case:
    """One benchmarked write: a chunk of ``chunk_frames`` frames into a cache of ``cache_frames``."""

    name: str
    batch: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    chunk_frames: int
    cache_frames: int
    first_frame_slot: int  # the cache frame the chunk's first frame goes to (wrapping around)

    @property
    def tokens(self) -> int:
        return self.chunk_frames * self.tokens_per_frame

    @property
    def capacity(self) -> int:
        return self.cache_frames * self.tokens_per_frame

    def bytes_moved(self, dtype: torch.dtype) -> int:
        """Bytes of k and v read plus their cache slots written (the rotary tables left out)."""
        return 4 * self.batch * self.tokens * self.heads * self.head_dim * dtype.itemsize


def wan_case() -> Case:
    """The Wan2.1-T2V-1.3B DiT under the Self-Forcing streaming defaults (480x832, global cache)."""
    dit, stream = DIT_PRESETS["wan2.1-t2v-1.3b"], StreamingConfig()
    _, ph, pw = dit.patch_size
    tokens = (stream.latent_height // ph) * (stream.latent_width // pw)  # 1560
    chunk = stream.num_frame_per_block
    return Case("wan-1.3b", batch=1, heads=dit.num_heads, head_dim=dit.head_dim, tokens_per_frame=tokens,
                chunk_frames=chunk, cache_frames=stream.global_cache_frames,
                first_frame_slot=stream.global_cache_frames - chunk)


TINY = Case("tiny", batch=1, heads=4, head_dim=64, tokens_per_frame=16, chunk_frames=3, cache_frames=6,
            first_frame_slot=5)
CASES: dict[str, Callable[[], Case]] = {
    "tiny": lambda: TINY,
    "wan-1.3b": wan_case,
    "tiny-b8": lambda: Case(**{**asdict(TINY), "name": "tiny-b8", "batch": 8}),
}


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


def make_methods(case: Case, dtype: torch.dtype, seed: int
                 ) -> tuple[dict[str, Callable[[], None]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two methods over shared inputs and shared caches; also the caches and the slots."""
    gen = torch.Generator().manual_seed(seed)
    b, n, h, d, cap = case.batch, case.tokens, case.heads, case.head_dim, case.capacity
    k = torch.randn(b, n, h, d, generator=gen).to(dtype)  # [B, n, H, D]
    v = torch.randn(b, n, h, d, generator=gen).to(dtype)  # [B, n, H, D]
    angles = torch.rand(n, d // 2, generator=gen) * 2 * torch.pi  # [n, D/2]
    cos, sin = angles.cos(), angles.sin()  # [n, D/2] float32 each
    slots = (torch.arange(n) + case.first_frame_slot * case.tokens_per_frame) % cap  # [n] int64
    k_cache = torch.zeros(b, cap, h, d, dtype=dtype)  # [B, capacity, H, D]
    v_cache = torch.zeros_like(k_cache)

    def pytorch() -> None:
        k_rot = apply_rotary(k, cos, sin)  # [B, n, H, D]
        k_cache.index_copy_(1, slots, k_rot)
        v_cache.index_copy_(1, slots, v)

    def kernel() -> None:
        torch.ops.sf_sdk.cache_write_rope(k_cache, v_cache, k, v, slots, cos, sin)

    return {"pytorch": pytorch, "kernel": kernel}, k_cache, v_cache, slots


def check_agreement(methods: dict[str, Callable[[], None]], k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slots: torch.Tensor, dtype: torch.dtype) -> float:
    """Runs each method on cleared caches; returns the largest difference of the written slots."""
    written = {}
    for name, fn in methods.items():
        k_cache.zero_()
        v_cache.zero_()
        fn()
        written[name] = (k_cache.index_select(1, slots).float(), v_cache.index_select(1, slots).float())
    (k_ref, v_ref), (k_out, v_out) = written["pytorch"], written["kernel"]
    worst = max((k_out - k_ref).abs().max().item(), (v_out - v_ref).abs().max().item())
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    if worst > tol:
        raise RuntimeError(f"the methods disagree by {worst:.3g} (> {tol}); the benchmark would compare "
                           "different computations")
    return worst


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def bench_case(case: Case, dtype: torch.dtype, warmup: int, rounds: int, seed: int) -> dict[str, Any]:
    methods, k_cache, v_cache, slots = make_methods(case, dtype, seed)
    max_diff = check_agreement(methods, k_cache, v_cache, slots, dtype)
    times = run_rounds(methods, warmup, rounds)
    results = {}
    for name in METHODS:
        median = statistics.median(times[name])
        results[name] = {"median_us": median * 1e6, "p90_us": percentile(times[name], 90) * 1e6,
                         "gb_per_s": case.bytes_moved(dtype) / median / 1e9}
    return {
        "case": case.name,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {**asdict(case), "tokens": case.tokens, "capacity": case.capacity},
        "rounds": rounds,
        "max_abs_diff": max_diff,
        "methods": results,
        # > 1: the kernel is faster.
        "pytorch_over_kernel": results["pytorch"]["median_us"] / results["kernel"]["median_us"],
    }


# --------------------------------------------------------------------------------------------
# Report and CLI
# --------------------------------------------------------------------------------------------


def report(data: dict[str, Any]) -> str:
    lines = [f"device: {data['device']}", f"threads: {data['device']['threads']}  kernels: {data['kernels']}",
             "", f"{'case':10s} {'B':>2s} {'n':>5s} {'H':>3s} {'D':>4s} {'capacity':>8s} "
             f"{'pytorch us':>11s} {'kernel us':>10s} {'pytorch/kernel':>15s} {'p90 pt/k us':>17s}"]
    for c in data["cases"]:
        s, m = c["shape"], c["methods"]
        lines.append(f"{c['case']:10s} {s['batch']:2d} {s['tokens']:5d} {s['heads']:3d} {s['head_dim']:4d} "
                     f"{s['capacity']:8d} {m['pytorch']['median_us']:11.1f} {m['kernel']['median_us']:10.1f} "
                     f"{c['pytorch_over_kernel']:14.2f}x {m['pytorch']['p90_us']:8.1f}/{m['kernel']['p90_us']:.1f}")
    lines.append("pytorch/kernel > 1: the fused kernel is faster. Medians of each case's rounds.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated cases ({', '.join(CASES)})")
    parser.add_argument("--dtype", default="float32", help="dtype of k, v and the caches")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up rounds")
    parser.add_argument("--rounds", type=int, default=500, help="timed rounds of the tiny cases")
    parser.add_argument("--large-rounds", type=int, default=30, help="timed rounds of the wan-1.3b case")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        log.error("unknown cases %s; choose from %s", unknown, list(CASES))
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = ops.build(("cpu",))
    if kernels["cpu"] is None:
        log.error("the CPU kernels are unavailable: the 'kernel' column would time the reference; build them "
                  "with `python -m sf_sdk.ops build --device cpu`")
        return 1
    dtype = getattr(torch, args.dtype)
    cases = []
    for name in args.cases.split(","):
        case = CASES[name]()
        rounds = args.large_rounds if name == "wan-1.3b" else args.rounds
        log.info("benchmarking %s (%d rounds)", name, rounds)
        cases.append(bench_case(case, dtype, args.warmup, rounds, args.seed))
    data = {
        "benchmark": "cache_write_rope",
        "device": device_info(torch.device("cpu")),
        "versions": versions(),
        "kernels": kernels,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "definitions": {
            "pytorch": "apply_rotary(k, cos, sin), then index_copy_ of k_rot and v into the cache slots",
            "kernel": "torch.ops.sf_sdk.cache_write_rope with the compiled CPU kernel",
            "gb_per_s": "bytes of k and v read plus their cache slots written, over the median",
        },
        "cases": cases,
    }
    if args.out:
        args.out.write_text(json.dumps(data, indent=2))
    sys.stdout.write((json.dumps(data, indent=2) if args.json else report(data)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
