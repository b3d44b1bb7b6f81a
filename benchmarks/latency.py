"""Streaming latency of a StreamingGenerator: time to first frame, per-chunk percentiles, steady
FPS of the DiT alone and end to end, peak memory; one or every backend side by side.

    python benchmarks/latency.py --preset tiny --height 64 --width 64 --chunks 12
    python benchmarks/latency.py --preset wan2.1-t2v-1.3b --height 64 --width 64 --chunks 1 --warmup 1
    python benchmarks/latency.py --model path/to/model --device cuda --chunks 20 --profile traces/
    python benchmarks/latency.py --preset tiny --backend all --export-missing --json out.json

What each figure includes (also written into the JSON under "definitions"):

* ``ttff_s``: from the ``stream()`` call to the first chunk's uint8 frames on the host (prompt
  projection, cache reset, the first chunk's denoising steps + cache pass and its VAE decode);
  measured on a fresh stream after the warm-up stream, so one-time costs (imports, kernel loads,
  compilation) are excluded and reported apart as ``warmup_s``.
* ``dit_*``: the DiT alone per chunk: the denoising steps plus the cache pass.
* ``e2e_*``: DiT + streaming VAE decode + the copy of the uint8 frames to the host.
* ``fps_*``: steady state, chunks after the first (which yields fewer frames): video frames per
  chunk over the median chunk time.
* Timings come from CUDA events on CUDA and from the host clock on the CPU. Prompts are random
  embeddings (the text encoder runs once per prompt and is not part of streaming).
* Peak memory: CUDA ``max_memory_allocated`` during the measured stream (weights included);
  CPU: the process's resident-set high-water mark (``VmHWM``), reset before the measured stream
  when the kernel allows, else since process start (reported as such).

Random weights (``--preset``) time exactly like trained ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sf_sdk.config import DIT_PRESETS, VAE_PRESETS, StreamingConfig, from_dict, to_dict
from sf_sdk.generator import StreamingGenerator, backend_names, backend_status
from sf_sdk.stats import percentile

log = logging.getLogger("benchmarks.latency")

# The VAE that goes with each DiT preset.
PRESET_VAE = {"tiny": "tiny"}
DEFAULT_VAE = "wan2.1"
PROMPT_ROWS = 16  # rows of the random prompt embedding
# Backends that run exported artifacts, and the exporter that writes them.
ARTIFACT_EXPORTERS = {"aoti": "aoti", "onnxruntime": "onnx"}
DEFINITIONS = {
    "ttff_s": "stream() call -> first chunk's uint8 frames on the host, fresh stream after warm-up",
    "dit": "DiT alone per chunk: denoising steps + cache pass",
    "e2e": "DiT + streaming VAE decode + uint8 frames to the host, per chunk",
    "fps": "steady state: video frames per chunk / median chunk time, chunks after the first",
    "peak_memory_mb": "CUDA: max_memory_allocated over the measured stream; CPU: VmHWM (resident high-water)",
    "warmup_s": "the warm-up stream (imports, kernel loads, compilation), excluded from everything else",
}


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    import numpy

    import sf_sdk

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "sf_sdk": sf_sdk.__version__, "numpy": numpy.__version__,
                                  "cuda": torch.version.cuda}
    for name in ("onnxruntime", "tensorrt"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gb=round(props.total_memory / 2**30, 1))
    else:
        info.update(name=_cpu_name(), cores=os.cpu_count(), machine=platform.machine())
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """The process's current resident set size (MB)."""
    kb = _proc_status_kb("VmRSS")
    return kb / 1024 if kb is not None else None


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak-memory window; returns what the later peak will cover."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "measured stream"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return "measured stream"
    except OSError:
        return "since process start"


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    return kb / 1024


# --------------------------------------------------------------------------------------------
# Building the generator
# --------------------------------------------------------------------------------------------


