"""The measured half of ``backend="auto"``'s rule: an exported DiT step timed against eager where it
was built, and the verdict kept with the cache entry.

The static rule (:func:`export.auto.choose_backends`) says which exporter is the fastest for a
device and dtype; whether that export beats eager *for this model and stream geometry* is only
known by running both. Right after an export (in this process for ``build="now"``, in the
background builder otherwise) :func:`time_chunk_models` streams the same noise through the eager
DiT and the exported step, the two interleaved round by round, and :func:`write_measurement`
stores the medians in the entry (``measured.json``). Later runs read it
(:func:`eager_is_faster`) and stream eagerly where eager measured faster by more than
:data:`MARGIN`, with a log line; the entry stays, so the choice costs nothing after the build.

On this project's 2-core CPU that is the tiny race config in float32: its AOTInductor step runs
the same float32 matmuls as eager (~10% slower at one thread), while on the bundled shapes-tiny
(more, smaller layers) and in bfloat16 the export leads by 1.3-1.5x (docs/performance.md).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from export.settings import ExportModel, ExportSettings
from export.verify import stream_setup
from sf_sdk.sampling import ChunkModel, denoise_chunk, randn_rows

__all__ = ["MEASURE_FILE", "MARGIN", "time_chunk_models", "write_measurement", "read_measurement",
           "eager_is_faster"]

log = logging.getLogger(__name__)

MEASURE_FILE = "measured.json"
# Eager replaces a built export only when its chunk is at least this much faster (timing noise
# on a shared machine is a few percent; a lost export is worth keeping otherwise).
MARGIN = 0.95
TIMED_CHUNKS = 4  # per stream, after its first chunk (which is not timed)
BUDGET_S = 20.0  # no further round starts after this long (a large model on a CPU: one round)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_chunk_models(model: ExportModel, runners: Mapping[str, ChunkModel], settings: ExportSettings, *,
                      rounds: int = 3, seed: int = 0, budget_s: float = BUDGET_S) -> dict[str, float]:
    """Median seconds per chunk of each runner (e.g. ``{"eager": dit, "aoti": step}``): every round
    streams ``1 + TIMED_CHUNKS`` chunks of the same noise through each runner in turn (all rows of
    the batch at once, the full few-step schedule and the cache pass); the first chunk of each
    stream is not timed. Under global attention the stream is cut to what the cache holds. At most
    ``rounds`` rounds, and none started after ``budget_s`` seconds."""
    dit, stream = model.dit, model.streaming
    shapes = model.chunk_shapes(settings)
    c = stream.num_frame_per_block
    chunks = 1 + TIMED_CHUNKS
    if not stream.rolling:
        chunks = min(chunks, shapes.cache_capacity // (c * shapes.grid_hw[0] * shapes.grid_hw[1]))
    if chunks < 2:
        raise ValueError(f"the cache holds {chunks} chunk(s): nothing to time after the first")
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        shapes, device, steps, cross = stream_setup(model, settings, seed)
        start = time.perf_counter()
        for _ in range(rounds):
            if time.perf_counter() - start > budget_s:
                break
            for name, runner in runners.items():
                cache = dit.new_cache(stream, shapes.batch, num_frames=settings.num_frames)
                gens = [torch.Generator(device=device).manual_seed(seed + 1 + r) for r in range(shapes.batch)]
                for i in range(chunks):
                    plan = cache.plan_rows([i * c] * shapes.batch, c)
                    noise = randn_rows(shapes.latent_shape, gens, device=device, dtype=shapes.dtype)
                    _sync(device)
                    t0 = time.perf_counter()
                    denoise_chunk(runner, noise, cross, cache, plan, steps, generator=gens)
                    _sync(device)
                    if i:
                        times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def write_measurement(folder: Path, backend: str, seconds: Mapping[str, float]) -> dict[str, Any]:
    """Record ``seconds`` (median s per chunk of ``"eager"`` and ``backend``) in ``folder``."""
    record = {"backend": backend, "seconds_per_chunk": {k: round(v, 6) for k, v in seconds.items()},
              "threads": torch.get_num_threads(), "margin": MARGIN,
              "eager_faster": seconds["eager"] < MARGIN * seconds[backend]}
    (Path(folder) / MEASURE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_measurement(folder: Path) -> dict[str, Any] | None:
    """The entry's recorded measurement, or None (not measured: an older entry, or it failed)."""
    path = Path(folder) / MEASURE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def eager_is_faster(folder: Path) -> tuple[bool, str]:
    """(whether the entry's export measured slower than eager, a sentence saying so)."""
    record = read_measurement(folder)
    if record is None:
        return False, "not measured"
    try:
        s = record["seconds_per_chunk"]
        backend = record["backend"]
        why = (f"{backend} {s[backend] * 1e3:.1f} ms against eager {s['eager'] * 1e3:.1f} ms per chunk when it "
               f"was built ({record['threads']} thread(s))")
        return bool(record["eager_faster"]), why
    except (KeyError, TypeError, ValueError):  # a record this version cannot read: the static rule
        log.warning("%s: unreadable %s, ignored (the export is used)", folder, MEASURE_FILE)
        return False, "unreadable measurement"
