"""FLOPs and bytes per chunk of the DiT, its cache pass and each decoder, from the configs, and the
GPU roofline they imply.

    PYTHONPATH=. python benchmarks/flops.py                        # Wan-1.3B at 480x832 (the doc's table)
    PYTHONPATH=. python benchmarks/flops.py --race race_mid.json   # + our CPU fraction of peak, measured
    PYTHONPATH=. python benchmarks/flops.py --measure-mid 3         # the fraction from 3 chunk calls here
    PYTHONPATH=. python benchmarks/flops.py --json flops.json

Counting: the DiT and both decoders run on the ``meta`` device (shapes only, no memory, no time)
under ``torch.utils.flop_counter.FlopCounterMode``, which counts matmuls, convolutions and
attention (2 FLOPs per multiply-add); elementwise ops, norms and softmax are not counted (a few %
of the total). The DiT count is checked against the closed form of :func:`dit_call_flops`.

Bytes (a lower bound on memory traffic, bf16 = 2 bytes): each call reads every weight once, the
KV cache's valid prefix of every layer and writes the chunk's keys/values; each matmul and
convolution reads its input and writes its output once (what a fused implementation would move;
unfused eager moves more). The first chunk and the steady chunks differ (the cache grows, the
first decode yields 9 frames, later ones 12); the tables give the steady chunk at a stated cache
length.

Roofline: a step's time is ``max(FLOPs / (f * peak), bytes / bandwidth)``; ``f`` is the fraction
of peak compute reached. ``--race`` takes ``benchmarks/race_official.py --config mid`` JSON and
measures ``f`` for our eager DiT on this CPU: FLOPs of its measured chunks over their time, against
``--cpu-peak`` (GFLOP/s); ``--measure-mid`` times chunk calls at the mid config directly (CPU time,
so other load on a shared machine does not count against it).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from sf_sdk.config import DIT_PRESETS, VAE_PRESETS, DiTConfig, StreamingConfig

# H100 / H200 SXM: dense bf16 tensor-core peak and the HBM bandwidth measured on an H200.
GPU_BF16_TFLOPS = 790.0
GPU_TB_S = 4.3
# This project's CPU, fp32, per core (AVX-512 with two FMA units; one thread measures ~100 GFLOP/s
# in the mid config's matmuls, so the figure cannot be the two cores' sum).
CPU_PEAK_GFLOPS = 150.0
BYTES = 2  # bf16

PAPER_FPS = {"Self-Forcing (paper, H100)": 17.0, "LongLive (H100)": 20.7, "best 2026 single-H100 systems": 30.0}


@dataclass(frozen=True)
class Geometry:
    latent_hw: tuple[int, int] = (60, 104)  # 480x832 pixels
    chunk_frames: int = 3
    steps: int = 4
    window_frames: int = 12  # KV frames a steady chunk attends to (window 12, or 12 of a growing global cache)


def tokens_per_frame(cfg: DiTConfig, g: Geometry) -> int:
    _, ph, pw = cfg.patch_size
    return (g.latent_hw[0] // ph) * (g.latent_hw[1] // pw)


def dit_call_flops(cfg: DiTConfig, n: int, kv: int, frames: int) -> dict[str, float]:
    """Closed-form matmul FLOPs of one chunk call: ``n`` query tokens over ``kv`` cached keys
    (the chunk's own included), ``frames`` latent frames (one time embedding each)."""
    d, f = cfg.dim, cfg.ffn_dim
    per_layer = {
        "self_attn_proj": 2 * n * d * d * 4,  # q, k, v, o
        "self_attn_core": 2 * n * kv * d * 2,  # q k^T and p v
        "cross_attn_proj": 2 * n * d * d * 2,  # q, o (the prompt's k / v are cached per prompt)
        "cross_attn_core": 2 * n * cfg.text_len * d * 2,
        "ffn": 2 * n * d * f * 2,
    }
    out = {k: v * cfg.num_layers for k, v in per_layer.items()}
    patch = cfg.patch_volume
    out["embed_head"] = 2 * n * d * cfg.in_dim * patch + 2 * n * d * cfg.out_dim * patch
    out["time"] = 2 * frames * (cfg.freq_dim * d + d * d + d * 6 * d)
    return out


def dit_call_bytes(cfg: DiTConfig, n: int, kv: int, params: int) -> float:
    """Lower-bound bytes of one chunk call (weights, KV cache read and write, matmul activations)."""
    d, f, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    weights = params * BYTES
    kv_bytes = layers * 2 * (kv + n) * d * BYTES  # read the valid prefix, write the chunk (k and v)
    # per layer: q/k/v/o, cross q/o and FFN in/out activations, attention outputs, read + written once
    acts = layers * n * (d * 4 + d * 3 + d * 2 + d * 2 + d + f * 2 + d * 2) * BYTES
    return weights + kv_bytes + acts


def dit_params(cfg: DiTConfig) -> int:
    from sf_sdk.models.dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(cfg)
    return model.num_parameters()


def count_dit_call(cfg: DiTConfig, g: Geometry, kv_frames: int) -> float:
    """FLOPs of one chunk call counted on the meta device (the call after ``kv_frames - chunk``
    frames are cached)."""
    from sf_sdk.models.dit import WanDiT

    c = g.chunk_frames
    stream = StreamingConfig(latent_height=g.latent_hw[0], latent_width=g.latent_hw[1], num_frame_per_block=c,
                             global_cache_frames=kv_frames)
    with torch.device("meta"):
        model = WanDiT(cfg).to(torch.bfloat16)
    with torch.no_grad():
        cache = model.new_cache(stream, 1, num_frames=kv_frames)
        cross = model.encode_context(torch.empty(1, cfg.text_len, cfg.text_dim, device="meta", dtype=torch.bfloat16))
        x = torch.empty(1, c, cfg.in_dim, *g.latent_hw, device="meta", dtype=torch.bfloat16)
        t = torch.empty(1, c, device="meta", dtype=torch.bfloat16)
        for start in range(0, kv_frames - c, c):  # fill the cache up to the measured call
            model.forward_chunk(x, t, cross, cache, start)
        with FlopCounterMode(display=False) as counter:
            model.forward_chunk(x, t, cross, cache, kv_frames - c)
    return float(counter.get_total_flops())


def _activation_bytes(model: torch.nn.Module, run) -> float:
    """Bytes that the model's convolutions and linears read (input, weight) and write (output), once."""
    total = [0]

    def hook(module: torch.nn.Module, args: tuple, out: Any) -> None:
        x = args[0]
        total[0] += (x.numel() + out.numel() + module.weight.numel()) * BYTES

    leaves = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return float(total[0])


def count_decoder(kind: str, g: Geometry) -> dict[str, float]:
    """FLOPs and bytes of a steady chunk (the second one of a stream) of the Wan VAE or TAEHV decoder."""
    h, w = g.latent_hw
    c = g.chunk_frames
    with torch.device("meta"):
        if kind == "wan":
            from sf_sdk.models.vae import WanVAE

            model = WanVAE(VAE_PRESETS["wan2.1"]).to(torch.bfloat16)
            decoder = model.streaming_decoder()
        else:
            from sf_sdk.models.taehv import TAEHV_PRESETS, TAEHVDecoder

            model = TAEHVDecoder(TAEHV_PRESETS["taew2.1"]).to(torch.bfloat16)
            decoder = model.streaming_decoder()
    z = torch.empty(1, 16, c, h, w, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        decoder.decode(z)  # the first chunk
        out: list[torch.Tensor] = []
        with FlopCounterMode(display=False) as counter:
            nbytes = _activation_bytes(model, lambda: out.append(decoder.decode(z)))
    return {"flops": float(counter.get_total_flops()), "bytes": nbytes, "frames": out[0].shape[2]}


def roofline_s(flops: float, nbytes: float, fraction: float) -> float:
    return max(flops / (fraction * GPU_BF16_TFLOPS * 1e12), nbytes / (GPU_TB_S * 1e12))


def cpu_fraction(race_path: Path, peak_gflops: float) -> dict[str, Any]:
    """Our eager DiT's fraction of the CPU's peak at the mid config, from a race_official JSON."""
    doc = json.loads(race_path.read_text())
    res = next((r for r in doc["results"] if r["config"] == "mid"), None)
    if res is None:
        raise ValueError(f"{race_path} holds no 'mid' result: run race_official.py --config mid --json ...")
    cfg = DIT_PRESETS["mid"]
    g = Geometry(latent_hw=tuple(res["latent_hw"]), chunk_frames=res["chunk_frames"])
    n = tokens_per_frame(cfg, g) * g.chunk_frames
    # chunk i (0-based) attends to (i + 1) chunks; the measured ones are 1 .. chunks-1 of each round
    per_chunk = [sum(dit_call_flops(cfg, n, n * (i + 1), g.chunk_frames).values()) * (g.steps + 1)
                 for i in range(1, res["chunks"])]
    flops = sum(per_chunk) / len(per_chunk)
    threads = doc.get("threads", 1)
    out: dict[str, Any] = {"config": "mid", "threads": threads, "gflop_per_chunk": flops / 1e9,
                           "cpu_peak_gflops": peak_gflops}
    for side, r in res["sides"].items():
        if "median_s" not in r:
            continue
        wall = flops / r["median_s"] / 1e9
        cpu = flops / (r["median_cpu_s"] / threads) / 1e9  # as if each thread had its core to itself
        out[side] = {"gflops_wall": wall, "fraction_wall": wall / peak_gflops,
                     "gflops_cpu_time": cpu, "fraction_cpu_time": cpu / peak_gflops}
    return out


def measure_mid(calls: int, threads: int, peak_gflops: float, cores: int) -> dict[str, Any]:
    """Our eager DiT's GFLOP/s at the mid config measured directly: ``calls`` chunk calls (3 frames at
    30x52 over a cache of 2 chunks), float32, on this CPU with ``threads`` threads. The fraction is
    against the peak of the cores used: ``peak * threads / cores``."""
    import time

    from sf_sdk.models.dit import WanDiT

    torch.set_num_threads(threads)
    cfg = DIT_PRESETS["mid"]
    g = Geometry(latent_hw=(30, 52))
    c = g.chunk_frames
    stream = StreamingConfig(latent_height=30, latent_width=52, num_frame_per_block=c, global_cache_frames=3 * c)
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    with torch.inference_mode():
        cache = model.new_cache(stream, 1, num_frames=3 * c)
        cross = model.encode_context(torch.randn(1, 16, cfg.text_dim))
        x, t = torch.randn(1, c, cfg.in_dim, 30, 52), torch.full((1, c), 500.0)
        for start in (0, c):
            model.forward_chunk(x, t, cross, cache, start)  # two chunks cached (and a warm-up)
        plan = cache.plan_chunk(2 * c, c)
        attend = model.step_attention(cache, plan)
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            model.forward_chunk(x, t, cross, cache, plan, attend)
        wall, cpu = (time.perf_counter() - w0) / calls, (time.process_time() - c0) / calls
    n = tokens_per_frame(cfg, g) * c
    flops = sum(dit_call_flops(cfg, n, 3 * n, c).values())
    peak = peak_gflops * threads / cores
    return {"config": "mid", "threads": threads, "calls": calls, "gflop_per_call": flops / 1e9,
            "wall_s_per_call": wall, "cpu_s_per_call": cpu, "peak_gflops_of_threads": peak,
            "gflops_wall": flops / wall / 1e9, "fraction_wall": flops / wall / 1e9 / peak,
            "gflops_cpu_time": flops / (cpu / threads) / 1e9, "fraction_cpu_time": flops / (cpu / threads) / 1e9 / peak}


def model_report(g: Geometry, fractions: dict[str, float]) -> dict[str, Any]:
    cfg = DIT_PRESETS["wan2.1-t2v-1.3b"]
    n = tokens_per_frame(cfg, g) * g.chunk_frames
    kv = tokens_per_frame(cfg, g) * g.window_frames
    params = dit_params(cfg)
    closed = dit_call_flops(cfg, n, kv, g.chunk_frames)
    call_flops = sum(closed.values())
    counted = count_dit_call(cfg, g, g.window_frames)
    call_bytes = dit_call_bytes(cfg, n, kv, params)
    calls = g.steps + 1
    parts = {
        "dit_denoise": {"flops": call_flops * g.steps, "bytes": call_bytes * g.steps},
        "dit_cache_pass": {"flops": call_flops, "bytes": call_bytes},
    }
    frames = None
    for kind in ("wan", "taehv"):
        d = count_decoder(kind, g)
        frames = d["frames"]
        parts[f"decode_{kind}"] = {"flops": d["flops"], "bytes": d["bytes"]}
    report: dict[str, Any] = {
        "model": "wan2.1-t2v-1.3b", "dit_parameters": params,
        "geometry": {"pixels": [g.latent_hw[0] * 8, g.latent_hw[1] * 8], "latent": list(g.latent_hw),
                     "tokens_per_frame": tokens_per_frame(cfg, g), "chunk_tokens": n, "kv_tokens": kv,
                     "calls_per_chunk": calls, "video_frames_per_chunk": frames},
        "dit_call_closed_form": closed, "dit_call_flops": call_flops, "dit_call_flops_counted": counted,
        "parts": parts, "gpu": {"bf16_tflops": GPU_BF16_TFLOPS, "tb_s": GPU_TB_S}, "predictions": {},
    }
    for part in parts.values():
        part["intensity_flop_per_byte"] = part["flops"] / part["bytes"]
        part["roofline_ms"] = roofline_s(part["flops"], part["bytes"], 1.0) * 1e3
    dit_parts = ("dit_denoise", "dit_cache_pass")
    for label, f in fractions.items():
        dit_s = sum(roofline_s(parts[p]["flops"], parts[p]["bytes"], f) for p in dit_parts)
        pred = {"dit_ms": dit_s * 1e3, "fps_dit": frames / dit_s}
        for kind in ("wan", "taehv"):
            dec = roofline_s(parts[f"decode_{kind}"]["flops"], parts[f"decode_{kind}"]["bytes"], f)
            pred[f"fps_e2e_{kind}"] = frames / (dit_s + dec)
        report["predictions"][label] = {"fraction_of_peak": f, **pred}
    report["published_fps"] = PAPER_FPS
    return report


def print_report(rep: dict[str, Any], cpu: dict[str, Any] | None) -> None:
    geo = rep["geometry"]
    print(f"{rep['model']}: {rep['dit_parameters'] / 1e9:.3f} B DiT parameters; {geo['pixels'][0]}x{geo['pixels'][1]}, "
          f"{geo['tokens_per_frame']} tokens/frame, chunk {geo['chunk_tokens']} tokens over {geo['kv_tokens']} "
          f"cached, {geo['calls_per_chunk']} calls, {geo['video_frames_per_chunk']} video frames per chunk")
    print(f"DiT call: {rep['dit_call_flops'] / 1e12:.3f} TFLOP closed form, "
          f"{rep['dit_call_flops_counted'] / 1e12:.3f} TFLOP counted")
    print("| part (one steady chunk) | TFLOP | GB moved | FLOP/byte | roofline ms (100% peak) |")
    print("|---|---|---|---|---|")
    for name, p in rep["parts"].items():
        print(f"| {name} | {p['flops'] / 1e12:.2f} | {p['bytes'] / 1e9:.2f} | {p['intensity_flop_per_byte']:.0f} | "
              f"{p['roofline_ms']:.1f} |")
    print("| fraction of peak | DiT ms/chunk | DiT FPS | e2e FPS (Wan VAE) | e2e FPS (TAEHV) |")
    print("|---|---|---|---|---|")
    for label, p in rep["predictions"].items():
        print(f"| {label} ({p['fraction_of_peak']:.0%}) | {p['dit_ms']:.1f} | {p['fps_dit']:.1f} | "
              f"{p['fps_e2e_wan']:.1f} | {p['fps_e2e_taehv']:.1f} |")
    if cpu is not None:
        print(f"CPU (mid config, {cpu['threads']} threads, {cpu['gflop_per_chunk']:.1f} GFLOP per chunk, "
              f"peak {cpu['cpu_peak_gflops']:.0f} GFLOP/s):")
        for side, r in cpu.items():
            if isinstance(r, dict):
                print(f"  {side}: {r['gflops_wall']:.1f} GFLOP/s wall ({r['fraction_wall']:.0%}), "
                      f"{r['gflops_cpu_time']:.1f} GFLOP/s by CPU time ({r['fraction_cpu_time']:.0%})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--race", type=Path, help="race_official.py JSON with a 'mid' result: measure our CPU fraction")
    p.add_argument("--cpu-peak", type=float, default=CPU_PEAK_GFLOPS, help="CPU fp32 peak of --cores cores, GFLOP/s")
    p.add_argument("--measure-mid", type=int, metavar="CALLS",
                   help="time CALLS eager chunk calls at the mid config here: our CPU fraction, measured directly")
    p.add_argument("--threads", type=int, default=1, help="torch threads for --measure-mid")
    p.add_argument("--cores", type=int, default=1, help="cores the --cpu-peak figure is for")
    p.add_argument("--window", type=int, default=Geometry.window_frames, help="KV frames of a steady chunk")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    fractions = {"roofline": 1.0, "half of peak": 0.5}
    cpu = None
    if args.race is not None:
        cpu = cpu_fraction(args.race, args.cpu_peak)
        eager = cpu.get("sf-sdk eager")
        if eager is not None:
            fractions["our CPU fraction (wall)"] = eager["fraction_wall"]
            fractions["our CPU fraction (CPU time)"] = eager["fraction_cpu_time"]
    measured = None
    if args.measure_mid is not None:
        measured = measure_mid(args.measure_mid, args.threads, args.cpu_peak, args.cores)
        print(f"mid config, {measured['threads']} thread(s): {measured['gflop_per_call']:.1f} GFLOP per call, "
              f"{measured['wall_s_per_call']:.2f} s wall / {measured['cpu_s_per_call']:.2f} s CPU per call: "
              f"{measured['gflops_wall']:.1f} GFLOP/s wall ({measured['fraction_wall']:.0%}), "
              f"{measured['gflops_cpu_time']:.1f} GFLOP/s by CPU time ({measured['fraction_cpu_time']:.0%}) of "
              f"{measured['peak_gflops_of_threads']:.0f} GFLOP/s")
        fractions["our CPU fraction, direct (CPU time)"] = measured["fraction_cpu_time"]
    rep = model_report(Geometry(window_frames=args.window), fractions)
    rep["cpu"] = cpu
    rep["cpu_direct"] = measured
    print_report(rep, cpu)
    if args.json is not None:
        args.json.write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
