"""One command that tells the truth about a GPU: kernels, backends, the 1.3B preset's latency.

    PYTHONPATH=. python benchmarks/gpu_check.py --json out.json            # everything (CUDA)
    PYTHONPATH=. python benchmarks/gpu_check.py --cpu --json out.json      # the CPU parts only
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run --json out.json  # reach every step, run none
    PYTHONPATH=. python benchmarks/gpu_check.py --steps kernels_parity,stream_eager --json out.json

Needs only PyTorch 2.x (with CUDA for the GPU parts), Triton (torch.compile / AOTInductor on
CUDA), numpy, safetensors and tokenizers: no TensorRT, no PyAV, no network, no model files (random
weights). Designed to finish in under 8 minutes on one H100 / H200; every step has a time budget
(seconds, scaled by ``--budget-scale``) and is reported as ``ok``, ``failed`` (with the error, or
"over budget") or ``skipped`` (with the reason: no CUDA, a missing component, ``--dry-run``).

The steps, in order:

* ``environment``: versions (torch, CUDA, Triton, numpy, safetensors, tokenizers), the device,
  its compute capability and memory.
* ``kernels_build``: builds (or finds in the cache) and loads the ``csrc/`` kernels for the
  device (``sf_sdk.ops.build``; CUDA needs ``nvcc``).
* ``kernels_parity``: ``sf_sdk::cache_attention``, ``cache_write`` and ``cache_write_rope``
  against the pure-PyTorch references in float32, bfloat16 and float16 at several cache lengths
  (empty, one slot, partial, full), the block ops (``modulated_layer_norm``, ``grouped_rms_norm``,
  ``gelu_tanh_``; float32) likewise, plus ``torch.library.opcheck`` of every op per dtype. On CUDA
  also the 1.3B shape (12 heads of 128, a 3-frame chunk of 1560 tokens over a 12-frame window).
* ``stream_eager``, ``stream_compile``, ``stream_aoti``: the tiny preset streamed 5 chunks (decode
  on, a rolling window that evicts); compile and AOTInductor must match eager (max abs error of
  the latents and the uint8 frames), compile's DiT step must not recompile across chunks
  (dynamo's ``error_on_recompile``, decode off; then a stream with the compiled decode steps),
  AOTInductor is exported with ``export.aoti --verify --fast-compile`` (the export verification:
  >= 4 chunks past the first eviction).
* ``preset_1.3b``: ``wan2.1-t2v-1.3b`` with random weights in bfloat16 at 480x832 (latent
  60x104), window 12: a few chunks with the latency report of ``benchmarks/latency.py`` (time to
  first frame, DiT-only and end-to-end FPS, peak memory) for the DiT alone, with the Wan VAE
  decoder and with the tiny TAEHV decoder (``decoder="tiny"``, random weights). CUDA only.

Exit status: 0 when no step failed, 1 otherwise. The JSON holds every step's status, seconds,
budget and results, and the figures' definitions from ``benchmarks/latency.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

log = logging.getLogger("benchmarks.gpu_check")

HERE = Path(__file__).resolve().parent


class Skipped(Exception):
    """A step that cannot run here; the message is the reason."""


class OverBudget(Exception):
    """A step ran past its time budget."""


@dataclass(frozen=True)
class Context:
    device: torch.device
    dry_run: bool
    workdir: Path


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: float
    cuda_only: bool
    run: Callable[[Context], dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - a missing or broken package is reported as absent
        return None


def step_environment(ctx: Context) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "device": str(ctx.device)}
    for name in ("triton", "numpy", "safetensors", "tokenizers"):
        info[name] = _version(name)
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gb=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def step_kernels_build(ctx: Context) -> dict[str, Any]:
    from sf_sdk import ops

    if ctx.dry_run:
        raise Skipped(f"dry run: would build the {ctx.device.type} kernels (sf_sdk.ops.build)")
    t0 = time.perf_counter()
    path = ops.build([ctx.device.type])[ctx.device.type]
    if path is None:
        raise RuntimeError(f"the {ctx.device.type} kernels did not build: {ops.unavailable_reason(ctx.device.type)}")
    return {"library": path, "seconds": round(time.perf_counter() - t0, 2)}


# Tolerances of the kernels against the reference (max abs error, outputs of size ~1).
KERNEL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _attention_cases(device: torch.device) -> list[tuple[str, int, int, int, int, int, list[int]]]:
    """(label, batch, queries, heads, head_dim, capacity, cache lengths)."""
    cases = [("small", 2, 12, 4, 64, 40, [0, 1, 17, 40]), ("tiny-chunk", 1, 72, 4, 24, 144, [72, 144])]
    if device.type == "cuda":
        cases.append(("wan-1.3b-chunk", 1, 3 * 1560, 12, 128, 12 * 1560, [3 * 1560, 9 * 1560, 12 * 1560]))
    return cases


def step_kernels_parity(ctx: Context) -> dict[str, Any]:
    from sf_sdk import ops
    from sf_sdk.reference import reference_cache_attention

    cases = _attention_cases(ctx.device)
    if ctx.dry_run:
        raise Skipped(f"dry run: would compare {len(cases)} attention shapes x 3 dtypes and run opcheck")
    if ops.build([ctx.device.type])[ctx.device.type] is None:
        raise Skipped(f"the {ctx.device.type} kernels are not loaded ({ops.unavailable_reason(ctx.device.type)}): "
                      f"there is nothing to compare with the reference")
    g = torch.Generator(device="cpu").manual_seed(0)
    dev = ctx.device

    def rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dev, dtype)

    results: dict[str, Any] = {}
    worst: dict[str, float] = {}
    failures = []
    for dtype in KERNEL_TOL:
        name = str(dtype).removeprefix("torch.")
        errs = []
        for label, b, lq, h, d, cap, lens in cases:
            q, k, v = rand(b, lq, h, d, dtype=dtype), rand(b, cap, h, d, dtype=dtype), rand(b, cap, h, d, dtype=dtype)
            for n in lens:
                got = ops.cache_attention(q, k, v, n).float()
                ref = reference_cache_attention(q.float(), k.float(), v.float(), n)
                err = (got - ref).abs().max().item() if n else got.abs().max().item()
                errs.append(err)
                if not err <= KERNEL_TOL[dtype]:
                    failures.append(f"cache_attention {name} {label} kv_len={n}: max abs error {err:.3g}")
        # The ring writes, plain and rotary: 5 slots that wrap around the end of a 12-slot ring.
        kc, vc = rand(2, 12, 3, 8, dtype=dtype), rand(2, 12, 3, 8, dtype=dtype)
        kn, vn = rand(2, 5, 3, 8, dtype=dtype), rand(2, 5, 3, 8, dtype=dtype)
        slots = torch.tensor([10, 11, 0, 1, 2], device=dev)
        angles = torch.rand(5, 4, generator=g).to(dev) * 6.0
        for op, ref_op, extra in ((ops.cache_write, ops.reference_cache_write, ()),
                                  (ops.cache_write_rope, ops.reference_cache_write_rope, (angles.cos(), angles.sin()))):
            got_k, got_v, ref_k, ref_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
            op(got_k, got_v, kn, vn, slots, *extra)
            ref_op(ref_k, ref_v, kn, vn, slots, *extra)
            err = max((got_k.float() - ref_k.float()).abs().max().item(), (got_v.float() - ref_v.float()).abs().max().item())
            errs.append(err)
            if not err <= KERNEL_TOL[dtype]:
                failures.append(f"{op.__name__} {name}: max abs error {err:.3g}")
        q, k, v = rand(2, 5, 3, 40, dtype=dtype), rand(2, 50, 3, 40, dtype=dtype), rand(2, 50, 3, 40, dtype=dtype)
        torch.library.opcheck(torch.ops.sf_sdk.cache_attention.default, (q, k, v, torch.tensor(37)))
        torch.library.opcheck(torch.ops.sf_sdk.cache_write.default, (kc, vc, kn, vn, slots))
        torch.library.opcheck(torch.ops.sf_sdk.cache_write_rope.default, (kc, vc, kn, vn, slots, angles.cos(),
                                                                         angles.sin()))
        worst[name] = max(errs)
    # The block's elementwise ops (CPU kernels in float32; elsewhere their references run).
    x, mod = rand(2, 48, 256, dtype=torch.float32), rand(2, 3, 6, 256, dtype=torch.float32)
    shift, scale = mod.unsqueeze(3).unbind(2)[:2]
    qk, w, y = rand(2, 48, 3, 256, dtype=torch.float32)[:, :, :2], rand(2, 256, dtype=torch.float32), \
        rand(48, 1024, dtype=torch.float32) * 4
    gelu = y.clone()
    torch.ops.sf_sdk.gelu_tanh_(gelu)
    block = {"modulated_layer_norm": (torch.ops.sf_sdk.modulated_layer_norm(x, shift, 1 + scale, 1e-6),
                                      ops.reference_modulated_layer_norm(x, shift, 1 + scale, 1e-6)),
             "grouped_rms_norm": (torch.ops.sf_sdk.grouped_rms_norm(qk, w, 1e-6), ops.reference_grouped_rms_norm(qk, w, 1e-6)),
             "gelu_tanh_": (gelu, torch.nn.functional.gelu(y, approximate="tanh"))}
    results["block_ops_max_abs_error"] = {}
    for name, (got, ref) in block.items():
        err = (got - ref).abs().max().item()
        results["block_ops_max_abs_error"][name] = err
        if not err <= KERNEL_TOL[torch.float32]:
            failures.append(f"{name} float32: max abs error {err:.3g}")
    torch.library.opcheck(torch.ops.sf_sdk.modulated_layer_norm.default, (x, shift, 1 + scale, 1e-6))
    torch.library.opcheck(torch.ops.sf_sdk.grouped_rms_norm.default, (qk, w, 1e-6))
    torch.library.opcheck(torch.ops.sf_sdk.gelu_tanh_.default, (y.clone(),))
    results["max_abs_error"] = worst
    results["tolerance"] = {str(d).removeprefix("torch."): t for d, t in KERNEL_TOL.items()}
    results["cases"] = [{"label": c[0], "q": list(c[1:5]), "capacity": c[5], "kv_lens": c[6]} for c in cases]
    results["opcheck"] = "ok"
    if failures:
        raise RuntimeError("; ".join(failures))
    return results


# The tiny preset's stream for the backend checks: a 6-frame window that chunks of 3 roll past.
TINY_LATENT_HW = (4, 6)
TINY_WINDOW = 6
TINY_CHUNKS = 5
STREAM_ATOL = {"cpu": 1e-4, "cuda": 2e-3}  # GPU: compiled kernels may reorder float32 sums (TF32 off)


def _tiny_model(ctx: Context):
    from export.settings import load_export_model

    return load_export_model("tiny", random_init=True, latent_hw=TINY_LATENT_HW, window=TINY_WINDOW,
                             device=ctx.device)


def _stream_tiny(ctx: Context, backend: str, decode: bool = True, **options: Any) -> tuple[list[Any], float]:
    from sf_sdk import StreamingGenerator

    model = _tiny_model(ctx)
    gen = StreamingGenerator(model.dit, model.streaming, vae=model.vae, backend=backend,
                             backend_options=options or None)
    emb = torch.randn(5, model.dit.config.text_dim, generator=torch.Generator().manual_seed(3))
    chunks = []
    t0 = time.perf_counter()
    with gen.stream(prompt_embeds=emb, seed=3, decode=decode) as s:
        for chunk in s:
            chunks.append(chunk)
            if len(chunks) == TINY_CHUNKS:
                break
    return chunks, time.perf_counter() - t0


_EAGER: dict[str, list[Any]] = {}


def _eager_reference(ctx: Context) -> list[Any]:
    if str(ctx.device) not in _EAGER:
        _EAGER[str(ctx.device)] = _stream_tiny(ctx, "eager")[0]
    return _EAGER[str(ctx.device)]


def _compare(chunks: list[Any], ref: list[Any], ctx: Context) -> dict[str, Any]:
    import numpy as np

    if len(chunks) != len(ref):
        raise RuntimeError(f"{len(chunks)} chunks, eager gave {len(ref)}")
    lat = max((a.latents.float() - b.latents.float()).abs().max().item() for a, b in zip(chunks, ref))
    pix = None
    if chunks[0].frames is not None:
        pix = max(int(np.abs(a.frames.astype(int) - b.frames.astype(int)).max()) for a, b in zip(chunks, ref))
    tol = STREAM_ATOL[ctx.device.type]
    if not lat <= tol:
        raise RuntimeError(f"latents differ from eager by {lat:.3g} (tolerance {tol})")
    return {"latents_max_abs_error_vs_eager": lat, "uint8_frames_max_diff_vs_eager": pix, "tolerance": tol}


def step_stream_eager(ctx: Context) -> dict[str, Any]:
    if ctx.dry_run:
        _tiny_model(SimpleNamespace(device=torch.device("cpu")))  # configs and model build on the CPU
        raise Skipped("dry run: would stream the tiny preset on eager")
    t0 = time.perf_counter()
    chunks = _EAGER[str(ctx.device)] = _stream_tiny(ctx, "eager")[0]  # also the later steps' reference
    finite = all(torch.isfinite(c.latents).all().item() for c in chunks)
    if not finite:
        raise RuntimeError("the eager stream's latents hold NaN or infinite values")
    return {"chunks": len(chunks), "frames": int(sum(c.frames.shape[0] for c in chunks)),
            "seconds": round(time.perf_counter() - t0, 2)}


def step_stream_compile(ctx: Context) -> dict[str, Any]:
    from sf_sdk.generator import backend_status

    reason = backend_status("compile")
    if reason is not None:
        raise Skipped(reason)
    if ctx.dry_run:
        raise Skipped("dry run: would stream the tiny preset on backend='compile' and compare with eager")
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # The DiT alone first: one graph for every chunk, a recompile across chunks is an error.
    with torch._dynamo.config.patch(error_on_recompile=True):
        chunks, seconds = _stream_tiny(ctx, "compile", decode=False)
    out = {"dit_only": _compare(chunks, _eager_reference(ctx), ctx), "seconds_with_compile": round(seconds, 2),
           "unique_graphs": counters["stats"]["unique_graphs"]}
    # Then with the compiled decode steps (a first-frame graph and a step graph of their own).
    chunks, seconds = _stream_tiny(ctx, "compile")
    out["with_decode"] = _compare(chunks, _eager_reference(ctx), ctx)
    out["seconds_with_decode"] = round(seconds, 2)
    return out


def step_stream_aoti(ctx: Context) -> dict[str, Any]:
    from sf_sdk.generator import backend_status

    reason = backend_status("aoti")
    if reason is not None:
        raise Skipped(reason)
    if ctx.dry_run:
        raise Skipped("dry run: would export the tiny preset with export.aoti --verify and stream it")
    from export import aoti

    out_dir = ctx.workdir / "aoti"
    t0 = time.perf_counter()
    rc = aoti.main(["--model", "tiny", "--random-init", "--latent-hw", *map(str, TINY_LATENT_HW), "--window",
                    str(TINY_WINDOW), "--device", str(ctx.device), "--out", str(out_dir), "--verify", "--fast-compile"])
    export_s = time.perf_counter() - t0
    export_json = json.loads((out_dir / "export.json").read_text()) if (out_dir / "export.json").is_file() else {}
    verify = export_json.get("verify", [])
    if rc != 0:
        raise RuntimeError(f"python -m export.aoti --verify exited {rc}: {verify}")
    chunks, seconds = _stream_tiny(ctx, "aoti", artifact_dir=str(out_dir))
    out = _compare(chunks, _eager_reference(ctx), ctx)
    out.update(export_seconds=round(export_s, 2), stream_seconds=round(seconds, 2), verify=verify)
    return out


PRESET = "wan2.1-t2v-1.3b"
PRESET_LATENT_HW = (60, 104)  # 480x832 pixels
PRESET_WINDOW = 12
PRESET_CHUNKS = 4
PRESET_WARMUP = 1


def _preset_parts():
    """The 1.3B run's configs (checked in a dry run too)."""
    from sf_sdk.config import DIT_PRESETS, VAE_PRESETS, StreamingConfig
    from sf_sdk.models import taehv

    stream = StreamingConfig(latent_height=PRESET_LATENT_HW[0], latent_width=PRESET_LATENT_HW[1],
                             local_attn_size=PRESET_WINDOW)
    return DIT_PRESETS[PRESET], VAE_PRESETS["wan2.1"], taehv.TAEHV_PRESETS["taew2.1"], stream


