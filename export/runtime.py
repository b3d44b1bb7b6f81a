"""Adapters that give a captured step the interfaces the streaming loop uses.

* :class:`StepChunkModel` is a :class:`sf_sdk.sampling.ChunkModel` (``step_attention`` and
  ``forward_chunk``, the same call signature as :class:`sf_sdk.models.dit.WanDiT`) over a
  captured chunk step, so :func:`sf_sdk.sampling.denoise_chunk` and the
  :class:`~sf_sdk.StreamingGenerator` run unchanged on every backend.
* :class:`StepDecoder` is a streaming decoder (``decode`` / ``reset``) over the two captured
  VAE decode steps.

State lives in the :class:`sf_sdk.cache.KVCache` the caller owns. An in-place step (torch.compile,
AOTInductor) writes its buffers directly. A functional step (ONNX Runtime, TensorRT) writes the
updated caches into a second pair of buffers of the same shape, which then *become* the cache's
buffers (:meth:`KVCache.swap`, never copied): two buffers ping-pong per stream. The inputs of
every step are :class:`sf_sdk.models.dit.ChunkInputs` (one declaration for all backends).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from export.settings import ChunkShapes, DecodeShapes
from sf_sdk.attention import REFERENCE
from sf_sdk.cache import ChunkPlan, KVCache
from sf_sdk.models.dit import ChunkInputs, CrossAttnCache, StepAttention, WanDiT

__all__ = ["StepChunkModel", "StepDecoder", "InPlaceStep", "FunctionalStep", "DecodeRunner", "DecoderFactory",
           "BackendUnavailable"]

log = logging.getLogger(__name__)

# An in-place chunk step: (x, timestep, cross_k, cross_v, k_cache, v_cache, write_slots, kv_len,
# cos_q, sin_q) -> flow; the cache buffers are updated in place.
InPlaceStep = Callable[..., Tensor]
# A functional chunk step: (inputs in the order above, k_out, v_out) -> flow; writes the updated
# caches into k_out / v_out and leaves its inputs untouched. A step that allocates its outputs
# returns (flow, new_k, new_v) instead, and those become the cache buffers.
FunctionalStep = Callable[[Sequence[Tensor], Tensor, Tensor], Tensor | tuple[Tensor, Tensor, Tensor]]
# A VAE decode step: (z, conv cache tensors) -> (pixels, new conv cache tensors).
DecodeRunner = Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, tuple[Tensor, ...]]]
# A new streaming decoder (fresh state) per stream.
DecoderFactory = Callable[[], "StepDecoder"]


class BackendUnavailable(RuntimeError):
    """A backend cannot run on this machine (missing GPU, package or artifact); the message says
    what is missing and how to get it."""


class StepChunkModel:
    """A chunk model over a captured :class:`~sf_sdk.models.dit.ChunkStep`.

    ``dit`` supplies the rotary tables (computed once per chunk, in float64, outside the graph);
    its weights are not used by the step. Exactly one of ``inplace`` / ``functional`` is given.
    ``cache_pass``: an in-place step of the same inputs that only writes the cache
    (``ChunkStep(cache_only=True)``), run by :meth:`write_cache`; without one the cache pass runs
    the chunk step and drops its flow.
    ``shapes`` is the static profile the step was captured for (None: any geometry, for steps
    that specialize themselves, such as torch.compile).
    """

    def __init__(self, dit: WanDiT, shapes: ChunkShapes | None, *, name: str, inplace: InPlaceStep | None = None,
                 functional: FunctionalStep | None = None, cache_pass: InPlaceStep | None = None,
                 device: torch.device | str | None = None) -> None:
        if (inplace is None) == (functional is None):
            raise ValueError("give exactly one of inplace= or functional=")
        if cache_pass is not None and inplace is None:
            raise ValueError("a cache_pass step writes the cache in place: give it with inplace=")
        self.dit = dit
        self.config = dit.config
        self.shapes = shapes
        self.name = name
        self._inplace = inplace
        self._functional = functional
        self._cache_pass = cache_pass
        self.device = torch.device(device) if device is not None else dit.patch_embedding.weight.device
        # The spare buffers of each cache a functional step has run on.
        self._spares: weakref.WeakKeyDictionary[KVCache, tuple[Tensor, Tensor]] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ ChunkModel
    def step_attention(self, cache: KVCache, plan: ChunkPlan, impl=None) -> StepAttention:
        """The chunk's rotary tables, slots and valid lengths (the attention implementation is the
        one captured in the graph; ``impl`` is ignored)."""
        if plan.key_positions is not None:
            raise ValueError("exported chunk steps implement position_mode='absolute' only; this cache is "
                             "'cache_relative': run it with backend='eager'")
        return self.dit.step_attention(cache, plan, REFERENCE)

    def forward_chunk(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache,
                      start_frame: int | ChunkPlan, attend: StepAttention | None = None) -> Tensor:
        """Predict the flow of one chunk; the cache is updated as by ``WanDiT.forward_chunk``."""
        args = self._inputs(x, timestep, cross, cache, start_frame, attend)
        if self._inplace is not None:
            return self._inplace(*args)
        k_out, v_out = self._spare(cache)
        flow = self._functional(args, k_out, v_out)
        if isinstance(flow, tuple):
            flow, k_out, v_out = flow
        self._spares[cache] = cache.swap(k_out, v_out)
        return flow

    def write_cache(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache,
                    start_frame: int | ChunkPlan, attend: StepAttention | None = None) -> None:
        """The cache pass: the keys/values ``forward_chunk`` writes, through the cache-only step when
        there is one (else the chunk step, its flow dropped)."""
        if self._cache_pass is None:
            self.forward_chunk(x, timestep, cross, cache, start_frame, attend)
            return
        self._cache_pass(*self._inputs(x, timestep, cross, cache, start_frame, attend))

    # ------------------------------------------------------------------ helpers
    def _inputs(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache,
                start_frame: int | ChunkPlan, attend: StepAttention | None) -> ChunkInputs:
        if timestep.dim() == 1 and timestep.shape[0] == x.shape[0]:
            timestep = timestep.unsqueeze(1).expand(x.shape[0], x.shape[1])
        self._check(x, timestep, cross, cache)
        plan = start_frame if isinstance(start_frame, ChunkPlan) else cache.plan_chunk(start_frame, x.shape[1])
        if plan.rows != cache.batch_size:
            raise ValueError(f"the {self.name} chunk step runs all {cache.batch_size} rows of its cache at once, "
                             f"the plan covers {plan.rows}")
        if attend is None or attend.plan is not plan:
            attend = self.step_attention(cache, plan)
        return ChunkInputs.from_plan(x, timestep, cross, cache, attend)

    def _spare(self, cache: KVCache) -> tuple[Tensor, Tensor]:
        spare = self._spares.get(cache)
        if spare is None or spare[0].shape != cache.k.shape or spare[0].dtype != cache.k.dtype:
            spare = (torch.empty_like(cache.k), torch.empty_like(cache.v))
        return spare

    def _check(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache) -> None:
        s = self.shapes
        if s is None:
            return
        redo = ("re-export for this geometry (python -m export.<backend> --latent-hw H W --window N "
                "[--num-frames F])")
        if tuple(x.shape) != s.latent_shape:
            raise ValueError(f"the {self.name} chunk step was exported for latents {s.latent_shape} "
                             f"[B, F, C, H, W], got {tuple(x.shape)}: {redo}")
        if x.dtype != s.dtype:
            raise ValueError(f"the {self.name} chunk step computes in {s.dtype}, the latents are {x.dtype}")
        if tuple(timestep.shape) != (s.batch, s.chunk_frames):
            raise ValueError(f"timestep must be [B, F] = {(s.batch, s.chunk_frames)}, got {tuple(timestep.shape)}")
        if tuple(cache.k.shape) != s.cache_shape:
            raise ValueError(f"the {self.name} chunk step was exported for a KV cache {s.cache_shape} "
                             f"[L, B, capacity, H, D], this stream's cache is {tuple(cache.k.shape)}: "
                             f"the window (local_attn_size) or, with global attention, the stream length "
                             f"differs; {redo}")
        if cache.dtype != s.dtype:
            raise ValueError(f"the KV cache holds {cache.dtype}, the {self.name} chunk step computes in {s.dtype}")
        want = (s.num_layers, s.batch, s.text_len, s.num_heads, s.head_dim)
        if tuple(cross.k.shape) != want:
            raise ValueError(f"prompt cross-attention K/V must be {want}, got {tuple(cross.k.shape)}")


class StepDecoder:
    """Streams latent chunks through the captured VAE decode steps (one latent frame per call).

    Same contract as :class:`sf_sdk.models.vae.StreamingDecoder`: successive ``decode`` calls of
    ``[B, z, t, h, w]`` chunks return their pixel frames; ``reset()`` starts a new stream.
    """

    def __init__(self, shapes: DecodeShapes, first: DecodeRunner, step: DecodeRunner, *,
                 device: torch.device | str) -> None:
        self.shapes = shapes
        self._first = first
        self._step = step
        self.device = torch.device(device)
        self._cache: tuple[Tensor, ...] | None = None

    @property
    def started(self) -> bool:
        return self._cache is not None

    def reset(self) -> None:
        self._cache = None

    def decode(self, z: Tensor) -> Tensor:
        s = self.shapes
        if z.dim() != 5 or (z.shape[0], z.shape[1], *z.shape[3:]) != (s.batch, s.z_dim, *s.latent_hw):
            raise ValueError(f"the decode step was exported for latents [B, z, t, h, w] = "
                             f"[{s.batch}, {s.z_dim}, t, {s.latent_hw[0]}, {s.latent_hw[1]}], got "
                             f"{tuple(z.shape)}")
        if z.dtype != s.dtype:
            raise ValueError(f"the decode step computes in {s.dtype}, the latents are {z.dtype}")
        frames = []
        for i in range(z.shape[2]):
            frame = z[:, :, i:i + 1].contiguous()  # [B, z, 1, h, w]
            if self._cache is None:
                zeros = tuple(torch.zeros(shape, dtype=s.dtype, device=self.device) for _, shape in s.cache)
                pixels, self._cache = self._first(frame, zeros)
            else:
                pixels, self._cache = self._step(frame, self._cache)
            frames.append(pixels)
        return torch.cat(frames, dim=2)  # [B, 3, frames, H, W]
