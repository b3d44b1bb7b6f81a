"""Many streams in one batched DiT call, and prompt changes while a stream runs.

A :class:`StreamPool` holds ``max_streams`` slots over one KV cache of as many rows. Every
:meth:`StreamPool.step` advances each open stream by one chunk: ONE batched DiT call per
denoising step (and one for the cache pass) for all of them, then each stream's own VAE decode.
Streams join (:meth:`StreamPool.open`) and leave (:meth:`PooledStream.close`, or the end of
their frames) at any chunk boundary; each keeps its own prompt, seed, frame position (rows sit
at different positions: per-row cache slots, valid lengths and rotary tables), window, decoder
state and timing. The guarantee: a stream's chunks equal those of the same stream run alone
(same prompt, seed and settings), up to float rounding (1e-4 max abs in float32 in the tests),
whatever else shares the batch and whenever it joined or left.

A full pool raises :class:`PoolFullError` (it does not queue: a server decides whom to queue).
A pool is meant to be driven by one thread (sf-serve's engine); calls from several threads are
serialized (a lock), never interleaved inside a step. :meth:`sf_sdk.StreamingGenerator.stream`
is a pool of one.

Prompt transitions (:meth:`PooledStream.set_prompt`) take effect at the next chunk boundary:

* ``"recache"`` (LongLive's KV re-cache): the frames the cache holds (sinks and window) are
  re-encoded under the new prompt in one forward pass (:func:`sf_sdk.sampling.recache`), so the
  next chunk continues the same scene under the new text;
* ``"blend"``: the prompt embedding moves linearly from the old to the new one over ``chunks``
  chunks (chunk k of the blend uses ``(1 - k/n) old + (k/n) new`` of the zero-padded
  embeddings), the cache untouched;
* ``"cut"``: the new prompt from the next chunk on, the cache kept as it is.

:meth:`PooledStream.reset` starts the stream afresh at frame 0 (cache row and decoder cleared)
with its current prompt; its noise generator runs on, so the new start differs from the first.

Rolling Forcing's joint window (``denoise_window`` > 1) runs in a pool of one stream (what
:meth:`sf_sdk.StreamingGenerator.stream` uses), on the eager DiT: each :meth:`StreamPool.step`
advances the stream's window until its oldest chunk is clean (:func:`sf_sdk.sampling.rolling_chunk`),
writes that chunk with the cache pass and decodes it. A prompt change applies to the in-flight
chunks from the next call on (a re-cache re-encodes the clean cached frames, as without a window);
``reset`` and ``close`` drop the in-flight chunks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from sf_sdk.attention import CacheAttention, select_cache_attention
from sf_sdk.backends import Backend
from sf_sdk.cache import CacheLayout, KVCache, cache_nbytes, check_memory
from sf_sdk.models.dit import CrossAttnCache
from sf_sdk.models.taehv import TinyStreamingDecoder, decode_tiny_streams
from sf_sdk.models.vae import StreamingDecoder, decode_streams
from sf_sdk.results import Clock, VideoChunk, to_uint8, video_frames_for_latents
from sf_sdk.sampling import (
    RollingWindow,
    cache_pass,
    denoise_chunk,
    kept_frames,
    randn_rows,
    recache,
    rolling_chunk,
)

if TYPE_CHECKING:  # pragma: no cover
    from sf_sdk.generator import StreamingGenerator

__all__ = ["StreamPool", "PooledStream", "PoolFullError", "NonFiniteError", "StreamRequest", "TRANSITIONS",
           "check_transition"]

log = logging.getLogger(__name__)

TRANSITIONS = ("recache", "blend", "cut")
DEFAULT_BLEND_CHUNKS = 3
# Eager streaming decoders whose streams a pool decodes in one batched call, by decoder type.
_BATCHED_DECODE = {StreamingDecoder: decode_streams, TinyStreamingDecoder: decode_tiny_streams}


def check_transition(transition: str, chunks: int) -> None:
    """Raise a clear ValueError for an unknown transition or a blend without chunks."""
    if transition not in TRANSITIONS:
        raise ValueError(f"transition must be one of {list(TRANSITIONS)}, got {transition!r}")
    if transition == "blend" and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1):
        raise ValueError(f"a blend needs chunks >= 1 (chunks over which the prompt moves), got {chunks!r}")


class PoolFullError(RuntimeError):
    """Every slot of a stream pool is taken."""


class NonFiniteError(RuntimeError):
    """A stream's first chunk came out with NaN or infinite values (it would decode to black)."""


