"""``--verify``: stream through an exported artifact and through eager PyTorch, compare.

The DiT check streams at least 4 chunks (more if needed for the window to evict) with the full
few-step schedule and the cache pass, the same noise for both (two generators with one seed);
it compares every chunk's x0 and, at the end, the valid slots of the KV cache. The VAE check
decodes a latent stream in two uneven chunks through the exported decode steps and through
:class:`sf_sdk.models.vae.StreamingDecoder`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

from export.settings import ChunkShapes, ExportModel, ExportSettings, attention_backend, tolerance
from sf_sdk.models.dit import CrossAttnCache
from sf_sdk.sampling import ChunkModel, ChunkSchedule, denoise_chunk, randn_rows

__all__ = ["VerifyResult", "verify_chunk_model", "verify_decoder", "verify_chunks", "stream_setup",
           "VerificationError"]

log = logging.getLogger(__name__)

MIN_CHUNKS = 4
# Latent frames streamed through the decoder check, split in two chunks.
DECODE_FRAMES = (2, 3)


class VerificationError(RuntimeError):
    """An exported artifact disagrees with eager PyTorch beyond the tolerance."""


@dataclass
class VerifyResult:
    step: str
    max_abs_error: float
    tolerance: float
    chunks: int
    evictions: int

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_abs_error) and self.max_abs_error <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def verify_chunks(model: ExportModel, settings: ExportSettings) -> tuple[int, int]:
    """(chunks to stream, frames evicted by then): at least 4 chunks, and past the window's first
    eviction when the cache rolls."""
    layout_frames = model.chunk_shapes(settings).cache_capacity // math.prod(model.chunk_shapes(settings).grid_hw)
    chunk = model.streaming.num_frame_per_block
    if model.streaming.rolling:
        n = max(MIN_CHUNKS, layout_frames // chunk + 2)
        return n, max(0, n * chunk - layout_frames)
    n = min(MIN_CHUNKS, layout_frames // chunk)
    log.warning("global attention: the cache holds the whole stream (%d frames), nothing is evicted; "
                "verify streams %d chunks", layout_frames, n)
    return n, 0


def stream_setup(model: ExportModel, settings: ExportSettings, seed: int
                 ) -> tuple[ChunkShapes, torch.device, ChunkSchedule, CrossAttnCache]:
    """What a stream through a chunk step of ``model`` needs besides its cache and noise: the step's
    shapes, the device, the few-step schedule and a random prompt's cross-attention K/V (seeded; the
    same for every runner). Call under ``no_grad``."""
    dit = model.dit
    shapes = model.chunk_shapes(settings)
    device = torch.device(settings.device)
    prompt = torch.Generator(device="cpu").manual_seed(seed)
    emb = torch.randn(shapes.batch, max(1, dit.config.text_len // 2), dit.config.text_dim, generator=prompt)
    return shapes, device, ChunkSchedule.from_config(model.streaming), dit.encode_context(emb.to(device, shapes.dtype))


def verify_chunk_model(model: ExportModel, candidate: ChunkModel, settings: ExportSettings, *,
                       seed: int = 0, name: str = "chunk", tol: float | None = None) -> VerifyResult:
    """Stream the same noise through ``candidate`` and the eager DiT; max abs error over x0 and cache.

    With a batch of several streams the check runs a pool: row ``r`` joins ``r % 2`` chunks late
    (idle rows are computed and ignored), so rows sit at different frame positions and wrap the
    ring at different chunks, as pooled streams do.
    """
    dit, stream = model.dit, model.streaming
    chunks, evicted = verify_chunks(model, settings)
    with torch.no_grad(), attention_backend(settings.attention):
        shapes, device, steps, cross = stream_setup(model, settings, seed)
        rows = shapes.batch
        late = [r % 2 for r in range(rows)]  # chunks each row waits before it joins
        if rows > 1 and not stream.rolling:
            late = [0] * rows  # a global cache holds exactly the stream: no room to stagger
        caches = [dit.new_cache(stream, rows, num_frames=settings.num_frames) for _ in range(2)]
        gens = [[torch.Generator(device=device).manual_seed(seed + 1 + r) for r in range(rows)] for _ in range(2)]
        err = 0.0
        c = stream.num_frame_per_block
        for i in range(chunks + max(late)):
            starts = [(i - w) * c if 0 <= i - w < chunks else None for w in late]
            outs = []
            for runner, cache, row_gens in zip((dit, candidate), caches, gens):
                plan = cache.plan_rows(starts, c)
                active = [g if s is not None else None for g, s in zip(row_gens, starts)]
                noise = randn_rows(shapes.latent_shape, active, device=device, dtype=shapes.dtype)
                outs.append(denoise_chunk(runner, noise, cross, cache, plan, steps, generator=active))
            on = torch.tensor([s is not None for s in starts], device=device)
            chunk_err = (outs[0].float() - outs[1].float())[on].abs().max().item()
            log.info("verify %s: step %d (row starts %s) max abs error %.3g", name, i, starts, chunk_err)
            err = max(err, chunk_err)
        for r in range(rows):
            valid = caches[0].valid_tokens(r)
            for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
                err = max(err, (a[:, r, :valid].float() - b[:, r, :valid].float()).abs().max().item())
    return VerifyResult(name, err, tol if tol is not None else tolerance(shapes.dtype), chunks, evicted)


def verify_decoder(model: ExportModel, decoder, settings: ExportSettings, *, seed: int = 0,
                   name: str = "vae", tol: float | None = None) -> VerifyResult:
    """Decode the same latent stream with ``decoder`` and the eager streaming decoder."""
    if model.vae is None:
        raise ValueError("the model has no VAE to verify")
    shapes = model.decode_shapes(settings)
    device = torch.device(settings.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(shapes.batch, shapes.z_dim, sum(DECODE_FRAMES), *shapes.latent_hw, generator=gen)
    z = z.to(device, shapes.dtype)
    eager = model.vae.streaming_decoder()
    decoder.reset()
    err, start = 0.0, 0
    with torch.no_grad():
        for n in DECODE_FRAMES:
            part = z[:, :, start:start + n]
            ref, got = eager.decode(part), decoder.decode(part)
            if ref.shape != got.shape:
                raise VerificationError(f"{name}: decoded {tuple(got.shape)}, eager decodes {tuple(ref.shape)}")
            err = max(err, (ref.float() - got.float()).abs().max().item())
            start += n
    return VerifyResult(name, err, tol if tol is not None else tolerance(shapes.dtype), len(DECODE_FRAMES), 0)


def report(results: list[VerifyResult]) -> None:
    """Log every result; raise VerificationError if any is above its tolerance."""
    bad = []
    for r in results:
        log.info("verify %-9s max abs error %.3g (tolerance %.0e, %d chunks, %d frames evicted): %s", r.step,
                 r.max_abs_error, r.tolerance, r.chunks, r.evictions, "ok" if r.ok else "FAILED")
        if not r.ok:
            bad.append(r)
    if bad:
        raise VerificationError("; ".join(f"{r.step}: max abs error {r.max_abs_error:.3g} > {r.tolerance:.0e}"
                                          for r in bad))
