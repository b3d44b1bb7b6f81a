"""Stream pools: aggregate throughput and per-stream latency of N streams batched into one DiT
call per step, per backend, and the cost of a prompt transition.

    python benchmarks/pool.py --model shapes-tiny --streams 1,2,4,8 --json out.json
    python benchmarks/pool.py --model shapes-tiny --backends eager,onnxruntime --artifact-root onnx/ --threads 2

For each backend and pool size N, N streams (different shapes-domain prompts and seeds) run
``--warmup`` steps (excluded, reported apart), then ``--chunks`` timed steps. What each figure
includes (also in the JSON under "definitions"):

* ``aggregate_fps``: video frames of all streams over the timed steps / the wall time of those
  steps (``time.perf_counter`` around each ``pool.step()``; CUDA synchronized after it). It
  includes everything a step does: boundary work, the batched DiT call (denoising steps + cache
  pass), every stream's VAE decode and the uint8 frames on the host.
* ``latency_p50_s`` / ``latency_p90_s``: per-stream chunk latency, the wall time of the step that
  produced the chunk (every stream waits for the batched step), over all streams and steps.
* ``dit_p50_s``: the step's batched DiT call (``timing.dit_s``, shared by all streams; includes
  transition work done at the chunk boundary).
* ``decode_per_step_p50_s``: the sum over streams of each stream's own VAE decode
  (``timing.decode_s``; decoding is per stream, not batched). ``other_per_step_p50_s``: the rest
  of the step's wall time (noise, plans, bookkeeping).
* ``speedup_vs_1``: aggregate FPS over that of N=1 on the same backend; ``dit_speedup_vs_1``: the
  same for the DiT alone (N x DiT time at N=1 over DiT time at N).
* ``decode_bound_speedup``: the speed-up N streams could reach over one if the batched DiT cost
  nothing while each stream still decoded alone: step time / decode time at N=1.
* Exported backends (``onnxruntime``, and ``aoti`` when asked for: AOTInductor takes minutes
  per graph) need one artifact per pool size (a static batch); the export runs first and its
  time is reported apart (``export_s``), never in the timings. ``--artifact-root DIR`` keeps
  them (and reuses what is there).
* Transitions (eager, ``--transition-streams``): after the warm-up, ``--transition-before``
  steps, then ``set_prompt`` on stream 0 and the next step(s). ``extra_wall_ms`` /
  ``extra_dit_ms``: the chunk after ``set_prompt`` minus the median of the chunks before;
  ``blend_total_extra_ms``: the same summed over the blend's chunks. ``set_prompt_ms``: the call
  itself (it runs the text encoder). Medians of ``--transition-repeats`` repeats.

The goal this answers: on a 2-core CPU, 8 streams give at least 4x the aggregate throughput of
1 stream with shapes-tiny (``goal`` in the JSON; printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling latency.py
from latency import device_info, versions  # noqa: E402

from sf_sdk.config import to_dict  # noqa: E402
from sf_sdk.generator import StreamingGenerator, backend_status, cpu_threads  # noqa: E402
from sf_sdk.pool import TRANSITIONS, StreamPool  # noqa: E402
from sf_sdk.results import VideoChunk, video_frames_for_latents  # noqa: E402
from sf_sdk.stats import percentile  # noqa: E402

log = logging.getLogger("benchmarks.pool")

PROMPTS = ("a red circle moving right", "a blue square moving up", "a green triangle moving left",
           "a yellow circle moving down", "a cyan square moving right", "a magenta triangle moving up",
           "a red square moving left", "a blue triangle moving down")
SWITCH_PROMPT = "a green square moving down"  # what stream 0 switches to (and back from) in transitions
PROMPT_ROWS = 8  # rows of the random embedding that stands in for a prompt when the model has no text encoder
# Backends that run exported artifacts (a static batch: one export per pool size), and their exporter.
ARTIFACT_EXPORTERS = {"onnxruntime": "onnx", "aoti": "aoti"}
GOAL_STREAMS, GOAL_SPEEDUP = 8, 4.0
GOAL = (f"{GOAL_STREAMS} streams give at least {GOAL_SPEEDUP:g}x the aggregate throughput (frames/s) of 1 stream "
        f"(on a 2-core CPU, shapes-tiny)")
DEFINITIONS = {
    "aggregate_fps": "video frames of all streams / wall time of the timed steps (perf_counter around each "
                     "pool.step(), CUDA synchronized): boundary work + batched DiT + every stream's VAE decode "
                     "+ uint8 frames on the host",
    "latency": "per-stream chunk latency = wall time of the step that produced the chunk (all streams wait for "
               "the batched step); p50 / p90 over all streams and timed steps",
    "dit_p50_s": "timing.dit_s: the step's batched DiT call (denoising steps + cache pass), shared by all "
                 "streams, including transition work at the chunk boundary",
    "decode_per_step_p50_s": "sum over streams of timing.decode_s (each stream's own VAE decode + uint8 frames; "
                             "not batched)",
    "other_per_step_p50_s": "median over steps of wall - DiT - decode (noise, plans, bookkeeping)",
    "speedup_vs_1": "aggregate FPS / aggregate FPS at N=1, same backend",
    "dit_speedup_vs_1": "N * DiT p50 at N=1 / DiT p50 at N: the DiT's own batching gain",
    "decode_bound_speedup": "step p50 / per-stream decode p50 at N=1: the most N streams can gain over one while "
                            "each stream decodes alone, even if the batched DiT cost nothing",
    "warmup": "the first --warmup steps of each pool (first chunk, kernel loads, session warm-up), excluded",
    "export_s": "exporting that pool size's artifact (not in any timing); null when reused or not needed",
    "transitions": "extra ms of the chunk after set_prompt over the median of --transition-before chunks before "
                   "it (wall and DiT); blend_total_extra_ms sums the blend's chunks; set_prompt_ms is the call "
                   "(text encoder); medians of --transition-repeats repeats",
}


# --------------------------------------------------------------------------------------------
# Streams and steps
# --------------------------------------------------------------------------------------------


def build_generator(args: argparse.Namespace) -> StreamingGenerator:
    streaming = {"local_attn_size": args.window} if args.window is not None else None
    return StreamingGenerator.from_pretrained(args.model, device=args.device, dtype=args.dtype, streaming=streaming)


def prompt_kwargs(gen: StreamingGenerator, prompt: str) -> dict[str, Any]:
    """The prompt, or (a model without a text encoder) a random embedding seeded by it."""
    if gen.text_encoder is not None:
        return {"prompt": prompt}
    g = torch.Generator().manual_seed(sum(map(ord, prompt)))
    return {"prompt_embeds": torch.randn(PROMPT_ROWS, gen.dit.config.text_dim, generator=g)}


def stream_frames(gen: StreamingGenerator, steps: int) -> int | None:
    """num_frames for a stream of ``steps`` chunks: None (unbounded) with a rolling cache."""
    if gen.streaming.rolling:
        return None
    return video_frames_for_latents(steps * gen.streaming.num_frame_per_block, gen.temporal_stride)


def open_pool(gen: StreamingGenerator, n: int, steps: int, seed: int) -> StreamPool:
    frames = stream_frames(gen, steps)
    pool = gen.pool(max_streams=n, max_frames=frames)
    for i in range(n):
        pool.open(**prompt_kwargs(gen, PROMPTS[i % len(PROMPTS)]), seed=seed + i, num_frames=frames)
    return pool


def timed_step(pool: StreamPool, device: torch.device) -> tuple[float, list[VideoChunk]]:
    """One pool step: (wall seconds, the chunks by slot)."""
    t0 = time.perf_counter()
    out = pool.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    return wall, [out[s] for s in sorted(out, key=lambda s: s.row)]


# --------------------------------------------------------------------------------------------
# Throughput of one pool
# --------------------------------------------------------------------------------------------


def measure_pool(gen: StreamingGenerator, n: int, args: argparse.Namespace) -> dict[str, Any]:
    pool = open_pool(gen, n, args.warmup + args.chunks, args.seed)
    try:
        warm = [timed_step(pool, gen.device)[0] for _ in range(args.warmup)]
        walls, dits, decodes, others, latencies = [], [], [], [], []
        frames_per_stream = [0] * n
        for _ in range(args.chunks):
            wall, chunks = timed_step(pool, gen.device)
            if len(chunks) != n:
                raise RuntimeError(f"{n - len(chunks)} of {n} streams ended early")
            dit = chunks[0].timing.dit_s
            decode = sum(c.timing.decode_s for c in chunks)
            walls.append(wall)
            dits.append(dit)
            decodes.append(decode)
            others.append(wall - dit - decode)
            latencies.extend([wall] * n)
            for i, c in enumerate(chunks):
                frames_per_stream[i] += c.frames.shape[0] if c.frames is not None else 0
    finally:
        pool.close()
    frames = sum(frames_per_stream)
    wall_s = sum(walls)
    return {
        "streams": n,
        "steps": args.chunks,
        "frames": frames,
        "frames_per_stream": frames_per_stream,
        "wall_s": wall_s,
        "aggregate_fps": frames / wall_s,
        "per_stream_fps": frames / wall_s / n,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p90_s": percentile(latencies, 90),
        "step_p50_s": percentile(walls, 50),
        "dit_p50_s": percentile(dits, 50),
        "decode_per_step_p50_s": percentile(decodes, 50),
        "decode_per_stream_p50_s": percentile(decodes, 50) / n,
        "other_per_step_p50_s": percentile(others, 50),
        "warmup_steps": args.warmup,
        "warmup_s": sum(warm),
        "per_step_wall_s": walls,
        "per_step_dit_s": dits,
        "per_step_decode_s": decodes,
    }


def add_speedups(sizes: dict[str, dict[str, Any]]) -> None:
    """Speed-ups over N=1 of the same backend (when N=1 was measured)."""
    one = sizes.get("1")
    if one is None or "skipped" in one:
        return
    for r in sizes.values():
        if "skipped" in r:
            continue
        r["speedup_vs_1"] = r["aggregate_fps"] / one["aggregate_fps"]
        r["dit_speedup_vs_1"] = r["streams"] * one["dit_p50_s"] / r["dit_p50_s"]
    one["decode_bound_speedup"] = one["step_p50_s"] / one["decode_per_stream_p50_s"] \
        if one["decode_per_stream_p50_s"] > 0 else None


# --------------------------------------------------------------------------------------------
# Backends and their artifacts
# --------------------------------------------------------------------------------------------


def artifact_dir(name: str, gen: StreamingGenerator, n: int, root: Path, args: argparse.Namespace, *,
                 force: bool = False) -> tuple[Path, float | None]:
    """The artifact folder of backend ``name`` for a pool of ``n``: reused when ``root`` has one
    (unless ``force``), else exported now; returns (folder, export seconds or None when reused)."""
    from export.settings import ExportModel

    out = root / f"{name}_batch{n}"
    if not force and (out / "export.json").is_file():
        batch = json.loads((out / "export.json").read_text()).get("settings", {}).get("batch_size")
        if batch == n:
            log.info("%s N=%d: reusing %s", name, n, out)
            return out, None
        log.info("%s N=%d: %s was exported for batch %s, exporting again", name, n, out, batch)
    model = ExportModel(gen.dit, gen.streaming, gen.vae, source=str(args.model))
    common = {"batch_size": n, "dtype": str(gen.dtype).removeprefix("torch."), "device": gen.device.type,
              "num_frames": None if gen.streaming.rolling else (args.warmup + args.chunks)
              * gen.streaming.num_frame_per_block}
    log.info("%s N=%d: exporting to %s (timed apart)", name, n, out)
    for quiet in ("onnx_ir", "onnxscript", "torch.onnx"):  # the exporter's passes log every rewrite
        logging.getLogger(quiet).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    if ARTIFACT_EXPORTERS[name] == "onnx":
        from export.onnx import export_onnx
        from export.settings import ONNXSettings

        export_onnx(model, out, ONNXSettings(**common))
    else:
        from export.aoti import export_aoti
        from export.settings import AOTISettings

        export_aoti(model, out, AOTISettings(**common))
    return out, time.perf_counter() - t0


def run_backend(gen: StreamingGenerator, name: str, sizes: list[int], args: argparse.Namespace, root: Path
                ) -> dict[str, Any]:
    reason = backend_status(name)
    if reason is not None:
        log.info("%s: skipped (%s)", name, reason)
        return {"skipped": reason}
    results: dict[str, dict[str, Any]] = {}
    for n in sizes:
        try:
            options: dict[str, Any] = {}
            export_s, where, stale = None, None, None
            if name == "onnxruntime":
                options["threads"] = torch.get_num_threads()
            if name in ARTIFACT_EXPORTERS:
                folder, export_s = artifact_dir(name, gen, n, root, args)
                options["artifact_dir"] = str(folder)
                where = str(folder) if args.artifact_root is not None else "temporary folder"
                try:
                    gen.use_backend(name, options)
                except ValueError as exc:  # a reused folder that does not fit this generator: export again
                    if export_s is not None:
                        raise
                    stale = " ".join(str(exc).split())[:300]
                    log.info("%s N=%d: %s; exporting again", name, n, stale)
                    folder, export_s = artifact_dir(name, gen, n, root, args, force=True)
                    gen.use_backend(name, options)
            else:
                gen.use_backend(name, options)
            log.info("%s N=%d: %d warm-up + %d timed steps", name, n, args.warmup, args.chunks)
            results[str(n)] = {**measure_pool(gen, n, args), "export_s": export_s, "artifact_dir": where,
                               **({"reexported_because": stale} if stale else {})}
        except Exception as exc:  # a size or backend that cannot run here is reported, not fatal
            results[str(n)] = {"skipped": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
            log.info("%s N=%d: skipped (%s)", name, n, results[str(n)]["skipped"])
    gen.use_backend("eager")
    add_speedups(results)
    return {"sizes": results}


# --------------------------------------------------------------------------------------------
# Transitions
# --------------------------------------------------------------------------------------------


def measure_transitions(gen: StreamingGenerator, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """The extra cost of the chunk after ``set_prompt`` on stream 0 of a pool of ``n``, per kind."""
    before, k = args.transition_before, args.blend_chunks
    per_rep = sum(before + (k if kind == "blend" else 1) for kind in TRANSITIONS)
    pool = open_pool(gen, n, args.warmup + args.transition_repeats * per_rep, args.seed)
    raw: dict[str, dict[str, list[float]]] = {kind: {"wall": [], "dit": [], "blend_total": [], "set_prompt": []}
                                              for kind in TRANSITIONS}
    try:
        stream0 = next(s for s in pool.streams if s.row == 0)
        prompts = [SWITCH_PROMPT, PROMPTS[0]]
        for _ in range(args.warmup):
            timed_step(pool, gen.device)
        switches = 0
        for _ in range(args.transition_repeats):
            for kind in TRANSITIONS:  # interleaved, so slow drifts of a shared machine spread over all kinds
                base = [timed_step(pool, gen.device) for _ in range(before)]
                base_wall = statistics.median(w for w, _ in base)
                base_dit = statistics.median(c[0].timing.dit_s for _, c in base)
                t0 = time.perf_counter()
                stream0.set_prompt(**prompt_kwargs(gen, prompts[switches % 2]), transition=kind, chunks=k)
                raw[kind]["set_prompt"].append(time.perf_counter() - t0)
                switches += 1
                after = [timed_step(pool, gen.device) for _ in range(k if kind == "blend" else 1)]
                raw[kind]["wall"].append(after[0][0] - base_wall)
                raw[kind]["dit"].append(after[0][1][0].timing.dit_s - base_dit)
                raw[kind]["blend_total"].append(sum(w for w, _ in after) - base_wall * len(after))
    finally:
        pool.close()
    out: dict[str, Any] = {}
    for kind, r in raw.items():
        out[kind] = {"extra_wall_ms": statistics.median(r["wall"]) * 1e3,
                     "extra_dit_ms": statistics.median(r["dit"]) * 1e3,
                     "set_prompt_ms": statistics.median(r["set_prompt"]) * 1e3,
                     "repeats_extra_wall_ms": [x * 1e3 for x in r["wall"]]}
        if kind == "blend":
            out[kind]["blend_chunks"] = k
            out[kind]["blend_total_extra_ms"] = statistics.median(r["blend_total"]) * 1e3
    return out


# --------------------------------------------------------------------------------------------
# Goal and report
# --------------------------------------------------------------------------------------------


def goal(results: dict[str, Any]) -> dict[str, Any]:
    per_backend: dict[str, Any] = {}
    for name, res in results.items():
        sizes = res.get("sizes", {})
        one, many = sizes.get("1"), sizes.get(str(GOAL_STREAMS))
        if one is None or many is None or "skipped" in one or "skipped" in many:
            per_backend[name] = {"met": None, "why": res.get("skipped") or f"N=1 and N={GOAL_STREAMS} not both measured"}
            continue
        x = many["speedup_vs_1"]
        per_backend[name] = {"speedup": x, "met": x >= GOAL_SPEEDUP,
                             "dit_share_at_n": many["dit_p50_s"] / many["step_p50_s"],
                             "decode_share_at_n": many["decode_per_step_p50_s"] / many["step_p50_s"],
                             "decode_bound_speedup": one.get("decode_bound_speedup")}
    return {"statement": GOAL, "streams": GOAL_STREAMS, "speedup": GOAL_SPEEDUP, "per_backend": per_backend}


def report(data: dict[str, Any]) -> str:
    cfg, dev = data["config"], data["device"]
    st = cfg["streaming"]
    lines = [f"{cfg['model']} on {dev['type']} ({dev['name']}, {data['threads']} threads), {cfg['dtype']}, "
             f"{cfg['frame_size'][0]}x{cfg['frame_size'][1]}, chunk {st['num_frame_per_block']} latent = "
             f"{cfg['chunk_frames']} video frames, window {st['local_attn_size']}; {cfg['chunks']} timed steps after "
             f"{cfg['warmup']} warm-up",
             "FPS = all streams' frames / wall time; lat = per-stream chunk latency (the step's wall time); "
             "DiT = batched call per step; dec = sum of per-stream decodes per step; ms, medians unless p90",
             f"{'backend':<12}{'N':>3}{'FPS agg':>9}{'x vs 1':>8}{'lat p50':>9}{'lat p90':>9}{'DiT':>8}"
             f"{'dec':>8}{'other':>7}{'x DiT':>7}{'frames':>8}{'export s':>10}"]
    for name, res in data["results"].items():
        if "skipped" in res:
            lines.append(f"{name:<12}skipped: {res['skipped']}")
            continue
        for n, r in res["sizes"].items():
            if "skipped" in r:
                lines.append(f"{name:<12}{n:>3}  skipped: {r['skipped']}")
                continue

            def opt(key: str, fmt: str, width: int, r: dict[str, Any] = r) -> str:
                return f"{r[key]:{width}{fmt}}" if r.get(key) is not None else f"{'-':>{width}}"

            lines.append(f"{name:<12}{n:>3}{r['aggregate_fps']:9.1f}{opt('speedup_vs_1', '.2f', 8)}"
                         f"{r['latency_p50_s'] * 1e3:9.1f}{r['latency_p90_s'] * 1e3:9.1f}{r['dit_p50_s'] * 1e3:8.1f}"
                         f"{r['decode_per_step_p50_s'] * 1e3:8.1f}{r['other_per_step_p50_s'] * 1e3:7.1f}"
                         f"{opt('dit_speedup_vs_1', '.2f', 7)}{r['frames']:8d}{opt('export_s', '.1f', 10)}")
    tr = data.get("transitions")
    if tr:
        lines.append(f"transitions ({tr['backend']}, set_prompt on stream 0): extra ms of the chunk after it over the "
                     f"median of the {tr['before']} before; medians of {tr['repeats']} repeats")
        lines.append(f"{'N':>3} {'kind':<9}{'wall':>9}{'DiT':>9}{'blend total':>13}{'set_prompt':>12}")
        for n, kinds in tr["sizes"].items():
            for kind, r in kinds.items():
                total = f"{r['blend_total_extra_ms']:13.1f}" if "blend_total_extra_ms" in r else f"{'-':>13}"
                lines.append(f"{n:>3} {kind:<9}{r['extra_wall_ms']:9.1f}{r['extra_dit_ms']:9.1f}{total}"
                             f"{r['set_prompt_ms']:12.1f}")
    g = data["goal"]
    lines.append(f"goal: {g['statement']}")
    for name, r in g["per_backend"].items():
        if r["met"] is None:
            lines.append(f"  {name}: not measured ({r['why']})")
            continue
        bound = r["decode_bound_speedup"]
        lines.append(f"  {name}: {r['speedup']:.2f}x -> {'MET' if r['met'] else 'NOT met'}; at N={g['streams']} the "
                     f"step is {r['dit_share_at_n']:.0%} DiT, {r['decode_share_at_n']:.0%} per-stream decode"
                     + (f"; per-stream decode caps the gain at {bound:.2f}x" if bound else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/pool.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="shapes-tiny", help="a model folder or bundled name (default shapes-tiny)")
    p.add_argument("--streams", type=_int_list, default=[1, 2, 4, 8], help="pool sizes (default 1,2,4,8)")
    p.add_argument("--backends", default="eager,onnxruntime",
                   help="comma-separated (default eager,onnxruntime; aoti exports take minutes per graph)")
    p.add_argument("--chunks", type=int, default=12, help="timed steps per pool (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per pool, excluded (default 2)")
    p.add_argument("--threads", type=int, help="torch (and ONNX Runtime) CPU threads (default: torch's)")
    p.add_argument("--window", type=int, help="local_attn_size in latent frames (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--artifact-root", type=Path, help="keep (and reuse) exported artifacts here, one folder per "
                                                      "backend and pool size (default: a temporary folder)")
    p.add_argument("--transition-streams", type=_int_list, default=[1, 4],
                   help="pool sizes of the transition measurement, eager (default 1,4)")
    p.add_argument("--transition-repeats", type=int, default=5, help="repeats per transition (default 5)")
    p.add_argument("--transition-before", type=int, default=3, help="chunks before each set_prompt (default 3)")
    p.add_argument("--blend-chunks", type=int, default=3, help="chunks of a blend (default 3)")
    p.add_argument("--no-transitions", action="store_true", help="skip the transition measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the JSON here")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s",
                        stream=sys.stderr)
    if args.chunks <= 0 or args.warmup < 0 or args.transition_repeats <= 0 or args.transition_before <= 0 \
            or args.blend_chunks <= 0:
        raise SystemExit("--chunks, --transition-repeats, --transition-before and --blend-chunks must be "
                         "positive, --warmup >= 0")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    with cpu_threads(args.threads), tempfile.TemporaryDirectory(prefix="sf_pool_bench_") as tmp:
        gen = build_generator(args)
        if gen.vae is None:
            raise SystemExit(f"{args.model} has no VAE: this benchmark counts decoded frames")
        root = args.artifact_root if args.artifact_root is not None else Path(tmp)
        results = {name: run_backend(gen, name, args.streams, args, root) for name in backends}
        transitions = None
        if not args.no_transitions:
            gen.use_backend("eager")
            transitions = {"backend": "eager", "before": args.transition_before, "repeats": args.transition_repeats,
                           "sizes": {}}
            for n in args.transition_streams:
                log.info("transitions, eager N=%d", n)
                transitions["sizes"][str(n)] = measure_transitions(gen, n, args)
        threads = torch.get_num_threads()
    data = {
        "benchmark": "pool",
        "device": {**device_info(gen.device), "threads": threads},
        "versions": versions(),
        "threads": threads,
        "config": {"model": str(args.model), "dtype": str(gen.dtype).removeprefix("torch."),
                   "frame_size": list(gen.frame_size), "chunk_frames": gen.chunk_frames,
                   "streams": args.streams, "backends": backends, "chunks": args.chunks, "warmup": args.warmup,
                   "prompts": list(PROMPTS) if gen.text_encoder is not None
                   else f"random embeddings [{PROMPT_ROWS}, text_dim] (no text encoder)",
                   "seeds": f"{args.seed} + stream index", "streaming": to_dict(gen.streaming),
                   "dit": to_dict(gen.dit.config), "vae": to_dict(gen.vae.config)},
        "definitions": DEFINITIONS,
        "results": results,
        "transitions": transitions,
        "goal": goal(results),
    }
    sys.stdout.write(report(data) + "\n")
    if args.json is not None:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    ok = any(r for res in results.values() for r in res.get("sizes", {}).values() if "skipped" not in r)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