def non_finite_cause(gen: StreamingGenerator, what: str) -> str:
    """The error message for a non-finite first chunk, naming the likely cause: non-finite weights
    (checked now, once: this runs only on the error path), float16 overflow, or the config."""
    from sf_sdk.checkpoint.weights import non_finite_tensors

    head = f"the first chunk's {what} hold NaN or infinite values (the video would be black)"
    modules = {"DiT": gen.dit} | ({"VAE": gen.vae} if gen.vae is not None else {})
    for name, module in modules.items():
        bad = non_finite_tensors(module)
        if bad:
            return (f"{head}: the {name} weights hold NaN or infinite values in {len(bad)} tensor(s) "
                    f"({', '.join(bad[:5])}): reload the model or use an earlier checkpoint")
    if gen.dtype == torch.float16:
        return (f"{head}, with finite weights: the model computes in float16, whose range (65504) the "
                f"activations overflow: use dtype='bfloat16' or 'float32'")
    st = gen.streaming
    return (f"{head}, with finite weights in {gen.dtype}: check the streaming config (timestep_shift="
            f"{st.timestep_shift}, denoising_step_list={list(st.denoising_step_list)}, context_noise="
            f"{st.context_noise}) and the prompt embeddings for extreme values")


@dataclass
class StreamRequest:
    """A validated stream request (see :meth:`sf_sdk.StreamingGenerator.stream`)."""

    prompt: str | None
    prompt_embeds: Tensor | None
    latent_frames: int | None
    seed: int
    decode: bool
    initial_latent: Tensor | None
    initial_frames: np.ndarray | None  # uint8 [T, H, W, 3], returned as-is for the initial chunks


@dataclass
class _Transition:
    kind: str
    prompt: str | None
    embeds: Tensor  # [text_len, text_dim], zero-padded
    chunks: int = 1
    done: int = 0
    source: Tensor | None = None  # blend: the embedding it starts from