def step_preset(ctx: Context) -> dict[str, Any]:
    dit_cfg, vae_cfg, taehv_cfg, stream = _preset_parts()
    sys.path.insert(0, str(HERE))
    latency = importlib.import_module("latency")
    if ctx.dry_run:
        raise Skipped(f"dry run: would stream {PRESET} (bf16, {PRESET_LATENT_HW[0] * 8}x{PRESET_LATENT_HW[1] * 8}, "
                      f"window {PRESET_WINDOW}) for {PRESET_CHUNKS} chunks: DiT only, Wan VAE, TAEHV")
    from sf_sdk import StreamingGenerator

    t0 = time.perf_counter()
    base = StreamingGenerator.from_config(dit_cfg, stream, vae=vae_cfg, tiny_decoder=taehv_cfg, device=ctx.device,
                                          dtype="bfloat16", seed=0)
    build_s = time.perf_counter() - t0
    emb = torch.randn(latency.PROMPT_ROWS, dit_cfg.text_dim, generator=torch.Generator().manual_seed(0))
    runs: dict[str, Any] = {"build_seconds": round(build_s, 1), "definitions": latency.DEFINITIONS}
    for label, decoder, no_decode in (("dit_only", "wan", True), ("wan_vae", "wan", False), ("taehv", "tiny", False)):
        gen = StreamingGenerator(base.dit, base.streaming, vae=base.vae, tiny_decoder=base.tiny_decoder,
                                 decoder=decoder)
        args = SimpleNamespace(no_decode=no_decode, warmup=PRESET_WARMUP, chunks=PRESET_CHUNKS, seed=0, profile=None)
        m = latency.measure(gen, args, emb)
        runs[label] = {k: m[k] for k in ("ttff_s", "dit_p50_s", "e2e_p50_s", "decode_p50_s", "fps_dit", "fps_e2e",
                                         "frames_per_chunk", "dit_gflops", "peak_memory_mb", "warmup_s")}
        runs[label]["backend"] = gen.backend.components or gen.backend.name  # what the default backend chose
        log.info("%s %s: ttff %.3f s, DiT %.1f FPS, end to end %s FPS, peak %.0f MB", PRESET, label, m["ttff_s"],
                 m["fps_dit"], f"{m['fps_e2e']:.1f}" if m["fps_e2e"] else "-", m["peak_memory_mb"])
    return runs


