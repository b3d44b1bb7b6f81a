"""Soak test: many latent frames through a rolling stream and through a pool whose streams join
and leave; memory, latency and NaNs sampled along the way.

    python benchmarks/soak.py --model shapes-tiny --latent-frames 10000 --json soak.json
    python benchmarks/soak.py --short            # a few hundred frames (what tests/test_soak.py runs)

Two parts, each until ``--latent-frames`` latent frames have been produced:

* ``stream``: one unbounded stream (``gen.stream(prompt)``) through the rolling window, decoded;
* ``pool``: a pool of ``--pool-streams`` slots; streams of random lengths (2..``--max-chunks``
  chunks) join at random steps while a slot is free, some are closed early; frames are counted
  over all streams.

Every chunk is checked for NaN / Inf (latents, and the decoded frames' latents in the pool). Every
``--sample-every`` latent frames a sample is written: ``rss_mb`` (the process's resident set,
``/proc/self/status`` VmRSS, after the interval's last chunk), and over the interval's chunks
(stream) or steps (pool) ``chunk_p50_ms`` / ``chunk_p90_ms`` (wall time of ``next(stream)`` or of
one ``pool.step()``, DiT + VAE decode + bookkeeping; percentiles: :mod:`sf_sdk.stats`) and
``chunk_cpu_p50_ms`` (the same in this process's CPU time, which other processes' load does not
inflate). The summary per part: ``rss_growth_mb`` (last sample minus the first, so the warm-up's
allocations are not counted as growth), ``latency_drift`` / ``cpu_drift`` (last interval's p50
over the first's), ``nan_chunks`` and ``frames`` reached. The JSON is rewritten after every sample, so a run cut short keeps what
it measured (``complete`` says whether both parts finished).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling latency.py
from latency import device_info, rss_mb, versions  # noqa: E402

from sf_sdk.config import to_dict  # noqa: E402
from sf_sdk.generator import StreamingGenerator, cpu_threads  # noqa: E402
from sf_sdk.results import video_frames_for_latents  # noqa: E402
from sf_sdk.stats import percentile  # noqa: E402

log = logging.getLogger("soak")

PROMPTS = ("a red circle moving right", "a blue square moving up", "a green triangle moving left",
           "a yellow circle moving down")
SHORT = {"latent_frames": 240, "sample_every": 60}


class Soak:
    """The samples of one part and the JSON report they go into."""

    def __init__(self, report: dict[str, Any], part: str, out: Path | None, sample_every: int) -> None:
        self.report, self.name, self.out, self.sample_every = report, part, out, sample_every
        self.part = report["parts"][part] = {"samples": [], "frames": 0, "chunks": 0, "nan_chunks": 0}
        self._times: list[float] = []
        self._cpu: list[float] = []
        self._next = sample_every

    def chunk(self, latents: torch.Tensor) -> None:
        """Count one chunk's latent frames and check it for NaN / Inf (a host sync per chunk: the
        soak measures the whole loop, checks included)."""
        self.part["frames"] += latents.shape[0]
        self.part["chunks"] += 1
        if not bool(torch.isfinite(latents).all()):
            self.part["nan_chunks"] += 1

    def timed(self, seconds: float, cpu_seconds: float) -> None:
        self._times.append(seconds)
        self._cpu.append(cpu_seconds)
        if self.part["frames"] >= self._next:
            self._sample()
            self._next += self.sample_every

    def _sample(self) -> None:
        t = self._times
        self.part["samples"].append({"frames": self.part["frames"], "rss_mb": round(rss_mb() or 0.0, 1),
                                     "chunk_p50_ms": round(percentile(t, 50) * 1e3, 3),
                                     "chunk_p90_ms": round(percentile(t, 90) * 1e3, 3),
                                     "chunk_cpu_p50_ms": round(percentile(self._cpu, 50) * 1e3, 3), "timed": len(t)})
        self._times, self._cpu = [], []
        s = self.part["samples"]
        self.part.update(rss_growth_mb=round(s[-1]["rss_mb"] - s[0]["rss_mb"], 1),
                         latency_drift=round(s[-1]["chunk_p50_ms"] / s[0]["chunk_p50_ms"], 3),
                         cpu_drift=round(s[-1]["chunk_cpu_p50_ms"] / s[0]["chunk_cpu_p50_ms"], 3))
        log.info("%s: %d latent frames, rss %.1f MB, chunk p50 %.1f ms, %d NaN chunks", self.name, s[-1]["frames"],
                 s[-1]["rss_mb"], s[-1]["chunk_p50_ms"], self.part["nan_chunks"])
        write(self.report, self.out)


def write(report: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out)


def soak_stream(gen: StreamingGenerator, soak: Soak, frames: int) -> None:
    with gen.stream(PROMPTS[0], seed=0) as stream:
        while soak.part["frames"] < frames:
            t0, c0 = time.perf_counter(), time.process_time()
            chunk = next(stream)
            soak.chunk(chunk.latents)
            soak.timed(time.perf_counter() - t0, time.process_time() - c0)


def soak_pool(gen: StreamingGenerator, soak: Soak, frames: int, streams: int, max_chunks: int, seed: int) -> None:
    rng = random.Random(seed)
    c = gen.streaming.num_frame_per_block
    pool = gen.pool(streams)
    opened = closed_early = 0
    while soak.part["frames"] < frames:
        while pool.free_slots and (not pool.streams or rng.random() < 0.5):
            length = video_frames_for_latents(c * rng.randint(2, max_chunks), gen.temporal_stride)
            pool.open(rng.choice(PROMPTS), seed=rng.randrange(2**31), num_frames=length)
            opened += 1
        if pool.streams and rng.random() < 0.05:
            rng.choice(pool.streams).close()
            closed_early += 1
            if not pool.streams:
                continue
        t0, c0 = time.perf_counter(), time.process_time()
        out = pool.step()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        for chunk in out.values():
            soak.chunk(chunk.latents)
        soak.timed(elapsed, cpu)
    pool.close()
    soak.part.update(streams_opened=opened, streams_closed_early=closed_early, slots=streams)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-tiny", help="model folder or bundled name (default shapes-tiny)")
    p.add_argument("--latent-frames", type=int, default=10000, help="latent frames per part (default 10000)")
    p.add_argument("--sample-every", type=int, default=500, help="latent frames between samples (default 500)")
    p.add_argument("--window", type=int, help="rolling window in latent frames (default: the model's)")
    p.add_argument("--pool-streams", type=int, default=4, help="pool slots (default 4)")
    p.add_argument("--max-chunks", type=int, default=20, help="longest pooled stream in chunks (default 20)")
    p.add_argument("--parts", default="stream,pool", help="comma-separated parts to run (default stream,pool)")
    p.add_argument("--short", action="store_true", help=f"{SHORT['latent_frames']} latent frames per part, a sample "
                                                         f"every {SHORT['sample_every']}")
    p.add_argument("--backend", default="eager", help="backend (default eager: auto would switch backends mid-run "
                                                      "once its background build is done)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here (rewritten after every sample)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.short:
        args.latent_frames, args.sample_every = SHORT["latent_frames"], SHORT["sample_every"]
    parts = [x for x in args.parts.split(",") if x]
    if not parts or any(x not in ("stream", "pool") for x in parts):
        p.error(f"--parts takes stream and/or pool, got {args.parts!r}")
    if args.latent_frames <= 0 or args.sample_every <= 0 or args.pool_streams <= 0 or args.max_chunks < 2:
        p.error("--latent-frames, --sample-every and --pool-streams must be positive, --max-chunks at least 2")
    with cpu_threads(args.threads):
        streaming = {"local_attn_size": args.window} if args.window else None
        gen = StreamingGenerator.from_pretrained(args.model, streaming=streaming, backend=args.backend)
        if not gen.streaming.rolling:
            p.error("the soak streams unbounded video: the model needs a rolling window (--window N)")
        report: dict[str, Any] = {
            "benchmark": "soak", "model": args.model, "backend": gen.backend.name, "device": device_info(gen.device),
            "versions": versions(),
            "streaming": to_dict(gen.streaming), "latent_frames": args.latent_frames,
            "sample_every": args.sample_every, "parts": {}, "complete": False,
            "definitions": {"rss_mb": "VmRSS of this process after the interval's last chunk",
                            "chunk_p50_ms": "p50 over the interval of next(stream) / pool.step() wall time "
                                            "(DiT, VAE decode, bookkeeping); sf_sdk.stats.percentile",
                            "chunk_cpu_p50_ms": "the same in CPU seconds of this process (time.process_time): "
                                                "what drifts on a shared machine without the others' load",
                            "rss_growth_mb": "last sample's rss_mb minus the first's",
                            "latency_drift": "last interval's chunk_p50_ms over the first's",
                            "cpu_drift": "last interval's chunk_cpu_p50_ms over the first's",
                            "nan_chunks": "chunks whose latents hold NaN or infinite values"}}
        t0 = time.perf_counter()
        for part in parts:
            soak = Soak(report, part, args.json, args.sample_every)
            if part == "stream":
                soak_stream(gen, soak, args.latent_frames)
            else:
                soak_pool(gen, soak, args.latent_frames, args.pool_streams, args.max_chunks, args.seed)
        report.update(complete=True, wall_s=round(time.perf_counter() - t0, 1))
        write(report, args.json)
    for name, r in report["parts"].items():
        print(f"{name}: {r['frames']} latent frames in {r['chunks']} chunks, RSS growth {r.get('rss_growth_mb')} MB, "
              f"latency drift x{r.get('latency_drift')}, {r['nan_chunks']} NaN chunks")
    nan = sum(r["nan_chunks"] for r in report["parts"].values())
    return 1 if nan else 0


if __name__ == "__main__":
    sys.exit(main())