class PooledStream:
    """One stream of a :class:`StreamPool`: a handle to steer it (``set_prompt``, ``reset``,
    ``close``) and read its state (``chunks_done``, ``next_frame``, ``closed``, ``prompt``)."""

    def __init__(self, pool: StreamPool, row: int, req: StreamRequest, embeds: Tensor) -> None:
        gen = pool._gen
        self._pool = pool
        self.row = row
        self._req = req
        self.prompt = req.prompt
        self._embeds = embeds  # [text_len, text_dim], the prompt in effect
        self._rng = torch.Generator(device=gen.device).manual_seed(req.seed)
        make = pool.backend.make_decoder
        self._decoder = make() if req.decode and make else None
        self._pending: _Transition | None = None
        self._blend: _Transition | None = None
        self._reset_pending = False
        self._window = RollingWindow()  # in-flight chunks of a joint denoising window (denoise_window > 1)
        self.next_frame = 0  # first latent frame of the next chunk
        self.chunks_done = 0
        self.closed = False
        self.finished = False  # closed because it produced all of its frames
        pool._set_cross(row, embeds)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at frame {self.next_frame}"
        return f"PooledStream(row={self.row}, {self.chunks_done} chunks, {state})"

    # ------------------------------------------------------------------ steering
    def set_prompt(self, prompt: str | None = None, *, prompt_embeds: Tensor | None = None,
                   transition: str = "recache", chunks: int = DEFAULT_BLEND_CHUNKS) -> None:
        """Change the prompt from the next chunk on; ``transition``: ``"recache"``, ``"blend"``
        (over ``chunks`` chunks) or ``"cut"`` (module docstring). A later call replaces a
        transition that has not started yet."""
        self._check_open("set_prompt")
        check_transition(transition, chunks)
        embeds = self._pool._gen._padded_embeds(prompt, prompt_embeds)
        self._pending = _Transition(transition, prompt, embeds, chunks if transition == "blend" else 1)

    def reset(self) -> None:
        """Start again at frame 0 from the next chunk on (cache and decoder cleared), same prompt."""
        self._check_open("reset")
        self._reset_pending = True

    def close(self) -> None:
        """Leave the pool; the slot is free for the next stream at once."""
        if not self.closed:
            self.closed = True
            self._pool._release(self)

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise RuntimeError(f"{what}() on a closed stream (row {self.row}, {self.chunks_done} chunks done"
                               f"{', finished' if self.finished else ''}): open a new one")

    # ------------------------------------------------------------------ at the chunk boundary
    def _apply_boundary(self) -> None:
        pool = self._pool
        if self._reset_pending:
            self._reset_pending = False
            pool._cache.reset([self.row])
            if self._decoder is not None:
                self._decoder.reset()
            self._window.clear()
            self.next_frame = 0
        t = self._pending
        if t is not None:
            self._pending = None
            self.prompt = t.prompt
            if t.kind == "blend":
                t.source = self._embeds  # where the prompt is now (mid-blend, if one was running)
                self._blend = t
            else:
                self._blend = None
                self._set_embeds(t.embeds)
                if t.kind == "recache":
                    pool._recache(self)
        if self._blend is not None:
            b = self._blend
            b.done += 1
            w = b.done / b.chunks
            self._set_embeds(b.embeds if b.done >= b.chunks else torch.lerp(b.source, b.embeds, w))
            if b.done >= b.chunks:
                self._blend = None

    def _set_embeds(self, embeds: Tensor) -> None:
        self._embeds = embeds
        self._pool._set_cross(self.row, embeds)

    @property
    def _initial(self) -> Tensor | None:
        init = self._req.initial_latent
        return init if init is not None and self.next_frame < init.shape[0] else None

    @property
    def _frame_alone(self) -> bool:
        """The next chunk is frame 0 on its own (``independent_first_frame``)."""
        return self.next_frame == 0 and self._pool._gen.streaming.independent_first_frame

    @property
    def _first_generated(self) -> bool:
        """The next chunk is the first this stream denoises (after any given video)."""
        init = self._req.initial_latent
        return self.next_frame == (init.shape[0] if init is not None else 0)