STEPS: list[Step] = [
    Step("environment", 10, False, step_environment),
    Step("kernels_build", 90, False, step_kernels_build),
    Step("kernels_parity", 40, False, step_kernels_parity),
    Step("stream_eager", 20, False, step_stream_eager),
    Step("stream_compile", 60, False, step_stream_compile),
    Step("stream_aoti", 130, False, step_stream_aoti),
    Step("preset_1.3b", 130, True, step_preset),
]


# --------------------------------------------------------------------------------------------
# Running the steps
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`OverBudget` in the main thread after ``seconds`` (SIGALRM; elsewhere no limit)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    fired = False
    message = f"over budget: still running after {seconds:.0f} s"

    def expire(signum: int, frame: Any) -> None:
        nonlocal fired
        fired = True
        raise OverBudget(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if fired:  # the alarm went off where Python drops exceptions (a gc callback, a __del__): still over
        raise OverBudget(message)


def run_step(step: Step, ctx: Context, scale: float) -> dict[str, Any]:
    budget = step.budget_s * scale
    entry: dict[str, Any] = {"step": step.name, "budget_s": budget}
    t0 = time.perf_counter()
    try:
        if step.cuda_only and ctx.device.type != "cuda" and not ctx.dry_run:
            raise Skipped("needs CUDA" + ("" if torch.cuda.is_available() else ": no CUDA device here"))
        with time_limit(budget):
            entry["result"] = step.run(ctx)
        entry["status"] = "ok"
    except Skipped as exc:
        entry.update(status="skipped", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure is reported, the next step still runs
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                     traceback=traceback.format_exc(limit=8))
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    level = logging.WARNING if entry["status"] == "failed" else logging.INFO
    log.log(level, "%-15s %-7s %6.1f s  %s", step.name, entry["status"], entry["seconds"],
            entry.get("reason") or entry.get("error") or "")
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA exists (CUDA-only steps skip)")
    p.add_argument("--dry-run", action="store_true", help="reach every step (imports, configs), run no workload")
    p.add_argument("--steps", help=f"comma-separated subset of: {', '.join(s.name for s in STEPS)}")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's time budget")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    names = [s.name for s in STEPS]
    chosen = names if args.steps is None else [n.strip() for n in args.steps.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {names}")
    if args.budget_scale <= 0:
        p.error("--budget-scale must be positive")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sf_sdk_gpu_check_") as tmp:
        ctx = Context(device, args.dry_run, Path(tmp))
        steps = [run_step(s, ctx, args.budget_scale) for s in STEPS if s.name in chosen]
    failed = [s["step"] for s in steps if s["status"] == "failed"]
    report = {"ok": not failed, "failed": failed, "device": str(device), "dry_run": args.dry_run,
              "total_seconds": round(time.perf_counter() - t0, 1), "steps": steps}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    for s in steps:
        print(f"{s['step']:15s} {s['status']:8s} {s['seconds']:7.1f} s / {s['budget_s']:.0f} s  "
              f"{s.get('reason') or s.get('error') or ''}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
