"""backend="auto" against eager, and every DiT x decoder backend pair, side by side in one run.

    python benchmarks/auto.py --model shapes-tiny --frames 333 --threads 2 --repeats 3 --json auto.json
    python benchmarks/auto.py --cli --json auto_cli.json      # the README command, cold and warm cache

What a figure includes:

* ``pairs``: ``generate()`` of one prompt (sf-generate's path: text encoder, the per-chunk DiT
  steps and cache pass, the streaming decode, uint8 frames), wall time per video, best and median
  over ``--repeats`` rounds after one short warm-up video each; the pairs run round-robin within each round, so a change in machine
  load hits all of them alike. ``dit_s`` / ``decode_s`` are the chunks' own timings (summed).
  ``dit=X, decoder=Y`` runs the DiT chunk step on X and the decoder on Y; ``auto`` is what
  ``backend="auto"`` picks here (from a warm artifact cache) for the float32 generator the other
  pairs share, ``eager`` is ``backend="eager"``; ``default`` is a generator built with every
  default (``dtype="auto"``, ``backend="auto"``: on a CPU with AMX whose DiT runs on AOTInductor,
  the whole model in bfloat16). Each pair's ``dtype`` is reported.
  Exports are done before timing and reported apart (``export_s``).
* ``cli`` (``--cli``): the README command ``sf-generate "a red circle moving right" --frames 33``
  as a new process, wall time from start to exit: ``cold`` with an empty artifact cache and an
  empty kernel cache (a first run after install: the CPU kernels compile, auto starts its
  background export), ``warm`` after that export finished, and ``eager_warm`` (``--backend
  eager``, same warm kernel cache), each best of ``--repeats`` (cold: once per fresh cache).
* ``construct`` (``--construct``): ``from_pretrained`` wall time, eager against auto on an empty
  cache (the probe, weights fingerprint and lookup a first run adds) and on a warm one (the ONNX
  Runtime session load a later run adds), round-robin; ``save_source_s``: writing the DiT for the
  background exporter (the rest of a first run's extra cost is one process start).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from export.artifact_cache import library_versions  # noqa: E402
from sf_sdk.backends import Backend  # noqa: E402
from sf_sdk.generator import StreamingGenerator  # noqa: E402

log = logging.getLogger("benchmarks.auto")

PROMPT = "a red circle moving right"
CLI_FRAMES = 33
BACKGROUND_WAIT_S = 900


def _pairs(gen: StreamingGenerator, cache: Path) -> tuple[dict[str, Backend], dict[str, float]]:
    """Every DiT x decoder pair measured, with the export time of each exported component."""
    from export.manifest import read_manifest
    from export.onnx import BACKEND, export_onnx, load_onnxruntime
    from export.settings import ExportModel, ONNXSettings

    export_s: dict[str, float] = {}
    t0 = time.perf_counter()
    gen.use_backend("auto", {"cache_dir": str(cache), "build": "now"})
    export_s["auto"] = time.perf_counter() - t0
    auto = gen.backend
    t0 = time.perf_counter()
    folder = cache / "bench-onnx-full"
    if not (folder / "export.json").is_file():
        export_onnx(ExportModel(gen.dit, gen.streaming, gen.vae), folder, ONNXSettings())
    export_s["onnxruntime (DiT + VAE steps)"] = time.perf_counter() - t0
    ort_dit, ort_decoder = load_onnxruntime(read_manifest(folder, BACKEND), gen.dit)
    eager_decoder = gen.make_streaming_decoder
    pairs = {"eager": Backend("eager", gen.dit, eager_decoder), "auto": auto}
    for dit_name, dit in (("eager", gen.dit), ("onnxruntime", ort_dit)):
        for dec_name, dec in (("eager", eager_decoder), ("onnxruntime", ort_decoder)):
            if {"dit": dit_name, "decoder": dec_name} not in (auto.components, {"dit": "eager", "decoder": "eager"}):
                pairs[f"dit={dit_name}, decoder={dec_name}"] = Backend("pair", dit, dec)
    return pairs, export_s


def run_pairs(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sf-auto-bench-") as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp)
        gen = StreamingGenerator.from_pretrained(args.model, backend="eager")
        pairs, export_s = _pairs(gen, cache)
        gens = {name: gen for name in pairs}
        # "default": a generator with every default (dtype and backend "auto"), its exports built first
        t0 = time.perf_counter()
        default = StreamingGenerator.from_pretrained(args.model, backend_options={"cache_dir": str(cache),
                                                                                  "build": "now"})
        export_s["default"] = time.perf_counter() - t0
        pairs["default"], gens["default"] = default.backend, default
        dtypes = {name: str(g.dtype).removeprefix("torch.") for name, g in gens.items()}
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in pairs}
        for name, backend in pairs.items():  # warm-up: one short video each
            gens[name].backend = backend
            gens[name].generate(PROMPT, num_frames=args.warmup_frames, seed=0)
        for r in range(args.repeats):
            for name, backend in pairs.items():
                g = gens[name]
                g.backend = backend
                t0 = time.perf_counter()
                video = g.generate(PROMPT, num_frames=args.frames, seed=0)
                wall = time.perf_counter() - t0
                runs[name].append((wall, sum(t.dit_s for t in video.timings), sum(t.decode_s for t in video.timings)))
                log.info("round %d %-38s %.2f s", r, name, wall)
        components = pairs["auto"].components
        default_components = pairs["default"].components
    eager_best = min(runs["eager"])[0]
    results = {}
    for name, vals in runs.items():
        best = min(vals)
        results[name] = {"best_s": best[0], "median_s": statistics.median(v[0] for v in vals), "dit_s": best[1],
                         "decode_s": best[2], "speedup_vs_eager": eager_best / best[0],
                         "fps": args.frames / best[0], "samples": len(vals), "dtype": dtypes[name]}
    return {"auto_components": components, "default_components": default_components, "export_s": export_s,
            "pairs": results}


def _cli(args: list[str], env: dict[str, str], output: Path) -> float:
    output.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sf_sdk", *args, "--output", str(output)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sf-generate {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    log.info("sf-generate %s: %.1f s", " ".join(args), wall)
    return wall


def _built(cache: Path) -> bool:
    return any((p / "key.json").is_file() for p in cache.glob("*/dit-*"))


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sf-auto-cli-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(REPO), "SF_SDK_ARTIFACT_CACHE": str(root / "artifacts"),
               "SF_SDK_KERNEL_CACHE": str(root / "kernels")}
        env.pop("SF_SDK_AUTO_BUILD", None)
        base = [PROMPT, "--frames", str(CLI_FRAMES), "--no-progress"]
        out = root / "out.mp4"
        if args.threads:
            base += ["--threads", str(args.threads)]
        cold = _cli(base, env, out)
        t0 = time.monotonic()
        started = any((root / "artifacts").glob("*/*.lock"))  # a background export (short videos start none)
        while started and not _built(root / "artifacts") and time.monotonic() < t0 + BACKGROUND_WAIT_S:
            time.sleep(1)
        background_s = time.monotonic() - t0
        built = _built(root / "artifacts")
        warm, eager = [], []
        for _ in range(args.repeats):
            warm.append(_cli(base, env, out))
            eager.append(_cli([*base, "--backend", "eager"], env, out))
    return {"cold_s": cold, "background_export_started": started, "background_export_done": built,
            "background_wait_after_cold_s": background_s,
            "warm_s": min(warm), "eager_warm_s": min(eager), "warm_all_s": warm, "eager_warm_all_s": eager}


def run_construct(args: argparse.Namespace) -> dict[str, Any]:
    """Construction of the generator, eager against auto with an empty cache (``build="never"``: the
    probe, the weights fingerprint and the lookup; then the start of a background export, timed
    apart) and with a warm cache (the ONNX Runtime session load), round-robin."""
    from export.auto import save_source

    times: dict[str, list[float]] = {"eager": [], "auto_cold_lookup": [], "auto_warm": []}
    with tempfile.TemporaryDirectory(prefix="sf-auto-construct-") as tmp:
        warm = Path(args.cache) if args.cache else Path(tmp) / "warm"
        StreamingGenerator.from_pretrained(args.model, backend_options={"cache_dir": str(warm), "build": "now"})
        for r in range(args.repeats):
            for name, kwargs in (("eager", {"backend": "eager"}),
                                 ("auto_cold_lookup", {"backend_options": {"cache_dir": str(Path(tmp) / f"cold{r}"),
                                                                           "build": "never"}}),
                                 ("auto_warm", {"backend_options": {"cache_dir": str(warm), "build": "never"}})):
                t0 = time.perf_counter()
                gen = StreamingGenerator.from_pretrained(args.model, **kwargs)
                times[name].append(time.perf_counter() - t0)
        source = Path(tmp) / "source"
        source.mkdir()
        t0 = time.perf_counter()
        save_source("dit", gen.dit, source)
        save_s = time.perf_counter() - t0
    return {name: {"best_s": min(v), "all_s": v} for name, v in times.items()} | {"save_source_s": save_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-tiny")
    p.add_argument("--frames", type=int, default=333, help="video frames per generate() (default 333)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--warmup-frames", type=int, default=33, help="frames of each pair's untimed warm-up video")
    p.add_argument("--cache", help="artifact cache for the pairs (default: a temporary folder)")
    p.add_argument("--cli", action="store_true", help="time the README command, cold and warm cache, instead")
    p.add_argument("--construct", action="store_true", help="time the generator's construction instead")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": "auto", "model": args.model, "frames": CLI_FRAMES if args.cli else args.frames,
        "threads": args.threads, "repeats": args.repeats,
        "device": {"type": "cpu", "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                   "load_avg_1m": os.getloadavg()[0]},
        "versions": library_versions(),
    }
    if args.construct:
        report["construct"] = run_construct(args)
    else:
        report["cli" if args.cli else "results"] = run_cli(args) if args.cli else run_pairs(args)
    report["device"]["load_avg_1m_end"] = os.getloadavg()[0]
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