class StreamPool:
    """``max_streams`` streams advanced together, one batched DiT call per denoising step.

    Build it with :meth:`sf_sdk.StreamingGenerator.pool`. ``max_frames`` (video frames) sizes
    the cache of a model with global attention (the longest stream it can hold); rolling-window
    models need none. Iterating the pool repeats :meth:`step` while any stream is open.
    """

    def __init__(self, gen: StreamingGenerator, max_streams: int, *, latent_capacity: int | None = None,
                 fit: bool = False) -> None:
        if not isinstance(max_streams, int) or isinstance(max_streams, bool) or max_streams < 1:
            raise ValueError(f"max_streams must be a positive int, got {max_streams!r}")
        self._gen = gen
        self.max_streams = max_streams
        self.backend = gen.backend.for_streams(max_streams)
        st, cfg = gen.streaming, gen.dit.config
        if not st.rolling:
            latent_capacity = self._global_capacity(latent_capacity)
        static = getattr(self.backend.dit, "shapes", None)
        if static is not None and static.batch != max_streams:
            raise ValueError(f"the {self.backend.name} backend's chunk step was exported for a batch of {static.batch} "
                             f"stream(s); a pool of {max_streams} needs an export with --batch {max_streams}")
        self._static_rows = static is not None
        if st.denoise_window > 1:
            self._check_window(max_streams)
        # fit: every stream has at most latent_capacity frames, so a shorter cache than the window
        # may do (an exported step's cache keeps the window's fixed shape).
        fit = fit and static is None
        self._check_memory(CacheLayout.from_configs(cfg, st, latent_capacity, fit=fit), max_streams)
        self._cache = KVCache.for_model(cfg, st, max_streams, num_frames=latent_capacity, fit=fit, dtype=gen.dtype,
                                        device=gen.device)
        lay = self._cache.layout
        dev, dt = gen.device, gen.dtype
        cross = (cfg.num_layers, max_streams, cfg.text_len, cfg.num_heads, cfg.head_dim)
        self._cross_k = torch.zeros(cross, device=dev, dtype=dt)  # [L, N, Lt, H, D]
        self._cross_v = torch.zeros(cross, device=dev, dtype=dt)
        # The clean latents each cache row was written from, per frame slot (for re-caching).
        self._latents = torch.zeros(max_streams, lay.capacity_frames, cfg.in_dim, st.latent_height,
                                    st.latent_width, device=dev, dtype=dt)  # [N, frames, C, h, w]
        self._slots: list[PooledStream | None] = [None] * max_streams
        self._impl: dict[bool, CacheAttention] = {}
        self._clock = Clock(dev)
        # Streams join, leave and step one at a time even if a caller uses several threads.
        self._lock = threading.RLock()

    def _global_capacity(self, frames: int | None) -> int | None:
        """Under global attention, the cache capacity (latent frames) for streams of at most ``frames``
        on this pool's backend: an exported chunk step keeps the capacity it was exported for
        (``global_cache_frames``; its attention reads only the frames written). A longer stream
        runs the eager DiT where the backend is ``auto``, and is refused by an explicit backend."""
        static = getattr(self.backend.dit, "shapes", None)
        if static is None:
            return frames
        gen = self._gen
        held = static.cache_shape[2] // CacheLayout.from_configs(gen.dit.config, gen.streaming).tokens_per_frame
        if frames is None or frames <= held:
            return held
        if self.backend.components is None:
            raise ValueError(f"the {self.backend.name} backend's chunk step was exported for a global-attention cache "
                             f"of {held} latent frames; this needs {frames}: re-export with --num-frames {frames} "
                             f"(or global_cache_frames={frames}), generate fewer frames, or use backend='auto'")
        log.info("auto: a global-attention stream of %d latent frames exceeds the exported DiT's cache (%d frames, "
                 "global_cache_frames): it runs the eager DiT", frames, held)
        parts = self.backend.components
        self.backend = Backend(self.backend.name.replace(f"dit={parts['dit']}", "dit=eager"), gen.dit,
                               self.backend.make_decoder, components={**parts, "dit": "eager"})
        return frames

    def _check_window(self, max_streams: int) -> None:
        """A joint denoising window (``denoise_window`` > 1) runs one stream on the eager DiT."""
        st = self._gen.streaming
        if max_streams > 1:
            raise ValueError(f"denoise_window={st.denoise_window} (Rolling Forcing's joint window) runs one stream at a "
                             f"time: its windows fill and drain per stream, so streams cannot share its calls; use "
                             f"gen.stream(...) or pool(max_streams=1) (sf-serve: --max-sessions 1), or denoise_window=1 to pool "
                             f"{max_streams} streams")
        if self.backend.dit is not self._gen.dit:
            if self.backend.name != "auto":
                raise ValueError(f"denoise_window={st.denoise_window} (Rolling Forcing's joint window) runs the eager "
                                 f"DiT (its window call is not exported); the {self.backend.name} backend has an "
                                 f"exported chunk step: use backend='eager' (or 'auto'), or denoise_window=1")
            log.info("denoise_window=%d: the joint window runs the eager DiT (the auto backend's DiT step is "
                     "for one chunk at a time)", st.denoise_window)

    def _check_memory(self, lay: CacheLayout, rows: int) -> None:
        """Fail before allocating when the KV cache and the pool's buffers (prompt K/V, the latents
        kept for re-caching) exceed the device's available memory; the model's activations come on top."""
        gen, st, cfg = self._gen, self._gen.streaming, self._gen.dit.config
        item = torch.empty((), dtype=gen.dtype).element_size()
        cross = 2 * cfg.num_layers * rows * cfg.text_len * cfg.num_heads * cfg.head_dim * item
        latents = rows * lay.capacity_frames * cfg.in_dim * st.latent_height * st.latent_width * item
        needed = cache_nbytes(lay, cfg.num_layers, rows, cfg.num_heads, cfg.head_dim, gen.dtype) + cross + latents
        if lay.global_attention and st.rolling:
            what = (f"a KV cache of {lay.capacity_frames} latent frames (the stream's length, under the window "
                    f"local_attn_size={st.local_attn_size})")
            advice = "generate fewer frames, or lower the window (local_attn_size / --window) below the stream's length"
        elif st.rolling:
            what = (f"a KV cache of {lay.capacity_frames} latent frames (the window: local_attn_size / --window "
                    f"{st.local_attn_size})")
            advice = ("lower the window (local_attn_size / --window), give the stream a length (num_frames) shorter "
                      "than the window, or load the model in a smaller dtype")
        else:
            what = f"a global-attention KV cache of {lay.capacity_frames} latent frames (the longest stream)"
            advice = "generate fewer frames, or stream with a rolling window (local_attn_size / --window)"
        if rows > 1:
            what, advice = f"{what} for {rows} streams", f"{advice}, or pool fewer streams"
        check_memory(needed, gen.device, what, advice)

    # ------------------------------------------------------------------ streams
    @property
    def streams(self) -> list[PooledStream]:
        """The open streams, by slot."""
        return [s for s in self._slots if s is not None]

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self._slots)

    @property
    def cache(self) -> KVCache:
        return self._cache

    def open(self, prompt: str | None = None, *, prompt_embeds: Tensor | None = None, seed: int = 0,
             num_frames: int | None = None, decode: bool = True, initial_latent: Tensor | None = None,
             initial_frames: np.ndarray | Tensor | None = None, image: Any = None) -> PooledStream:
        """Add a stream (arguments as :meth:`sf_sdk.StreamingGenerator.stream`); it computes its first
        chunk at the next :meth:`step`. Raises :class:`PoolFullError` when every slot is taken."""
        if image is not None:
            if initial_latent is not None or initial_frames is not None:
                raise ValueError("give image, initial_latent or initial_frames, not several")
            initial_latent = self._gen._image_latent(image)
        req = self._gen._check_request(prompt, prompt_embeds, num_frames, seed, decode, initial_latent,
                                       initial_frames)
        return self._open(req)

    def _open(self, req: StreamRequest) -> PooledStream:
        with self._lock:
            return self._open_locked(req)

    def _open_locked(self, req: StreamRequest) -> PooledStream:
        lay = self._cache.layout
        if lay.global_attention and (req.latent_frames is None or req.latent_frames > lay.capacity_frames):
            cap = video_frames_for_latents(lay.capacity_frames, self._gen.temporal_stride)
            fix = ("build the pool with a larger max_frames, or none (the window)" if self._gen.streaming.rolling
                   else "build the pool with a larger max_frames, or load the model with a rolling window")
            raise ValueError(f"this pool's {'' if self._gen.streaming.rolling else 'global-attention '}cache holds "
                             f"{cap} video frames; the stream asks for "
                             f"{'an unbounded stream' if req.latent_frames is None else str(req.latent_frames) + ' latent frames'}"
                             f": {fix}")
        free = [r for r, s in enumerate(self._slots) if s is None]
        if not free:
            raise PoolFullError(f"all {self.max_streams} slots of the stream pool are in use: close a stream, or "
                                f"build a larger pool (gen.pool(max_streams=...))")
        row = free[0]
        embeds = self._gen._padded_embeds(req.prompt, req.prompt_embeds)
        self._cache.reset([row])
        stream = PooledStream(self, row, req, embeds)
        self._slots[row] = stream
        return stream

    def _release(self, stream: PooledStream) -> None:
        with self._lock:
            if self._slots[stream.row] is stream:
                self._slots[stream.row] = None

    def close(self) -> None:
        """Close every stream."""
        for s in self.streams:
            s.close()

    def __enter__(self) -> StreamPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict[PooledStream, VideoChunk]]:
        while self.streams:
            yield self.step()

    # ------------------------------------------------------------------ prompts
    def _set_cross(self, row: int, embeds: Tensor) -> None:
        with torch.inference_mode():
            cross = self._gen.dit.encode_context(embeds.unsqueeze(0))  # K/V [L, 1, Lt, H, D]
            self._cross_k[:, row] = cross.k[:, 0]
            self._cross_v[:, row] = cross.v[:, 0]

    def _row_cross(self, row: int) -> CrossAttnCache:
        return CrossAttnCache(self._cross_k[:, row:row + 1], self._cross_v[:, row:row + 1])

    def _recache(self, stream: PooledStream) -> None:
        keep_sinks = not self._gen.streaming.recache_sinks
        frames = kept_frames(self._cache, stream.row, sinks=not keep_sinks)
        if not frames:
            return
        lay = self._cache.layout
        slots = torch.tensor([lay.frame_slot(f) for f in frames], device=self._latents.device)
        with torch.inference_mode():
            latents = self._latents[stream.row].index_select(0, slots)  # [N, C, h, w]
            recache(self._gen.dit, latents, self._row_cross(stream.row), self._cache, stream.row,
                    self._gen.steps, self._gen.streaming.num_frame_per_block, generator=stream._rng,
                    keep_sinks=keep_sinks)

    # ------------------------------------------------------------------ the batched step
    def _attention(self, masked: bool, rows: int) -> CacheAttention:
        impl = self._impl.get(masked)
        if impl is None:  # chosen once per pool (per kind of call), never per layer call
            cfg, lay = self._gen.dit.config, self._cache.layout
            tokens = self._gen.streaming.num_frame_per_block * lay.tokens_per_frame
            example = torch.empty(1, dtype=self._gen.dtype, device=self._gen.device).expand(
                rows, tokens, cfg.num_heads, cfg.head_dim)
            impl = self._impl[masked] = select_cache_attention(None, example, masked=masked)
        return impl

    def step(self) -> dict[PooledStream, VideoChunk]:
        """Advance every open stream by one chunk; returns each stream's chunk."""
        with self._lock:
            return self._step()

    def _step(self) -> dict[PooledStream, VideoChunk]:
        active = [s for s in self._slots if s is not None]
        if not active:
            return {}
        gen, cache, clock = self._gen, self._cache, self._clock
        st = gen.streaming
        c = st.num_frame_per_block
        rows = self.max_streams if self._static_rows else 1 + max(s.row for s in active)
        by_row: list[PooledStream | None] = self._slots[:rows]
        with torch.inference_mode():
            t0 = clock.mark()
            for s in active:
                s._apply_boundary()
            if st.denoise_window > 1 and active[0]._initial is None:  # a pool of one (_check_window)
                return {active[0]: self._window_chunk(active[0], t0)}
            # A first frame of its own (independent_first_frame) runs alone, after the batch, in which
            # its row is idle (computed into slots it rewrites, never read).
            alone = [s for s in active if s._frame_alone]
            batch = [s for s in active if not s._frame_alone]
            by_row = [None if s is not None and s._frame_alone else s for s in by_row]
            out: dict[PooledStream, VideoChunk] = {}
            if batch:
                plan = cache.plan_rows([s.next_frame if s is not None else None for s in by_row], c)
                initial = [s._initial if s is not None else None for s in by_row]
                # Rows replaying a given video draw no noise for the denoising steps (as alone).
                noise_gens = [s._rng if s is not None and initial[r] is None else None for r, s in enumerate(by_row)]
                shape = (rows, c, gen.dit.config.in_dim, st.latent_height, st.latent_width)
                noise = randn_rows(shape, noise_gens, device=gen.device, dtype=gen.dtype)
                cross = CrossAttnCache(self._cross_k[:, :rows], self._cross_v[:, :rows])
                model = self.backend.dit
                attend = model.step_attention(cache, plan, self._attention(not plan.uniform, rows))  # once per chunk
                if any(i is None for i, s in zip(initial, by_row) if s is not None):
                    firsts = [s is not None and s._first_generated for s in by_row]
                    x0 = denoise_chunk(model, noise, cross, cache, plan, gen.steps, generator=noise_gens,
                                       update_cache=False, attend=attend, first_chunk=firsts)
                else:  # every stream replays given latents: only the cache pass
                    x0 = noise
                for r, init in enumerate(initial):
                    if init is not None:
                        x0[r] = init[by_row[r].next_frame:by_row[r].next_frame + c]
                cache_gens = [s._rng if s is not None else None for s in by_row]
                cache_pass(model, x0, cross, cache, plan, gen.steps, generator=cache_gens, attend=attend)
                lay = cache.layout
                for s in batch:
                    slots = [lay.frame_slot(f) for f in range(s.next_frame, s.next_frame + c)]
                    if slots == list(range(slots[0], slots[0] + c)):  # the usual case: one slice, no index_put
                        self._latents[s.row, slots[0]:slots[0] + c] = x0[s.row]
                    else:
                        self._latents[s.row, slots] = x0[s.row]
                t1 = clock.mark()
                pixels = self._decode(batch, x0)
                starting = [s for s in batch if s.chunks_done == 0]
                if starting:
                    self._check_finite(starting, x0, pixels)
                for s in batch:
                    out[s] = self._finish_chunk(s, x0[s.row:s.row + 1], pixels.get(s), t0, t1,
                                                initial[s.row] is not None)
            for s in alone:
                out[s] = self._first_frame(s, t0)
        return {s: out[s] for s in active}

    def _window_chunk(self, s: PooledStream, t0: Any) -> VideoChunk:
        """The next chunk of a stream under a joint denoising window (``denoise_window`` > 1): the
        window advanced until its oldest chunk is clean, that chunk's cache pass, its decode."""
        gen, cache, clock = self._gen, self._cache, self._clock
        c = gen.streaming.num_frame_per_block
        cross = self._row_cross(s.row)
        x0 = rolling_chunk(gen.dit, s._window, cross, cache, s.row, gen.steps, c, end_frame=s._req.latent_frames,
                           generator=s._rng)  # [1, c, C, h, w]
        cache_pass(gen.dit, x0, cross, cache, cache.plan_rows([s.next_frame], c), gen.steps, generator=s._rng)
        lay = cache.layout
        self._latents[s.row, [lay.frame_slot(f) for f in range(s.next_frame, s.next_frame + c)]] = x0[0]
        t1 = clock.mark()
        rows = x0.expand(s.row + 1, *x0.shape[1:])  # row s.row of the batch is this stream's x0
        pixels = self._decode([s], rows)
        if s.chunks_done == 0:
            self._check_finite([s], rows, pixels)
        return self._finish_chunk(s, x0, pixels.get(s), t0, t1, False)

    def _first_frame(self, s: PooledStream, t0: Any) -> VideoChunk:
        """Frame 0 of an ``independent_first_frame`` stream, alone in a one-row view of the cache: the
        given image's latent written at timestep ``context_noise``, or one frame denoised (with the
        first chunk's steps) from the stream's noise. The eager DiT runs it (one frame, batch 1)."""
        gen, clock = self._gen, self._clock
        st, dit = gen.streaming, gen.dit
        view = self._cache.row_view(s.row)
        cross = self._row_cross(s.row)
        init = s._initial
        if init is not None:
            x0 = init[0:1].unsqueeze(0)  # [1, 1, C, h, w]
            cache_pass(dit, x0, cross, view, 0, gen.steps, generator=s._rng)
        else:
            noise = torch.randn((1, 1, dit.config.in_dim, st.latent_height, st.latent_width), generator=s._rng,
                                device=gen.device, dtype=gen.dtype)
            x0 = denoise_chunk(dit, noise, cross, view, 0, gen.steps, generator=s._rng, first_chunk=True)
        self._cache.absorb(view, s.row)
        self._latents[s.row, self._cache.layout.frame_slot(0)] = x0[0, 0]
        t1 = clock.mark()
        decoded = None
        if s._decoder is not None:
            d0 = clock.mark()
            pixels = s._decoder.decode(x0.transpose(1, 2))  # [1, 3, 1, H, W]
            decoded = (pixels, d0, clock.mark(), 1.0)
        if s.chunks_done == 0:
            self._check_finite([s], x0.expand(s.row + 1, *x0.shape[1:]), {s: decoded} if decoded else {})
        return self._finish_chunk(s, x0, decoded, t0, t1, init is not None, frames=1)

    def _check_finite(self, streams: list[PooledStream], x0: Tensor,
                      pixels: dict[PooledStream, tuple[Tensor, Any, Any, float]]) -> None:
        """Raise :class:`NonFiniteError` when the first chunk of ``streams`` holds NaN / Inf.

        Only a stream's first chunk is checked: the check reads a flag on the host (a device sync),
        so later chunks, the hot path, never pay for it; whatever makes a stream non-finite
        (weights, config, dtype) shows in its first chunk."""
        rows = torch.tensor([s.row for s in streams], device=x0.device)
        flags = [torch.isfinite(x0.index_select(0, rows)).flatten(1).all(1)]  # [n] latents finite per stream
        decoded = [s for s in streams if s in pixels]
        if decoded:
            flags.append(torch.stack([torch.isfinite(pixels[s][0]).all() for s in decoded]))
        ok = torch.cat(flags).tolist()  # one host sync for every stream that started this step
        if not all(ok[:len(streams)]):
            raise NonFiniteError(non_finite_cause(self._gen, "latents"))
        if not all(ok[len(streams):]):
            raise NonFiniteError(non_finite_cause(self._gen, "decoded frames"))

    def _decode(self, active: list[PooledStream], x0: Tensor) -> dict[PooledStream, tuple[Tensor, Any, Any, float]]:
        """Each decoding stream's pixels [1, 3, T, H, W], the clock marks around its decode and its
        share of that time.

        The eager VAE's streams decode together in batched passes (:func:`decode_streams`, or
        :func:`~sf_sdk.models.taehv.decode_tiny_streams` for the tiny decoder: each stream's
        ``decode_s`` is its share of the pass), other decoders one stream at a time."""
        clock = self._clock
        decoding = [s for s in active if s._decoder is not None]
        batched = [s for s in decoding if type(s._decoder) in _BATCHED_DECODE]
        out: dict[PooledStream, tuple[Tensor, Any, Any, float]] = {}
        if len(batched) > 1:
            d0 = clock.mark()
            rows = torch.tensor([s.row for s in batched], device=x0.device)
            batch_decode = _BATCHED_DECODE[type(batched[0]._decoder)]  # one generator: one decoder type
            pixels = batch_decode([s._decoder for s in batched], x0.index_select(0, rows).transpose(1, 2))
            d1 = clock.mark()
            out.update({s: (p, d0, d1, 1.0 / len(batched)) for s, p in zip(batched, pixels)})
        for s in decoding:
            if s not in out:
                d0 = clock.mark()
                p = s._decoder.decode(x0[s.row:s.row + 1].transpose(1, 2))  # [1, 3, T, H, W]
                out[s] = (p, d0, clock.mark(), 1.0)
        return out

    def _finish_chunk(self, s: PooledStream, latents: Tensor, decoded: tuple[Tensor, Any, Any, float] | None,
                      t0: Any, t1: Any, is_initial: bool, frames: int | None = None) -> VideoChunk:
        gen, clock = self._gen, self._clock
        c = gen.streaming.num_frame_per_block if frames is None else frames
        frames = None
        d0 = d1 = t1
        share = 1.0
        if decoded is not None:
            pixels, d0, d1, share = decoded
            frames = to_uint8(pixels)
            if is_initial and s._req.initial_frames is not None:
                first = video_frames_for_latents(s.next_frame, gen.temporal_stride)
                frames = s._req.initial_frames[first:first + frames.shape[0]]  # the given frames, as given
        chunk = VideoChunk(s.chunks_done, s.next_frame, latents[0].clone(), frames, clock.timing(t0, t1, d1, d0, share),
                           is_initial)
        s.chunks_done += 1
        s.next_frame += c
        total = s._req.latent_frames
        if total is not None and s.next_frame >= total:
            s.finished = True
            s.close()
        return chunk