def streaming_overrides(args: argparse.Namespace, spatial_stride: int) -> dict[str, Any]:
    over: dict[str, Any] = {}
    if (args.height is None) != (args.width is None):
        raise ValueError("give --height and --width together")
    if args.height is not None:
        if args.height % spatial_stride or args.width % spatial_stride:
            raise ValueError(f"--height/--width must be multiples of the VAE stride {spatial_stride}, got "
                             f"{args.height}x{args.width}")
        over.update(latent_height=args.height // spatial_stride, latent_width=args.width // spatial_stride)
    if args.latent is not None:
        over.update(latent_height=args.latent[0], latent_width=args.latent[1])
    if args.window is not None:
        over["local_attn_size"] = args.window
    if args.framewise:
        over["num_frame_per_block"] = 1
    return over


def build_generator(args: argparse.Namespace) -> tuple[StreamingGenerator, str]:
    if args.model is not None:
        # Geometry overrides need the VAE stride: load first, then rebuild the streaming config.
        gen = StreamingGenerator.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                                 load_text_encoder=False, wan_dir=args.wan_dir)
        over = streaming_overrides(args, gen.spatial_stride)
        if over:
            gen = StreamingGenerator(gen.dit, from_dict(StreamingConfig, over, base=gen.streaming), vae=gen.vae,
                                     fps=gen.fps)
        return gen, str(args.model)
    vae = args.vae or PRESET_VAE.get(args.preset, DEFAULT_VAE)
    stride = VAE_PRESETS[vae].spatial_stride
    stream = from_dict(StreamingConfig, streaming_overrides(args, stride))
    gen = StreamingGenerator.from_config(args.preset, stream, vae=None if args.no_decode else vae,
                                         device=args.device, dtype=args.dtype, seed=args.seed)
    return gen, f"preset {args.preset} (random weights)"


# --------------------------------------------------------------------------------------------
# Measuring one backend
# --------------------------------------------------------------------------------------------


def _stream_kwargs(gen: StreamingGenerator, chunks: int, decode: bool, embeds: torch.Tensor) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"prompt_embeds": embeds, "decode": decode}
    if not gen.streaming.rolling:  # a global cache needs the stream length
        c = gen.streaming.num_frame_per_block
        kwargs["num_frames"] = 1 + gen.temporal_stride * (chunks * c - 1)
    return kwargs


def run_stream(gen: StreamingGenerator, chunks: int, decode: bool, embeds: torch.Tensor, seed: int
               ) -> tuple[float, list[Any]]:
    """Stream ``chunks`` chunks; returns (time to the first chunk, the chunks)."""
    out = []
    t0 = time.perf_counter()
    ttff = math.nan
    with gen.stream(seed=seed, **_stream_kwargs(gen, chunks, decode, embeds)) as stream:
        for chunk in stream:
            if not out:
                if gen.device.type == "cuda" and chunk.frames is None:
                    torch.cuda.synchronize(gen.device)
                ttff = time.perf_counter() - t0
            out.append(chunk)
            if len(out) == chunks:
                break
    return ttff, out


