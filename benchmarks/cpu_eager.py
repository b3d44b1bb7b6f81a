"""The eager CPU path's measured choices, each against its alternative, side by side in one run.

    python benchmarks/cpu_eager.py --compare layout --config tiny --threads 1 --rounds 8 --json layout.json
    python benchmarks/cpu_eager.py --compare block-kernels --model shapes-tiny --threads 2
    python benchmarks/cpu_eager.py --compare layout --config mid --dtype bfloat16 --threads 2 --chunks 2 --rounds 3
    python benchmarks/cpu_eager.py --compare attention --config tiny --threads 2 --rounds 12
    python benchmarks/cpu_eager.py --compare block-step --model shapes-tiny --threads 2

``--compare layout``: every linear weight stored as its contiguous transpose (what
``StreamingGenerator`` does for CPU models, ``WanDiT.use_cpu_matmul_layout``) against the
standard row-major [out, in] layout (two generators with the same weights).
``--compare block-kernels``: the fused CPU kernels of the block's elementwise chains
(``sf_sdk.ops.block_kernels_available``: modulated layer norm, grouped RMS norm, GELU) against the
same chains in PyTorch ops (one generator; the choice switched between streams).
``--compare attention``: a stream's self-attention over the cache (one row: ``kv_len`` an int) by
SDPA on the sliced cache view (the ``"auto"`` rule's CPU choice, ``sf_sdk.ops.kernel_available``)
against the compiled ``sf_sdk::cache_attention`` kernel (two generators with the same weights,
each stream opened under :func:`sf_sdk.attention.default_backend` ``"reference"`` / ``"kernel"``).
``--compare block-step``: each DiT block's call as one op (``sf_sdk::dit_block_step``, the
``StepAttention.block_step`` rule) against the same block op by op (one generator; the rule
switched between streams; the two sides' latents are checked equal, ``latents_max_abs_diff``).

Each round streams one video on each side, alternating, so a change in machine load hits both
alike. What a figure includes: the DiT of one chunk (its denoising steps and the cache pass; no
text encoder, no decode), wall time per chunk, the median over every chunk after the first of
each stream, after one warm-up stream per side. ``--config`` takes the race's DiT configurations
(``benchmarks/race_official.py``: random weights, a global cache, chunks of 3 latent frames);
``--model`` a model folder or bundled name with its own streaming settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from race_official import CHUNK_FRAMES, CONFIGS, PROMPT_ROWS, ours_run  # noqa: E402

from sf_sdk import ops  # noqa: E402
from sf_sdk.attention import default_backend  # noqa: E402
from sf_sdk.config import StreamingConfig  # noqa: E402
from sf_sdk.generator import StreamingGenerator  # noqa: E402
from sf_sdk.models.dit import StepAttention  # noqa: E402
from sf_sdk.results import video_frames_for_latents  # noqa: E402

log = logging.getLogger("benchmarks.cpu_eager")


def standard_layout(gen: StreamingGenerator) -> StreamingGenerator:
    """Put every linear weight of the generator's DiT back in the row-major [out, in] layout (the
    fused q/k/v copy is remade on its next use: its key holds the weights' storage)."""
    with torch.no_grad():
        for module in gen.dit.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = module.weight.data.contiguous()
    return gen


def _layout_of(gen: StreamingGenerator) -> str:
    w = next(m.weight for m in gen.dit.modules() if isinstance(m, torch.nn.Linear))
    return "standard" if w.is_contiguous() else "transposed"


# The sides of each comparison: (baseline, the choice the generator makes).
SIDES = {"layout": ("standard", "transposed"), "block-kernels": ("torch ops", "fused kernels"),
         "attention": ("kernel", "sdpa"), "block-step": ("op by op", "one op")}
# The attention name each side's streams are opened under (--compare attention).
ATTENTION = {"kernel": "kernel", "sdpa": "reference"}


def _generators(args: argparse.Namespace) -> tuple[dict[str, StreamingGenerator], int, dict[str, Any]]:
    """(the generator of each side, latent frames per stream, what was run)."""
    if args.model:
        make = lambda: StreamingGenerator.from_pretrained(args.model, dtype=args.dtype, backend="eager",  # noqa: E731
                                                          load_text_encoder=False)
        what = {"model": args.model}
    else:
        rc = CONFIGS[args.config]
        h, w = rc.latent_hw
        stream = StreamingConfig(num_frame_per_block=CHUNK_FRAMES, latent_height=h, latent_width=w,
                                 global_cache_frames=args.chunks * CHUNK_FRAMES)
        make = lambda: StreamingGenerator.from_config(rc.dit, stream, seed=args.seed, dtype=args.dtype,  # noqa: E731
                                                      backend="eager")
        what = {"config": args.config}
    if args.compare == "layout":
        gens = {"standard": standard_layout(make()), "transposed": make()}
        for name, gen in gens.items():
            if _layout_of(gen) != name:
                raise RuntimeError(f"the {name} side's weights are in the {_layout_of(gen)} layout")
    elif args.compare == "attention":
        gens = {name: make() for name in SIDES["attention"]}
    else:
        gen = make()
        gens = dict.fromkeys(SIDES[args.compare], gen)
    chunk = next(iter(gens.values())).streaming.num_frame_per_block
    return gens, args.chunks * chunk, what