def dit_flop(gen: StreamingGenerator, chunk_index: int) -> float:
    """Approximate DiT FLOPs of one chunk (matmuls; steps + cache pass)."""
    st = gen.streaming
    cfg = gen.dit.config
    _, ph, pw = cfg.patch_size
    tokens_per_frame = (st.latent_height // ph) * (st.latent_width // pw)
    c = st.num_frame_per_block
    end = (chunk_index + 1) * c
    kv_frames = min(end, st.local_attn_size) if st.rolling else end
    calls = st.num_steps + 1
    return calls * c * tokens_per_frame * gen.dit.flops_per_token(kv_frames * tokens_per_frame)


def measure(gen: StreamingGenerator, args: argparse.Namespace, embeds: torch.Tensor) -> dict[str, Any]:
    decode = not args.no_decode
    t0 = time.perf_counter()
    if args.warmup:
        run_stream(gen, args.warmup, decode, embeds, args.seed)
    warmup_s = time.perf_counter() - t0
    peak_scope = reset_peak_memory(gen.device)
    ttff, chunks = run_stream(gen, args.chunks, decode, embeds, args.seed + 1)
    peak = peak_memory_mb(gen.device)
    dit = [c.timing.dit_s for c in chunks]
    e2e = [c.timing.total_s for c in chunks]
    steady = slice(1, None) if len(chunks) > 1 else slice(0, None)
    if decode:
        frames = [c.frames.shape[0] for c in chunks]
    else:
        c = gen.streaming.num_frame_per_block
        frames = [1 + gen.temporal_stride * (c - 1) if i == 0 else gen.chunk_frames for i in range(len(chunks))]
    per_chunk = statistics.median(frames[steady])
    flop = [dit_flop(gen, i) for i in range(len(chunks))]
    result = {
        "chunks": len(chunks),
        "warmup_chunks": args.warmup,
        "warmup_s": warmup_s,
        "ttff_s": ttff,
        "dit_p50_s": percentile(dit, 50), "dit_p90_s": percentile(dit, 90),
        "e2e_p50_s": percentile(e2e, 50), "e2e_p90_s": percentile(e2e, 90),
        "decode_p50_s": percentile([c.timing.decode_s for c in chunks], 50),
        "fps_dit": per_chunk / statistics.median(dit[steady]),
        "fps_e2e": per_chunk / statistics.median(e2e[steady]) if decode else None,
        "frames_per_chunk": per_chunk,
        "steady_from_chunk": 1 if len(chunks) > 1 else 0,
        "dit_gflop_per_chunk": statistics.median(flop[steady]) / 1e9,
        "dit_gflops": sum(flop[steady]) / sum(dit[steady]) / 1e9,
        "peak_memory_mb": peak,
        "peak_memory_scope": peak_scope,
        "per_chunk_dit_s": dit,
        "per_chunk_e2e_s": e2e,
    }
    if args.profile is not None:
        result["trace"] = profile_stream(gen, args, embeds, decode)
    return result


def profile_stream(gen: StreamingGenerator, args: argparse.Namespace, embeds: torch.Tensor, decode: bool) -> str:
    """One more stream under torch.profiler (after the measured one, so figures stay clean)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gen.device.type == "cuda" else [])
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"trace_{gen.backend.name}.json"
    with profile(activities=activities, record_shapes=True) as prof:
        run_stream(gen, args.chunks, decode, embeds, args.seed + 1)
    prof.export_chrome_trace(str(path))
    return str(path)


# --------------------------------------------------------------------------------------------
# Backends side by side
# --------------------------------------------------------------------------------------------


def _backend_options(name: str, args: argparse.Namespace, gen: StreamingGenerator, tmp: Path
                     ) -> tuple[dict[str, Any], float | None]:
    """Options for backend ``name``: --backend-options, artifacts found or exported now."""
    options = dict(json.loads(args.backend_options).get(name, {})) if args.backend_options else {}
    exporter = ARTIFACT_EXPORTERS.get(name)
    if exporter is None or "artifact_dir" in options:
        return options, None
    if args.artifacts is not None and (Path(args.artifacts) / name).is_dir():
        options["artifact_dir"] = str(Path(args.artifacts) / name)
        return options, None
    if not args.export_missing:
        raise RuntimeError(f"no {name} artifacts: pass --artifacts DIR (with DIR/{name}) or --export-missing")
    from export.settings import ExportModel

    model = ExportModel(gen.dit, gen.streaming, gen.vae if not args.no_decode else None, source="benchmark")
    num_frames = None if gen.streaming.rolling else args.chunks * gen.streaming.num_frame_per_block
    t0 = time.perf_counter()
    out = tmp / name
    if exporter == "aoti":
        from export.aoti import export_aoti
        from export.settings import AOTISettings

        export_aoti(model, out, AOTISettings(dtype=str(gen.dtype).replace("torch.", ""), device=gen.device.type,
                                             num_frames=num_frames))
    else:
        from export.onnx import export_onnx
        from export.settings import ONNXSettings

        export_onnx(model, out, ONNXSettings(dtype=str(gen.dtype).replace("torch.", ""), device=gen.device.type,
                                             num_frames=num_frames))
    options["artifact_dir"] = str(out)
    return options, time.perf_counter() - t0


def run_backends(gen: StreamingGenerator, names: list[str], args: argparse.Namespace,
                 embeds: torch.Tensor) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sf_latency_") as tmp:
        for name in names:
            reason = backend_status(name)
            if reason is not None:
                results[name] = {"skipped": reason}
                log.info("%s: skipped (%s)", name, reason)
                continue
            try:
                options, export_s = _backend_options(name, args, gen, Path(tmp))
                t0 = time.perf_counter()
                gen.use_backend(name, options)
                setup_s = time.perf_counter() - t0
                log.info("%s: measuring %d chunks after %d warm-up chunks", name, args.chunks, args.warmup)
                results[name] = {"setup_s": setup_s, "export_s": export_s, **measure(gen, args, embeds)}
            except Exception as exc:  # a backend that cannot run here is reported, not fatal
                results[name] = {"skipped": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
                log.info("%s: skipped (%s)", name, results[name]["skipped"])
    base = results.get("eager")
    if base and "skipped" not in base:
        for res in results.values():
            if "skipped" in res:
                continue
            res["speedup_dit_vs_eager"] = base["dit_p50_s"] / res["dit_p50_s"]
            if res["e2e_p50_s"] and base["e2e_p50_s"]:
                res["speedup_e2e_vs_eager"] = base["e2e_p50_s"] / res["e2e_p50_s"]
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def report(data: dict[str, Any]) -> str:
    cfg = data["config"]
    lines = [f"{cfg['model']} on {data['device']['type']} ({data['device']['name']}, "
             f"{data['device']['threads']} threads), {cfg['dtype']}, {cfg['height']}x{cfg['width']} pixels "
             f"(latent {cfg['latent']}), chunk {cfg['streaming']['num_frame_per_block']} latent frames, "
             f"window {cfg['streaming']['local_attn_size']}",
             "times in ms; dit = DiT alone (steps + cache pass); e2e = DiT + VAE decode + frames to host; "
             "FPS = steady state (chunks after the first); x dit / x e2e = speed-up over eager"]
    header = (f"{'backend':<15}{'ttff':>9}{'dit p50':>9}{'dit p90':>9}{'e2e p50':>9}{'e2e p90':>9}"
              f"{'FPS dit':>9}{'FPS e2e':>9}{'GFLOP/s':>9}{'peak MB':>9}{'x dit':>7}{'x e2e':>7}")
    lines.append(header)
    for name, r in data["results"].items():
        if "skipped" in r:
            lines.append(f"{name:<15}skipped: {r['skipped']}")
            continue

        def ms(x: float | None) -> str:
            return f"{x * 1e3:9.1f}" if x is not None else f"{'-':>9}"

        fps_e2e = f"{r['fps_e2e']:9.2f}" if r["fps_e2e"] is not None else f"{'-':>9}"
        speed = "".join(f"{r[k]:7.2f}" if k in r else f"{'-':>7}"
                        for k in ("speedup_dit_vs_eager", "speedup_e2e_vs_eager"))
        lines.append(f"{name:<15}{ms(r['ttff_s'])}{ms(r['dit_p50_s'])}{ms(r['dit_p90_s'])}{ms(r['e2e_p50_s'])}"
                     f"{ms(r['e2e_p90_s'])}{r['fps_dit']:9.2f}{fps_e2e}{r['dit_gflops']:9.1f}"
                     f"{r['peak_memory_mb']:9.0f}{speed}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/latency.py", description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--preset", default="tiny", choices=sorted(DIT_PRESETS), help="DiT preset, random weights")
    what.add_argument("--model", help="a model folder, bundled name or official checkpoint")
    p.add_argument("--vae", choices=sorted(VAE_PRESETS), help="VAE preset for --preset (default: matching)")
    p.add_argument("--wan-dir", help="Wan folder for an official --model checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--height", type=int, help="frame height in pixels (latent = pixels / VAE stride)")
    p.add_argument("--width", type=int, help="frame width in pixels")
    p.add_argument("--latent", type=int, nargs=2, metavar=("H", "W"), help="latent height and width instead")
    p.add_argument("--window", type=int, help="local_attn_size in latent frames (default: the model's)")
    p.add_argument("--framewise", action="store_true", help="one latent frame per chunk")
    p.add_argument("--chunks", type=int, default=8, help="measured chunks (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up chunks, excluded (default 2)")
    p.add_argument("--no-decode", action="store_true", help="DiT only (no VAE)")
    p.add_argument("--backend", default="eager", help="a backend name, or 'all' (every available one)")
    p.add_argument("--backend-options", help='JSON per backend, e.g. \'{"onnxruntime": {"threads": 2}}\'')
    p.add_argument("--artifacts", help="folder with exported artifacts per backend (DIR/aoti, DIR/onnxruntime)")
    p.add_argument("--export-missing", action="store_true", help="export missing artifacts first (timed apart)")
    p.add_argument("--profile", help="write a torch.profiler chrome trace per backend into this folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", nargs="?", const="-", help="write JSON (to this file, or stdout with no value)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s",
                        stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.chunks <= 0 or args.warmup < 0:
        raise SystemExit("--chunks must be positive and --warmup >= 0")
    gen, model = build_generator(args)
    names = backend_names() if args.backend == "all" else [args.backend]
    rows = min(PROMPT_ROWS, gen.dit.config.text_len)  # a short prompt; never more rows than the model reads
    embeds = torch.randn(rows, gen.dit.config.text_dim, generator=torch.Generator().manual_seed(args.seed))
    results = run_backends(gen, names, args, embeds)
    st = gen.streaming
    h, w = gen.frame_size
    data = {
        "benchmark": "latency",
        "device": device_info(gen.device),
        "versions": versions(),
        "config": {"model": model, "dtype": str(gen.dtype).replace("torch.", ""), "height": h, "width": w,
                   "latent": [st.latent_height, st.latent_width], "chunks": args.chunks, "warmup": args.warmup,
                   "decode": not args.no_decode, "prompt": f"random embeddings [{rows}, text_dim]",
                   "dit": to_dict(gen.dit.config), "dit_parameters": gen.dit.num_parameters(),
                   "vae": to_dict(gen.vae.config) if gen.vae is not None else None,
                   "streaming": to_dict(st)},
        "definitions": DEFINITIONS,
        "results": results,
    }
    if args.json is None or args.json != "-":
        sys.stdout.write(report(data) + "\n")
    if args.json is not None:
        text = json.dumps(data, indent=2)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            Path(args.json).write_text(text + "\n")
    ok = any("skipped" not in r for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