def _block_kernels(on: bool) -> None:
    """Switch the DiT's fused elementwise kernels on (the library's own rule) or off."""
    ops.block_kernels_available = _BLOCK_KERNELS_RULE if on else (lambda x: False)


_BLOCK_KERNELS_RULE = ops.block_kernels_available
_BLOCK_STEP_RULE = StepAttention.block_step


def _block_step(on: bool) -> None:
    """Switch the DiT's one-op block calls (``sf_sdk::dit_block_step``) on (the library's rule) or off."""
    StepAttention.block_step = _BLOCK_STEP_RULE if on else (lambda self, x: False)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    gens, num_latent, what = _generators(args)
    baseline, chosen = SIDES[args.compare]
    if args.compare in ("block-kernels", "attention", "block-step") and not _BLOCK_KERNELS_RULE(torch.empty(0)):
        raise RuntimeError(f"the CPU kernels are not loaded ({ops.unavailable_reason('cpu')}): nothing to compare")
    ref = gens[chosen]
    embeds = torch.randn(PROMPT_ROWS if args.model is None else ref.dit.config.text_len, ref.dit.config.text_dim,
                         generator=torch.Generator().manual_seed(args.seed)).to(ref.dtype)
    chunks: dict[str, list[float]] = {name: [] for name in gens}

    def stream(name: str, gen: StreamingGenerator) -> list[float]:
        _block_kernels(name != "torch ops")
        _block_step(name != "op by op")
        with default_backend(ATTENTION.get(name, "auto")):
            return ours_run(gen, embeds, num_latent)[0]

    parity = None
    if args.compare == "attention":  # the two sides compute the same video (not bit for bit)
        latents = []
        for name, gen in gens.items():
            with default_backend(ATTENTION[name]):
                frames = video_frames_for_latents(num_latent, gen.temporal_stride)
                latents.append(gen.generate(prompt_embeds=embeds, num_frames=frames, decode=False, seed=0).latents)
        parity = (latents[0] - latents[1]).abs().max().item()
    elif args.compare == "block-step":  # the same video bit for bit
        frames = video_frames_for_latents(num_latent, ref.temporal_stride)
        latents = []
        for on in (False, True):
            _block_step(on)
            latents.append(ref.generate(prompt_embeds=embeds, num_frames=frames, decode=False, seed=0).latents)
        parity = (latents[0] - latents[1]).abs().max().item()
    try:
        for name, gen in gens.items():  # warm-up
            stream(name, gen)
        for _ in range(args.rounds):
            for name, gen in gens.items():
                chunks[name].extend(stream(name, gen)[1:])  # the first chunk of each stream is not counted
    finally:
        _block_kernels(True)
        _block_step(True)
    sides = {name: {"median_s": statistics.median(w), "chunks": len(w), "chunk_wall_s": w} for name, w in chunks.items()}
    speedup = sides[baseline]["median_s"] / sides[chosen]["median_s"]
    return {**what, "compare": args.compare, "baseline": baseline, "chosen": chosen,
            "dtype": str(ref.dtype).removeprefix("torch."), "threads": args.threads,
            "chunks_per_stream": args.chunks, "rounds": args.rounds, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "sides": sides, "speedup": speedup,
            **({"latents_max_abs_diff": parity} if parity is not None else {})}


def table(result: dict[str, Any]) -> str:
    what = result.get("model") or f"race {result['config']}"
    s, base, chosen = result["sides"], result["baseline"], result["chosen"]
    return "\n".join([
        f"| what | dtype | threads | {base} s/chunk | {chosen} s/chunk | speed-up |",
        "|---|---|---|---|---|---|",
        f"| {what} | {result['dtype']} | {result['threads']} | {s[base]['median_s']:.4f} | "
        f"{s[chosen]['median_s']:.4f} | {result['speedup']:.3f}x |",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/cpu_eager.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", choices=sorted(SIDES), default="layout", help="which choice to measure")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="a race DiT configuration")
    src.add_argument("--model", help="a model folder or bundled name instead")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunks", type=int, default=7, help="chunks per stream")
    p.add_argument("--rounds", type=int, default=8, help="streams per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    if args.chunks < 2 or args.rounds < 1:
        p.error("--chunks must be at least 2 (the first chunk of a stream is not counted) and --rounds at least 1")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    result = run(args)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
